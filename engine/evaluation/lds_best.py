"""Every method at its best settings: the LDS run's results and its ablations' variants, side by side.

Why: the paper (sec. 4, app. D) compares each method at its best damping from a sweep, and issue 13
asks for the baselines' best shot (TRAK at the paper's projection k = 32,768, more Monte Carlo draws).
Those settings live in different result files (the run's ``lds_<preset>_<measurement>.json`` and its
``lds_<preset>_ablation_<name>.json``), all scored against the same retrained subset models and
queries, so their LDS values are comparable.  This picks, per method, the setting (variant and
damping) with the highest LDS,

    best(m) = argmax over (variant, lambda) of LDS_m(variant, lambda),

LDS = mean over queries of Spearman(predicted, measured) over subsets (paper eq. 13), and says
whether K-FAC's 95% interval (bootstrap over queries) is clear of each baseline's, with the paired
difference (same queries) beside it.  The choice is made on the queries it is reported on, which is
optimistic, and more so for a method with more candidate settings (the paper reports the best of a
sweep the same way).  So each method is also scored with its choice made on other queries
(``held_out_choice``): the setting is picked on the even-numbered queries and scored on the odd ones,
then the other way round, and the two halves' means are averaged,

    LDS_cv(m) = 1/2 [ mean_{q odd} LDS_q(argmax_{s} mean_{q' even} LDS_q'(s)) + (even <-> odd) ].

The candidates s are every (variant, damping) whose per-query values the files keep.  Files written
since 2026-12-06 keep them at every damping of every sweep, so the split chooses the damping too and
the result carries no selection optimism.  Older files keep them only at each sweep's default and best
damping, and that best was chosen on every query, so a "best of sweep" candidate still carries its
damping's choice: the bias favours a method whose winner is such a point (on digits TRAK's and
D-TRAK's, at sharp peaks of their sweeps) over one that wins at its default damping (K-FAC).

    python scripts/lds_best_settings.py [--results assets/results] [--preset digits] [--measurement loss]

writes ``best_settings`` into the run's results file and prints a table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..code_version import code_version
from ..files import save_json
from .lds_ablation import ablation_file_name, paired_difference
from .lds_run import results_stem

# what must agree between the run and an ablation for their LDS values to be comparable
SAME = (
    "preset",
    "num_train",
    "subsets",
    "subsets_with_models",
    "seeds",
    "queries",
    "measurement",
    "true_measurement_mc_samples",
    "true_measurement_seed",
)


class IncomparableResultsError(ValueError):
    """An ablation file was scored against other subsets, seeds or queries than the run's results."""


def _point(
    source: str, settings: dict[str, Any], entry: dict[str, Any], damping: float | None
) -> dict | None:
    if entry.get("lds") is None or not np.isfinite(entry["lds"]) or entry.get("per_query") is None:
        return None
    return {
        "source": source,
        "settings": settings,
        "damping": damping,
        "lds": float(entry["lds"]),
        "ci95": [float(x) for x in entry["ci95"]],
        "per_query": entry["per_query"],
    }


def variant_settings(run: dict[str, Any], variant: dict[str, Any]) -> dict[str, Any]:
    """An ablation variant's settings as they differ from the run's: its ``changes``, and every attribution
    setting (dampings aside) where the settings it was scored with differ from the run's although it did not
    change them (an ablation made for another run, or when the defaults were others).  Why: QA 32, lds-best on
    the M = 8 run chose an ablation variant scored at M = 64 and described it by its changes alone, which do not
    name M."""
    out = dict(variant.get("changes") or {})
    mine, theirs = run.get("config", {}).get("attribution") or {}, variant.get("attribution") or {}
    for k, v in theirs.items():
        if k not in out and k in mine and mine[k] != v and not k.endswith("damping"):
            out[k] = v
    return out


