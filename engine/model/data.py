"""Training sets as tensors in [-1, 1] with labels and a stable index per image.

Loaders: scikit-learn digits (embedded default), MNIST (the shipped 10,000 or IDX files,
``engine.model.data_mnist``), CIFAR-10 python pickles, CIFAR-2 (car/horse subset), and an
image folder.  Bad input raises ``DataError`` naming the file.
"""

from __future__ import annotations

import torch

from ..config import DataConfig
from ..validation import DATA_NAMES, word_list
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
        if cfg.root:  # it trained on the bundled digits while the run's config recorded this folder (QA 16)
            raise DataError(
                f"the digits data set is scikit-learn's bundled 8x8 digits and reads no folder, but a data "
                f"folder was given ({cfg.root}: by --data-root, or in the config.json of a checkpoint trained "
                "with one, which it ignored): pass --preset cifar10, cifar2 or mnist with --data-root, or a "
                "preset .json with data.name \"folder\" for an image folder (README: Bring your own data)"
            )
        return load_digits()
    if cfg.name == "mnist":
        from . import data_mnist

        return data_mnist.load_mnist(cfg)
    if cfg.name in ("cifar10", "cifar2", "folder"):
        from . import data_files

        return data_files.load(cfg)
    raise DataError(f"unknown dataset {cfg.name!r}: expected {word_list(DATA_NAMES)}")


__all__ = ["DataError", "ImageDataset", "load_dataset", "load_digits", "random_flip", "to_unit_range"]
