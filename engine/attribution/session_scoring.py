"""Scoring a query: every method's scores for one query, and rescoring it with other dampings.

``SessionScoring`` is a mixin that ``AttributionSession`` inherits, not a helper object it delegates to:
``query`` is the session's main entry, and it runs on the session's own methods through ``self`` (the
availability and builds of ``SessionBuilds``, the draws and gradients of ``SessionQueryInputs``, the deferral
of ``SessionDeferredWork``), which callers and tests call and patch as the session's (``session.query``,
``AttributionSession._score_into``); a helper object would need the whole session passed back in.

Why the query path is shaped this way:

* **One gradient per measurement**: grad m(q) is computed once per distinct
  ``method.query_measurement(measurement)`` (K-FAC and TRAK share the loss gradient;
  D-TRAK asks for the square norm) and shared.
* **Damping is cheap**: each method's damping-independent state (``Prepared``) is kept
  with the result (``QueryResult.prepared``), so ``rescore`` only calls ``score``: for K-FAC,
  TRAK and D-TRAK a lookup in, or an interpolation of, their damping grid, scored in one pass
  over the rows with the first answer where the gradients dominate a query (a streamed bank),
  else with the second damping asked or by the app's grid filler after the first answer (the
  stored int8 bank, TRAK's rows: ``Rows.grid_in_first_pass``; ``engine.attribution.scoring``,
  docs/architecture.md §4).
* **One broken method never hides the others**: its failure becomes that method's "error" (one
  warning line), and the query answers with the rest; a bad query (``QueryError``) or a bad damping
  is refused before any gradient is computed.

It reads, from the session: ``ctx``, ``dataset``, ``diffusion``, ``auto_build``, ``_methods`` and the
other mixins' methods named above.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from ..model.measurements import parse_measurement
from ..validation import check_damping
from .foreground import in_foreground
from .methods.base import SERVER, Unavailable
from .query import QueryError, no_trajectory
from .results import MethodResult, QueryResult

if TYPE_CHECKING:
    import torch

    from ..model.data import ImageDataset
    from ..model.diffusion import Diffusion
    from ..model.measurements import Measurement
    from .context import EngineContext
    from .methods.base import AttributionMethod, Prepared
    from .query import QueryInput

# the session's logger, as before these methods moved here: a filter or handler set on it still sees their warnings
log = logging.getLogger("engine.attribution.session")


class SessionScoring:
    """Queries and rescoring of ``AttributionSession`` (see the module)."""

    ctx: EngineContext
    dataset: ImageDataset
    diffusion: Diffusion
    auto_build: bool
    _methods: dict[str, AttributionMethod]

    @in_foreground  # the app's background passes pause while it runs (engine.attribution.foreground)
    def query(
        self,
        query: QueryInput,
        measurement: str = "loss",
        methods: list[str] | None = None,
        damping: dict[str, float] | None = None,
        mc_samples: int | None = None,
        defer_exact: bool = False,
    ) -> QueryResult:
        """Scores of every training image for ``query`` under each method.

        Methods that are not built (and ``auto_build`` is off) or cannot run here come back
        with status "unavailable" and a reason saying how to enable them.  ``defer_exact``: answer
        from a compressed bank's scan first (marked ``exact_pending``) and leave its exact re-rank to
        ``fill_exact`` / ``fill_grids``; only the app's interactive answer asks for it, every other
        caller (the CLI, evaluations, the app's retrain check) gets the exact answer.
        """
        t_start = time.perf_counter()
        names = self._resolve_methods(methods)
        meas = parse_measurement(measurement, self.diffusion.T)
        self._check_query(query, meas)
        damping = dict(damping or {})
        self._check_dampings(names, damping)
        draws = self.query_draws(mc_samples)
        # each method's availability and cache checked once per query (is_built may read manifests and array
        # headers), the cache only of methods that can run here
        avail = {name: self._availability(self._methods[name]) for name in names}
        built_now = self.build_missing([n for n in names if avail[n][0]]) if self.auto_build else {}
        built = {name: avail[name][0] and self._methods[name].is_built(self.ctx) for name in names}
        ready = {name: built[name] for name in names}
        shared = self._shared_forward_plan(names, meas, query, ready)
        grads: dict[Measurement, tuple[torch.Tensor, float]] = {}
        results: dict[str, MethodResult] = {}
        prepared: dict[str, Prepared] = {}
        total_grad_ms = 0.0
        for name in names:
            m = self._methods[name]
            res = self._empty_result(name)
            results[name] = res
            available, reason = avail[name]
            if not available:  # availability never sees the query: a reason about this server
                res.status, res.reason, res.reason_about = "unavailable", reason, SERVER
                continue
            if name in built_now:
                res.timing_ms["build"] = built_now[name]["seconds"] * 1000.0
            if not built[name]:
                res.status, res.reason = self.unbuilt_status(name, built_now)
                res.reason_about = SERVER if res.status == "unavailable" else None
                continue
            try:
                qm = m.query_measurement(meas)
                grad = None
                if qm is not None:
                    if qm.kind == "trajectory" and query.trajectory is None:
                        raise QueryError(no_trajectory(query))
                    if qm not in grads:
                        t0 = time.perf_counter()
                        if qm in shared:  # one forward for the loss and the square norm
                            got = self._shared_query_gradients(shared, query, draws)
                        else:
                            got = {qm: self.query_gradient(qm, query, draws)}
                        ms = (time.perf_counter() - t0) * 1000.0
                        for key, g in got.items():  # a shared pass's time is split evenly between its gradients
                            grads[key] = (g, ms / len(got))
                        total_grad_ms += ms
                    grad, ms = grads[qm]
                    res.timing_ms["gradient"] = ms
                else:
                    res.timing_ms["gradient"] = 0.0
                t0 = time.perf_counter()
                prep = m.prepare(self.ctx, query, grad)
                self._defer_exact_work(prep, defer_exact)
                res.timing_ms["prepare"] = (time.perf_counter() - t0) * 1000.0
                prepared[name] = prep
                res.damping = self.damping_for(name, damping)
                self._score_into(res, m, prep)
                if m.needs_gradient:
                    res.measurement = str(meas if qm is None else qm)
                if qm is not None and qm != meas:
                    res.reason = f"uses the {qm} measurement"
            except Unavailable as e:
                res.status, res.reason, res.reason_about = "unavailable", str(e), e.about
            except QueryError:
                raise
            except Exception as e:  # noqa: BLE001 - one broken method must not hide the others
                # one line; the traceback with ATTRIBUTION_DEBUG (QA round 20: a CLI query printed a whole
                # traceback on stderr for a corrupt cache and still answered with the other methods)
                log.warning("method %s failed: %s: %s", name, type(e).__name__, e,
                            exc_info=bool(os.environ.get("ATTRIBUTION_DEBUG")))
                res.status, res.reason = "error", f"{type(e).__name__}: {e}"
        timing = {"total": (time.perf_counter() - t_start) * 1000.0, "gradients": total_grad_ms}
        return QueryResult(
            query=self._query_dict(query, len(draws)),
            measurement=str(meas),
            methods=results,
            timing_ms=timing,
            prepared=prepared,
        )

    @in_foreground
    def rescore(self, result: QueryResult, damping: dict[str, float]) -> QueryResult:
        """The same query with other damping values: only ``score`` runs, no gradient, no prepare."""
        prepared = result.prepared
        if not prepared:
            raise ValueError("this result holds no per-query state (was it copied or loaded?); run query() again")
        t_start = time.perf_counter()
        # a value for a method that takes none is refused, as the CLI's --damping refuses it: its scores would come
        # back unchanged under a result that looked re-scored (QA 70 F8.3; query() keeps ignoring one, the rule of
        # damping_for, since a page's or a sweep's one dict serves every method)
        ignored = [n for n, v in damping.items() if n in self._methods and v is not None
                   and not self._methods[n].takes_damping()]
        if ignored:
            raise ValueError(f"{', '.join(ignored)} {'has' if len(ignored) == 1 else 'have'} no damping (the scores "
                             "do not depend on one): nothing to re-score")
        self._check_dampings([n for n in damping if n in self._methods], damping)
        methods: dict[str, MethodResult] = {}
        for name, old in result.methods.items():
            if name not in damping or name not in prepared or old.status != "ok":
                methods[name] = old
                continue
            m = self._methods[name]
            res = replace(old, timing_ms={**old.timing_ms})
            res.damping = self.damping_for(name, damping)
            self._score_into(res, m, prepared[name])
            # "score" stays the first answer's pass over every training image; this re-scoring (a lookup or
            # interpolation in the damping grid, or one more pass) is "rescore" beside it: it replaced "score",
            # and a 0.05 ms lookup then read as a pass over 1,797 images (QA 64 F6)
            again = res.timing_ms.pop("score")
            res.timing_ms = {**{k: v for k, v in old.timing_ms.items() if k != "rescore"}, "rescore": again}
            methods[name] = res
        # the first answer's times, and this re-scoring's beside them (QA 28 #1: "rescore" held a flag, 1.0, which the
        # page printed as "rescore 1.0 ms" beside a "total" of the rescore alone, under a table of 650 ms gradients)
        timing = {**result.timing_ms, "rescore": (time.perf_counter() - t_start) * 1000.0}
        return QueryResult(
            query=result.query, measurement=result.measurement, methods=methods, timing_ms=timing, prepared=prepared
        )


    def _empty_result(self, name: str) -> MethodResult:
        m = self._methods[name]
        return MethodResult(name=name, title=m.title, kind=m.kind, caption=m.caption, status="ok")

    def damping_for(self, name: str, damping: dict[str, float]) -> float | None:
        """The damping method ``name`` scores with: the asked value, else its default; None for a similarity
        or an influence method without a damping (its scores ignore one).  The one rule for every caller
        (queries, rescoring, the pool's matrices, the precomputed scores).  Bad values: InvalidSettingError."""
        if not self._methods[name].takes_damping():
            return None  # a similarity, or an influence method without a damping: its scores ignore one
        if name in damping and damping[name] is not None:
            return check_damping(damping[name], f"{name} damping")
        value = self._methods[name].default_damping
        return None if value is None else check_damping(value, f"{name} damping (from the preset)")

    def _check_dampings(self, names: list[str], damping: dict[str, float]) -> None:
        """Refuse a bad damping before any gradient is computed (InvalidSettingError, a ValueError)."""
        for name in names:
            self.damping_for(name, damping)

    def _score_into(self, res: MethodResult, m: AttributionMethod, prep: Prepared) -> None:
        t0 = time.perf_counter()
        scores = np.asarray(m.score(prep, res.damping), dtype=np.float32).reshape(-1)
        res.timing_ms["score"] = (time.perf_counter() - t0) * 1000.0
        if scores.shape[0] != len(self.dataset):
            raise RuntimeError(f"{m.name} returned {scores.shape[0]} scores for {len(self.dataset)} training images")
        reason = self.non_finite_reason(m, scores)
        if reason is not None:  # never an "ok" result with NaN/inf scores (a corrupt cache, an overflow)
            res.scores, res.status, res.reason = None, "error", reason
            return
        res.scores = scores
        res.bank, res.exact, res.exact_pending = prep.bank, prep.exact, prep.exact_pending
        res.exact_end = prep.exact_end
        res.estimate_scale = prep.estimate_scale
        res.warning, res.damping_floor = m.damping_warning(res.damping), m.damping_floor()
        res.status = "ok"

    def non_finite_reason(self, m: AttributionMethod, scores: np.ndarray) -> str | None:
        """Why scores with NaN or inf cannot be shown (None when all are finite), for a query's vector and a
        query set's matrix alike.  A method with a cache is told to rebuild it; one without a cache has
        nothing to rebuild (QA round 19: a plugin's NaN was called a corrupt cache), so its code is named."""
        bad = int(np.count_nonzero(~np.isfinite(scores)))
        if not bad:
            return None
        head = f"{bad} of {scores.size} scores are not finite (NaN or inf)"
        if m.cache_keys(self.ctx):
            return f"{head}; the cache may be corrupt: rebuild it with `{self.build_command([m.name], rebuild=True)}`"
        return f"{head}; {m.name} keeps no cache, so its scoring code produced them"


__all__ = ["SessionScoring"]
