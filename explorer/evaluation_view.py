"""Evaluation tab: the LDS results shipped in assets/results, and "check by retraining" for the current query.

Both come from the engine (``engine.evaluation.report`` loads the result files,
``engine.evaluation.retrain_top.RetrainJob`` runs a retraining).  A retraining job
runs in the background (the engine's job object owns the thread/process); a fragment
polls its progress once a second so the rest of the page stays usable, and the finished
job stays in the process-wide handle, so its result is cached for every tab.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from engine.attribution.signs import removal_effect
from engine.evaluation.report import (
    ModelKey,
    ResultFiles,
    lds_records,
    model_files,
    other_models_files,
    retrain_records,
)
from engine.evaluation.retrain_top import CACHED, RetrainJob, earlier_work, has_stored_result
from engine.paths import ASSETS
from explorer import plain
from explorer.controls import Settings
from explorer.figures import method_base
from explorer.images import display
from explorer.query_view import Query
from explorer.results_view import measurement_title, short_measurement
from explorer.runtime import MODEL_LABELS, Handle, influence_titles, model_choices

FRACTIONS = [0.01, 0.02, 0.05, 0.1, 0.2]
NO_VALUE = "–"  # a table cell with no value (a similarity method's predicted change), not "None"
# an LDS or retrain-top file measured with other query draws than the served model's (AttributionConfig.query_draws)
QUERY_DRAWS_NOTE = {
    "own": "the query on its own draws (the paper's estimator)",
    "bank": "the query on the bank's draws (common random numbers)",
}


def served_settings(handle: Handle) -> dict[str, Any]:
    """The served model's attribution settings, each method's damping resolved to the value it scores with
    (``session.damping_for``, the one rule: a preset's None is the method's default), for
    ``settings_differences``."""
    session = handle.session
    current = dataclasses.asdict(session.config)
    for name in session.method_names():
        field = session.method(name).damping_field
        if field in current:
            current[field] = session.damping_for(name, {})
    return current


def settings_note(differences: list[str] | None, what: str) -> str:
    """The Details' words for a result file measured at other attribution settings than the served model's
    (``RetrainRecord.settings_differences``, configuration names and values): empty when they agree."""
    if differences is None:
        return f"**{what} at attribution settings the file does not record** (it predates that record)"
    if differences:
        return f"**{what} at other attribution settings than this model's:** " + "; ".join(differences)
    return ""


def settings_flag(differences: list[str] | None, other_draws: bool) -> str:
    """The main flow's one plain warning for a result file measured otherwise than the served model would
    (``settings_note`` and the query-draws note say how, in Details); empty when it was not."""
    if differences or other_draws:
        return " · **measured with other settings than this model's (see Details)**"
    if differences is None:
        return " · settings not recorded (see Details)"
    return ""


# the attribution settings a heading can name in words ("{0}": the file's value, "{1}": the served model's);
# ``settings_differences`` (the engine's list of them, "key: recorded (now served)") is what they are read from
SETTING_WORDS = {
    "mc_samples": "M = {0} Monte Carlo draws (the app now uses {1})",
    "draws": "{0} gradient draws (the app now uses {1})",
    "trak_dim": "TRAK dimension {0} (the app now uses {1})",
    "seed": "seed {0} (the app now uses {1})",
}
_DIFFERENCE = re.compile(r"^(\w+): (.*) \(now (.*)\)$")


def settings_heading(differences: list[str] | None, other_draws: bool) -> str:
    """What a result's heading adds when it was measured otherwise than the served model would: the first
    setting ``SETTING_WORDS`` can say in words, and how many others differ (``settings_flag`` says that there are
    some, Details names each).  Why: two LDS sections both read "Training loss — 32 subsets x 1 seed; 32 queries",
    one with K-FAC at 0.44, the other (M = 8) at 0.14, below TRAK, and only Details said M = 8 (QA round 17)."""
    differences = list(differences or [])
    said = ""
    for line in differences:
        m = _DIFFERENCE.match(line)
        if m and m[1] in SETTING_WORDS and m[2] != "not recorded":
            said = SETTING_WORDS[m[1]].format(m[2], m[3])
            differences.remove(line)
            break
    others = len(differences) + bool(other_draws)
    if not said:
        return f" · measured with {others} other setting{'s' if others > 1 else ''}" if others else ""
    more = f" and {others} other setting{'s' if others > 1 else ''}" if others else ""
    return f" · measured with {said}{more}"


def _count(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) else "?"


def lds_summary(cfg: dict) -> str:
    """An LDS run's design in words (the subsets, seeds and queries); its estimator settings go in Details."""
    frac = cfg.get("fraction")
    share = f"{float(frac):.0%} of" if isinstance(frac, int | float) else "part of"
    return (f"Models retrained on {_count(cfg.get('subsets_with_models', cfg.get('subsets')))} random subsets "
            f"({share} the {_count(cfg.get('num_train'))} training images each) x {_count(cfg.get('seeds'))} "
            f"seed(s); {_count(cfg.get('queries'))} queries")


