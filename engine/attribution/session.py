"""AttributionSession: the one object the app and the CLI talk to.

It loads the checkpoint, the training set, the on-disk cache and the engine context
once, and then answers queries with every attribution method behind the same
interface (``engine.attribution.methods.base``).  Data flows one way (DESIGN.md 1): the session
turns a query spec into a ``QueryInput``, computes the query gradient(s), hands them to
the methods and returns plain ``QueryResult`` records (score arrays, no tensors).

Why the query path is shaped this way:

* **Common random numbers** (DESIGN.md 6): one seeded set of M draws (t, eps),
  ``make_draws(M, shape, T, seed=config.seed + 1)``, is shared by every method, so two
  methods differ only in what they are, not in Monte Carlo noise.  The seed is offset
  from the training draws' seed (``config.seed``) so that a training image used as a
  query does not reuse its own training draws.
* **One gradient per measurement**: grad m(q) is computed once per distinct
  ``method.query_measurement(measurement)`` (K-FAC and TRAK share the loss gradient;
  D-TRAK asks for the square norm) and shared.
* **Damping is cheap**: each method's damping-independent state (``Prepared``) is kept
  with the result, so ``rescore`` only calls ``score`` (for K-FAC one division and one
  pass over the eigenbasis bank, DESIGN.md 4; for TRAK one solve in F's eigenbasis).
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import AttributionConfig, Preset, get_preset, trak_default_damping
from ..model.checkpoint import CheckpointError, checkpoint_hash, load_checkpoint
from ..model.data import ImageDataset, load_dataset
from ..model.diffusion import Diffusion, MCDraws, make_draws
from ..model.measurements import Measurement, parse_measurement, quantize
from ..paths import best_device, default_checkpoint
from ..paths import cache_root as default_cache_root
from .methods.base import AttributionMethod, Prepared, Progress, QueryInput, Unavailable, no_progress
from .results import MethodResult, QueryResult

log = logging.getLogger(__name__)

GALLERY_FILE = "gallery.npz"
METHOD_ORDER = ("kfac", "trak", "dtrak", "clip", "pixel")


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


def data_key(dataset: ImageDataset) -> str:
    """Cache key of a training set: name, size and a hash of its images and labels.

    Two data sets with the same name but other content (a subset, other files) get
    different keys, so a cache can never be scored against the wrong images.
    """
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(dataset.images.detach().cpu().numpy(), dtype=np.float32).tobytes())
    if dataset.labels is not None:
        h.update(np.ascontiguousarray(dataset.labels.cpu().numpy(), dtype=np.int64).tobytes())
    return f"{dataset.name}-n{len(dataset)}-{h.hexdigest()[:12]}"


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
    mode = img.mode
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
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


def _open_image(data: bytes, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise QueryError(f"{what} is not a readable PNG or JPEG image ({e})") from e
    if img.format not in ("PNG", "JPEG", "MPO", "BMP", "GIF", "WEBP", "TIFF"):
        raise QueryError(f"{what} is a {img.format} file; upload a PNG or JPEG image")
    return img


# --- the session ----------------------------------------------------------------------------


class AttributionSession:
    """Model + training set + caches, loaded once; answers attribution queries.

    ``auto_build``: build a method's cache on first use instead of reporting it as
    "unavailable: not built".  The app turns this on only where building is quick.
    """

    def __init__(
        self,
        preset: str | Preset = "digits",
        checkpoint: str | Path | None = None,
        device: str | None = None,
        cache_root: str | Path | None = None,
        config: AttributionConfig | None = None,
        dataset: ImageDataset | None = None,
        auto_build: bool = False,
    ):
        t0 = time.perf_counter()
        wanted = get_preset(preset) if isinstance(preset, str) else preset
        folder = Path(checkpoint) if checkpoint is not None else default_checkpoint(wanted.name)
        self.device = torch.device(device or best_device())
        try:
            model, ckpt_preset, extra = load_checkpoint(folder, self.device)
        except CheckpointError as e:
            raise CheckpointError(
                f"{e}. Train one with `attribution-engine train --preset {wanted.name}` "
                f"(or pass --checkpoint FOLDER)"
            ) from e
        # The checkpoint's own preset describes the model and data it was trained on; the
        # caller chooses the data root (--data-root) and the attribution settings.
        self.preset: Preset = ckpt_preset
        if wanted.data.root:
            self.preset = self.preset.replace(data={"root": wanted.data.root})
        self.config: AttributionConfig = config or wanted.attribution
        self.preset = self.preset.replace(attribution=self.config)
        self.checkpoint = folder
        self.checkpoint_extra = extra
        self.model = model
        self.diffusion = Diffusion(self.preset.diffusion)
        self.dataset: ImageDataset = dataset if dataset is not None else load_dataset(self.preset.data)
        self._check_shapes()
        self.checkpoint_hash = checkpoint_hash(folder)
        self.auto_build = auto_build

        from .store import Store

        self.cache_root = Path(cache_root) if cache_root is not None else default_cache_root()
        self.store = Store(self.cache_root, self.checkpoint_hash, data_key(self.dataset))
        self.ctx = self._make_context()
        from .methods import METHODS, make_method

        self._methods: dict[str, AttributionMethod] = {}
        for name in sorted(METHODS, key=lambda n: (METHOD_ORDER + (n,)).index(n)):
            try:
                self._methods[name] = make_method(name, self.config)
            except ImportError as e:  # a missing optional dependency disables one method only
                self._methods[name] = _MissingMethod(name, f"cannot import the {name} method: {e}")
        self._gallery: list[GalleryItem] | None = None
        self._classifier = None
        self.startup_ms = (time.perf_counter() - t0) * 1000.0

    # --- setup ------------------------------------------------------------------------

    def _check_shapes(self) -> None:
        m = self.preset.model
        want = (m.in_channels, m.image_size, m.image_size)
        if tuple(self.dataset.shape) != want:
            raise ValueError(
                f"training images are {tuple(self.dataset.shape)} but the model takes {want}; "
                "check --preset/--data-root against the checkpoint"
            )

    def _make_context(self):
        from .context import make_context

        return make_context(
            self.preset,
            self.model,
            self.dataset,
            self.device,
            config=self.config,
            checkpoint_hash=self.checkpoint_hash,
            store=self.store,
            diffusion=self.diffusion,
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        m = self.preset.model
        return (m.in_channels, m.image_size, m.image_size)

    @property
    def labels(self) -> np.ndarray | None:
        return None if self.dataset.labels is None else self.dataset.labels.cpu().numpy()

    # --- methods ----------------------------------------------------------------------

    def method_names(self) -> list[str]:
        return list(self._methods)

    def method(self, name: str) -> AttributionMethod:
        try:
            return self._methods[name]
        except KeyError:
            raise ValueError(
                f"unknown method {name!r}; valid methods: {', '.join(self._methods)}"
            ) from None

    def _resolve_methods(self, methods: list[str] | None) -> list[str]:
        if methods is None:
            return self.method_names()
        for n in methods:
            self.method(n)
        return list(dict.fromkeys(methods))

    def method_info(self) -> dict[str, dict]:
        """name -> {"title", "kind", "caption", "default_damping"} for the app's labels."""
        return {
            n: {
                "title": m.title,
                "kind": m.kind,
                "caption": m.caption,
                "default_damping": self._default_damping(n),
            }
            for n, m in self._methods.items()
        }

    def _default_damping(self, name: str) -> float | None:
        m = self._methods[name]
        if m.kind != "influence":
            return None
        if name == "kfac":
            return float(self.config.kfac_damping)
        if name in ("trak", "dtrak"):
            return trak_default_damping(self.config, name, len(self.dataset))
        return None if m.default_damping is None else float(m.default_damping)

    def _availability(self, m: AttributionMethod) -> tuple[bool, str | None]:
        try:
            return m.availability(self.ctx)
        except Unavailable as e:
            return False, str(e)

    def _size_mb(self, name: str) -> float:
        """Disk size of a method's caches under the current settings (``AttributionMethod.size_mb``)."""
        try:
            return float(self._methods[name].size_mb(self.ctx))
        except Exception:  # noqa: BLE001 - a size is informative only
            log.debug("size_mb failed for %s", name, exc_info=True)
            return 0.0

    def recorded_build_seconds(self, name: str) -> float | None:
        """Build time stored with a method's current caches when they were built."""
        try:
            return self._methods[name].recorded_build_seconds(self.ctx)
        except Exception:  # noqa: BLE001 - informative only
            log.debug("recorded_build_seconds failed for %s", name, exc_info=True)
            return None

    def _settings(self, name: str) -> dict[str, Any]:
        m = self._methods[name]
        if hasattr(m, "settings"):
            try:
                s = m.settings(self.ctx)
                if isinstance(s, dict):
                    return s
            except Exception:  # noqa: BLE001 - informative only
                log.debug("settings failed for %s", name, exc_info=True)
        c = self.config
        common = {"mc_samples": c.mc_samples, "seed": c.seed}
        per = {
            "kfac": {"fisher_type": c.fisher_type, "kfac_approx": c.kfac_approx, "ekfac": c.ekfac},
            "trak": {"trak_dim": c.trak_dim},
            "dtrak": {"trak_dim": c.trak_dim},
            "clip": {"clip_model": c.clip_model, "clip_pretrained": c.clip_pretrained},
            "pixel": {},
        }.get(name, {})
        return {**(common if m.needs_gradient else {}), **per}

    def status(self) -> dict[str, dict]:
        """name -> {"built", "available", "reason", "settings", "size_mb"}."""
        out: dict[str, dict] = {}
        for name, m in self._methods.items():
            available, reason = self._availability(m)
            built = bool(available and m.is_built(self.ctx))
            if available and not built and reason is None:
                reason = self._not_built_reason(name)
            out[name] = {
                "built": built,
                "available": available,
                "reason": reason,
                "settings": self._settings(name),
                "size_mb": self._size_mb(name) if built else 0.0,
            }
        return out

    def _not_built_reason(self, name: str) -> str:
        extra = f" --mc-samples {self.config.mc_samples}" if self._methods[name].needs_gradient else ""
        return f"not built: run `attribution-engine build --preset {self.preset.name} --methods {name}{extra}`"

    def build(self, methods: list[str] | None = None, progress: Progress | None = None) -> dict:
        """Build (or load) each method's cache; {method: {"seconds", "size_mb", "status"[, "reason"]}}.

        ``progress(message, fraction)`` gets the method name prefixed to every message;
        fraction is the overall fraction over all methods asked for.
        """
        names = self._resolve_methods(methods)
        progress = progress or no_progress
        summary: dict[str, dict] = {}
        for k, name in enumerate(names):
            m = self._methods[name]

            def sub(msg: str, frac: float, k: int = k, name: str = name) -> None:
                progress(f"{name}: {msg}", (k + min(max(frac, 0.0), 1.0)) / len(names))

            available, reason = self._availability(m)
            if not available:
                summary[name] = {"status": "unavailable", "reason": reason, "seconds": 0.0, "size_mb": 0.0}
                sub("unavailable", 1.0)
                continue
            t0 = time.perf_counter()
            try:
                m.build(self.ctx, sub)
            except Unavailable as e:
                summary[name] = {"status": "unavailable", "reason": str(e), "seconds": 0.0, "size_mb": 0.0}
                continue
            sub("done", 1.0)
            summary[name] = {
                "status": "ok",
                "seconds": time.perf_counter() - t0,
                "size_mb": self._size_mb(name),
            }
        return summary

    def load(self, methods: list[str] | None = None) -> dict[str, float]:
        """Load every *built* cache now (factors, banks memory-mapped, features) so the first query
        is as fast as the others; builds nothing.  Returns seconds per method loaded."""
        out: dict[str, float] = {}
        for name in self._resolve_methods(methods):
            m = self._methods[name]
            if not self._availability(m)[0] or not m.is_built(self.ctx):
                continue
            t0 = time.perf_counter()
            m.build(self.ctx, no_progress)  # a built cache is loaded, not recomputed
            out[name] = time.perf_counter() - t0
        return out

    # --- queries ----------------------------------------------------------------------

    def gallery(self) -> list[GalleryItem]:
        """The checkpoint's ``gallery.npz`` (generated samples with trajectories); [] if absent."""
        if self._gallery is not None:
            return self._gallery
        path = self.checkpoint / GALLERY_FILE
        items: list[GalleryItem] = []
        if path.is_file():
            with np.load(path) as z:
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

    def parse_query(self, spec: str) -> QueryInput:
        """``gallery:3`` | ``train:17`` | ``image:PATH`` | ``generate:SEED`` -> QueryInput.

        Raises ``ValueError`` (``QueryError``) with a message saying what is accepted.
        """
        spec = spec.strip()
        kind, sep, arg = spec.partition(":")
        kind = kind.lower()
        usage = "expected gallery:N, train:N, image:PATH or generate:SEED"
        if not sep or not arg:
            raise QueryError(f"bad query {spec!r}: {usage}")
        if kind == "image":
            return self._query_from_path(Path(arg).expanduser())
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
                f"`attribution-engine assets --preset {self.preset.name}` or use train:N / image:PATH"
            )
        if not 0 <= i < len(items):
            raise QueryError(f"gallery index {i} out of range 0..{len(items) - 1}")
        g = items[i]
        notes = [f"generated sample {i} of the gallery (seed {g.seed})"]
        if g.label is not None:
            notes.append(f"label {g.label} predicted by a classifier, not ground truth")
        return QueryInput(image=g.image.clone(), trajectory=g.trajectory, description=f"gallery:{i}", label=g.label, notes=notes)

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
        img = _open_image(data, what)
        m = self.preset.model
        image, notes = image_to_model(img, m.in_channels, m.image_size, self.dataset.levels, self._dark_background())
        return QueryInput(image=image, trajectory=None, description="upload", label=self._predict_label(image), notes=notes)

    def query_from_upload(self, data: bytes, name: str | None = None) -> QueryInput:
        """PNG/JPEG bytes -> the model's size and channels; ``notes`` say what was done; ValueError on bad data."""
        q = self._query_from_bytes(bytes(data), f"upload {name!r}" if name else "the upload")
        q.description = f"upload:{name}" if name else "upload"
        return q

    def _predict_label(self, image: torch.Tensor) -> int | None:
        """Digits only: the label a logistic regression on the real digits gives (for display and agreement)."""
        if self.preset.data.name != "digits" or self.dataset.labels is None:
            return None
        from ..model.gallery import classify, digits_classifier

        if self._classifier is None:
            self._classifier = digits_classifier(self.dataset)
        labels, _ = classify(self._classifier, image[None])
        return int(labels[0])

    def generate(self, seed: int, progress: Callable[[int, int], None] | None = None) -> QueryInput:
        """One new DDPM sample with its recorded trajectory (all T steps)."""
        from ..model.sampling import generate

        images, traj = generate(self.model, self.preset, 1, int(seed), True, self.device, progress)
        image = images[0].clamp(-1.0, 1.0)
        notes = [f"generated with seed {seed} ({self.diffusion.T} DDPM steps)"]
        label = self._predict_label(image)
        if label is not None:
            notes.append(f"label {label} predicted by a classifier, not ground truth")
        return QueryInput(image=image, trajectory=traj[0], description=f"generate:{seed}", label=label, notes=notes)

    def query_draws(self, mc_samples: int | None = None) -> MCDraws:
        """The common random numbers of every query: M draws seeded by config.seed + 1."""
        m = int(mc_samples or self.config.mc_samples)
        return make_draws(m, self.shape, self.diffusion.T, seed=self.config.seed + 1)

    def query_gradient(self, measurement: Measurement, query: QueryInput, draws: MCDraws) -> torch.Tensor:
        """grad_theta m(theta, x_q) (P,) in ``ctx.params`` order (model in eval mode)."""
        from . import gradients

        self.model.eval()
        return gradients.measurement_grad(
            self.model,
            self.diffusion,
            measurement,
            query,
            draws.to(self.device),
            self.dataset.levels,
            params=list(self.ctx.params),
        )

    def query(
        self,
        query: QueryInput,
        measurement: str = "loss",
        methods: list[str] | None = None,
        damping: dict[str, float] | None = None,
        mc_samples: int | None = None,
    ) -> QueryResult:
        """Scores of every training image for ``query`` under each method.

        Methods that are not built (and ``auto_build`` is off) or cannot run here come back
        with status "unavailable" and a reason saying how to enable them.
        """
        t_start = time.perf_counter()
        names = self._resolve_methods(methods)
        meas = parse_measurement(measurement, self.diffusion.T)
        self._check_query(query, meas)
        damping = dict(damping or {})
        draws = self.query_draws(mc_samples)
        grads: dict[Measurement, tuple[torch.Tensor, float]] = {}
        results: dict[str, MethodResult] = {}
        prepared: dict[str, Prepared] = {}
        total_grad_ms = 0.0
        for name in names:
            m = self._methods[name]
            res = self._empty_result(name)
            results[name] = res
            available, reason = self._availability(m)
            if not available:
                res.status, res.reason = "unavailable", reason
                continue
            if not m.is_built(self.ctx):
                if not self.auto_build:
                    res.status, res.reason = "unavailable", self._not_built_reason(name)
                    continue
                try:
                    t0 = time.perf_counter()
                    m.build(self.ctx, no_progress)
                    res.timing_ms["build"] = (time.perf_counter() - t0) * 1000.0
                except Unavailable as e:
                    res.status, res.reason = "unavailable", str(e)
                    continue
            try:
                qm = m.query_measurement(meas)
                grad = None
                if qm is not None:
                    if qm.kind == "trajectory" and query.trajectory is None:
                        raise QueryError(_no_trajectory(query))
                    if qm not in grads:
                        t0 = time.perf_counter()
                        g = self.query_gradient(qm, query, draws)
                        ms = (time.perf_counter() - t0) * 1000.0
                        grads[qm] = (g, ms)
                        total_grad_ms += ms
                    grad, ms = grads[qm]
                    res.timing_ms["gradient"] = ms
                else:
                    res.timing_ms["gradient"] = 0.0
                t0 = time.perf_counter()
                prep = m.prepare(self.ctx, query, grad)
                res.timing_ms["prepare"] = (time.perf_counter() - t0) * 1000.0
                prepared[name] = prep
                res.damping = self._damping_for(name, damping)
                self._score_into(res, m, prep)
                if qm is not None and qm != meas:
                    res.reason = f"uses the {qm} measurement"
            except Unavailable as e:
                res.status, res.reason = "unavailable", str(e)
            except QueryError:
                raise
            except Exception as e:  # noqa: BLE001 - one broken method must not hide the others
                log.exception("method %s failed", name)
                res.status, res.reason = "error", f"{type(e).__name__}: {e}"
        timing = {"total": (time.perf_counter() - t_start) * 1000.0, "gradients": total_grad_ms}
        out = QueryResult(
            query=self._query_dict(query, len(draws)),
            measurement=str(meas),
            methods=results,
            timing_ms=timing,
        )
        out._prepared = prepared  # type: ignore[attr-defined]  # damping-free state for rescore
        return out

    def rescore(self, result: QueryResult, damping: dict[str, float]) -> QueryResult:
        """The same query with other damping values: only ``score`` runs, no gradient, no prepare."""
        prepared: dict[str, Prepared] | None = getattr(result, "_prepared", None)
        if prepared is None:
            raise ValueError("this result holds no per-query state (was it copied or loaded?); run query() again")
        t_start = time.perf_counter()
        methods: dict[str, MethodResult] = {}
        for name, old in result.methods.items():
            if name not in damping or name not in prepared or old.status != "ok":
                methods[name] = old
                continue
            m = self._methods[name]
            res = replace(old, timing_ms={**old.timing_ms})
            res.damping = float(damping[name]) if m.kind == "influence" else None
            self._score_into(res, m, prepared[name])
            methods[name] = res
        timing = {"total": (time.perf_counter() - t_start) * 1000.0, "rescore": 1.0}
        out = QueryResult(query=result.query, measurement=result.measurement, methods=methods, timing_ms=timing)
        out._prepared = prepared  # type: ignore[attr-defined]
        return out

    # --- helpers ----------------------------------------------------------------------

    def _empty_result(self, name: str) -> MethodResult:
        m = self._methods[name]
        return MethodResult(name=name, title=m.title, kind=m.kind, caption=m.caption, status="ok")

    def _damping_for(self, name: str, damping: dict[str, float]) -> float | None:
        if self._methods[name].kind != "influence":
            return None
        if name in damping and damping[name] is not None:
            return float(damping[name])
        return self._default_damping(name)

    def _score_into(self, res: MethodResult, m: AttributionMethod, prep: Prepared) -> None:
        t0 = time.perf_counter()
        scores = np.asarray(m.score(prep, res.damping), dtype=np.float32).reshape(-1)
        res.timing_ms["score"] = (time.perf_counter() - t0) * 1000.0
        if scores.shape[0] != len(self.dataset):
            raise RuntimeError(f"{m.name} returned {scores.shape[0]} scores for {len(self.dataset)} training images")
        res.scores = scores
        res.status = "ok"

    def _check_query(self, query: QueryInput, meas: Measurement) -> None:
        if query.image is None and meas.kind != "trajectory":
            raise QueryError(f"measurement {meas} needs a query image")
        if query.image is not None and tuple(query.image.shape) != self.shape:
            raise QueryError(f"query image is {tuple(query.image.shape)}, the model takes {self.shape}")
        if meas.kind == "trajectory":
            if query.trajectory is None:
                raise QueryError(_no_trajectory(query))
            want = (self.diffusion.T + 1, *self.shape)
            if tuple(query.trajectory.shape) != want:
                raise QueryError(f"trajectory is {tuple(query.trajectory.shape)}, expected {want}")

    def _query_dict(self, query: QueryInput, m: int) -> dict[str, Any]:
        return {
            "spec": query.description,
            "description": _describe(query.description),
            "label": query.label,
            "notes": list(query.notes),
            "has_trajectory": query.trajectory is not None,
            "mc_samples": m,
        }


