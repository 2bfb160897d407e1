"""Training sets read from files: CIFAR-10 python pickles, CIFAR-2, and image folders.

All loaders return an ``ImageDataset`` with float32 images (N, C, H, W) in [-1, 1] on the
data grid of ``cfg.levels`` intensity levels (so the discretised ELBO decoder of Ho et
al. 2020, eq. 13, sees the bins the data really has), and raise ``DataError`` naming the
offending file or folder for anything missing, unreadable or inconsistent.

- ``cifar10``: the standard ``cifar-10-batches-py`` pickles ``data_batch_1..5`` (each a
  dict with ``b"data"`` uint8 (n, 3072), channel-major 3x32x32, and ``b"labels"``), plus
  ``batches.meta`` for class names.  ids: ``"cifar10:data_batch_3:123"``.
- ``cifar2``: car (CIFAR label 1, "automobile") and horse (label 7) from the CIFAR-10
  training set, ``cfg.per_class`` of each drawn without replacement with ``cfg.seed``
  (paper App. G, following Zheng et al. 2024: 2,500 + 2,500).  Labels become 0/1, ids keep
  the original CIFAR-10 names.
- ``folder``: PNG/JPEG/BMP files found recursively, in sorted relative-path order (the
  relative path is the id), resized to ``cfg.image_size`` squares; labels are the
  immediate sub-folder names when every image sits in one.

The pickles are read with a restricted unpickler that only rebuilds numpy arrays: a
CIFAR file is data, and a pickle from an unknown source must not run code.
"""

from __future__ import annotations

import pickle
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import DataConfig
from . import decode_progress, folder_cache
from .dataset import DataError, ImageDataset, data_folder

CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
CIFAR2_LABELS = (1, 7)  # automobile (car), horse
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")

# Globals a numpy-array pickle may reference (numpy 1.x and 2.x module names).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("builtins", "bytearray"),
}




