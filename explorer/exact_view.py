"""A compressed K-FAC bank's answer while its exact re-rank is pending: the "Approximate ranking" box and
its button, and the page's poller (progress, the rerun when the exact scores exist, a stopped re-rank).

Why a module of its own: the deferred re-rank (``AttributionSession.query(defer_exact=True)``; its work
runs in ``explorer.grid_filler``) is the one part of the results page that changes while nobody
clicks; docs/architecture.md section 8.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from engine.attribution.rerank import RerankProgress
from engine.attribution.results import MethodResult, QueryResult
from explorer.runtime import Handle

log = logging.getLogger(__name__)
EXACT_POLL_S = 1.0  # how often a page with an approximate ranking looks whether the exact one is ready
BUTTON_POLL_S = 0.5  # how often the exact-ranking button redraws its progress bar while it waits
EXACT_BUTTON = "Exact ranking"  # the button under a compressed bank's approximate ranking (``exact_button``)


def tab_id() -> tuple[str | None, str]:
    """This browser tab's id: (its Streamlit session id, a key of its own).  The background worker takes
    turns between tabs and drops a closed tab's query (``explorer.grid_filler``); the session id says
    whether the tab is still connected (``runtime.session_alive``), and the key tells apart sessions
    that share an id (AppTest's are all "test session id")."""
    ctx = get_script_run_ctx()
    return (ctx.session_id if ctx is not None else None), st.session_state.setdefault("tab_key", uuid.uuid4().hex)


@st.fragment(run_every=EXACT_POLL_S)
def await_exact(handle: Handle, result: QueryResult, top_k: int) -> None:
    """Rerun the whole page once the background re-rank of ``result`` has finished, so its exact ends
    replace the approximate ones without a click, and a few times while it runs (``exact_arrived``:
    the candidates done so far, the most extreme first, are exact); say so while it waits for another tab's re-rank or
    for this tab's previous one to stop, and if the worker stopped without finishing it.

    While it runs, a progress bar says how far the re-rank is (``RerankedQuery.exact_progress``).
    A fragment polls (``run_every``) instead of the worker pushing, because a Streamlit page only
    changes on a rerun of its script.  It is only placed when the build is not running: the build
    panel has its own polling fragment, and two of them with a full-page rerun between left the
    browser with a blank page (``build_view.waiting_note``)."""
    if exact_arrived(result, top_k):
        st.rerun()
    if _button_clicked(result):
        # this run is the "Exact ranking" click, which waits for the re-rank with a live bar of its
        # own under the rankings: a bar here would stand frozen above the grid until it ends (QA7), and so
        # would the previous run's, unless something takes its place (QA8: drawing nothing left it there)
        st.empty()
        return
    shown = False
    for progress in _running_progress(result):
        shown = True
        st.progress(_fraction(progress), text=rerank_progress_text(progress))
    if shown or not _exact_still_pending(result):
        return
    tab = tab_id()
    ahead = handle.grid_filler.ahead(tab)
    # the waiting and stopping notes are captions, not boxes: a box's padding and wider text pushed
    # K-FAC's grid 211-259 px below the other methods' while they showed (the progress bar's line: 94)
    if ahead == 0 and handle.grid_filler.stopping(tab):
        st.caption(":material/schedule: Stopping the exact re-rank of this tab's previous query at the end of "
                   "its current batch; this one starts next.")
    elif ahead is None:
        st.warning("**The exact re-rank is not running:** it stopped before it finished (the server's log "
                   "says why). The button under the rankings computes it.")
    elif ahead > 0:
        st.caption(f":material/schedule: Waiting for {ahead} exact re-rank{'s' if ahead > 1 else ''} of other "
                   "tabs on this server; this one follows.")


def rerank_progress_text(p: RerankProgress) -> str:
    """One line on a running re-rank: candidates done, time so far and, from the second batch on, the
    time left at the rate so far (a CPU re-rank of a large model takes minutes to hours, so say which)."""
    if p.total <= 0 or p.done <= 0:
        return f"Exact re-rank: starting ({_duration(p.seconds)})"
    head = f"Exact re-rank: {p.done:,} of {p.total:,} candidates ({_duration(p.seconds)}"
    return head + (")" if p.left is None else f", about {_duration(p.left)} left)")


def _fraction(p: RerankProgress) -> float:
    return min(p.done / p.total, 1.0) if p.total else 0.0


def _running_progress(result: QueryResult) -> list[RerankProgress]:
    """The progress of each of ``result``'s deferred re-ranks that is running now."""
    found = (getattr(q, "exact_progress", None) for _, q in _deferred(result))
    return [p for p in found if p is not None]


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _deferred(result: QueryResult) -> list[tuple[MethodResult, Any]]:
    """(method result, prepared query) of the methods shown before their deferred re-rank finished
    (``result.prepared`` is shared with the query's raw result, so the queries tell how far it is since)."""
    out = []
    for name, r in result.methods.items():
        query = getattr((result.prepared or {}).get(name), "query", None)
        if r.exact_pending and query is not None:
            out.append((r, query))
    return out


def exact_arrived(result: QueryResult, top_k: int) -> bool:
    """True when a method of ``result`` was shown before its deferred re-rank finished and either it has
    finished since, or it has done enough more candidates to redraw: at least ``top_k`` per end (the
    re-rank goes most extreme first, ``rerank.merge_candidates``), and twice as many as were exact when
    shown, so a 512-candidate re-rank redraws the page about five times, not once a batch."""
    for r, query in _deferred(result):
        if not getattr(query, "exact_pending", False):
            return True
        progress = getattr(query, "exact_progress", None)
        shown = 0 if r.exact is None else int(r.exact.sum())
        if progress is not None and progress.done >= max(2 * top_k, 2 * shown, 1):
            return True
    return False


def _button_clicked(result: QueryResult) -> bool:
    """Whether this run of the page is a click on a pending method's "Exact ranking" button (a button's
    state is True for the whole run its click started, before the button itself is drawn)."""
    return any(st.session_state.get(f"exact_{r.name}") for r, _ in _deferred(result))


def _exact_still_pending(result: QueryResult) -> bool:
    return any(getattr(q, "exact_pending", False) for _, q in _deferred(result))


def exact_button(handle: Handle, name: str, result: QueryResult) -> None:
    """A compressed bank answers from its scan first; its exact re-rank runs in the background
    (``grid_filler``).  The button shows it: it waits for the re-rank (or runs it, if the worker moved
    on to a newer query) and re-scores the shown answer."""
    # short, and no promise (the line above the grid says whether the exact re-rank runs, waits or stopped);
    # it stands under the rankings (``results_view.method_columns``), so that K-FAC's grid starts near the others'
    going = interrupted_note(result)
    st.warning("**Approximate ranking**: a fast estimate from a compressed copy of the training gradients.",
               icon=":material/hourglass_top:")
    if going:  # the fill this button started still runs for this answer: no second button beside its note (QA 53 #3)
        return
    # a short label: "Show the exact ranking" read "Show the exact ranki..." in a column of four at 1280 px (QA 52);
    # the tooltip says what it does
    if not st.button(EXACT_BUTTON, key=f"exact_{name}",
                     help="Shows the exact scores of the re-ranked candidates. The shown images and scores are a "
                          "fast estimate from a compressed copy of the training gradients (on a smaller scale than "
                          "exact scores until the first exact ones give the factor that rescales them). The exact "
                          "K-FAC scores of the "
                          "strongest candidates at both ends are computed in the background (their training "
                          "gradients again: seconds on a GPU, minutes on a CPU); this waits for them, or computes "
                          "them if the worker moved on to a newer query, and shows them."):
        return
    try:
        _fill_showing_progress(handle, result)
    except Exception as e:  # noqa: BLE001 - say why, keep the approximate ranking on the page
        log.exception("exact re-rank failed")
        st.error(f"The exact re-rank failed: {type(e).__name__}: {e}")
        return
    store = st.session_state.get("result_cache")
    if store is not None:
        store["shown"] = {}  # re-score the raw result at the chosen damping: its ends are now exact
    st.rerun()


FILL_KEY = "exact_fill"  # st.session_state: the button's fill (``_Fill``), kept past the run its click started


@dataclass
class _Fill:
    """The exact-ranking button's fill: ``prepared`` is its result's (shared by every view of that result: a
    damping change re-scores the same one), ``thread`` runs ``session.fill_exact``, ``failed`` gets its error."""

    prepared: Any
    thread: threading.Thread
    failed: list[BaseException] = field(default_factory=list)


def interrupted_note(result: QueryResult) -> bool:
    """What became of a click on the button whose run a newer run superseded (a slider moved during the wait,
    QA 52 #3: the column was approximate again, the button back, with no word).  The fill goes on in its thread
    and the poller (``await_exact``) redraws the page once it is done, so while it runs the column says so;
    a fill that ended without the exact scores says why, and the button is there to try again.  Whether that
    fill still runs for this answer (the button is then left out: QA 53 #3)."""
    fill = st.session_state.get(FILL_KEY)
    if fill is None:
        return False
    if fill.thread.is_alive():
        if fill.prepared is result.prepared:
            st.caption(":material/schedule: **Still computing the exact ranking** you asked for (the new setting "
                       "only interrupted the wait); it replaces this one when ready.")
            return True
        return False
    st.session_state.pop(FILL_KEY, None)  # ended: said once, then forgotten (it holds its result)
    if fill.prepared is not result.prepared:
        return False
    if fill.failed:
        e = fill.failed[0]
        st.error(f"The exact re-rank failed: {type(e).__name__}: {e}")
    elif _exact_still_pending(result):
        st.caption("The exact re-rank you asked for stopped before it finished; click again to redo it.")


def _fill_showing_progress(handle: Handle, result: QueryResult) -> None:
    """``session.fill_exact(result)`` with a progress bar on the page.  The fill runs in a thread of its
    own and this run draws its progress: while a run of the page waits, the poller (a fragment of the
    same page) cannot run.  If the user moves on meanwhile, the fill still finishes (the result's
    exact scores stay cached for a return to it; ``interrupted_note`` says so, ``FILL_KEY``); its error, if
    any, is raised here."""
    fill = _Fill(result.prepared, threading.Thread(target=lambda: None))

    def work() -> None:
        try:
            handle.session.fill_exact(result)
        except BaseException as e:  # noqa: BLE001 - handed to the page's run, which shows it
            fill.failed.append(e)

    fill.thread = threading.Thread(target=work, daemon=True, name="exact-ranking-button")
    st.session_state[FILL_KEY] = fill  # before the wait: a newer run that supersedes this one finds it
    fill.thread.start()
    bar = st.progress(0.0, text="Exact re-rank: waiting for it to start")
    while fill.thread.is_alive():
        fill.thread.join(BUTTON_POLL_S)
        for progress in _running_progress(result)[:1]:
            bar.progress(_fraction(progress), text=rerank_progress_text(progress))
    st.session_state.pop(FILL_KEY, None)  # this run says how it ended
    if fill.failed:
        raise fill.failed[0]
