"""Does a training image, used as the query, find itself?  Its K-FAC self-influence rank per draw mode.

A sanity check a demo audience makes first: pick a training image, and it should be its own top
proponent.  For every ``--every``-th training image, the number of training images that score above
it (0 = it is its own top proponent), at the default damping and at 1e-4, for each configuration
whose K-FAC cache exists under ``--cache-root`` (nothing is built).

    python scripts/self_rank.py [--preset digits] [--cache-root cache] [--every 113]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.attribution.session import AttributionSession  # noqa: E402

CONFIGS = {
    "shared, factors from all M": {"draws": "shared", "kfac_factor_draws": None},
    "per-example, factors from all M": {"draws": "per-example", "kfac_factor_draws": None},
    "per-example, factors from 8": {"draws": "per-example", "kfac_factor_draws": 8},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="digits")
    ap.add_argument("--cache-root", default="cache")
    ap.add_argument("--every", type=int, default=113)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {}
    for label, changes in CONFIGS.items():
        probe = AttributionSession(args.preset, cache_root=args.cache_root)
        config = dataclasses.replace(probe.config, **changes)
        s = AttributionSession(args.preset, cache_root=args.cache_root, config=config)
        if not s.method("kfac").is_built(s.ctx):
            print(f"{label}: no K-FAC cache under {args.cache_root}, skipped")
            continue
        idx = list(range(0, len(s.dataset), args.every))
        ranks: dict[str, list[int]] = {"default": [], "1e-4": []}
        for i in idx:
            r = s.query(s.parse_query(f"train:{i}"), methods=["kfac"])
            for key, lam in (("default", r.methods["kfac"].damping), ("1e-4", 1e-4)):
                sc = s.rescore(r, {"kfac": lam}).methods["kfac"].scores
                ranks[key].append(int((sc > sc[i]).sum()))
        out[label] = {"images": idx, "rank": ranks, "max": {k: max(v) for k, v in ranks.items()},
                      "median": {k: float(np.median(v)) for k, v in ranks.items()}}
        print(f"{label}: self-rank max {out[label]['max']}, median {out[label]['median']} over {len(idx)} images")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