class _MissingMethod(AttributionMethod):
    """Stand-in for a method whose module cannot be imported: always unavailable, with the reason."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.title = name
        self.reason = reason

    def availability(self, ctx: Any) -> tuple[bool, str | None]:
        return False, self.reason

    def build(self, ctx: Any, progress: Progress = no_progress) -> None:
        raise Unavailable(self.reason)

    def is_built(self, ctx: Any) -> bool:
        return False

    def prepare(self, ctx: Any, query: QueryInput, query_grad: torch.Tensor | None) -> Prepared:
        raise Unavailable(self.reason)

    def score(self, prepared: Prepared, damping: float | None = None) -> np.ndarray:
        raise Unavailable(self.reason)


def _no_trajectory(query: QueryInput) -> str:
    return (
        f"the trajectory measurement needs a recorded sampling trajectory, and {query.description or 'this query'} "
        "has none: use a gallery sample (gallery:N) or a generated one (generate:SEED), or another measurement"
    )


def _describe(spec: str) -> str:
    kind, _, arg = spec.partition(":")
    return {
        "gallery": f"generated sample {arg} from the gallery",
        "train": f"training image {arg}",
        "image": f"image file {arg}",
        "upload": f"uploaded image {arg}".strip(),
        "generate": f"new sample generated with seed {arg}",
    }.get(kind, spec)
