"""Main page: per-method proponent/opponent grids, comparison plots, timings, cache status, downloads.

The expensive call (``session.query``: query gradients + per-method preparation) runs
once per (model, query, measurement, Monte Carlo samples) for every method, and the result is
kept in ``st.session_state``; the method selection only filters what is shown, and the
damping sliders go through ``session.rescore`` (no gradient is recomputed).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import textwrap
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import streamlit as st

from engine.attribution import provenance
from engine.attribution.methods.base import SERVER
from engine.attribution.query import PREDICTED
from engine.attribution.results import MethodResult, QueryResult
from engine.attribution.signs import end_signs, removal_effect
from engine.model.measurements import draws_phrase, measurement_info, uses_draws
from explorer import analysis, chips, exact_view, figures, plain
from explorer.controls import Settings
from explorer.images import SheetRow, compose_sheet, display, png_bytes, to_uint8
from explorer.layout import FRAME, GAP, column_inner_width, label_chars, thumbnails
from explorer.query_view import Query
from explorer.runtime import Handle

if TYPE_CHECKING:
    from engine.evaluation.query_dependence import Dependence

log = logging.getLogger(__name__)


def result_base(handle: Handle, query: Query, s: Settings, pending: tuple[str, ...] = ()) -> tuple:
    """What a remembered result depends on besides the damping: the model (the sidebar switch keeps one
    browser session across models, and gallery:0 of digits is not gallery:0 of mnist), the query, the
    measurement, the query's Monte Carlo samples and, while a build runs, the methods it has still to build
    (left out of the answer: one asked again after a method is built includes it)."""
    session = handle.session
    return (session.preset.name, session.checkpoint_hash, query.key, s.measurement, s.mc_samples, pending)


def get_result(handle: Handle, query: Query, s: Settings) -> QueryResult | None:
    """The query's result at the current damping, computing or re-scoring only what changed."""
    from explorer.build_view import DRAWN_PENDING

    session = handle.session
    state = handle.build
    pending: tuple[str, ...] = ()
    st.session_state[DRAWN_PENDING] = pending  # none unless this answer leaves methods out (below)
    if state.status == "running":
        pre = _precomputed(handle, query, s)
        if pre is None and state.checking and handle.worker is not None:
            # the server has just started and does not know yet whether anything needs building
            # (seconds): with nothing precomputed to show meanwhile, wait for that answer
            with st.spinner("Checking the attribution caches ..."):
                state = handle.worker.wait_checked(60)
        if state.status == "running":
            if pre is not None or state.checking:  # the shipped answer holds every method: better than a part
                return _while_building(handle, query, pre)
            # the methods already built answer live; the ones still to build are left alone (QA round 19: a
            # new method's build made a working server answer nothing but the precomputed gallery)
            pending = state.pending
    st.session_state[DRAWN_PENDING] = pending  # the build panel offers to redraw once these are built
    base = result_base(handle, query, s, pending)
    store = st.session_state.get("result_cache")
    if store is None or store["base"] != base:
        if s.measurement == "trajectory" and query.input.trajectory is None:
            st.warning(
                "**Trajectory negative log-probability needs a recorded sampling trajectory**, and this query has none "
                "(training images and uploads were not sampled by the model). Pick a gallery sample or "
                "generate a new one, or choose another measurement."
            )
            return None
        try:
            raw, views = handle.recent_results.get(base), {}  # another tab asked it already: share its work
            if raw is None:
                with st.spinner(f"Attributing {query.title.lower()} ({_in_sentence(measurement_title(s.measurement))}, "
                                f"{draws_phrase(s.measurement, s.mc_samples)}) with every method: query gradients, then scores ...",
                                show_time=True):
                    with handle.lock:
                        raw = session.query(  # a compressed bank answers from its scan; the re-rank follows
                            query.input, s.measurement, damping=s.damping_dict,
                            methods=[n for n in session.method_names() if n not in pending] if pending else None,
                            mc_samples=s.mc_samples, defer_exact=True,
                        )
                    raw = _with_pending(handle, raw, pending)
                if all(r.status != "error" for r in raw.methods.values()):  # a failure is not shared
                    handle.recent_results.put(base, raw)
                views = {s.damping: raw}  # a shared one was scored at its tab's damping: re-scored below
            # store before any other Streamlit call, so an interrupted rerun keeps the work
            store = {"base": base, "raw": raw, "shown": views}
            st.session_state["result_cache"] = store
            # the first answer was one pass at this damping; score the damping grid while it is on
            # screen, so that moving the damping slider is a lookup (the query's own lock guards it)
            handle.grid_filler.submit(session, raw, exact_view.tab_id())
        except ValueError as e:
            st.warning(f"Cannot attribute this query: {e}")
            return None
        except Exception as e:  # noqa: BLE001 - show the reason, keep the page usable
            log.exception("query failed")
            st.error(f"The attribution failed: {type(e).__name__}: {e}")
            return None
    shown = store["shown"].get(s.damping)
    if shown is not None and exact_view.exact_arrived(shown, s.top_k):
        shown = None  # the background re-rank finished since this view was scored: show its exact ends
    if shown is None:
        # a lookup in the damping grid is instant (the spinner shows after 0.5 s only), but the grid may still be
        # being scored in the background, holding the lock: the page then waited seconds, greyed, saying nothing
        with st.spinner(rescore_text(session.method_info(), next(iter(store["shown"]), None), s.damping)), handle.lock:
            shown = session.rescore(store["raw"], s.damping_dict)
        store["shown"] = {s.damping: shown}  # keep one re-scored view; the raw result stays
    if pending:
        from explorer.build_view import waiting_note

        info = session.method_info()
        waiting_note("Live results from the methods already built; "
                     f"{plain.and_list([info[n]['title'] for n in pending if n in info])} will be ", ".")
    return _after_failed_build(handle, query, s, shown)


