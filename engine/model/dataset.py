"""The training-set record: N images in [-1, 1] with labels and a stable id per image.

Kept apart from the loaders (``engine.model.data`` for the embedded digits and the
dispatch, ``engine.model.data_files`` for CIFAR and folders) so that both loader modules
depend on it and not on each other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    """Bad or missing training data; the message names the offending file or folder."""


def data_folder(root: str | Path, what: str) -> Path:
    """``root`` as a folder, or a DataError that says whether it is missing or a file (``what``:
    "CIFAR data folder", "image folder", ...)."""
    folder = Path(root).expanduser()
    if not folder.exists():
        raise DataError(f"{what} {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{what} {folder} is a file; --data-root takes the folder that holds the data")
    return folder


@dataclass
class ImageDataset:
    """N images (N, C, H, W) float32 in [-1, 1]; ``ids[i]`` is a stable name for image i."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: list[str] | None
    ids: list[str]
    levels: int

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def content_digest(self, length: int = 16) -> str:
        """SHA-256 (first ``length`` hex) of the images (float32) and labels: what a cache or a trained
        run depends on, whatever the data's name or where its files were read from."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.images.detach().cpu().numpy(), dtype=np.float32).tobytes())
        if self.labels is not None:
            h.update(np.ascontiguousarray(self.labels.cpu().numpy(), dtype=np.int64).tobytes())
        return h.hexdigest()[:length]

    def label_name(self, i: int) -> str | None:
        if self.labels is None:
            return None
        lab = int(self.labels[i])
        return self.class_names[lab] if self.class_names else str(lab)

    def subset(self, indices: list[int] | np.ndarray | torch.Tensor) -> ImageDataset:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ImageDataset(
            name=self.name,
            images=self.images[idx],
            labels=None if self.labels is None else self.labels[idx],
            class_names=self.class_names,
            ids=[self.ids[int(i)] for i in idx],
            levels=self.levels,
        )


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] for display."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)



def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Horizontal flip of each image with probability 1/2 (data augmentation, paper G.8)."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    out = x.clone()
    out[flip] = out[flip].flip(-1)
    return out
