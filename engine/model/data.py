"""Training sets as tensors in [-1, 1] with labels and a stable index per image.

Loaders: scikit-learn digits (embedded default), CIFAR-10 python pickles, CIFAR-2
(car/horse subset), and an image folder.  Bad input raises ``DataError`` naming the file.
"""

from __future__ import annotations

import torch

from ..config import DataConfig
from .dataset import DataError, ImageDataset, random_flip, to_unit_range


def load_digits() -> ImageDataset:
    """scikit-learn's handwritten digits: 1,797 8x8 images, 17 grey levels (0..16)."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0 * 2.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    return ImageDataset(
        name="digits",
        images=x,
        labels=y,
        class_names=[str(i) for i in range(10)],
        ids=[f"digits:{i}" for i in range(len(x))],
        levels=17,
    )


def load_dataset(cfg: DataConfig) -> ImageDataset:
    """Dispatch on ``cfg.name``."""
    if cfg.name == "digits":
        return load_digits()
    if cfg.name in ("cifar10", "cifar2", "folder"):
        from . import data_files

        return data_files.load(cfg)
    raise DataError(f"unknown dataset {cfg.name!r}: expected digits, cifar10, cifar2 or folder")


__all__ = ["DataError", "ImageDataset", "load_dataset", "load_digits", "random_flip", "to_unit_range"]
