"""The eigenbasis scoring operator (engine.attribution.scoring): eq. 6 written once."""

from __future__ import annotations

import numpy as np
import torch

from engine.attribution.damping_grid import DAMPING_GRID, SUPPORTED
from engine.attribution.scoring import DenseRows, EigenbasisQuery, choose_grid


class CountingRows(DenseRows):
    """Dense rows that count the passes made over them."""

    def __init__(self, rows: torch.Tensor, grid_max_bytes: int | None = None):
        super().__init__(rows, grid_max_bytes)
        self.passes = 0

    def inner_many(self, queries: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        return super().inner_many(queries)


def _problem(n: int = 40, p: int = 30, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, p, generator=g, dtype=torch.float64)
    q = torch.randn(p, generator=g, dtype=torch.float64)
    e = torch.logspace(-6, 2, p, dtype=torch.float64)  # a spread spectrum, like K-FAC's
    return rows, q, e


def _direct(rows, q, e, lam) -> np.ndarray:
    """tau_i = (1/N) sum_j R_ij q_j / (e_j + lambda)."""
    return ((rows @ (q / (e + lam))) / rows.shape[0]).numpy()


def test_scores_are_eq6_with_one_pass_for_the_whole_grid():
    rows, q, e = _problem()
    r = CountingRows(rows)
    query = EigenbasisQuery(rotated=q, eigenvalues=e, rows=r)
    lam = 3e-3
    np.testing.assert_allclose(query.score(lam), _direct(rows, q, e, lam), rtol=1e-6)
    assert r.passes == 1 and query.grid == DAMPING_GRID
    for g in (1e-8, 1e-2, 10.0):  # on the grid: lookups, scored in that first pass
        np.testing.assert_allclose(query.score(g), _direct(rows, q, e, g), rtol=1e-6)
    off = 4.2e-5  # inside SUPPORTED, off the grid: interpolated, no pass
    got = query.score(off)
    want = _direct(rows, q, e, off)
    assert r.passes == 1
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    below = SUPPORTED[0] / 100  # outside: one exact pass
    np.testing.assert_allclose(query.score(below), _direct(rows, q, e, below), rtol=1e-6)
    assert r.passes == 2
    assert query.score(off) is query.score(off)  # cached


def test_no_grid_when_the_rows_cannot_take_it_and_exact_is_exact():
    rows, q, e = _problem(seed=1)
    r = CountingRows(rows, grid_max_bytes=10)  # not even the coarse grid fits
    assert choose_grid(r, q.numel()) is None
    query = EigenbasisQuery(rotated=q, eigenvalues=e, rows=r)
    for k, lam in enumerate((1e-3, 2e-3), start=1):
        np.testing.assert_allclose(query.score(lam), _direct(rows, q, e, lam), rtol=1e-6)
        assert r.passes == k and query.grid is None
    np.testing.assert_allclose(query.exact(1e-3), query.score(1e-3))
    assert query.score(1e-3).dtype == np.float32
    np.testing.assert_allclose(query.damped(1e-3).numpy(), (q / (e + 1e-3)).numpy())


def test_answer_first_then_the_grid_at_the_second_damping():
    """grid_first=False (a stored bank): the first damping is one single pass, the grid comes with
    the second damping asked for, and every score equals eq. 6 as with the grid first."""
    rows, q, e = _problem(seed=3)
    r = CountingRows(rows)
    query = EigenbasisQuery(rotated=q, eigenvalues=e, rows=r, grid_first=False)
    np.testing.assert_allclose(query.score(3e-3), _direct(rows, q, e, 3e-3), rtol=1e-6)
    assert r.passes == 1 and query.grid is None and list(query.scores) == [3e-3]
    np.testing.assert_allclose(query.score(1e-2), _direct(rows, q, e, 1e-2), rtol=1e-6)
    assert r.passes == 2 and query.grid == DAMPING_GRID
    off = 4.2e-5
    want = _direct(rows, q, e, off)
    np.testing.assert_allclose(query.score(off), want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    assert r.passes == 2  # interpolated from the grid


def test_fill_grid_scores_the_grid_once_even_beside_a_concurrent_rescore():
    import threading

    rows, q, e = _problem(seed=4)
    r = CountingRows(rows)
    query = EigenbasisQuery(rotated=q, eigenvalues=e, rows=r, grid_first=False)
    first = query.score(2e-3)
    threads = [threading.Thread(target=query.fill_grid) for _ in range(3)]
    threads.append(threading.Thread(target=query.score, args=(1e-4,)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert r.passes == 2 and query.grid == DAMPING_GRID  # the single pass, then one grid pass
    assert query.score(2e-3) is first  # the exactly scored damping keeps its scores
    for lam in (1e-4, 1e-8, 10.0):
        np.testing.assert_allclose(query.score(lam), _direct(rows, q, e, lam), rtol=1e-6)
    assert not query.fill_grid() and r.passes == 2
