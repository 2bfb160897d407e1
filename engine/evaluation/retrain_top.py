"""Retraining without top influences (paper section 4, App. G.6; docs/architecture.md §7).

For a query x_q and a method, remove the top p% proponents (largest scores: removing them
should raise the loss-like measurement the most), retrain with the full model's recipe and
the same number of steps, and report

    measured_change = m(theta_{D minus top}, x_q) - m(theta_D, x_q)

with the same Monte Carlo draws for both models (common random numbers).  A random
removal of the same size is the control (one random set per (fraction, seed), shared by
every query and method, so it is trained once).  For influence methods the predicted
change is the sum of the removed examples' scores (docs/architecture.md §4: a group's effect is the
sum of its members').

A job's folder is keyed by what chose its removal and trained its model: (checkpoint hash, query
digest, measurement, method, fraction, steps, the attribution settings that chose the removal). A
repeated request returns the stored result without training, and one made with another damping, M or
query draws retrains. The true measurement's draws (``mc_samples``, its seed) only measure the models,
so they name the result file inside the folder (``RetrainPlan.result_file``): another ``--mc-samples``
measures the same models again instead of retraining them (QA 15).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import jsonio
from ..config import TRUE_MC_SAMPLES, attribution_key
from ..files import atomic_write_bytes, save_npz
from ..npy_read import load_npz
from .job_clock import JobClock, minutes
from .runs import (
    MeasureSpec,
    TrainTask,
    cached_measurements,
    is_finished,
    reference_model,
)

CONTROL_SEED = 0
CACHED = "cached result"  # the progress message of a job whose result was stored (``RetrainJob.start``)
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()
_monotonic = time.monotonic  # the job clock's time source (a test replaces it)


def _folder_lock(folder: str | Path) -> threading.Lock:
    """One lock per model folder, so two background jobs never train the same model at once."""
    key = str(Path(folder).resolve())
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.Lock())


def top_proponents(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` largest scores (ties broken by index), sorted by rank."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(len(scores)), -scores))
    return order[:count].astype(np.int64)


def removal_count(n: int, fraction: float) -> int:
    """round(fraction * n), at least 1 and at most n - 1."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    return int(min(n - 1, max(1, round(fraction * n))))


def random_control(n: int, count: int, seed: int = CONTROL_SEED) -> np.ndarray:
    """A seeded random set of ``count`` training indices (the control removal)."""
    rng = np.random.default_rng([seed, n, count])
    return np.sort(rng.choice(n, size=count, replace=False)).astype(np.int64)


def query_digest(image: torch.Tensor) -> str:
    """16 hex digits of the query image's float32 values: the query's part of a retraining's removal key
    (``plan``), so that the same image, wherever it came from (gallery, upload, a seed), finds its retraining and
    another image never does."""
    return hashlib.sha256(np.ascontiguousarray(image.detach().cpu().float().numpy()).tobytes()).hexdigest()[
        :16
    ]


def attribution_settings(session: Any) -> dict[str, Any]:
    """The session's attribution settings as a cache key (``engine.config.attribution_key``: dampings
    resolved for its N, fields at their pre-option value left out).  Why: the removal is the method's
    top proponents under these settings, so a result computed with another damping, M or query draws
    is another experiment and must neither be reused nor shown as this one."""
    return attribution_key(session.config, len(session.dataset))


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class RetrainPlan:
    """Folders and settings of one (query, method) retraining and its control."""

    key: str
    folder: Path  # out_root/<key>/: removed.npz, model/, one result file per true-measurement setting
    control_folder: Path  # out_root/control_<key>/model
    steps: int
    spec: MeasureSpec
    # --steps other than the full model's: a model trained on the full training set for ``steps`` (same recipe and
    # seed), out_root/reference_<key>/model, which the changes are measured against (QA 48 #4); None: the full model
    reference: Path | None = None

    @property
    def result_file(self) -> Path:
        """This job's result for its true-measurement draws; other draws keep their own file beside it (and a
        result measured against a same-steps reference its own name: one measured against the full model, by
        the code before QA 48, is not taken for it)."""
        name = result_file_name(self.spec)
        return self.folder / (name.replace(".json", "_reference.json") if self.reference is not None else name)


