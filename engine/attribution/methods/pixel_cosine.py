"""Pixel-space similarity (docs/architecture.md §5): the nearest-neighbour check of memorisation studies.

score_i = cos(c(x_q), c(x_i)),  c(x) = x - mean(x)  (flattened [-1, 1] values)

Each image is centred by its own mean before the cosine, i.e. the score is the Pearson
correlation of the two images' pixel values.  Why centred: raw [-1, 1] cosine is dominated
by the shared background (on digits every image is mostly -1, so all raw cosines are near
1); centring removes that common offset and a global brightness shift, so the score
reflects the shape of the image.  A constant (blank) query has no shape: its correlation with
anything is undefined, so the method answers "unavailable" with that reason instead of a ranking
of zeros in index order (a constant training image scores 0).  Not a removal prediction: shown
as similarity in [-1, 1], never summed.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ...config import AttributionConfig
from ..context import EngineContext
from . import register
from .base import AttributionMethod, FixedScores, Prepared, Progress, QueryInput, Unavailable, no_progress

EPS = 1e-12


def centred_unit(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, D): flattened, centred per image, unit norm (zero rows stay zero)."""
    flat = x.reshape(x.shape[0], -1).float()
    flat = flat - flat.mean(dim=1, keepdim=True)
    norm = flat.norm(dim=1, keepdim=True)
    return torch.where(norm > EPS, flat / norm.clamp_min(EPS), torch.zeros_like(flat))


@register
class PixelCosine(AttributionMethod):
    """Correlation of pixel values between the query and each training image."""

    name = "pixel"
    order = 40
    title = "Pixel similarity"
    kind = "similarity"
    caption = (
        "How alike the pixels look (correlation of pixel values); a nearest-neighbour check, not influence."
    )
    needs_gradient = False

    def __init__(self, config: AttributionConfig | None = None):
        super().__init__(config)
        self._train: dict[int, torch.Tensor] = {}

    def _train_matrix(self, ctx: EngineContext) -> torch.Tensor:
        images = ctx.dataset.images
        key = id(images)
        if key not in self._train:
            self._train = {key: centred_unit(images.detach().cpu())}
        return self._train[key]

    def build(self, ctx: EngineContext, progress: Progress = no_progress) -> None:
        self._train_matrix(ctx)
        progress(f"{self.title}: ready", 1.0)

    def is_built(self, ctx: EngineContext) -> bool:
        return True  # nothing to cache: the training matrix takes milliseconds

    def query_measurement(self, measurement: Any) -> None:
        return None

    def prepare(self, ctx: EngineContext, query: QueryInput, query_grad: torch.Tensor | None = None) -> Prepared:
        if query.image is None:
            raise ValueError("pixel similarity needs a query image")
        t0 = time.perf_counter()
        train = self._train_matrix(ctx)
        img = query.image.detach().cpu().float()
        if tuple(img.shape) != tuple(ctx.dataset.images.shape[1:]):
            raise ValueError(
                f"query image shape {tuple(img.shape)} differs from the training images' "
                f"{tuple(ctx.dataset.images.shape[1:])}"
            )
        q = centred_unit(img[None])[0]
        if not bool(q.any()):  # every pixel the same value: centred, nothing is left to correlate
            raise Unavailable(
                "the query image is blank (every pixel has the same value), so its pixel correlation with "
                "the training images is undefined; query an image with some content"
            )
        scores = (train @ q).clamp(-1.0, 1.0).numpy().astype(np.float32)  # cosine; rounding can exceed 1
        return FixedScores(scores=scores, timing_ms={"similarity": (time.perf_counter() - t0) * 1e3})

    def score(self, prepared: Prepared, damping: float | None = None) -> np.ndarray:
        assert isinstance(prepared, FixedScores)
        return prepared.scores
