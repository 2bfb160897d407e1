"""How far LDS can go: agreement between training seeds of the same subsets (docs/architecture.md §7).

The LDS target of query q is m(theta_r(S_j), x_q) over subsets j, averaged over R seeds r.  Two
seeds trained on the same subsets differ only by training noise, so how well one seed's values
rank the subsets like another's,

    rho_q = spearman_j( m(theta_r(S_j), x_q), m(theta_r'(S_j), x_q) ),

averaged over queries (and over seed pairs r < r'), is the LDS that a perfect predictor of one
seed's values would get against another seed: the noise ceiling of a single-seed target.  For
the R-seed average the target is less noisy; with the Spearman-Brown formula (exact for Pearson
correlations of parallel measurements, an approximation for ranks) its reliability is
rel_R = R rho / (1 + (R - 1) rho), and no predictor can correlate with it better than
sqrt(rel_R): that is ``ceiling_seed_average``.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np

from .stats import bootstrap_ci, spearman


def seed_agreement(per_seed: np.ndarray, seed: int = 0) -> dict[str, Any] | None:
    """Noise ceiling from measurements (R, Q, K) of R seeds on K subsets for Q queries.

    Returns None when fewer than 2 seeds have finished models on at least 3 common subsets, else
    {"seeds", "subsets", "spearman" (mean over queries of the mean over seed pairs), "ci95"
    (bootstrap over queries), "sem", "per_query", "ceiling_seed_average"}.
    """
    per_seed = np.asarray(per_seed, dtype=np.float64)
    if per_seed.ndim != 3:
        raise ValueError(f"per-seed measurements must be (R, Q, K), got shape {per_seed.shape}")
    finished = [r for r in range(per_seed.shape[0]) if np.isfinite(per_seed[r]).any()]
    if len(finished) < 2:
        return None
    cols = np.all(np.isfinite(per_seed[finished]), axis=(0, 1))
    if cols.sum() < 3:
        return None
    vals = per_seed[finished][:, :, cols]  # (R', Q, K')
    pairs = list(combinations(range(len(finished)), 2))
    per_query = np.array(
        [np.mean([spearman(vals[a, q], vals[b, q]) for a, b in pairs]) for q in range(vals.shape[1])]
    )
    ok = per_query[np.isfinite(per_query)]
    rho = float(ok.mean()) if len(ok) else float("nan")
    r = len(finished)
    reliability = r * rho / (1.0 + (r - 1) * rho) if np.isfinite(rho) and rho > 0 else float("nan")
    return {
        "seeds": r,
        "subsets": int(cols.sum()),
        "spearman": rho,
        "ci95": bootstrap_ci(per_query, seed=seed),
        "sem": float(ok.std(ddof=1) / np.sqrt(len(ok))) if len(ok) > 1 else float("nan"),
        "per_query": per_query.tolist(),
        "ceiling_seed_average": float(np.sqrt(reliability)) if np.isfinite(reliability) else float("nan"),
    }
