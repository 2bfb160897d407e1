"""The eigenbasis scoring operator: the influence score (paper eq. 6) written once.

Every influence method here ends in the same sum.  With the curvature G = U diag(e) U^T
(K-FAC: eqs. 9-12, U = Q_B (x) Q_A per layer; TRAK/D-TRAK: the projected empirical Fisher),
the rotated training rows R_i = U^T grad l(x_i) and the rotated query q = U^T grad m(x_q),

    tau_i(lambda) = (1/N) grad m^T (G + lambda I)^{-1} grad l(x_i)
                  = (1/N) sum_j R_ij q_j / (e_j + lambda)                        (eq. 6)

Positive tau_i: removing x_i would raise the query's measurement (x_i is a proponent).
N is the training-set size: G is the curvature of the *mean* training loss, so lambda is
on the scale of G for the mean loss (docs/architecture.md §4).

``EigenbasisQuery`` holds one query's damping-free state (q, e, the rows) and answers
``score(lambda)``.  A whole grid of dampings is scored in one pass over the rows
(``Rows.inner_many``): with the first call where the rows say a grid pass costs about what one
damping does (``Rows.grid_in_first_pass``: a streamed bank, whose gradients dominate), else with the
second damping asked or ``fill_grid`` after the first answer (the stored int8 bank, TRAK's dense rows,
whose first answer is one exact pass); a later damping on the grid is a lookup, one inside
``damping_grid.SUPPORTED`` a weighted sum of the grid's scores (``damping_grid.interpolate``,
exact to a relative 1e-4 per eigen-coordinate), and any other one exact pass.

A bank kind (stored int8, streamed, or any new one) only has to provide ``Rows``: the number
of rows, ``inner_many`` and how many bytes of damped queries one pass may take.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ..config import COMPUTE
from .damping_grid import COARSE_GRID, DAMPING_GRID, interpolate
from .foreground import holding


@runtime_checkable
class Rows(Protocol):
    """Rotated training rows R (N x P'), however they are kept (int8 on disk, streamed, dense)."""

    num_examples: int
    # the damped queries of one grid pass may take this much (else a coarser grid); rows held in memory take
    # ``ComputeConfig.grid_max_bytes``, given to their constructor
    grid_max_bytes: int
    # True: the damping grid comes with the first score (the gradients dominate a query, e.g. a streamed
    # bank); False: the first score is one exact pass and the grid comes later (a pass over the rows costs
    # several single passes: the stored int8 bank, TRAK's dense rows).  Read with True as the default.
    grid_in_first_pass: bool

    def inner_many(self, queries: torch.Tensor) -> torch.Tensor:
        """(G, N) inner products <R_i, q_g> for G damped rotated queries (G, P'), without 1/N."""
        ...


class DenseRows:
    """Rows held as one float tensor (N, k) in memory (TRAK's rotated features); ``grid_max_bytes``: the
    context's ``compute.grid_max_bytes`` (None: ``ComputeConfig``'s default)."""

    # first answer: one matrix-vector product at the damping asked for (0.5 ms on digits, k = 2,048); the
    # grid, a matrix product (5.7 ms), is filled after the answer (``EigenbasisQuery.fill_grid``)
    grid_in_first_pass = False

    def __init__(self, rows: torch.Tensor, grid_max_bytes: int | None = None):
        self.rows = rows
        self.num_examples = int(rows.shape[0])
        self.grid_max_bytes = COMPUTE.grid_max_bytes if grid_max_bytes is None else int(grid_max_bytes)

    def inner_many(self, queries: torch.Tensor) -> torch.Tensor:
        """(G, N) <R_i, q_g> without 1/N (``Rows``): a matrix-vector product for one query."""
        q = queries.to(self.rows.device, self.rows.dtype)
        if q.shape[0] == 1:
            return (self.rows @ q[0])[None]  # a matrix-vector product for one damping
        return q @ self.rows.T


def choose_grid(rows: Rows, query_numel: int) -> tuple[float, ...] | None:
    """The fine damping grid if its G x P' float32 queries fit ``rows.grid_max_bytes``, else the
    powers of ten, else none (then each damping is its own pass)."""
    for grid in (DAMPING_GRID, COARSE_GRID):
        if (len(grid) + 1) * query_numel * 4 <= rows.grid_max_bytes:
            return grid
    return None


def to_scores(inner: torch.Tensor, num_examples: int) -> np.ndarray:
    """The 1/N of eq. 6, applied once for every method: (G, N) or (N,) float32 on the CPU."""
    return (inner / num_examples).to(torch.float32).cpu().numpy()


@dataclass(kw_only=True)
class EigenbasisQuery:
    """One query's damping-independent state in an eigenbasis, and its scores per damping.

    ``rotated`` q (P',) and ``eigenvalues`` e (P',) are in the same coordinates as ``rows``.
    ``use_grid``: score the damping grid in one pass (off: one pass per damping).
    ``grid_first``: that grid pass is the first call's (the default: the first answer costs the
    grid, every later damping is free); False: the first call scores its one damping only, and the
    grid is scored at the second damping asked for or by ``fill_grid`` (a faster first answer, for
    rows whose grid pass costs several single passes: the stored int8 bank).
    """

    rotated: torch.Tensor
    eigenvalues: torch.Tensor
    rows: Rows
    use_grid: bool = True
    grid_first: bool = True
    scores: dict[float, np.ndarray] = field(default_factory=dict)
    grid: tuple[float, ...] | None = None  # the grid scored in one pass, once it ran
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def damped(self, damping: float) -> torch.Tensor:
        """q / (e + lambda) (P',): the query of eq. 6 for this damping, ready for the rows."""
        return self.rotated / (self.eigenvalues.to(self.rotated.dtype) + float(damping))

    def exact(self, damping: float) -> np.ndarray:
        """tau(lambda) (N,) by one pass over the rows (no grid, no cache)."""
        return to_scores(self.rows.inner_many(self.damped(damping)[None])[0], self.rows.num_examples)

    def score(self, damping: float) -> np.ndarray:
        """tau(lambda) (N,) float32: a lookup, an interpolation from the grid, or a pass."""
        lam = float(damping)
        # one pass at a time (``fill_grid`` may run in another thread, paused for this very call: ``holding``)
        with holding(self._lock):
            if lam in self.scores:
                return self.scores[lam]
            if self.grid:
                interpolated = interpolate(self.scores, lam, self.grid)
                if interpolated is not None:
                    self.scores[lam] = interpolated
                    return interpolated
            due = not self.scores if self.grid_first else len(self.scores) == 1
            if not (self.use_grid and self.grid is None and due and self._grid_pass(lam)):
                self.scores[lam] = self.exact(lam)
            return self.scores[lam]

    def fill_grid(self) -> bool:
        """Score the damping grid now if it is not yet (one pass over the rows), so that every later
        damping is a lookup or an interpolation.  Meant for a background thread while the first
        answer (one exact pass, ``grid_first=False``) is on screen.  True when a pass ran."""
        with self._lock:
            if self.grid is not None or not self.use_grid:
                return False
            return self._grid_pass(None)

    def _grid_pass(self, lam: float | None) -> bool:
        """Score the grid (plus ``lam``) in one pass; False when no grid fits ``rows.grid_max_bytes``."""
        grid = choose_grid(self.rows, self.rotated.numel())
        if not grid:
            return False
        lams = sorted(set(grid) | ({lam} if lam is not None else set()))
        eig = self.eigenvalues.to(self.rotated.dtype)
        lam_t = torch.tensor(lams, dtype=eig.dtype, device=eig.device)[:, None]
        many = to_scores(self.rows.inner_many(self.rotated[None] / (eig[None] + lam_t)), self.rows.num_examples)
        for i, lv in enumerate(lams):
            self.scores.setdefault(lv, many[i])  # a damping scored exactly before keeps its scores
        self.grid = grid
        return True
