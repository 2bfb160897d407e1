"""One interface for every attribution method (docs/architecture.md §4-5).

Life cycle, driven by ``engine.attribution.session.AttributionSession``:

1. ``build(ctx, progress)``: compute or load the method's cache (banks, factors,
   projections, embeddings).  Idempotent: a built cache is loaded, not recomputed.
   ``is_built(ctx)`` says, cheaply, whether it is loaded or complete on disk (``status``, the app's build
   worker and a query's auto-build ask it before deciding to build).
2. ``prepare(ctx, query, query_grad)``: the per-query work that does not depend on
   damping (rotate/project the query gradient, embed the query image).  ``query_grad``
   is the flat gradient (P,) of ``self.query_measurement(measurement)`` w.r.t. the model
   parameters (in ``ctx.params`` order), computed once by the session and shared by
   every method that asks for the same measurement (common random numbers).
3. ``score(prepared, damping)``: scores for all N training images, float32 (N,).
   Influence methods use docs/architecture.md §4's sign and scale: positive = proponent, and
   tau_i = (1/N) grad m^T (G + lambda I)^{-1} grad l_i.  Changing damping calls only this.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...config import AttributionConfig
from ...model.measurements import Measurement
from ..context import EngineContext
from ..plugins import DEFAULT_ORDER
from ..query import QueryInput
from ..scoring import EigenbasisQuery

Progress = Callable[[str, float], None]  # (message, fraction done in [0, 1])


def no_progress(message: str, fraction: float) -> None:
    """The default ``Progress``: says nothing."""
    return None


@dataclass(kw_only=True)
class Prepared:
    """Damping-independent per-query state of one method; each family of methods subclasses it
    (no untyped payload: the session keeps it for ``rescore`` and reads nothing else)."""

    timing_ms: dict[str, float] = field(default_factory=dict)
    bank: str | None = None  # K-FAC: "stored" | "compressed" | "streamed" (reported per method)
    exact: np.ndarray | None = None  # (N,) bool: which scores are exact (None: all of them)
    exact_pending: bool = False  # work that makes some scores exact is deferred (compressed bank's re-rank)
    exact_end: np.ndarray | None = None  # (N,) int8: a re-ranked candidate's end (results.MethodResult.exact_end)
    estimate_scale: float | None = None  # the factor on the estimates (rerank.scale_estimates; None: unscaled)


@dataclass(kw_only=True)
class FixedScores(Prepared):
    """State of a method whose scores do not depend on damping (similarities, or an influence method without a
    damping such as a plain gradient dot product): the scores, also summed for group answers."""

    scores: np.ndarray


@dataclass(kw_only=True)
class EigenPrepared(Prepared):
    """State of an influence method scored by the eigenbasis operator (K-FAC, TRAK, D-TRAK)."""

    query: EigenbasisQuery


SERVER, QUERY = "server", "query"  # what an ``Unavailable`` is about


class Unavailable(RuntimeError):
    """Raised by ``build``/``prepare`` when a method cannot answer; the message says why and how to enable it.

    ``about`` says whose the problem is, because the remedy differs and so does who reads it: ``SERVER`` (the
    default) when this installation lacks something (CLIP's weights, open_clip, a cache): the message names
    files and commands for whoever runs the server; ``QUERY`` when this query cannot be scored by the method
    although the method works here (a blank image has no pixel correlation): the message is for the person
    who chose the query, and another query would do.  It travels into ``MethodResult.reason_about`` and the
    query's JSON, so a caller never has to guess it from the words."""

    def __init__(self, message: str, *, about: str = SERVER):
        if about not in (SERVER, QUERY):
            raise ValueError(f"Unavailable(about=...) is {SERVER!r} or {QUERY!r}, not {about!r}")
        super().__init__(message)
        self.about = about


@dataclass
class ExactGroupScores:
    """Exact group sums and member scores for a method whose batched (Q, N) matrix is an estimate (K-FAC
    with a compressed bank: its batched product is the compressed scan, on another scale than eq. 6).

    ``group_changes(members)``: (Q,) float64, sum_{i in R} tau_i(q) for every query of the set, exact;
    ``member_scores(indices)``: (Q, len) exact tau_i(q) of those training images for every query;
    ``note``: what is exact and what is estimated, for the page and the JSON; ``cache``: what was computed,
    kept with the matrix it belongs to (the app keeps matrices across page runs, and a run that only
    changes the shown sample must not recompute a group's gradients)."""

    group_changes: Callable[[np.ndarray], np.ndarray]
    member_scores: Callable[[np.ndarray], np.ndarray]
    note: str
    cache: dict[tuple, np.ndarray] = field(default_factory=dict, repr=False)


class AttributionMethod(ABC):
    """A method describes itself with these class attributes; nothing outside
    ``engine.attribution.methods`` keeps a table of methods.

    * ``name``, ``title``, ``caption``: how it is called on the command line and shown in the app;
    * ``order``: its place in every list of methods (lower first);
    * ``kind``: "influence" (scores on eq. 6's sign and scale, removal predictions) or "similarity";
    * ``damping_field``: the ``AttributionConfig`` field holding its default damping (None: no
      damping); ``configured_damping`` reads it, the one place a default damping is computed;
    * ``damping_default``: the default damping of a method without such a field, declared in its own
      file, so that a method added as one file can take a damping without an edit to ``engine/config.py``
      (QA round 19); the slider and ``--damping NAME=VALUE`` move it as any other;
    * ``damping_range``: the dampings the app's slider offers (None: no slider);
    * ``config_fields``: its own section of ``AttributionConfig`` (shown with the cache status);
    * ``shards``: its build is split over ``torchrun`` ranks (``engine.distributed``);
    * ``in_sweeps``: the LDS sweeps its damping (``engine.evaluation.lds``);
    * ``lds_loss_variant``: for a measurement other than the loss, the LDS also scores it with
      the loss measurement (paper section 4.1: K-FAC with the loss predicts the ELBO best).

    Two optional hooks let one method's pass over the training gradients feed others' caches
    (``MethodCaches.share_gradient_passes``), so that a method offering or using such a pass is
    still one file: ``opens_gradient_pass`` / ``feed_gradient_pass`` / ``shared_pass_fraction``
    on the method that makes the pass (K-FAC's stored bank), ``feature_sink`` on the methods that
    can use it (TRAK, D-TRAK).
    """

    name: str = ""
    order: int = DEFAULT_ORDER  # what the registry's source scan assumes when a class sets none
    title: str = ""
    kind: str = "influence"  # influence | similarity
    caption: str = ""  # one plain-language line for the app
    needs_gradient: bool = True
    damping_field: str | None = None
    damping_default: float | None = None
    damping_range: tuple[float, float] | None = None
    config_fields: tuple[str, ...] = ()
    shards: bool = False
    in_sweeps: bool = False
    lds_loss_variant: bool = False
    default_damping: float | None = None  # set from the config by ``__init__``

    def __init__(self, config: AttributionConfig | None = None):
        self.config = config or AttributionConfig()
        self.default_damping = self.configured_damping(self.config)

    @classmethod
    def configured_damping(cls, config: AttributionConfig, num_train: int | None = None) -> float | None:
        """The default damping under ``config`` (``damping_field``), None for methods without one.
        ``num_train`` (N) is for methods whose default scales with the training set (TRAK, D-TRAK)."""
        if cls.damping_field is not None:
            return float(getattr(config, cls.damping_field))
        return None if cls.damping_default is None else float(cls.damping_default)

    @classmethod
    def takes_damping(cls) -> bool:
        """Whether the scores depend on a damping: an influence method with a config field or a declared default."""
        return cls.kind == "influence" and (cls.damping_field is not None or cls.damping_default is not None)

    def settings(self, ctx: EngineContext) -> dict[str, Any]:
        """What this method's results depend on, for display: M and seed for gradient methods,
        plus its ``config_fields``.  Methods with caches return their cache key instead."""
        c = self.config
        common = {"mc_samples": c.mc_samples, "seed": c.seed} if self.needs_gradient else {}
        return {**common, **{f: getattr(c, f) for f in self.config_fields}}

    def build_plan(self, ctx: EngineContext) -> str | None:
        """One line on what building this method will do (its passes, what it stores), printed before a build
        starts; None when there is nothing worth saying (the default)."""
        return None

    def damping_floor(self) -> float | None:
        """The smallest damping whose scores do not weigh numerical rounding (None: no such limit, the default)."""
        return None

    def floor_or_recorded(self, recorded: float | None) -> float | None:
        """This method's own ``damping_floor`` once it has one (its factors loaded), else ``recorded``: the floor
        written beside scores this instance did not compute (a cached matrix, the precomputed file; QA 36 #1, #2).
        The one rule for which floor an answer states and warns by."""
        own = self.damping_floor()
        return own if own is not None else recorded

    def damping_warning(self, damping: float | None, floor: float | None = None) -> str | None:
        """A line the answer carries when this method's scores at ``damping`` weigh numerical rounding (K-FAC below
        its factors' resolution); None when they do not, or the method has no such limit (the default).  ``floor``:
        the ``damping_floor`` recorded with scores this instance did not compute (a cached matrix, the precomputed
        file), used when it has not loaded its own."""
        return None

    @abstractmethod
    def build(self, ctx: EngineContext, progress: Progress = no_progress) -> None:
        """Compute or load this method's cache for ``ctx`` under the current settings, and keep what scoring
        needs in memory.

        Idempotent: a cache complete in ``ctx.store`` (the keys of ``cache_keys``) is loaded, not recomputed,
        and a second call on the same context returns at once.  A long build writes its rows through
        ``ctx.store.partial`` so that a killed build resumes, and reports through ``progress(message,
        fraction)`` (fraction in [0, 1]).  Raise ``Unavailable`` when this installation cannot build it
        (a missing package or weights).  A method without a cache builds nothing."""
        ...

    @abstractmethod
    def is_built(self, ctx: EngineContext) -> bool:
        """Whether this method is ready to score under ``ctx``'s current settings: loaded in memory by ``build``,
        or complete on disk (``ctx.store.exists`` of each of ``cache_keys``).

        Must be cheap, never loading or building anything: ``status`` (the CLI's and the app's cache panel),
        the app's build worker and each query's auto-build call it, the app on every page run.  A method
        without a cache returns True."""
        ...

    def availability(self, ctx: EngineContext) -> tuple[bool, str | None]:
        """(whether it can run in this installation, why not): checked before ``build``, so a method whose
        optional package or weights are missing is listed as unavailable with the reason instead of failing.
        By default available."""
        return True, None

    def cache_keys(self, ctx: EngineContext) -> list[tuple[str, dict[str, Any]]]:
        """(name, settings) of every store artefact this method uses under the current settings.

        Sizes and recorded build times are read from these only, so caches of other settings kept
        beside them (another M, another projection) are not counted.
        """
        return []

    def size_mb(self, ctx: EngineContext) -> float:
        """Disk size of this method's caches for the current settings (MiB)."""
        if ctx.store is None:
            return 0.0
        return sum(ctx.store.size_mb(n, s) for n, s in self.cache_keys(ctx))

    def recorded_build_seconds(self, ctx: EngineContext) -> float | None:
        """Build time stored with the current caches when they were built (None if none recorded)."""
        if ctx.store is None:
            return None
        secs = [(ctx.store.load_meta(n, s) or {}).get("build_seconds") for n, s in self.cache_keys(ctx)]
        secs = [float(x) for x in secs if x is not None]
        return sum(secs) if secs else None

    def recorded_build_sharing(self, ctx: EngineContext) -> dict[str, Any]:
        """Whether the current caches were built in a shared gradient pass, from their meta:
        {"shared_with": method} when that method's pass computed this one's gradients (the pass's
        seconds are in that method's record, this one's ``recorded_build_seconds`` is only its own work
        around it), {"fed": [methods]} when this one's pass also filled theirs (its seconds include
        their share); {} otherwise.  A shared pass cannot be split, so readers say so (QA round 12)."""
        out: dict[str, Any] = {}
        if ctx.store is None:
            return out
        for n, s in self.cache_keys(ctx):
            meta = ctx.store.load_meta(n, s) or {}
            if meta.get("gradient_pass_shared_with"):
                out["shared_with"] = str(meta["gradient_pass_shared_with"])
            for m in meta.get("gradient_pass_fed") or ():
                out.setdefault("fed", []).append(str(m))
        return out

    def query_measurement(self, measurement: Measurement) -> Measurement | None:
        """Which measurement's gradient this method needs (None: no gradient)."""
        return measurement if self.needs_gradient else None

    def exact_group_scores(self, ctx: EngineContext, query_grads: Callable[[], torch.Tensor],
                           damping: float | None) -> ExactGroupScores | None:
        """None when this method's batched scores (``batch.score_batch``) are its scores; otherwise the
        exact group sums and member scores the group views use instead (``query_grads()``: the query set's
        (Q, P) gradients, computed on first use)."""
        return None

    def opens_gradient_pass(self, ctx: EngineContext) -> bool:
        """Whether this method's next build makes a pass over the training set's per-example
        gradients (its draws, ``ctx.params``) that other methods' ``feature_sink``s can share."""
        return False

    def feed_gradient_pass(self, sinks: list[Any]) -> None:
        """Hand the sinks to this method's next gradient pass (only called when
        ``opens_gradient_pass`` said yes)."""
        raise NotImplementedError(f"{self.name} makes no gradient pass that others can share")

    @classmethod
    def shared_pass_fraction(cls, own_fraction: float) -> float:
        """The fed methods' progress in the build bar while this one builds, given its own build fraction.
        By default that fraction itself: their work is part of this build (their own build is then about a
        second), so their share of the bar moves with its time, passes before the shared one included.  (Until
        2026-12-06 K-FAC's counted only its bank pass, and the app's bar stood at 19% through an mnist build's
        factor pass, three quarters of its time.)"""
        return own_fraction

    def feature_sink(self, ctx: EngineContext) -> Any | None:
        """A consumer of another method's gradient pass that fills this method's cache, or None
        when this method cannot use one (or its cache is built)."""
        return None

    @abstractmethod
    def prepare(self, ctx: EngineContext, query: QueryInput, query_grad: torch.Tensor | None) -> Prepared:
        """The query's damping-independent state, once per query (rotate or project the gradient, embed the
        image), as a ``Prepared`` subclass: ``EigenPrepared`` for rows scored by the eigenbasis operator,
        ``FixedScores`` for a score vector, else one of its own (then scored query by query).

        ``query_grad``: the flat gradient (P,) of ``query_measurement(measurement)`` w.r.t. ``ctx.params``,
        shared with every method asking for the same measurement; None when ``query_measurement`` is None.
        Called after ``build`` (a method may call it itself when its cache is not loaded).  Raise
        ``Unavailable(..., about=QUERY)`` when this query cannot be scored (a blank image for a correlation)."""
        ...

    @abstractmethod
    def score(self, prepared: Prepared, damping: float | None = None) -> np.ndarray:
        """Scores of all N training images for this query, float32 (N,), finite.

        ``damping``: None for the method's ``default_damping``; ignored by a method that takes none
        (``takes_damping``).  Influence methods follow docs/architecture.md §4's sign and scale, eq. 6:
        tau_i = (1/N) grad m^T (G + lambda I)^{-1} grad l_i, positive for a proponent.  A damping change
        calls only this, so it must be quick (the eigenbasis operator caches a damping grid)."""
        ...


class MissingMethod(AttributionMethod):
    """Stand-in for a method whose module cannot be imported: always unavailable, with the reason."""

    def __init__(self, name: str, reason: str, declared: Any = None):
        super().__init__()
        self.name = name
        # the title and kind its file declares (``plugins.Declared``), so lists name it in its own words
        self.title = getattr(declared, "title", None) or name
        if getattr(declared, "kind", None):
            self.kind = declared.kind
        self.reason = reason

    def availability(self, ctx: EngineContext) -> tuple[bool, str | None]:
        """Never available: the reason names the file and what went wrong."""
        return False, self.reason

    def build(self, ctx: EngineContext, progress: Progress = no_progress) -> None:
        """Raises ``Unavailable`` with the reason."""
        raise Unavailable(self.reason)

    def is_built(self, ctx: EngineContext) -> bool:
        """Never built."""
        return False

    def prepare(self, ctx: EngineContext, query: QueryInput, query_grad: torch.Tensor | None) -> Prepared:
        """Raises ``Unavailable`` with the reason."""
        raise Unavailable(self.reason)

    def score(self, prepared: Prepared, damping: float | None = None) -> np.ndarray:
        """Raises ``Unavailable`` with the reason."""
        raise Unavailable(self.reason)