def candidates(
    run: dict[str, Any], ablations: list[dict[str, Any]], skipped: list[str] | None = None,
    mc_samples: int | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Every (method, setting) with per-query LDS values: the run's and each ablation variant's default
    damping and the dampings of their sweeps (all of them in files since 2026-12-06; before, the best
    only).  A setting with an LDS but
    no per-query values (files written before those were kept) cannot enter a paired comparison: its
    description is appended to ``skipped``.  ``mc_samples``: only settings scored with that many draws (an
    ``--attribution-mc`` run: the question it answers is the methods at its M; a variant at another M is
    appended to ``skipped``)."""
    out: dict[str, list[dict[str, Any]]] = {}

    def keep(m: str, pt: dict | None, entry: dict[str, Any], source: str, report: bool = True) -> None:
        if pt is not None:
            out.setdefault(m, []).append(pt)
        elif report and skipped is not None and entry.get("lds") is not None and entry.get("per_query") is None:
            skipped.append(f"{m} ({source}, LDS {float(entry['lds']):.3f}): no per-query values")

    for m, res in run["methods"].items():
        out.setdefault(m, [])
        keep(m, _point("run", {}, res, res.get("damping")), res, "run")
        # files before 2026-12-06 keep per-query values only at each sweep's best damping, so the other
        # sweep points are not reported as missing; newer ones keep them at every damping
        for p in run.get("sweeps", {}).get(m, []):
            keep(m, _point("run", {}, p, p["damping"]), p, f"run, damping {p.get('damping')}", report=False)
    for rec in ablations:
        check_comparable(run["config"], rec["config"], rec["ablation"])
        for label, var in rec["variants"].items():
            source = f"ablation {rec['ablation']}: {label}"
            settings = variant_settings(run, var)
            if mc_samples is not None:
                m_var = (var.get("attribution") or {}).get("mc_samples", settings.get("mc_samples"))
                if m_var != mc_samples:
                    if skipped is not None:
                        skipped.append(f"{source}: scored with M = {m_var if m_var is not None else 'unrecorded'} "
                                       f"draws, not this run's {mc_samples}")
                    continue
            for m, res in var["methods"].items():
                keep(m, _point(source, settings, res, res.get("damping")), res, source)
                sweep = [p for p in res.get("sweep", []) if p.get("per_query") is not None]
                for p in sweep:  # every damping of the variant's sweep (files since 2026-12-06)
                    keep(m, _point(source, settings, p, p["damping"]), p, f"{source}, damping {p['damping']}")
                if res.get("best") and not sweep:  # older files: the best damping only
                    best = res["best"]
                    keep(m, _point(source, settings, best, best["damping"]), best, f"{source}, best damping")
    return out


def held_out_choice(points: list[dict[str, Any]]) -> float | None:
    """LDS_cv (module docstring): the setting chosen on one half of the queries, scored on the other."""
    if not points:
        return None
    per = np.asarray([p["per_query"] for p in points], dtype=float)  # (settings, queries)
    if per.shape[1] < 2:
        return None
    halves = (np.arange(per.shape[1]) % 2 == 0, np.arange(per.shape[1]) % 2 == 1)
    scores = []
    for pick, score in (halves, halves[::-1]):
        chosen = int(np.argmax(np.nanmean(per[:, pick], axis=1)))
        scores.append(float(np.nanmean(per[chosen, score])))
    return float(np.mean(scores))


def interval_position(ref: list[float], other: list[float]) -> str:
    """Where the reference's 95% interval lies against another's: "above", "below" or "overlap"."""
    if ref[0] > other[1]:
        return "above"
    if ref[1] < other[0]:
        return "below"
    return "overlap"


def check_comparable(run_config: dict[str, Any], config: dict[str, Any], name: str) -> None:
    """Refuse an ablation that was not scored against the run's subsets, seeds and queries."""
    diff = {k: (run_config.get(k), config.get(k)) for k in SAME if run_config.get(k) != config.get(k)}
    # records written since targets_digest exists also say exactly what they were scored against
    mine, theirs = run_config.get("targets_digest"), config.get("targets_digest")
    if mine is not None and theirs is not None and mine != theirs:
        diff["targets_digest"] = (mine, theirs)
    source = str(config.get("query_source", ""))
    if not source.startswith(str(run_config.get("query_source", ""))):
        diff["query_source"] = (run_config.get("query_source"), source)
    if diff:
        raise IncomparableResultsError(
            f"ablation {name} was scored on other subsets, seeds or queries than the run: "
            + ", ".join(f"{k} run={a!r} ablation={b!r}" for k, (a, b) in diff.items())
            + "; rerun scripts/lds_ablation.py with the run's --seeds and --queries"
        )


def sweeps_keep_every_damping(run: dict[str, Any], ablations: list[dict[str, Any]]) -> bool:
    """Whether every sweep point of the run and its ablations keeps per-query values, so that
    ``held_out_choice`` holds out the choice of damping as well as of the variant."""
    points = [p for pts in run.get("sweeps", {}).values() for p in pts]
    for rec in ablations:
        for var in rec["variants"].values():
            points += [p for res in var["methods"].values() for p in res.get("sweep", [])]
    return all(p.get("per_query") is not None for p in points if p.get("lds") is not None)


def best_settings(
    run: dict[str, Any], ablations: list[dict[str, Any]], reference: str = "kfac", mc_samples: int | None = None
) -> dict[str, Any]:
    """Per method its best point; for every other method whether ``reference``'s interval is clear of it
    (``mc_samples``: among the settings scored with that many draws only, ``candidates``)."""
    skipped: list[str] = []
    pool = candidates(run, ablations, skipped, mc_samples)
    best = {m: max(pts, key=lambda p: p["lds"]) for m, pts in pool.items() if pts}
    every_damping = sweeps_keep_every_damping(run, ablations)
    out: dict[str, Any] = {
        "methods": {},
        "reference": reference,
        "note": "best LDS over each method's settings (run defaults and ablation variants) "
        "and the damping sweep, chosen on the same queries (optimistic, more so with more candidates); "
        "held_out_choice: the setting chosen on half the queries and scored on the other half, averaged "
        "over the two ways"
        + (" (no selection optimism: the candidates are every variant at every damping)" if every_damping else
           " (no optimism from choosing among the candidates; a best-of-sweep candidate's damping was still "
           "chosen on every query, as the files keep per-query values only at each sweep's best damping)"),
        "damping_held_out": every_damping,
        "skipped": skipped,
        "code": code_version(),  # which code chose them (the files it chose from name theirs, when they do)
    }
    ref = best.get(reference)
    for m, p in sorted(best.items(), key=lambda kv: -kv[1]["lds"]):
        entry = {k: p[k] for k in ("lds", "ci95", "source", "settings", "damping")}
        entry["candidates"] = len(pool[m])
        entry["held_out_choice"] = held_out_choice(pool[m])
        if ref is not None and m != reference:
            position = interval_position(ref["ci95"], p["ci95"])
            entry[f"{reference}_interval_vs_this"] = position
            entry[f"{reference}_interval_clear"] = position == "above"  # kept for readers of older records
            entry[f"{reference}_minus_this"] = paired_difference(ref["per_query"], p["per_query"], m)
        out["methods"][m] = entry
    return out


def own_fields(method: str) -> tuple[str, ...]:
    """The settings a method declares it reads (its ``config_fields``: K-FAC's factor draws, TRAK's k, a new
    method's own; QA 70 F3: every method but K-FAC was shown TRAK's k); ``method`` may name a measurement
    (``kfac[loss]``); () for a name this installation does not have or cannot import."""
    from ..attribution.methods import METHODS

    try:
        return tuple(METHODS[method.split("[")[0]].config_fields)
    except (KeyError, ImportError):
        return ()


def table(summary: dict[str, Any]) -> str:
    ref = summary["reference"]
    lines = [f"{'method':8s} {'LDS':>6s}  95% interval      {'held-out':>8s}  {ref} - this (paired)       setting"]
    for m, e in summary["methods"].items():
        diff = e.get(f"{ref}_minus_this")
        d = (
            ""
            if diff is None
            else f"{diff['difference']:+.3f} [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}]"
        )
        position = e.get(f"{ref}_interval_vs_this")
        clear = "" if diff is None else {"above": " clear", "below": " below"}.get(position, " overlap")
        cv = e.get("held_out_choice")
        cv_text = "" if cv is None else f"{cv:.3f}"
        shown = ("mc_samples", "draws", *own_fields(m))
        setting = ", ".join(f"{k}={v}" for k, v in e["settings"].items() if k in shown)
        lam = "" if e["damping"] is None else f"damping {e['damping']:.3g}"
        tail = " ".join(x for x in (lam, setting) if x)  # nothing for a setting without damping (pixel: "run")
        lines.append(
            f"{m:8s} {e['lds']:6.3f}  [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]  {cv_text:>8s}  {d:28s}{clear:8s} "
            f"{e['source']}" + (f"; {tail}" if tail else "")
        )
    return "\n".join(lines)


def update_best_settings(
    results: Path, preset: str = "digits", measurement: str = "loss", ablations: list[str] | None = None,
    write: bool = True, attribution_mc: int | None = None,
) -> tuple[Path, dict[str, Any], list[str]]:
    """Write ``best_settings`` into ``<results>/lds_<preset>_<measurement>.json`` from the run and its ablations
    (``attribution_mc``: into the ``--attribution-mc`` variant run's ``..._attribution_m<M>.json``; the file's
    name is ``lds_run.results_stem``'s, as the run wrote it).

    ``ablations``: their names (default: every ``lds_<preset>_ablation_*.json`` there).  An ablation of
    another measurement is left out; one on other seeds, queries or subsets is skipped with the reason
    (its LDS is not comparable).  Returns (the file, the summary, the skip notes); FileNotFoundError
    when the run or a named ablation has no results.  ``write=False``: the same summary, the file left as it is
    (``lds-best --dry-run``: a subset of the ablations would otherwise overwrite the shipped best settings)."""
    folder = Path(results)
    path = folder / f"{results_stem(preset, measurement, attribution_mc)}.json"
    if not path.is_file():
        runs = sorted(f.name for f in folder.glob("lds_*.json") if "_ablation_" not in f.name)
        there = f"; LDS results there: {', '.join(runs)}" if runs else f"; {folder} holds no LDS results"
        command = "attribution-engine lds" + ("" if attribution_mc is None else f" --attribution-mc {attribution_mc}")
        raise FileNotFoundError(f"no LDS results at {path} (run `{command}` first){there}")
    run = json.loads(path.read_text())
    if ablations:
        files = [folder / ablation_file_name(preset, a.strip()) for a in ablations]
    else:
        files = sorted(folder.glob(ablation_file_name(preset, "*")))
    records, notes = [], []
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"no ablation results at {f}")
        rec = json.loads(f.read_text())
        if rec["config"].get("measurement") != run["config"]["measurement"]:
            continue
        try:
            check_comparable(run["config"], rec["config"], rec["ablation"])
        except IncomparableResultsError as e:
            notes.append(f"skipped {f.name}: {e}")
            continue
        records.append(rec)
    # an --attribution-mc run answers how the methods compare at its M: other M's variants are not its settings
    same_m = None if attribution_mc is None else int((run["config"].get("attribution") or {}).get("mc_samples",
                                                                                                 attribution_mc))
    summary = best_settings(run, records, mc_samples=same_m)
    summary["ablation_files"] = [ablation_file_name(preset, r["ablation"]) for r in records]
    if write:
        run["best_settings"] = summary
        save_json(path, run)
    return path, summary, notes
