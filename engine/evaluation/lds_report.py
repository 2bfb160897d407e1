"""The results of an LDS run: the JSON record (LDS per method with its interval, damping
sweeps, noise report, settings), a plain-text table and a figure.
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..code_version import code_version
from ..files import atomic_write_bytes
from .lds import (
    LDSConfig,
    best_sweep_point,
    noise_report,
    seed_average,
    subset_steps,
    sweep_points,
    targets_digest,
)
from .runs import (
    MeasureSpec,
    cached_measurements,
)
from .setup import RunSetup, load_queries_file


def run_identity(
    setup: RunSetup, masks: np.ndarray, per_seed: np.ndarray, spec: MeasureSpec, source: str
) -> dict[str, Any]:
    """What an LDS figure was scored against: the model, the subsets, the retrained models' measurements
    (``per_seed`` (R, Q, K), NaN where a model is missing), the queries and the true measurement.

    The one "config" block of an LDS run's record and an ablation's (``lds_ablation.run_ablation``), each
    adding its own keys: ``lds_best.check_comparable`` compares these between the two, so they must be
    written by one function (its keys are the shipped records' names), with the code that made them
    (``code_version``; records written before an ablation had it lack the key)."""
    usable = np.all(np.isfinite(seed_average(per_seed)), axis=0)
    return {
        "preset": setup.preset.name,
        "checkpoint": str(setup.checkpoint),
        "num_train": len(setup.dataset),
        "subsets": int(len(masks)),
        "subsets_with_models": int(usable.sum()),
        "seeds": int(per_seed.shape[0]),
        "queries": int(per_seed.shape[1]),
        "query_source": source,
        "targets_digest": targets_digest(masks, per_seed),
        "measurement": spec.measurement,
        "true_measurement_mc_samples": spec.mc_samples,
        "true_measurement_seed": spec.seed,
        "code": code_version(),  # which code made the figures (QA round 21; the ablations' since QA 31b)
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def build_record(
    setup: RunSetup,
    cfg: LDSConfig,
    spec: MeasureSpec,
    source: str,
    session: Any,
    masks: np.ndarray,
    per_seed: np.ndarray,
    table: dict[str, dict[str, Any]],
    info: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The results JSON: {"config", "methods": {name: {"lds", "ci95", "damping", ...}}, "sweeps", "noise"}."""
    measured = seed_average(per_seed)
    methods: dict[str, Any] = {}
    for name, res in table.items():
        if "@" in name:
            continue
        i = info.get(name, {})
        methods[name] = {
            **res,
            "damping": i.get("damping"),
            "kind": i.get("kind"),
            "measurement": i.get("measurement"),
            "removal_prediction": i.get("kind") == "influence",
        }
    swept = dict.fromkeys(name.split("@", 1)[0] for name in table if "@" in name)
    sweeps = {name: sweep_points(table, name) for name in swept}
    for name, pts in sweeps.items():
        best = best_sweep_point(pts)
        if best is not None and name in methods:
            methods[name]["best_damping"] = best["damping"]
            methods[name]["best_lds"] = best["lds"]
    # every sweep point keeps its per-query values (14 dampings x Q floats per method), so that the
    # held-out choice of a best setting (lds_best.held_out_choice) can hold out the damping's choice too;
    # files before 2026-12-06 kept them only at each method's best damping
    full_values = None
    try:
        full_values = cached_measurements(
            setup.checkpoint, *_full_measure_args(setup, spec), cache_dir=setup.out / "full_measurements"
        ).tolist()
    except Exception as e:  # noqa: BLE001 - informative only
        print(f"full-model measurement skipped: {e}")
    identity = run_identity(setup, masks, per_seed, spec, source)
    created = identity.pop("created")
    return {
        "config": {
            **identity,
            "checkpoint_hash": session.checkpoint_hash,
            "fraction": cfg.fraction,
            "subset_seed": cfg.subset_seed,
            "subset_steps": subset_steps(setup.preset.train.steps, cfg.fraction),
            "full_steps": setup.preset.train.steps,
            "attribution": asdict(session.config),
            "quick": setup.quick,
            "created": created,
        },
        "methods": methods,
        "sweeps": sweeps,
        "noise": noise_report(per_seed),
        "measured": {
            "full_model": full_values,
            "subset_mean": np.nanmean(measured, axis=1).tolist(),
            "subset_std": np.nanstd(measured, axis=1).tolist(),
        },
    }


def _full_measure_args(setup: RunSetup, spec: MeasureSpec) -> tuple:
    queries = load_queries_file(setup.out / "queries.pt")["images"]
    return (queries, spec, setup.dataset.levels, setup.device)


def format_table(record: dict[str, Any]) -> str:
    """Plain-text table of the LDS per method."""
    c = record["config"]
    lines = [
        f"LDS  {c['preset']}  measurement={c['measurement']}  K={c['subsets_with_models']} subsets x "
        f"R={c['seeds']} seeds  Q={c['queries']} queries  ({c['true_measurement_mc_samples']} MC draws)",
        f"{'method':<14}{'LDS':>8}   {'95% CI':<18}{'damping':>10}{'best LDS':>10}{'at damping':>12}",
    ]
    agree = (record.get("noise") or {}).get("seed_agreement")
    if agree:
        lines.insert(
            1,
            f"noise ceiling: two seeds agree at Spearman {agree['spearman']:+.3f} "
            f"[{agree['ci95'][0]:+.3f}, {agree['ci95'][1]:+.3f}]; "
            f"ceiling for the {agree['seeds']}-seed average ~{agree['ceiling_seed_average']:.3f}",
        )
    for name, m in record["methods"].items():
        ci = m["ci95"]
        d = "-" if m.get("damping") is None else f"{m['damping']:.0e}"
        bl = "-" if m.get("best_lds") is None else f"{m['best_lds']:+.3f}"
        bd = "-" if m.get("best_damping") is None else f"{m['best_damping']:.0e}"
        flag = "" if m.get("removal_prediction") else "  (similarity, not a removal prediction)"
        lines.append(
            f"{name:<14}{m['lds']:>+8.3f}   [{ci[0]:+.3f}, {ci[1]:+.3f}]  {d:>10}{bl:>10}{bd:>12}{flag}"
        )
    return "\n".join(lines)


def write_figure(record: dict[str, Any], path: Path) -> None:
    """Bar chart of the LDS per method (95% bootstrap intervals) and the damping sweeps (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = record["methods"]
    names = list(ms)
    sweeps = record.get("sweeps") or {}
    fig, axes = plt.subplots(1, 2 if sweeps else 1, figsize=(11 if sweeps else 6, 4), squeeze=False)
    ax = axes[0, 0]
    vals = [ms[n]["lds"] for n in names]
    lo = [ms[n]["lds"] - ms[n]["ci95"][0] for n in names]
    hi = [ms[n]["ci95"][1] - ms[n]["lds"] for n in names]
    colors = ["tab:blue" if ms[n].get("removal_prediction") else "tab:gray" for n in names]
    ax.bar(names, vals, yerr=[lo, hi], color=colors, capsize=4)
    ax.axhline(0, color="black", lw=0.8)
    c = record["config"]
    ax.set_title(f"LDS ({c['measurement']}), {c['preset']}: K={c['subsets_with_models']}, R={c['seeds']}, Q={c['queries']}")
    ax.set_ylabel("signed LDS (Spearman), 95% bootstrap CI")
    ax.tick_params(axis="x", rotation=30)
    if sweeps:
        ax2 = axes[0, 1]
        for name, pts in sweeps.items():
            d = [p["damping"] for p in pts]
            v = [np.nan if p["lds"] is None else p["lds"] for p in pts]
            ax2.plot(d, v, marker="o", label=name)
        ax2.set_xscale("log")
        ax2.axhline(0, color="black", lw=0.8)
        ax2.set_xlabel("damping (scale of G for the mean loss)")
        ax2.set_ylabel("LDS")
        ax2.set_title("damping sweeps")
        ax2.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())  # committed figures: never half a PNG after a kill


