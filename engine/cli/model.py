"""Subcommands of the model layer: ``train``, ``sample`` and ``assets``."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .. import jsonio
from .common import check_output_file, register, resolve, subcommand

if TYPE_CHECKING:
    from ..model.dataset import ImageDataset
    from ..model.train import HeldLock

# --- train ---------------------------------------------------------------------------


@register
def add_train(sub: argparse._SubParsersAction) -> None:
    p = subcommand(
        sub,
        "train",
        cmd_train,
        help="train a DDPM (resumable)",
        description="Train a DDPM on the preset's data. Resumes from train_state.pt if the "
        "output folder holds an unfinished run; does nothing if it holds a finished one.",
    )
    p.add_argument("--out", default=None, help="output checkpoint folder (default: --checkpoint)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: preset's)")
    p.add_argument("--seed", type=int, default=None, help="training seed (default: preset's)")
    p.add_argument("--indices", default=None, help="train only on these indices (.npy or comma list)")
    p.add_argument("--exclude", default=None, help="train without these indices (.npy or comma list)")


def _read_indices(spec: str | None, flag: str):
    """``--indices``/``--exclude``: a .npy of integers or a comma list; ValueError naming ``flag`` otherwise
    (the range is checked by ``train`` against the data set)."""
    import numpy as np

    from ..npy_read import load_npy

    if spec is None:
        return None
    if spec.endswith(".npy"):
        if not Path(spec).is_file():
            raise ValueError(f"{flag} {spec}: no such file (a .npy of training-image indices)")
        try:
            values = load_npy(spec)
        except (ValueError, OSError, EOFError):  # not an .npy (numpy then guesses a pickle), or truncated
            raise ValueError(f"{flag} {spec}: not a readable .npy array of training-image indices") from None
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"{flag} {spec}: the array must hold integers, not {values.dtype}")
        return values
    try:
        return np.array([int(s) for s in spec.split(",") if s.strip()], dtype=np.int64)
    except ValueError:
        raise ValueError(
            f"{flag} must be a .npy file or a comma list of training-image indices such as 0,5,17; got {spec!r}"
        ) from None


def data_summary(dataset: ImageDataset, root: str | Path | None) -> str:
    """One line on the training set a command is about to use: size, image shape, classes and where it came from."""
    c, h, w = dataset.shape
    k = None if dataset.labels is None else int(dataset.labels.unique().numel())
    classes = "unlabelled" if k is None else f"{k} class{'' if k == 1 else 'es'}"
    where = f" from {root}" if root else ""
    return f"data: {len(dataset):,} images of {c}x{h}x{w}, {classes} ({dataset.name}{where})"


def cmd_train(args: argparse.Namespace) -> int:
    from ..model.data import load_dataset
    from ..model.train import is_finished, train

    preset, ckpt, device = resolve(args)
    changes = {}
    if args.steps is not None:
        changes["steps"] = args.steps
    if args.seed is not None:
        changes["seed"] = args.seed
    if changes:
        preset = preset.replace(train=changes)
    out = Path(args.out) if args.out else ckpt
    indices, exclude = _read_indices(args.indices, "--indices"), _read_indices(args.exclude, "--exclude")
    finished_before = is_finished(out)
    with _lock_unless_finished(out, finished_before) as held:
        t0 = time.time()
        dataset = load_dataset(preset.data)
        if not finished_before:  # what it trains on, before minutes of it (QA 33: a folder's skipped file went unseen)
            print(data_summary(dataset, preset.data.root), flush=True)
        train(preset, out, dataset=dataset, indices=indices, exclude=exclude, device=device, held=held)
    if finished_before:  # train() checked it is this run, with these settings and data (QA round 22: it said nothing)
        print(f"checkpoint: {out} (a finished run with these settings and data: nothing to train)")
    else:
        print(f"checkpoint: {out} ({time.time() - t0:.1f} s this run)")
    note = ema_start_share_note(preset.train.steps, preset.train.ema_decay)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    return 0


def _lock_unless_finished(out: Path, finished: bool) -> contextlib.AbstractContextManager[HeldLock | None]:
    """``out``'s training lock, held from before the data load to the end of the run (``training_folder``): two
    runs started together each passed a probe, loaded the data, and only then was one refused, by the lock
    ``train`` took.  A finished folder is only read, without a lock (the shipped weights may lie on a read-only
    install); ``train`` checks it is this run."""
    from ..model.train import check_not_training, training_folder

    if finished:
        return contextlib.nullcontext()
    check_not_training(out)  # --out below a file, on a read-only place, or busy: one line, before any folder is made
    return training_folder(out)


def ema_start_share_note(steps: int, decay: float | None, at_most: float = 0.05) -> str | None:
    """Why a short run's samples and attributions look untrained, when they will: the saved weights are the
    exponential moving average, which starts at the random initial weights and keeps ``decay**steps`` of them
    (no bias correction: the shipped recipes and every retrained model use it as it is).  QA 26 #10: at decay
    0.999, 300 steps kept 74% of the initial weights and drew noise, and nothing said why."""
    if decay is None or not 0 < decay < 1:  # no average (None, 0), or one that never moves (refused anyway)
        return None
    share = float(decay) ** int(steps)
    if share <= at_most:
        return None
    enough = math.ceil(math.log(at_most) / math.log(decay))
    return (f"the saved weights are an exponential moving average (train.ema_decay {decay:g}) that still holds "
            f"{100 * share:.0f}% of the random initial weights after {steps:,} steps: samples and attributions of "
            f"this model reflect little training; train for {enough:,} steps or more, or lower train.ema_decay "
            "in a preset file")


# --- sample --------------------------------------------------------------------------


@register
def add_sample(sub: argparse._SubParsersAction) -> None:
    p = subcommand(
        sub,
        "sample",
        cmd_sample,
        help="draw DDPM samples to a PNG grid or an .npz",
        description="Ancestral DDPM sampling with all T steps and the small variance. "
        ".png writes a grid; .npz writes `images` (n, C, H, W) in [0, 1], `seed`, `checkpoint` (the hash of "
        "the model that drew them), and with "
        "--trajectory the array `trajectory` (n, T+1, C, H, W), x_T first, in [-1, 1] space.",
    )
    p.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--out", required=True, help="output file: .png (grid) or .npz")
    p.add_argument("--trajectory", action="store_true", help="record x_T..x_0 (npz only)")


def cmd_sample(args: argparse.Namespace) -> int:
    from ..model.checkpoint import checkpoint_hash, load_checkpoint
    from ..model.sampling import generate, save_grid, save_npz

    out = Path(args.out)
    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    if out.suffix not in (".png", ".npz"):
        raise ValueError(f"--out must end in .png or .npz, got {out}")
    if args.trajectory and out.suffix != ".npz":
        raise ValueError("--trajectory needs an .npz output")
    check_output_file(out, "--out")
    wanted, ckpt, device = resolve(args)
    model, preset, _ = load_checkpoint(ckpt, device, wanted)  # a diffusers folder: the data as for query
    images, traj = generate(model, preset, args.n, args.seed, args.trajectory, device, progress=True)
    if out.suffix == ".png":
        save_grid(images, out)
    else:
        save_npz(images, out, args.seed, traj, checkpoint_hash(ckpt))
    print(f"wrote {out}")
    return 0



# --- assets (gallery, sample grid, loss curve, quality report) ---------------------------


@register
def add_assets(sub: argparse._SubParsersAction) -> None:
    subcommand(
        sub,
        "assets",
        cmd_assets,
        help="write the gallery, sample grid, loss curve and sample-quality report beside a checkpoint",
        description="Writes gallery.npz (32 samples with trajectories and classifier labels), "
        "samples_grid.png (8x8 samples, seed 0), train_loss.png and, for digits, sample_quality.json "
        "(fraction of 256 samples a logistic regression classifies with p >= 0.8 vs 256 real digits).",
    )


def cmd_assets(args: argparse.Namespace) -> int:
    from ..model.checkpoint import load_checkpoint
    from ..model.data import load_dataset
    from ..model.gallery import write_assets
    from ..validation import check_data_fits_model

    wanted, ckpt, device = resolve(args)
    model, preset, _ = load_checkpoint(ckpt, device, wanted)  # a diffusers folder's data: --preset's, as for query
    dataset = load_dataset(preset.data)
    check_data_fits_model(preset.model, dataset.shape)  # one line, not a failure inside a convolution
    report, written = write_assets(model, preset, ckpt, dataset, device)
    for path in written:
        print(f"wrote {path}")
    if report:
        print(jsonio.dumps(report, indent=2))
    else:  # it printed "{}" alone (QA 16)
        print("no sample-quality report: it needs a classifier of the data, which only digits and the shipped "
              "mnist have")
    return 0
