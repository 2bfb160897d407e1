"""Compressed K-FAC bank with exact re-ranking (docs/architecture.md §8; issue 11).

The stored bank holds N x P int8 bytes (CIFAR-10: 1.8 TB).  The compressed bank holds the
per-layer projected gradients G~_i = P_out G_i P_in^T (engine.attribution.layer_projection) of every
training example, rotated into the eigenbasis of the projected K-FAC factors

    A~ = P_in A P_in^T = Q~_A diag(a~) Q~_A^T,    B~ = P_out B P_out^T = Q~_B diag(b~) Q~_B^T,

and quantised to int8 like the stored bank (``engine.attribution.bank``: same ``RotatedBank``,
same scoring, same damping grid and interpolation; on the plain grid, one step per example and block:
the stored bank's whitened grid moved the candidates' bottom-10 recall only from 0.972 to 0.975 here,
since the projection's error dominates the rounding's: ``scripts/candidate_split.py --compressed-grid
whitened``), so a query costs one pass over
N x P/ratio bytes and a damping change stays free.  Its scores are those of K-FAC inside
the projected space (paper eqs. 6, 9):

    tau~_i(q) = (1/N) vec(G~_q)^T (B~ (x) A~ + lambda I)^{-1} vec(G~_i),

an approximation of tau_i.  What the user sees is made exact by **re-ranking**: the C_top
largest and C_bottom smallest tau~, 2C in all (C = ``kfac_rerank``), are candidates, shared between the
ends by how crowded each is (the default ``kfac_rerank_split="adaptive"``: each end at least
f = min(64, C), up to 2C - f; "even": C each; ``rerank.CandidateSplit``), and their exact scores against the *full*
factors, tau_i = (1/N) <R_q / (b a^T + lambda), R_i> with R = Q_B^T G Q_A (engine.attribution.bank),
come from fresh per-example gradients of just those 2C examples (the build's draws), each
rotated into the full eigenbasis once per query and scored at every damping of the grid
at once (``rerank_scores``), so a later damping change re-ranks the same candidates by a
lookup or the grid interpolation (engine.attribution.damping_grid) without new gradients.  The
re-ranking itself (candidates, exact scores, the deferred re-rank of the app) is
``engine.attribution.rerank``; this module builds the bank and joins the two (``CompressedRows``).
The scores are exact for the candidates only: an image outside them that belongs in an end's exact
top-k is absent, which the answer's ``MethodResult.ranking_check`` flags where an estimate says it may be.

Under torchrun each rank holds a slice of the bank's rows (``shard_rows``); a query's
compressed scores give each rank its local ``split.depth(c)`` highest and lowest (2C - min(64, C) per
end when adaptive, C when even: an end may take up to that many), which ``merge_candidates`` combines
(``gather_candidates`` does the all-gather, with each rank's score moments) into exactly the
single-process set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import distributed
from ..config import ComputeConfig
from ..model.diffusion import Diffusion
from .bank import RotatedBank, artefact_settings, whitening
from .bank_build import _chunk_arrays, build_in_parts
from .curvature import Block, KFACFactors, LayerFactors, _eigh
from .gradients import Params
from .layer_projection import (
    LayerProjection,
    make_projections,
    project_flat,
    projected_blocks,
    projected_grads,
)
from .rerank import (
    EVEN,
    CandidateSplit,
    RerankedQuery,
    Reranker,
    exact_columns,
    gather_candidates,
    local_candidates,
    merge_candidates,
    rerank_scores,
)
from .scoring import choose_grid
from .train_draws import TrainDraws


@dataclass
class CompressedFactors:
    """Projections and the eigendecomposed K-FAC factors in the projected space."""

    full: KFACFactors  # the full factors (re-ranking)
    projections: list[LayerProjection]
    factors: KFACFactors  # projected: blocks in the compressed flat layout

    @property
    def blocks(self) -> list[Block]:
        return self.factors.blocks

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """Full flat gradients (P,) or (n, P) -> compressed (P~,) or (n, P~)."""
        return project_flat(grads, self.full, self.projections, self.factors.blocks)

    # --- persistence: the bank's rows are in *this* eigenbasis, so it is saved, never recomputed
    # (eigenvectors are defined up to sign and, for repeated eigenvalues, rotation: a recomputation
    # on another machine or thread count could flip them) -------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {f"f_{k}": v for k, v in self.factors.to_arrays().items()}
        for i, lp in enumerate(self.projections):
            arrays[f"p{i:03d}_out"] = lp.p_out.detach().cpu().numpy()
            if lp.p_in is not None:
                arrays[f"p{i:03d}_in"] = lp.p_in.detach().cpu().numpy()
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], full: KFACFactors) -> CompressedFactors:
        dev = full.layers[0].qb.device
        projections = []
        for i, lf in enumerate(full.layers):
            p_in = arrays.get(f"p{i:03d}_in")
            projections.append(LayerProjection(
                lf.name, torch.from_numpy(np.array(arrays[f"p{i:03d}_out"])).to(dev),
                None if p_in is None else torch.from_numpy(np.array(p_in)).to(dev)))
        empty = torch.empty(0)
        template = KFACFactors([LayerFactors(lf.name, None, None, empty, empty) for lf in full.layers],
                               projected_blocks(full, projections))
        factors = KFACFactors.from_arrays({k[2:]: v for k, v in arrays.items() if k.startswith("f_")}, template, dev)
        return cls(full, projections, factors)


def _projected_factor(p: torch.Tensor, q: torch.Tensor, ev: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """eigh of P F P^T for F = Q diag(ev) Q^T, in float64."""
    pq = p.double() @ q.double()
    return _eigh((pq * ev.double()) @ pq.T, dtype)


def compress_factors(full: KFACFactors, kind: str, ratio: float, seed: int = 0) -> CompressedFactors:
    """Projections of ``kind`` for ``ratio`` and the factors A~, B~ of the projected space, eigendecomposed."""
    if full.ekfac:
        raise ValueError("the compressed bank supports K-FAC, not EK-FAC (its corrected eigenvalues are per full "
                         "coordinate); use kfac_bank='stored' or 'streamed' with EK-FAC")
    projections = make_projections(full, kind, ratio, seed)
    layers = []
    for lf, lp in zip(full.layers, projections, strict=True):
        dtype = lf.qb.dtype
        b, qb = _projected_factor(lp.p_out, lf.qb, lf.b, dtype)
        a = qa = None
        if lp.p_in is not None:
            a, qa = _projected_factor(lp.p_in, lf.qa, lf.a, dtype)  # type: ignore[arg-type]
        layers.append(LayerFactors(name=lf.name, qa=qa, a=a, qb=qb, b=b))
    return CompressedFactors(full, projections, KFACFactors(layers, projected_blocks(full, projections)))


def build_compressed_bank(
    model: nn.Module,
    diffusion: Diffusion,
    images: torch.Tensor,
    draws: TrainDraws,
    compressed: CompressedFactors,
    params: Params,
    store: Any | None = None,
    name: str = "kfac-compressed-bank",
    settings: dict[str, Any] | None = None,
    chunk_size: int = 128,
    grad_batch: int = 8,
    device: torch.device | str | None = None,
    rows: slice | None = None,
    quantize: bool = True,
    progress: Callable[[str, float], None] | None = None,
    compute: ComputeConfig | None = None,
) -> RotatedBank:
    """Compute (or load) the rotated int8 bank of compressed per-example training gradients.

    Same persistence as ``engine.attribution.bank_build.build_bank`` (resumable parts, atomic publish, parts
    split over torchrun ranks); ``rows`` loads only that slice of the examples (a rank's shard).
    ``quantize=False`` keeps the rotated rows in the gradients' dtype (tests).  ``compute``: the speed and memory
    settings the bank scans with (``RotatedBank``; None: the defaults), no part of the cache key.
    """
    device = torch.device(device) if device is not None else params[0][1].device
    settings = artefact_settings(settings, quantize=quantize, chunk_size=chunk_size)  # as build_bank's key
    blocks = compressed.blocks
    n = images.shape[0]

    def chunk_rows(part: slice) -> dict[str, torch.Tensor]:
        outs = []
        for s in range(part.start, part.stop, grad_batch):
            sub = slice(s, min(part.stop, s + grad_batch))
            if progress is not None and s == part.start:  # the pass's (or part's) start: a fresh time left, not
                # the factor pass's last one, held through a batch of minutes at CIFAR size (QA 62 F4)
                progress(f"compressed train gradients {s}/{n}", s / n)
            outs.append(
                projected_grads(model, diffusion, images[sub], draws.for_rows(sub), params, compressed.projections, blocks)
            )
            if progress is not None:
                progress(f"compressed train gradients {sub.stop}/{n}", sub.stop / n)
        return _chunk_arrays(compressed.factors.rotate(torch.cat(outs)), blocks, quantize=quantize)

    def load(arrays: dict[str, np.ndarray]) -> RotatedBank:
        if rows is not None:
            arrays = {k: v[rows] for k, v in arrays.items()}
        return RotatedBank.from_arrays(arrays, blocks, device, compute=compute)

    if store is not None:
        arrays = store.load_arrays(name, settings)
        if arrays is not None:
            return load(arrays)
    arrays = build_in_parts(store, name, settings, n, chunk_size, chunk_rows, progress)
    if store is None:
        arrays = {k: v.cpu().numpy() for k, v in arrays.items()}
    return load(arrays)


def compress_stored_bank(
    bank: RotatedBank, compressed: CompressedFactors, rows: int = 64, whiten: float | None = None
) -> RotatedBank:
    """The compressed bank derived from a stored one, without gradients.

    ``whiten``: round the projected rows on the grid whitened by the projected factors' eigenvalues
    (``bank.whitening``, as the stored bank does) instead of the plain grid the built compressed bank
    uses (a measurement: ``scripts/candidate_split.py --compressed-grid whitened``).

    P_out G_i P_in^T = (P_out Q_B) R_i (P_in Q_A)^T with R_i = Q_B^T G_i Q_A the stored row, so
    each block needs two small products (for ``eigen`` projections P Q is a selection of
    eigen-directions).  Equal to ``build_compressed_bank`` up to the stored bank's int8 rounding
    (figures on digits, where the stored bank exists); models without a stored bank are built.
    """
    n, full = bank.num_examples, compressed.full
    dtype = full.layers[0].qb.dtype
    left = [(lp.p_out.to(dtype) @ lf.qb) for lp, lf in zip(compressed.projections, full.layers, strict=True)]
    right = [None if lp.p_in is None else (lp.p_in.to(dtype) @ lf.qa).T
             for lp, lf in zip(compressed.projections, full.layers, strict=True)]
    weights = None if whiten is None else whitening(compressed.factors.eigenvalues(), compressed.blocks, whiten)
    parts: list[dict[str, torch.Tensor]] = []
    for s in range(0, n, rows):
        r = slice(s, min(n, s + rows))
        out = torch.empty((r.stop - r.start, sum(b.size for b in compressed.blocks)), dtype=dtype)
        for j, (blk, small) in enumerate(zip(full.blocks, compressed.blocks, strict=True)):
            x = bank.block_rows(j, r, dtype)
            if blk.kind == "weight":
                y = left[blk.layer] @ x.reshape(-1, *blk.shape) @ right[blk.layer]
            else:
                y = x @ left[blk.layer].T
            out[:, small.offset : small.offset + small.size] = y.reshape(out.shape[0], -1)
        parts.append(_chunk_arrays(compressed.factors.rotate(out), compressed.blocks, True, weights))
    arrays = {k: torch.cat([p[k] for p in parts]).cpu().numpy() for k in parts[0]}
    return RotatedBank.from_arrays(arrays, compressed.blocks, bank.device, weights, bank.compute)


def shard_rows(n: int, shard: distributed.Shard | None = None) -> slice:
    """This rank's contiguous slice of the N bank rows (all of them outside torchrun)."""
    shard = shard or distributed.current()
    per = -(-n // shard.world)
    return slice(min(n, shard.rank * per), min(n, (shard.rank + 1) * per))


class ShardedBank:
    """This rank's rows of a compressed bank behind the full bank's scoring interface (torchrun).

    ``inner_many`` scans the local rows and all-gathers the (G, n_local) blocks
    into (G, N) on every rank (N floats per damping: small beside the bank), so the damping
    grid, interpolation and the session work unchanged; candidates for re-ranking are picked
    from the local slice and merged (``gather_candidates``): each rank sends its ``split.depth(c)`` most
    extreme at each end (2C - min(64, C) when adaptive, C when even), enough for any split of the 2C.
    """

    quantized = True

    def __init__(self, local: RotatedBank, rows: slice, num_examples: int):
        self.local, self.rows, self.num_examples = local, rows, int(num_examples)
        self.blocks = local.blocks
        self.grid_max_bytes = local.grid_max_bytes  # the local bank's (its ComputeConfig's) grid budget

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def nbytes(self) -> int:
        return self.local.nbytes

    def inner_many(self, queries: torch.Tensor) -> torch.Tensor:
        """(G, N) inner products over every rank's rows (scoring.Rows; no 1/N)."""
        t = self.local.inner_many(queries).cpu()
        per = -(-self.num_examples // dist.get_world_size())
        padded = torch.zeros((t.shape[0], per), dtype=t.dtype)
        padded[:, : t.shape[1]] = t
        parts = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, padded)
        return torch.cat(parts, dim=1)[:, : self.num_examples]


class CompressedRows:
    """``scoring.Rows`` of a compressed bank, plus how a query enters its coordinates (``make_query``).

    ``exact_fn(indices, dampings, rotated_full, should_stop, progress)`` gives the candidates' exact scores (``rerank_scores``
    with the model, data and full factors bound); ``candidates`` per end, 0: no re-ranking; ``split``: how the
    2 x ``candidates`` are shared between the ends (``rerank.CandidateSplit``); ``group_changes(indices,
    query_grads, damping)``: the exact sum of those images' scores for many queries, from their summed
    gradient with the build's draws (``group_gradient.kfac_group_changes``), and ``columns(indices,
    query_grads, damping)`` their exact scores one by one (``rerank.exact_columns``):
    ``KFACInfluence.exact_group_scores``, since this bank's batched product is an estimate.
    """

    def __init__(self, bank: RotatedBank | ShardedBank, compressed: CompressedFactors,
                 exact_fn: Callable[..., np.ndarray], candidates: int, split: CandidateSplit = EVEN,
                 group_changes: Callable[[np.ndarray, torch.Tensor, float], np.ndarray] | None = None,
                 columns: Callable[[np.ndarray, torch.Tensor, float], np.ndarray] | None = None):
        self.bank, self.compressed, self.exact_fn, self.candidates = bank, compressed, exact_fn, int(candidates)
        self.split = split
        self.group_changes = group_changes  # (training indices, (Q, P) query gradients, damping) -> (Q,) their exact sum
        self.columns = columns  # (training indices, (Q, P) query gradients, damping) -> (len, Q) exact scores
        self.num_examples = bank.num_examples
        self.grid_max_bytes = bank.grid_max_bytes
        self.eigenvalues = compressed.factors.eigenvalues().to(bank.device)

    @property
    def nbytes(self) -> int:
        return self.bank.nbytes

    def inner_many(self, queries: torch.Tensor) -> torch.Tensor:
        """(G, N) estimates of <R_i, q_g> from the compressed rows (``Rows``; no 1/N)."""
        return self.bank.inner_many(queries)

    def make_query(self, grad: torch.Tensor, rotated_full: torch.Tensor) -> RerankedQuery:
        """The query gradient (P,) projected and rotated into the compressed eigenbasis, with its re-ranker."""
        rotated = self.compressed.factors.rotate(self.compressed.project(grad))
        rows = self.bank.rows if isinstance(self.bank, ShardedBank) else None
        if rows is not None:  # the query is rank 0's, broadcast: every rank scores the same one
            dist.broadcast(rotated, 0)
            dist.broadcast(rotated_full, 0)
        query = RerankedQuery(rotated=rotated, eigenvalues=self.eigenvalues, rows=self)
        if self.candidates > 0:
            grid = choose_grid(self, rotated.numel()) or ()
            reranker = Reranker(
                lambda idx, lams, should_stop, progress: self.exact_fn(idx, lams, rotated_full, should_stop, progress),
                self.candidates, grid, rows, self.split,
            )
            query.reranker = reranker
        return query


__all__ = [
    "EVEN",
    "CandidateSplit",
    "CompressedRows",
    "RerankedQuery",
    "CompressedFactors",
    "Reranker",
    "ShardedBank",
    "build_compressed_bank",
    "compress_factors",
    "compress_stored_bank",
    "exact_columns",
    "gather_candidates",
    "local_candidates",
    "merge_candidates",
    "rerank_scores",
    "shard_rows",
]
