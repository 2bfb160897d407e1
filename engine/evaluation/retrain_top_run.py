"""One retrain-top run (``attribution-engine retrain-top``): for every query and method, the
removal set, every model in one worker pool, the measured changes, the results file.

One job is ``engine.evaluation.retrain_top.RetrainJob`` (the app runs single jobs too).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..code_version import code_version
from ..config import TRUE_MC_SAMPLES
from ..files import save_json
from ..validation import InvalidSettingError
from .retrain_top import CONTROL_SEED, RetrainJob, attribution_settings, plan, removal_count
from .runs import (
    TrainTask,
    is_finished,
    reference_line,
    reference_notice,
    run_training,
)
from .setup import (
    RunSetup,
    check_image_measurement,
    check_results_record,
    check_writable_folder,
    sorted_names,
    train_lock,
)


@dataclass(frozen=True)
class RetrainTopConfig:
    """One ``retrain-top`` run: queries x methods, each removing the top ``fraction`` of N."""

    queries: tuple[str, ...]  # query specs, e.g. ("gallery:0", "gallery:1")
    methods: tuple[str, ...] | None = None  # None: every method available here
    fraction: float = 0.02
    measurement: str = "loss"
    mc_samples: int = TRUE_MC_SAMPLES  # draws per true measurement
    workers: int = 1
    steps: int | None = None  # None: the full model's
    cache_root: str | Path | None = None
    train: bool = True  # False: measure only; every model must be finished already (a run still training)
    replace_results: bool = False  # --replace-results: a results record of other settings may be replaced


def results_path(setup: RunSetup) -> Path:
    """The results file of a retrain-top run: ``<results>/retrain_top_<preset>.json``."""
    return setup.results / f"retrain_top_{setup.preset.name}.json"


def planned_settings(setup: RunSetup, cfg: RetrainTopConfig, session: Any, methods: list[str]) -> dict[str, Any]:
    """The settings this run's record will hold (``config`` and the (query, method) pairs of its results), known
    before any training: compared with the record it would replace (``setup.check_results_record``, QA 48 #1)."""
    n = len(setup.dataset)
    return {
        "checkpoint_hash": session.checkpoint_hash,
        "num_train": n,
        "fraction": float(cfg.fraction),
        "removed": removal_count(n, cfg.fraction),
        "measurement": cfg.measurement,
        "true_measurement_mc_samples": int(cfg.mc_samples),
        "steps": int(cfg.steps or setup.preset.train.steps),
        "attribution": attribution_settings(session),
        "queries": sorted_names(cfg.queries),
        "methods": sorted_names(methods),
    }


def record_settings(record: dict[str, Any]) -> dict[str, Any]:
    """The settings a retrain-top record holds, as ``planned_settings`` names them (queries and methods from its
    results when its config lacks them: records before 2026-12-07)."""
    settings = dict(record.get("config") or {})
    results = record.get("results") or []
    settings["queries"] = sorted_names(settings.get("queries") or [r.get("query") for r in results])
    settings["methods"] = sorted_names(settings.get("methods") or [r.get("method") for r in results])
    return settings


def usable_methods(session: Any, asked: tuple[str, ...] | None) -> list[str]:
    """The methods asked for (default: every one available here), without those that cannot score here (CLIP
    without its weights), each said in one warning line as ``lds`` does; ``InvalidSettingError`` when none is
    left.  Why: ``--methods clip`` without the weights ended in a traceback (QA 48 #6)."""
    if not asked:
        return [n for n in session.method_names() if session.available(n)[0]]
    names = [str(n).strip().lower() for n in asked]
    for n in names:
        session.method(n)  # ValueError naming an unknown method
    left = []
    for n in names:
        ok, reason = session.available(n)
        if ok:
            left.append(n)
        else:
            print(f"warning: {n}: unavailable: {reason}; left out", file=sys.stderr, flush=True)
    if not left:
        raise InvalidSettingError(f"--methods {','.join(names)}: no method can score here (see the warning above)")
    return left


def run_retrain_top(setup: RunSetup, cfg: RetrainTopConfig) -> int:
    """Score, train all needed models (workers), measure, write ``retrain_top_<preset>.json``."""
    from ..attribution.session import AttributionSession

    if not cfg.queries:  # QA 48 #2: an empty list wrote an empty record over the results
        raise InvalidSettingError("--query names no query")
    # QA 48 #3: refused before any training, as lds refuses it (it trained every model, then failed)
    check_image_measurement(cfg.measurement, setup.preset.diffusion.num_timesteps,
                            "retrain-top's queries (the retrained models are measured on the image alone)")
    check_writable_folder(setup.out, "--out")  # QA 48 #7: named, before the session and the training
    check_writable_folder(setup.results, "--results")
    session = AttributionSession(
        preset=setup.preset,
        checkpoint=setup.checkpoint,
        device=setup.device,
        cache_root=cfg.cache_root,
        dataset=setup.dataset,
        auto_build=True,
    )
    specs = list(cfg.queries)
    methods = usable_methods(session, cfg.methods)
    parsed = []
    for spec in specs:
        q = session.parse_query(spec)
        q.description = q.description or spec
        parsed.append((spec, q))
    # QA 48 #1: a record of other settings (another --query, --fraction, --steps, ...) is not replaced silently
    check_results_record(results_path(setup), planned_settings(setup, cfg, session, methods), record_settings,
                         cfg.replace_results)
    steps = int(cfg.steps or setup.preset.train.steps)
    full_steps = int(setup.preset.train.steps)
    if steps != full_steps:  # QA 48 #4
        print(f"notice: {reference_notice(steps, full_steps)}", file=sys.stderr, flush=True)
    jobs: list[tuple[str, RetrainJob]] = []
    for spec, q in parsed:
        for method in methods:
            p = plan(
                session,
                q.image,
                cfg.measurement,
                method,
                cfg.fraction,
                setup.out,
                cfg.mc_samples,
                cfg.steps,
                same_steps_reference=True,
            )
            jobs.append((spec, RetrainJob(session, q, cfg.measurement, method, cfg.fraction, p)))
    # 1) removal sets (scores), 2) every model in one worker pool, 3) measurements
    tasks: dict[str, TrainTask] = {}
    for _spec, job in jobs:
        if job.plan.result_file.is_file():
            continue
        for t in job.training_tasks():
            tasks.setdefault(t.out, t)
    if not cfg.train:
        # measure-only: the models of these queries may be trained by another, still running, process;
        # training here would race with it
        missing = [str(t.out) for t in tasks.values() if not is_finished(t.out)]
        if missing:
            raise ValueError(
                f"--no-train: {len(missing)} model(s) of these queries are not finished yet: "
                + ", ".join(missing)
            )
    else:
        # finish the tasks in order: every method's model for query 1 first, then query 2, ...
        setup.out.mkdir(parents=True, exist_ok=True)
        # one trainer per --out, as lds: a second run is refused here in one line, before its plan and bar (QA 36 #7:
        # it started, then stopped on a model folder's own lock, naming an internal sub-folder)
        with train_lock(setup.out):
            run_training(
                list(tasks.values()), workers=cfg.workers, device=setup.device, log=lambda s: print(s, flush=True)
            )
    results = []
    for spec, job in jobs:
        cached = job.plan.result_file
        if cached.is_file():
            r = json.loads(cached.read_text())
        else:
            removed, scores, kind = job.removal()
            r = job.measure(removed, scores, kind)
        r["query"] = spec
        results.append(r)
    record = {
        "config": {
            "preset": setup.preset.name,
            "checkpoint": str(setup.checkpoint),
            "checkpoint_hash": session.checkpoint_hash,
            "num_train": len(setup.dataset),
            "fraction": cfg.fraction,
            "removed": removal_count(len(setup.dataset), cfg.fraction),
            "measurement": cfg.measurement,
            "true_measurement_mc_samples": cfg.mc_samples,
            "steps": steps,
            "full_steps": full_steps,
            **({"reference_steps": steps} if steps != full_steps else {}),
            "queries": list(specs),
            "methods": list(methods),
            "control": f"one random removal of the same size (seed {CONTROL_SEED}), shared by all queries",
            "attribution": attribution_settings(session),
            "code": code_version(),  # which code made the figures (QA round 21)
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "results": results,
        "summary": summarize(results),
    }
    setup.results.mkdir(parents=True, exist_ok=True)
    path = results_path(setup)
    save_json(path, record)
    print(format_retrain_table(record))
    print(f"wrote {path}")
    return 0


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean measured change per method (and of the random control) over queries."""
    out: dict[str, dict[str, float]] = {}
    by: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault(r["method"], []).append(r)
    for m, rs in by.items():
        out[m] = {
            "queries": len(rs),
            "mean_measured_change": float(np.mean([r["measured_change"] for r in rs])),
            "mean_random_change": float(np.mean([r["random_measured_change"] for r in rs])),
        }
        preds = [r["predicted_change"] for r in rs if r.get("predicted_change") is not None]
        if preds:
            out[m]["mean_predicted_change"] = float(np.mean(preds))
    return out


def share_words(fraction: float) -> str:
    """A fraction as a percentage with the digits it needs: 0.02 -> "2%", 0.0001 -> "0.01%" (QA 48 #8: "0.0%")."""
    pct = 100.0 * float(fraction)
    for digits in range(1, 6):  # the fewest that show it within 0.5%
        if abs(round(pct, digits) - pct) <= 0.005 * pct:
            break
    return f"{pct:.{digits}f}".rstrip("0").rstrip(".") + "%"


def format_retrain_table(record: dict[str, Any]) -> str:
    c = record["config"]
    lines = [
        f"retraining without top {share_words(c['fraction'])} ({c['removed']} image{'s' if c['removed'] != 1 else ''}), "
        f"measurement={c['measurement']}",
        f"{'query':<12}{'method':<10}{'predicted':>11}{'measured':>11}{'random':>11}",
    ]
    if reference_line(c):
        lines.insert(1, reference_line(c))
    for r in record["results"]:
        p = "-" if r.get("predicted_change") is None else f"{r['predicted_change']:+.5f}"
        lines.append(
            f"{r['query']:<12}{r['method']:<10}{p:>11}{r['measured_change']:>+11.5f}{r['random_measured_change']:>+11.5f}"
        )
    return "\n".join(lines)