def rescore_text(info: dict, before: tuple | None, after: tuple) -> str:
    """The spinner's words while a result is re-scored: the methods whose damping changed (``before`` and
    ``after``: the (method, damping) pairs of the view shown and the one asked for), or, with none changed,
    the exact scores that a background re-rank has just delivered.  Without a view shown (a result another
    tab computed, scored at its own dampings) every method is scored at this page's.  Not "the exact ranking"
    (QA 55 #3): the re-rank makes the candidates' scores exact, and an image outside them may belong in the
    ends; whether one may is known only once the answer is scored, after these words
    (``MethodResult.ranking_note``, under the column)."""
    if before is None:
        return "Scoring every method at the chosen dampings ..."
    old = dict(before)
    changed = [f"{info.get(n, {}).get('title', n)} at damping {v:.1e}" for n, v in after if old.get(n) != v]
    if not changed:
        return "Showing the exact scores of the re-ranked candidates ..."
    return f"Re-scoring {plain.and_list(changed)} ..."


def _after_failed_build(handle: Handle, query: Query, s: Settings, result: QueryResult) -> QueryResult:
    """After a failed build, methods whose caches are missing keep the shipped precomputed scores they
    showed while it ran (a gallery sample at the default settings) instead of turning into "not built";
    the build panel above reports the failure and offers Retry."""
    if handle.build.status != "failed":
        return result
    pre = _precomputed(handle, query, s)
    if pre is None:
        return result
    filled = {
        n: pre.methods[n] for n, r in result.methods.items()
        if r.status == "unavailable" and n in pre.methods and pre.methods[n].status == "ok"
    }
    if not filled:
        return result
    info = handle.session.method_info()
    st.info(
        f"**Precomputed results** for {', '.join(info[n]['title'] for n in filled)} (shipped with this model "
        "for the gallery at the default settings): the cache build failed (reason above), so their caches "
        "are missing. **Retry the build** for live results; methods already built answer live."
    )
    return dataclasses.replace(result, methods={**result.methods, **filled})


def _precomputed(handle: Handle, query: Query, s: Settings) -> QueryResult | None:
    """The shipped precomputed result for this query and these settings, or None."""
    from engine.attribution.precomputed import precomputed_result

    # no percentage in a column's reason: it would stay as drawn while the build's own line moves on. While the
    # just-started server checks its caches, which methods cannot run here (CLIP without weights) is not known
    # yet, and the page is not drawn again when the check ends (a full rerun from the build panel's fragment then
    # left the page blank, QA 16), only when the build does: such a column must not promise results the build
    # will not bring ("ready when the cache build finishes", then "weights are not on this machine")
    pending = CHECKING if handle.build.checking else f"not precomputed for these settings; {plain.PENDING}"
    return precomputed_result(
        handle.session, handle.precomputed, query.key, s.measurement, s.mc_samples, s.damping_dict,
        pending_reason=pending, unavailable=handle.build.unavailable,
    )


CHECKING = "not precomputed; whether it can run on this server is known once it has checked its caches"


def _with_pending(handle: Handle, raw: QueryResult, pending: tuple[str, ...]) -> QueryResult:
    """``raw`` with a column for each method the running build has still to build, in the registry's order,
    saying so (``plain.unavailable_line``) instead of leaving it out of the page."""
    if not pending:
        return raw
    from engine.attribution.results import MethodResult

    session = handle.session
    methods = {}
    for name in session.method_names():
        if name in raw.methods:
            methods[name] = raw.methods[name]
        elif name in pending:
            m = session.method(name)
            methods[name] = MethodResult(name=name, title=m.title, kind=m.kind, caption=m.caption,
                                         status="unavailable", reason=f"{plain.BUILDING}; {plain.PENDING}")
    return dataclasses.replace(raw, methods=methods)


def _grid_words(handle: Handle) -> str:
    """", and K-FAC Influence at every step of its damping slider" when the shipped file holds K-FAC's damping
    grid (QA 30c #7: the note said "default dampings" while the slider sat at another step the file holds)."""
    grid = getattr(handle.precomputed, "arrays", {}).get("kfac_grid_damping")
    if grid is None or len(grid) == 0:
        return ""
    title = handle.session.method_info().get("kfac", {}).get("title", "K-FAC")
    return f", and {title} at every step of its damping slider"


def _while_building(handle: Handle, query: Query, result: QueryResult | None) -> QueryResult | None:
    """The precomputed ``result`` (a shipped gallery sample at the default settings) marked as such,
    or, without one, a note that points at the build panel for its progress."""
    from explorer.build_view import waiting_note

    if result is None:
        waiting_note(f"Results for {query.title.lower()} with these settings will be ", ".")
        return None
    waiting_note(
        "**Precomputed results** (shipped with this model for the gallery at the default settings: "
        f"measurement `loss`, {handle.session.config.mc_samples} Monte Carlo draws, default dampings"
        f"{_grid_words(handle)}). "
        "Live results for any query and setting will be ",
        ".",
    )
    return result


