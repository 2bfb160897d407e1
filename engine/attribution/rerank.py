"""Exact re-ranking of a compressed bank's candidates (docs/architecture.md section 8; issue 11).

The compressed scores tau~ of ``engine.attribution.compressed_bank`` approximate K-FAC's eq. 6; what the
user sees is made exact by re-ranking: the C largest and C smallest tau~ are candidates
(``local_candidates``; under torchrun each rank's, all-gathered and merged by ``gather_candidates``
into exactly the single-process set), and their exact scores against the *full* factors,

    tau_i(lambda) = (1/N) sum_j R_ij q_j / (e_j + lambda),   R_i = Q_B^T G_i Q_A,

come from fresh per-example gradients of just those 2C examples with the build's draws
(``rerank_scores``), at every damping of the grid at once, so a damping change re-ranks them by a
lookup or the grid interpolation.  ``Reranker`` holds one query's exact candidate scores;
``RerankedQuery`` applies them to each damping's compressed scores, at once or, in the app,
deferred to a background worker (2C x M gradient rows: seconds to minutes; README "On a GPU").
The candidates are done most extreme first (``merge_candidates``), and a deferred answer made while
the re-rank runs has the candidates done so far exact: the shown top-k is almost always among the
first few candidates of its end, so it is exact after a small part of the re-rank (mnist, 32 gallery
queries: the top-10 final after a median 7% of it, at most 27%; ``scripts/rerank_order.py``).  A stopped re-rank keeps what it
had done and resumes after it.
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
from .curvature import KFACFactors
from .damping_grid import interpolate
from .gradients import Params, per_example_grads
from .scoring import EigenbasisQuery

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
    """Global candidate indices: the c largest and c smallest over every rank's local candidates, the
    most extreme first (the largest, the smallest, the second largest, the second smallest, ...).

    A rank's local top-c contains every one of its rows in the global top-c, so the merge is exact;
    ties are broken by index, as ``local_candidates`` on the whole vector does.  The order is the
    re-rank's (``Reranker``): the exact top-k of all 2c come almost always from the first few
    candidates of each end (mnist, 32 gallery queries, c = 256: the top-10 from the first 16 in the
    median query, 62 at most; the bottom-10 from the first 137, up to 256; ``scripts/rerank_order.py``),
    so done in this order the shown proponents are exact long before the whole re-rank is.
    """
    idx = np.concatenate([p[0] for p in parts])
    sc = np.concatenate([p[1] for p in parts])
    order = np.lexsort((idx, -sc))  # by score descending, then index
    n = idx.shape[0]
    c = min(int(c), n)
    top = idx[order[:c]]
    order_low = np.lexsort((idx, sc))
    low = idx[order_low[:c]]
    interleaved = np.stack([top, low], axis=1).reshape(-1)
    _, first = np.unique(interleaved, return_index=True)
    return interleaved[np.sort(first)]


def gather_candidates(local_scores: np.ndarray, offset: int, c: int) -> np.ndarray:
    """Every rank's local top/bottom-c, all-gathered and merged (the single-process set outside torchrun)."""
    mine = local_candidates(local_scores, c, offset)
    if distributed.current().world == 1:
        return merge_candidates([mine], c)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return merge_candidates(parts, c)


# --- exact re-ranking ---------------------------------------------------------------------


