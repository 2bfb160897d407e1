"""Training loop: full set, a subset, or the full set without given indices.

Recipe (docs/architecture.md §3): AdamW, linear warm-up over ``warmup_frac`` of the steps then
cosine decay to zero, gradient-norm clipping, EMA of the weights (the EMA weights are
the model).  Objective L(theta) = (1/N) sum_n l(theta, x_n) with one (t, eps) draw per
example per step.

Resumable: every ``checkpoint_every`` steps, and once ``checkpoint_seconds`` have passed since the
last save, the full state (weights, EMA, optimiser,
RNG, loss log) is written atomically to ``train_state.pt``; a restarted run continues
from it and produces the same weights as an uninterrupted run.  The final checkpoint
is written last, so a folder with ``model.safetensors`` is a finished run.  One run trains a folder at a time
(``training_lock``): a second is refused at once.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import folder_lock
from ..bar_redraw import short_duration
from ..config import Preset
from ..files import atomic_torch_save, atomic_write_bytes, can_create_in, nearest_existing_folder
from ..paths import ASSETS
from ..safe_load import load_plain_state
from ..validation import check_data_fits_model, check_train_config
from .checkpoint import CONFIG, WEIGHTS, save_checkpoint
from .data import ImageDataset, load_dataset, random_flip
from .diffusion import Diffusion
from .unet import build_model

STATE = "train_state.pt"
LOG = "train_log.json"


def lr_at(step: int, total: int, base_lr: float, warmup_frac: float) -> float:
    """Linear warm-up to ``base_lr`` then cosine decay to 0."""
    warm = max(1, int(round(warmup_frac * total)))
    if step < warm:
        return base_lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def select_indices(n: int, indices: Any = None, exclude: Any = None) -> np.ndarray:
    """Training indices: all, ``indices`` only, or all but ``exclude``."""
    keep = np.arange(n) if indices is None else np.unique(np.asarray(indices, dtype=np.int64))
    if exclude is not None:
        keep = np.setdiff1d(keep, np.asarray(exclude, dtype=np.int64))
    if len(keep) == 0:
        raise ValueError("no training examples left after subsetting")
    if keep.min() < 0 or keep.max() >= n:
        raise ValueError(f"training indices out of range 0..{n - 1}")
    return keep


def train(
    preset: Preset,
    out_dir: str | Path,
    dataset: ImageDataset | None = None,
    indices: Any = None,
    exclude: Any = None,
    device: torch.device | str = "cpu",
    progress: bool | Callable[[int, int, float], None] = True,
    steps: int | None = None,
    resumed: Callable[[int], None] | None = None,
    held: HeldLock | None = None,
) -> Path:
    """Train (or resume) a DDPM into ``out_dir``; returns the checkpoint folder.

    ``progress`` is True for a tqdm bar, False for silence, or ``f(step, total, loss)``. ``resumed(step)`` is
    told once of the step a resumed run continues from, before it trains (a progress count over many models
    adds those steps without counting them as this run's speed).  ``held``: ``out_dir``'s lock, taken by the
    caller before its own slow work (``training_folder``); train runs under it, as a second take would be refused.
    """
    out = Path(out_dir)
    tc = preset.train
    total = int(steps if steps is not None else tc.steps)
    check_train_config(dataclasses.replace(tc, steps=total))  # before anything is written
    if out.exists() and not out.is_dir():
        raise TrainingSettingsError(f"--out {out} exists and is not a folder")
    if held is None:
        check_not_training(out)  # creates nothing: a run into a folder another run trains ends here, before the data
    else:
        held.check_holds(out)
    ds = dataset if dataset is not None else load_dataset(preset.data)
    check_data_fits_model(preset.model, ds.shape)
    data_sha = ds.content_digest()
    subset = None if indices is None and exclude is None else select_indices(len(ds), indices, exclude)
    if held is None and is_finished(out):  # only read: a finished folder (the shipped weights') gets no lock file
        _check_finished_run(out, preset, total, subset, data_sha, len(ds))
        return out  # finished before, with these settings and data
    keep = subset if subset is not None else select_indices(len(ds))
    out.mkdir(parents=True, exist_ok=True)
    lock = training_lock(out) if held is None else contextlib.nullcontext()
    with lock:  # to the end, however it ends: one writer of train_state.pt and the weights
        try:
            if is_finished(out):  # by the run that held the folder since this one looked
                _check_finished_run(out, preset, total, subset, data_sha, len(ds))
                return out
            return _train_held(preset, out, total, ds, keep, data_sha, device, progress, resumed)
        finally:
            if is_finished(out):  # no lock file left in a finished folder; removed while held, so a run that takes a
                (out / LOCK).unlink(missing_ok=True)  # lock on a new file after this finds the run finished and only reads


def _train_held(
    preset: Preset,
    out: Path,
    total: int,
    ds: ImageDataset,
    keep: np.ndarray,
    data_sha: str,
    device: torch.device | str,
    progress: bool | Callable[[int, int, float], None],
    resumed: Callable[[int], None] | None,
) -> Path:
    """``train``'s steps, checkpoints and final weights, in a folder whose lock it holds."""
    tc = preset.train
    x_all = ds.images[torch.as_tensor(keep)].to(device)
    n = x_all.shape[0]

    torch.manual_seed(tc.seed)
    model = build_model(preset.model).to(device)
    ema = copy.deepcopy(model) if tc.ema_decay else None
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    diffusion = Diffusion(preset.diffusion)
    gen = torch.Generator().manual_seed(tc.seed + 1)
    step, log = 0, []
    perm, pos = torch.randperm(n, generator=gen), 0
    running, elapsed_before = None, 0.0  # smoothed loss for the log; seconds trained before a resume

    state_path = out / STATE
    if state_path.is_file():
        st = load_plain_state(
            state_path,
            f"Delete it to restart this run from step 0 (the finished weights are not affected): rm {state_path}",
            # the CPU, whatever the device: load_state_dict moves weights and moments to the parameters' device,
            # while AdamW's "step" counts stay where they are loaded, and on a GPU each of them would cost a
            # device sync per parameter per step (an uninterrupted run keeps them on the CPU)
            map_location="cpu",
        )
        model.load_state_dict(st["model"])
        if ema is not None:
            ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"].cpu())  # generators live on the CPU
        recipe = _recipe(preset, total, keep, data_sha)
        if st.get("recipe") is not None and "data_sha" not in st["recipe"]:
            recipe.pop("data_sha")  # a state saved before the data's digest was part of the recipe
        if st.get("recipe") is not None and st["recipe"] != recipe:
            raise TrainingSettingsError(
                f"{state_path} is an unfinished run with other settings ({_differences(st['recipe'], recipe)}); "
                f"rerun with the same settings to resume, use another --out, or delete {state_path} to start over"
            )
        step, log, perm, pos = st["step"], st["log"], st["perm"].cpu(), st["pos"]
        running, elapsed_before = st.get("running"), float(st.get("elapsed_s", 0.0))  # so the log goes on as one run
        if resumed is not None and step:
            resumed(int(step))
        # dropout draws from the global RNGs: restore them so a resumed run is exact
        if st.get("torch_rng") is not None:
            torch.set_rng_state(st["torch_rng"].cpu())
        if st.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([r.cpu() for r in st["cuda_rng"]])

    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc=f"train {preset.name}", unit="step")
        if step:  # a resumed run says so (QA 34: only the bar's start at 102/300 showed it)
            bar.write(f"resuming at step {step:,} of {total:,} from {state_path}", file=sys.stderr)
    model.train()
    t0 = time.time() - elapsed_before
    last_save = time.monotonic()
    saved_step = step

    def save_state(at: tuple[Any, torch.Tensor, int, torch.Tensor, Any]) -> None:
        """Write the resumable state for the weights as they are and the draws ``at`` (generator, permutation,
        position, torch and CUDA RNG states) that the next step starts from."""
        g_state, perm_at, pos_at, torch_rng, cuda_rng = at
        atomic_torch_save(
            {
                "model": model.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "opt": opt.state_dict(),
                "gen": g_state,
                "step": step,
                "log": log,
                "perm": perm_at,
                "pos": pos_at,
                "recipe": _recipe(preset, total, keep, data_sha),
                "running": running,
                "elapsed_s": time.time() - t0,
                "torch_rng": torch_rng,
                "cuda_rng": cuda_rng,
            },
            state_path,
        )

    def draws_now() -> tuple[Any, torch.Tensor, int, torch.Tensor, Any]:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        return gen.get_state(), perm, pos, torch.get_rng_state(), cuda

    # where an interruption (Ctrl-C, SIGTERM) finds the loop: "between" steps, "drawn" (this step's
    # random draws made, no weight changed yet: the state is saved with the draws it started from) or "updating"
    # (the optimiser and EMA are changing the weights: nothing consistent to save, the last checkpoint stands).
    # Why: a Ctrl-C before the first timed checkpoint (120 s; one cifar2 step on a CPU takes about a minute) lost
    # everything, while the command said to rerun it to resume (QA 33)
    phase = "between"
    first_step, loop_start = step, time.monotonic()
    try:
        while step < total:
            start = draws_now()  # what the step draws from (5 KiB of generator state)
            phase = "drawn"
            if pos + tc.batch_size > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            bidx = perm[pos : pos + min(tc.batch_size, n)]
            pos += len(bidx)
            x0 = x_all[bidx.to(x_all.device)]
            if preset.data.flip:
                x0 = random_flip(x0.cpu(), gen).to(device)
            t = torch.randint(0, diffusion.T, (x0.shape[0],), generator=gen).to(device)
            eps = torch.randn(x0.shape, generator=gen).to(device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, tc.lr, tc.warmup_frac)
            loss = diffusion.per_sample_loss(model, x0, t, eps).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            phase = "updating"
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                        pe.lerp_(pm, 1.0 - tc.ema_decay)
            step += 1
            lv = float(loss.detach())
            running = lv if running is None else 0.98 * running + 0.02 * lv
            if step % tc.log_every == 0 or step == total:
                log.append({"step": step, "loss": running, "elapsed_s": time.time() - t0})
            phase = "between"
            if step == first_step + 1:  # a run of days on this device is said at once, not by a bar's ETA later
                note = long_run_note(time.monotonic() - loop_start, total - step, str(device), LONG_RUN_S)
                if note and bar is not None:  # on its own line, not after the bar's (QA 34)
                    bar.write(f"warning: {note}", file=sys.stderr)
                elif note:
                    warnings.warn(note, stacklevel=2)
            if bar is not None:
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{running:.4f}", refresh=False)  # drawn with the next due update: a
                    # refresh here wrote a log line every 20 steps whatever TQDM_MININTERVAL said (QA 24 #5)
            elif callable(progress):
                progress(step, total, running)
            due = step % tc.checkpoint_every == 0 or (
                tc.checkpoint_seconds > 0 and time.monotonic() - last_save >= tc.checkpoint_seconds
            )
            if due and step < total:
                save_state(draws_now())
                saved_step, last_save = step, time.monotonic()
    except BaseException as e:
        # an interruption (Ctrl-C, the CLI's SIGTERM, SystemExit), not an error: a failing step's state is not
        # trusted, and the tests' simulated kills (an Exception from the progress callback) must stay kills
        if not isinstance(e, Exception) and phase != "updating" and saved_step < step < total:
            save_state(start if phase == "drawn" else draws_now())
            if bar is not None:
                bar.write(f"saved the run's state at step {step:,} of {total:,}: the same command resumes it")
        raise
    if bar is not None:
        bar.close()
    final = ema if ema is not None else model
    extra = {
        "steps": total,
        "num_train": int(n),
        "indices_sha": _indices_digest(keep),
        "data_sha": data_sha,  # the training set's content (ImageDataset.content_digest), wherever it was read from
    }
    atomic_write_bytes(out / LOG, json.dumps(log).encode())
    save_checkpoint(out, final, preset, extra)
    if state_path.is_file():
        state_path.unlink()
    return out