def result_file_name(spec: MeasureSpec) -> str:
    """The file in a retraining's folder that holds its result for the true measurement's draws (M and seed):
    the same retrained model measured with other draws keeps its own file beside it
    (``RetrainPlan.result_file``)."""
    return f"result_mc{spec.mc_samples}_seed{spec.seed}.json"


def plan(
    session: Any,
    query_image: torch.Tensor,
    measurement: str,
    method: str,
    fraction: float,
    out_root: Path,
    mc_samples: int = TRUE_MC_SAMPLES,
    steps: int | None = None,
    same_steps_reference: bool = False,
) -> RetrainPlan:
    """The folders and settings of one (query, method) retraining under ``out_root``.

    ``same_steps_reference`` (the ``retrain-top`` command's runs): with ``steps`` other than the full model's, a model
    of the full training set trained for ``steps`` (same recipe and seed) is the baseline of the changes (QA 48 #4);
    without it (the app's jobs, which train the full model's steps) the full model is.

    A folder of the older key (with the measurement draws in it) is moved to the new one first."""
    steps = int(steps if steps is not None else session.preset.train.steps)
    spec = MeasureSpec(measurement=measurement, mc_samples=mc_samples)
    n = len(session.dataset)
    removal = (session.checkpoint_hash, query_digest(query_image), measurement, method, fraction, steps)
    settings = attribution_settings(session)
    key = _key(*removal, settings)
    ckey = _key(session.checkpoint_hash, "control", n, removal_count(n, fraction), CONTROL_SEED, steps)
    root = Path(out_root)
    reference = None
    if same_steps_reference and steps != int(session.preset.train.steps):  # QA 48 #4: a 600-step model against the 6,000-step one
        reference = reference_model(root, session.checkpoint_hash, steps)
    p = RetrainPlan(key, root / key, root / f"control_{ckey}" / "model", steps, spec, reference)
    _adopt_legacy_folder(p, root / _key(*removal, mc_samples, spec.seed, settings))
    return p


def _adopt_legacy_folder(p: RetrainPlan, legacy: Path) -> None:
    """Move a folder of the key used until the evening of 2026-12-05, which also held the true
    measurement's draws, to this plan's folder: a run started before then resumes with its removal and
    models instead of training them again. Its ``result.json`` was measured with exactly these draws
    (they were in its key), so it becomes this plan's result file. Only the folder of the draws asked first is
    moved; an older folder of other draws stays where it is (its models are trained again if asked for). A
    process of the older code still training in that folder must be stopped first: the folder moves under it."""
    if p.folder.exists() or not legacy.is_dir():
        return
    try:
        os.replace(legacy, p.folder)
    except OSError:  # another process adopted it, or started the new folder, first
        return
    old_result = p.folder / "result.json"
    if old_result.is_file():
        os.replace(old_result, p.result_file)


def has_stored_result(
    session: Any, query_image: torch.Tensor, measurement: str, method: str, fraction: float, out_root: str | Path,
    mc_samples: int = TRUE_MC_SAMPLES,
) -> bool:
    """Whether this retraining has a stored result (``RetrainJob.start`` then returns it without training): the
    page shows it at once after a server restart instead of offering a button that would (QA 25 #12)."""
    return plan(session, query_image, measurement, method, fraction, Path(out_root), mc_samples).result_file.is_file()


def earlier_work(
    session: Any, query_image: torch.Tensor, measurement: str, method: str, fraction: float, out_root: str | Path,
    mc_samples: int = TRUE_MC_SAMPLES,
) -> str | None:
    """What an earlier retraining of this choice left on disk, in words for the page; None when nothing.

    Why: after a server restart the page offered a fresh start, with no word that a job had been running and one
    of its models was finished (QA 25 #12); pressing did continue it, from the finished model and the last
    saved step of the other."""
    from ..model.train import STATE, is_finished

    p = plan(session, query_image, measurement, method, fraction, Path(out_root), mc_samples)
    if p.result_file.is_file():
        return "This retraining has a stored result, shown without training."
    top, control = p.folder / "model", p.control_folder
    if not (is_finished(top) or (top / STATE).is_file()):  # this choice's own model was never started
        if is_finished(control):  # the control serves every query at this share
            return ("The random-removal model for this share is trained already (it serves every query): the "
                    "job trains one model.")
        return None
    kept = []
    for name, folder in ((f"without-top-{method}", top), ("random-removal", control)):
        if is_finished(folder):
            kept.append(f"the {name} model is finished")
        elif (folder / STATE).is_file():
            kept.append(f"the {name} model has saved steps")
    return (f"An earlier job for this choice did not finish (the server stopped?); its work is kept: "
            f"{' and '.join(kept)}. The button continues from there.")


