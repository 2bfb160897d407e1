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

The centring and the norms are computed in float64 and the unit vectors rounded to float32; the dot
products of those float32 vectors are summed in float64 and rounded to float32.  Why: float32
reductions take their order from the CPU's vector width, so two machines gave scores a few ULPs apart
(the shipped first-page scores, stored at float32 so that near-ties keep the live order, no longer
equalled the live ones on another CPU: 2026-12-05).  A product of two float32
values is exact in float64 and a float64 sum's error is far below float32's rounding step, so each
rounding gives the same float32 on every machine except for a value within ~1e-16 of a float32 rounding
boundary.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ...config import COMPUTE, AttributionConfig
from ..context import EngineContext
from . import register
from .base import (
    QUERY,
    AttributionMethod,
    FixedScores,
    Prepared,
    Progress,
    QueryInput,
    Unavailable,
    no_progress,
)

EPS = 1e-12


def centred_unit(x: torch.Tensor, chunk_rows: int = COMPUTE.pixel_chunk_rows) -> torch.Tensor:
    """(B, ...) -> (B, D) float32: flattened, centred per image, unit norm (zero rows stay zero).

    Worked in float64 ``chunk_rows`` rows at a time (``ComputeConfig.pixel_chunk_rows``: each float64 temporary
    is 100 MB at CIFAR's 3,072 values per image with the default), then rounded (module docstring: the same on
    every CPU, and the same for any chunk size: each row is worked alone)."""
    flat = x.detach().reshape(x.shape[0], -1)
    out = torch.empty(flat.shape, dtype=torch.float32)
    for lo in range(0, flat.shape[0], chunk_rows):
        rows = flat[lo : lo + chunk_rows].double()
        rows = rows - rows.mean(dim=1, keepdim=True)
        norm = rows.norm(dim=1, keepdim=True)
        out[lo : lo + chunk_rows] = torch.where(norm > EPS, rows / norm.clamp_min(EPS), torch.zeros_like(rows))
    return out


def cosines(train: torch.Tensor, q: torch.Tensor, chunk_rows: int = COMPUTE.pixel_chunk_rows) -> np.ndarray:
    """(N,) float32 ``train @ q`` of unit rows, summed in float64 ``chunk_rows`` rows at a time, then rounded;
    clamped to [-1, 1] (rounding can exceed 1)."""
    qd = q.double()
    out = np.empty(train.shape[0], dtype=np.float32)
    for lo in range(0, train.shape[0], chunk_rows):
        out[lo : lo + chunk_rows] = (train[lo : lo + chunk_rows].double() @ qd).clamp(-1.0, 1.0).numpy()
    return out


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
            self._train = {key: centred_unit(images.detach().cpu(), ctx.compute.pixel_chunk_rows)}
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
        q = centred_unit(img[None], ctx.compute.pixel_chunk_rows)[0]
        if not bool(q.any()):  # every pixel the same value: centred, nothing is left to correlate
            raise Unavailable(
                "the query image is blank (every pixel has the same value), so its pixel correlation with "
                "the training images is undefined; query an image with some content",
                about=QUERY,
            )
        scores = cosines(train, q, ctx.compute.pixel_chunk_rows)
        return FixedScores(scores=scores, timing_ms={"similarity": (time.perf_counter() - t0) * 1e3})

    def score(self, prepared: Prepared, damping: float | None = None) -> np.ndarray:
        assert isinstance(prepared, FixedScores)
        return prepared.scores