def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """What ``_codecs.encode`` does in a protocol-2 pickle written by Python 3 (bytes are stored as
    ``_codecs.encode(str, "latin1")`` there), restricted to Latin-1: other codecs (zlib, bz2, ...)
    are refused so the global cannot be used for anything but rebuilding bytes."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591") or errors != "strict":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r} (only latin1 is allowed)")
    if not isinstance(text, str):
        raise pickle.UnpicklingError("refusing _codecs.encode of a non-string")
    return text.encode("latin1")


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")


def load(cfg: DataConfig) -> ImageDataset:
    """Load the file-based dataset named by ``cfg.name`` (cifar10 | cifar2 | folder)."""
    if cfg.name == "cifar10":
        return load_cifar10(cfg)
    if cfg.name == "cifar2":
        return load_cifar2(cfg)
    if cfg.name == "folder":
        return load_folder(cfg)
    raise DataError(f"unknown file dataset {cfg.name!r}: expected cifar10, cifar2 or folder")


# --- CIFAR ---------------------------------------------------------------------------


def cifar_folder(root: str | Path | None) -> Path:
    """The folder holding the batches: ``root`` itself or ``root/cifar-10-batches-py``."""
    if root is None:
        raise DataError("CIFAR needs a data folder: pass --data-root (the cifar-10-batches-py folder)")
    root = data_folder(root, "CIFAR data folder")
    nested = root / "cifar-10-batches-py"
    if not (root / CIFAR_TRAIN_BATCHES[0]).exists() and nested.is_dir():
        return nested
    return root


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except FileNotFoundError as e:
        raise DataError(f"missing CIFAR file {path}") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError, OSError) as e:
        raise DataError(f"{path} is not a CIFAR-10 python pickle: {e}") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR-10 python pickle: expected a dict, got {type(obj).__name__}")
    # Python 2 pickles have bytes keys; re-saved ones may have str keys.
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 images (n, 3, 32, 32), int64 labels (n,)); checks every field."""
    d = _unpickle(path)
    for key in ("data", "labels"):
        if key not in d:
            raise DataError(f"{path}: CIFAR batch has no {key!r} entry (keys: {sorted(map(str, d))})")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (n, 3072), got {shape}")
    if data.dtype != np.uint8:
        raise DataError(f"{path}: 'data' must be uint8, got {data.dtype}")
    try:
        labels = np.asarray(d["labels"], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: 'labels' is not a list of integers: {e}") from e
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {labels.shape} labels for {data.shape[0]} images")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_class_names(folder: Path) -> list[str]:
    meta = folder / "batches.meta"
    if not meta.exists():
        return list(CIFAR_CLASSES)
    d = _unpickle(meta)
    names = d.get("label_names")
    if not isinstance(names, (list, tuple)) or len(names) != 10:
        raise DataError(f"{meta}: expected 'label_names' with 10 entries")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _check_cifar_cfg(cfg: DataConfig) -> None:
    if cfg.image_size not in (None, 32) or cfg.channels != 3:
        raise DataError(
            f"CIFAR images are 3x32x32 but the preset asks for {cfg.channels}x{cfg.image_size}; "
            "fix the preset's data section"
        )


def _read_cifar_train(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    _check_cifar_cfg(cfg)
    folder = cifar_folder(cfg.root)
    missing = [b for b in CIFAR_TRAIN_BATCHES if not (folder / b).is_file()]
    if missing:
        raise DataError(f"CIFAR folder {folder} lacks {', '.join(missing)}")
    xs, ys, ids = [], [], []
    for b in CIFAR_TRAIN_BATCHES:
        x, y = read_cifar_batch(folder / b)
        xs.append(x)
        ys.append(y)
        ids.extend(f"cifar10:{b}:{i}" for i in range(len(y)))
    return np.concatenate(xs), np.concatenate(ys), ids, _cifar_class_names(folder)


def uint8_to_model(x: np.ndarray, levels: int) -> torch.Tensor:
    """uint8 0..255 -> float32 in [-1, 1], snapped to the grid of ``levels`` values.

    In place on one float32 copy: the same float32 operations in the same order as ``(round(x / 255 * (L - 1))
    / (L - 1)) * 2 - 1`` (so the same bits, and the same ``content_digest``), without a new 600 MB array per
    step for 50,000 CIFAR-sized images, which took 3-9 s on a busy 2-core machine against 0.4 s now."""
    v = x.astype(np.float32)
    v /= 255.0
    if levels != 256:
        v *= levels - 1
        np.round(v, out=v)
        v /= levels - 1
    v *= 2.0
    v -= 1.0
    return torch.from_numpy(v)


def load_cifar10(cfg: DataConfig) -> ImageDataset:
    """All 50,000 CIFAR-10 training images with their labels."""
    x, y, ids, names = _read_cifar_train(cfg)
    return ImageDataset(
        name="cifar10",
        images=uint8_to_model(x, cfg.levels),
        labels=torch.from_numpy(y),
        class_names=names,
        ids=ids,
        levels=cfg.levels,
    )


def cifar2_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted CIFAR-10 train indices of ``per_class`` cars and ``per_class`` horses.

    Each class is subsampled without replacement with ``numpy.random.default_rng(seed)``
    (cars first, then horses), so the selection depends only on the seed and the data.
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for lab in CIFAR2_LABELS:
        pool = np.flatnonzero(labels == lab)
        if len(pool) < per_class:
            raise DataError(
                f"CIFAR-2 needs {per_class} images of class {CIFAR_CLASSES[lab]}, the data has {len(pool)}"
            )
        chosen.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def load_cifar2(cfg: DataConfig) -> ImageDataset:
    """CIFAR-2 (car vs horse) as in the paper's App. G; labels 0 = automobile, 1 = horse."""
    x, y, ids, names = _read_cifar_train(cfg)
    try:
        idx = cifar2_indices(y, cfg.per_class, cfg.seed)
    except DataError as e:  # name the folder, and the setting that asks for the count (QA 16)
        raise DataError(
            f"{e} (in {cifar_folder(cfg.root)}): CIFAR-10's training batches hold 5,000 of each; for fewer, "
            "set data.per_class in a preset .json (--preset mine.json)"
        ) from None
    remap = {lab: i for i, lab in enumerate(CIFAR2_LABELS)}
    return ImageDataset(
        name="cifar2",
        images=uint8_to_model(x[idx], cfg.levels),
        labels=torch.tensor([remap[int(v)] for v in y[idx]], dtype=torch.long),
        class_names=[names[lab] for lab in CIFAR2_LABELS],
        ids=[ids[i] for i in idx],
        levels=cfg.levels,
    )


# --- image folder --------------------------------------------------------------------


# image formats PIL reads that a folder data set does not: files with these suffixes are named in a warning, not
# read (reading them now would change the data set, and so the content digest, of folders trained on before)
UNREAD_IMAGE_SUFFIXES = (".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


def find_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive, hidden files skipped), sorted by relative path.

    Files in another image format (``UNREAD_IMAGE_SUFFIXES``) are skipped with a warning that names them (QA 33:
    a .webp was dropped silently, and the data set had one image fewer than the folder)."""
    visible = [p for p in root.rglob("*")
               if not any(part.startswith(".") for part in _relative_parts(p, root)) and p.is_file()]
    files = [p for p in visible if p.suffix.lower() in IMAGE_SUFFIXES]
    other = sorted(relative_id(p, root) for p in visible if p.suffix.lower() in UNREAD_IMAGE_SUFFIXES)
    if other:
        named = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
        warnings.warn(
            f"{root}: {len(other)} image file(s) in a format the folder data set does not read were skipped "
            f"({named}); convert them to {', '.join(IMAGE_SUFFIXES)} to include them",
            stacklevel=2,
        )
    return sorted(files, key=lambda p: relative_id(p, root))


def _relative_parts(p: Path, root: Path) -> tuple[str, ...]:
    """``p.relative_to(root).parts`` for a path that ``root.rglob`` made (``root``'s parts, then its own), without
    pathlib's re-parsing: 0.7 s for 50,000 files, where a listing is now most of a cached folder's load."""
    return p.parts[len(root.parts):]


def relative_id(p: Path, root: Path) -> str:
    """``p.relative_to(root).as_posix()`` for a path listed by ``find_images``: the image's id."""
    return "/".join(_relative_parts(p, root))


# The version of what makes a folder's pixels (``prepare_image``, ``_read_image``, the array layout of
# ``_decode_folder``): it is part of the decoded-folder cache's key (``folder_cache``), so bump it with any change
# to them, or a cache made by the old code would be read as the new code's pixels.
FOLDER_DECODE_VERSION = 1
# a folder this large gets a progress bar while it is decoded; so does a smaller one still decoding after this long
BAR_FILES = 2000
BAR_AFTER_S = 2.0
STARTING_DELAY_S = 3600.0  # tqdm's ``delay`` while a bar is made: it draws nothing until ``_DecodeBar`` set its clock


def prepare_image(img: Any, channels: int, size: int | None) -> np.ndarray:
    """A decoded PIL image -> uint8 (H, W) or (H, W, 3), as a training image of a folder data set is made:
    16-bit and float grey scaled to 8 bits, converted to grey or RGB (an alpha channel is dropped), and
    resized to ``size`` x ``size`` with Lanczos filtering, the aspect ratio not kept.  Queries on folder
    data (``image:PATH``, uploads) go through this same function, so that a training file queried by its
    path is its own training row (up to a grey level for a file large enough to be decoded at reduced size
    first; QA round 12: the query path centre-cropped and composited the alpha,
    and a 5x40 training image did not find itself among its 3 nearest)."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode != "F" and arr.max() > 255 else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8))
    img = img.convert("L" if channels == 1 else "RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def _read_image(path: Path, channels: int, size: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """The file's pixels as ``prepare_image`` makes them, and its own (width, height) before any resize."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return prepare_image(img, channels, size), img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e


def _decode_folder(root: Path, files: list[Path], channels: int, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Every file decoded by ``_read_image``, as one C-contiguous uint8 (N, C, H, W) array; all images must come
    out the same size.  With a bar on stderr for a large folder or a slow decode (``_DecodeBar``).  Also each
    file's own (width, height), int32 (N, 2), which ``_say_resize`` reads (kept in the decoded-folder cache)."""
    arrays, sizes, first_shape = [], [], None
    with _DecodeBar(len(files), root) as bar:
        for p in files:
            a, wh = _read_image(p, channels, size)
            sizes.append(wh)
            if first_shape is None:
                first_shape = a.shape
            elif a.shape != first_shape:
                raise DataError(
                    f"image {p} is {a.shape[1]}x{a.shape[0]} but {files[0]} is "
                    f"{first_shape[1]}x{first_shape[0]}; set image_size to resize all images"
                )
            arrays.append(a)
            bar.step()
    x = np.stack(arrays)
    return (np.ascontiguousarray(x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)),
            np.asarray(sizes, dtype=np.int32).reshape(len(files), 2))


class _DecodeBar:
    """A tqdm bar on stderr counting decoded images, as the engine's other bars are drawn (``bar_redraw.interval``:
    ``TQDM_MININTERVAL`` thins it in a log), and each count reported to ``decode_progress``'s listeners (the app's
    page), whatever the bar's size rule.  Why: decoding a large folder the first time takes minutes, which
    without a bar cannot be told from a hang.  Drawn from the start for ``BAR_FILES`` files or more, else only
    once the decode has taken ``BAR_AFTER_S``: a small folder (the tests', a tiny data set) stays quiet.  Opened
    after the first image, so a folder whose first file is unreadable gets its one error line and no bar."""

    def __init__(self, total: int, root: Path) -> None:
        self.total, self.root, self.done, self.bar = total, root, 0, None
        self.t0 = time.monotonic()

    def _open(self) -> None:
        from tqdm.auto import tqdm

        from ..bar_redraw import interval

        # ``delay``: no line from the constructor, which drew one before its clock could be set back to the decode's
        # start (it read 00:00 after a 2 s decode), with the images done so far as its ``initial``, which tqdm leaves
        # out of the rate (a Ctrl-C just after it opened showed the rate of one image)
        self.bar = tqdm(total=self.total, desc=f"decoding images in {self.root.name}", unit="img", file=sys.stderr,
                        delay=STARTING_DELAY_S, **interval(0.5))
        if self.bar.disable:  # a disabled bar (TQDM_DISABLE=1) has no clock (QA 37 #1: an AttributeError)
            return
        # its clock counts the decode from its start (QA 36 #9), and the images so far as done in that time: its first
        # line, and its first speed sample (the counts since its last draw), are the decode's mean speed
        self.bar.start_t = self.bar.last_print_t = self.bar._time() - (time.monotonic() - self.t0)
        self.bar.delay = 0.0
        self.bar.n = self.done
        self.bar.refresh()

    def step(self) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.t0
        if self.bar is None and self.done < self.total and (self.total >= BAR_FILES or elapsed >= BAR_AFTER_S):
            self._open()
        elif self.bar is not None:
            self.bar.update(1)
        decode_progress.report(self.root, self.done, self.total, elapsed)  # the app's page (decode_progress)

    def __enter__(self) -> _DecodeBar:
        decode_progress.report(self.root, 0, self.total, 0.0)  # a listener can say what is decoding before 1 image
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


_resize_said: set[tuple[str, int]] = set()


def _say_resize(root: Path, rel: list[str], sizes: np.ndarray, size: int | None) -> None:
    """A warning when any of the folder's images is not the size the model takes: those are resized, and a user
    who picked the wrong model for a folder (a 16x16 UNet on 32x32 images: diffusers weights name no data) must
    hear it (QA 45 #4: the page's "200 colour images of 16x16 pixels" read as a fact about the data).  Counted over
    every file's own size (``sizes``, (N, 2) width and height, from the decode or the decoded-folder cache): QA 46 #2
    found the first file's header alone silent on a mixed folder whose first image fitted, and overstating one whose
    first image alone did not.  Said once per folder and size in a process."""
    if size is None or (str(root), size) in _resize_said:
        return
    off = np.flatnonzero((sizes[:, 0] != size) | (sizes[:, 1] != size))
    if off.size == 0:
        return
    _resize_said.add((str(root), size))  # once per folder and size in a process, as the cache's warnings
    found, counts = np.unique(sizes[off], axis=0, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:3]
    shown = ", ".join(f"{int(found[k][0])}x{int(found[k][1])}" for k in order)
    more = f" and {len(found) - 3} other sizes" if len(found) > 3 else ""
    # the example is of the first size listed, the most frequent (QA 53 #2: it could be of a size left out)
    example = rel[next(i for i in off if (sizes[i] == found[order[0]]).all())]
    if off.size == len(rel):  # "all 5 images are not 16x16" read as "not all" (QA 53 #2)
        which = f"none of the {len(rel)} images is"
    else:
        which = f"{off.size} of {len(rel)} images {'is' if off.size == 1 else 'are'} not"
    warnings.warn(f"{root}: {which} {size}x{size} ({shown}{more}; e.g. {example}); each is resized to "
                  f"{size}x{size}, the size the model takes (its preset's or its UNet's image_size)", stacklevel=3)


_channels_said: set[tuple[str, int]] = set()
CHANNEL_SAMPLE = 8  # files whose colour ``_say_channels`` looks at, spread over the folder


def _is_colour(img: Any) -> bool:
    """Whether a PIL image holds colour: a colour mode with some pixel whose channels differ (an RGB file of a grey
    picture loses nothing when made grey)."""
    if img.mode in ("1", "L", "LA", "I", "F") or img.mode.startswith("I;16"):
        return False
    rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
    return bool((rgb[..., 0] != rgb[..., 1]).any() or (rgb[..., 1] != rgb[..., 2]).any())


def _say_channels(root: Path, files: list[Path], rel: list[str], channels: int) -> None:
    """A warning when the folder's images are colour and the model takes 1 channel (each is made grey), or grey and
    it takes 3 (each grey copied to RGB).  Why: a grayscale UNet given an RGB folder with no preset converted
    every image to grey and answered, silently (QA 54 F7); a line catches a wrong checkpoint.  Looks at up to
    ``CHANNEL_SAMPLE`` files spread over the folder (their pixels, not the decoded ones, which are converted
    already): colour when any of them is, grey when all are.  Said once per folder and channel count in a process."""
    from PIL import Image, UnidentifiedImageError

    if (str(root), channels) in _channels_said or channels not in (1, 3) or not files:
        return
    picks = sorted({round(i * (len(files) - 1) / max(CHANNEL_SAMPLE - 1, 1)) for i in range(CHANNEL_SAMPLE)})
    colour: list[tuple[int, str]] = []
    try:
        for i in picks:
            with Image.open(files[i]) as img:
                if _is_colour(img):
                    colour.append((i, img.mode))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return  # the decode itself said what it could not read
    _channels_said.add((str(root), channels))
    if channels == 1 and colour:
        i, mode = colour[0]
        warnings.warn(f"{root}: its images are colour (e.g. {rel[i]}, {mode}); each is converted to grey, the model's "
                      "1 channel (its preset's data.channels or its UNet's in_channels): check the checkpoint "
                      "against the folder", stacklevel=3)
    elif channels == 3 and not colour:
        warnings.warn(f"{root}: its images are grey (e.g. {rel[picks[0]]}); each is converted to RGB (its grey in "
                      "all 3 channels), the model's 3 channels (its preset's data.channels or its UNet's "
                      "in_channels): check the checkpoint against the folder", stacklevel=3)


def load_folder(cfg: DataConfig) -> ImageDataset:
    """Every image under ``cfg.root``; see the module docstring for ids and labels.  The decoded pixels come from
    ``folder_cache`` when the folder has not changed since they were last decoded (QA 33 #8: decoding a
    50,000-image folder took minutes on every command); the listing, its warnings, ids and labels are made
    afresh each time, as the cache's key needs the listing anyway."""
    if cfg.root is None:
        raise DataError("the folder dataset needs a data folder: pass --data-root")
    if cfg.channels not in (1, 3):
        raise DataError(f"channels must be 1 (grey) or 3 (RGB), got {cfg.channels}")
    root = data_folder(cfg.root, "image folder")
    files = find_images(root)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    rel = [relative_id(p, root) for p in files]
    x, sizes = folder_cache.load_or_decode(root, files, rel, cfg.channels, cfg.image_size, FOLDER_DECODE_VERSION,
                                           lambda: _decode_folder(root, files, cfg.channels, cfg.image_size))
    _say_resize(root, rel, sizes, cfg.image_size)
    _say_channels(root, files, rel, cfg.channels)
    labels, class_names = None, None
    loose = [r for r in rel if "/" not in r]
    if not loose:
        folders = [r.split("/", 1)[0] for r in rel]
        class_names = sorted(set(folders))
        lookup = {c: i for i, c in enumerate(class_names)}
        labels = torch.tensor([lookup[f] for f in folders], dtype=torch.long)
    elif len(loose) < len(rel):  # class folders with a few images beside them: say why there are no labels
        warnings.warn(
            f"{root}: {len(loose)} of {len(rel)} images (e.g. {loose[0]}) are not inside a class folder, so the "
            "data set has no labels; move them into one to keep the folders' labels",
            stacklevel=2,
        )
    return ImageDataset(
        name=f"folder:{root.name}",
        images=uint8_to_model(np.ascontiguousarray(x), cfg.levels),
        labels=labels,
        class_names=class_names,
        ids=rel,
        levels=cfg.levels,
    )