def lds_details(entry: Any, served_draws: str, current: dict[str, Any]) -> list[str]:
    """An LDS run's technical details: its estimator settings, how they differ from the served model's, its files."""
    cfg = entry.config
    draws = (cfg.get("attribution") or {}).get("mc_samples")
    return [
        f"True measurement over {cfg.get('true_measurement_mc_samples', '?')} draws"
        + (f", attributions with M={draws}" if draws else "")
        + (f" · **{QUERY_DRAWS_NOTE[entry.query_draws]}, not this model's setting**"
           if entry.query_draws != served_draws else ""),
        settings_note(entry.settings_differences(current), "measured"),
        f"File `{entry.file}`" + (f" · figure `{entry.figure.name}`" if entry.figure is not None else "")
        + (f" · {cfg['created']}" if cfg.get("created") else ""),
    ]


def results_dir() -> Path:
    """assets/results, or ATTRIBUTION_RESULTS."""
    return Path(os.environ.get("ATTRIBUTION_RESULTS", ASSETS / "results"))


def model_key(handle: Handle) -> ModelKey:
    """This server's model: result files measured on another checkpoint are not shown beside it."""
    return ModelKey(handle.session.checkpoint_hash, handle.session.preset.name)


def result_files() -> ResultFiles:
    """The results folder, read once for the whole Evaluation tab (each section gets this)."""
    return ResultFiles.read(results_dir())


def other_models_note(handle: Handle, files: ResultFiles | None = None) -> None:
    """Say that result files in the folder belong to other models (so a missing table is explained); the
    folder on the server and the files' names are in Details."""
    files = files or result_files()
    others = other_models_files(files, model_key(handle))
    if not others:
        return
    switch = sidebar_models_files(handle, files, others)
    rest = len(others) - sum(len(v) for v in switch.values())
    told = [f"{len(v)} of the {MODEL_LABELS.get(p, p)} model, which the sidebar's Model switch opens"
            for p, v in switch.items()]
    if rest:  # QA 50: "start the app on that model" for files one click away on the sidebar's switch
        told.append(f"{rest} on weights this server does not serve (start the app on them to see those)"
                    if told else "start the app on that model to see them")
    st.caption(f"Not shown: {len(others)} result file(s) measured on other models" + (": " if switch else "; ")
               + "; ".join(told) + ".")
    plain.details([f"Folder `{results_dir()}`: {', '.join(f'`{f}`' for f in others)}"])