# --- method columns ----------------------------------------------------------------------


def _caption(ds, i: int, score: float, exact: bool = True, own: int | None = None,
             chars: int | None = None) -> str:
    """"#index · label · score"; an estimated score (a compressed bank's, not yet re-ranked) reads "≈score"
    with one digit less, so that the caption keeps its width (the cell is narrow: a wider one wrapped
    inside the number) and an estimate does not look more precise than it is.  ``own``: the training image the
    query is, whose label reads "query" (QA 28 #4: a training image among its own opponents, at a small M, was
    not marked as itself).  ``chars``: the label characters the cell's line holds (``layout.label_chars``); a
    longer label ends in an ellipsis ("automobi…": QA 54 F8, "automobile" broke inside the word)."""
    lab = "query" if i == own else ds.label_name(i)
    if lab is not None and chars is not None and len(lab) > chars:
        lab = lab[: chars - 1].rstrip() + "…"
    shown = analysis.format_score(score) if exact else f"≈{score:+.1e}"
    return f"#{i}" + (f" · {lab}" if lab is not None else "") + f" · {shown}"


OWN = "query"  # a narrow cell's caption of the query's own training image (``_short_caption``)


def short_labels(ds: Any) -> bool:
    """Whether every label of the data set is one or two characters (digits' and MNIST's "0".."9"): then a narrow
    cell's caption holds it too (``_short_caption``)."""
    if ds.labels is None:
        return False
    names = ds.class_names or [str(int(v)) for v in np.unique(np.asarray(ds.labels))]
    return all(len(str(n)) <= 2 for n in names)


def _short_caption(ds, i: int, own: int | None = None, short: bool = False) -> str:
    """A narrow cell's caption (five columns at the design width, ``layout.thumbnails``' compact ones):
    "index·label" where labels are short (``short_labels``), else "#index"; "query" for the query's own
    training image.  Six characters fit the 48 px cell: "#853·2" did in headless Chromium, but "#1499·2" broke after
    its dot (QA 50 had measured 45 px for "#1797·7", and with spaces it wrapped), so the "#" goes (the legend above
    the columns says what the numbers are).  The query's own training image reads "query": "#1499 query" was wider
    than the cell (QA 50 #4, QA 52); its index is in the page's header and in the scores table under the grids.
    ``short``: ``short_labels(ds)``, found once per page."""
    if i == own:
        return OWN
    return f"{i}·{ds.label_name(i)}" if short else f"#{i}"


def own_index(query: Query) -> int | None:
    """The training index a ``train:N`` query is, or the one an upload equals pixel for pixel (the engine's
    ``QueryInput.identical_to``: QA 29 #3, an uploaded training file was not marked), else None."""
    kind, _, arg = query.key.partition(":")
    if kind == "train" and arg.isdigit():
        return int(arg)
    return getattr(query.input, "identical_to", None)


def measurement_title(spec: str) -> str:
    """The measurement ``spec`` under the sidebar's name for it, the engine's catalogue title (which carries the
    unit where there is one: "Negative ELBO (bits per dimension)"), with the timestep of ``loss@t=500`` filled in."""
    info = measurement_info(spec)
    if info is None:
        return spec
    if info.spec == "loss@t":
        return f"Loss at timestep {spec.split('=', 1)[1]}" if "=" in spec else info.title
    return info.title


def _in_sentence(title: str) -> str:
    """A title inside a sentence: "Training loss" -> "training loss"; an acronym ("ELBO ...") stays."""
    return title[:1].lower() + title[1:] if title[1:2].islower() else title


def short_measurement(spec: str) -> str:
    """A measurement inside a sentence, without the title's parenthesis: "square norm", "training loss"; the
    spec itself ("square-norm") read as code pasted into a sentence (QA 67 F3)."""
    return _in_sentence(re.sub(r" \(.*\)$", "", measurement_title(spec)))


def score_meaning(kind: str, measurement: str) -> str:
    """What one score of a method of ``kind`` is, for the measurement it scores (``session.measurement_used``:
    D-TRAK's is the square norm whatever the sidebar asks)."""
    if kind == "similarity":
        return "similarity to the query (not a change)"
    return f"predicted change of the query's {_in_sentence(measurement_title(measurement))} if that image were removed"


def score_legend(methods: list[tuple[str, str, str]], has_labels: bool, compact: bool = False,
                 with_label: bool = False, own: int | None = None) -> str:
    """The line above the method columns that reads the thumbnails' captions ("#726 · 1 · +8.94e-02" was not
    explained on the page, and its scale changes with the measurement): what a caption holds, then what a score
    is for each group of ``methods`` ((title, kind, measurement used)) that share a meaning.  ``compact``: the
    captions hold the index only (``explorer.layout``), or with ``with_label`` the index and a short label
    (``short_labels``), and the scores are in the table under the grids; ``own``: the training image the query is,
    whose compact caption reads "query" (``_short_caption``)."""
    meanings: dict[str, list[str]] = {}
    for title, kind, used in methods:
        meanings.setdefault(score_meaning(kind, used), []).append(title)
    held = "training index · label · score" if has_labels else "training index · score"
    parts = "; of ".join(f"{plain.and_list(titles)}: {meaning}" for meaning, titles in meanings.items())
    itself = "" if own is None else f"; *{OWN}* marks training image {own}, the query itself"
    if compact:
        shown, rest = ("training index·label", "score") if with_label else \
            ("training index", "label and score" if has_labels else "score")
        return (f"Under each image: **{shown}** (its {rest}: *{SCORES_TABLE}*, under the grids{itself}). "
                f"Score of {parts}.")
    return f"Under each image: **{held}**. Score of {parts}."


