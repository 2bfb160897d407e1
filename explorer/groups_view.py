"""Groups page and the reverse view: "what if these images were removed?" and "what do they support?".

Layout only: the group specs, the pool, the batched score matrices, the reverse ranking,
the copy check and the retraining results all come from the engine
(``engine.attribution.groups``, ``.pool``, ``.group_attribution``, ``.copycheck``).
A query set's score matrices are computed once per (query set, measurement, method, that method's
damping) and kept in the process-wide handle, so changing the group only re-sums columns and moving one
method's damping re-scores that method alone.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.express as px
import streamlit as st

from engine.attribution import provenance
from engine.attribution.copycheck import (
    CAVEAT,
    ESTIMATED_SHARES,
    NEAR_COPY_RATIO,
    NEIGHBOURS,
    copy_check,
    explain,
    training_flag_rate,
)
from engine.attribution.group_attribution import GroupResult
from engine.attribution.group_attribution import influence_methods as all_influence_methods
from engine.attribution.groups import (
    Group,
    GroupError,
    group_from_indices,
    group_from_text,
    group_from_typed,
    parse_group,
)
from engine.attribution.pool import (
    MatrixResult,
    PoolError,
    QuerySet,
    attribution_matrix,
    gallery_set,
    generate_pool,
    pool_path,
)
from engine.attribution.precomputed import MEASUREMENT
from engine.attribution.precomputed_groups import precomputed_matrices as engine_precomputed_matrices
from engine.attribution.signs import end_signs, removed_words, reverse_caveat
from engine.evaluation.stats import spearman
from engine.model.measurements import draws_phrase
from explorer import chips, figures, plain
from explorer.controls import Settings
from explorer.figures import label_style
from explorer.group_retrain_view import group_retrain_section
from explorer.images import SheetRow, compose_sheet, display, png_bytes, to_uint8
from explorer.results_view import removal_words, short_measurement
from explorer.runtime import Handle, influence_titles, throttled

CELL = 64
KINDS = ("A class", "Hand-picked", "From a file", "One training image")
DRAW_FAILED = "grp_draw_failed"  # why the last "Draw N samples" failed, for the page after it
PICKED = "grp_picked"  # training indices ticked in the Explore page's grids
COPY_METHOD = "grp_copy_method"  # whose influence shares the copy check reads (QA 70 F4)


# --- engine calls, cached in the handle ---------------------------------------------------


def influence_methods(handle: Handle) -> list[str]:
    """The registry's influence methods whose caches are built (the ones a group query can use now), less
    those a running build has still to reach: their caches are being written (``BuildState.pending``)."""
    status, pending, done = handle.status(), handle.build.pending, handle.build.summary
    # the status snapshot is refreshed when the build ends; a method the running build has finished counts too
    built = {n for n, v in status.items() if v.get("built")} | {n for n, v in done.items() if v.get("status") == "ok"}
    return [n for n in all_influence_methods(handle.session) if n in built and n not in pending]


def _still_building(handle: Handle) -> tuple[str, ...]:
    """The influence methods the running build has still to reach (none when no build runs)."""
    return tuple(n for n in all_influence_methods(handle.session) if n in handle.build.pending)


def _joining_later(handle: Handle) -> None:
    """While a build runs, the influence methods it has still to build, named (the page answers without them)."""
    from explorer.build_view import DRAWN_PENDING, waiting_note

    info = handle.session.method_info()
    if handle.build.checking:
        # a just-started server does not know yet what it will build (pending is empty): the page answered with
        # K-FAC alone and named no other method (QA 23b #1); name every influence method it cannot use yet
        usable = set(influence_methods(handle))
        unbuilt = [info[n]["title"] for n in all_influence_methods(handle.session) if n not in usable]
        if unbuilt:
            st.info(f"{plain.and_list(unbuilt)} {'is' if len(unbuilt) == 1 else 'are'} not built yet: the server is "
                    "checking which caches it has to build (seconds; progress at the top of the page).")
        return
    left_out = _still_building(handle)
    st.session_state[DRAWN_PENDING] = left_out  # the build panel offers to redraw once these are built
    later = [info[n]["title"] for n in left_out]
    if later:
        waiting_note(f"{plain.and_list(later)} {'is' if len(later) == 1 else 'are'} being built: ", ".")


def group_result(handle: Handle, group: Group, qset: QuerySet, s: Settings, methods: list[str]) -> GroupResult:
    """The group's view of every method's (Q, N) matrix over ``qset`` (each matrix computed once).

    Matrices are kept per method and that method's damping, so moving one method's damping re-scores that
    method only; the others' matrices, and the query set's gradients, are reused.
    """
    damping = {n: s.damping_dict[n] for n in methods if n in s.damping_dict}
    store = handle.group_matrices

    def key(n: str) -> tuple:  # with the sidebar's M, which the matrices are scored at (QA 64 F3)
        return (qset.key, s.measurement, int(s.mc_samples), n, damping.get(n))

    matrices = {n: store.get(key(n)) for n in methods}
    missing = [n for n in methods if matrices[n] is None]
    if missing:
        titles = ", ".join(handle.session.method_info()[n]["title"] for n in missing)
        bar = st.progress(0.0, text=f"Scoring {len(qset)} samples with {titles} ...")
        cache = handle.cache_root / "pools" if qset.name.startswith("pool") else None
        with handle.lock:
            new = attribution_matrix(
                handle.session, qset, s.measurement, missing, damping,  # each method reads its own
                cache, progress=throttled(lambda m, f: bar.progress(f, text=m)),
                gradient_cache=handle.group_query_gradients, mc_samples=int(s.mc_samples),
            )
        for n in missing:
            matrices[n] = new[n]
            if new[n].status == "ok":  # a refusal (a cache found corrupt, say) is asked again on the next run
                store.put(key(n), new[n])
        bar.empty()
    result = GroupResult(group, s.measurement, qset, matrices, handle.session.labels)
    exact = [n for n in result.ok() if result.note(n)]
    if exact:  # a compressed bank: the group's exact change from its summed gradient (seconds), once per group
        titles = ", ".join(handle.session.method_info()[n]["title"] for n in exact)
        with st.spinner(f"{titles}: the group's exact predicted changes (its summed gradient) ..."), handle.lock:
            for n in exact:
                result.changes(n)
    return result


def _pool(handle: Handle, n: int, seed: int, draw: bool) -> QuerySet | None:
    """A cached pool, or None when it is not drawn yet and ``draw`` is False."""
    key = (n, seed)
    pools = handle.group_pools
    kept = pools.get(key)
    if kept is not None:
        return kept
    folder = handle.cache_root / "pools"
    if not draw and not pool_path(folder, handle.session.checkpoint_hash, seed, n).is_file():
        return None
    bar = st.progress(0.0, text=f"Drawing {n} samples ...")
    with handle.lock:
        pool = generate_pool(
            handle.session, n, seed, folder, progress=throttled(lambda m, f: bar.progress(f, text=m))
        )
    pools.put(key, pool)
    bar.empty()
    return pool


# --- choosing the group and the samples -----------------------------------------------------


def _set_name(qset: QuerySet) -> str:
    """The query set's name, with a pool's seed (QA 23b #7: "8 samples (pool:8)" did not say which pool)."""
    return qset.name if qset.seed is None else f"{qset.name}, seed {qset.seed}"


def keep_choices(handle: Handle) -> None:
    """Keep the page's choices while another page is shown (``chips.keep_choices``; app.py calls it on every run).

    Back from another tab, the widgets showed their defaults while the result still used the earlier choices
    (QA 23b #4).  Not the class (its options follow the model) nor the typed indices (their default follows the
    Explore page's ticks)."""
    chips.keep_choices(("grp_kind", "grp_train", "grp_queries", "grp_pool_n", "grp_pool_seed", COPY_METHOD),
                       upper={"grp_train": len(handle.session.dataset) - 1})


def _choose_group(handle: Handle) -> Group | None:
    ds = handle.session.dataset
    kind = st.radio("Group of training images", KINDS, key="grp_kind", horizontal=True)
    try:
        if kind == "A class":
            if ds.labels is None:
                st.info("This training set has no labels; pick images by hand or from a file.")
                return None
            classes = sorted({int(v) for v in ds.labels.tolist()})
            c = st.selectbox("Class", classes, key="grp_class", format_func=lambda c: ds.class_names[c] if ds.class_names else str(c))
            return parse_group(f"label:{c}", ds)
        if kind == "Hand-picked":
            default = ",".join(str(i) for i in st.session_state.get(PICKED, []))
            text = st.text_input(
                "Training indices (commas, ranges like 10-20)", value=default or "0,1,2", key="grp_indices",
                help="Tick images in the Explore page's grids to fill this in.",
            )
            if not text.strip():  # not an error: the box is being filled in ("bad group 'train: '" spoke CLI)
                st.info("Type training indices, e.g. 0,1,2 or 10-20, or tick images in the Explore page's grids.")
                return None
            return group_from_typed(text, len(ds))
        if kind == "From a file":
            up = st.file_uploader("A JSON list of indices, or text with one index per line", key="grp_file")
            if up is None:
                return None
            return group_from_text(up.getvalue().decode("utf-8", errors="replace"), up.name, len(ds))
        i = st.number_input("Training index", min_value=0, max_value=len(ds) - 1, key="grp_train")  # state: as below
        return group_from_indices([int(i)], len(ds), spec=f"train:{int(i)}")
    except GroupError as e:
        st.warning(str(e))
        return None


def _choose_queries(handle: Handle) -> QuerySet | None:
    session = handle.session
    options = (["Gallery"] if session.gallery() else []) + ["Generated pool"]
    where = st.radio("Generated samples", options, key="grp_queries", horizontal=True)
    if where == "Gallery":
        return gallery_set(session)
    c1, c2 = st.columns(2)
    # no value=: the defaults sit in the state, which chips.keep_choices also sets; a value beside a key set there made
    # Streamlit log a 30-line warning with a stack to the server's terminal at every draw (QA 28 #7)
    st.session_state.setdefault("grp_pool_n", 256)
    n = int(c1.number_input("Pool size", min_value=8, max_value=4096, step=8, key="grp_pool_n"))
    seed = int(c2.number_input("Pool seed", min_value=0, max_value=10_000, key="grp_pool_seed"))
    pool = _pool(handle, n, seed, draw=False)
    if pool is None:
        # in one slot that is emptied when the draw starts: the note and the button stayed above the draw's bars,
        # as if nothing had been asked, inviting a second click (QA 63 F5)
        if failed := st.session_state.pop(DRAW_FAILED, None):  # the last click's draw failed: why, then the button
            st.warning(failed)
        slot = st.empty()
        with slot.container():
            st.info(f"No pool of {n} samples with seed {seed} yet: drawing it takes all "
                    f"{session.diffusion.T} denoising steps per batch of 64, once; it is then cached.")
            draw = st.button(f"Draw {n} samples", key="grp_draw")
        if draw:
            slot.empty()
            try:
                _pool(handle, n, seed, draw=True)
            except PoolError as e:
                st.session_state[DRAW_FAILED] = str(e)  # shown above the button again, for another try
            st.rerun()
    return pool


# --- the page ------------------------------------------------------------------------------


def groups_page(handle: Handle, s: Settings) -> None:
    session = handle.session
    st.subheader("Groups: what if these training images were removed?")
    info = session.method_info()
    used = [(info[n]["title"], session.measurement_used(n, s.measurement)) for n in all_influence_methods(session)]
    st.caption(
        "Influence adds up: the predicted change of a sample's measurement when a whole group is removed is the "
        f"sum of its members' scores (positive: removing the group {removal_words(used, 'the sample')}, i.e. the "
        "group supports it). Read in both directions: per sample, and ranked over all samples. A large group "
        "(a tenth of the data) can support every sample a little, since any model trained on less data fits "
        "all images a little worse: compare a sample's change with the other samples' (the ranking below does)."
    )
    methods_all = influence_methods(handle)
    if not methods_all:
        if precomputed_groups(handle, s):
            return
        if handle.build.status == "running":
            from explorer.build_view import waiting_note

            waiting_note(f"Groups need the influence caches ({influence_titles(handle)}): ", ".")
        else:
            st.warning(f"No influence method is built; build {influence_titles(handle)} first.")
        return
    c1, c2 = st.columns(2)
    with c1:
        group = _choose_group(handle)
    with c2:
        qset = _choose_queries(handle)
    _joining_later(handle)
    chips.init_selection("grp_methods", methods_all)
    methods = st.multiselect("Methods", methods_all, key="grp_methods", format_func=lambda n: info[n]["title"])
    chips.select_all("grp_methods", methods_all, "All methods")
    if group is None or qset is None or not methods:
        return
    if s.measurement == "trajectory" and qset.name.startswith("pool"):
        st.warning("Pool samples have no recorded trajectory: choose another measurement in the sidebar.")
        return
    try:
        result = group_result(handle, group, qset, s, methods)
    except (ValueError, RuntimeError) as e:
        st.warning(f"Cannot score these samples: {e}")
        return
    for n, r in result.methods.items():
        if r.status != "ok":  # as the Explore columns say it (a server's reason plain, its details folded)
            plain.unavailable(r.status, info[n]["title"], r.reason or "", r.reason_about)
    if not result.ok():
        return
    st.markdown(f"**{group.spec}** · {group.description} · {len(qset)} samples ({_set_name(qset)}) · "
                f"measurement `{s.measurement}` · {draws_phrase(s.measurement, s.mc_samples)}")
    timing = "; ".join(
        f"{info[n]['title']}: " + ", ".join(f"{k} {v / 1e3:.2f} s" for k, v in r.timing_ms.items())
        for n, r in result.methods.items() if r.status == "ok"
    )
    drawn = f"Pool drawn in {qset.seconds:.1f} s. " if qset.seconds else ""
    st.caption(f"{drawn}All {len(qset)} samples scored in one batch per method ({timing}; the query gradients of "
               "a measurement are computed once and counted at the first method that uses them); changing the "
               "group only re-sums columns.")
    damping_warnings(handle, result)
    removal_section(handle, result, s)
    reverse_section(handle, result, s)
    downloads(handle, result, s)
    copy_section(handle, result)
    group_retrain_section(handle, group.spec)


def precomputed_matrices(handle: Handle, s: Settings) -> dict[str, MatrixResult]:
    """Each influence method's (Q, N) gallery matrix from the shipped precomputed scores, for the group views
    before any influence cache is built (``engine.attribution.precomputed_groups``, which the CLI's group and
    reverse read too); empty when the file does not match this model or the sidebar's settings."""
    if int(s.mc_samples) != int(handle.session.config.mc_samples):
        return {}
    return engine_precomputed_matrices(handle.session, handle.precomputed, s.measurement, s.damping_dict)


def _precomputed_for_this_model(handle: Handle) -> bool:
    pre, session = handle.precomputed, handle.session
    return pre is not None and bool(session.gallery()) and any(
        n in pre.methods_for(session) for n in all_influence_methods(session))


PRECOMPUTED_NOTE = ("**Precomputed:** until the influence caches are built, the gallery's group answers come from "
                    "its precomputed scores (each stored at 16 bits, within 0.05% of its sample's largest score).")


def precomputed_groups(handle: Handle, s: Settings) -> bool:
    """Before any influence cache is built: the group views over the gallery from the precomputed scores, at
    the settings they were computed with.  False when there is nothing precomputed for this model."""
    session = handle.session
    if not _precomputed_for_this_model(handle):
        return False
    mats = precomputed_matrices(handle, s)
    building = handle.build.status == "running"
    if not mats:
        held = (f" The gallery's precomputed scores are for the measurement `{MEASUREMENT}` with "
                f"{session.config.mc_samples} draws at the default dampings.")
        if building:
            from explorer.build_view import waiting_note

            waiting_note(f"Groups at these settings need the influence caches ({influence_titles(handle)}): ",
                         "." + held)
        else:  # the build failed or cannot run here: nothing will be "ready when it finishes"
            st.warning(f"Groups at these settings need the influence caches; build {influence_titles(handle)} "
                       f"first.{held}")
        return True
    info = session.method_info()
    later = ("are ready when the build finishes" if building
             else f"need the influence caches (build {influence_titles(handle)} first)")
    st.info(f"{PRECOMPUTED_NOTE} Generated pools, other settings and the copy check {later}.")
    c1, c2 = st.columns(2)
    with c1:
        group = _choose_group(handle)
    qset = gallery_set(session)
    c2.caption(f"Generated samples: the gallery ({len(qset)} samples)")
    chips.init_selection("grp_methods_pre", list(mats))
    methods = st.multiselect("Methods", list(mats), key="grp_methods_pre", format_func=lambda n: info[n]["title"])
    chips.select_all("grp_methods_pre", list(mats), "All methods")
    if group is None or not methods:
        return True
    result = GroupResult(group, MEASUREMENT, qset, {n: mats[n] for n in methods}, session.labels)
    st.markdown(f"**{group.spec}** · {group.description} · {len(qset)} samples ({_set_name(qset)}) · "
                f"measurement `{MEASUREMENT}` · precomputed")
    damping_warnings(handle, result)  # the file's floor, as the live page's (QA 37 #2)
    removal_section(handle, result, s)
    reverse_section(handle, result, s)
    downloads(handle, result, s)
    return True


def _table(result: GroupResult) -> pd.DataFrame:
    labels = result.qset.labels
    table = pd.DataFrame({"sample": result.qset.names, "label": [None if v < 0 else int(v) for v in labels]})
    for n in result.ok():
        table[n] = result.changes(n)
    return table


def axis_labels(handle: Handle, methods: list[str], measurement: str) -> dict[str, str]:
    """Plotly's ``labels``: what the plots' axes and legends say instead of the table's column names
    (``kfac``, ``label``): a reader of the page does not know the code's names."""
    session = handle.session
    info = session.method_info()
    # one axis over every method's bars: it names each method whose changes are of another measurement (QA 67 F2:
    # "predicted change of the loss" over D-TRAK's square-norm bars)
    used = {n: session.measurement_used(n, measurement) for n in methods}
    others = "; ".join(f"{info[n]['title']}: of the {short_measurement(used[n])}" for n in methods
                       if used[n] != measurement)
    out = {"sample": "generated sample", "label": "predicted label", "method": "method",
           "change": f"predicted change of the {short_measurement(measurement)}" + (f" ({others})" if others else "")}
    # D-TRAK's changes are of the square norm whatever the sidebar's measurement (QA round 13)
    out.update({n: f"{info[n]['title']}: predicted change of the {short_measurement(used[n])}" for n in methods})
    return out


def damping_warnings(handle: Handle, result: GroupResult) -> None:
    """A box per method whose scores weigh numerical rounding at its damping (K-FAC below its factors' resolution
    floor), as the Explore page's column has: the group sums and rankings are made of those scores."""
    info = handle.session.method_info()
    for n in result.ok():
        if warning := result.methods[n].warning:
            st.warning(f"{info[n]['title']}: {warning}", icon="⚠️")


def removal_section(handle: Handle, result: GroupResult, s: Settings) -> None:
    info = handle.session.method_info()
    ds = handle.session.dataset
    st.markdown("#### If the group were removed: predicted change of each sample's measurement")
    if caveat := result.size_caveat():  # most of the training set: the numbers rank, they do not forecast (QA 17)
        st.warning(plain.sentence(caveat))
    table = _table(result)
    cols = st.columns(len(result.ok()))
    for col, n in zip(cols, result.ok(), strict=True):
        own = result.measurement_of(n)  # D-TRAK's square norm beside the others' measurement (QA 67 F2)
        of = "" if own == result.measurement else f", of the {short_measurement(own)}"
        col.metric(f"Mean predicted change ({info[n]['title']}{of})", f"{table[n].mean():+.3e}")
        if result.note(n):
            col.caption(result.note(n))
    name = result.ok()[0] if len(result.ok()) == 1 else st.selectbox(
        "Method for the plot", result.ok(), key="grp_plot_method", format_func=lambda n: info[n]["title"])
    # colour by the samples' predicted labels only when a classifier gave them (none for a user's own data:
    # the legend read "predicted label: nan")
    color = "label" if table["label"].notna().any() else None
    data = table.assign(label=table["label"].astype(str))
    names = axis_labels(handle, result.ok(), s.measurement)
    if color is None:
        st.caption("No label classifier for this model's data, so the samples are not coloured by label.")
    style = label_style(data["label"]) if color else {}  # legend 0, 1, 2, ... in hues that neighbours do not share
    fig = px.bar(data, x="sample", y=name, color=color,  # the title names the method: a short y axis
                 labels=names | {name: f"predicted change of the {short_measurement(result.measurement_of(name))}"},
                 title=f"{info[name]['title']}: predicted change per sample", **style)
    # the legend in one row under the plot: beside it, ten labels did not fit 340 px and the last were scrolled away
    fig.update_layout(height=400 if color else 340, margin=dict(l=10, r=10, t=50, b=10),
                      legend=dict(orientation="h", yref="container", y=0, yanchor="bottom", x=0))
    st.plotly_chart(fig, key="grp_fig_bar")
    if len(result.ok()) >= 2:
        a, b = result.ok()[0], result.ok()[1]
        rho = spearman(table[a].to_numpy(), table[b].to_numpy())
        fig2 = px.scatter(data, x=a, y=b, color=color, hover_data=["sample"], labels=names, **style,
                          title=f"{info[a]['title']} vs {info[b]['title']}: Spearman {rho:+.3f} over {len(table)} samples")
        fig2.update_layout(height=360, margin=dict(l=10, r=10, t=50, b=10))
        st.plotly_chart(fig2, key="grp_fig_scatter")
    q = st.selectbox("The group's strongest members for sample", list(range(len(result.qset))), key="grp_sample",
                     format_func=lambda i: result.qset.names[i])
    c0, *cs = st.columns(1 + len(result.ok()))
    c0.image(display(result.qset.queries[q].image, 96), width=96, caption=result.qset.names[q])
    for col, n in zip(cs, result.ok(), strict=True):
        if result.note(n):  # a compressed bank: the members re-scored from fresh gradients, once for every sample
            with st.spinner(f"{info[n]['title']}: the strongest members' exact scores ..."), handle.lock:
                top = result.strongest(n, q, s.top_k)
        else:
            top = result.strongest(n, q, s.top_k)
        col.markdown(f"**{info[n]['title']}**: change {result.changes(n)[q]:+.2e}")
        col.image([display(ds.images[i], CELL, border=4) for i, _ in top],
                  caption=[f"#{i} {ds.label_name(i) or ''} {v:+.1e}" for i, v in top], width=CELL + 8)


RANKING_NOTE = "Ranked left to right, largest change first; under each sample, its name and predicted change."


def ranking_caption(r: Any) -> str:
    """A ranked sample's caption under its 72 px thumbnail: its name, then (a markdown line break) its predicted
    change.  "2. gallery:20 · +5.4e-01" wrapped wherever the width ran out ("2. / gallery:20 · / +5.4e-01",
    QA round 17): "2. gallery:20" alone is wider than 72 px, so the rank is the image's place in the row
    (``RANKING_NOTE``), not a word of the caption."""
    return f"{r.query}  \n{r.change:+.1e}"


def reverse_section(handle: Handle, result: GroupResult, s: Settings) -> None:
    info = handle.session.method_info()
    st.markdown("#### What the group supports most: the samples whose measurement its removal would raise most")
    st.caption(RANKING_NOTE)
    cols = st.columns(len(result.ok()), border=True)
    for col, n in zip(cols, result.ok(), strict=True):
        ranked = result.ranking(n, s.top_k)
        with col:
            st.markdown(f"**{info[n]['title']}**")
            if result.measurement_of(n) != result.measurement:  # D-TRAK: the square norm, whatever is asked
                st.caption(f"Ranked by the {short_measurement(result.measurement_of(n))}, the measurement this "
                           "method always uses.")
            caveat = reverse_caveat([r.change for r in ranked], removed_words(result.group.size))
            if caveat:
                st.caption(plain.sentence(caveat))
            st.image([display(result.qset.queries[result.qset.names.index(r.query)].image, CELL, border=4)
                      for r in ranked],
                     caption=[ranking_caption(r) for r in ranked], width=CELL + 8)


def downloads(handle: Handle, result: GroupResult, s: Settings, prefix: str = "grp") -> None:
    """The CSV of predicted changes and the PNG of this view, each carrying what they were computed with
    (``engine.attribution.provenance``): a loss and an ELBO export of one group shared a file name."""
    info = handle.session.method_info()
    # the influence methods the running build has still to reach were not asked (QA 23b #6)
    waiting = {n: plain.BUILDING for n in _still_building(handle) if n not in result.methods}
    settings = provenance.group_settings(handle.session, result, waiting)
    stem = (f"{result.group.spec.replace(':', '-').replace(',', '_')[:40]}_{result.qset.name.replace(':', '-')}_"
            f"{result.measurement.replace('@', '-').replace('=', '')}_{provenance.settings_digest(settings)}")
    lines = provenance.settings_lines(settings)
    c1, c2 = st.columns(2)
    table = _table(result)
    # made when a button is clicked (a callable's data, as the Explore tab's: ``results_view.downloads``)
    c1.download_button("Download predicted changes (CSV)",
                       lambda: provenance.csv_with_settings(table.to_csv(index=False), settings).encode(),
                       file_name=f"group_{stem}.csv", mime="text/csv", key=f"{prefix}_dl_csv",
                       help="One row per sample: label, one column of predicted change per method. Above the "
                            "header, lines starting with # say what they were computed with (model, group, "
                            "measurement, draws, each method's damping); read it with "
                            "pandas.read_csv(f, comment='#').")
    rows = []
    for n in result.ok():
        ranked = result.ranking(n, s.top_k)
        signs = end_signs([r.change for r in ranked], highest=True)
        suffix = "" if signs.all_agree else f" ({signs.n - signs.agreeing} of {signs.n} changes not positive)"
        if result.measurement_of(n) != result.measurement:
            suffix += f" (of its {short_measurement(result.measurement_of(n))})"
        rows.append(SheetRow(f"{info[n]['title']}: samples {result.group.spec} supports most{suffix}",
                             [to_uint8(result.qset.queries[result.qset.names.index(r.query)].image) for r in ranked],
                             [f"{r.query}\n{r.change:+.1e}" for r in ranked]))
    c2.download_button("Download this view (PNG)",
                       lambda: png_bytes(compose_sheet(rows, heading=lines[:-1]),
                                         text={"attribution-settings": provenance.settings_json(settings)}),
                       file_name=f"group_{stem}.png", mime="image/png", key=f"{prefix}_dl_png")


def copy_section(handle: Handle, result: GroupResult) -> None:
    ds = handle.session.dataset
    info = handle.session.method_info()
    st.markdown("#### Copy check: which samples look like near-copies of a training image?")
    name = copy_method(result.ok(), info)
    rows = copy_check(result.methods[name].scores, result.qset.images, ds.images, result.qset.names, result.qset.labels)
    flagged = sum(r.near_copy for r in rows)
    base = _flag_rate(handle)
    st.caption(
        f"Two kinds of evidence per sample: how concentrated its support is ({info[name]['title']}: the share of "
        "the positive influence carried by the strongest one and five training images), and how close its nearest "
        f"training image is in pixels. Flagged when the nearest training image is less than {NEAR_COPY_RATIO} times "
        f"as far as the next {NEIGHBOURS} nearest on average. {flagged} of {len(rows)} samples are flagged; the same "
        f"rule flags {base:.1%} of real training images against the others."
        + (f" {ESTIMATED_SHARES[0].upper()}{ESTIMATED_SHARES[1:]}." if result.note(name) else "")
    )
    st.info(CAVEAT)
    for r in rows[:5]:
        c0, c1, c2 = st.columns([1, 3, 1])
        q = result.qset.names.index(r.query)
        c0.image(display(result.qset.queries[q].image, 80), width=80, caption=r.query + (" · FLAGGED" if r.near_copy else ""))
        c1.markdown(explain(r))
        c1.image([display(ds.images[i], 48, border=3) for i in r.top_proponents],
                 caption=[f"#{i}" for i in r.top_proponents], width=54)
        c2.image(display(ds.images[r.nearest], 80), width=80, caption=f"nearest #{r.nearest}")


def copy_method(ok: list[str], info: dict[str, Any]) -> str:
    """The influence method whose shares the copy check shows: a choice among ``ok``, K-FAC first (QA 70 F4: it
    was always K-FAC, where the CLI's ``copy-check --method`` takes any).  The default sits in the state, kept
    across tabs by ``keep_choices``; a kept method this result lacks falls back to it."""
    if st.session_state.get(COPY_METHOD) not in ok:
        st.session_state[COPY_METHOD] = "kfac" if "kfac" in ok else ok[0]
    if len(ok) == 1:
        return ok[0]
    return st.selectbox("Method for the copy check", ok, key=COPY_METHOD, format_func=lambda n: info[n]["title"],
                        help="Whose influence shares the check reads (the CLI's copy-check --method)")


def _flag_rate(handle: Handle) -> float:
    cache = handle.__dict__.setdefault("copy_flag_rate", {})
    if "rate" not in cache:
        cache["rate"] = training_flag_rate(handle.session.dataset.images)
    return cache["rate"]


# --- the reverse view from the Explore page's grids --------------------------------------------


def reverse_figure(long: pd.DataFrame, res: GroupResult, shown: dict[str, str], colours: dict[str, str],
                   labels: dict[str, str], spec: str) -> Any:
    """Each gallery sample's predicted change if the picked images were removed: one panel per method (``long``:
    sample, method title, change), each on its own y scale, which names the measurement of its changes.

    QA 70 F5: on one y axis, scaled to K-FAC's changes, a method on a smaller scale (a gradient dot product
    without a curvature inverse: about 1e-3 against 0.08) drew flat bars.  The methods' changes differ in scale
    as their scores do (the score distributions have independent axes for that reason)."""
    order = [shown[n] for n in res.ok()]
    what = short_measurement(res.measurement)
    fig = px.bar(long, x="sample", y="change", color="method", facet_row="method", category_orders={"method": order},
                 color_discrete_map={shown[n]: colours[n] for n in res.ok()},
                 labels=labels | {"sample": "gallery sample"},
                 # the group and the note on a line of their own: on one line the title ran under plotly's toolbar
                 title=f"Predicted change of each gallery sample's {what}<br><sup>if {spec} were removed"
                 + ("" if all(res.measurement_of(n) == res.measurement for n in res.ok())
                    else " (a method in brackets: of its own measurement)") + "</sup>")
    fig.update_yaxes(matches=None, showticklabels=True, automargin=True)  # one scale per method
    fig.update_xaxes(automargin=True)  # the bottom panel's sample names below its axis title
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))  # "method=TRAK" -> "TRAK"
    own = {shown[n]: f"change of the {short_measurement(res.measurement_of(n))}" for n in res.ok()}
    for trace in fig.data:  # each panel's axis says what its bars are (D-TRAK's: of the square norm), short to fit
        fig.layout["yaxis" + trace.yaxis[1:]].title.update(text=own[trace.name], font_size=11)
    fig.update_layout(height=140 + 180 * len(order), margin=dict(l=10, r=10, t=70, b=10))
    return fig