def sidebar_models_files(handle: Handle, files: ResultFiles, others: list[str]) -> dict[str, list[str]]:
    """Of ``others`` (files measured on other models), those of each other model on the sidebar's switch
    (``runtime.model_choices``), told by its shipped checkpoint's hash: preset -> file names."""
    from engine.model.checkpoint import checkpoint_hash
    from engine.paths import default_checkpoint

    args = getattr(handle, "args", None)
    out: dict[str, list[str]] = {}
    for p in model_choices(args) if args is not None else []:
        if p == handle.session.preset.name:
            continue
        mine = [f for f in model_files(files, ModelKey(checkpoint_hash(default_checkpoint(p)), p)) if f in others]
        if mine:
            out[p] = mine
    return out


def _interval_words(entry: dict, ref: str) -> str:
    """Where the reference method's 95% interval lies against this method's, in words."""
    position = entry.get(f"{ref}_interval_vs_this")
    if position is None:  # records from before the three-way position: only "clear above" was kept
        if f"{ref}_interval_clear" not in entry:
            return "-"
        return "clear above" if entry[f"{ref}_interval_clear"] else "not clear"
    return {"above": "clear above", "below": "clear below", "overlap": "overlaps"}[position]


def _fmt_ci(ci: Any) -> str:
    if isinstance(ci, list | tuple) and len(ci) == 2 and None not in ci:
        return f"[{float(ci[0]):+.3f}, {float(ci[1]):+.3f}]"
    return ""


def _fmt_float(v: Any, spec: str) -> str:
    return "" if v is None else format(float(v), spec)


def _fmt_change(v: Any, measured: str | None = None, predicted: str | None = None) -> str:
    """A retraining table's predicted change to 4 significant digits, or a dash where the method made no
    prediction (``no_prediction_note`` says why): the table printed "None".  A prediction of another measurement
    than the ``measured`` one (``predicted``: D-TRAK's square norm) names it in the cell (QA 64 F1)."""
    if v is None:
        return NO_VALUE
    other = predicted is not None and measured is not None and predicted != measured
    return f"{float(v):.4g}" + (f" ({short_measurement(predicted)})" if other else "")


def no_prediction_note(names: list[str], info: dict) -> str:
    """The footnote for the dashes in a retraining table's "predicted change": a similarity method ranks the
    training images by likeness and predicts no change of the measurement; another method's is missing."""
    names = list(dict.fromkeys(names))
    if not names:
        return ""
    similar = [_title(info, n) for n in names if info.get(method_base(n), {}).get("kind") == "similarity"]
    other = [_title(info, n) for n in names if _title(info, n) not in similar]
    parts = []
    if similar:  # one sentence, in the singular or the plural
        is_a, it, ranks, predicts, its = (("is a similarity, not an influence method", "it", "ranks", "predicts", "its")
                                          if len(similar) == 1 else
                                          ("are similarities, not influence methods", "they", "rank", "predict", "their"))
        parts.append(f"{' and '.join(similar)} {is_a}: {it} {ranks} the training images by likeness to the query "
                     f"and {predicts} no change of the measurement; {its} rows show what removing {its} most "
                     "similar images did")
    if other:
        parts.append(f"{' and '.join(other)}: no predicted change in the file")
    return f"{NO_VALUE} in *predicted change*: " + "; ".join(parts) + "."


def lds_heading(meas: str, other: str = "") -> str:
    """An LDS record's heading: its measurement under the title every other line gives it
    (``results_view.measurement_title``); its own lookup headed ``loss@t=500`` "Training loss" (QA 64 F8)."""
    return f"#### Measurement: {measurement_title(meas)} (`{meas}`){other}"


def predicted_measurement(session: Any, method: str, measured: str) -> str:
    """The measurement whose change a retraining record's ``method`` predicted, when ``measured`` was the job's:
    the same, except for a method that scores its own (D-TRAK: the square norm, ``session.measurement_used``).
    The records hold only the job's measurement; a method this server does not know keeps it."""
    try:
        return session.measurement_used(method_base(method), measured)
    except (KeyError, ValueError):
        return measured