SCORES_TABLE = "Scores of the images above"


def grid_scores(result: QueryResult, names: list[str], titles: dict[str, str], ds: Any, labels: np.ndarray | None,
                top_k: int, own: int | None = None) -> pd.DataFrame:
    """The grids' captions as one table (rows: top 1..k, then bottom 1..k; one column per method), for the
    compact grids, whose thumbnails are too narrow for "#index · label · score" (``explorer.layout``); ``own``:
    the training image the query is, "#index · query · score" as in the full captions."""
    columns = {}
    for name in names:
        r = result.methods[name]
        if r.status != "ok" or r.scores is None:
            continue
        items = r.top(top_k, labels) + r.bottom(top_k, labels)
        columns[titles[name]] = [_caption(ds, x.index, x.score, x.exact, own) for x in items]
    rows = [f"top {i + 1}" for i in range(top_k)] + [f"bottom {i + 1}" for i in range(top_k)]
    return pd.DataFrame(columns, index=rows[: max((len(v) for v in columns.values()), default=0)])


def column_note(r: MethodResult, asked: str | None = None) -> str:
    """The line beside a method column's query thumbnail: its damping, where the scores came from, its bank;
    a method with none of these says what kind of score it is (an influence method without a damping is
    not a "similarity score", as it was labelled until QA round 14).  ``asked``: the answer's measurement; a
    precomputed column scored another (D-TRAK's square norm) says so as a live one does, whose reason is the
    engine's "uses the square-norm measurement" (QA 64 F9: the precomputed reason, "precomputed", dropped it)."""
    notes = []
    if r.damping is not None:
        notes.append(f"damping {r.damping:.1e}")
    if r.reason == "precomputed":
        notes.append("**precomputed**")
        if asked is not None and r.measurement is not None and r.measurement != str(asked):
            notes.append(f"uses the {r.measurement} measurement")
    elif r.reason:
        notes.append(r.reason)
    if r.bank_note():
        notes.append(r.bank_note())
    if notes:
        return " · ".join(notes)
    return "similarity score" if r.kind == "similarity" else "influence score, no damping"


def cannot_run_here(r: MethodResult) -> bool:
    """Whether ``r`` is a method that cannot run on this server at all (the engine says the reason is about the
    server: CLIP without its weights, a cache not built), as opposed to one the running build brings, one that
    failed, or one this query does not suit (a blank image's pixel similarity), which keep their columns."""
    return r.status == "unavailable" and r.reason_about == SERVER


def unavailable_notes(result: QueryResult, names: list[str], info: dict) -> None:
    """Under the method columns, each of ``names`` (``cannot_run_here``) in one line, its details one click away."""
    for n in names:
        r = result.methods[n]
        plain.unavailable(r.status, info.get(n, {}).get("title", r.title), r.reason or "", r.reason_about)


def method_columns(handle: Handle, query: Query, result: QueryResult, s: Settings) -> None:
    session = handle.session
    ds = session.dataset
    labels = session.labels
    info = session.method_info()
    names = [n for n in s.methods if n in result.methods]
    if not names:
        st.info("Select at least one method in the sidebar.")
        return
    scored = [n for n in names if result.methods[n].status == "ok" and result.methods[n].scores is not None]
    # a method that cannot run on this server (CLIP without its weights) is said under the columns, not given one:
    # its empty column took a fifth of the width and made the working methods' captions index-only (QA 50 #5)
    cannot = [n for n in names if cannot_run_here(result.methods[n])]
    names = [n for n in names if n not in cannot]
    if not names:
        unavailable_notes(result, cannot, info)
        return
    thumbs = thumbnails(len(names), max(ds.shape[1:]))  # at least two per row at 1280 px (explorer.layout)
    own = own_index(query)
    short = short_labels(ds)
    if scored:  # an unavailable method's column has no captions to explain
        st.caption(score_legend([(info[n]["title"], info[n]["kind"], session.measurement_used(n, s.measurement))
                                 for n in scored], ds.labels is not None, thumbs.compact, short, own))
    independent = handle.query_independent()
    # the note (damping, bank, D-TRAK's "uses the square-norm measurement") beside the 48 px query thumbnail only
    # where the two thirds of the column beside it hold its longest words ("measurement", "**precomputed**": ~85 px
    # in the caption's font) at the design width: 3 methods or fewer; under the thumbnail otherwise (QA round 17)
    beside = (column_inner_width(len(names)) - GAP) * 2 / 3 >= 110
    cols = st.columns(len(names), border=True)
    polling = False
    for col, name in zip(cols, names, strict=True):
        r = result.methods[name]
        with col:
            st.subheader(info[name]["title"])
            st.caption(info[name]["caption"])
            if name in independent:
                st.warning(query_independence_note(independent[name]), icon="⚠️")
            if r.status != "ok" or r.scores is None:
                plain.unavailable(r.status, info[name]["title"], r.reason or "", r.reason_about)
                continue
            if beside:
                c1, c2 = st.columns([1, 2])
                c1.image(display(query.input.image, 48), width=48, caption="query")
                c2.caption(column_note(r, result.measurement))
            else:  # the whole column's width: beside the thumbnail "measurement" broke as "measureme / nt"
                st.image(display(query.input.image, 48), width=48, caption="query")
                st.caption(column_note(r, result.measurement))
            if r.warning:  # the scores weigh rounding at this damping (a K-FAC damping below its factors' floor)
                st.warning(r.warning, icon="⚠️")
            if r.exact_pending and not polling and handle.build.status != "running":
                # one poller for the page: its one line (progress, waiting, stopped) is all that stands above
                # the grid, so K-FAC's images start near the other methods'; the box and button go below
                exact_view.await_exact(handle, result, s.top_k)
                polling = True
            similarity = r.kind == "similarity"
            top, bottom = r.top(s.top_k, labels), r.bottom(s.top_k, labels)
            if similarity:
                top_heading, bottom_heading = "**Most similar**", "**Least similar**"
            else:
                top_heading, bottom_heading = influence_headings([x.score for x in top], [x.score for x in bottom],
                                                                 session.measurement_used(name, s.measurement))
            for heading, items in ((top_heading, top), (bottom_heading, bottom)):
                st.markdown(heading)
                st.image(
                    [display(ds.images[x.index], thumbs.image, border=FRAME) for x in items],
                    caption=[_short_caption(ds, x.index, own, short) if thumbs.compact
                             else _caption(ds, x.index, x.score, x.exact, own, label_chars(thumbs.width))
                             for x in items],
                    width=thumbs.width,
                )
            note = r.ranking_note(s.top_k)
            if note:  # an end may miss an image outside the re-ranked candidates (MethodResult.ranking_check)
                st.caption(note)
            if r.exact_pending:
                exact_view.exact_button(handle, name, result)
    unavailable_notes(result, cannot, info)
    agreement = plain.label_agreement_line(handle.gallery_agreement(), scored, info, handle.gallery_agreement_gaps())
    if agreement:  # a column of mixed labels: this method on this model, or this one query? (QA 47 #8)
        st.caption(agreement)
    if thumbs.compact and scored:
        with st.expander(SCORES_TABLE):
            st.dataframe(grid_scores(result, scored, {n: info[n]["title"] for n in scored}, ds, labels, s.top_k,
                                     own))


