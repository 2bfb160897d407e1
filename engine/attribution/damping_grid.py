"""Damping grid of K-FAC Influence and off-grid dampings without another pass over the bank.

For one query, in the eigenbasis of the K-FAC factors (paper eqs. 9-12; docs/architecture.md §4), the
score of training example i is a sum of simple poles in the damping lambda:

    tau_i(lambda) = (1/N) sum_j R_ij q_j / (e_j + lambda),     e_j >= 0 (eigenvalues).

One pass over the rows scores the query at every damping lambda_g of a log grid at once
(``Rows.inner_many`` with the G damped queries: for the int8 bank one dequantising pass whatever the
grid's size), with the first answer or after it (``scoring.EigenbasisQuery``, ``Rows.grid_in_first_pass``).
For any other lambda we look for weights alpha_g(lambda) with

    sum_g alpha_g (e + lambda) / (e + lambda_g) = 1 + delta(e),   |delta(e)| <= tol  for all e >= 0.

Then ``sum_g alpha_g tau_i(lambda_g)`` is *exactly* the score of a query whose every
eigen-coordinate is perturbed by a relative ``delta(e_j)``, i.e.

    |sum_g alpha_g tau_i(lambda_g) - tau_i(lambda)| <= tol * (1/N) sum_j |R_ij q_j| / (e_j + lambda),

a bound that holds for every model, query and example (it depends on lambda and the grid
only).  The Cauchy kernel 1/(e + lambda) has fast-decaying singular values, so few poles
suffice: three per decade, reaching one decade beyond the dampings offered, give
tol ~ 5e-5 (``interpolation_weights`` checks it on every call and refuses above
``INTERP_TOL``, in which case the caller takes the exact pass).  For comparison, the int8
bank perturbs each coordinate by up to half a step of its grid: 1/254 of its block's largest
whitened entry, times the coordinate's w (docs/architecture.md §4).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

# Powers of ten stay exact grid values: the app's damping slider offers them (lookups).
DECADES = (-13, 3)  # poles from 1e-13 to 1e3 ...
PER_DECADE = 3
SUPPORTED = (1e-12, 1e2)  # ... so that dampings in [1e-12, 1e2] interpolate to INTERP_TOL
COARSE_GRID = tuple(10.0**k for k in range(-12, 3))  # when the fine grid's queries are too large
INTERP_TOL = 1e-4
# Eigenvalues where delta(e) is fitted and checked: 0 (null space) and 1e-30 .. 1e12, dense in
# log scale (the fit is smooth in log e between them; tests check it on a 10x denser set).
_E = np.concatenate([[0.0], np.logspace(-30, 12, 3001)])


def fine_grid() -> tuple[float, ...]:
    """Dampings 10^(k/3) for k = -39..9: 49 values, the powers of ten computed as 10.0**k."""
    lo, hi = DECADES
    out = []
    for k in range(lo * PER_DECADE, hi * PER_DECADE + 1):
        out.append(10.0 ** (k // PER_DECADE) if k % PER_DECADE == 0 else 10.0 ** (k / PER_DECADE))
    return tuple(out)


DAMPING_GRID = fine_grid()


def relative_error(weights: np.ndarray, lam: float, grid: tuple[float, ...], e: np.ndarray) -> np.ndarray:
    """delta(e) = sum_g alpha_g (e + lambda)/(e + lambda_g) - 1 at the eigenvalues ``e``."""
    g = np.asarray(grid, dtype=np.float64)
    return ((e[:, None] + lam) / (e[:, None] + g[None])) @ weights - 1.0


@lru_cache(maxsize=256)
def interpolation_weights(lam: float, grid: tuple[float, ...] = DAMPING_GRID) -> tuple[np.ndarray, float] | None:
    """(alpha (G,), max |delta|) for ``lam`` from ``grid``, or None if max |delta| > INTERP_TOL.

    Least squares on the relative error over ``_E`` (columns normalised for conditioning).
    """
    lam = float(lam)
    if not lam > 0:
        return None
    g = np.asarray(grid, dtype=np.float64)
    a = (_E[:, None] + lam) / (_E[:, None] + g[None])
    norms = np.linalg.norm(a, axis=0)
    coef, *_ = np.linalg.lstsq(a / norms, np.ones_like(_E), rcond=None)
    weights = coef / norms
    err = float(np.abs(relative_error(weights, lam, grid, _E)).max())
    if not np.isfinite(err) or err > INTERP_TOL:
        return None
    weights.setflags(write=False)
    return weights, err


def interpolate(scores: dict[float, np.ndarray], lam: float, grid: tuple[float, ...]) -> np.ndarray | None:
    """tau(lambda) from the grid's scores (float32 (N,)), or None when lambda cannot be interpolated."""
    if any(g not in scores for g in grid):
        return None
    fit = interpolation_weights(float(lam), tuple(grid))
    if fit is None:
        return None
    weights, _ = fit
    out = np.zeros_like(scores[grid[0]], dtype=np.float64)
    for w, g in zip(weights, grid, strict=True):
        out += w * scores[g].astype(np.float64)
    return out.astype(np.float32)


def damping_steps(damping_range: tuple[float, float] | None, default: float | None) -> list[float]:
    """What a damping slider offers: the grid values in ``damping_range`` (three per decade, every
    one a lookup after the first pass) plus ``default``, ascending; [] without a range."""
    if damping_range is None or default is None:
        return []
    lo, hi = damping_range
    return sorted({g for g in DAMPING_GRID if lo <= g <= hi} | {float(default)})
