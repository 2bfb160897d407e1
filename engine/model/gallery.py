"""The shipped query gallery and the sample-quality report of a checkpoint.

``make_gallery`` draws n samples with recorded trajectories (so every measurement,
trajectory included, works instantly in the app) and labels them with the preset's
classifier (``engine.model.label_classifier``; mnist's quality report is its held-out check).
``digits_quality`` answers "do the samples look like digits?" with a number: a
scikit-learn logistic regression trained on the real digits classifies samples, and
we report the fraction classified with probability >= 0.8, next to the same figure
for real digits, plus the class histogram.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import Preset
from ..files import atomic_write_bytes, save_json
from .data import ImageDataset, to_unit_range
from .label_classifier import classifier_for, classify, digits_classifier, heldout_quality
from .sampling import generate, save_grid

GALLERY = "gallery.npz"


def make_gallery(
    model: nn.Module,
    preset: Preset,
    folder: str | Path,
    dataset: ImageDataset | None,
    n: int = 32,
    seed: int = 1000,
    device: str = "cpu",
) -> Path:
    """Write ``gallery.npz``: images (n,C,H,W) in [0,1], seeds, trajectory (n,T+1,C,H,W) in [-1,1], labels."""
    images, traj = generate(model, preset, n, seed, trajectory=True, device=device, progress=True,
                           desc=f"gallery ({n} with trajectories)")
    arrays: dict[str, Any] = {
        "images": to_unit_range(images).numpy().astype(np.float32),
        "seeds": np.full(n, seed, dtype=np.int64),
        "sample_index": np.arange(n, dtype=np.int64),
        "trajectory": traj.numpy().astype(np.float32),
    }
    clf = classifier_for(preset, dataset)
    if clf is not None:
        labels, _ = classify(clf, images)
        arrays["labels"] = labels.astype(np.int64)
    path = Path(folder) / GALLERY
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return path


def digits_quality(
    model: nn.Module, preset: Preset, dataset: ImageDataset, n: int = 256, seed: int = 0, device: str = "cpu"
) -> dict[str, Any]:
    """Fraction of n generated vs n real digits classified with probability >= 0.8; class histogram."""
    clf = digits_classifier(dataset)
    samples, _ = generate(model, preset, n, seed, device=device, progress=True, desc=f"quality check ({n})")
    lab_s, p_s = classify(clf, samples)
    g = torch.Generator().manual_seed(seed)
    real = dataset.images[torch.randperm(len(dataset), generator=g)[:n]]
    _, p_r = classify(clf, real)
    return {
        "n": n,
        "seed": seed,
        "samples_confident_fraction": float((p_s >= 0.8).mean()),
        "real_confident_fraction": float((p_r >= 0.8).mean()),
        "samples_class_histogram": np.bincount(lab_s, minlength=10).tolist(),
        "note": "classifier: sklearn LogisticRegression on all 1,797 real digits (training accuracy set)",
    }


def plot_loss_curve(log_path: str | Path, out_png: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = json.loads(Path(log_path).read_text())
    steps = [r["step"] for r in log]
    loss = [r["loss"] for r in log]
    fig, ax = plt.subplots(figsize=(5, 3), dpi=120)
    ax.plot(steps, loss)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (EMA of batch mean)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())


def write_assets(
    model: nn.Module, preset: Preset, folder: str | Path, dataset: ImageDataset, device: str = "cpu"
) -> tuple[dict[str, Any], list[Path]]:
    """Everything ``assets/<preset>/`` ships beside the checkpoint: (the sample-quality report, empty when the
    data have no classifier; the files written)."""
    folder = Path(folder)
    written = [folder / "samples_grid.png", folder / "gallery.npz"]
    if (folder / "train_log.json").is_file():
        plot_loss_curve(folder / "train_log.json", folder / "train_loss.png")
        written.append(folder / "train_loss.png")
    report: dict[str, Any] = {}
    if preset.data.name == "mnist" and preset.data.root is None:
        # one draw of 256 (seed 0) serves the held-out check and, its first 64, the grid
        samples, _ = generate(model, preset, 256, 0, device=device, progress=True, desc="grid and held-out check (256)")
        report = {"seed": 0, **heldout_quality(classifier_for(preset, None), samples)}
        save_grid(samples[:64], folder / "samples_grid.png", nrow=8, scale=3)
    else:
        grid, _ = generate(model, preset, 64, 0, device=device, progress=True, desc="sample grid (64)")
        save_grid(grid, folder / "samples_grid.png", nrow=8, scale=6)
    make_gallery(model, preset, folder, dataset, device=device)
    if preset.data.name == "digits":
        report = digits_quality(model, preset, dataset, device=device)
    if report:
        save_json(folder / "sample_quality.json", report)
        written.append(folder / "sample_quality.json")
    return report, written