def influence_headings(top: list[float], bottom: list[float], measurement: str) -> tuple[str, str]:
    """Headings of an influence method's highest and lowest scores, true to their signs.

    The classification is the engine's (``engine.attribution.signs.end_signs``, which the CLI's text and
    the PNG export use too); this renders it for the page, with what removal would do to ``measurement``, the
    one the scores are of (``session.measurement_used``), in the words the PNG's headings use
    (``signs.removal_effect``): "less likely" over D-TRAK's square norm, which is no likelihood, was wrong (QA 64
    F2).  The two ends of
    the ranking need not have opposite signs: on a barely trained model every image can raise the
    query's loss, and with the trajectory measurement every image can lower it, so "Opponents" over
    positive scores (or "Proponents" over negative ones) would say the opposite of what the numbers
    predict."""
    hi, lo = end_signs(top, highest=True), end_signs(bottom, highest=False)
    e = removal_effect(measurement)
    if hi.all_agree:
        head = f"**Proponents** · removing them {e.positive}"
    elif hi.all_opposite:
        head = f"**Highest scores** · all negative: removing any training image {e.negative}"
    elif hi.agreeing == 0:
        head = "**Highest scores** · none positive: no proponents among them"
    else:
        head = f"**Highest scores** · the positive ones are proponents (removing them {e.positive})"
    if lo.all_agree:
        tail = f"**Opponents** · removing them {e.negative}"
    elif lo.all_opposite:
        tail = f"**Lowest scores** · still positive: removing them {e.slight}, not the reverse"
    elif lo.agreeing == 0:
        tail = "**Lowest scores** · none negative: no opponents among them"
    else:
        tail = f"**Lowest scores** · the negative ones are opponents (removing them {e.negative})"
    return head, tail


def removal_words(used: list[tuple[str, str]], subject: str = "the query") -> str:
    """What removing images with a positive score does, for methods that may score different measurements
    (``used``: (title, measurement used) pairs; ``session.measurement_used``): one phrase when they share its
    words, else each phrase with its methods ("makes the sample less likely (K-FAC Influence, TRAK) or raises the
    sample's square norm (D-TRAK)").  A caption over every influence method said "less likely" over D-TRAK's
    square norm too (QA 64 F2)."""
    phrases: dict[str, list[str]] = {}
    for title, meas in used:
        phrases.setdefault(removal_effect(meas, subject).positive, []).append(title)
    if len(phrases) <= 1:
        return next(iter(phrases), removal_effect("loss", subject).positive)
    return " or ".join(f"{words} ({', '.join(titles)})" for words, titles in phrases.items())


def query_independence_note(d: Dependence) -> str:
    """Why a method's column should not be read as an explanation of this query (``Dependence`` ``d``,
    ``engine.evaluation.query_dependence``); short, so the column's grid stays level with the others."""
    return (
        f"**Barely depends on the query** on this model: two gallery samples share on average {d.top_overlap:.0%} "
        f"of their top-{d.top} (random sets {d.chance_overlap:.1%})."
    )


# --- plots -------------------------------------------------------------------------------


