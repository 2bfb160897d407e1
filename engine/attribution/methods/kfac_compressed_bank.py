"""K-FAC's ``compressed`` bank kind (``engine.attribution.bank_kinds``; issue 11, docs/architecture.md §8).

Per Conv2d/Linear layer a factorised projection of the per-example gradients (top eigenvectors
of the factors, or seeded Gaussian: ``config.kfac_projection``) at ``config.kfac_compression`` =
full int8 bank bytes / compressed bank bytes; the rotated int8 bank of the projected gradients
is a cache artefact of its own (``COMPRESSED``, keyed by the bank's settings plus the projection
kind and ratio); a query is scored inside the projected space and its 2 x ``config.kfac_rerank``
strongest candidates, shared between the two ends by ``config.kfac_rerank_split`` (adaptive, the default:
by how crowded each end is, each at least min(64, kfac_rerank); even: ``kfac_rerank`` each), re-ranked to exact K-FAC scores
(engine.attribution.compressed_bank).
Under torchrun each rank keeps its slice of the rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ... import distributed
from ..bank import artefact_settings
from ..bank_kinds import BankKind, register_bank_kind
from ..compressed_bank import (
    CandidateSplit,
    CompressedFactors,
    CompressedRows,
    ShardedBank,
    build_compressed_bank,
    compress_factors,
    exact_columns,
    rerank_scores,
    shard_rows,
)
from ..context import EngineContext
from ..curvature import KFACFactors, pass_row_bytes
from ..gradients import budget_rows
from ..scoring import Rows
from ..store import StaleCacheError
from .base import Progress
from .kfac_influence import KFACInfluence

COMPRESSED = "kfac-compressed-bank"
COMPRESSED_FACTORS = "kfac-compressed-factors"  # the projections and projected factors of that bank


def _own_settings(method: KFACInfluence, ctx: EngineContext) -> dict[str, Any]:
    """What the compressed bank depends on besides ``build_compressed_bank``'s arguments: the factors' settings,
    the loss, the projection kind and ratio (no whitening: the stored bank's int8 grid is not used here)."""
    c = method.config
    return {**method.factor_settings(ctx), "loss": "loss", "projection": c.kfac_projection,
            "compression": float(c.kfac_compression)}


def compressed_settings(method: KFACInfluence, ctx: EngineContext) -> dict[str, Any]:
    """The compressed bank's cache key: its own settings plus what ``build_compressed_bank`` adds
    (``bank.artefact_settings``: quantisation and chunking)."""
    return artefact_settings(_own_settings(method, ctx), quantize=method.quantize, chunk_size=method.chunk_size)


def _cache_key(method: KFACInfluence, ctx: EngineContext) -> tuple[str, dict[str, Any]]:
    return COMPRESSED, compressed_settings(method, ctx)


def _compressed_factors(method: KFACInfluence, ctx: EngineContext, factors: KFACFactors) -> CompressedFactors:
    """The projections and projected factors: loaded with the bank's cache when saved, else computed and
    saved before any row is built (under torchrun by rank 0; the others wait and load them)."""
    c = method.config
    key = (COMPRESSED_FACTORS, compressed_settings(method, ctx))
    shard = distributed.current()

    def load() -> CompressedFactors | None:
        arrays = None if ctx.store is None else ctx.store.load_arrays(*key, mmap=False)
        return None if arrays is None else CompressedFactors.from_arrays(arrays, factors)

    comp = load()
    shared = ctx.store is not None and shard.world > 1
    if comp is None and (not shared or shard.is_main):
        bank = _cache_key(method, ctx)
        if ctx.store is not None and ctx.store.exists(*bank):
            raise StaleCacheError(f"{ctx.store.path(*bank)} has no saved projections beside it ({key[0]}): "
                                  "delete it and build again")
        comp = compress_factors(factors, c.kfac_projection, c.kfac_compression, seed=c.seed)
        if ctx.store is not None:
            ctx.store.save_arrays(*key, comp.to_arrays())
    if shared:
        # every rank meets here once, found or not (as the factors' barrier, KFACInfluence.build): a rank that
        # found them saved and skipped it met the bank parts' barrier early and loaded the bank before rank 0
        # had published it (a two-rank test failed so under load)
        shard.barrier()
        if comp is None:
            comp = load()
    return comp


def hook_batch(ctx: EngineContext) -> int:
    """Images per batch of the compressed bank's hooks pass: its (example, draw) rows are ``ComputeConfig.hook_rows``
    at most, and fewer where they would hold more than ``factor_batch_bytes`` by ``curvature.pass_row_bytes`` (the
    same per-row cost as the factor pass: saved activations, their gradients, a layer's unfolded input), over the
    M draws of each image, at least 1.  Why (QA 62 F2): at CIFAR size its 64 rows peaked at 10.3 GB."""
    m = len(ctx.train_draws)
    row = pass_row_bytes(ctx.model, tuple(ctx.dataset.images.shape[1:]), ctx.params)
    return max(1, budget_rows(ctx.compute.hook_rows, row, ctx.compute.factor_batch_bytes) // m)


def _compressed_bank(method: KFACInfluence, ctx: EngineContext, factors: KFACFactors, progress: Progress) -> Rows:
    c = method.config
    comp = _compressed_factors(method, ctx, factors)
    shard = distributed.current()
    rows = shard_rows(len(ctx.dataset)) if shard.world > 1 else None
    settings = _own_settings(method, ctx)  # build_compressed_bank adds the rest, as compressed_settings does
    bank: Any = build_compressed_bank(
        ctx.model, ctx.diffusion, ctx.dataset.images, ctx.train_draws, comp, ctx.params,
        store=ctx.store, name=COMPRESSED, settings=settings, chunk_size=method.chunk_size,
        grad_batch=hook_batch(ctx), device=ctx.device, quantize=method.quantize,
        rows=rows,
        progress=method.bank_progress(progress),
        compute=ctx.compute,
    )
    if rows is not None:  # torchrun: this rank keeps its slice of the rows
        bank = ShardedBank(bank, rows, len(ctx.dataset))
    n = len(ctx.dataset)

    def exact(idx, lams, rotated_full, should_stop=None, progress=None):
        return rerank_scores(ctx.model, ctx.diffusion, ctx.dataset.images[idx], ctx.train_draws.for_indices(idx), factors,
                             ctx.params, rotated_full, lams, n, should_stop=should_stop, progress=progress)

    def group_changes(indices: np.ndarray, query_grads: torch.Tensor, lam: float) -> np.ndarray:
        from ..group_gradient import group_gradients, kfac_group_changes
        from ..groups import group_from_indices

        summed = group_gradients(ctx, [group_from_indices([int(i) for i in indices], n, spec="members")])
        return kfac_group_changes(ctx, factors, query_grads, summed, lam)[:, 0]

    def columns(idx: np.ndarray, query_grads: torch.Tensor, lam: float) -> np.ndarray:
        return exact_columns(ctx.model, ctx.diffusion, ctx.dataset.images[idx], ctx.train_draws.for_indices(idx),
                             factors, ctx.params, query_grads, lam, n)

    split = CandidateSplit(adaptive=c.kfac_rerank_split == "adaptive")
    return CompressedRows(bank, comp, exact, c.kfac_rerank, split, group_changes, columns)


def _check(config: Any, chosen: str) -> None:
    """Refuse, before the factor pass, the settings this kind cannot serve: EK-FAC (its corrected eigenvalues are
    per full coordinate, with no projected counterpart) and joint weight-bias blocks (a layer's projections are
    made for its weight's inputs and its bias separately: a joint [W | b] block has neither, and the build
    crashed in the projection, QA 55 #1).  ``chosen``: why ``auto`` picked this kind ("" when asked by name),
    which the message repeats."""
    chosen = f" ({chosen})" if chosen else ""
    if config.ekfac:
        raise ValueError(f"the compressed K-FAC bank supports K-FAC, not EK-FAC{chosen}; use --kfac-bank stored or "
                         "streamed with EK-FAC")
    if config.kfac_blocks == "joint":
        raise ValueError(f"the compressed K-FAC bank needs separate weight and bias blocks (--kfac-blocks separate), "
                         f"not joint ones{chosen}; use --kfac-bank stored or streamed with joint blocks")


register_bank_kind("compressed", BankKind(build=_compressed_bank, stored=True, cache_key=_cache_key, estimates=True,
                                          note="per-layer projected, candidates re-ranked exactly", check=_check))
