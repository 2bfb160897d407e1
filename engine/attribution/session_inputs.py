"""What a query is made of: its input (a spec, an upload, a new sample, the gallery), its draws and its gradients.

``SessionQueryInputs`` is a mixin that ``AttributionSession`` inherits, not a helper object it delegates to:
the app, the CLI and the scripts call these as the session's own methods (``session.parse_query``,
``session.query_draws``), and ``query`` computes its gradients through ``self.query_gradient`` and
``self._shared_query_gradients``, which the tests replace on a session to count the gradient passes; a
helper object would cut those patches off from the query.  The sources themselves (parsing specs, decoding
uploads, sampling) are ``engine.attribution.query`` (``QuerySources``); the gradients' maths is
``engine.attribution.gradients``.

Why the draws are shaped this way: **common random numbers** (docs/architecture.md §6).  One seeded set of
M draws (t, eps) is shared by every method, so two methods differ only in what they are, not in Monte Carlo
noise (``query_draws``).  With ``config.query_draws == "own"`` (the paper's estimator, the default) it is
``make_draws(M, shape, T, seed=config.seed + 1)``: offset from the training draws' seed so that a training
image used as a query does not reuse its own training draws.  With ``"bank"`` (the mnist preset; shared
training draws only) it is the training draws themselves, common to the query and every training image.

It reads, from the session: ``sources``, ``config``, ``ctx``, ``model``, ``diffusion``, ``dataset``,
``device``, ``_methods`` and ``shape``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..model.diffusion import MCDraws, make_draws
from .query import QueryError, describe, no_trajectory
from .train_draws import SHARED_DRAW_MODES

if TYPE_CHECKING:
    import torch

    from ..config import AttributionConfig
    from ..model.data import ImageDataset
    from ..model.diffusion import Diffusion
    from ..model.measurements import Measurement
    from .context import EngineContext
    from .methods.base import AttributionMethod
    from .query import GalleryItem, QueryInput, QuerySources


class SessionQueryInputs:
    """Query inputs, draws and gradients of ``AttributionSession`` (see the module)."""

    sources: QuerySources
    config: AttributionConfig
    ctx: EngineContext
    model: torch.nn.Module
    diffusion: Diffusion
    dataset: ImageDataset
    device: torch.device
    _methods: dict[str, AttributionMethod]
    shape: tuple[int, int, int]

    def gallery(self) -> list[GalleryItem]:
        """The checkpoint's ``gallery.npz`` (generated samples with trajectories); [] if absent."""
        return self.sources.gallery()

    def parse_query(self, spec: str) -> QueryInput:
        """``gallery:3`` | ``train:17`` | ``image:PATH`` | ``generate:SEED`` -> QueryInput (``QuerySources.parse``)."""
        return self.sources.parse(spec)

    def query_from_upload(self, data: bytes, name: str | None = None) -> QueryInput:
        """PNG/JPEG bytes -> the model's size and channels; ``notes`` say what was done; ValueError on bad data."""
        return self.sources.query_from_upload(data, name)

    def generate(self, seed: int, progress: Callable[[int, int], None] | None = None) -> QueryInput:
        """One new DDPM sample with its recorded trajectory (all T steps)."""
        return self.sources.generate(seed, progress)

    def query_draws(self, mc_samples: int | None = None) -> MCDraws:
        """The draws of every query's measurement, shared by all queries and methods.

        ``config.query_draws == "own"``: M draws of their own, seeded by config.seed + 1, independent
        of the training gradients' (paper G.3).  ``"bank"``: the training gradients' shared draws
        (t_m, eps_m) themselves, without flip bits (the query is attributed as it is), the first
        ``mc_samples`` of them when fewer are asked.  Then every inner product g_q^T K g_i (eq. 6) pairs
        estimates made on the same draws (common random numbers), so its Monte Carlo error is that of
        a difference on common noise; in expectation it adds (1/M) tr(K Cov_eps[grad l_q, grad l_i])
        to the influence, which is why it is an option measured by LDS (``lds_ablation`` ``query_draws``)
        and not the paper's estimator."""
        m = int(mc_samples or self.config.mc_samples)
        if self.config.query_draws == "bank":
            if self.config.draws not in SHARED_DRAW_MODES:
                raise ValueError("query_draws 'bank' needs shared training draws (--draws shared or stratified)")
            if m > self.config.mc_samples:
                raise ValueError(
                    f"query_draws 'bank': the query can use at most the bank's M = {self.config.mc_samples} draws, "
                    f"{m} asked"
                )
            bank = self.ctx.train_draws
            return MCDraws(bank.t[:m], bank.eps[:m], None)
        return make_draws(m, self.shape, self.diffusion.T, seed=self.config.seed + 1)

    def query_gradient(self, measurement: Measurement, query: QueryInput, draws: MCDraws) -> torch.Tensor:
        """grad_theta m(theta, x_q) (P,) in ``ctx.params`` order (model in eval mode)."""
        from . import gradients

        return gradients.measurement_grad(
            self.model,
            self.diffusion,
            measurement,
            query,
            draws.to(self.device),
            self.dataset.levels,
            params=list(self.ctx.params),
        )

    def _shared_forward_plan(
        self, names: list[str], meas: Measurement, query: QueryInput, ready: dict[str, bool]
    ) -> list[Measurement]:
        """The query measurements that one shared forward pass should serve (``gradients.shared_forward_grads``):
        the distinct loss / square-norm measurements of the methods that will run (``ready``: available, and
        built or to be built), when there are two."""
        from .gradients import SHARED_FORWARD_KINDS

        if query.image is None:
            return []
        needed: list[Measurement] = []
        for name in names:
            m = self._methods[name]
            qm = m.query_measurement(meas)
            if qm is None or qm.kind not in SHARED_FORWARD_KINDS or qm in needed or not ready[name]:
                continue
            needed.append(qm)
        return needed if len(needed) > 1 else []

    def _shared_query_gradients(
        self, measurements: list[Measurement], query: QueryInput, draws: MCDraws
    ) -> dict[Measurement, torch.Tensor]:
        from . import gradients

        return gradients.shared_forward_grads(
            self.model, self.diffusion, query.image, draws.to(self.device), measurements, params=list(self.ctx.params),
            min_rows_per_worker=self.ctx.compute.min_rows_per_worker,
        )


    def _check_query(self, query: QueryInput, meas: Measurement) -> None:
        if query.image is None and meas.kind != "trajectory":
            raise QueryError(f"measurement {meas} needs a query image")
        if query.image is not None and tuple(query.image.shape) != self.shape:
            raise QueryError(f"query image is {tuple(query.image.shape)}, the model takes {self.shape}")
        if meas.kind == "trajectory":
            if query.trajectory is None:
                raise QueryError(no_trajectory(query))
            want = (self.diffusion.T + 1, *self.shape)
            if tuple(query.trajectory.shape) != want:  # the query's source named (QA 26 #6: a samples file)
                raise QueryError(f"the trajectory of {query.description} is {tuple(query.trajectory.shape)} (T + 1 "
                                 f"states of the image), but this model's is {want}: it was drawn by a model with "
                                 f"another number of steps T")

    def _query_dict(self, query: QueryInput, m: int) -> dict[str, Any]:
        return {
            "spec": query.description,
            "image_digest": query.digest(),
            "description": describe(query.description),
            "label": query.label,
            "notes": list(query.notes),
            "has_trajectory": query.trajectory is not None,
            "mc_samples": m,
            **({"origin": dict(query.origin)} if query.origin else {}),
        }


__all__ = ["SessionQueryInputs"]
