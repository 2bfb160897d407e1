"""Where things live on disk by default: shipped assets, user runs, caches."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS = REPO_ROOT / "assets"
SHIPPED_PRESETS = ("digits", "mnist")


def default_checkpoint(preset_name: str) -> Path:
    """digits and mnist ship in ``assets/<preset>``; other presets train into ``runs/<preset>``."""
    if preset_name in SHIPPED_PRESETS:
        return ASSETS / preset_name
    return REPO_ROOT / "runs" / preset_name


def cache_root() -> Path:
    """Attribution caches; override with ``ATTRIBUTION_CACHE``."""
    return Path(os.environ.get("ATTRIBUTION_CACHE", REPO_ROOT / "cache"))


def check_device(name: str) -> str:
    """``name`` when torch can place tensors there, else ValueError in words (QA 27 #4: ``--device cuda`` on a
    machine without a GPU, or a typo, ended ``sample``, ``train`` and the benches in a traceback, and ``train`` left
    an empty output folder behind)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: torch finds no CUDA GPU on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: torch finds no Apple GPU (mps) on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: the engine runs on cpu, cuda or mps")
    return name


def best_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
