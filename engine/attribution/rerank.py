"""Exact re-ranking of a compressed bank's candidates (docs/architecture.md section 8; issue 11).

The compressed scores tau~ of ``engine.attribution.compressed_bank`` approximate K-FAC's eq. 6; what the
user sees is made exact by re-ranking: the C_top largest and C_bottom smallest tau~, 2C in all, are
candidates (``local_candidates``; under torchrun each rank's, all-gathered and merged by
``gather_candidates`` into exactly the single-process set), shared between the ends by how crowded
each is (``CandidateSplit``: the opponents, near-ties at the bulk's edge, get more than the
proponents, which stand out), and their exact scores against the *full* factors,

    tau_i(lambda) = (1/N) sum_j R_ij q_j / (e_j + lambda),   R_i = Q_B^T G_i Q_A,

come from fresh per-example gradients of just those 2C examples with the build's draws
(``rerank_scores``), at every damping of the grid at once, so a damping change re-ranks them by a
lookup or the grid interpolation.  ``Reranker`` holds one query's exact candidate scores;
``RerankedQuery`` applies them to each damping's compressed scores, with the other entries'
estimates multiplied by the factor fitted on the exact candidates (``scale_estimates``: the
compressed scan's scale is smaller than eq. 6's), at once or, in the app, deferred to a background worker (2C x M gradient rows: seconds to minutes; README "On a GPU").
The candidates are done most extreme first (``merge_candidates``), and a deferred answer made while
the re-rank runs has the candidates done so far exact: the shown top-k is almost always among the
first few candidates of its end, so it is exact after a small part of the re-rank (mnist, 32 gallery
queries: the top-10 final after a median 7% of it, at most 26%; ``scripts/rerank_order.py``).  A stopped re-rank keeps what it
had done and resumes after it.
The re-rank makes the candidates' *scores* exact, not the ranking: an image outside them that belongs in
an end's exact top-k is absent, with every entry shown exact (QA 55 #3, at small C).  Whether an end may
miss one is checked on the answer, against the other images' rescaled estimates, for the k the reader
shows (``results.MethodResult.ranking_check``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import distributed
from ..bar_redraw import QuietClock, interval
from ..model.diffusion import Diffusion, MCDraws
from .curvature import KFACFactors
from .damping_grid import interpolate
from .foreground import pause_point
from .gradients import Params, per_example_grads
from .results import BOTTOM_END, TOP_END
from .scoring import EigenbasisQuery

# --- candidates -------------------------------------------------------------------------


@dataclass(frozen=True)
class CandidateSplit:
    """How the 2C re-ranked candidates are shared between the two ends (``split_ends``).

    ``adaptive`` False: C at each end.  True: in proportion to how crowded each end is around its
    ``boundary``-th compressed score: the count of compressed scores within ``width`` standard
    deviations (of all N compressed scores) of it, each end keeping at least ``floor``.  Why: influence
    scores are skewed.  The strongest proponents stand far out of the bulk (mnist gallery: the exact
    top-10 a median 9.5 interquartile ranges above the median), where a compressed score's error seldom
    reorders them, while the strongest opponents sit at the bulk's edge (1.7 IQRs below), among
    near-ties that the compressed scores order loosely; so an even split spends candidates on the
    proponents that never change the answer and misses opponents.  ``floor`` is twice the app's
    largest top-k (32); ``boundary`` and ``width`` were chosen on the 32 gallery queries of digits and
    mnist and checked on fresh samples (``scripts/candidate_split.py``, README "Compressed K-FAC bank").
    """

    adaptive: bool = True
    boundary: int = 32
    width: float = 0.5
    floor: int = 64

    def depth(self, c: int) -> int:
        """How deep each end may go: C when even, 2C - floor when adaptive (the other end keeps its floor)."""
        return int(c) if not self.adaptive else 2 * int(c) - min(self.floor, int(c))


EVEN = CandidateSplit(adaptive=False)


def score_moments(scores: np.ndarray) -> np.ndarray:
    """(count, sum, sum of squares) of the compressed scores, float64: summed over ranks under torchrun,
    they give the standard deviation of all N that ``split_ends`` needs."""
    x = np.asarray(scores, dtype=np.float64)
    return np.array([x.size, x.sum(), np.square(x).sum()])


def split_ends(top: np.ndarray, low: np.ndarray, moments: np.ndarray, c: int,
               split: CandidateSplit) -> tuple[int, int]:
    """(candidates at the top end, at the bottom end), 2C in all (``CandidateSplit``).

    ``top``: the highest compressed scores, descending; ``low``: the lowest, ascending (each at least
    ``split.depth(c)`` long, or all there are).  With b = ``split.boundary`` and w = ``split.width`` x the
    standard deviation of all N scores, the ends' counts n_top = #{top_i >= top_b - w} and
    n_low = #{low_i <= low_b + w} share the 2C as C_top = 2C n_top / (n_top + n_low), clipped to
    [floor, 2C - floor] so that each end keeps floor = min(``split.floor``, C) (an end may take up to
    2C - floor)."""
    c = int(c)
    if not split.adaptive or top.size == 0 or low.size == 0:
        return c, c
    n, total, squares = (float(v) for v in moments)
    std = np.sqrt(max(squares / n - (total / n) ** 2, 0.0)) if n > 0 else 0.0
    b = min(split.boundary, top.size, low.size)
    w = split.width * std
    n_top = int(np.count_nonzero(top >= top[b - 1] - w))
    n_low = int(np.count_nonzero(low <= low[b - 1] + w))
    floor = min(split.floor, c)
    c_top = int(np.clip(round(2 * c * n_top / (n_top + n_low)), floor, 2 * c - floor))
    return c_top, 2 * c - c_top


def local_candidates(scores: np.ndarray, c: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(indices, scores) of the c largest and c smallest of ``scores`` (global index = offset + local)."""
    n = scores.shape[0]
    c = min(int(c), n)
    top = np.argsort(-scores, kind="stable")[:c]
    low = np.argsort(scores, kind="stable")[:c]
    idx = np.unique(np.concatenate([top, low]))
    return idx + offset, scores[idx]


