"""How much does each method's ranking depend on the query?  From a preset's precomputed gallery scores.

Why: an attribution method whose top proponents are the same training images for every query says
something about the training set, not about the query.  On mnist D-TRAK's top-20 removal sets for
gallery:0 and gallery:1 came out identical in the retrain-top run; this measures it over the whole
shipped gallery without recomputing anything: for every pair of gallery queries, the overlap of the
methods' top-k sets and the Pearson correlation of their (N,) score vectors, and the number of
distinct training images in all the queries' top-k together (k x queries if no two share one).

    python scripts/query_dependence.py --preset mnist [--top 20]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.attribution.precomputed import FILE, PrecomputedGallery  # noqa: E402
from engine.paths import default_checkpoint  # noqa: E402


def dependence(scores: np.ndarray, top: int) -> dict[str, float]:
    """scores (Q, N) of Q queries -> mean pairwise top-k overlap, mean pairwise Pearson r, distinct top-k images."""
    if scores.shape[0] < 2:
        raise ValueError("needs at least two queries")
    sets = [set(np.argsort(-row, kind="stable")[:top].tolist()) for row in scores]
    overlap = [len(a & b) / top for a, b in itertools.combinations(sets, 2)]
    r = np.corrcoef(scores)[np.triu_indices(scores.shape[0], 1)]
    return {"top_overlap": float(np.mean(overlap)), "pearson": float(np.mean(r)),
            "distinct": len(set().union(*sets))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mnist")
    ap.add_argument("--checkpoint", default=None, help="folder holding the precomputed file (default: the preset's)")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args(argv)
    path = Path(args.checkpoint or default_checkpoint(args.preset)) / FILE
    pg = PrecomputedGallery.load(path)
    if pg is None:
        raise SystemExit(f"no readable precomputed gallery at {path} (attribution-engine precompute --preset {args.preset})")
    queries = sorted(pg.rows)
    methods = [k[len("scores_"):] for k in pg.arrays if k.startswith("scores_")]
    print(f"{args.preset}: {len(queries)} gallery queries, top-{args.top}; chance overlap of two random sets "
          f"{args.top / pg.arrays[f'scores_{methods[0]}'].shape[1]:.3f}")
    for m in methods:
        d = dependence(np.stack([pg.scores(i, m).astype(np.float64) for i in queries]), args.top)
        print(f"  {m:6s} top-{args.top} overlap between queries {d['top_overlap']:.3f}, score correlation "
              f"{d['pearson']:+.3f}, distinct images in all top-{args.top} {d['distinct']} of "
              f"{args.top * len(queries)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