def incomparable_note(methods: list[tuple[str, str]], measured: str) -> str:
    """Under a retraining view, for the methods ((title, measurement predicted)) whose prediction is of another
    measurement than the one measured: their predicted change is not comparable with the measured change (QA 64
    F1: D-TRAK's square-norm sums sat beside the loss's changes unlabelled, and the README took their ratio).
    "" when every prediction is of the measured measurement."""
    other: dict[str, list[str]] = {}
    for title, used in methods:
        if used != measured:
            other.setdefault(used, []).append(title)
    if not other:
        return ""
    parts = [f"{plain.and_list(list(dict.fromkeys(titles)))}'s predicted change is of the {short_measurement(used)}, "
             f"the measurement {'it scores' if len(set(titles)) == 1 else 'they score'} whatever is asked, not of the "
             f"{short_measurement(measured)} measured here: it is not comparable with the measured change"
             for used, titles in other.items()]
    return "; ".join(parts) + "."


def _title(info: dict, name: str) -> str:
    base, bracket, rest = name.partition("[")
    title = info.get(base, {}).get("title", base)
    return f"{title} [{rest}" if bracket else title


def _titles(info: dict, names: list[str]) -> str:
    return plain.and_list([_title(info, n) for n in names])


def unevaluated_note(names: list[str], evaluated: set[str], info: dict, command: str,
                     unavailable: set[str] = frozenset()) -> tuple[str, str]:
    """Which of the server's methods no LDS record holds (a method added since, CLIP without its weights), in
    words for the page, and the command that evaluates them, for its Details: otherwise a new method was simply
    absent from the page (QA round 19).  A method that cannot run on this server gets no command (its LDS
    run would fail here).  ("", "") when every method has a record."""
    missing = [n for n in names if n not in evaluated]
    if not missing:
        return "", ""
    runnable = [n for n in missing if n not in unavailable]
    idle = [n for n in missing if n in unavailable]
    parts = [_titles(info, runnable)] if runnable else []
    if idle:
        parts.append(f"{_titles(info, idle)}, which cannot run on this server")
    line = "Not evaluated on this model yet: " + "; ".join(parts) + "."
    command_line = (f"`{command} --methods {','.join(runnable)}` adds an LDS of "
                    f"{'it' if len(runnable) == 1 else 'them'}." if runnable else "")
    return line, command_line


