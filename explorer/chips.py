"""One-click selections for the explorer's multiselects (their "chips").

Why: putting back the methods one had hidden took a click per chip, and picking a method's whole top-k in
the Explore page's "What do these training images support?" took a click per image (QA round 15, A8).
Streamlit's own "Select all" sits inside the dropdown, shows only while two or more options are left out,
and is missing from older Streamlit releases; the buttons here are visible where the choice is made.
A button writes the multiselect's value through ``st.session_state`` in its callback, which runs before
the script, so the widget is drawn with the new value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import streamlit as st


def init_selection(key: str, options: Sequence[Any], initial: Sequence[Any] | None = None) -> None:
    """Give the keyed multiselect ``key`` its value through ``st.session_state`` on every run, before it is
    drawn (the widget then takes no ``default``): every one of ``options`` at first, then what it holds (of
    ``options``: a model switch may drop some).

    Why on every run: a value written this way is sent to the browser with the widget, so the browser shows
    what the server holds.  Before 2026-12-06 the widget had a ``default`` (every option on the first run,
    None after), and on a just-started server the browser sometimes drew the sidebar's multiselect empty
    while the server held every method (the build panel's full-page rerun, 30 ms after the first run); the
    next click (a gallery sample) sent the empty selection back: "Select at least one method" (3 of 5 fresh
    starts).  Writing it once, without a default, left it so (6 of 8).

    An option that was not offered on the previous run (a method the cache build has just finished) joins the
    selection: the Groups page had said TRAK would be "ready when the cache build finishes", then left it
    unselected behind an "All methods" button (QA 23b #3).  One the user removed stays removed.

    ``initial``: the first selection, when not every option (the methods that can run here: QA 47 #10, CLIP's
    column read "Unavailable" on every query of an offline laptop, one column in five)."""
    held = st.session_state.get(key)
    offered = st.session_state.get(f"{key}__offered")
    st.session_state[f"{key}__offered"] = list(options)
    if held is None:
        st.session_state[key] = [v for v in (options if initial is None else initial) if v in options] or list(options)
        return
    kept = [v for v in held if v in options]
    st.session_state[key] = kept + [v for v in options if offered is not None and v not in offered and v not in kept]


def keep_choices(keys: Sequence[str], upper: dict[str, int] | None = None) -> dict[str, tuple[int, int]]:
    """Keep the values of the keyed widgets ``keys`` while a run does not draw them (another source, another page).

    Streamlit drops a widget's value at the end of a run that does not draw it, so a user who looked at the gallery
    and came back found "Training image 0" instead of 17 (QA 23 #6), and the Groups page came back from another tab
    with its defaults while its result still used the earlier choices (QA 23b #4).  Assigning a value to its own
    key keeps it, and sends it to the browser with the widget.  ``upper``: the largest value a key may hold now
    (an index into a training set that a model switch may have shrunk).  Call it on every run, before the widgets.

    Returns {key: (value held, value kept)} for each value ``upper`` lowered, for the caller to say (QA 47 #9:
    training image 1500 on digits became mnist's 999 with no word)."""
    lowered: dict[str, tuple[int, int]] = {}
    for key in keys:
        if key in st.session_state:
            value = st.session_state[key]
            if upper and key in upper and int(value) > upper[key]:
                lowered[key] = (int(value), upper[key])
                value = upper[key]
            st.session_state[key] = value
    return lowered


def _set(key: str, values: list[Any]) -> None:
    st.session_state[key] = values


def select_all(key: str, options: Sequence[Any], label: str, where: Any = None) -> bool:
    """A compact button that selects every one of ``options`` in the multiselect ``key``, drawn (in ``where``,
    the page by default) only while some are left out; True when it was drawn."""
    chosen = st.session_state.get(key)
    if chosen is None or set(options) <= set(chosen):
        return False
    (where or st).button(label, key=f"{key}__all", type="tertiary", icon=":material/select_all:",
                         on_click=_set, args=(key, list(options)))
    return True


def pick_buttons(key: str, picks: dict[str, list[Any]], label: str) -> None:
    """One compact button per named selection in ``picks`` (button text -> the values it selects), in a row
    after ``label``: each replaces the multiselect ``key``'s value with its values."""
    if not picks:
        return
    with st.container(horizontal=True, gap="small", vertical_alignment="center"):
        st.caption(label, width="content")
        for i, (text, values) in enumerate(picks.items()):
            st.button(text, key=f"{key}__pick{i}", type="tertiary", on_click=_set, args=(key, list(values)))