def merge_candidates(parts: Sequence[tuple[np.ndarray, np.ndarray]], c: int,
                     split: CandidateSplit = EVEN, moments: np.ndarray | None = None) -> np.ndarray:
    """Global candidate indices, in the re-rank's order (``merge_candidate_ends`` without the ends)."""
    return merge_candidate_ends(parts, c, split, moments)[0]


def merge_candidate_ends(parts: Sequence[tuple[np.ndarray, np.ndarray]], c: int, split: CandidateSplit = EVEN,
                         moments: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(global candidate indices, each one's end: ``TOP_END``, ``BOTTOM_END`` or both bits, int8).

    The indices: the C_top largest and C_bottom smallest over every rank's local candidates
    (``split_ends``; C each for ``EVEN``), the most extreme first (the largest, the smallest, the second
    largest, the second smallest, ..., then the rest of the longer end).

    A rank's local top-d contains every one of its rows in the global top-d, so the merge is exact when
    every rank sent its ``split.depth(c)`` most extreme at each end; ties are broken by index, as
    ``local_candidates`` on the whole vector does.  ``moments``: ``score_moments`` of all N scores (summed
    over ranks), needed by an adaptive split.  The order is the re-rank's (``Reranker``): the exact top-k
    of the candidates come almost always from the first few of their end (mnist, 32 gallery queries,
    512 candidates: the top-10 from the first 16 in the median query, 62 at most; ``scripts/rerank_order.py``),
    so done in this order the shown proponents are exact long before the whole re-rank is.  The ends are
    kept because an end with fewer candidates than a list's k must not borrow the other end's exact scores
    (QA 61 F2: they ranked first, as exact scores do, so a top-10 of 8 top candidates listed two of the
    most negative scores next; ``results.MethodResult.exact_end``).
    """
    idx = np.concatenate([p[0] for p in parts])
    sc = np.concatenate([p[1] for p in parts])
    depth = min(split.depth(c), idx.shape[0])
    order = np.lexsort((idx, -sc))[:depth]  # by score descending, then index
    order_low = np.lexsort((idx, sc))[:depth]
    if split.adaptive and moments is None:
        raise ValueError("an adaptive candidate split needs the moments of all the scores (score_moments)")
    c_top, c_low = split_ends(sc[order], sc[order_low], moments if moments is not None else np.zeros(3), c, split)
    top, low = idx[order[:c_top]], idx[order_low[:c_low]]
    m = max(top.shape[0], low.shape[0])
    pairs = np.full((m, 2), -1, dtype=np.int64)
    pairs[: top.shape[0], 0] = top
    pairs[: low.shape[0], 1] = low
    interleaved = pairs.reshape(-1)
    interleaved = interleaved[interleaved >= 0]
    _, first = np.unique(interleaved, return_index=True)
    merged = interleaved[np.sort(first)]
    ends = np.where(np.isin(merged, top), TOP_END, 0) | np.where(np.isin(merged, low), BOTTOM_END, 0)
    return merged, ends.astype(np.int8)


def gather_candidates(local_scores: np.ndarray, offset: int, c: int, split: CandidateSplit = EVEN) -> np.ndarray:
    """Every rank's local top/bottom ``split.depth(c)`` (and its scores' moments), all-gathered and merged
    (the single-process set outside torchrun)."""
    return gather_candidate_ends(local_scores, offset, c, split)[0]


def gather_candidate_ends(local_scores: np.ndarray, offset: int, c: int,
                          split: CandidateSplit = EVEN) -> tuple[np.ndarray, np.ndarray]:
    """``gather_candidates`` with each candidate's end (``merge_candidate_ends``)."""
    mine = (*local_candidates(local_scores, split.depth(c), offset), score_moments(local_scores))
    if distributed.current().world == 1:
        parts = [mine]
    else:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
    return merge_candidate_ends([(p[0], p[1]) for p in parts], c, split, np.sum([p[2] for p in parts], axis=0))


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
    progress: Callable[[int, int, np.ndarray], None] | None = None,
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
    rotated_back = images.shape[0] > lam.shape[0] and lam.shape[0] * q.numel() * q.element_size() <= max_query_bytes
    if rotated_back:
        # (G, P), rotated back 8 dampings per call: batched (faster than one call per damping), yet the
        # peak stays about one (G, P) tensor, which ``max_query_bytes`` bounds
        back = torch.cat([full.unrotate(q[None] / (eig[None] + lam[i : i + 8, None])) for i in range(0, lam.shape[0], 8)])

        def combine(g: torch.Tensor) -> torch.Tensor:
            return (g.to(eig.dtype) @ back.T) / num_examples
    else:
        def combine(g: torch.Tensor) -> torch.Tensor:
            h = full.rotate(g.to(eig.dtype)) * q
            part = torch.zeros((h.shape[0], lam.shape[0]), dtype=eig.dtype, device=eig.device)
            for c0 in range(0, h.shape[1], chunk):
                w = 1.0 / (eig[c0 : c0 + chunk, None] + lam[None])
                part += h[:, c0 : c0 + chunk] @ w
            return part / num_examples

    # a smaller first batch on the CPU only, whose loop back-end computes each example's gradient alone (a GPU's
    # batched one may round differently by batch, and its first batch of 16 takes seconds, not minutes), and only
    # where ``combine`` is the cheap product with the rotated-back queries (a rotation per padded row costs minutes)
    on_cpu = params[0][1].device.type == "cpu"
    return _per_batch(model, diffusion, images, draws, params, grad_batch, combine, should_stop, progress,
                      first_batch=first_batch_size(grad_batch) if on_cpu and rotated_back else None)


def first_batch_size(grad_batch: int) -> int:
    """The re-rank's first batch of gradients: a quarter of ``grad_batch`` (at least 1), so that the most extreme
    candidates (``merge_candidates``'s order: the largest, the smallest, ...) come back exact sooner.  Why: at CIFAR
    size on a CPU one candidate took 5 s, and the app's re-rank bar moved in steps of 16, nothing exact for the
    first 87 s of a 5-min re-rank (QA 54 F6c).

    It changes no score's bytes (``rerank_scores`` uses it on the CPU only): the loop back-end computes each
    example's gradient alone, and ``_per_batch`` combines each part of the first batch in a product of the whole
    batch's shape, its rows where the whole batch had them and zeros elsewhere.  Why: the products round by their
    shape and a row's place in it (a row alone or among 2 differed from the same row among 16 in the last bits),
    and each entry of a product of that shape depends only on its own row.  The cost: a few more products of the
    first batch's shape, a second or two at CIFAR size beside its gradients' minutes."""
    return max(1, int(grad_batch) // 4)


def batches(total: int, grad_batch: int, first: int | None = None) -> list[tuple[slice, slice]]:
    """(batch, part): the rows of each ``grad_batch`` batch and the part of it whose gradients are computed at
    once: the whole batch, or the first batch in parts of ``first`` rows."""
    out = []
    for s in range(0, total, int(grad_batch)):
        batch = slice(s, min(total, s + int(grad_batch)))
        step = batch.stop - s if first is None or s > 0 else max(1, int(first))
        out.extend((batch, slice(p, min(batch.stop, p + step))) for p in range(s, batch.stop, step))
    return out


BAR_DELAY_S = 5.0  # a re-rank shorter than this draws no bar (the CLI's line stays a JSON object and nothing else)


def _per_batch(model: nn.Module, diffusion: Diffusion, images: torch.Tensor, draws: MCDraws, params: Params,
               grad_batch: int, combine: Callable[[torch.Tensor], torch.Tensor],
               should_stop: Callable[[], bool] | None = None,
               progress: Callable[..., None] | None = None, first_batch: int | None = None,
               desc: str = "K-FAC re-rank: candidates' exact scores") -> np.ndarray:
    """``combine(g)`` of the images' fresh per-example loss gradients g (the build's draws), ``grad_batch``
    at a time (the first in parts of ``first_batch``, each combined in the whole batch's shape:
    ``first_batch_size``), concatenated: one batch of gradients held at a time.  ``should_stop`` is asked before
    each part (True raises ``RerankCancelled``); ``progress(done, total, rows)`` is told after each.  On the main
    thread (the CLI's) a tqdm bar on stderr counts the candidates (``_bar``)."""
    out = []
    total = images.shape[0]
    bar = _bar(total, desc)
    clock = None if bar is None else QuietClock(bar, bar.maxinterval, name="bar clock: K-FAC re-rank")
    try:
        for batch, part in batches(total, grad_batch, first_batch):
            if should_stop is not None and should_stop():
                raise RerankCancelled("re-rank cancelled")
            pause_point()  # a deferred re-rank waits here while a page's query runs (engine.attribution.foreground)
            g = per_example_grads(model, diffusion, images[part], draws.for_rows(part), "loss", params).detach()
            if part != batch:  # a part of the first batch, in its place among zeros: the whole batch's product
                whole = g.new_zeros((batch.stop - batch.start, *g.shape[1:]))
                at = slice(part.start - batch.start, part.stop - batch.start)
                whole[at] = g
                out.append(combine(whole)[at])
            else:
                out.append(combine(g))
            if progress is not None:
                progress(part.stop, total, out[-1].cpu().numpy())
            if bar is not None:
                bar.update(part.stop - part.start)
                clock.touch()  # type: ignore[union-attr]
    finally:
        if clock is not None:
            clock.stop()
        if bar is not None:
            bar.close()
    return torch.cat(out).cpu().numpy()


def exact_columns(model: nn.Module, diffusion: Diffusion, images: torch.Tensor, draws: MCDraws, full: KFACFactors,
                  params: Params, query_grads: torch.Tensor, damping: float, num_examples: int,
                  grad_batch: int = 16, max_query_bytes: int = 4 << 30) -> np.ndarray:
    """Exact K-FAC scores (len(images), Q) of these training images for Q queries at one damping: the
    columns of eq. 6's (Q, N) matrix that a compressed bank's batched product only estimates (the group
    views' members, ``KFACInfluence.exact_group_scores``).

    As ``rerank_scores`` with the queries in place of the dampings: the query gradients (Q, P) are rotated
    into the eigenbasis, damped and rotated back, V_q = Q (Q^T g_q / (e + lambda)), and
    tau_i(q) = (1/N) <grad l_i, V_q>, so each image's gradient is computed once for all Q queries.  Queries
    whose (Q, P) damped copies exceed ``max_query_bytes`` go in groups that fit, each group a pass over the
    images' gradients again."""
    eig = full.eigenvalues()
    q = query_grads.to(eig.device, eig.dtype)
    per_pass = max(1, int(max_query_bytes // max(1, q.shape[1] * q.element_size())))
    parts = []
    for c0 in range(0, q.shape[0], per_pass):
        chunk = q[c0 : c0 + per_pass]
        back = torch.cat([full.unrotate(full.rotate(chunk[i : i + 8]) / (eig[None] + damping))
                          for i in range(0, chunk.shape[0], 8)])
        parts.append(_per_batch(model, diffusion, images, draws, params, grad_batch,
                                lambda g, back=back: (g.to(eig.dtype) @ back.T) / num_examples,
                                desc="K-FAC: exact scores of the group's members"))
    return np.concatenate(parts, axis=1)


MIN_SCALE_FIT = 8  # exact candidates needed before ``estimate_scale`` fits the estimates' scale


def estimate_scale(approx: np.ndarray, exact: np.ndarray, min_fit: int = MIN_SCALE_FIT) -> float | None:
    """The factor that puts a compressed bank's estimates on the scale of eq. 6's exact scores: the
    least-squares slope through the origin of the candidates' exact scores t_i on their estimates a_i,

        b = sum_i a_i t_i / sum_i a_i^2   over the re-ranked candidates,

    None with fewer than ``min_fit`` candidates or a slope that is not positive and finite.

    Why: the compressed scan scores eq. 6 inside the projected space, whose damped inverse
    (e~ + lambda)^-1 cannot reach the small-eigenvalue directions the full one weighs most, so its
    scores come out on a smaller scale (mnist, gaussian 32x: the exact candidates stand 16-28x above
    their estimates, ``scripts/estimate_scale.py``).  An answer whose candidates are exact and whose
    other entries are raw estimates mixes two scales in one column: the CSV, the scatter and histogram,
    rank correlations over all N and the LDS's subset sums would read it as one.  The candidates are
    chosen by their estimate, and selecting on the regressor leaves a least-squares slope of t on a
    unbiased where the relation is linear; it is not exactly linear here, which the script measures
    (slope over the candidates against over the other entries)."""
    a = np.asarray(approx, dtype=np.float64)
    t = np.asarray(exact, dtype=np.float64)
    if a.shape[0] < min_fit:
        return None
    den = float(a @ a)
    b = float(a @ t) / den if den > 0 else float("nan")
    return b if np.isfinite(b) and b > 0 else None


def scale_estimates(scores: np.ndarray, approx: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float | None]:
    """``scores`` (candidates exact where ``mask``) with the other entries, the estimates ``approx``,
    multiplied by ``estimate_scale`` fitted on the exact ones; unchanged (None) when it cannot be fitted."""
    if mask.all():  # nothing estimated: no factor to report (QA 31a: an all-exact answer named one)
        return scores, None
    b = estimate_scale(approx[mask], scores[mask])
    if b is None:
        return scores, None
    out = np.array(scores, dtype=np.float32, copy=True)
    out[~mask] = (approx[~mask].astype(np.float64) * b).astype(np.float32)
    return out, b


@dataclass(frozen=True)
class RerankProgress:
    """A running re-rank: candidates done of ``total``, ``seconds`` it has run (a resumed one counting on
    from its stopped attempts), and the seconds ``left`` at the rate of the batches after the first (None
    until a second batch is done: the first also carries the start-up, so its rate overstates the time
    left, by 10x under load)."""

    done: int
    total: int
    seconds: float
    left: float | None = None


def _terminal_bar() -> bool:
    """Whether the re-rank draws a tqdm bar: only on the main thread (the CLI's).  The app's re-ranks run in
    its background worker or a page's script thread, whose terminal is the server's log, where a bar is
    noise; the page draws its own (``progress``)."""
    return threading.current_thread() is threading.main_thread()


def _bar(total: int, desc: str):  # -> tqdm | None
    """The CLI's re-rank bar on stderr, counting candidates, or None (off the main thread, ``_terminal_bar``).

    As the CLI's other bars: drawn into a log file too (it was tqdm's ``disable=None``, a terminal only, so a
    ``query --json 2> log`` re-ranking 64 CIFAR candidates for 317 s on a CPU wrote nothing: QA 54 F6b),
    silenced by ``TQDM_DISABLE=1`` (no ``disable`` argument, which would override it), thinned by
    ``TQDM_MININTERVAL`` (``bar_redraw.interval``), its clock kept moving through a long batch by
    ``bar_redraw.QuietClock`` (every ``TQDM_MAXINTERVAL``, 10 s by default); only when it lasts: tqdm's
    ``delay`` draws nothing for a re-rank done within ``BAR_DELAY_S`` (nor a line at its close)."""
    if not _terminal_bar():
        return None
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="candidate", file=sys.stderr, delay=BAR_DELAY_S, **interval(0.5))


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
                 grid: Sequence[float], rows: slice | None = None, split: CandidateSplit = EVEN):
        # (candidate indices, dampings, should_stop, progress) -> (len, G) exact scores (``rerank_scores``)
        self.score_fn = score_fn
        self.c = int(candidates)
        self.split = split  # how the 2C candidates are shared between the ends
        self.grid = tuple(grid)
        self.rows = rows  # this rank's rows (torchrun): candidates come from them, merged over ranks
        self.indices: np.ndarray | None = None  # set with ``cache``, once the exact scores exist
        # the candidates picked and each one's end (``merge_candidate_ends``), from the first computing call
        self._ends: tuple[np.ndarray, np.ndarray] | None = None
        self.cache: dict[float, np.ndarray] = {}
        self.timing_ms: dict[str, float] = {}
        self._lock = threading.Lock()
        # the running re-rank's (candidates done, total, start, end of its first batch, done by then)
        self._progress: tuple[int, int, float, float | None, int] | None = None
        # a re-rank under way or stopped: (its candidates in order, its dampings, the exact rows done so far)
        self._partial: tuple[np.ndarray, tuple[float, ...], list[np.ndarray]] | None = None
        self._spent = 0.0  # seconds the stopped attempts of that re-rank ran: a resume's progress counts on from them

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

    def end_flags(self, n: int) -> np.ndarray | None:
        """(n,) int8: each candidate's end (``TOP_END``, ``BOTTOM_END``, both bits), 0 elsewhere; None before
        the candidates are picked.  With the exact mask it tells an end's own exact scores from the other's
        (``results.MethodResult.exact_end``)."""
        picked = self._ends
        if picked is None:
            return None
        flags = np.zeros(int(n), dtype=np.int8)
        flags[picked[0]] = picked[1]
        return flags

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
        worker stops when a newer query waits, while a user's "Exact ranking" click in the app is never
        stopped by it."""
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
            indices, ends = gather_candidate_ends(scores[rows], rows.start, self.c, self.split)
            self._ends = (indices, ends)
            lams = tuple(sorted(set(self.grid) | {float(lam)}))
            partial = self._partial
            if partial is None or partial[1] != lams or not np.array_equal(partial[0], indices):
                partial = self._partial = (indices, lams, [])
                self._spent = 0.0
            kept = list(partial[2])  # a stopped re-rank's rows: it resumes after them
            done = sum(r.shape[0] for r in kept)
            started = time.monotonic()
            self._progress = (done, len(indices), started - self._spent, None, 0)
            try:
                rest = self.score_fn(indices[done:], list(lams), should_stop,
                                     lambda d, t, r=None: self.report(done + d, done + t, r))
            finally:
                self._progress = None
                self._spent += time.monotonic() - started
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
    whose scores come back with the candidates' entries exact (``Reranker``) and the other entries'
    estimates put on their scale (``scale_estimates``, factor ``estimate_scale``); ``exact_mask``
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
    exact_end: np.ndarray | None = None  # each entry's candidate end (``Reranker.end_flags``), with ``exact_mask``
    estimate_scale: float | None = None  # the factor on the last answer's estimates (``scale_estimates``)
    answer_pending: bool = False  # the last ``score`` answered approximately while a re-rank was pending
    defer_exact: bool = False
    _first_damping: float | None = field(default=None, init=False, repr=False)

    def score(self, damping: float) -> np.ndarray:
        approx = super().score(damping)
        if self.reranker is None:
            return approx
        if self._first_damping is None:
            self._first_damping = float(damping)
        out, mask, final = self.reranker.answer(approx, float(damping), compute=not self.defer_exact)
        out, self.estimate_scale = scale_estimates(out, approx, mask)  # one scale in the answer's column
        self.exact_mask = mask
        self.exact_end = self.reranker.end_flags(out.shape[0])
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

