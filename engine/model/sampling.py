"""Sampling helpers shared by the CLI, the gallery builder and the app: grids and npz files."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import Preset
from ..files import atomic_write_bytes
from .data import to_unit_range
from .diffusion import Diffusion, check_sample_seed


def image_shape(preset: Preset) -> tuple[int, int, int]:
    m = preset.model
    return (m.in_channels, m.image_size, m.image_size)


def generate(
    model: nn.Module,
    preset: Preset,
    n: int,
    seed: int,
    trajectory: bool = False,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | bool | None = None,
    desc: str = "sampling",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw ``n`` DDPM samples (values in [-1, 1]); with a tqdm bar titled ``desc`` when ``progress`` is True
    (a command drawing several sets names each: QA 25 #10, ``assets`` showed three bars all "sampling")."""
    check_sample_seed(seed, n)  # before the bar starts
    bar = None
    cb = progress if callable(progress) else None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=preset.diffusion.num_timesteps, desc=desc, unit="step")

        def cb(step: int, total: int) -> None:
            bar.update(1)

    out = Diffusion(preset.diffusion).sample(
        model, n, image_shape(preset), seed, trajectory=trajectory, device=device, progress=cb
    )
    if bar is not None:
        bar.close()
    return out


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 4) -> None:
    """Save images in [-1, 1] as one PNG grid (nearest-neighbour upscaled ``scale`` times)."""
    from PIL import Image

    x = to_unit_range(images).cpu().numpy()  # (n, C, H, W)
    n, c, h, w = x.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    pad = 1
    grid = np.ones((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad), dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = x[i]
    arr = (grid * 255).round().astype(np.uint8)
    img = Image.fromarray(arr[0], "L") if c == 1 else Image.fromarray(arr.transpose(1, 2, 0), "RGB")
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def save_npz(
    images: torch.Tensor, path: str | Path, seed: int, trajectory: torch.Tensor | None = None,
    checkpoint: str | None = None,
) -> None:
    """``images``: (n, C, H, W) in [0, 1]; ``trajectory`` (n, T+1, C, H, W) in model space; ``checkpoint``: the
    hash of the model that drew them, so a query of another model can say so (QA 26 #9: a trajectory of one model
    was scored as -log p(x_0:T) under another without a word)."""
    arrays = {"images": to_unit_range(images).numpy().astype(np.float32), "seed": np.array(seed)}
    if checkpoint is not None:
        arrays["checkpoint"] = np.asarray(checkpoint)
    if trajectory is not None:
        arrays["trajectory"] = trajectory.numpy().astype(np.float32)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
