"""How much does each method's ranking depend on the query?  From a preset's precomputed gallery scores.

Why: an attribution method whose top proponents are the same training images for every query says
something about the training set, not about the query.  On mnist D-TRAK's top-20 removal sets for
gallery:0 and gallery:1 came out identical in the retrain-top run; this measures it over the whole
shipped gallery without recomputing anything (the statistics: ``engine.evaluation.query_dependence``,
which the app also uses to flag such a method).

    python scripts/query_dependence.py --preset mnist [--top 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.attribution.precomputed import FILE, PrecomputedGallery  # noqa: E402
from engine.evaluation.query_dependence import DependenceConfig, gallery_dependence  # noqa: E402
from engine.paths import default_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mnist")
    ap.add_argument("--checkpoint", default=None, help="folder holding the precomputed file (default: the preset's)")
    ap.add_argument("--top", type=int, default=DependenceConfig.top)
    args = ap.parse_args(argv)
    path = Path(args.checkpoint or default_checkpoint(args.preset)) / FILE
    pg = PrecomputedGallery.load(path)
    if pg is None:
        raise SystemExit(f"no readable precomputed gallery at {path} (attribution-engine precompute --preset {args.preset})")
    deps = gallery_dependence(pg, top=args.top)
    if not deps:
        raise SystemExit(f"{path} holds fewer than two gallery queries")
    first = next(iter(deps.values()))
    print(f"{args.preset}: {first.queries} gallery queries, top-{args.top}; chance overlap of two random sets "
          f"{first.chance_overlap:.3f}")
    for m, d in deps.items():
        print(f"  {m:6s} top-{args.top} overlap between queries {d.top_overlap:.3f}, score correlation "
              f"{d.pearson:+.3f}, distinct images in all top-{args.top} {d.distinct} of {args.top * d.queries}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
