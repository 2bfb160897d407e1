"""How much does each method's ranking depend on the query?  From a preset's precomputed gallery scores.

Why: an attribution method whose top proponents are the same training images for every query says
something about the training set, not about the query.  On mnist D-TRAK's top-20 removal sets for
gallery:0 and gallery:1 came out identical in the retrain-top run; this measures it over the whole
shipped gallery without recomputing anything (the statistics: ``engine.evaluation.query_dependence``,
which the app also uses to flag such a method).

    python scripts/query_dependence.py --preset mnist [--top 20] [--gradients 8]

``--gradients K`` also computes the first K gallery samples' query gradients of the loss (K-FAC's and
TRAK's measurement) and of the square norm (D-TRAK's), with the app's query draws, and prints their
mean pairwise cosine: scores are inner products with these vectors, so near-parallel query gradients
give near-identical rankings whatever the training-side features.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.attribution.precomputed import FILE, PrecomputedGallery  # noqa: E402
from engine.evaluation.query_dependence import (  # noqa: E402
    DependenceConfig,
    gallery_dependence,
    mean_pairwise_cosine,
)
from engine.paths import default_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mnist")
    ap.add_argument("--checkpoint", default=None, help="folder holding the precomputed file (default: the preset's)")
    ap.add_argument("--top", type=int, default=DependenceConfig.top)
    ap.add_argument("--gradients", type=int, default=0, metavar="K",
                    help="also: mean pairwise cosine of the first K gallery samples' query gradients")
    args = ap.parse_args(argv)
    if args.gradients == 1 or args.gradients < 0:
        raise SystemExit("--gradients needs at least 2 gallery samples")
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
    if args.gradients:
        for name, cos in query_gradient_cosines(args.preset, args.checkpoint, args.gradients).items():
            print(f"  query gradients of the {name} measurement: mean pairwise cosine {cos:+.3f} "
                  f"over {args.gradients} gallery samples")
    return 0


def query_gradient_cosines(preset: str, checkpoint: str | None, k: int) -> dict[str, float]:
    """Mean pairwise cosine of the first ``k`` gallery samples' query gradients, per measurement
    (the app's query draws: ``session.query_draws()``; no cache is read or built)."""
    import torch

    from engine.attribution.session import AttributionSession
    from engine.model.measurements import parse_measurement

    s = AttributionSession(preset=preset, checkpoint=checkpoint)
    if k > len(s.gallery()):
        raise SystemExit(f"--gradients {k}: the gallery holds {len(s.gallery())} samples")
    draws = s.query_draws()
    queries = [s.parse_query(f"gallery:{i}") for i in range(k)]
    out = {}
    for name in ("loss", "square-norm"):
        meas = parse_measurement(name, s.diffusion.T)
        grads = torch.stack([s.query_gradient(meas, q, draws) for q in queries])
        out[name] = mean_pairwise_cosine(grads.double().cpu().numpy())
    return out


if __name__ == "__main__":
    raise SystemExit(main())