def lds_section(handle: Handle, files: ResultFiles | None = None) -> None:
    st.subheader("Linear data-modelling score (LDS)")
    st.markdown(
        "For random half-size subsets of the training set, models were retrained and the query's measurement "
        "measured. LDS is the Spearman correlation between each method's predicted measurement "
        "(full-model value + sum of the scores of the removed images) and the measured one, averaged over "
        "queries (paper section 4, eq. 13). Higher is better; 0 means no better than chance. Similarity "
        "methods are included for reference: their scores are not removal predictions."
    )
    files = files or result_files()
    folder = files.folder
    served = handle.session.config.query_draws
    current = served_settings(handle)
    entries = lds_records(files, model_key(handle), served)  # this model's, its settings' headline first
    if not entries:
        st.info("**No LDS results for this model yet.**")
        plain.details([f"They are produced by `{handle.session.command('lds')} --subsets 32 --seeds 1 --queries 32`, "
                       "which retrains many small models (`make lds` for the digits default), in "
                       f"`{folder}`; run it once and reload."])
        return
    info = handle.session.method_info()
    evaluated = {method_base(name) for entry in entries for name in entry.methods}
    unavailable = {n for n, st_ in handle.status().items() if not st_.get("available", True)}
    note, command_line = unevaluated_note(handle.session.method_names(), evaluated, info,
                                          handle.session.command("lds"), unavailable)
    if note:
        st.caption(note)
        plain.details([command_line])
    for entry in entries:
        meas = entry.measurement
        cfg = entry.config
        other = settings_heading(entry.settings_differences(current), entry.query_draws != served) if cfg else ""
        st.markdown(lds_heading(meas, other))
        if cfg:
            st.caption(
                lds_summary(cfg)
                + settings_flag(entry.settings_differences(current), entry.query_draws != served)
                + (" · **quick mode (smoke test, not a result)**" if cfg.get("quick") else "")
            )
        rows = []
        for name, v in entry.methods.items():
            rows.append(
                {
                    "method": _title(info, name),
                    "LDS": v.get("lds"),
                    "95% interval": _fmt_ci(v.get("ci95")),
                    "damping": _fmt_float(v.get("damping"), ".1e"),
                    "best LDS in sweep (chosen on these queries)": _fmt_float(v.get("best_lds"), ".3f"),
                    "at damping": _fmt_float(v.get("best_damping"), ".1e"),
                }
            )
        frame = pd.DataFrame(rows)
        st.dataframe(frame.dropna(axis=1, how="all"), hide_index=True)
        best = entry.best_settings.get("methods") or {}
        if best:
            ref = entry.best_settings.get("reference", "kfac")
            st.markdown(
                "**Every method at its best settings** (the best variant and damping over this run and its "
                "ablations, chosen on the same queries; *held-out*: the setting chosen on half of the queries "
                "and scored on the other half, which removes the optimism of that choice"
                + (")" if entry.best_settings.get("damping_held_out") else
                   " among the settings, but not of a best-of-sweep setting's damping, itself chosen on every "
                   "query: this record keeps per-query values only at each sweep's best damping)")
            )
            st.dataframe(
                pd.DataFrame(
                    [
                        {
                            "method": _title(info, name),
                            "best LDS": b.get("lds"),
                            "95% interval": _fmt_ci(b.get("ci95")),
                            "held-out": b.get("held_out_choice"),
                            "settings": b.get("source"),
                            "damping": _fmt_float(b.get("damping"), ".1e"),
                            f"{_title(info, ref)}'s interval": _interval_words(b, ref),
                        }
                        for name, b in best.items()
                    ]
                ),
                hide_index=True,
            )
        stem = entry.path.stem
        c1, c2 = st.columns(2)
        if entry.figure is not None:
            c1.image(str(entry.figure), caption="The run's own figure")
        sweeps = entry.sweeps
        if sweeps:
            from explorer.figures import damping_sweeps

            c2.plotly_chart(damping_sweeps(sweeps, {n: _title(info, n) for n in sweeps}), key=f"sweep_{stem}")
        with st.expander(f"{plain.DETAILS}: files, settings and noise report"):
            for line in lds_details(entry, served, current) if cfg else []:
                if line:
                    st.caption(line)
            st.json({"config": entry.config, "noise": entry.noise}, expanded=False)