class RerankCancelled(RuntimeError):
    """A deferred re-rank stopped between batches because its caller's ``should_stop`` said so (the app's
    worker: a newer query is waiting)."""


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
    should_stop: Callable[[], bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Exact K-FAC scores (len(images), G) of these training images at every damping in ``dampings``.

    tau_i(lambda) = (1/N) sum_j R_ij q_j / (e_j + lambda), R_i = the full rotated gradient of
    image i (the build's draws), q the rotated query, e the full eigenvalues (engine.attribution.bank).

    Rotating a gradient costs P (d_out + d_in) per layer (CIFAR U-Net: ~0.2 TFLOP), so the
    cheaper side is rotated: with more candidates than dampings (and the G damped queries
    within ``max_query_bytes``) the G queries are rotated back once, V_g = Q (q / (e + lambda_g)),
    and tau_i = (1/N) <grad l_i, V_g> (as ``StreamedBank``); otherwise each candidate's
    gradient is rotated and (R * q) @ W with W_jg = 1/(e_j + lambda_g) is taken over chunks
    of coordinates.  Either way one batch of gradients is held at a time.  ``should_stop`` is asked
    before each batch; True raises ``RerankCancelled`` (the app's worker moved on to a newer query).
    ``progress(done, total, rows)`` is told the candidates done after each batch and that batch's
    (batch, G) exact scores (the app's progress bar, and the partial answer of ``Reranker``).
    """
    eig = full.eigenvalues().to(rotated_query.device, rotated_query.dtype)
    lam = torch.tensor(list(dampings), dtype=eig.dtype, device=eig.device)
    q = rotated_query.to(eig.dtype)
    back = None
    if images.shape[0] > lam.shape[0] and lam.shape[0] * q.numel() * q.element_size() <= max_query_bytes:
        # (G, P), rotated back 8 dampings per call: batched (faster than one call per damping), yet the
        # peak stays about one (G, P) tensor, which ``max_query_bytes`` bounds
        back = torch.cat([full.unrotate(q[None] / (eig[None] + lam[i : i + 8, None])) for i in range(0, lam.shape[0], 8)])
    out = []
    from tqdm.auto import tqdm

    starts = range(0, images.shape[0], grad_batch)  # seconds to minutes (README "On a GPU"): a bar on a terminal
    for s in tqdm(starts, desc="K-FAC re-rank: candidates' fresh gradients", unit="batch", leave=False,
                  disable=None if _terminal_bar(len(starts)) else True):
        if should_stop is not None and should_stop():
            raise RerankCancelled("re-rank cancelled")
        rows = slice(s, min(images.shape[0], s + grad_batch))
        g = per_example_grads(model, diffusion, images[rows], draws.for_rows(rows), "loss", params).detach()
        if back is not None:
            out.append((g.to(eig.dtype) @ back.T) / num_examples)
        else:
            h = full.rotate(g.to(eig.dtype)) * q
            part = torch.zeros((h.shape[0], lam.shape[0]), dtype=eig.dtype, device=eig.device)
            for c0 in range(0, h.shape[1], chunk):
                w = 1.0 / (eig[c0 : c0 + chunk, None] + lam[None])
                part += h[:, c0 : c0 + chunk] @ w
            out.append(part / num_examples)
        if progress is not None:
            progress(rows.stop, images.shape[0], out[-1].cpu().numpy())
    return torch.cat(out).cpu().numpy()


@dataclass(frozen=True)
class RerankProgress:
    """A running re-rank: candidates done of ``total``, ``seconds`` since it started, and the seconds
    ``left`` at the rate of the batches after the first (None until a second batch is done: the first
    also carries the start-up, so its rate overstates the time left, by 10x under load)."""

    done: int
    total: int
    seconds: float
    left: float | None = None


def _terminal_bar(batches: int) -> bool:
    """Whether the re-rank draws a tqdm bar: only on the main thread (the CLI's), with more than one batch.
    The app's re-ranks run in its background worker or a page's script thread, whose terminal is the
    server's log, where a bar is noise; the page draws its own (``progress``)."""
    return batches > 1 and threading.current_thread() is threading.main_thread()


class Reranker:
    """One query's exact scores for its candidates, at the damping grid; applied to each damping's compressed scores.

    ``apply(scores, lam)`` returns the scores with the candidates' entries exact and the mask of
    exact entries.  The first call picks the candidates (from that damping's compressed scores)
    and computes their grid scores (the only gradient work); later calls look up or
    interpolate (engine.attribution.damping_grid), and only a damping the grid cannot interpolate costs
    one more gradient pass over the same candidates.  ``apply(..., compute=False)`` before that work,
    or while it runs in another thread, returns the compressed scores with the candidates done so far
    exact (the most extreme first, ``merge_candidates``; none before the first batch): a deferred
    re-rank's partial answer (``RerankedQuery``).  A computing caller waits for a re-rank running in
    another thread (a lock) instead of starting a second, and one that was stopped resumes after the
    candidates it had done.
    """

    def __init__(self, score_fn: Callable[..., np.ndarray], candidates: int,
                 grid: Sequence[float], rows: slice | None = None):
        # (candidate indices, dampings, should_stop, progress) -> (len, G) exact scores (``rerank_scores``)
        self.score_fn = score_fn
        self.c = int(candidates)
        self.grid = tuple(grid)
        self.rows = rows  # this rank's rows (torchrun): candidates come from them, merged over ranks
        self.indices: np.ndarray | None = None  # set with ``cache``, once the exact scores exist
        self.cache: dict[float, np.ndarray] = {}
        self.timing_ms: dict[str, float] = {}
        self._lock = threading.Lock()
        # the running re-rank's (candidates done, total, start, end of its first batch, done by then)
        self._progress: tuple[int, int, float, float | None, int] | None = None
        # a re-rank under way or stopped: (its candidates in order, its dampings, the exact rows done so far)
        self._partial: tuple[np.ndarray, tuple[float, ...], list[np.ndarray]] | None = None

    def report(self, done: int, total: int, rows: np.ndarray | None = None) -> None:
        """The ``progress`` of this re-rank's gradient loop (``rerank_scores``), told after each batch with
        that batch's exact scores (kept for the partial answer and a resume)."""
        partial = self._partial
        if rows is not None and partial is not None:
            partial[2].append(np.asarray(rows))  # before the count below: a reader never sees more done than kept
        now = time.monotonic()
        start, first, done_first = (now, None, 0) if self._progress is None else self._progress[2:]
        if first is None:  # the first batch carries the start-up (the damped queries, a cold model)
            first, done_first = now, int(done)
        self._progress = (int(done), int(total), start, first, done_first)

    @property
    def progress(self) -> RerankProgress | None:
        """How far the running re-rank is, else None (not started, done or stopped)."""
        p = self._progress
        if p is None or self.ready or not self._lock.locked():
            return None
        done, total, start, first, done_first = p
        now = time.monotonic()
        left = None
        if first is not None and done > done_first:  # the rate since the first batch, start-up excluded
            left = (now - first) / (done - done_first) * (total - done)
        return RerankProgress(done, total, now - start, left)

    @property
    def ready(self) -> bool:
        """True once the candidates' exact scores exist (the gradient work is done)."""
        return self.indices is not None

    def apply(self, scores: np.ndarray, lam: float, compute: bool = True,
              should_stop: Callable[[], bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, exact mask); ``answer`` also says whether they are final."""
        out, mask, _ = self.answer(scores, lam, compute, should_stop)
        return out, mask

    def answer(self, scores: np.ndarray, lam: float, compute: bool = True,
               should_stop: Callable[[], bool] | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
        """(scores, exact mask, final): final is False for a partial or approximate answer (the re-rank not
        done when it was made).  ``should_stop``: asked between batches of this call's gradient work; True
        leaves the scores partial (still pending).  It belongs to the call, not to the re-rank: the app's
        worker stops when a newer query waits, while a user's "Show the exact ranking" is never stopped by it."""
        if compute:
            with self._lock:
                try:
                    return (*self._apply(scores, lam, should_stop), True)
                except RerankCancelled:
                    return (*self._partial_answer(scores, lam), False)
        # deferred: never wait for a re-rank running in another thread (a damping change meanwhile
        # shows the partial answer at once), nor start one
        if not self._lock.acquire(blocking=False):
            return (*self._partial_answer(scores, lam), False)
        try:
            if self.indices is None:
                return (*self._partial_answer(scores, lam), False)
            return (*self._apply(scores, lam, None), True)
        finally:
            self._lock.release()

    def _partial_answer(self, scores: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
        """The compressed scores with the candidates done so far exact (none done: all approximate)."""
        out = np.array(scores, dtype=np.float32, copy=True)
        mask = np.zeros(out.shape[0], dtype=bool)
        partial = self._partial
        if partial is None or not partial[2]:
            return out, mask
        order, lams, rows = partial[0], partial[1], np.concatenate(list(partial[2]))
        got = _at_damping({lv: rows[:, i] for i, lv in enumerate(lams)}, float(lam), self.grid)
        if got is None:  # a damping the grid cannot interpolate: exact only once the re-rank is done
            return out, mask
        idx = order[: rows.shape[0]]
        out[idx] = got
        mask[idx] = True
        return out, mask

    def _apply(self, scores: np.ndarray, lam: float,
               should_stop: Callable[[], bool] | None) -> tuple[np.ndarray, np.ndarray]:
        if self.indices is None:
            t0 = time.perf_counter()
            rows = self.rows or slice(0, scores.shape[0])
            indices = gather_candidates(scores[rows], rows.start, self.c)
            lams = tuple(sorted(set(self.grid) | {float(lam)}))
            partial = self._partial
            if partial is None or partial[1] != lams or not np.array_equal(partial[0], indices):
                partial = self._partial = (indices, lams, [])
            kept = list(partial[2])  # a stopped re-rank's rows: it resumes after them
            done = sum(r.shape[0] for r in kept)
            self._progress = (done, len(indices), time.monotonic(), None, 0)
            try:
                rest = self.score_fn(indices[done:], list(lams), should_stop,
                                     lambda d, t, r=None: self.report(done + d, done + t, r))
            finally:
                self._progress = None
            exact = np.concatenate([*kept, rest]) if kept else rest
            self.cache = {lv: exact[:, i].astype(np.float32) for i, lv in enumerate(lams)}
            self.indices = indices  # last: ``ready`` only once the exact scores exist
            self._partial = None
            self.timing_ms["rerank"] = (time.perf_counter() - t0) * 1000.0
        lam = float(lam)
        if lam not in self.cache:
            got = _at_damping(self.cache, lam, self.grid)
            if got is None:
                got = self.score_fn(self.indices, [lam], None, None)[:, 0].astype(np.float32)
            self.cache[lam] = got
        out = np.array(scores, dtype=np.float32, copy=True)
        mask = np.zeros(out.shape[0], dtype=bool)
        out[self.indices] = self.cache[lam]
        mask[self.indices] = True
        return out, mask


def _at_damping(scores: dict[float, np.ndarray], lam: float, grid: tuple[float, ...]) -> np.ndarray | None:
    """The candidates' scores at ``lam``: computed there, interpolated from the grid, or None (neither)."""
    if lam in scores:
        return scores[lam]
    return interpolate(scores, lam, grid) if grid else None


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
    answer_pending: bool = False  # the last ``score`` answered approximately while a re-rank was pending
    defer_exact: bool = False
    _first_damping: float | None = field(default=None, init=False, repr=False)

    def score(self, damping: float) -> np.ndarray:
        approx = super().score(damping)
        if self.reranker is None:
            return approx
        if self._first_damping is None:
            self._first_damping = float(damping)
        out, self.exact_mask, final = self.reranker.answer(approx, float(damping), compute=not self.defer_exact)
        # from this answer itself, not from ``exact_pending`` read later: the worker may finish in between
        self.answer_pending = not final
        return out

    @property
    def exact_pending(self) -> bool:
        """True while a deferred re-rank has not run: the scores shown are all approximate."""
        return self.reranker is not None and not self.reranker.ready

    def fill_exact(self, should_stop: Callable[[], bool] | None = None) -> bool:
        """Run the deferred re-rank now (at the candidates of the first damping scored), or wait for the
        one running in another thread; True when the exact scores exist afterwards (False: nothing was
        pending, or ``should_stop`` stopped it)."""
        if not self.exact_pending or self._first_damping is None:
            return False
        lam = self._first_damping
        self.reranker.apply(EigenbasisQuery.score(self, lam), lam, should_stop=should_stop)  # type: ignore[union-attr]
        return not self.exact_pending

    @property
    def exact_progress(self) -> RerankProgress | None:
        """How far the deferred re-rank is while it runs (``Reranker.progress``), else None."""
        return None if self.reranker is None else self.reranker.progress

