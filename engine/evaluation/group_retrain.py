"""Retraining check for group removal (paper section 4, docs/architecture.md §4 and §7).

For a group R of training images (e.g. every image of one class), first-order influence
predicts that removing R changes a query's measurement by

    predicted(q) = sum_{i in R} tau_i(q)

(the member scores' sum, same sign and 1/N scale as each score).  This module retrains
the model without R with the full model's recipe and number of steps, measures every
gallery query on both models with the same Monte Carlo draws (common random numbers),

    measured(q) = m(theta_{D minus R}, q) - m(theta_D, q)

and reports, per method, the Spearman correlation of predicted against measured over the
queries.  A rank correlation across queries asks: does the method know *which outputs*
depend on the group?

Models are trained with the resumable jobs of ``engine.evaluation.runs.run_training`` into
``out/<group key>/model`` (key: checkpoint hash, the sorted member indices and the steps),
so a stopped run resumes and a finished model is never trained twice.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..attribution.methods.base import Progress, no_progress
from ..code_version import code_version
from ..config import TRUE_MC_SAMPLES, Preset, attribution_settings
from .runs import (  # noqa: F401 - reference_model: the folder rule, also read from here (tests)
    MeasureSpec,
    TrainTask,
    cached_measurements,
    is_finished,
    reference_line,
    reference_model,
    reference_notice,
)
from .stats import spearman


@dataclass(frozen=True)
class GroupRetrainPlan:
    """Where the model trained without one group lives, and how it is trained."""

    spec: str
    members: np.ndarray
    folder: Path  # out/<key>/ : model/, members.json
    steps: int

    @property
    def model(self) -> Path:
        return self.folder / "model"


def group_key(checkpoint_hash: str, members: np.ndarray, steps: int) -> str:
    """Digest of (checkpoint, sorted member indices, steps): the folder name of a group model."""
    idx = np.unique(np.asarray(members, dtype=np.int64))
    payload = json.dumps([checkpoint_hash, idx.tolist(), int(steps)]).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def plan_group(
    spec: str, members: np.ndarray, checkpoint_hash: str, steps: int, out_root: str | Path
) -> GroupRetrainPlan:
    """The plan for one group; writes ``members.json`` beside the model so the folder explains itself."""
    members = np.unique(np.asarray(members, dtype=np.int64))
    folder = Path(out_root) / f"group_{group_key(checkpoint_hash, members, steps)}"
    folder.mkdir(parents=True, exist_ok=True)
    info = folder / "members.json"
    if not info.is_file():
        from ..files import atomic_write_bytes

        record = {"spec": spec, "members": members.tolist(), "steps": int(steps), "checkpoint": checkpoint_hash}
        atomic_write_bytes(info, json.dumps(record).encode())
    return GroupRetrainPlan(spec, members, folder, int(steps))


def training_task(plan: GroupRetrainPlan, preset: Preset) -> TrainTask:
    """The resumable training job of a group plan (the full model's recipe without the members)."""
    return TrainTask(f"without-{plan.spec}", str(plan.model), preset, plan.steps, exclude=plan.members)


def measured_changes(
    plan: GroupRetrainPlan,
    full_checkpoint: str | Path,
    queries: torch.Tensor,
    spec: MeasureSpec,
    levels: int,
    device: torch.device | str = "cpu",
    full_cache_dir: str | Path | None = None,
    progress: Progress = no_progress,
) -> tuple[np.ndarray, np.ndarray]:
    """(full-model measurements, retrained minus full) for every query, same draws for both."""
    if not is_finished(plan.model):
        raise RuntimeError(f"the model without {plan.spec} is not trained yet ({plan.model})")
    full = cached_measurements(Path(full_checkpoint), queries, spec, levels, device, cache_dir=full_cache_dir,
                               progress=lambda i, n: progress(f"measuring the full model: {i}/{n}", 0.5 * i / n))
    retrained = cached_measurements(
        plan.model, queries, spec, levels, device,
        progress=lambda i, n: progress(f"measuring the model without {plan.spec}: {i}/{n}", 0.5 + 0.5 * i / n))
    return full, retrained - full


def compare(predicted: dict[str, np.ndarray], measured: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per method: Spearman of predicted against measured change over queries, and the sign agreement."""
    out: dict[str, dict[str, Any]] = {}
    for name, pred in predicted.items():
        pred = np.asarray(pred, dtype=np.float64)
        out[name] = {
            "spearman": spearman(pred, measured),
            "sign_agreement": float(np.mean(np.sign(pred) == np.sign(measured))),
            "mean_predicted": float(pred.mean()),
        }
    return out


def planned_settings(
    session: Any, group_specs: list[str], methods: list[str], steps: int | None = None,
    mc_samples: int = TRUE_MC_SAMPLES,
) -> dict[str, Any]:
    """The settings a group-retrain record of this run will hold (``run_group_retrain``'s ``config``, its groups
    and methods), known before any training: compared with the record it would replace (``setup.check_results_record``, QA 48
    #1: a run for other groups or steps replaced the shipped record silently)."""
    from ..attribution.groups import parse_group
    from .setup import sorted_names

    return {
        "checkpoint_hash": session.checkpoint_hash,
        "num_train": len(session.dataset),
        "steps": int(steps if steps is not None else session.preset.train.steps),
        "measurement": "loss",
        "true_measurement_mc_samples": int(mc_samples),
        "true_measurement_seed": MeasureSpec().seed,
        "attribution_mc_samples": session.config.mc_samples,
        "attribution": attribution_settings(session.config, len(session.dataset)),
        "groups": sorted_names(parse_group(s, session.dataset).spec for s in group_specs),
        "methods": sorted_names(methods),
    }


def record_settings(record: dict[str, Any]) -> dict[str, Any]:
    """The settings a group-retrain record holds, as ``planned_settings`` names them (its groups and methods from
    its entries when its config lacks them: records before 2026-12-07)."""
    from .setup import sorted_names

    settings = dict(record.get("config") or {})
    entries = record.get("groups") or []
    settings["groups"] = sorted_names(settings.get("groups") or [g.get("spec") for g in entries])
    settings["methods"] = sorted_names(settings.get("methods") or [n for g in entries for n in g.get("comparison") or {}])
    return settings


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def run_group_retrain(
    session: Any,
    group_specs: list[str],
    methods: list[str],
    out_root: str | Path,
    steps: int | None = None,
    workers: int = 1,
    mc_samples: int = TRUE_MC_SAMPLES,
    train: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """Retrain without each group (resumable), measure the gallery on both models, compare with
    each method's predicted change.  Returns the record the CLI writes as JSON.

    Predicted changes use the session's scores of the full model (its caches, default M and
    damping); measured changes use ``mc_samples`` common draws per query (MeasureSpec).
    """
    from ..attribution.group_attribution import group_attribution
    from ..attribution.groups import parse_group
    from ..attribution.pool import gallery_set
    from ..attribution.terminal_progress import terminal_progress
    from .runs import run_training
    from .setup import train_lock

    steps = int(steps if steps is not None else session.preset.train.steps)
    full_steps = int(session.preset.train.steps)
    out_root = Path(out_root)
    groups = [parse_group(s, session.dataset) for s in group_specs]
    # QA 48 #4: --steps other than the full model's compares with a model of the full training set trained as long
    reference = reference_model(out_root, session.checkpoint_hash, steps) if steps != full_steps else None
    if reference is not None:
        import sys

        print(f"notice: {reference_notice(steps, full_steps)} ({reference})", file=sys.stderr, flush=True)

    def plans_of() -> list[GroupRetrainPlan]:  # each writes its group's members.json
        return [plan_group(g.spec, g.members, session.checkpoint_hash, steps, out_root) for g in groups]

    if train:
        out_root.mkdir(parents=True, exist_ok=True)
        # one trainer per folder, as lds and retrain-top (QA 36 #7), taken before the plans write into it (QA 37)
        with train_lock(out_root):
            plans = plans_of()
            tasks = [training_task(p, session.preset) for p in plans]
            if reference is not None:
                tasks.append(TrainTask("full-set-reference", str(reference), session.preset, steps))
            run_training(tasks, workers=workers, device=session.device, log=log)
    else:
        plans = plans_of()
    qset = gallery_set(session)
    images = qset.images.cpu()
    spec = MeasureSpec(measurement="loss", mc_samples=mc_samples)
    record: dict[str, Any] = {
        "config": {
            "preset": session.preset.name,
            "checkpoint_hash": session.checkpoint_hash,
            "num_train": len(session.dataset),
            "steps": steps,
            "full_steps": full_steps,
            **({"reference_steps": steps, "reference_model": str(reference)} if reference is not None else {}),
            "measurement": "loss",
            "true_measurement_mc_samples": mc_samples,
            "true_measurement_seed": spec.seed,
            "attribution_mc_samples": session.config.mc_samples,
            # every setting the predictions depend on, as retrain-top's and the LDS's records give them (QA round
            # 21: this record kept only M and the dampings), and the code that made them
            "attribution": attribution_settings(session.config, len(session.dataset)),
            "code": code_version(),
            "groups": [g.spec for g in groups],
            "methods": list(methods),
            "queries": qset.names,
            "query_labels": qset.labels.tolist(),
            "created": timestamp(),
        },
        "groups": [],
    }
    ready = []
    for g, p in zip(groups, plans, strict=True):
        if reference is not None and not is_finished(reference):
            log(f"{g.spec}: the full-set reference model of {steps:,} steps is not trained yet ({reference}); skipped")
        elif is_finished(p.model):
            ready.append((g, p))
        else:
            log(f"{g.spec}: the model without it is not trained yet ({p.model}); skipped")
    with terminal_progress("scoring and measuring the groups") as bar:  # half a minute or more, after the training
        for i, (g, p) in enumerate(ready):
            def step(message: str, fraction: float, i: int = i, spec: str = g.spec) -> None:
                bar(f"{spec}: {message}", (i + fraction) / len(ready))

            result = group_attribution(session, g, qset, "loss", methods,
                                       progress=lambda m, f, step=step: step(m, 0.4 * f))
            predicted = {n: result.changes(n) for n in result.ok()}
            full, measured = measured_changes(
                p, reference if reference is not None else session.checkpoint, images, spec, session.dataset.levels,
                session.device, full_cache_dir=None if reference is not None else out_root / "full_measurements",
                progress=lambda m, f, step=step: step(m, 0.4 + 0.6 * f),
            )
            record["groups"].append(_group_entry(g, p, result, predicted, full, measured))
    return record


def _group_entry(g: Any, p: GroupRetrainPlan, result: Any, predicted: dict[str, np.ndarray], full: np.ndarray,
                 measured: np.ndarray) -> dict[str, Any]:
    """One group's part of the record."""
    return {
        "spec": g.spec,
        "size": g.size,
        "model": str(p.model),
        "full_measurement": full.tolist(),
        "measured_change": measured.tolist(),
        "predicted_change": {n: v.tolist() for n, v in predicted.items()},
        "damping": {n: result.methods[n].damping for n in result.ok()},
        "comparison": compare(predicted, measured),
    }


def format_group_retrain(record: dict[str, Any]) -> str:
    """Spearman of predicted vs measured change over the queries, per group and method."""
    c = record["config"]
    lines = [f"retraining without each group ({c['steps']} steps), "
             f"{len(c['queries'])} gallery queries, measurement loss"]
    if reference_line(c):
        lines.append(reference_line(c))
    for g in record["groups"]:
        lines.append(f"{g['spec']} ({g['size']} images): mean measured change {np.mean(g['measured_change']):+.5f}")
        for n, c in g["comparison"].items():
            lines.append(f"  {n:<6} Spearman {c['spearman']:+.3f}  sign agreement {c['sign_agreement']:.2f}  "
                         f"mean predicted {c['mean_predicted']:+.5f}")
    return "\n".join(lines)


__all__ = [
    "run_group_retrain",
    "format_group_retrain",
    "GroupRetrainPlan",
    "group_key",
    "plan_group",
    "training_task",
    "measured_changes",
    "compare",
]
