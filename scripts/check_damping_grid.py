"""Figures for the README's damping paragraph (engine/attribution/damping_grid.py) on the shipped model.

1. Accuracy: for the first ``--queries`` gallery queries and three off-grid dampings, the
   interpolated K-FAC scores (``session.rescore``) against one exact pass over the bank:
   max |difference| / max |score|, Spearman, and whether the top 10 are the same.
2. Cost of the grid in the first pass: ``RotatedBank.score_many`` with the 16 values of the
   former grid against the 50 of now (49 + the requested damping), interleaved, median ms.

Needs the built default caches (``attribution-engine build --preset digits``):
    python scripts/check_damping_grid.py --cache-root cache
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from engine.attribution.session import AttributionSession
from engine.evaluation.stats import spearman


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-root", default=None)
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    s = AttributionSession("digits", cache_root=args.cache_root)
    s.load(["kfac"])
    worst, rhos, same_top = 0.0, [], True
    prep = None
    for i in range(args.queries):
        r = s.query(s.parse_query(f"gallery:{i}"), methods=["kfac"])
        prep = r.prepared["kfac"].query
        for lam in (3.7e-8, 2.5e-4, 0.5):
            got = s.rescore(r, {"kfac": lam}).methods["kfac"].scores
            exact = prep.exact(lam)
            worst = max(worst, float(np.abs(got - exact).max() / np.abs(exact).max()))
            rhos.append(spearman(got, exact))
            same_top &= set(np.argsort(-got)[:10]) == set(np.argsort(-exact)[:10])
    print(
        f"interpolated vs exact pass, {args.queries} queries x 3 dampings: max |diff|/max|score| {worst:.1e}, "
        f"Spearman min {min(rhos):.6f}, same top 10: {same_top}"
    )
    bank, rot, eig = prep.rows, prep.rotated, prep.eigenvalues.to(prep.rotated.dtype)
    times: dict[int, list[float]] = {16: [], 50: []}
    for _ in range(args.reps):
        for g in times:
            q = rot[None] / (eig[None] + torch.logspace(-12, 2, g, dtype=eig.dtype)[:, None])
            t0 = time.perf_counter()
            bank.inner_many(q)
            times[g].append((time.perf_counter() - t0) * 1000.0)
    med = {g: statistics.median(v) for g, v in times.items()}
    print(f"score_many median over {args.reps} interleaved runs: 16 dampings {med[16]:.0f} ms, 50 dampings {med[50]:.0f} ms")


if __name__ == "__main__":
    main()
