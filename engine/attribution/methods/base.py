"""One interface for every attribution method (DESIGN.md 4-5).

Life cycle, driven by ``engine.attribution.session.AttributionSession``:

1. ``build(ctx, progress)``: compute or load the method's cache (banks, factors,
   projections, embeddings).  Idempotent: a built cache is loaded, not recomputed.
2. ``prepare(ctx, query, query_grad)``: the per-query work that does not depend on
   damping (rotate/project the query gradient, embed the query image).  ``query_grad``
   is the flat gradient (P,) of ``self.query_measurement(measurement)`` w.r.t. the model
   parameters (in ``ctx.params`` order), computed once by the session and shared by
   every method that asks for the same measurement (common random numbers).
3. ``score(prepared, damping)``: scores for all N training images, float32 (N,).
   Influence methods use DESIGN.md's sign and scale: positive = proponent, and
   tau_i = (1/N) grad m^T (G + lambda I)^{-1} grad l_i.  Changing damping calls only this.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...model.measurements import Measurement

Progress = Callable[[str, float], None]  # (message, fraction done in [0, 1])


def no_progress(message: str, fraction: float) -> None:
    return None


@dataclass
class QueryInput:
    """What is being attributed: an image (C, H, W) in [-1, 1] and, if sampled, its trajectory."""

    image: torch.Tensor | None
    trajectory: torch.Tensor | None = None  # (T+1, C, H, W), x_T first
    description: str = ""
    label: int | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Prepared:
    """Damping-independent per-query state of one method."""

    data: Any
    timing_ms: dict[str, float] = field(default_factory=dict)


class Unavailable(RuntimeError):
    """Raised by ``build``/``prepare`` when a method cannot run here; the message says why and how to enable it."""


class AttributionMethod(ABC):
    name: str = ""
    title: str = ""
    kind: str = "influence"  # influence | similarity
    caption: str = ""  # one plain-language line for the app
    needs_gradient: bool = True
    default_damping: float | None = None

    @abstractmethod
    def build(self, ctx: Any, progress: Progress = no_progress) -> None: ...

    @abstractmethod
    def is_built(self, ctx: Any) -> bool: ...

    def availability(self, ctx: Any) -> tuple[bool, str | None]:
        return True, None

    def cache_keys(self, ctx: Any) -> list[tuple[str, dict[str, Any]]]:
        """(name, settings) of every store artefact this method uses under the current settings.

        Sizes and recorded build times are read from these only, so caches of other settings kept
        beside them (another M, another projection) are not counted.
        """
        return []

    def size_mb(self, ctx: Any) -> float:
        """Disk size of this method's caches for the current settings (MiB)."""
        if ctx.store is None:
            return 0.0
        return sum(ctx.store.size_mb(n, s) for n, s in self.cache_keys(ctx))

    def recorded_build_seconds(self, ctx: Any) -> float | None:
        """Build time stored with the current caches when they were built (None if none recorded)."""
        if ctx.store is None:
            return None
        secs = [(ctx.store.load_meta(n, s) or {}).get("build_seconds") for n, s in self.cache_keys(ctx)]
        secs = [float(x) for x in secs if x is not None]
        return sum(secs) if secs else None

    def query_measurement(self, measurement: Measurement) -> Measurement | None:
        """Which measurement's gradient this method needs (None: no gradient)."""
        return measurement if self.needs_gradient else None

    @abstractmethod
    def prepare(self, ctx: Any, query: QueryInput, query_grad: torch.Tensor | None) -> Prepared: ...

    @abstractmethod
    def score(self, prepared: Prepared, damping: float | None = None) -> np.ndarray: ...
