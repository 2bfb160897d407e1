"""Query sources: every way a query image reaches the engine, as a ``QueryInput``.

``gallery:N`` (the checkpoint's shipped samples with their trajectories), ``train:N`` (a
training image), ``image:PATH`` and uploads (any PNG/JPEG, brought to the model's size,
channels and intensity grid, with notes saying what was done) and ``generate:SEED`` (a new
DDPM sample with its trajectory).  Digits queries get a label from a logistic regression on
the real digits, for display and agreement figures only.

The session owns one ``QuerySources``; the gradients and the methods only see ``QueryInput``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..config import Preset
from ..model.dataset import ImageDataset
from ..model.diffusion import Diffusion
from ..model.measurements import quantize
from ..npy_read import load_npz

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

GALLERY_FILE = "gallery.npz"


# the words of a note whose label the preset's pixel classifier predicted (a generated sample's, an upload's): the
# app says such a label as a guess, not as the label (explorer.results_view.label_line)
PREDICTED = "predicted by a classifier"


@dataclass
class QueryInput:
    """What is being attributed: an image (C, H, W) in [-1, 1] and, if sampled, its trajectory."""

    image: torch.Tensor | None
    trajectory: torch.Tensor | None = None  # (T+1, C, H, W), x_T first
    description: str = ""
    label: int | None = None
    notes: list[str] = field(default_factory=list)
    # how far ``label`` can be trusted when a classifier gave it: "" (ground truth, or a confident prediction),
    # "unsure" (probability under the confident level) or "guess" (a blank image, or one unlike the training set)
    label_doubt: str = ""
    # the training image this input is, pixel for pixel (an upload of a training file), else None: the app marks it
    # "query" in the grids, as it does a ``train:N`` query's own image (QA 29 #3)
    identical_to: int | None = None
    # what rebuilds the query beyond ``description``, kept in its answer's settings: a pool sample's
    # {"pool_seed": S, "pool_size": N} (QA 44 #3: an export of ``pool:I`` could not be rerun from its own settings)
    origin: dict[str, Any] = field(default_factory=dict)

    def digest(self) -> str | None:
        """16 hex digits of the model-ready image (and trajectory): what an export records beside the
        query's name, since two uploads of one file name (or one ``image:PATH`` rewritten) are different
        queries.  sha256 over the float32 bytes, so the same input on any device gives the same digest."""
        if self.image is None and self.trajectory is None:
            return None
        h = hashlib.sha256()
        for t in (self.image, self.trajectory):
            if t is not None:
                h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


class QueryError(ValueError):
    """A query that cannot be answered as asked; the message says why and what to do."""


@dataclass
class GalleryItem:
    """One shipped generated sample: image (C, H, W) in [-1, 1], its trajectory (T+1, C, H, W) x_T first."""

    index: int
    seed: int
    image: torch.Tensor
    trajectory: torch.Tensor | None
    label: int | None


# --- images from files and uploads --------------------------------------------------------


def image_to_model(
    img: Any, channels: int, size: int, levels: int, dark_background: bool
) -> tuple[torch.Tensor, list[str]]:
    """A PIL image -> (C, H, W) tensor in [-1, 1] of the model's size and channels, plus notes.

    Steps, each recorded in the notes when it changes something: drop alpha (composited
    on the training set's background colour), convert colour <-> grey, centre-crop to a
    square, resize with antialiasing, invert when the training images are light-on-dark
    and the upload is dark-on-light (judged by the border), map [0, 255] -> [-1, 1], and
    snap to the data's intensity grid when it is coarser than 8 bits (digits: 17 levels).
    """
    from PIL import Image

    notes: list[str] = []
    mode = img.info.get("source_mode", img.mode)  # as uploaded (``upload_guard.reducible`` may have converted it)
    if "original_size" in img.info:
        ow, oh = img.info["original_size"]
        notes.append(f"decoded {ow}x{oh} at reduced size {img.size[0]}x{img.size[1]}")
    if img.mode.startswith("I") or img.mode == "F":  # 16-bit / 32-bit / float grey: scale to 8 bits, not clip
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else _white_level(float(arr.max(initial=0.0)))
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
        notes.append(f"converted {mode} -> 8-bit grey")
    if img.mode in ("RGBA", "LA", "La", "PA", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255) if dark_background else (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
        notes.append(f"transparency composited on {'black' if dark_background else 'white'}")
    if channels == 1:
        if img.mode != "L":
            notes.append(f"converted {mode} -> grey")
            img = img.convert("L")
    elif channels == 3:
        if img.mode != "RGB":
            notes.append(f"converted {mode} -> RGB")
            img = img.convert("RGB")
    else:
        raise QueryError(f"models with {channels} channels cannot take image uploads")
    w, h = img.size
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
        notes.append(f"centre-cropped {w}x{h} -> {s}x{s}")
        w = h = s
    if (w, h) != (size, size):
        img = img.resize((size, size), Image.Resampling.LANCZOS if size > w else Image.Resampling.BOX)
        notes.append(f"resized {w}x{h} -> {size}x{size}")
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    x = torch.from_numpy(np.ascontiguousarray(arr))
    if dark_background and size > 2:
        border = torch.cat([x[:, 0].flatten(), x[:, -1].flatten(), x[:, :, 0].flatten(), x[:, :, -1].flatten()])
        if float(border.mean()) > 0.5:
            x = 1.0 - x
            notes.append("inverted (training images are light on a dark background)")
    x = x * 2.0 - 1.0
    notes.append("values mapped to [-1, 1]")
    if levels < 256:
        x = quantize(x, levels)
        notes.append(f"snapped to the {levels}-level grid of the training data")
    return x.float(), notes


def folder_image_to_model(img: Any, channels: int, size: int, levels: int) -> tuple[torch.Tensor, list[str]]:
    """A PIL image -> (C, H, W) tensor in [-1, 1], prepared as a folder data set's training images are
    (``engine.model.data_files.prepare_image``: no crop, alpha dropped, Lanczos resize to a square), so
    that a training file given as a query is its training row (exactly, unless it is large enough to be decoded
    at reduced size first, ``upload_guard.open_bounded``: then within a grey level or so); plus notes."""
    from ..model.data_files import prepare_image, uint8_to_model

    notes: list[str] = []
    if "original_size" in img.info:
        ow, oh = img.info["original_size"]
        notes.append(f"decoded {ow}x{oh} at reduced size {img.size[0]}x{img.size[1]}")
    w, h = img.size
    mode = img.mode
    arr = prepare_image(img, channels, size)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    steps = []  # what prepare_image did, in the words the shipped models' notes use (QA 28 #5)
    target = "grey" if channels == 1 else "RGB"
    if mode not in (("L",) if channels == 1 else ("RGB",)):
        steps.append(f"converted {mode} -> {target}")
    if "A" in mode or (mode == "P" and "transparency" in img.info):
        steps.append("transparency dropped (the colour under transparent pixels shows)")
    if (w, h) != (size, size):
        steps.append(f"resized {w}x{h} -> {size}x{size}" + (" (the aspect ratio not kept)" if w != h else ""))
    notes.append("prepared as the training folder's images were" + (": " + "; ".join(steps) if steps else ""))
    notes.append("values mapped to [-1, 1]" + (f" on the {levels}-level grid of the training data" if levels < 256 else ""))
    return uint8_to_model(np.ascontiguousarray(arr), levels), notes


def _white_level(top: float) -> float:
    """The value white has in a 32-bit integer or float grey image, guessed from its largest value:
    1 (floats in [0, 1]), 255 (8-bit values), 65535 (16-bit values) or the maximum itself."""
    for level in (1.0, 255.0, 65535.0):
        if top <= level:
            return level
    return top


def open_image(data: bytes, what: str, target_side: int = 8) -> PILImage:
    """Decode with bounded memory (``engine.attribution.upload_guard``); QueryError naming ``what`` when refused."""
    from .upload_guard import UploadError, open_bounded

    try:
        return open_bounded(data, what, target_side)
    except UploadError as e:
        raise QueryError(str(e)) from None


# --- query sources ---------------------------------------------------------------------


class QuerySources:
    """Turns query specs, files, uploads and seeds into ``QueryInput`` for one model and data set."""

    def __init__(
        self, preset: Preset, model: nn.Module, diffusion: Diffusion, dataset: ImageDataset,
        device: torch.device, checkpoint: Path, assets_command: str, checkpoint_hash: str | None = None,
        cache: Path | None = None,
    ):
        """``assets_command``: the command that makes this checkpoint's gallery, for the error when there is
        none (the session's, ``AttributionSession.command("assets")``, names the same files).  ``cache``: the
        model's cache folder, where the labelling classifier's fit is kept (``label_classifier._cached_fit``)."""
        self.preset, self.model, self.diffusion, self.dataset = preset, model, diffusion, dataset
        self.device, self.checkpoint, self.cache = device, Path(checkpoint), cache
        self.assets_command, self.checkpoint_hash = assets_command, checkpoint_hash
        self._gallery: list[GalleryItem] | None = None
        self._classifier: Any = None
        self._spread: tuple[float, int] | None = None  # copycheck.training_spread, once a label is predicted

    def classifier(self) -> Any:
        """The preset's labelling classifier (``label_classifier.classifier_for``: fitted once per cache folder,
        kept here), or None when the preset has none: the labels of generated samples, single or pooled."""
        if self._classifier is None:
            from ..model.label_classifier import classifier_for

            clf = classifier_for(self.preset, self.dataset, cache=self.cache)
            self._classifier = False if clf is None else clf
        return None if self._classifier is False else self._classifier

    @property
    def shape(self) -> tuple[int, int, int]:
        m = self.preset.model
        return (m.in_channels, m.image_size, m.image_size)

    def gallery(self) -> list[GalleryItem]:
        """The checkpoint's ``gallery.npz`` (generated samples with trajectories); [] if absent."""
        if self._gallery is not None:
            return self._gallery
        path = self.checkpoint / GALLERY_FILE
        items: list[GalleryItem] = []
        if path.is_file():
            with load_npz(path) as z:
                images = torch.from_numpy(np.asarray(z["images"], dtype=np.float32)) * 2.0 - 1.0
                n = images.shape[0]
                seeds = np.asarray(z["seeds"]) if "seeds" in z else np.zeros(n, dtype=np.int64)
                traj = torch.from_numpy(np.asarray(z["trajectory"], dtype=np.float32)) if "trajectory" in z else None
                labels = np.asarray(z["labels"]) if "labels" in z else None
            if tuple(images.shape[1:]) != self.shape:
                raise ValueError(f"{path}: gallery images are {tuple(images.shape[1:])}, the model takes {self.shape}")
            for i in range(n):
                items.append(
                    GalleryItem(
                        index=i,
                        seed=int(seeds[i]),
                        image=images[i],
                        trajectory=None if traj is None else traj[i],
                        label=None if labels is None else int(labels[i]),
                    )
                )
        self._gallery = items
        return items

    def parse(self, spec: str) -> QueryInput:
        """``gallery:3`` | ``train:17`` | ``image:PATH`` | ``generate:SEED`` | ``samples:FILE.npz:I`` -> QueryInput.

        Raises ``ValueError`` (``QueryError``) with a message saying what is accepted.
        """
        spec = spec.strip()
        kind, sep, arg = spec.partition(":")
        kind = kind.lower()
        usage = "expected gallery:N, train:N, image:PATH, generate:SEED, samples:FILE.npz:N or pool:N"
        if not sep or not arg:
            raise QueryError(f"bad query {spec!r}: {usage}")
        if kind == "image":
            return self._query_from_path(Path(arg).expanduser())
        if kind == "samples":
            return self._query_from_samples(spec, arg)
        if kind == "pool":  # a pool lives in a folder of the cache root, which the model's sources do not know
            raise QueryError(f"{spec!r} names a sample of a generated pool: use `query --query {spec} --pool-seed S` "
                             "or engine.attribution.pool.pool_query(session, I, seed)")
        if kind not in ("gallery", "train", "generate"):
            raise QueryError(f"bad query kind {kind!r} in {spec!r}: {usage}")
        try:
            i = int(arg)
        except ValueError:
            raise QueryError(f"bad number {arg!r} in query {spec!r}: {usage}") from None
        if kind == "generate":
            return self.generate(i)
        if kind == "train":
            n = len(self.dataset)
            if not 0 <= i < n:
                raise QueryError(f"training index {i} out of range 0..{n - 1}")
            label = None if self.dataset.labels is None else int(self.dataset.labels[i])
            return QueryInput(
                image=self.dataset.images[i].clone(),
                trajectory=None,
                description=f"train:{i}",
                label=label,
                notes=[f"training image {i} ({self.dataset.ids[i]}); no sampling trajectory"],
            )
        items = self.gallery()
        if not items:
            raise QueryError(
                f"no gallery at {self.checkpoint / GALLERY_FILE}; make one with "
                f"`{self.assets_command}` or use train:N / image:PATH"
            )
        if not 0 <= i < len(items):
            raise QueryError(f"gallery index {i} out of range 0..{len(items) - 1}")
        g = items[i]
        notes = [f"generated sample {i} of the {len(items)}-sample gallery (drawn in one batch, sampling seed {g.seed})"]
        if g.label is not None:
            notes.append(f"label {g.label} {PREDICTED}, not ground truth")
        return QueryInput(image=g.image.clone(), trajectory=g.trajectory, description=f"gallery:{i}", label=g.label, notes=notes)

    def _query_from_samples(self, spec: str, arg: str) -> QueryInput:
        """Sample I of a file ``attribution-engine sample --out FILE.npz [--trajectory]`` wrote, with its
        trajectory when the file holds one: the very image that command drew (QA round 21: a sample of such a
        file could not be asked about; ``generate:SEED`` is sample 0 of its seed, drawn again in a batch of one,
        which differs from a batch's in the last float bits)."""
        path_text, _, index_text = arg.rpartition(":")
        usage = "expected samples:FILE.npz:N (a file of `attribution-engine sample --out FILE.npz`)"
        try:
            i = int(index_text)
        except ValueError:
            raise QueryError(f"bad sample number {index_text!r} in {spec!r}: {usage}") from None
        path = Path(path_text).expanduser()
        if not path_text or not path.is_file():
            raise QueryError(f"no samples file at {path_text!r} in {spec!r}: {usage}")
        try:
            with load_npz(path) as z:
                arrays = {k: np.asarray(z[k]) for k in ("images", "trajectory", "seed", "checkpoint") if k in z.files}
        except (OSError, ValueError, EOFError):  # not an npz (numpy then speaks of pickles), or a damaged one
            raise QueryError(f"cannot read {path} as a samples file (not an .npz archive, or a damaged one): "
                             f"{usage}") from None
        if "images" not in arrays:
            raise QueryError(f"{path} holds no 'images' array: {usage}")
        images = arrays["images"].astype(np.float32)
        n = images.shape[0] if images.ndim == 4 else 0
        if not n:
            raise QueryError(f"{path}: 'images' is {images.shape}, not (n, C, H, W)")
        if not 0 <= i < n:
            raise QueryError(f"sample {i} out of range 0..{n - 1} in {path}")
        traj = arrays["trajectory"][i].astype(np.float32) if "trajectory" in arrays else None
        seed = int(arrays["seed"]) if "seed" in arrays and arrays["seed"].ndim == 0 else None
        if tuple(images.shape[1:]) != self.shape:
            raise QueryError(f"{path}: its samples are {tuple(images.shape[1:])}, this model makes {self.shape}")
        image = torch.from_numpy(images[i]) * 2.0 - 1.0  # the file's [0, 1] back to the model's range
        notes = [f"sample {i} of {path}" + (f" (sampling seed {seed}, drawn in one batch)" if seed is not None else "")]
        if traj is None:
            notes.append("the file holds no trajectory (`sample --trajectory` keeps one)")
        made_by = str(arrays["checkpoint"]) if "checkpoint" in arrays and arrays["checkpoint"].ndim == 0 else None
        if made_by is not None and self.checkpoint_hash is not None and made_by != self.checkpoint_hash:
            notes.append(f"drawn by another model (checkpoint {made_by}; this one is {self.checkpoint_hash})"
                         + (": its trajectory is that model's sampling path, scored under this model"
                            if traj is not None else ""))
        label, doubt, same = self._predict_label(image, notes)
        return QueryInput(image=image, trajectory=None if traj is None else torch.from_numpy(traj),
                          description=f"samples:{path}:{i}", label=label, notes=notes, label_doubt=doubt,
                          identical_to=same)

    def _dark_background(self) -> bool:
        x = self.dataset.images
        if x.shape[-1] <= 2:
            return False
        border = torch.cat([x[:, :, 0].flatten(), x[:, :, -1].flatten(), x[:, :, :, 0].flatten(), x[:, :, :, -1].flatten()])
        return float(border.mean()) < -0.5

    def _query_from_path(self, path: Path) -> QueryInput:
        if not path.is_file():
            raise QueryError(f"no image file at {path}")
        q = self._query_from_bytes(path.read_bytes(), f"image file {path}")
        q.description = f"image:{path}"
        return q

    def _query_from_bytes(self, data: bytes, what: str) -> QueryInput:
        if not data:
            raise QueryError(f"{what} is empty")
        m = self.preset.model
        img = open_image(data, what, m.image_size)
        if self.preset.data.name == "folder":  # made from image files: prepared exactly as they were
            image, notes = folder_image_to_model(img, m.in_channels, m.image_size, self.dataset.levels)
        else:
            image, notes = image_to_model(img, m.in_channels, m.image_size, self.dataset.levels, self._dark_background())
        label, doubt, same = self._predict_label(image, notes, nearest_always=True)
        return QueryInput(image=image, trajectory=None, description="upload", label=label, notes=notes,
                          label_doubt=doubt, identical_to=same)

    def query_from_upload(self, data: bytes, name: str | None = None) -> QueryInput:
        """PNG/JPEG bytes -> the model's size and channels; ``notes`` say what was done; ValueError on bad data."""
        q = self._query_from_bytes(bytes(data), f"upload {name!r}" if name else "the upload")
        q.description = f"upload:{name}" if name else "upload"
        return q

    def _predict_label(self, image: torch.Tensor, notes: list[str],
                       nearest_always: bool = False) -> tuple[int | None, str, int | None]:
        """(label, doubt, identical): the label the preset's pixel classifier gives (engine.model.label_classifier;
        digits, mnist), else None; ``doubt`` as ``QueryInput.label_doubt``; the training image the input equals,
        pixel for pixel, else None.  The pixel distances to the training set are computed when there is a label to
        give, or when ``nearest_always`` (an upload: the one input likely to be a training file itself).

        A note with the classifier's probability goes to ``notes``: an upload can be anything (a blank
        image still gets a digit), so the reader must see how sure the label is.  An image identical to a
        training image takes that image's own label (QA 28 #2: mnist training image 17, a clear 0, uploaded as
        it is, was "Label: 5" at probability 0.81; the classifier is wrong on 6% of mnist's training images)."""
        from ..model.label_classifier import CONFIDENT, classify
        from .copycheck import pixel_distances, training_spread

        clf = self.classifier()
        if clf is None and self.dataset.labels is None and not nearest_always:
            return None, "", None  # nothing to label with, and not an upload: no distances
        # any labelled training set, with or without a classifier (an image folder's class folders: QA 29 #3)
        dist = pixel_distances(image[None].to(self.dataset.images.dtype), self.dataset.images)[0]
        d, nearest = float(dist.min()), int(dist.argmin())
        same = nearest if d <= 1e-6 else None
        if same is not None and self.dataset.labels is not None:
            label = int(self.dataset.labels[nearest])
            notes.append(f"identical to training image #{nearest}, whose label ({self.dataset.label_name(nearest)}) "
                         "this is (ground truth, not the classifier's)")
            return label, "", same
        if same is not None:
            notes.append(f"identical to training image #{nearest}")
        if clf is None:
            return None, "", same
        labels, proba = classify(clf, image[None])
        p = float(proba[0])
        notes.append(f"label {int(labels[0])} {PREDICTED} with probability {p:.2f}, not ground truth")
        if self._spread is None:
            self._spread = training_spread(self.dataset.images)
        bound, sample = self._spread
        # a blank image is near a thin training digit on 28x28 (mnist: within the training spread), so the
        # distance alone let a blank upload's label stand unqualified (QA round 17)
        if bool((image == image.flatten()[0]).all()):
            notes.append("the image is blank (every pixel has the same value): there is nothing to label, so the "
                         "classifier's label is a guess")
            return int(labels[0]), "guess", None
        if d > bound:
            d_text, bound_text = apart(d, bound)
            notes.append(f"the image is unlike the training images: its pixel distance to the nearest is {d_text}, "
                         f"more than any of {sample} training images' to theirs ({bound_text}), so the "
                         "classifier's label is a guess")
            return int(labels[0]), "guess", None
        if p < CONFIDENT:
            notes.append(f"the classifier is unsure (probability under {CONFIDENT}), so the label may be wrong")
            return int(labels[0]), "unsure", None
        return int(labels[0]), "", None

    def generate(self, seed: int, progress: Callable[[int, int], None] | None = None) -> QueryInput:
        """One new DDPM sample with its recorded trajectory (all T steps)."""
        from ..model.sampling import generate

        images, traj = generate(self.model, self.preset, 1, int(seed), True, self.device, progress)
        image = images[0].clamp(-1.0, 1.0)
        notes = [f"generated with seed {seed} ({self.diffusion.T} DDPM steps)"]
        label, doubt, same = self._predict_label(image, notes)
        return QueryInput(image=image, trajectory=traj[0], description=f"generate:{seed}", label=label, notes=notes,
                          label_doubt=doubt, identical_to=same)


def apart(a: float, b: float, least: int = 2) -> tuple[str, str]:
    """``a`` and ``b`` with the fewest decimals (at least ``least``, at most 6) that tell them apart: "0.25 is more
    than 0.25" said nothing (QA 28 #6)."""
    for k in range(least, 7):
        sa, sb = f"{a:.{k}f}", f"{b:.{k}f}"
        if sa != sb:
            return sa, sb
    return f"{a:.6f}", f"{b:.6f}"


def no_trajectory(query: QueryInput) -> str:
    return (
        f"the trajectory measurement needs a recorded sampling trajectory, and {query.description or 'this query'} "
        "has none: use a gallery sample (gallery:N) or a generated one (generate:SEED), or another measurement"
    )


def describe(spec: str) -> str:
    """A query spec ("gallery:3", "train:12", "upload:name.png", ...) in words for a heading or a record; an
    unknown kind is returned as it is."""
    kind, _, arg = spec.partition(":")
    return {
        "gallery": f"generated sample {arg} from the gallery",
        "train": f"training image {arg}",
        "image": f"image file {arg}",
        "upload": f"uploaded image {arg}".strip(),
        "generate": f"new sample generated with seed {arg}",
        "samples": f"sample {arg.rpartition(':')[2]} of {arg.rpartition(':')[0]}",
    }.get(kind, spec)