LONG_RUN_S = 12 * 3600  # a run projected past this gets a warning after its first step


def long_run_note(step_seconds: float, steps_left: int, device: str, limit_s: float = LONG_RUN_S) -> str | None:
    """Why a training run will take days here, after its first step, when its steps left at that speed exceed
    ``limit_s`` (QA 33: `train --preset cifar2` on a 2-core CPU took 72 s per step and said nothing until its bar's
    ETA read 636 h). None when it will not."""
    left = step_seconds * steps_left
    if left <= limit_s:
        return None
    return (f"at {step_seconds:.1f} s per step on {device}, the {steps_left:,} steps left take about "
            f"{short_duration(left)}: a GPU (--device cuda), fewer steps (--steps) or a smaller model "
            "(model.base_channels in a preset file) shortens it; Ctrl-C keeps the finished steps for a rerun")


def is_finished(folder: str | Path) -> bool:
    """A finished run has its config and its weights (``save_checkpoint`` writes them in that order)
    and no resumable state.  Weights without a config (a kill between the two writes before that
    order) are not finished: the run is trained again, as it would be with neither file."""
    folder = Path(folder)
    return (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file() and not (folder / STATE).is_file()


class TrainingSettingsError(ValueError):
    """The output folder holds a run made with other settings; the message lists them and what to do."""


LOCK = folder_lock.RUN_LOCK  # the one lock of a folder runs write: an lds/retrain-top run's --out takes it too


class TrainingBusyFolderError(ValueError):
    """Another live run is training into the output folder: two writers of one ``train_state.pt`` would overwrite
    each other's steps, and one finishing deletes the state the other resumes from.  A ValueError, so the CLI shows
    it as one ``error:`` line with exit status 2, as it does the settings errors."""


@dataclasses.dataclass
class HeldLock:
    """A training lock this process holds (``training_lock`` yields it), for ``train(held=...)``: a caller that
    takes the lock before its own slow work (the CLI, before the data load) has train run under it, since a second
    take of a flock is refused, also to its own process.  A token rather than a flag, so that train cannot be told
    of a lock on another folder, or one already let go."""

    folder: Path
    active: bool = True

    def check_holds(self, out: Path) -> None:
        """RuntimeError (a bug, not a user's mistake) unless this is ``out``'s lock, still held."""
        if not self.active or self.folder.resolve() != Path(out).resolve():
            state = "held" if self.active else "let go"
            raise RuntimeError(f"train({out}) was given the lock of {self.folder} ({state}), not its own")


@contextlib.contextmanager
def training_lock(out: str | Path) -> Iterator[HeldLock]:
    """Hold ``out``'s training lock (``out/.train-run.lock``, ``engine.folder_lock``; the folder must exist);
    ``TrainingBusyFolderError`` at once when another run holds it.  Released when the block ends, however it ends."""
    with folder_lock.exclusive(Path(out) / LOCK, busy=lambda holder: _busy(out, holder)):
        held = HeldLock(Path(out))
        try:
            yield held
        finally:
            held.active = False


@contextlib.contextmanager
def training_folder(out: str | Path) -> Iterator[HeldLock]:
    """``out`` made (with its missing parents) and its training lock held, for a caller with slow work before
    ``train(held=...)`` (the CLI's data load): of two runs started together, the second is refused before that
    work, not after it.  When the block fails with nothing but the lock file written (data that do not load, an
    interruption while they decode), the folders made for the lock go again: no empty --out is left behind."""
    out = Path(out)
    made = _missing_folders(out)
    out.mkdir(parents=True, exist_ok=True)
    with training_lock(out) as held:
        try:
            yield held
        except BaseException:
            _remove_if_only_the_lock(made)  # while held: a take that opened the file before finds it gone
            raise


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for p in (folder, *folder.parents):
        if p.exists():
            break
        missing.append(p)
    return missing


def _remove_if_only_the_lock(made: list[Path]) -> None:
    """Remove the folders in ``made`` (deepest first) when the deepest holds the lock file alone; one that
    holds anything else (another run's file, a saved state) stays, with the ones above it."""
    if not made or sorted(p.name for p in made[0].iterdir()) != [LOCK]:
        return
    (made[0] / LOCK).unlink()
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            return


def check_not_training(out: str | Path) -> None:
    """``TrainingBusyFolderError`` when a run holds ``out`` now, ``TrainingSettingsError`` when ``out`` cannot be
    made or written; creates nothing.  Before slow work (the data, which the CLI loads before ``train`` takes the
    lock): a second run, or an --out on a read-only disk, is refused then, not after minutes of decoding an image
    folder and in a bare "[Errno 30] Read-only file system" (QA 36 #5)."""
    try:
        folder_lock.check_free(Path(out) / LOCK)
    except folder_lock.Held as e:
        raise _busy(out, e.holder) from None
    if not is_finished(out):  # a finished folder is only read (the shipped weights may lie on a read-only install)
        _check_writable(Path(out))


def _check_writable(out: Path) -> None:
    """Whether ``out`` (or the folder it would be made in: its nearest existing parent) can be written, tried by
    making a file there: ``os.access`` passed root's ``--out /proc/run``, which failed after the data load."""
    where = nearest_existing_folder(out, f"--out {out}", TrainingSettingsError)
    if not can_create_in(where):
        made = "" if where == out else f" (it would be made in {where})"
        raise TrainingSettingsError(f"--out {out}: {where} is not writable{made}; pass another --out")


def _busy(out: str | Path, holder: folder_lock.Holder | None) -> TrainingBusyFolderError:
    if holder is not None and holder.is_this_process():  # another thread of this process (an app's jobs)
        who = "another training in this process"
    else:
        who = "another run" + (f" ({holder.words()})" if holder is not None else "")
    return TrainingBusyFolderError(f"{out} is being trained by {who}; wait for it, or pass another --out")


def _recipe(preset: Preset, total: int, keep: np.ndarray | None, data_sha: str | None = None) -> dict[str, Any]:
    """What determines a run's weights: model, schedule, recipe (with the actual step count), the data's
    content (``data_sha``; its folder, ``data.root``, is left out so that data can move) and subset."""
    d = preset.to_dict()
    train_cfg = dict(d["train"], steps=int(total))
    for k in ("log_every", "checkpoint_every", "checkpoint_seconds"):  # bookkeeping only: the weights do not depend on them
        train_cfg.pop(k, None)
    data = {k: v for k, v in d["data"].items() if k != "root"}
    out = {"model": d["model"], "diffusion": d["diffusion"], "data": data, "train": train_cfg}
    if keep is not None:
        out["indices_sha"] = _indices_digest(keep)
    if data_sha is not None:
        out["data_sha"] = data_sha
    return json.loads(json.dumps(out))  # tuples -> lists, as stored


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _differences(a, b, f"{prefix}{k}.")
            if inner:
                diffs.append(inner)
        elif a != b:
            diffs.append(f"{prefix}{k} {a!r} there, {b!r} asked")
    return "; ".join(diffs)


def _check_finished_run(
    out: Path, preset: Preset, total: int, keep: np.ndarray | None, data_sha: str, num_train: int
) -> None:
    """Refuse to report a finished run made with other settings, or on other data, as this command's result.

    The data are compared by content when the run recorded it (``data_sha``); a run from before that
    (the shipped weights) by its data folder and size, so that ``--data-root`` with the default
    ``--out`` never reports the shipped model as one trained on the user's data."""
    from .checkpoint import read_config

    old_preset, extra = read_config(out)
    old_total = int(extra.get("steps", old_preset.train.steps))
    old = _recipe(old_preset, old_total, None)
    new = _recipe(preset, total, None)
    if extra.get("data_sha") is not None:
        old["data_sha"], new["data_sha"] = extra["data_sha"], data_sha
    else:
        old["data"]["root"], new["data"]["root"] = old_preset.data.root, preset.data.root
        if keep is None and extra.get("num_train") is not None:
            old["num_train"], new["num_train"] = int(extra["num_train"]), num_train
    if keep is not None:
        new["indices_sha"] = _indices_digest(keep)
        old["indices_sha"] = extra.get("indices_sha")
    elif extra.get("num_train") is not None and extra.get("indices_sha") is not None:
        full = _indices_digest(np.arange(int(extra["num_train"])))
        if extra["indices_sha"] != full:
            old["subset"], new["subset"] = "a subset of the training set", "the full training set"
    diff = _differences(old, new)
    if diff:
        shipped = out.resolve().parent == ASSETS.resolve()  # never advise deleting the shipped weights
        todo = "pass --out with a new folder" if shipped else f"pass another --out, or delete {out / WEIGHTS} to train again"
        raise TrainingSettingsError(
            f"{out} already holds a finished run with other settings ({diff}); nothing was trained: {todo}"
        )


# The training sets' content digests (``ImageDataset.content_digest``) of the shipped weights, which predate the
# ``data_sha`` a run records, by checkpoint hash: written into their config.json, it would change the hash that keys
# their caches and precomputed results.  Measured with the presets' own data (``load_dataset(get_preset(P).data)``).
SHIPPED_TRAINING_SETS = {
    "3c6f55835a48dc83": "314b97e8b73b7a46",  # assets/digits: scikit-learn's 1,797 digits
    "5793a93dd82974d6": "ac1cba6f19c0fbf2",  # assets/mnist: the first 1,000 of assets/mnist/mnist_10k.npz's order
}


def trained_on_problem(extra: dict[str, Any], dataset: Any, digest: str | None = None,
                       checkpoint: str | None = None) -> str | None:
    """Why ``dataset`` is not the training set a checkpoint (its ``extra``) was trained on; None when it is,
    or when the checkpoint cannot tell (a diffusers folder records nothing).

    Influence (eq. 6) attributes a model's output to the images it was trained on: the same model scored
    against other images (``--data-root`` pointing elsewhere, a folder that changed since) answers with
    numbers that mean nothing, and nothing said so (QA round 12).  A run records its training set's
    content (``data_sha``, the full set's even when it trained on a subset); a run from before that (the
    shipped weights) only its size, which tells when it trained on a whole set of another size; for the shipped
    weights themselves ``SHIPPED_TRAINING_SETS`` gives the digest by ``checkpoint`` hash (QA 41: the shipped mnist
    weights attributed any other 1,000-image set without a word).  ``digest``: the set's ``content_digest()`` when
    the caller has it already."""
    extra = extra or {}  # a config.json with "extra": null
    recorded = extra.get("data_sha") or SHIPPED_TRAINING_SETS.get(checkpoint or "")
    if recorded is not None:
        digest = digest or dataset.content_digest()
        if digest != recorded:
            return (f"it was trained on a training set with content digest {recorded}; the one loaded "
                    f"({len(dataset)} images) has {digest}")
        return None
    n, sha = extra.get("num_train"), extra.get("indices_sha")
    if n is not None and sha is not None and int(n) != len(dataset) and sha == _indices_digest(np.arange(int(n))):
        return f"it was trained on all of a {int(n)}-image training set; the one loaded has {len(dataset)} images"
    return None


def _indices_digest(keep: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(keep, dtype=np.int64).tobytes()).hexdigest()[:16]
