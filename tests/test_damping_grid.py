"""Off-grid K-FAC dampings from the grid's scores (engine.attribution.damping_grid)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.attribution.damping_grid import (
    COARSE_GRID,
    DAMPING_GRID,
    INTERP_TOL,
    SUPPORTED,
    interpolate,
    interpolation_weights,
    relative_error,
)


def test_grid_keeps_the_sliders_powers_of_ten_exactly():
    assert len(DAMPING_GRID) == 49 and list(DAMPING_GRID) == sorted(DAMPING_GRID)
    for k in range(-12, 3):
        assert 10.0**k in DAMPING_GRID  # the app's slider values are lookups
    assert DAMPING_GRID[0] < SUPPORTED[0] and DAMPING_GRID[-1] > SUPPORTED[1]


def test_weights_reach_the_tolerance_for_every_eigenvalue():
    """|delta(e)| <= tol on eigenvalues 10x denser than the fit's (and between them), for dampings
    drawn log-uniformly over the supported range."""
    rng = np.random.default_rng(0)
    e = np.concatenate([[0.0, 1e-300], np.logspace(-40, 15, 30011), rng.uniform(0, 100, 2000)])
    for lam in 10 ** rng.uniform(np.log10(SUPPORTED[0]), np.log10(SUPPORTED[1]), 25):
        fit = interpolation_weights(float(lam))
        assert fit is not None, lam
        weights, err = fit
        assert err <= INTERP_TOL
        assert np.abs(relative_error(weights, float(lam), DAMPING_GRID, e)).max() <= 2 * INTERP_TOL


@pytest.mark.parametrize("lam", [1e-14, 1e4, 0.0, -1.0])
def test_outside_the_supported_range_there_are_no_weights(lam):
    assert interpolation_weights(lam) is None


def test_the_coarse_grid_is_not_accurate_enough_to_interpolate():
    assert interpolation_weights(3.7e-8, COARSE_GRID) is None


def test_interpolated_scores_match_exact_pole_sums_within_the_bound():
    """tau_i(lam) = sum_j c_ij / (e_j + lam) for a spectrum spanning 30 decades plus a null space."""
    rng = np.random.default_rng(1)
    n, p = 40, 3000
    e = np.concatenate([np.zeros(200), 10 ** rng.uniform(-20, 2, p - 200)])
    c = rng.normal(size=(n, p)) * 10 ** rng.uniform(-3, 3, p)

    def exact(lam: float) -> np.ndarray:
        return c @ (1.0 / (e + lam))

    grid_scores = {g: exact(g).astype(np.float32) for g in DAMPING_GRID}
    for lam in (2.2e-12, 3.7e-8, 5e-5, 0.31, 77.0):
        got = interpolate(grid_scores, lam, DAMPING_GRID)
        assert got is not None and got.dtype == np.float32
        bound = INTERP_TOL * (np.abs(c) @ (1.0 / (e + lam)))
        rounding = 1e-6 * sum(np.abs(v) for v in grid_scores.values())  # float32 grid scores
        assert np.all(np.abs(got - exact(lam)) <= bound + rounding)
        # and it is not simply the neighbouring grid value
        nearest = min(DAMPING_GRID, key=lambda g: abs(np.log(g / lam)))
        assert np.abs(grid_scores[nearest] - exact(lam)).max() > 10 * np.abs(got - exact(lam)).max()
    assert interpolate({}, 3.7e-8, DAMPING_GRID) is None  # no grid scored yet