def retrain_results_section(handle: Handle, files: ResultFiles | None = None) -> None:
    """The retraining-without-top-influences results shipped in assets/results (``attribution-engine retrain-top``)."""
    entries = retrain_records(files or result_files(), model_key(handle))
    if not entries:  # say so: the section sat as an empty gap between two dividers
        query = "gallery:0" if handle.session.gallery() else "train:0"
        st.caption("No shipped results of retraining without the top proponents for this model yet (the check "
                   "below runs one from this page).")
        plain.details([f"`{handle.session.command('retrain-top')} --query {query} --fraction 0.02` writes them."])
        return
    st.subheader("Retraining without the top proponents (shipped results)")
    st.markdown(
        "Each method's top proponents for a query were removed and the model retrained with the full recipe; "
        "a random removal of the same size is the control (paper section 4, App. G.6). A method whose "
        "proponents matter raises the query's measurement (a positive change) well above the control."
    )
    info = handle.session.method_info()
    served = handle.session.config.query_draws
    current = served_settings(handle)
    for entry in entries:
        cfg = entry.config
        meas = str(cfg.get("measurement", "?"))
        rows = [
            {
                "query": r.get("query"),
                "method": _title(info, str(r.get("method"))),
                "removed": len(r.get("removed") or []) or cfg.get("removed"),
                "predicted change": _fmt_change(r.get("predicted_change"), meas,
                                                 predicted_measurement(handle.session, str(r.get("method")), meas)),
                "measured change": r.get("measured_change"),
                "random control": r.get("random_measured_change"),
                "measured / control": (
                    r["measured_change"] / r["random_measured_change"]
                    if r.get("measured_change") is not None and r.get("random_measured_change")
                    else None
                ),
            }
            for r in entry.results
        ]
        if not rows:
            continue
        differences = entry.settings_differences(current)
        st.caption(
            f"Measurement: {measurement_title(meas)}; {_count(cfg.get('removed'))} of the "
            f"{_count(cfg.get('num_train'))} training images removed; {_count(cfg.get('steps'))} training steps "
            "per model" + (settings_flag(differences, entry.query_draws != served)
                           # said, not left to silence (QA 23b #9: two tables, only Details told them apart)
                           or " · at this model's current attribution settings")
        )
        st.dataframe(pd.DataFrame(rows), hide_index=True, height=35 * (len(rows) + 1) + 3,  # every row, no scrolling
                     column_config={"predicted change": st.column_config.TextColumn(alignment="right")})
        no_prediction = no_prediction_note(
            [str(r.get("method")) for r in entry.results if r.get("predicted_change") is None], info)
        if no_prediction:
            st.caption(no_prediction)
        incomparable = incomparable_note(
            [(_title(info, str(r.get("method"))), predicted_measurement(handle.session, str(r.get("method")), meas))
             for r in entry.results if r.get("predicted_change") is not None], meas)
        if incomparable:
            st.caption(incomparable)
        plain.details([
            f"Measurement `{meas}`, true measurement over {cfg.get('true_measurement_mc_samples', '?')} common draws"
            + (f" · **removals chosen with {QUERY_DRAWS_NOTE[entry.query_draws]}, not this model's setting**"
               if entry.query_draws != served else ""),
            settings_note(differences, "removals chosen"),
            f"File `{entry.file}`" + (f" · {cfg['created']}" if cfg.get("created") else ""),
        ])


def label_agreement_section(handle: Handle) -> None:
    """How often each method's top-10 share the query's label over the model's gallery (``Handle.gallery_agreement``,
    from the shipped precomputed scores): with its interval and the chance level, so that a demo's TRAK column of
    mixed labels reads as the method on this model (QA 47 #8).  Nothing for a model without those scores."""
    agreements = handle.gallery_agreement()
    if not agreements:
        return
    info = handle.session.method_info()
    names = [n for n in handle.session.method_names() if n in agreements]
    first = agreements[names[0]]
    st.subheader("Do the top proponents share the query's label?")
    st.markdown(
        f"Over this model's {first.queries} gallery samples: the share of each method's {first.top} strongest "
        f"proponents (for a similarity method, its {first.top} most similar images) whose training label is the "
        f"sample's label. A sanity check, like the paper's example figures, not a test of what removal would do: "
        f"images that look alike share labels, so a similarity method scores well here by construction. The "
        f"LDS and retraining above test the predictions themselves.")
    rows = [{"method": _title(info, n), f"top-{first.top} share": f"{agreements[n].share:.0%}",
             "95% interval": "{:.0%} to {:.0%}".format(*agreements[n].ci95), "samples": agreements[n].queries} for n in names]
    st.dataframe(pd.DataFrame(rows), hide_index=True, height=35 * (len(rows) + 1) + 3)
    gaps = handle.gallery_agreement_gaps()
    missing = plain.no_figure_line(list(gaps), gaps, info)  # in the model's method order, as gaps are made
    if missing:  # a method left out of the table says why (QA 52 #2: a compressed K-FAC bank's, without a word)
        st.caption(missing)
    plain.details([
        f"Chance (a random training image): {first.chance:.0%}. A generated sample's label is a simple pixel "
        f"classifier's guess, not ground truth.",
        "From the gallery's precomputed scores at the default settings (`precomputed_gallery.npz`, 16-bit), so ties "
        "can fall otherwise than in live scores: `attribution-engine bench` measures the same figure from live "
        "scores (its `agreement_top10`). 95% interval: percentile bootstrap over the samples (2,000 resamples, "
        "seed 0).",
    ])


