"""Diffusion Attribution Explorer: the Streamlit entry point (layout only; all computation is in engine/).

Run:  streamlit run explorer/app.py -- --preset digits [--checkpoint PATH] [--data-root DIR] [--cache DIR] [--device cpu]
(or set ATTRIBUTION_PRESET / ATTRIBUTION_CHECKPOINT / ATTRIBUTION_CACHE / ATTRIBUTION_DEVICE).
``--cache-root DIR`` (the CLI's spelling) is ``--cache DIR``; any other unknown flag is refused on the page;
``-- --help`` lists the flags.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:  # `streamlit run explorer/app.py` puts explorer/, not the repo, on the path
    sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402

from engine.bar_redraw import match_log_intervals  # noqa: E402
from engine.validation import one_line  # noqa: E402

PAGES = ["Explore", "Groups", "Evaluation", "About the methods"]


def main() -> None:
    st.set_page_config(page_title="Diffusion Attribution Explorer", page_icon="🔎", layout="wide")
    from explorer import runtime

    try:
        parsed = runtime.parse_args()
    except runtime.HelpRequested as e:  # QA 45 #7: the flags and their help texts, in the terminal and on the page
        print(e.text, flush=True)
        st.title("Diffusion Attribution Explorer")
        st.caption("The app's flags (after `--` on the `streamlit run` command line):")
        st.code(e.text, language=None)
        st.stop()
    except runtime.ArgsError as e:  # an unknown flag: say so on the page and in the terminal, build nothing
        print(f"explorer/app.py: {e}", file=sys.stderr)
        st.title("Diffusion Attribution Explorer")
        st.error(f"Cannot start with these command-line flags: {e}")
        st.stop()
    runtime.server_log()
    match_log_intervals()  # before the build worker imports tqdm, which reads TQDM_* once
    from explorer import query_view

    args = runtime.choose_model(query_view.model_from_url(parsed))  # a reload keeps the URL's model (QA 40 #3)
    from explorer import load_progress

    loading = st.empty()  # a first load's folder decode shows its counts here, not only in the server's terminal
    try:
        load_progress.wait_for_other_load(loading, args)  # another tab's (or a refreshed page's) decode of this model
        with load_progress.shown(loading, args):
            # loaded, and its build started, by the server (QA 45 #6); its own model's build first (QA 47 #2)
            handle = runtime.serve(args, first=parsed)
    except Exception as e:  # noqa: BLE001 - a missing checkpoint/data set is a message, not a traceback
        # in the terminal too, as the CLI says it (QA 45 #8: a headless server's log said nothing)
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        st.title("Diffusion Attribution Explorer")
        # the preset only where one was named (QA 45 #1: "for preset `digits`" on a --checkpoint with no --preset)
        what = f"for preset `{args.preset}`" if args.preset_named else f"from `{args.checkpoint or args.preset}`"
        st.error(f"Cannot load the model {what}: {e}")
        st.stop()

    from explorer import (
        about_view,
        build_view,
        controls,
        evaluation_view,
        groups_view,
        plain,
        results_view,
    )

    session = handle.session
    st.title("Diffusion Attribution Explorer")
    st.caption(  # plain words; the exact model (tensor shape, checkpoint and its hash) in the tooltip
        plain.model_line(session.preset.name, len(session.dataset), session.shape),
        help=plain.model_details(session.preset.name, session.shape, session.checkpoint, session.checkpoint_hash,
                                 session.device),
    )
    if handle.settings_note:
        st.info(handle.settings_note[0].upper() + handle.settings_note[1:], icon="ℹ️")
    for line in handle.load_warnings:  # the data folder's warnings: labels dropped, files skipped (QA 45 #3)
        st.warning(line, icon="⚠️")  # as the terminal says it: it starts with the folder's path
    plugin_files_note()
    query_view.keep_url(session.preset.name, args.preset if len(runtime.model_choices(parsed)) >= 2 else None)
    build_view.build_panel(handle)
    query = query_view.choose_query(handle)
    has_traj = query is not None and query.input.trajectory is not None
    settings = controls.choose_settings(handle, has_traj)

    groups_view.keep_choices(handle)  # on every run: only the open tab is drawn, and Streamlit forgets the others'
    results_view.keep_plot_choices()  # the Explore tab's plots' choices, likewise
    explore, groups, evaluation, about = st.tabs(PAGES, key="page", on_change="rerun")
    if explore.open:
        with explore:
            if query is None:
                st.info("Choose a query image in the sidebar.")
            else:
                results_view.query_header(handle, query, settings.measurement)
                # (the answer's query and rescore run in the foreground, engine.attribution.foreground; not the whole
                # page run: runs that waited for the handle's lock counted as foreground and paused the grid pass that
                # the run holding the lock waited for, QA 52 #1)
                result = results_view.get_result(handle, query, settings)
                if result is not None:
                    results_view.method_columns(handle, query, result, settings)
                    results_view.downloads(handle, query, result, settings)
                    results_view.plots(handle, result, settings)
                    groups_view.reverse_from_grids(handle, result, settings)
                    with st.expander("Timings and cache status"):
                        results_view.timings(handle, result, settings)
                        results_view.cache_status(handle)
    if groups.open:
        with groups:
            groups_view.groups_page(handle, settings)
    if evaluation.open:
        with evaluation:
            files = evaluation_view.result_files()  # one read of assets/results for the whole tab
            evaluation_view.other_models_note(handle, files)
            evaluation_view.lds_section(handle, files)
            st.divider()
            evaluation_view.retrain_results_section(handle, files)
            st.divider()
            if handle.gallery_agreement():
                evaluation_view.label_agreement_section(handle)
                st.divider()
            evaluation_view.retrain_section(handle, query, settings)
    if about.open:
        with about:
            about_view.about_page(handle.session.method_info())


def plugin_files_note() -> None:
    """A method or bank-kind file the registries had to leave out (it does not parse, declares no literal
    name, or repeats another file's name): said on the page, naming the file; the other methods work."""
    from engine.attribution.methods import plugin_problems

    problems = plugin_problems()
    if problems:
        st.warning("Left out, so the other methods keep working: " + " ".join(f"`{p}`" for p in problems))


# Streamlit runs this file as __main__.  The guard keeps a multiprocessing "spawn" child of a
# process that once ran the app (AppTest in the test suite, or worker pools started from the app)
# from re-running the whole app -- and building every cache -- when it re-imports __main__.
if __name__ == "__main__":
    main()