def plots(handle: Handle, result: QueryResult, s: Settings) -> None:
    """The methods compared in plots, under an expander that is closed at first and builds nothing while closed:
    with the first plot open, a gallery click in headless Chromium took 2.81 and 3.20 s to idle against 1.96 s
    without the plots (mnist, two rounds side by side, load 2-4); the grids are what a click is for, and an opened
    expander stays open for the next queries."""
    names = analysis.scored_methods(result, s.methods)
    if not names:
        return
    labels = handle.session.labels
    keep_plot_choices()
    box = st.expander(PLOTS, key="plots_open", on_change="rerun")
    if not box.open:  # collapsed: nothing built or sent (the open plot was a third of a click in the browser)
        return
    with box:
        _plot_tabs(handle, result, s, names, analysis.score_table(result, names, labels))


PLOTS = "**Compare the methods**: score distributions, scatter of two methods, top-k overlap, labels of the top-k"
# the plots' widgets, kept while a run does not draw them (the expander closed, another plot tab open, another page):
# Streamlit drops the value of a widget a run does not draw (the scatter's axes came back as the defaults)
PLOT_KEYS = ("plots_open", "plot_tab", "scatter_a", "scatter_b")


def keep_plot_choices() -> None:
    """``chips.keep_choices`` of ``PLOT_KEYS``: on every run of the page (``app.main``) and of ``plots``."""
    chips.keep_choices(PLOT_KEYS)


def _plot_tabs(handle: Handle, result: QueryResult, s: Settings, names: list[str], table: pd.DataFrame) -> None:
    """The four plots, each in a lazy tab (only the open one is built)."""
    session = handle.session
    info = session.method_info()
    titles = {n: v["title"] for n, v in info.items()}
    labels = session.labels
    t_dist, t_scatter, t_overlap, t_labels = lazy_tabs(
        ["Score distributions", "Scatter of two methods", "Top-k overlap", "Labels of the top-k"], key="plot_tab"
    )
    estimated = analysis.estimated_note(result, names, titles)
    top_estimated = analysis.topk_estimated_note(result, names, s.top_k, titles)
    if shown(t_dist):
        with t_dist:
            axes = {n: axis_title(info[n]["kind"], session.measurement_used(n, s.measurement)) for n in names}
            st.plotly_chart(figures.score_distributions(table, names, titles, axes), key="fig_dist")
            st.caption(distribution_caption([(titles[n], info[n]["kind"]) for n in names])
                       + (f" {estimated}" if estimated else ""))
    if shown(t_scatter):
        with t_scatter:
            if len(names) < 2:
                st.info("Show at least two methods to compare them.")
            else:
                c1, c2 = st.columns(2)
                for key, default in (("scatter_a", names[0]), ("scatter_b", names[1])):  # no index=: the state's
                    if st.session_state.get(key) not in names:  # first look, or a method no longer shown
                        st.session_state[key] = default
                a = c1.selectbox("x axis", names, format_func=titles.get, key="scatter_a")
                b = c2.selectbox("y axis", names, format_func=titles.get, key="scatter_b")
                rho = float(analysis.spearman_matrix(result, [a, b]).values[0, -1])
                st.plotly_chart(figures.score_scatter(table, a, b, titles, rho), key="fig_scatter")
                corr = analysis.spearman_matrix(result, names)
                corr.index = corr.columns = [titles[n] for n in names]
                st.caption("Spearman rank correlation of all pairs over every training image"
                           + (f". {estimated}" if estimated else ":"))
                st.dataframe(corr.style.format("{:+.3f}"), width="content")
    if shown(t_overlap):
        with t_overlap:
            st.plotly_chart(figures.overlap_matrix(analysis.topk_overlap(result, names, s.top_k), titles, s.top_k),
                            key="fig_overlap")
            if top_estimated:
                st.caption(top_estimated)
    if shown(t_labels):
        with t_labels:
            if labels is None:
                st.info("This training set has no labels.")
            else:
                counts = analysis.topk_label_counts(result, names, s.top_k, labels, session.dataset.class_names)
                st.plotly_chart(figures.label_histogram(counts, titles, s.top_k), key="fig_labels")
                if top_estimated:
                    st.caption(top_estimated)


def lazy_tabs(names: list[str], key: str) -> list[Any]:
    """``st.tabs`` whose unselected tabs run nothing (``on_change="rerun"``: a tab's click reruns the page, and
    ``shown`` tells which one is open), where this Streamlit has it; else plain tabs, every one drawn.

    Why (QA 47 #4): on mnist the four plots (plotly figures of 1,000 points each) took 1.0 s of a click's 2.3 s page
    run, though a reader sees one tab at a time; the page now builds the open one only."""
    try:
        return list(st.tabs(names, key=key, on_change="rerun"))
    except TypeError:  # a Streamlit before lazy tabs
        return list(st.tabs(names))


def shown(tab: Any) -> bool:
    """Whether to draw ``tab``'s content: it is the open one, or this Streamlit does not say (draw them all)."""
    return getattr(tab, "open", None) is not False


def axis_title(kind: str, measurement: str) -> str:
    """A score histogram's x axis: what its scores are (the Pixel and CLIP panels hold similarities, not changes),
    in lines of at most 26 characters: at 1280 px, four or five panels side by side are about 150 px wide each,
    and one-line titles ran into each other."""
    if kind == "similarity":
        return "similarity to the query"
    return "<br>".join(["predicted change of", *textwrap.wrap(_in_sentence(measurement_title(measurement)), 26)])