# --- check by retraining -------------------------------------------------------------------


def _start_job(handle: Handle, key: tuple, query: Query, measurement: str, method: str, fraction: float) -> None:
    with handle.lock:
        if key in handle.retrain_jobs:  # a double click, or another tab started it
            return
        try:
            handle.retrain_jobs[key] = handle.retrain_queue.submit(
                lambda: RetrainJob.start(
                    handle.session, query.input, measurement, method, fraction, handle.cache_root / "retrain"
                )
            )
            st.session_state.pop("retrain_error", None)
        except Exception as e:  # noqa: BLE001 - shown on the page
            st.session_state["retrain_error"] = f"{type(e).__name__}: {e}"


def training_time_note(handle: Handle) -> str:
    """" Training the served model took N min (its train_log.json), and the job trains two such models": how long
    the retraining will take, from the one measurement there is (QA 23b #8: the offer gave no duration, and a job
    took 20-30 min here); empty when the checkpoint has no training log."""
    import json

    try:
        log = json.loads((Path(handle.session.checkpoint) / "train_log.json").read_text())
        seconds, steps = float(log[-1]["elapsed_s"]), int(log[-1]["step"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return ""
    return (f" Training this model took {seconds / 60:.0f} min for {steps:,} steps where it was trained "
            "(its train_log.json); the job trains two such models, one after the other, on a machine shared "
            "with this server.")


def retrain_section(handle: Handle, query: Query | None, s: Settings) -> None:
    st.subheader("Check by retraining")
    st.markdown(
        "Retrain the model without the top p% proponents of one method, and separately without a random p% "
        "(the control), then compare the measured change of the query's measurement with the change the "
        "method predicted (the sum of the removed images' scores)."
    )
    if getattr(handle.args, "no_retrain", False):
        st.info("Retraining is turned off on this server (`--no-retrain`); run "
                "`attribution-engine retrain-top` on your own machine instead.")
        return
    if handle.build.status == "running":
        st.info("Available when the cache build finishes (progress at the top of the page).")
        return
    if query is None:
        st.info("Choose a query first (sidebar).")
        return
    info = handle.session.method_info()
    influence = [n for n in s.methods if info[n]["kind"] == "influence"]
    if not influence:
        st.info(f"Select an influence method ({influence_titles(handle)}) in the sidebar.")
        return
    c1, c2 = st.columns(2)
    method = c1.selectbox("Method", influence, format_func=lambda n: info[n]["title"], key="retrain_method")
    fraction = c2.select_slider(
        "Remove this share of the training set", FRACTIONS, value=0.05, format_func=lambda f: f"{f:.0%}", key="retrain_frac"
    )
    key = (query.key, s.measurement, method, float(fraction))
    if st.session_state.get("retrain_error"):
        st.error(f"Could not start the retraining: {st.session_state['retrain_error']}")
    job = handle.retrain_jobs.get(key)
    retrain_root = handle.cache_root / "retrain"
    if job is None and query.input.image is not None and has_stored_result(
            handle.session, query.input.image, s.measurement, method, float(fraction), retrain_root):
        # a stored result is shown, not offered behind a button (after a server restart the page knows no job);
        # ``start`` returns it without training
        stored = RetrainJob.start(handle.session, query.input, s.measurement, method, float(fraction), retrain_root)
        with handle.lock:
            job = handle.retrain_jobs.setdefault(key, stored)
    if job is None:
        st.button(
            f"Retrain without the top {fraction:.0%} of {info[method]['title']} (and a random {fraction:.0%})",
            key="retrain_start",
            on_click=_start_job,
            args=(handle, key, query, s.measurement, method, float(fraction)),
            type="primary",
        )
        st.caption(
            f"For {query.title.lower()}: trains two models with the full model's recipe (one without the method's "
            "top proponents at its default damping, one without a random set) in the background; you can keep "
            f"exploring.{training_time_note(handle)} The result is stored and shown again for this query."
        )
        kept = earlier_work(handle.session, query.input.image, s.measurement, method, float(fraction),
                            retrain_root) if query.input.image is not None else None
        if kept:
            st.info(kept)
        return
    if not job.done():
        _poll(handle, key)
        return
    _show_result(handle, key, job, info)


@st.fragment(run_every=1.0)
def _poll(handle: Handle, key: tuple) -> None:
    job = handle.retrain_jobs[key]
    if job.done():
        st.rerun(scope="app")
    message, fraction = job.progress()
    st.progress(min(max(float(fraction), 0.0), 1.0), text=f"Retraining: {message}")


def predicted_label(title: str, used: str, measured: str) -> str:
    """The retraining result's predicted-change metric: which measurement's change it predicts, where that is
    not the measured one (D-TRAK's square norm beside the loss's measured change, QA 64 F1)."""
    if used == measured:
        return f"Predicted change ({title})"
    return f"Predicted change of the {short_measurement(used)} ({title}; not the {short_measurement(measured)})"


def _show_result(handle: Handle, key: tuple, job: Any, info: dict) -> None:
    try:
        r = job.result()
    except Exception as e:  # noqa: BLE001
        st.error(f"The retraining job failed: {type(e).__name__}: {e}")
        st.button("Try again", key="retrain_retry", on_click=handle.retrain_jobs.pop, args=(key, None))
        return
    title = info.get(r.get("method"), {}).get("title", r.get("method"))
    frac = float(r.get("fraction", 0.0))
    if job.progress()[0] == CACHED:
        st.caption("The stored result of an earlier retraining of this choice (not trained again).")
    predicted = r.get("predicted_change")
    measured = str(r.get("measurement", ""))
    used = predicted_measurement(handle.session, str(r.get("method")), measured)
    c1, c2, c3 = st.columns(3)
    c1.metric(predicted_label(title, used, measured), "n/a" if predicted is None else f"{float(predicted):+.3e}")
    c2.metric(f"Measured change without its top {frac:.0%}", f"{float(r['measured_change']):+.3e}")
    c3.metric(f"Measured change without a random {frac:.0%}", f"{float(r['random_measured_change']):+.3e}")
    removed = list(r.get("removed", []))
    st.caption(
        f"Measurement `{r.get('measurement', '')}`: full model {_fmt_float(r.get('full_measurement'), '.4f')}, "
        f"without the top images {_fmt_float(r.get('retrained_measurement'), '.4f')}, without random images "
        f"{_fmt_float(r.get('random_measurement'), '.4f')} ({r.get('mc_samples', '?')} common draws; "
        f"{r.get('steps', '?')} training steps per model). A positive change means removing the images "
        f"{removal_effect(measured).positive}; removing true proponents should raise it more than the random "
        "control." + (f" {incomparable_note([(title, used)], measured)}" if predicted is not None else "")
    )
    if removed:
        ds = handle.session.dataset
        shown = removed[:24]
        st.markdown(f"**Removed training images** ({len(removed)}; the first {len(shown)} by score)")
        st.image(
            [display(ds.images[i], 64) for i in shown],
            caption=[f"#{i}" + (f" · {ds.label_name(i)}" if ds.labels is not None else "") for i in shown],
            width=64,  # 48 wrapped a caption such as "#1090 · 3" onto two lines
        )