class RetrainJob:
    """One "retrain without the top proponents" request, run in a background thread.

    ``RetrainJob.start(session, query, measurement, method, fraction, out_root)``;
    poll ``progress() -> (message, fraction)`` and ``done()``; ``result()`` returns
    {"method", "fraction", "removed", "predicted_change", "measured_change",
    "random_measured_change", ...} or raises the job's error.
    """

    def __init__(
        self, session: Any, query: Any, measurement: str, method: str, fraction: float, plan_: RetrainPlan
    ):
        self.session = session
        self.query = query
        self.measurement = measurement
        self.method = method
        self.fraction = float(fraction)
        self.plan = plan_
        self._message = "queued"
        self._fraction = 0.0
        self._result: dict[str, Any] | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # --- public API ------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        session: Any,
        query: Any,
        measurement: str,
        method: str,
        fraction: float,
        out_root: str | Path,
        mc_samples: int = TRUE_MC_SAMPLES,
        steps: int | None = None,
        background: bool = True,
    ) -> RetrainJob:
        """Start (or return the cached result of) one retraining; ``background=False`` runs it now."""
        if query.image is None:
            raise ValueError("retraining without top influences needs a query image")
        p = plan(session, query.image, measurement, method, fraction, Path(out_root), mc_samples, steps)
        job = cls(session, query, measurement, method, fraction, p)
        cached = p.result_file
        if cached.is_file():
            job._result = json.loads(cached.read_text())
            job._set(CACHED, 1.0)
            return job
        if background:
            job._thread = threading.Thread(target=job._run_safe, name=f"retrain-{method}", daemon=True)
            job._thread.start()
        else:
            job._run()
        return job

    def progress(self) -> tuple[str, float]:
        with self._lock:
            return self._message, self._fraction

    def done(self) -> bool:
        return self._result is not None or self._error is not None

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.done()

    def result(self) -> dict[str, Any]:
        if self._error is not None:
            raise RuntimeError(f"retraining failed: {self._error}") from self._error
        if self._result is None:
            raise RuntimeError("retraining is still running; poll done() first")
        return self._result

    # --- work ------------------------------------------------------------------------

    def _set(self, message: str, fraction: float) -> None:
        with self._lock:
            self._message, self._fraction = message, float(fraction)

    def _run_safe(self) -> None:
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 - reported through result()
            self._error = e
            self._set(f"failed: {e}", 1.0)
            traceback.print_exc()

    def removal(self) -> tuple[np.ndarray, np.ndarray, str]:
        """(removed indices, the method's scores, the method's kind); cached in the job folder."""
        folder = self.plan.folder
        path = folder / "removed.npz"
        if path.is_file():
            with load_npz(path) as z:
                return z["removed"], z["scores"], str(z["kind"])
        self._set(f"scoring with {self.method}", 0.01)
        res = self.session.query(self.query, self.measurement, [self.method]).methods[self.method]
        if res.status != "ok" or res.scores is None:
            raise RuntimeError(f"{self.method} gave no scores: {res.status}: {res.reason}")
        count = removal_count(len(self.session.dataset), self.fraction)
        removed = top_proponents(res.scores, count)
        save_npz(path, removed=removed, scores=res.scores, kind=np.array(res.kind))
        return removed, res.scores, res.kind

    def training_tasks(self) -> list[TrainTask]:
        """The two models this job needs (top removed, random control); finished ones included."""
        removed, _, _ = self.removal()
        n = len(self.session.dataset)
        control = random_control(n, len(removed))
        preset = self.session.preset
        tasks = [
            TrainTask(
                f"without-top-{self.method}",
                str(self.plan.folder / "model"),
                preset,
                self.plan.steps,
                exclude=removed,
            ),
            TrainTask(
                "random-removal", str(self.plan.control_folder), preset, self.plan.steps, exclude=control
            ),
        ]
        if self.plan.reference is not None:  # the full training set, the same steps and seed
            tasks.append(TrainTask("full-set-reference", str(self.plan.reference), preset, self.plan.steps))
        return tasks

    def _run(self) -> None:
        from ..model.train import train

        t0 = time.time()
        clock = JobClock(clock=_monotonic)
        removed, scores, kind = self.removal()
        tasks = self.training_tasks()
        unfinished = [not is_finished(t.out) for t in tasks]
        for j, task in enumerate(tasks):
            span = 0.9 / len(tasks)
            lo, hi = 0.05 + span * j, 0.05 + span * (j + 1)
            if is_finished(task.out):
                continue
            later = sum(int(t.steps) for t, u in zip(tasks[j + 1:], unfinished[j + 1:], strict=True) if u)

            def cb(
                step: int,
                total: int,
                loss: float | None,
                lo: float = lo,
                hi: float = hi,
                name: str = task.name,
                k: int = j + 1,
                later: int = later,
            ) -> None:
                if step % 20 == 0 or step == total:
                    self._set(
                        f"training {name} model ({k} of {len(tasks)}): step {step:,}/{total:,}; "
                        f"{clock.words(total - step + later)}",
                        lo + (hi - lo) * step / total,
                    )

            with _folder_lock(task.out):  # two jobs may share the control model
                if is_finished(task.out):
                    continue
                self._set(f"training {task.name} model", lo)
                train(
                    task.preset,
                    task.out,
                    dataset=self.session.dataset,
                    exclude=task.exclude,
                    device=self.session.device,
                    progress=cb,
                    steps=task.steps,
                )
        self._set(f"measuring the query on the full and the two retrained models; {minutes(clock.elapsed())} so far",
                  0.96)
        self._result = self.measure(removed, scores, kind, time.time() - t0)
        self._set("done", 1.0)

    def measure(
        self, removed: np.ndarray, scores: np.ndarray, kind: str, seconds: float | None = None
    ) -> dict[str, Any]:
        """Measured changes (retrained minus full model, same draws) and the result record.

        ``seconds``: the job's wall time when it ran as one job (the app); None (JSON null) when its models
        were trained in a shared worker pool (the CLI), where no per-job time exists (it said 0.0)."""
        spec, levels, dev = self.plan.spec, self.session.dataset.levels, self.session.device
        x = self.query.image[None].cpu()
        if self.plan.reference is not None:  # --steps other than the full model's: like with like (QA 48 #4)
            full = float(cached_measurements(self.plan.reference, x, spec, levels, dev)[0])
        else:
            full = float(
                cached_measurements(
                    self.session.checkpoint,
                    x,
                    spec,
                    levels,
                    dev,
                    cache_dir=self.plan.folder.parent / "full_measurements",
                )[0]
            )
        top = float(cached_measurements(self.plan.folder / "model", x, spec, levels, dev)[0])
        ctrl = float(cached_measurements(self.plan.control_folder, x, spec, levels, dev)[0])
        result = {
            "query": self.query.description,
            "method": self.method,
            "kind": kind,
            "measurement": self.measurement,
            "fraction": self.fraction,
            "removed": [int(i) for i in removed],
            "removed_labels": self._labels(removed),
            "predicted_change": float(np.sum(scores[removed])) if kind == "influence" else None,
            "full_measurement": full,
            "retrained_measurement": top,
            "random_measurement": ctrl,
            "measured_change": top - full,
            "random_measured_change": ctrl - full,
            "steps": self.plan.steps,
            "full_steps": int(self.session.preset.train.steps),
            **({"reference_steps": self.plan.steps} if self.plan.reference is not None else {}),
            "mc_samples": spec.mc_samples,
            "checkpoint_hash": self.session.checkpoint_hash,
            "seconds": seconds,
        }
        atomic_write_bytes(self.plan.result_file, jsonio.dumps(result, indent=1).encode())
        return result

    def _labels(self, idx: np.ndarray) -> list[int] | None:
        labels = self.session.dataset.labels
        return None if labels is None else [int(labels[int(i)]) for i in idx]


__all__ = [
    "RetrainJob",
    "RetrainPlan",
    "plan",
    "result_file_name",
    "top_proponents",
    "removal_count",
    "random_control",
]