def distribution_caption(methods: list[tuple[str, str]]) -> str:
    """The histograms' caption, true to each panel's kind ((title, kind) pairs): it called every panel an
    influence score, the similarity panels beside them included."""
    influence = [t for t, k in methods if k != "similarity"]
    similarity = [t for t, k in methods if k == "similarity"]
    parts = []
    if influence:
        parts.append(f"Influence scores ({', '.join(influence)}): predicted change of the measurement if the image "
                     "were removed (positive = proponent).")
    if similarity:
        parts.append(f"Similarity scores ({', '.join(similarity)}): how alike the image and the query are, "
                     "not a change.")
    return " ".join(parts)


# --- timings, cache, downloads -----------------------------------------------------------


TIMING_COLUMNS = (
    "**Timings of this query** (gradient = query measurement gradient, shared by methods that use the same "
    "measurement, a pass that computes two measurements' gradients at once split evenly between them; prepare = "
    "rotate/project/embed the query, which in a server's first query of a method includes loading its cache from "
    "disk; score = the first answer's pass over all training images; rescore = the latest re-scoring at the chosen "
    "damping: a lookup or interpolation in the damping grid, or one more pass)"
)


def timings_caption(result: QueryResult, mc_samples: int, bank_draws: bool) -> str:
    """The line under the timing table: the query's own times (its first answer's, and a re-scoring's beside
    them), its measurement and draws.  A precomputed answer was not computed here: it says so, with no time
    (QA 64 F5: its flag read "precomputed 1.0 ms").  ``bank_draws``: the query takes the training gradients'
    draws (``query_draws == "bank"``)."""
    times = dict(result.timing_ms)
    again = times.pop("rescore", None)
    if result.query.get("precomputed"):
        head = "This query: precomputed (the shipped scores, read from a file: nothing computed or timed here)"
    else:
        head = (("This query's first answer: " if again is not None else "This query: ")
                + ", ".join(f"{k} {v:.1f} ms" for k, v in times.items())
                + (f"; re-scored at these dampings in {again:.1f} ms (the gradients kept)" if again is not None else ""))
    return (head + f" · measurement `{result.measurement}` · "
            + draws_phrase(result.measurement, result.query.get("mc_samples", mc_samples))
            + (" (the training gradients' own draws: common random numbers)"
               if bank_draws and uses_draws(result.measurement) else ""))


def timing_table(result: QueryResult, methods: list[str], info: dict[str, dict]) -> pd.DataFrame:
    """One row per method shown: its status and each of its times in ms; a method without a time (pixel
    similarity has no damping, so no rescore) has a blank cell there, not "None" (QA 67 F5)."""
    rows = []
    for name in methods:
        r = result.methods.get(name)
        if r is None:
            continue
        row = {"method": info[name]["title"], "status": r.status}
        row.update({f"{k} (ms)": round(v, 2) for k, v in r.timing_ms.items()})
        rows.append(row)
    return pd.DataFrame(rows).astype(object).where(lambda t: t.notna(), "")


def timings(handle: Handle, result: QueryResult, s: Settings) -> None:
    if not result.query.get("precomputed"):  # a precomputed answer's table has no times to define
        st.markdown(TIMING_COLUMNS)
    st.dataframe(timing_table(result, s.methods, handle.session.method_info()), hide_index=True)
    st.caption(timings_caption(result, s.mc_samples, handle.session.config.query_draws == "bank"))


def _shared_note(others: list[str], info: dict[str, dict]) -> str:
    """A contributor's two methods over one stored artefact: each row's size is all of it (QA round 19)."""
    return "shares its cache with " + plain.and_list([info.get(o, {}).get("title", o) for o in others]) if others else ""


def cache_status(handle: Handle) -> None:
    session = handle.session
    info = session.method_info()
    refresh = st.button("Refresh cache status", key="refresh_status")
    status = handle.status(refresh=refresh)
    rows = []
    for name, st_ in status.items():
        rows.append(
            {
                "method": info[name]["title"],
                "built": st_["built"],
                "available": st_["available"],
                "size (MiB)": round(float(st_.get("size_mb") or 0.0), 2),  # 2**20 bytes, as the store counts
                "settings": json.dumps(st_.get("settings") or {}, sort_keys=True),
                "note": st_.get("reason") or _shared_note(st_.get("shares_cache_with") or [], info),
            }
        )
    st.markdown(
        f"**Cache status** · checkpoint `{session.checkpoint}` (hash `{session.checkpoint_hash}`) · "
        f"cache root `{handle.cache_root}` · {len(session.dataset)} training images · device `{session.device}`"
    )
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    if handle.build_summary:
        done = ", ".join(
            f"{info.get(n, {}).get('title', n)} {v.get('seconds', 0.0):.1f} s"
            for n, v in handle.build_summary.items()
            if v.get("status") == "ok"
        )
        st.caption(f"Built in this process in {handle.build_seconds or 0.0:.1f} s: {done}")


