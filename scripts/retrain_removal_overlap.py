"""How many of a shipped retrain-top file's removals the served settings would still choose.

Why: a retrain-top result measures the removal of the top proponents that the attribution settings of
its day chose (damping, M, the query's draws).  When the preset's settings change, the file still
belongs to the same checkpoint and is still shown, but it may be about other images than the ones the
app now ranks first.  This re-ranks every (query, method) of the file with the served settings and
prints the share of the removed set that is still in the top-k, with both sets' label histograms.

    python scripts/retrain_removal_overlap.py --preset mnist [--file assets/results/retrain_top_mnist.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.attribution.session import AttributionSession  # noqa: E402
from engine.evaluation.report import recorded_query_draws  # noqa: E402
from engine.evaluation.retrain_top import top_proponents  # noqa: E402
from engine.paths import ASSETS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mnist")
    p.add_argument("--checkpoint", default=None, help="default: the preset's shipped checkpoint")
    p.add_argument("--file", default=None, help="retrain-top result (default assets/results/retrain_top_<preset>.json)")
    p.add_argument("--cache-root", default=None)
    args = p.parse_args(argv)
    path = Path(args.file or ASSETS / "results" / f"retrain_top_{args.preset}.json")
    record = json.loads(path.read_text())
    s = AttributionSession(args.preset, args.checkpoint, cache_root=args.cache_root)
    if record["config"].get("checkpoint_hash") not in (None, s.checkpoint_hash):
        raise SystemExit(f"{path} was measured on checkpoint {record['config']['checkpoint_hash']}, not {s.checkpoint_hash}")
    was = recorded_query_draws(record["config"])
    print(f"{path.name}: removals chosen with the query on {was} draws; served: {s.config.query_draws}")
    labels = np.asarray(s.dataset.labels)
    shares = []
    for r in record["results"]:
        removed = np.asarray(r["removed"], dtype=np.int64)
        res = s.query(s.parse_query(r["query"]), record["config"].get("measurement", "loss"), [r["method"]])
        now = top_proponents(res.methods[r["method"]].scores, len(removed))
        shared = len(set(now.tolist()) & set(removed.tolist()))
        shares.append(shared / len(removed))
        print(
            f"  {r['query']:<10} {r['method']:<6} still in the top-{len(removed)}: {shared:>2}/{len(removed)}"
            f"  labels now {np.bincount(labels[now], minlength=10).tolist()}"
            f"  removed {np.bincount(labels[removed], minlength=10).tolist()}"
        )
    print(f"  mean share still chosen: {np.mean(shares):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
