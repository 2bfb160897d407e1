"""Retraining runs shared by the two evaluations (paper section 4; docs/architecture.md §7).

* "true" measurements of a retrained model on a set of queries, with common random
  numbers (one seeded draw set for every model) and cached beside the model, so each
  model is measured once;
* worker-pool training of many small models (LDS subsets, retraining without top
  influences), resumable because ``engine.model.train.train`` skips finished folders.

The LDS itself lives in ``engine.evaluation.lds``, retraining without top influences in
``engine.evaluation.retrain_top``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..bar_redraw import add_done_before
from ..child_process import init_worker, stop_pool
from ..config import TRUE_MC_SAMPLES, Preset
from ..files import atomic_write_bytes
from ..model.checkpoint import checkpoint_hash, load_checkpoint
from ..model.data import ImageDataset
from ..model.diffusion import Diffusion, MCDraws, make_draws
from ..model.measurements import measure, parse_measurement
from ..model.train import is_finished
from ..npy_read import load_npz

# --- measurements with common random numbers ---------------------------------------------


@dataclass(frozen=True)
class MeasureSpec:
    """What a "true" measurement is: which measurement, how many draws, which seed."""

    measurement: str = "loss"
    mc_samples: int = TRUE_MC_SAMPLES
    seed: int = 12345
    batch: int = 256  # draws evaluated at once (memory only; does not change the value)

    def key(self, queries: torch.Tensor) -> str:
        """Digest of the settings and the query images: the cache key of a measurement."""
        h = hashlib.sha256()
        h.update(json.dumps([self.measurement, self.mc_samples, self.seed]).encode())
        h.update(np.ascontiguousarray(queries.detach().cpu().float().numpy()).tobytes())
        return h.hexdigest()[:16]


def common_draws(spec: MeasureSpec, shape: tuple[int, int, int], num_timesteps: int) -> MCDraws:
    """One seeded draw set, the same for every model compared (common random numbers)."""
    m = parse_measurement(spec.measurement, num_timesteps)
    t_fixed = m.t_idx if m.kind == "loss@t" else None
    return make_draws(spec.mc_samples, shape, num_timesteps, spec.seed, t_fixed=t_fixed)


@torch.no_grad()
def measure_queries(
    model: torch.nn.Module,
    preset: Preset,
    queries: torch.Tensor,
    spec: MeasureSpec,
    levels: int,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """m(theta, x_q) for each query (Q, C, H, W) in [-1, 1], averaged over ``spec.mc_samples`` draws.

    Draws are split into chunks of ``spec.batch`` and the chunk means averaged with weights,
    which equals the mean over all draws (the ELBO's MC estimate is linear in the draws).
    ``progress(done, Q)`` is told after each query (32 queries x 1,024 draws take about 15 s on digits).
    """
    diffusion = Diffusion(preset.diffusion)
    shape = tuple(queries.shape[1:])
    draws = common_draws(spec, shape, diffusion.T)
    mspec = parse_measurement(spec.measurement, diffusion.T)
    out = np.zeros(len(queries), dtype=np.float64)
    with torch.no_grad():  # values only: no autograd graph (about half the time)
        for qi in range(len(queries)):
            x = queries[qi : qi + 1].to(device)
            total = 0.0
            for s in range(0, len(draws), spec.batch):
                d = MCDraws(draws.t[s : s + spec.batch], draws.eps[s : s + spec.batch]).to(device)
                total += float(measure(mspec, model, diffusion, x, d, levels)) * len(d)
            out[qi] = total / len(draws)
            if progress is not None:
                progress(qi + 1, len(queries))
    return out


def measurement_tag(measurement: str) -> str:
    """A measurement as it appears in file names: ``loss@t=500`` -> ``loss_t500`` (no ``@`` or ``=``).  The one
    rule for a model's cached measurements (``measurement_file_name``) and an LDS run's results file
    (``lds_run.results_stem``), so that every reader finds what the writer named."""
    return measurement.replace("@", "_").replace("=", "")


def measurement_file_name(spec: MeasureSpec, queries: torch.Tensor) -> str:
    """The file a model's measurements of ``queries`` are cached in beside it (``folder/measurements/``):
    the measurement, the draws and a digest of the queries; one name for every reader of a run."""
    return f"{measurement_tag(spec.measurement)}_{spec.mc_samples}_{spec.key(queries)}.json"


def cached_measurements(
    folder: Path,
    queries: torch.Tensor,
    spec: MeasureSpec,
    levels: int,
    device: torch.device | str = "cpu",
    cache_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Measurements of the model in ``folder`` on ``queries``, cached as JSON (``progress`` as in
    ``measure_queries``; not told when the cache answers).

    The cache goes to ``cache_dir`` (default ``folder/measurements/``): never into the
    checkpoint folder itself, whose JSON files are part of its content hash.  A given ``cache_dir`` (a
    run's ``full_measurements``) may be shared by several models, so there the file's name starts with
    the model's content hash: without it a second checkpoint's run into the
    same folder was compared against the first model's measurement of the same query (QA 15).
    """
    folder = Path(folder)
    name = measurement_file_name(spec, queries)
    if cache_dir is None:
        cache_dir = folder / "measurements"
    else:
        cache_dir = Path(cache_dir)
        name = f"{checkpoint_hash(folder)}_{name}"
    path = cache_dir / name
    if path.is_file():
        return np.asarray(json.loads(path.read_text())["values"], dtype=np.float64)
    model, preset, _ = load_checkpoint(folder, device)
    t0 = time.time()
    values = measure_queries(model, preset, queries, spec, levels, device, progress)
    record = {
        "measurement": spec.measurement,
        "mc_samples": spec.mc_samples,
        "seed": spec.seed,
        "num_queries": len(queries),
        "values": values.tolist(),
        "seconds": time.time() - t0,
    }
    atomic_write_bytes(path, json.dumps(record, indent=1).encode())
    return values


# --- training many models in a worker pool ------------------------------------------------


@dataclass
class TrainTask:
    """One model to train: ``train(preset, out, indices=..., exclude=..., steps=...)``."""

    name: str
    out: str
    preset: Preset
    steps: int
    indices: np.ndarray | None = None
    exclude: np.ndarray | None = None


_STEPS_DONE = None  # in a training worker: the pool's shared step counters (``_init_training_worker``)
_REPORT_EVERY = 20  # steps between two reports of a training task


def _init_training_worker(threads: int, trained: Any, resumed: Any) -> None:
    """Pool initializer: ``init_worker``, and the counters every task of this worker adds its steps to."""
    global _STEPS_DONE
    init_worker(threads)
    _STEPS_DONE = (trained, resumed)


def _run_task(
    task: TrainTask,
    dataset: ImageDataset | None,
    device: str,
    steps_done: Callable[[int, bool], None] | None = None,
) -> tuple[str, float]:
    """Train one task; ``steps_done(k, resumed)`` is told of every ``_REPORT_EVERY`` steps trained and, once,
    of the steps a resumed model had trained before (``resumed`` True); in a pool worker the shared counters
    are."""
    from ..model.train import train

    if steps_done is None and _STEPS_DONE is not None:
        counters = _STEPS_DONE

        def steps_done(k: int, resumed: bool) -> None:
            counter = counters[1] if resumed else counters[0]
            with counter.get_lock():
                counter.value += k

    last = [0]

    def report(step: int, total: int, loss: float | None) -> None:
        if steps_done is not None and (step % _REPORT_EVERY == 0 or step == total):
            steps_done(step - last[0], False)
            last[0] = step

    def resumed(step: int) -> None:
        last[0] = step
        if steps_done is not None:
            steps_done(step, True)

    t0 = time.time()
    train(
        task.preset,
        task.out,
        dataset=dataset,
        indices=task.indices,
        exclude=task.exclude,
        device=device,
        progress=report,
        steps=task.steps,
        resumed=resumed,
    )
    return task.name, time.time() - t0


def reference_model(out_root: str | Path, checkpoint_hash: str, steps: int) -> Path:
    """The folder of the model trained on the full training set for ``steps`` (the full model's recipe and seed),
    which a retrain-top or group-retrain run with --steps other than the full model's measures its changes against
    (QA 48 #4).  One rule for both commands' run folders."""
    key = hashlib.sha256(json.dumps([checkpoint_hash, "reference", int(steps)]).encode()).hexdigest()[:16]
    return Path(out_root) / f"reference_{key}" / "model"


def reference_notice(steps: int, full_steps: int) -> str:
    """Why a run with --steps other than the full model's compares with a reference model (QA 48 #4: 600-step models
    against the 6,000-step full model measured the training-length gap, +0.14 on every query, not the removal)."""
    return (f"--steps {steps:,} differs from the full model's {full_steps:,}: the changes are measured against a "
            f"reference model trained on the full training set for the same {steps:,} steps and seed (trained once "
            f"in the run folder, resumable), not against the full model")


def reference_line(config: dict[str, Any]) -> str | None:
    """A results table's line for a record measured against a same-steps reference model, else None."""
    if not config.get("reference_steps"):
        return None
    return (f"changes against a reference trained {config['reference_steps']:,} steps on the full training set "
            f"(the full model: {config['full_steps']:,} steps)")


def saved_step(folder: str | Path) -> int | None:
    """The step an unfinished model's ``train_state.pt`` holds (its training resumes there); None without one or
    when it cannot be read (the training then says why)."""
    from ..model.train import STATE
    from ..safe_load import load_plain_state

    path = Path(folder) / STATE
    if not path.is_file():
        return None
    try:
        return int(load_plain_state(path, "", map_location="cpu")["step"]) or None
    except Exception:  # noqa: BLE001 - a plan line only; the training reports a damaged state itself
        return None


def plan_words(tasks: Sequence[TrainTask], todo: Sequence[TrainTask], workers: int) -> str:
    """"3 models: 1 finished before, 1 resumed at step 500 of 600, 1 to train with 1 worker(s)": the steps a resumed
    model kept, in words (QA 48 #8: they showed only as the bar's starting count)."""
    resumed = [(int(s), int(t.steps)) for t in todo if (s := saved_step(t.out)) is not None]
    parts = [f"{len(tasks) - len(todo)} finished before"]
    if resumed:
        at = " and ".join(f"{s:,} of {n:,}" for s, n in resumed)
        parts.append(f"{len(resumed)} resumed at step{'s' if len(resumed) > 1 else ''} {at}")
    parts.append(f"{len(todo) - len(resumed)} to train")
    return f"{len(tasks)} model{'s' if len(tasks) != 1 else ''}: {', '.join(parts)} with {workers} worker(s)"


def run_training(
    tasks: Sequence[TrainTask],
    workers: int = 1,
    dataset: ImageDataset | None = None,
    device: str = "cpu",
    threads_per_worker: int = 1,
    progress: bool | Callable[[str, float], None] = True,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Train every unfinished task; ``workers`` > 1 runs spawned processes in parallel.

    Each worker uses ``threads_per_worker`` torch threads (1: W workers on W cores beat one
    process with W threads for these small models).  Finished folders are skipped, so a
    stopped run resumes where it was (unfinished models continue from ``train_state.pt``).
    ``dataset`` is sent to the workers only when given (custom data, tests); otherwise each
    worker loads the preset's data itself.

    Progress counts training steps over every task, not models: one model of the full recipe takes
    minutes, and a bar counting models sat at 0% that long (a group retraining's two models: 0/2 for
    about 10 min). Workers add their steps to one shared counter, which this process reads every second.
    """
    todo = [t for t in tasks if not is_finished(t.out)]
    done_before = len(tasks) - len(todo)
    log(plan_words(tasks, todo, workers))
    if not todo:
        return []
    total = sum(int(t.steps) for t in tasks)
    base = total - sum(int(t.steps) for t in todo)  # the finished models' steps
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=base, desc="retraining", unit="step", dynamic_ncols=True)
        bar.set_postfix_str(f"models {done_before}/{len(tasks)}")
    finished: list[str] = []
    steps = [0, 0]  # trained by this run, trained before a resume

    def _show(trained: int, resumed: int) -> None:
        if bar is not None:
            add_done_before(bar, resumed - steps[1])  # done before this run: part of the start, not its speed
            bar.update(base + trained + resumed - bar.n)  # update, not refresh: TQDM_MININTERVAL thins it
        elif callable(progress):
            k = base + trained + resumed
            progress(f"training: {k:,}/{total:,} steps, {done_before + len(finished)}/{len(tasks)} models", k / total)
        steps[:] = [trained, resumed]

    def _done(name: str, secs: float) -> None:
        finished.append(name)
        line = f"finished {name} in {secs:.0f} s ({done_before + len(finished)}/{len(tasks)})"
        bar.write(line) if bar is not None and log is print else log(line)  # a print would cut the bar's line
        if bar is not None:
            bar.set_postfix_str(f"models {done_before + len(finished)}/{len(tasks)}")
        elif callable(progress):
            progress(f"trained {name}", (done_before + len(finished)) / len(tasks))

    try:
        if workers <= 1:  # in this process, with its own thread settings
            for t in todo:
                _done(*_run_task(t, dataset, device,
                                 lambda k, r: _show(steps[0], steps[1] + k) if r else _show(steps[0] + k, steps[1])))
        else:
            import multiprocessing as mp
            from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

            ctx = mp.get_context("spawn")
            trained, resumed = ctx.Value("q", 0), ctx.Value("q", 0)
            os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_worker))
            if bar is not None:
                bar.set_postfix_str(f"starting {min(workers, len(todo))} workers")  # seconds before a first step
            with ProcessPoolExecutor(
                max_workers=workers, mp_context=ctx, initializer=_init_training_worker,
                initargs=(threads_per_worker, trained, resumed),
            ) as pool:
                try:
                    pending = {pool.submit(_run_task, t, dataset, device) for t in todo}
                    while pending:
                        ready, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                        if (trained.value, resumed.value) != tuple(steps):
                            if bar is not None and steps == [0, 0]:
                                bar.set_postfix_str(f"models {done_before}/{len(tasks)}", refresh=False)
                            _show(int(trained.value), int(resumed.value))
                        for f in ready:
                            _done(*f.result())
                except BaseException:  # Ctrl-C, SIGTERM, a failed model: stop the others now, not after the queue
                    stop_pool(pool)
                    raise
    finally:
        if bar is not None:
            bar.close()  # before the command's "interrupted; rerun ..." line, which it would redraw over
    return finished


def load_queries_npz(path: str | Path, n: int | None = None) -> torch.Tensor:
    """Gallery samples (``images`` in [0, 1]) as a (Q, C, H, W) tensor in [-1, 1]."""
    with load_npz(path) as z:
        images = torch.as_tensor(z["images"], dtype=torch.float32)
    if n is not None:
        images = images[:n]
    return images * 2.0 - 1.0
