"""Compressed K-FAC bank with exact re-ranking (DESIGN.md 8; issue 11).

The stored bank holds N x P int8 bytes (CIFAR-10: 1.8 TB).  The compressed bank holds the
per-layer projected gradients G~_i = P_out G_i P_in^T (engine.attribution.layer_projection) of every
training example, rotated into the eigenbasis of the projected K-FAC factors

    A~ = P_in A P_in^T = Q~_A diag(a~) Q~_A^T,    B~ = P_out B P_out^T = Q~_B diag(b~) Q~_B^T,

and quantised to int8 exactly like the stored bank (``engine.attribution.bank``: same ``RotatedBank``,
same scoring, same damping grid and interpolation), so a query costs one pass over
N x P/ratio bytes and a damping change stays free.  Its scores are those of K-FAC inside
the projected space (paper eqs. 6, 9):

    tau~_i(q) = (1/N) vec(G~_q)^T (B~ (x) A~ + lambda I)^{-1} vec(G~_i),

an approximation of tau_i.  What the user sees is made exact by **re-ranking**: the C
largest and C smallest tau~ are candidates, and their exact scores against the *full*
factors, tau_i = (1/N) <R_q / (b a^T + lambda), R_i> with R = Q_B^T G Q_A (engine.attribution.bank),
come from fresh per-example gradients of just those 2C examples (the build's draws), each
rotated into the full eigenbasis once per query and scored at every damping of the grid
at once (``rerank_scores``), so a later damping change re-ranks the same candidates by a
lookup or the grid interpolation (engine.attribution.damping_grid) without new gradients.

Under torchrun each rank holds a slice of the bank's rows (``shard_rows``); a query's
compressed scores give each rank its local top-C and bottom-C, which ``merge_candidates``
combines (``gather_candidates`` does the all-gather) into exactly the single-process set.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import distributed
from ..model.diffusion import Diffusion, MCDraws
from .bank import RotatedBank, _chunk_arrays, build_in_parts
from .curvature import Block, KFACFactors, LayerFactors, _eigh
from .damping_grid import interpolate
from .gradients import Params, per_example_grads
from .layer_projection import (
    LayerProjection,
    make_projections,
    project_flat,
    projected_blocks,
    projected_grads,
)
from .scoring import GRID_MAX_BYTES, EigenbasisQuery, choose_grid
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
) -> RotatedBank:
    """Compute (or load) the rotated int8 bank of compressed per-example training gradients.

    Same persistence as ``engine.attribution.bank.build_bank`` (resumable parts, atomic publish, parts
    split over torchrun ranks); ``rows`` loads only that slice of the examples (a rank's shard).
    ``quantize=False`` keeps the rotated rows in the gradients' dtype (tests).
    """
    device = torch.device(device) if device is not None else params[0][1].device
    settings = dict(settings or {})
    settings.update(quantize=bool(quantize), chunk_size=int(chunk_size))
    blocks = compressed.blocks
    n = images.shape[0]

    def compute(part: slice) -> dict[str, torch.Tensor]:
        outs = []
        for s in range(part.start, part.stop, grad_batch):
            sub = slice(s, min(part.stop, s + grad_batch))
            outs.append(
                projected_grads(model, diffusion, images[sub], draws.for_rows(sub), params, compressed.projections, blocks)
            )
            if progress is not None:
                progress(f"compressed train gradients {sub.stop}/{n}", sub.stop / n)
        return _chunk_arrays(compressed.factors.rotate(torch.cat(outs)), blocks, quantize=quantize)

    def load(arrays: dict[str, np.ndarray]) -> RotatedBank:
        if rows is not None:
            arrays = {k: v[rows] for k, v in arrays.items()}
        return RotatedBank.from_arrays(arrays, blocks, device)

    if store is not None:
        arrays = store.load_arrays(name, settings)
        if arrays is not None:
            return load(arrays)
    arrays = build_in_parts(store, name, settings, n, chunk_size, compute)
    if store is None:
        arrays = {k: v.cpu().numpy() for k, v in arrays.items()}
    return load(arrays)


def compress_stored_bank(bank: RotatedBank, compressed: CompressedFactors, rows: int = 64) -> RotatedBank:
    """The compressed bank derived from a stored one, without gradients.

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
    parts: list[dict[str, torch.Tensor]] = []
    for s in range(0, n, rows):
        r = slice(s, min(n, s + rows))
        out = torch.empty((r.stop - r.start, sum(b.size for b in compressed.blocks)), dtype=dtype)
        for j, (blk, small) in enumerate(zip(full.blocks, compressed.blocks, strict=True)):
            x = bank.data[j][r].to(dtype)
            if bank.scales is not None:
                x = x * bank.scales[r, j : j + 1].to(dtype)
            if blk.kind == "weight":
                y = left[blk.layer] @ x.reshape(-1, *blk.shape) @ right[blk.layer]
            else:
                y = x @ left[blk.layer].T
            out[:, small.offset : small.offset + small.size] = y.reshape(out.shape[0], -1)
        parts.append(_chunk_arrays(compressed.factors.rotate(out), compressed.blocks, True))
    arrays = {k: torch.cat([p[k] for p in parts]).cpu().numpy() for k in parts[0]}
    return RotatedBank.from_arrays(arrays, compressed.blocks, bank.device)


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
    from the local slice and merged (``gather_candidates``): each rank returns its top-C.
    """

    quantized = True
    grid_max_bytes = GRID_MAX_BYTES

    def __init__(self, local: RotatedBank, rows: slice, num_examples: int):
        self.local, self.rows, self.num_examples = local, rows, int(num_examples)
        self.blocks = local.blocks

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


# --- candidates -------------------------------------------------------------------------


def local_candidates(scores: np.ndarray, c: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(indices, scores) of the c largest and c smallest of ``scores`` (global index = offset + local)."""
    n = scores.shape[0]
    c = min(int(c), n)
    top = np.argsort(-scores, kind="stable")[:c]
    low = np.argsort(scores, kind="stable")[:c]
    idx = np.unique(np.concatenate([top, low]))
    return idx + offset, scores[idx]


def merge_candidates(parts: Sequence[tuple[np.ndarray, np.ndarray]], c: int) -> np.ndarray:
    """Global candidate indices (sorted): the c largest and c smallest over every rank's local candidates.

    A rank's local top-c contains every one of its rows in the global top-c, so the merge is exact;
    ties are broken by index, as ``local_candidates`` on the whole vector does.
    """
    idx = np.concatenate([p[0] for p in parts])
    sc = np.concatenate([p[1] for p in parts])
    order = np.lexsort((idx, -sc))  # by score descending, then index
    n = idx.shape[0]
    c = min(int(c), n)
    top = idx[order[:c]]
    order_low = np.lexsort((idx, sc))
    low = idx[order_low[:c]]
    return np.unique(np.concatenate([top, low]))


def gather_candidates(local_scores: np.ndarray, offset: int, c: int) -> np.ndarray:
    """Every rank's local top/bottom-c, all-gathered and merged (the single-process set outside torchrun)."""
    mine = local_candidates(local_scores, c, offset)
    if distributed.current().world == 1:
        return merge_candidates([mine], c)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return merge_candidates(parts, c)


# --- exact re-ranking ---------------------------------------------------------------------


def rerank_scores(
    model: nn.Module,
    diffusion: Diffusion,
    images: torch.Tensor,
    draws: MCDraws,
    full: KFACFactors,
    params: Params,
    rotated_query: torch.Tensor,
    dampings: Sequence[float],
    num_examples: int,
    grad_batch: int = 16,
    chunk: int = 1 << 20,
    max_query_bytes: int = 4 << 30,
) -> np.ndarray:
    """Exact K-FAC scores (len(images), G) of these training images at every damping in ``dampings``.

    tau_i(lambda) = (1/N) sum_j R_ij q_j / (e_j + lambda), R_i = the full rotated gradient of
    image i (the build's draws), q the rotated query, e the full eigenvalues (engine.attribution.bank).

    Rotating a gradient costs P (d_out + d_in) per layer (CIFAR U-Net: ~0.2 TFLOP), so the
    cheaper side is rotated: with more candidates than dampings (and the G damped queries
    within ``max_query_bytes``) the G queries are rotated back once, V_g = Q (q / (e + lambda_g)),
    and tau_i = (1/N) <grad l_i, V_g> (as ``StreamedBank``); otherwise each candidate's
    gradient is rotated and (R * q) @ W with W_jg = 1/(e_j + lambda_g) is taken over chunks
    of coordinates.  Either way one batch of gradients is held at a time.
    """
    eig = full.eigenvalues().to(rotated_query.device, rotated_query.dtype)
    lam = torch.tensor(list(dampings), dtype=eig.dtype, device=eig.device)
    q = rotated_query.to(eig.dtype)
    back = None
    if images.shape[0] > lam.shape[0] and lam.shape[0] * q.numel() * q.element_size() <= max_query_bytes:
        back = torch.stack([full.unrotate(q / (eig + lv)) for lv in lam])  # (G, P)
    out = []
    from tqdm.auto import tqdm

    starts = range(0, images.shape[0], grad_batch)  # seconds to minutes (README "On a GPU"): a bar on a terminal
    for s in tqdm(starts, desc="K-FAC re-rank: candidates' fresh gradients", unit="batch", leave=False,
                  disable=None if len(starts) > 1 else True):
        rows = slice(s, min(images.shape[0], s + grad_batch))
        g = per_example_grads(model, diffusion, images[rows], draws.for_rows(rows), "loss", params).detach()
        if back is not None:
            out.append((g.to(eig.dtype) @ back.T) / num_examples)
            continue
        h = full.rotate(g.to(eig.dtype)) * q
        part = torch.zeros((h.shape[0], lam.shape[0]), dtype=eig.dtype, device=eig.device)
        for c0 in range(0, h.shape[1], chunk):
            w = 1.0 / (eig[c0 : c0 + chunk, None] + lam[None])
            part += h[:, c0 : c0 + chunk] @ w
        out.append(part / num_examples)
    return torch.cat(out).cpu().numpy()


class Reranker:
    """One query's exact scores for its candidates, at the damping grid; applied to each damping's compressed scores.

    ``apply(scores, lam)`` returns the scores with the candidates' entries exact and the mask of
    exact entries.  The first call picks the candidates (from that damping's compressed scores)
    and computes their grid scores (the only gradient work); later calls look up or
    interpolate (engine.attribution.damping_grid), and only a damping the grid cannot interpolate costs
    one more gradient pass over the same candidates.  ``apply(..., compute=False)`` before that work,
    or while it runs in another thread, returns the compressed scores unchanged with no entry exact
    (a deferred re-rank, ``RerankedQuery``); a computing caller waits for a re-rank running in another
    thread (a lock) instead of starting a second.
    """

    def __init__(self, score_fn: Callable[[np.ndarray, Sequence[float]], np.ndarray], candidates: int,
                 grid: Sequence[float], rows: slice | None = None):
        self.score_fn = score_fn  # (candidate indices, dampings) -> (len, G) exact scores
        self.c = int(candidates)
        self.grid = tuple(grid)
        self.rows = rows  # this rank's rows (torchrun): candidates come from them, merged over ranks
        self.indices: np.ndarray | None = None
        self.cache: dict[float, np.ndarray] = {}
        self.timing_ms: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        """True once the candidates' exact scores exist (the gradient work is done)."""
        return self.indices is not None

    def apply(self, scores: np.ndarray, lam: float, compute: bool = True) -> tuple[np.ndarray, np.ndarray]:
        if compute:
            with self._lock:
                return self._apply(scores, lam)
        # deferred: never wait for a re-rank running in another thread (a damping change meanwhile
        # shows the scan's scores at once), nor start one
        if not self._lock.acquire(blocking=False):
            return self._approximate(scores)
        try:
            return self._approximate(scores) if self.indices is None else self._apply(scores, lam)
        finally:
            self._lock.release()

    @staticmethod
    def _approximate(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.array(scores, dtype=np.float32, copy=True), np.zeros(scores.shape[0], dtype=bool)

    def _apply(self, scores: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
        if self.indices is None:
            t0 = time.perf_counter()
            rows = self.rows or slice(0, scores.shape[0])
            self.indices = gather_candidates(scores[rows], rows.start, self.c)
            lams = sorted(set(self.grid) | {float(lam)})
            exact = self.score_fn(self.indices, lams)
            self.cache = {lv: exact[:, i].astype(np.float32) for i, lv in enumerate(lams)}
            self.timing_ms["rerank"] = (time.perf_counter() - t0) * 1000.0
        lam = float(lam)
        if lam not in self.cache:
            got = interpolate(self.cache, lam, self.grid) if self.grid else None
            if got is None:
                got = self.score_fn(self.indices, [lam])[:, 0].astype(np.float32)
            self.cache[lam] = got
        out = np.array(scores, dtype=np.float32, copy=True)
        mask = np.zeros(out.shape[0], dtype=bool)
        out[self.indices] = self.cache[lam]
        mask[self.indices] = True
        return out, mask


@dataclass(kw_only=True)
class RerankedQuery(EigenbasisQuery):
    """The compressed bank's query (eq. 6 inside the projected space, ``scoring.EigenbasisQuery``)
    whose scores come back with the candidates' entries exact (``Reranker``); ``exact_mask``
    says which entries are exact once a damping was scored.

    ``defer_exact``: the first answer is the compressed scan alone (milliseconds), and the re-rank,
    2C candidates x M fresh gradient rows (about 5.6 s on digits on an H200, 18 s or more at CIFAR
    scale: README "On a GPU"), runs when ``fill_exact`` is called, e.g. by the app's background
    worker while the approximate answer is on screen.  Later scores are exact at the ends.  The app
    defers; the CLI does not (its answer is the exact one).  Not under torchrun: the re-rank's
    candidate merge is a collective, which every rank must enter from its query, not from a thread.
    """

    reranker: Reranker | None = None
    exact_mask: np.ndarray | None = None
    defer_exact: bool = False
    _first_damping: float | None = field(default=None, init=False, repr=False)

    def score(self, damping: float) -> np.ndarray:
        approx = super().score(damping)
        if self.reranker is None:
            return approx
        if self._first_damping is None:
            self._first_damping = float(damping)
        out, self.exact_mask = self.reranker.apply(approx, float(damping), compute=not self.defer_exact)
        return out

    @property
    def exact_pending(self) -> bool:
        """True while a deferred re-rank has not run: the scores shown are all approximate."""
        return self.reranker is not None and not self.reranker.ready

    def fill_exact(self) -> bool:
        """Run the deferred re-rank now (at the candidates of the first damping scored); True when it ran."""
        if not self.exact_pending or self._first_damping is None:
            return False
        lam = self._first_damping
        self.reranker.apply(EigenbasisQuery.score(self, lam), lam)  # type: ignore[union-attr]
        return True


class CompressedRows:
    """``scoring.Rows`` of a compressed bank, plus how a query enters its coordinates (``make_query``).

    ``exact_fn(indices, dampings, rotated_full)`` gives the candidates' exact scores (``rerank_scores``
    with the model, data and full factors bound); ``candidates`` per end, 0: no re-ranking.
    """

    def __init__(self, bank: RotatedBank | ShardedBank, compressed: CompressedFactors,
                 exact_fn: Callable[[np.ndarray, Sequence[float], torch.Tensor], np.ndarray], candidates: int):
        self.bank, self.compressed, self.exact_fn, self.candidates = bank, compressed, exact_fn, int(candidates)
        self.num_examples = bank.num_examples
        self.grid_max_bytes = bank.grid_max_bytes
        self.eigenvalues = compressed.factors.eigenvalues().to(bank.device)

    @property
    def nbytes(self) -> int:
        return self.bank.nbytes

    def inner_many(self, queries: torch.Tensor) -> torch.Tensor:
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
            query.reranker = Reranker(lambda idx, lams: self.exact_fn(idx, lams, rotated_full), self.candidates,
                                      grid, rows)
        return query


__all__ = [
    "CompressedRows",
    "RerankedQuery",
    "CompressedFactors",
    "Reranker",
    "ShardedBank",
    "build_compressed_bank",
    "compress_factors",
    "compress_stored_bank",
    "gather_candidates",
    "local_candidates",
    "merge_candidates",
    "rerank_scores",
    "shard_rows",
]
