"""The cache build's panel: live progress in every tab, or the failure with its reason and Retry.

The build itself runs in the server process (``engine.attribution.build_worker``, started by
``runtime.start_build``); this panel only reads its state.  While it runs, a fragment
re-renders every second (``st.fragment(run_every=...)``) without rerunning the page; when it
sees the build end, it reruns the whole page once, so the live results replace the
precomputed ones.
"""

from __future__ import annotations

import streamlit as st

from engine.attribution.build_worker import WAITING_TURN, BuildState
from explorer import runtime
from explorer.plain import PENDING
from explorer.runtime import Handle

POLL_S = 1.0
# session-state key: the methods this tab's last Explore answer left out because the build had still to reach them
# (results_view.get_result sets it); the panel offers to show them once they are built
DRAWN_PENDING = "drawn_pending"


def build_panel(handle: Handle) -> None:
    """Show the build's state at the top of the page (nothing once every cache is built)."""
    _await_check(handle)
    state = handle.build
    if state.status == "running":
        _live(handle)
    elif state.status == "failed":
        _failed(handle)
    elif st.session_state.pop(_seen_running(handle), False):
        info = handle.session.method_info()
        st.success(runtime.finished_message(state, {n: i.get("title", n) for n, i in info.items()}))


# how long a page waits for a just-started build's check (which caches are built, which methods can run here) before
# it is drawn: 2.3-2.8 s on digits on an idle 2-core machine, nearly all of it CLIP's (an open_clip import), once per
# server process; a check that takes longer leaves the page to say it is checking, as before
CHECK_WAIT_S = 10.0


def _await_check(handle: Handle) -> None:
    """Wait (with a spinner, up to ``CHECK_WAIT_S``) for the build's check when the page is drawn during it.

    Why: a page drawn during the check said "Whether CLIP similarity can run on this server is known seconds
    after it starts ...: choose a sample or setting to see", and kept saying it until a click (QA 40 #7), since
    nothing redraws the page when the check ends (a rerun from the panel's fragment then blanked it, QA 16).
    Drawn after the check, the column says at once whether the method can run here, and why not."""
    worker = getattr(handle, "worker", None)
    if worker is None or not handle.build.checking:
        return
    with st.spinner("Checking which attribution caches are built and which methods can run here ...",
                    show_time=True):
        worker.wait_checked(CHECK_WAIT_S)


def _seen_running(handle: Handle) -> str:
    """The session-state key saying this tab saw this server's build of this model running.  Per model: one
    key for all made the mnist page, switched to during the digits build, say "Attribution caches built in
    0.0 min" though it built nothing (QA 23 #1)."""
    return f"build_was_running:{id(handle)}"


@st.fragment(run_every=POLL_S)
def _live(handle: Handle) -> None:
    state = handle.build
    if state.status != "running":
        st.rerun()  # the whole page: live results instead of precomputed ones, or the failure
    if state.checking:  # a just-started server finding out whether anything needs building
        st.caption(f"Checking which attribution caches are built ... ({state.elapsed_s:.0f} s)")
        return
    # No full-page rerun when the check ends (QA round 16): a st.rerun() from this run_every fragment
    # right after the page's first run intermittently left the browser with the page blank below this
    # panel (no tabs, no results) until the build ended, though the server had sent the whole page.
    st.session_state[_seen_running(handle)] = True  # a real build: say when it has finished
    info = handle.session.method_info()
    titles = ", ".join(info.get(n, {}).get("title", n) for n in state.methods)
    pre = handle.precomputed
    meanwhile = (
        "Gallery samples at the default settings show precomputed results meanwhile; other queries are answered "
        "by the methods already built, and the others join when the build finishes."
        if pre is not None and pre.methods_for(handle.session)
        # no precomputed file for this model (own data)
        else "The methods already built answer meanwhile; the others join when the build finishes."
    )
    # another model's build in this server goes first (one at a time): this one has not started, and says so
    # rather than "Building" (QA 40 #6); the message names whose build and, once it has one, its time left
    heading = "Waiting to build the attribution caches" if WAITING_TURN in state.message else \
        "Building the attribution caches"
    with st.container(border=True):
        st.markdown(
            f"**{heading}** for {titles} (once per model; saved under "
            f"`{handle.cache_root}`, resumed if interrupted). {meanwhile}"
        )
        # never a full bar while work remains (QA 40 #5): the bar as the words' whole percent
        st.progress(runtime.whole_percent(state) / 100, text=runtime.build_message(handle, state))
        _built_since_drawn(state, info)


def _built_since_drawn(state: BuildState, info: dict) -> None:
    """A button that redraws the page when a method whose column says "Being built" has been built meanwhile.

    Why a button, not a rerun by itself: this panel redraws every second on its own, but the page below it only
    when the user changes something or the build ends (a full rerun issued by this fragment on its own once
    left the browser blank below the panel, QA 16), so a method built mid-build kept its "Being built" column
    with nothing saying it was ready (review 53)."""
    from explorer.plain import and_list

    ready = [n for n in st.session_state.get(DRAWN_PENDING, ()) if n not in state.pending]
    if not ready:
        return
    names = and_list([info.get(n, {}).get("title", n) for n in ready])
    if st.button(f"Show {names} live", key="show_built",
                 help=f"{names} finished building: its column below still says it is being built until the page "
                      "is drawn again (any change does that too)."):
        st.session_state[DRAWN_PENDING] = ()
        st.rerun()  # the whole page, asked for by a click


def _failed(handle: Handle) -> None:
    state = handle.build
    with st.container(border=True):
        if not state.retry_helps:  # the cache root cannot be written: no retry in this server can build there
            st.warning(f"**The missing attribution caches cannot be built here:** {state.error}")
            st.caption("Methods already built answer queries. To build the others, restart the app with a writable "
                       "`--cache-root`.")
            return
        st.error(f"**Building the attribution caches failed:** {state.error}")
        st.caption(
            "Finished parts are kept; Retry continues from them. Methods already built answer queries meanwhile."
        )
        if st.button("Retry the build", key="retry_build", type="primary"):
            runtime.retry_build(handle)
            st.rerun()


def waiting_note(before: str, after: str = "") -> None:
    """``before + PENDING + after`` as an info box.

    Why no progress figure here: a figure drawn with the page stays as drawn until the next rerun, and
    redrawing the note in its own ``st.fragment(run_every=...)`` left the browser with a blank page after
    the build panel's closing full-page rerun (tests/test_browser.py, 2 of 3 runs).  The panel at the
    top of the page is the one live view of the build; the page is rerun when it ends."""
    st.info(f"{before}{PENDING}{after}")
