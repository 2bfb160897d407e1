"""Rank statistics of the evaluations and the comparisons the app shows (one place for each).

* Spearman correlation (average ranks for ties) and the Linear Data-modelling Score
  (Park et al. 2023, paper eq. 13) with a bootstrap interval over queries;
* group predictions from per-example scores: removing a set R of training examples
  changes a measurement by approximately sum_{i in R} tau_i (first-order influence is
  additive; positive tau_i means removing i raises the loss-like measurement), so the
  predicted measurement of a model trained on S_j is m_full + sum_{i not in S_j} tau_i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation: Pearson correlation of the (average-tie) ranks.

    NaN when either side is constant (no ranking to compare).
    """
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = float(np.sqrt((ra**2).sum() * (rb**2).sum()))
    if den == 0.0:
        return float("nan")
    return float((ra * rb).sum() / den)


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling queries)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return (float("nan"), float("nan"))
    if len(v) == 1:
        return (float(v[0]), float(v[0]))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return (float(lo), float(hi))


@dataclass
class LDSResult:
    """Per-query Spearman correlations and their mean (the LDS) with a bootstrap interval."""

    lds: float
    ci95: tuple[float, float]
    sem: float
    per_query: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "lds": self.lds,
            "ci95": list(self.ci95),
            "sem": self.sem,
            "per_query": [None if not np.isfinite(v) else float(v) for v in self.per_query],
        }


def lds_score(predicted: np.ndarray, measured: np.ndarray, seed: int = 0) -> LDSResult:
    """LDS (paper eq. 13): mean over queries of Spearman over subsets.

    ``predicted`` and ``measured`` are (Q, K): query q's predicted and measured (seed-
    averaged) measurement for the model trained on subset j.  Signed, as docs/architecture.md §7 asks.
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    measured = np.asarray(measured, dtype=np.float64)
    if predicted.shape != measured.shape or predicted.ndim != 2:
        raise ValueError(f"predicted {predicted.shape} and measured {measured.shape} must both be (Q, K)")
    per = np.array([spearman(p, m) for p, m in zip(predicted, measured, strict=True)])
    ok = per[np.isfinite(per)]
    mean = float(ok.mean()) if len(ok) else float("nan")
    sem = float(ok.std(ddof=1) / np.sqrt(len(ok))) if len(ok) > 1 else float("nan")
    return LDSResult(mean, bootstrap_ci(per, seed=seed), sem, per.tolist())


def group_predictions(scores: np.ndarray, keep_masks: np.ndarray) -> np.ndarray:
    """Predicted change of the measurement for each subset model, relative to the full model.

    Removing the complement of S_j changes m by sum_{i not in S_j} tau_i (docs/architecture.md §4, §7),
    so m(S_j) ~= m_full + (1 - mask_j) . tau.  ``scores`` (N,), ``keep_masks`` (K, N) bool;
    returns (K,).  For similarity baselines the same sum is a ranking heuristic only.
    """
    removed = ~np.asarray(keep_masks, dtype=bool)
    return removed.astype(np.float64) @ np.asarray(scores, dtype=np.float64)
