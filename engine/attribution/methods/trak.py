"""TRAK and D-TRAK baselines (docs/architecture.md §5).

TRAK (Park et al. 2023), as adapted to diffusion models (Georgiev et al. 2023; Zheng et al.
2024), with a random projection P (``engine.attribution.projection``, E[P P^T] = I):

    phi_i = P^T grad l(x_i)        (train loss gradients, M draws of (t, eps) each)
    phi_q = P^T grad m(q)          (query measurement gradient, from the session)
    F     = (1/N) sum_i phi_i phi_i^T            (empirical Fisher in the projected space)
    tau_i = (1/N) phi_q^T (F + lambda I)^{-1} phi_i

which is docs/architecture.md §4's tau_i = (1/N) grad m^T (G + lambda I)^{-1} grad l_i with G the
empirical Fisher, in projected coordinates: same sign (positive = proponent) and scale
as K-FAC Influence, with lambda on the scale of G for the mean loss.

F = V diag(s) V^T is eigendecomposed once at build time and the bank is stored rotated,
Z = Phi V (N x k).  A query is rotated once, z_q = V^T phi_q, and then

    tau = (1/N) Z (z_q / (s + lambda))

so changing lambda costs one division and one (N x k) matvec, no gradient.  When k > N
(the paper's k = 32,768) the eigenbasis comes from the N x N Gram matrix instead, exactly
(``fisher_eigenbasis``), so large k costs O(N^2 k), not O(k^3).

D-TRAK (Zheng et al. 2024) is the same code path with the square-norm output function
(1/D)||eps_theta(x_t, t)||^2 in place of both the training loss and the measurement.
Float32 features throughout (paper G.3: float16 degrades TRAK); F is accumulated and
eigendecomposed in float64 and stored in float32.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np
import torch

from ... import distributed
from ...config import AttributionConfig, trak_default_damping
from ...model.diffusion import MCDraws
from ...model.measurements import Measurement
from ..context import EngineContext
from ..damping_grid import SUPPORTED
from ..gradients import num_params, params_digest
from ..projection import TILE_ROWS, RandomProjection
from ..scoring import DenseRows, EigenbasisQuery
from ..train_draws import draw_settings
from . import register
from .base import AttributionMethod, EigenPrepared, Prepared, Progress, QueryInput, no_progress

FORMAT = 1


def draws_digest(draws: Any) -> str:
    """16 hex of SHA-256 of the draws' t and eps (and flip bits): caches record exactly which
    draws they used.  Per-example draws are a function of their settings (``digest()``)."""
    if not isinstance(draws, MCDraws):
        return draws.digest()
    h = hashlib.sha256()
    if draws.flip is not None:
        h.update(draws.flip.detach().cpu().numpy().astype(np.uint8).tobytes())
    h.update(draws.t.detach().cpu().numpy().astype(np.int64).tobytes())
    h.update(draws.eps.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


def fisher_eigenbasis(
    phi_parts: list[torch.Tensor], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenbasis of F = (1/N) Phi^T Phi from the projected features Phi (N x k, given in row parts).

    Returns float32 (s, V, Z = Phi V) with F = V diag(s) V^T on the span of the features.  For
    k <= N, F (k x k) is accumulated and eigendecomposed in float64.  For k > N (the paper's
    k = 32,768 on a small training set) F has rank <= N, and the N x N Gram matrix
    K = (1/N) Phi Phi^T = U diag(s) U^T has the same nonzero eigenvalues, with
    V = Phi^T U / sqrt(N s) and Z = Phi V = U sqrt(N s).  Directions with s = 0 are orthogonal
    to every phi_i, so dropping them leaves every score
    tau_i = (1/N) phi_i^T (F + lambda I)^{-1} phi_q = (1/N) Z_i (V^T phi_q / (s + lambda)) exact,
    at O(N^2 k) instead of O(k^3) time and N x k instead of k x k memory.
    """
    n = sum(p.shape[0] for p in phi_parts)
    k = phi_parts[0].shape[1]
    if k <= n:
        fisher = torch.zeros((k, k), dtype=torch.float64, device=device)
        for phi in phi_parts:
            phi = phi.to(device, torch.float64)
            fisher.addmm_(phi.T, phi)
        fisher /= n
        evals, evecs = torch.linalg.eigh(fisher)
        evals = evals.clamp_min(0.0).float()
        evecs = evecs.float()
        rotated = torch.cat([phi.to(device, torch.float32) @ evecs for phi in phi_parts]).cpu()
        return evals.cpu(), evecs.cpu(), rotated
    phi = torch.cat(phi_parts).to(device, torch.float32)  # (N, k)
    gram = torch.zeros((n, n), dtype=torch.float64, device=device)
    cols = max(1, (64 << 20) // (8 * n))
    for c in range(0, k, cols):
        block = phi[:, c : c + cols].double()
        gram.addmm_(block, block.T)
    gram /= n
    evals, u = torch.linalg.eigh(gram)
    keep = evals > evals.max().clamp_min(0.0) * 1e-12
    evals, u = evals[keep], u[:, keep]
    root = (n * evals).sqrt()  # (r,)
    evecs = torch.zeros((k, u.shape[1]), dtype=torch.float32, device=device)
    for c in range(0, k, cols):
        evecs[c : c + cols] = (phi[:, c : c + cols].double().T @ u / root).float()
    rotated = (u * root).float()
    return evals.float().cpu(), evecs.cpu(), rotated.cpu()


@register
class TRAK(AttributionMethod):
    """TRAK with the diffusion training loss; scores on docs/architecture.md §4's scale."""

    name = "trak"
    order = 10
    title = "TRAK"
    kind = "influence"
    caption = (
        "Random projections of per-example gradients, with an empirical-Fisher curvature "
        "(Park et al. 2023). Positive: removing that image would raise the query's measurement (for the loss-like "
        "ones, make the query less likely)."
    )
    needs_gradient = True
    damping_field = "trak_damping"
    damping_range = SUPPORTED  # every damping there is a lookup or interpolation of the first pass's grid
    config_fields = ("trak_dim",)
    shards = True
    in_sweeps = True
    loss = "loss"  # which per-example function's gradient forms phi_i
    batch_size = 32  # examples per gradient batch at most (fewer at large P: ``gradient_batch``)
    part_size = 256  # examples per saved part (resumable build)

    @classmethod
    def configured_damping(cls, config: AttributionConfig, num_train: int | None = None) -> float | None:
        """The configured damping, or (None configured) the authors' best on TRAK's scale divided by
        the training-set size: 0.1/N (TRAK), 1/N (D-TRAK); None while N is unknown."""
        if getattr(config, cls.damping_field) is None and num_train is None:
            return None
        return trak_default_damping(config, cls.name, int(num_train or 1))

    def __init__(self, config: AttributionConfig | None = None, projection: str | None = None):
        super().__init__(config)
        self.projection_kind = projection or self.config.trak_projection
        self._loaded: dict[str, dict[str, Any]] = {}
        self._projections: dict[str, RandomProjection] = {}

    # --- settings and cache -------------------------------------------------------------

    def _dim(self, ctx: EngineContext, dim: int | None) -> int:
        p = num_params(ctx.params)
        return p if self.projection_kind == "identity" else min(int(dim or ctx.config.trak_dim), p)

    def projection(self, ctx: EngineContext, dim: int | None = None) -> RandomProjection:
        """The seeded projection for this context (k = ``dim`` or config.trak_dim, capped at P)."""
        p = num_params(ctx.params)
        k = self._dim(ctx, dim)
        key = f"{self.projection_kind}-{p}-{k}-{ctx.config.seed}-{ctx.device}"
        if key not in self._projections:
            self._projections[key] = RandomProjection(
                p, k, seed=int(ctx.config.seed), kind=self.projection_kind, device=ctx.device
            )
        return self._projections[key]

    def gradient_batch(self, ctx: EngineContext) -> int:
        """Examples per gradient batch of this build (and of its ``FeatureSink``): ``batch_size``, or fewer so that
        the batch's float32 gradients stay within ``ctx.compute.gradient_batch_bytes`` (``gradients.budget_batch``).
        Why (QA 54 F1): 32 rows of a CIFAR-size model are 4.6 GB, and the build peaked at 20 GiB; the features do
        not depend on the batch (each row is its own gradient, projected row by row)."""
        from ..gradients import budget_batch

        return budget_batch(self.batch_size, num_params(ctx.params), ctx.compute.gradient_batch_bytes)

    def build_plan(self, ctx: EngineContext) -> str | None:
        """Its gradient pass, in images x draws as its bar counts them, and the features' size (QA 34 #9: TRAK said
        nothing before its build, where K-FAC said its passes)."""
        what = "training-loss" if self.loss == "loss" else self.loss
        return (f"{what} gradients of {len(ctx.dataset):,} images x {self.config.mc_samples} draws, projected to "
                f"{self._dim(ctx, None):,} of {num_params(ctx.params):,} dimensions")

    def settings(self, ctx: EngineContext, dim: int | None = None) -> dict[str, Any]:
        """Everything the cached bank depends on (the Store keys its folder by this); ``dim``
        overrides config.trak_dim (a k sweep)."""
        p = num_params(ctx.params)
        k = self._dim(ctx, dim)
        return {
            "format": FORMAT,
            "method": self.name,
            "loss": self.loss,
            "mc_samples": len(ctx.train_draws),
            "seed": int(ctx.config.seed),
            "draws": draws_digest(ctx.train_draws),
            **draw_settings(ctx.train_draws),
            "num_train": len(ctx.dataset),
            "params": params_digest(ctx.params),
            "projection": {
                "kind": self.projection_kind,
                "dim": k,
                "seed": int(ctx.config.seed),
                "num_params": p,
                "tile_rows": TILE_ROWS,
            },
        }

    def is_built(self, ctx: EngineContext) -> bool:
        """True when this context's cache is loaded (held in memory: no file is read again, as for
        K-FAC) or a complete, matching cache is on disk (its manifest and array headers checked)."""
        settings = self.settings(ctx)
        if str(ctx.store.path(self.name, settings)) in self._loaded:
            return True
        return ctx.store.exists(self.name, settings)

    def feature_sink(self, ctx: EngineContext) -> FeatureSink | None:
        """A consumer for another pass over the training set with the same draws (K-FAC's bank pass):
        it asks for this method's per-example function (``loss``: D-TRAK's square norm shares that
        pass's forward), projects what it is given and saves every part it gets complete, so
        ``build`` only computes what is left.  None when this cache is built."""
        if ctx.store is None or ctx.store.exists(self.name, self.settings(ctx)):
            return None
        part = ctx.store.partial(self.name, self.settings(ctx), part_size=self.part_size, num_items=len(ctx.dataset))
        return FeatureSink(part, self.projection(ctx), self.gradient_batch(ctx), loss=self.loss, method=self.name)

    def cache_keys(self, ctx: EngineContext) -> list[tuple[str, dict[str, Any]]]:
        return [(self.name, self.settings(ctx))]

    def build(self, ctx: EngineContext, progress: Progress = no_progress) -> None:
        """Project every training gradient (resumable, in parts), then eigendecompose F once."""
        self.build_dims(ctx, [int(ctx.config.trak_dim)], progress)
        self._load(ctx)

    def build_dims(self, ctx: EngineContext, dims: list[int], progress: Progress = no_progress) -> None:
        """Build the caches of several projection dimensions k with one gradient pass.

        The training gradients do not depend on k, so a k sweep (the paper's k = 32,768 against
        our default 2,048) costs one pass over the training set, not one per k: each batch of
        gradients is projected once per k that still lacks that part.  Resumable per part and k.
        """
        from ..gradients import train_loss_grads  # the K-FAC helper's module; imported when needed

        dims = list(dict.fromkeys(self._dim(ctx, k) for k in dims))
        todo_dims = [k for k in dims if not ctx.store.exists(self.name, self.settings(ctx, k))]
        if not todo_dims:
            return
        t0 = time.perf_counter()
        images = ctx.dataset.images
        n = len(images)
        parts = {
            k: ctx.store.partial(self.name, self.settings(ctx, k), part_size=self.part_size, num_items=n)
            for k in todo_dims
        }
        projs = {k: self.projection(ctx, k) for k in todo_dims}
        first = parts[todo_dims[0]]
        first.share_disk_with([p for p in parts.values() if p is not first])  # one pass fills every k's cache
        shard = distributed.current()  # under torchrun: this rank's parts only (engine.distributed)
        pending = sorted({i for part in parts.values() for i in part.todo()})
        todo = shard.mine(pending)
        left = first.rows_in(pending)
        if pending and left < n:  # parts saved by a killed run (or by K-FAC's shared pass) are not redone
            progress(f"{self.title}: resuming: {n - left}/{n} examples saved by an earlier run", 0.9 * (n - left) / n)
        elif pending:  # said at once: the page read "TRAK: starting" with no rows until the first part (QA 45 #2)
            progress(f"{self.title}: projected gradients 0/{n}", 0.0)
        done = n - left
        for i in todo:
            rows = first.part_range(i)
            need = [k for k in todo_dims if not parts[k].is_done(i)]
            feats = {k: torch.empty((rows.stop - rows.start, projs[k].dim), dtype=torch.float32) for k in need}
            grads = train_loss_grads(
                ctx,  # its model and params (the influence parameters, ctx.params order)
                ctx.diffusion,
                images[rows].to(ctx.device),
                ctx.train_draws.for_rows(rows),  # this part's draws, indexed like images[rows]
                loss=self.loss,
                batch_size=self.gradient_batch(ctx),
                progress=no_progress,
            )
            for sl, g in grads:
                g = g.to(ctx.device)
                for k in need:
                    feats[k][sl] = projs[k].project(g, build=True).float().cpu()
                # every batch, not every part: a part (256 rows) was the whole of a 200-image set, so the app's
                # and the terminal's bars stood still, with no rows and no time left, for the pass's minute (QA 45
                # #2, #9); the part's last batch is said once the part is saved
                if rows.start + sl.stop < rows.stop:
                    progress(f"{self.title}: projected gradients {done + sl.stop}/{n}", 0.9 * (done + sl.stop) / n)
                del g  # not held while the next batch is computed (the loop variable kept a second batch alive)
            for k in need:
                parts[k].save_part(i, {"phi": feats[k]})
            done += rows.stop - rows.start
            progress(f"{self.title}: projected gradients {done}/{n}", 0.9 * done / n)
        shard.barrier()
        if not shard.is_main:
            shard.barrier()  # rank 0 eigendecomposes and publishes
            return
        for k in todo_dims:
            progress(f"{self.title}: eigendecomposing the projected Fisher (k = {k})", 0.92)
            part = parts[k]
            phi_parts = [torch.from_numpy(part.load_part(i)["phi"]) for i in range(part.num_parts)]
            evals, evecs, rotated = fisher_eigenbasis(phi_parts, ctx.device)
            part.publish(
                extra={"eigvals": evals.cpu(), "eigvecs": evecs.cpu(), "phi_eig": rotated},
                meta={"build_seconds": time.perf_counter() - t0 + part.seconds_before},  # resumed: + earlier attempts
            )
        shard.barrier()
        progress(f"{self.title}: built", 1.0)

    def _load(self, ctx: EngineContext) -> dict[str, Any]:
        settings = self.settings(ctx)
        key = str(ctx.store.path(self.name, settings))
        if key not in self._loaded:
            arrays = ctx.store.load_arrays(self.name, settings)
            if arrays is None:
                raise RuntimeError(f"{self.title} is not built yet: call build() first")
            self._loaded[key] = {
                "eigvals": torch.from_numpy(np.array(arrays["eigvals"])),
                "eigvecs": torch.from_numpy(np.array(arrays["eigvecs"])),
                "rows": DenseRows(torch.from_numpy(np.array(arrays["phi_eig"])), ctx.compute.grid_max_bytes),
            }
        return self._loaded[key]

    def train_features(self, ctx: EngineContext) -> np.ndarray:
        """Phi (N x k): the projected training gradients as stored."""
        arrays = ctx.store.load_arrays(self.name, self.settings(ctx))
        if arrays is None:
            raise RuntimeError(f"{self.title} is not built yet")
        return np.array(arrays["phi"])

    # --- queries ------------------------------------------------------------------------

    def prepare(self, ctx: EngineContext, query: QueryInput, query_grad: torch.Tensor | None) -> Prepared:
        """z_q = V^T P^T grad m(q): everything about the query that does not depend on lambda."""
        if query_grad is None:
            raise ValueError(f"{self.title} needs the query's measurement gradient")
        t0 = time.perf_counter()
        self.default_damping = self.configured_damping(self.config, len(ctx.dataset))
        state = self._load(ctx)
        phi_q = self.projection(ctx).project(query_grad.reshape(-1).detach()).float().cpu()
        t1 = time.perf_counter()
        z_q = state["eigvecs"].T @ phi_q
        t2 = time.perf_counter()
        rows = state["rows"]  # DenseRows: the first answer is one product at the damping asked for (docs/architecture.md §4, "The damping grid")
        query = EigenbasisQuery(rotated=z_q, eigenvalues=state["eigvals"], rows=rows, grid_first=rows.grid_in_first_pass)
        return EigenPrepared(query=query, timing_ms={"project": (t1 - t0) * 1e3, "rotate": (t2 - t1) * 1e3})

    def score(self, prepared: Prepared, damping: float | None = None) -> np.ndarray:
        """tau = (1/N) Z (z_q / (s + lambda)) through ``scoring.EigenbasisQuery``: the first call scores
        the damping asked for; the grid follows (``fill_grid``, or the second damping asked for), after
        which damping changes are lookups or interpolations."""
        assert isinstance(prepared, EigenPrepared)
        lam = self.default_damping if damping is None else float(damping)
        return prepared.query.score(lam)


@register
class DTRAK(TRAK):
    """D-TRAK: TRAK with the square-norm function for both training features and the measurement."""

    name = "dtrak"
    order = 20
    title = "D-TRAK"
    caption = (
        "TRAK with gradients of the model output's squared norm in place of the loss "
        "(Zheng et al. 2024); always uses the square-norm measurement."
    )
    damping_field = "dtrak_damping"
    loss = "square-norm"

    def query_measurement(self, measurement: Measurement) -> Measurement:
        """D-TRAK attributes the square norm whatever measurement was asked for."""
        return Measurement("square-norm")


class FeatureSink:
    """Projected training gradients collected from someone else's gradient pass (``feature_sink``).

    phi_i = P^T grad l(x_i) needs per-example gradients with the train draws that K-FAC's bank
    pass uses (TRAK: the training loss, which the bank needs too; D-TRAK: the square norm, from
    the same forward pass), so that pass hands each batch here
    (``consume``).  Gradients are projected ``batch_size`` rows at a time (a projection call
    costs about the same for 16 rows as for 32: its tiles are generated per call) and a part of
    TRAK's resumable build is saved as soon as all its rows arrived.  Rows of parts that are
    already done are ignored; ``needs(rows)`` tells a resumed feeding pass which rows its own saved parts
    hold but this build still lacks, so that it computes them again for this sink rather than leave
    them to a whole pass of ``TRAK.build`` (QA 45 #2; a pass that cannot, or a build that stopped
    after its feeding cache was published, leaves them to ``TRAK.build``).  ``flush()`` projects
    what is still buffered.

    Timing: the feeding pass's seconds are its owner's (``PartialBuild.mark_shared``, called with the
    name ``fed_by`` was given), so the published TRAK cache records its own seconds and
    ``gradient_pass_shared_with``, and the feeding bank records ``gradient_pass_fed: [method]``.
    """

    def __init__(self, part: Any, projection: RandomProjection, batch_size: int = 32, loss: str = "loss",
                 method: str = ""):
        self.part = part
        self.method = method  # whose cache this fills (named in the feeding pass's record)
        self.provider = "another method"  # whose pass feeds it (``fed_by``)
        self.loss = loss  # which per-example function's gradients the feeding pass hands over
        self.projection = projection
        self.batch_size = int(batch_size)
        self.pending: list[tuple[int, torch.Tensor]] = []  # (row, gradient) not projected yet
        self.buffers: dict[int, dict[int, torch.Tensor]] = {}
        self.saved: list[int] = []

    def fed_by(self, provider: str) -> None:
        """Name the method whose gradient pass feeds this sink (``MethodCaches.share_gradient_passes``)."""
        self.provider = str(provider)

    def needs(self, rows: slice) -> bool:
        """Whether some of ``rows`` belong to a part of this build that is not saved yet.  Why (QA 45 #2): the
        feeding pass, resumed after a kill, computes again the rows its own build saved but this one did not
        (``bank_build.Refeed``), instead of leaving them to a whole gradient pass of this method's own."""
        if rows.stop <= rows.start:
            return False
        size = self.part.part_size
        return any(not self.part.is_done(i) for i in range(rows.start // size, (rows.stop - 1) // size + 1))

    def consume(self, rows: slice, grads: torch.Tensor) -> None:
        for r, row in enumerate(range(rows.start, rows.stop)):
            if not self.part.is_done(row // self.part.part_size):
                self.pending.append((row, grads[r].detach()))
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        feats = self.projection.project(torch.stack([g for _, g in self.pending]), build=True).float().cpu()
        rows = [row for row, _ in self.pending]
        self.pending = []
        for row, f in zip(rows, feats, strict=True):
            i = row // self.part.part_size
            buf = self.buffers.setdefault(i, {})
            buf[row] = f
            span = self.part.part_range(i)
            if len(buf) == span.stop - span.start:
                if not self.saved:
                    self.part.mark_shared(self.provider)  # the pass's time is the provider's, not ours
                self.part.save_part(i, {"phi": torch.stack([buf[k] for k in range(span.start, span.stop)])})
                del self.buffers[i]
                self.saved.append(i)
