"""Small attribution methods for tests: minus the pixel distance to the query, with no cache and no gradient.

Why a module: tests of the registry, the group commands and the plugin rules each need a method that answers
at once and whose scores are known; each test subclasses ``PixelDistance`` for the one property it checks
(a name, a damping, NaN scores), instead of repeating the whole class.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.attribution.methods.base import AttributionMethod, FixedScores, Prepared, QueryInput, no_progress


class PixelDistance(AttributionMethod):
    """Minus the mean squared pixel distance to the query: a stand-in "influence" in one class."""

    name = "distance"
    title = "Pixel distance"
    kind = "influence"
    caption = "minus the squared pixel distance (a test method)"
    needs_gradient = False

    def build(self, ctx, progress=no_progress) -> None:
        return None

    def is_built(self, ctx) -> bool:
        return True

    def query_measurement(self, measurement):
        return None

    def distances(self, ctx, query: QueryInput) -> np.ndarray:
        """(N,) mean squared pixel distance of every training image to the query."""
        x = ctx.dataset.images.flatten(1)
        return ((x - query.image.flatten()[None]) ** 2).mean(1).numpy()

    def prepare(self, ctx, query: QueryInput, query_grad: torch.Tensor | None) -> Prepared:
        return FixedScores(scores=(-self.distances(ctx, query)).astype(np.float32))

    def score(self, prepared: Prepared, damping: float | None = None) -> np.ndarray:
        assert isinstance(prepared, FixedScores)
        return prepared.scores