def reverse_from_grids(handle: Handle, result: Any, s: Settings) -> None:
    """Pick training images shown in the grids: see what they support, or keep them as a group."""
    labels = handle.session.labels
    info = handle.session.method_info()
    shown: list[int] = []
    tops: dict[str, list[int]] = {}  # a method's top-k at once: the images a user wants as one group
    for n in s.methods:
        r = result.methods.get(n)
        if r is not None and r.scores is not None:
            top = [x.index for x in r.top(s.top_k, labels)]
            tops[f"{info[n]['title']}'s top {len(top)}"] = top
            shown += top + [x.index for x in r.bottom(s.top_k, labels)]
    shown = list(dict.fromkeys(shown))
    if not shown:
        return
    st.subheader("What do these training images support?")
    building = handle.build.status == "running"
    has_gallery = bool(handle.session.gallery())
    methods = influence_methods(handle) if has_gallery else []  # built, and not being built
    # before the influence caches exist, or while they build: the precomputed gallery scores, at the settings they
    # hold (every method, where the methods built so far are a part)
    pre = precomputed_matrices(handle, s) if has_gallery and (building or not methods) else {}
    live = bool(methods) and not pre
    if building and has_gallery and not pre and not live:  # the ranking needs an influence cache
        from explorer.build_view import waiting_note

        waiting_note("Ranking the gallery samples by the images picked here will be ", ".")
    elif building and live:
        _joining_later(handle)
    picked = st.multiselect("Training images from the grids above", shown, key="grid_pick",
                            format_func=lambda i: f"#{i}" + (f" ({labels[i]})" if labels is not None else ""),
                            help="One image: the samples it supports most. Several: the same for the group. "
                                 "The Groups page's hand-picked group uses these too.")
    chips.pick_buttons("grid_pick", tops, "Pick at once:")
    st.session_state[PICKED] = list(picked)
    if not picked:
        st.caption("Pick one or more training images to rank the gallery samples by how much they depend on them."
                   if has_gallery else
                   "Pick training images to keep them as the Groups page's hand-picked group; this model has no "
                   "gallery to rank here (the Groups page ranks a pool of generated samples).")
        return
    if not has_gallery:
        st.info("No gallery to rank; use the Groups page with a generated pool.")
        return
    qset = gallery_set(handle.session)
    group = group_from_indices(picked, len(handle.session.dataset))
    if live:
        res = group_result(handle, group, qset, s, methods)
    elif pre:
        st.caption(PRECOMPUTED_NOTE)
        res = GroupResult(group, MEASUREMENT, qset, pre, labels)
    elif building:
        return
    else:
        st.warning(f"No influence method is built ({influence_titles(handle)}): the ranking needs one.")
        return
    if res.ok():
        damping_warnings(handle, res)
        reverse_section(handle, res, s)
        data = _table(res)
        long = data.melt(id_vars=["sample", "label"], value_vars=res.ok(), var_name="method", value_name="change")
        # a method that scores its own measurement (D-TRAK: the square norm) says so in the legend
        shown = {n: info[n]["title"] + ("" if res.measurement_of(n) == res.measurement
                                        else f" ({short_measurement(res.measurement_of(n))})")
                 for n in res.ok()}
        long["method"] = long["method"].map(shown)
        colours = figures.method_colours(res.ok())  # each method in its colour across the app's figures
        fig = reverse_figure(long, res, shown, colours, axis_labels(handle, res.ok(), res.measurement), group.spec)
        st.plotly_chart(fig, key="rev_fig_bar")
        downloads(handle, res, s, prefix="rev")
