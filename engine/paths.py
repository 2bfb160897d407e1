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


def best_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
