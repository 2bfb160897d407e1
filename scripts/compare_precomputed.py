"""Compare two precomputed gallery files (``attribution-engine precompute``) method by method.

Why: rewriting a shipped ``precomputed_gallery.npz`` (a storage change, caches built again) must not
change what the app's first page shows beyond the files' rounding.  For each method both files hold,
prints the largest difference of a sample's scores relative to that sample's largest score (the float16
packing's step is 2^-11 = 4.9e-4), and for how many samples the top-10 training images are the same set
(and in the same order); the same for K-FAC's damping grid (``--per-damping``: one line per damping, since
the grid's smallest dampings weigh the factors' smallest eigenvalues, which two CPUs compute differently).

    git show 19e76da:assets/digits/precomputed_gallery.npz > /tmp/old.npz
    python scripts/compare_precomputed.py /tmp/old.npz assets/digits/precomputed_gallery.npz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.attribution.precomputed import PrecomputedGallery  # noqa: E402


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, int, int]:
    """(max over rows of max|a - b| / max|b|, rows with the same top-10 set, rows with the same top-10 order)."""
    rel = float(max(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30) for x, y in zip(a, b, strict=True)))
    top_a, top_b = np.argsort(-a, axis=1)[:, :10], np.argsort(-b, axis=1)[:, :10]
    same_set = int(sum(set(x) == set(y) for x, y in zip(top_a, top_b, strict=True)))
    same_order = int(sum(np.array_equal(x, y) for x, y in zip(top_a, top_b, strict=True)))
    return rel, same_set, same_order


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", help="a precomputed .npz")
    p.add_argument("new", help="another one, of the same gallery")
    p.add_argument("--per-damping", action="store_true", help="also one line per damping of K-FAC's grid")
    args = p.parse_args()
    old, new = PrecomputedGallery(args.old), PrecomputedGallery(args.new)
    rows = sorted(set(old.rows) & set(new.rows))
    print(f"{len(rows)} gallery samples in both; key equal: {old.key == new.key}")
    for m in [m for m in new.methods() if m in old.methods()]:
        a = np.stack([old.scores(i, m) for i in rows])
        b = np.stack([new.scores(i, m) for i in rows])
        rel, same_set, same_order = compare(a, b)
        print(f"{m:8s} stored {str(old.arrays[f'scores_{m}'].dtype):7s} -> {str(new.arrays[f'scores_{m}'].dtype):7s}"
              f" max rel diff {rel:.2e}; same top-10 set {same_set}/{len(rows)}, same order {same_order}/{len(rows)}")
    if "kfac_grid" in old.arrays and "kfac_grid" in new.arrays:
        worst = 0.0
        for lam in new.arrays["kfac_grid_damping"]:
            a = np.stack([old.scores(i, "kfac", float(lam)) for i in rows])
            b = np.stack([new.scores(i, "kfac", float(lam)) for i in rows])
            rel, same_set, same_order = compare(a, b)
            worst = max(worst, rel)
            if args.per_damping:
                print(f"  kfac at damping {lam:.1e}: max rel diff {rel:.2e}; same top-10 set {same_set}/{len(rows)}, "
                      f"same order {same_order}/{len(rows)}")
        print(f"kfac damping grid ({len(new.arrays['kfac_grid_damping'])} values): max rel diff {worst:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