def downloads(handle: Handle, query: Query, result: QueryResult, s: Settings) -> None:
    """The CSV of every score and the PNG of this view, each carrying what its scores were computed with
    (``engine.attribution.provenance``): two exports at two dampings held different columns under one name."""
    session = handle.session
    ds = session.dataset
    names = analysis.scored_methods(result, session.method_names())
    table = analysis.score_table(result, names, session.labels, ds.ids)
    settings = provenance.result_settings(session, result)
    stem = (f"{session.preset.name}_" + query.key.replace(":", "-") + "_"
            + result.measurement.replace("@", "-").replace("=", "") + "_" + provenance.settings_digest(settings))
    c1, c2 = st.columns(2)
    # the files are made when their button is clicked (a callable's data: Streamlit runs it then, on its own
    # thread), from what this run captured: the PNG sheet's drawing and encoding were a sixth of a gallery
    # click's page run, for a file rarely downloaded
    c1.download_button(
        "Download all scores (CSV)",
        lambda: provenance.csv_with_settings(table.to_csv(index=False), settings).encode(),
        file_name=f"scores_{stem}.csv",
        mime="text/csv",
        key="dl_csv",
        help="One row per training image: index, label, id (the data set's name for the image: an image "
             "folder's file path), one column per method (and, for a compressed "
             "K-FAC bank, a column saying which of its scores are exact; the others are estimates put on the "
             "exact scale by the factor the bank note gives). Above the header, lines starting with # say "
             "what the scores were computed with (model, query, measurement, draws, each method's damping); "
             "read it with pandas.read_csv(f, comment='#').",
    )
    shown = [n for n in s.methods if n in names]
    rows = sheet_rows(result, shown, session.method_info(), ds, session.labels, query, s.top_k,
                      {n: session.measurement_used(n, result.measurement) for n in shown})
    lines = provenance.settings_lines(settings)
    c2.download_button(
        "Download this view (PNG)",
        lambda: png_bytes(compose_sheet(rows, heading=lines[:-1]),
                          text={"attribution-settings": provenance.settings_json(settings)}),
        file_name=f"attribution_{stem}.png",
        mime="image/png",
        key="dl_png",
        help="The query and each method's two ends, under a heading saying what they were computed with "
             "(also stored whole in the PNG's text chunk 'attribution-settings').",
    )


def sheet_rows(
    result: QueryResult, names: list[str], info: dict, ds: Any, labels: np.ndarray | None, query: Query, top_k: int,
    used: dict[str, str] | None = None,
) -> list[SheetRow]:
    """The PNG export's rows: the query, then each method's two ends under the headings the page shows
    (an influence method's in the engine's sign classification, ``end_signs``: the k highest scores are
    "proponents" only when every one is positive, saying what removing them does to the measurement the method
    scored, in the page's words).  ``used``: the measurement each method scored, named in its titles where it is
    not the one asked for (D-TRAK's square norm)."""
    rows = [SheetRow(f"Query: {query.title} · measurement {result.measurement}", [to_uint8(query.input.image)], [""])]
    for name in names:
        r = result.methods[name]
        top, bottom = r.top(top_k, labels), r.bottom(top_k, labels)
        own = (used or {}).get(name, str(result.measurement))
        if r.kind == "similarity":
            titles = ("most similar", "least similar")
        else:
            titles = (end_signs([x.score for x in top], highest=True).heading(own),
                      end_signs([x.score for x in bottom], highest=False).heading(own))
        label = info[name]["title"] + ("" if own == str(result.measurement) else f" ({own} measurement)")
        for title, items in zip(titles, (top, bottom), strict=True):
            rows.append(
                SheetRow(
                    f"{label}: {title}",
                    [to_uint8(ds.images[x.index]) for x in items],
                    [f"#{x.index} {ds.label_name(x.index) or ''}\n{'' if x.exact else '~'}{x.score:+.1e}" for x in items],
                )
            )
    return rows


def trajectory_note(notes: list[str], has_trajectory: bool) -> str | None:
    """The header's line on the query's sampling trajectory, None when its notes already say it (a training
    image's note reads "...; no sampling trajectory": the page said it twice)."""
    if any("sampling trajectory" in n for n in notes):
        return None
    return "Has a sampling trajectory." if has_trajectory else "No sampling trajectory."


def label_line(name: object, notes: list[str], doubt: str) -> str:
    """The header's label line.  A training label (a training image, or an upload identical to one) is the label, in
    bold; a label the preset's pixel classifier predicted (a generated sample, an upload) is said as that
    classifier's guess, not in bold: a lay audience read the bold "Label: 1" beside a clear 8 (probability 0.95) as
    a fact (QA 47 #3).  A doubtful guess says so where it is read (QA 28 #3)."""
    if not any(PREDICTED in n for n in notes):
        return f"Label: **{name}**"
    doubt_words = {"guess": "; a guess: see the notes", "unsure": "; unsure: see the notes"}.get(doubt, "")
    return f"Label, as a simple pixel classifier guesses it: {name} (not ground truth{doubt_words})"


def query_header(handle: Handle, query: Query, measurement: str) -> None:
    """The query, with the measurement its scores are of (it was only in the collapsed timings expander, while
    the scores' scale changes with it)."""
    c1, c2 = st.columns([1, 5])
    c1.image(display(query.input.image, 128), width=128)
    with c2:
        st.markdown(f"### {query.title} · measurement: {measurement_title(measurement)}")
        lab = query.input.label
        if lab is not None:
            names = handle.session.dataset.class_names
            st.markdown(label_line(names[lab] if names and lab < len(names) else lab, query.input.notes,
                                   getattr(query.input, "label_doubt", "")))
        if query.input.notes:
            st.caption(" · ".join(query.input.notes))
        note = trajectory_note(query.input.notes, query.input.trajectory is not None)
        if note:
            st.caption(note)
