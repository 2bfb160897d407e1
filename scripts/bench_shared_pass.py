"""Cold build of K-FAC (factors + bank) and TRAK with and without the shared training-gradient pass.

K-FAC's bank and TRAK's projections both need the per-example training-loss gradients with
the train draws; ``AttributionSession.share_gradient_passes`` lets the bank's pass feed TRAK
(``engine.attribution.methods.trak.FeatureSink``).  This builds both into empty temporary caches, once
with and once without sharing, alternating the order over ``--reps`` (the machine is noisy),
and reports seconds per method and the ratio.

    python scripts/bench_shared_pass.py [--examples 256] [--mc-samples 8] [--reps 1]

Writes assets/results/bench_shared_pass.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from engine.attribution.session import AttributionSession
from engine.config import AttributionConfig, get_preset
from engine.model.data import load_dataset
from engine.threads import configure_threads

OUT = Path(__file__).resolve().parent.parent / "assets" / "results" / "bench_shared_pass.json"


def build(data, mc: int, share: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        s = AttributionSession("digits", cache_root=tmp, dataset=data,
                               check_trained_on=False,  # a subset of the shipped weights' data: timing only
                               config=AttributionConfig(mc_samples=mc))
        if share:
            s.share_gradient_passes(["kfac", "trak"])
        out = {}
        for name in ("kfac", "trak"):
            configure_threads(name)
            t0 = time.perf_counter()
            s.build([name])
            out[name] = round(time.perf_counter() - t0, 2)
        out["total"] = round(sum(out.values()), 2)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--mc-samples", type=int, default=8)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    data = load_dataset(get_preset("digits").data)
    data = data.subset(list(range(min(args.examples, len(data)))))
    runs: dict[str, list[dict]] = {"separate": [], "shared": []}
    for rep in range(args.reps):
        order = (False, True) if rep % 2 == 0 else (True, False)
        for share in order:
            r = build(data, args.mc_samples, share)
            runs["shared" if share else "separate"].append(r)
            print(f"{'shared' if share else 'separate'} passes: {r}", flush=True)
    med = {k: statistics.median(r["total"] for r in v) for k, v in runs.items()}
    report = {
        "settings": vars(args),
        "runs": runs,
        "median_total_s": med,
        "shared_over_separate": round(med["shared"] / med["separate"], 3),
    }
    print(f"K-FAC + TRAK cold build: separate {med['separate']} s, shared {med['shared']} s "
          f"({report['shared_over_separate']}x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
