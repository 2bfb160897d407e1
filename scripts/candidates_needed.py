"""How many compressed-bank candidates exact re-ranking needs to recover the full bank's top and bottom 10.

For each gallery query: the compressed scores (a bank derived from the stored one,
``compress_stored_bank``, at the given projection and ratio) rank all N training images; C needed
is the worst rank, in that order, of the full stored bank's 10 strongest proponents (opponents),
i.e. the smallest candidate count per end whose exact re-ranking lists them all.

    python scripts/candidates_needed.py --cache-root cache [--projection gaussian] [--ratio 32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's engine

from engine.attribution.compressed_bank import compress_factors, compress_stored_bank  # noqa: E402
from engine.bench.compressed import item_query, open_stored_kfac  # noqa: E402
from engine.model.measurements import parse_measurement  # noqa: E402


def worst_rank(order_scores: np.ndarray, want: np.ndarray) -> int:
    """1 + the largest position of ``want`` in the descending order of ``order_scores``."""
    rank = np.empty(len(order_scores), dtype=np.int64)
    rank[np.argsort(-order_scores, kind="stable")] = np.arange(len(order_scores))
    return int(rank[want].max()) + 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="digits")
    p.add_argument("--cache-root", default="cache")
    p.add_argument("--projection", default="gaussian")
    p.add_argument("--ratio", type=float, default=32.0)
    p.add_argument("--k", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)
    try:
        s, kfac = open_stored_kfac(args.preset, args.cache_root)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    comp = compress_factors(kfac.factors, args.projection, args.ratio, seed=s.config.seed)
    small = compress_stored_bank(kfac.bank, comp)
    small_eig = comp.factors.eigenvalues()
    meas, draws, lam = parse_measurement("loss", s.diffusion.T), s.query_draws(), kfac.default_damping
    top, bottom = [], []
    for item in s.gallery():
        g = s.query_gradient(meas, item_query(item), draws)
        full = kfac.bank.inner(kfac.factors.rotate(g) / (kfac._eigenvalues + lam)).numpy()
        approx = small.inner(comp.factors.rotate(comp.project(g)) / (small_eig + lam)).numpy()
        top.append(worst_rank(approx, np.argsort(-full)[: args.k]))
        bottom.append(worst_rank(-approx, np.argsort(full)[: args.k]))
    record = {"preset": args.preset, "projection": args.projection, "ratio": args.ratio, "k": args.k,
              "num_train": len(s.dataset), "queries": len(top),
              "top": {"max": max(top), "median": float(np.median(top)), "per_query": sorted(top)},
              "bottom": {"max": max(bottom), "median": float(np.median(bottom)), "per_query": sorted(bottom)}}
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
