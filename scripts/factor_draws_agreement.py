"""What K-FAC factors from fewer draws change in the scores (issue 12: the factor pass is most of a cold build).

Builds K-FAC with ``kfac_factor_draws = k`` (factors from the first k of the M draws of every
example; the bank keeps all M) in its own cache root, times the factor pass, and compares its
scores with the default build's (all M draws) over the gallery queries at the default damping:
Spearman over all N training images (median, min) and the top-10 / bottom-10 overlaps.

    OMP_NUM_THREADS=1 python scripts/factor_draws_agreement.py --baseline-cache cache \\
        --cache-root cache-factor-draws --draws 8,16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's engine

from engine.attribution.session import AttributionSession  # noqa: E402
from engine.config import get_preset  # noqa: E402
from engine.evaluation.stats import spearman  # noqa: E402
from engine.paths import default_checkpoint  # noqa: E402


def overlap(a: np.ndarray, b: np.ndarray, k: int = 10, sign: float = 1.0) -> float:
    return len(set(np.argsort(-sign * a)[:k]) & set(np.argsort(-sign * b)[:k])) / k


def compare(got: list[np.ndarray], ref: list[np.ndarray]) -> dict[str, float]:
    sp = [spearman(a, b) for a, b in zip(got, ref, strict=True)]
    return {"spearman_median": statistics.median(sp), "spearman_min": min(sp),
            "top10_overlap": float(np.mean([overlap(a, b) for a, b in zip(got, ref, strict=True)])),
            "bottom10_overlap": float(np.mean([overlap(a, b, sign=-1.0) for a, b in zip(got, ref, strict=True)]))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="digits")
    p.add_argument("--baseline-cache", default="cache", help="cache with the default K-FAC built (read only)")
    p.add_argument("--cache-root", default="cache-factor-draws", help="where the k-draw builds go")
    p.add_argument("--draws", default="8,16", help="comma list of k")
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--dampings", default="", help="also compare at these dampings (comma list; re-scores)")
    p.add_argument("--train-draws", default="shared", choices=("shared", "per-example"),
                   help="the draws of both builds (AttributionConfig.draws): with shared draws the k draws hold only "
                        "k distinct timesteps, which leaves the time-embedding layers' input factor rank k")
    p.add_argument("--out", default=None, help="also write the record to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    preset = get_preset(args.preset)
    ckpt = str(default_checkpoint(args.preset))
    stored = dataclasses.replace(preset.attribution, kfac_bank="stored", draws=args.train_draws)

    def session(root: str, config) -> AttributionSession:
        return AttributionSession(preset, checkpoint=ckpt, cache_root=root, config=config, auto_build=False)

    base = session(args.baseline_cache, stored)
    if not base.method("kfac").is_built(base.ctx):
        raise SystemExit(f"no default K-FAC build under {args.baseline_cache}: run `python -m engine build` first")
    queries = [base.parse_query(f"gallery:{i}") for i in range(min(args.queries, len(base.gallery())))]
    extra = [float(x) for x in args.dampings.split(",") if x.strip()]
    ref_res = [base.query(q, "loss", methods=["kfac"]) for q in queries]
    ref = [r.methods["kfac"].scores for r in ref_res]
    meta = base.ctx.store.load_meta("kfac-factors", base.method("kfac").factor_settings(base.ctx)) or {}
    record = {"preset": args.preset, "num_train": len(base.dataset), "mc_samples": base.config.mc_samples,
              "train_draws": args.train_draws,
              "queries": len(queries), "damping": base.method("kfac").default_damping,
              "reference": {"factor_draws": base.config.mc_samples, "factor_build_s": meta.get("build_seconds")},
              "variants": []}
    for k in (int(x) for x in args.draws.split(",") if x.strip()):
        s = session(args.cache_root, dataclasses.replace(stored, kfac_factor_draws=k))
        kfac = s.method("kfac")
        t0 = time.perf_counter()
        kfac.build(s.ctx)
        built_s = time.perf_counter() - t0
        fmeta = s.ctx.store.load_meta("kfac-factors", kfac.factor_settings(s.ctx)) or {}
        got_res = [s.query(q, "loss", methods=["kfac"]) for q in queries]
        got = [r.methods["kfac"].scores for r in got_res]
        v = {"factor_draws": k, "factor_build_s": fmeta.get("build_seconds"), "build_s_this_run": built_s,
             **compare(got, ref)}
        for lam in extra:
            a = [s.rescore(r, {"kfac": lam}).methods["kfac"].scores for r in got_res]
            b = [base.rescore(r, {"kfac": lam}).methods["kfac"].scores for r in ref_res]
            v.setdefault("at_damping", {})[f"{lam:g}"] = compare(a, b)
        record["variants"].append(v)
        print(json.dumps(v), flush=True)
    record["load_average_at_end"] = list(os.getloadavg())
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
