"""K-FAC's built-in bank kinds (``engine.attribution.bank_kinds``): ``stored`` and ``streamed``."""

from __future__ import annotations

from ..bank_build import build_bank
from ..bank_kinds import BankKind, register_bank_kind
from ..context import EngineContext
from ..curvature import KFACFactors
from ..gradients import budget_batch, num_params
from ..scoring import Rows
from ..streamed_bank import StreamedBank
from .base import Progress
from .kfac_influence import BANK, KFACInfluence


def _stored_bank(method: KFACInfluence, ctx: EngineContext, factors: KFACFactors, progress: Progress) -> Rows:
    """The rotated int8 bank on disk (resumable build, memory-mapped on load)."""
    # the same settings and arguments as ``method.bank_settings`` (the kind's cache key): bank.artefact_settings
    return build_bank(
        ctx.model,
        ctx.diffusion,
        ctx.dataset.images,
        ctx.train_draws,
        factors,
        ctx.params,
        store=ctx.store,
        name=BANK,
        settings={**method.factor_settings(ctx), "loss": "loss"},
        loss="loss",
        quantize=method.quantize,
        chunk_size=method.chunk_size,
        # float rows held per sub-batch within ComputeConfig.gradient_batch_bytes (QA 54 F2; no part of the key)
        grad_batch=budget_batch(16, num_params(ctx.params), ctx.compute.gradient_batch_bytes),
        device=ctx.device,
        progress=method.bank_progress(progress),
        consumers=method.gradient_consumers,  # e.g. TRAK's FeatureSink: one gradient pass for both
        whiten=method.bank_whiten(),  # the int8 grid (engine.attribution.bank.whitening)
        compute=ctx.compute,  # the scan's chunks, packing and grid budget (no part of the key)
    )


def _streamed_bank(method: KFACInfluence, ctx: EngineContext, factors: KFACFactors, progress: Progress) -> Rows:
    """No bank on disk: each query's damping grid is one streamed gradient pass."""
    progress(f"{method.title}: training gradients streamed per query", 1.0)
    c = ctx.compute
    return StreamedBank(ctx.model, ctx.diffusion, ctx.dataset.images, ctx.train_draws, factors, ctx.params,
                        grad_batch=c.streamed_grad_batch, grid_max_bytes=c.streamed_grid_max_bytes)


register_bank_kind("stored", BankKind(build=_stored_bank, stored=True, note="int8 on disk"))
register_bank_kind("streamed", BankKind(build=_streamed_bank, stored=False, note="recomputed per query",
                                           gradient_pass=False))
