"""Does the float32 accumulation of the K-FAC factors move the scores?

The factors are sums over N x M (example, draw) rows accumulated by curvlinops in the model's dtype
(float32) and eigendecomposed in float64 (``engine.attribution.curvature``).  At the presets' small
dampings a score divides by (e + lambda), so noise in small eigenvalues could move it.  This computes the
factors three times from the preset's factor draws -- float32 with the method's batch, float32 with half
of it (another summation order), and float64 -- with the *empirical* Fisher (no sampled labels, so the
three differ by arithmetic only), preconditions the first ``--queries`` gallery queries' gradients with
each ((G + lambda I)^{-1} g at the preset's damping, eq. 6), scores them against every training gradient
(the bank's draws, one float32 gradient pass) and compares:

- ``rel_l2``: ||s_a - s_b|| / ||s_b|| per query (median, max);
- ``max_error``: the largest |s_a - s_b| over the largest |s_b| (median);
- ``spearman`` (median) and ``top10`` (share of s_b's top-10 in s_a's).

    python scripts/factor_precision.py --preset digits --cache-root DIR --out assets/results/factor_precision_digits.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's engine

from engine.attribution.curvature import KFACFactors, compute_kfac  # noqa: E402
from engine.attribution.gradients import influence_params, train_loss_grads  # noqa: E402
from engine.attribution.session import AttributionSession  # noqa: E402
from engine.bench.compressed import item_query  # noqa: E402
from engine.files import save_json  # noqa: E402
from engine.model.measurements import parse_measurement  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="digits")
    p.add_argument("--cache-root", default="cache")
    p.add_argument("--queries", type=int, default=8, help="gallery queries (default 8)")
    p.add_argument("--out", default=None, help="JSON output (default: print only)")
    args = p.parse_args()
    s = AttributionSession(args.preset, cache_root=args.cache_root)
    kfac, ctx = s.method("kfac"), s.ctx
    draws = kfac.factor_train_draws(ctx)
    record: dict = {"preset": args.preset, "factor_rows": len(ctx.dataset) * len(draws), "fisher_type": "empirical",
                    "damping": kfac.default_damping, "queries": args.queries, "seconds": {}, "pairs": {}}

    def factors(dtype: torch.dtype, batch: int) -> KFACFactors:
        model = copy.deepcopy(ctx.model).to(dtype)
        t = time.perf_counter()
        f = compute_kfac(model, ctx.diffusion, ctx.dataset.images.to(dtype), draws, influence_params(model),
                         fisher_type="empirical", kfac_approx=kfac.config.kfac_approx, batch_size=batch,
                         seed=kfac.config.seed)
        record["seconds"][f"{dtype}".removeprefix("torch.") + f" batch {batch}"] = round(time.perf_counter() - t, 1)
        print(f"factors {dtype} batch {batch}: {time.perf_counter() - t:.0f} s", flush=True)
        return f

    sets = {"float32": factors(torch.float32, kfac.factor_batch),
            "float32_half_batch": factors(torch.float32, kfac.factor_batch // 2),
            "float64": factors(torch.float64, kfac.factor_batch)}
    lam = kfac.default_damping
    meas, qdraws = parse_measurement("loss", s.diffusion.T), s.query_draws()
    pre: dict[str, list[torch.Tensor]] = {k: [] for k in sets}
    for item in s.gallery()[: args.queries]:
        g = s.query_gradient(meas, item_query(item), qdraws)
        for k, f in sets.items():
            dt = f.layers[0].qb.dtype
            r = f.rotate(g.to(dt))
            pre[k].append(f.unrotate(r / (f.eigenvalues().to(dt) + lam)).float())  # (G + lambda I)^-1 g
    vectors = torch.cat([torch.stack(pre[k]) for k in sets]).T.contiguous()  # (P, 3 Q)
    out = torch.empty(len(ctx.dataset), vectors.shape[1])
    for rows, grads in train_loss_grads(ctx.model, ctx.diffusion, ctx.dataset.images, ctx.train_draws, "loss",
                                        batch_size=16, params=ctx.params, progress=None):
        out[rows] = grads.detach() @ vectors
    q = args.queries
    scores = {k: out[:, i * q : (i + 1) * q].T.double().numpy() for i, k in enumerate(sets)}
    for a, b in (("float32", "float64"), ("float32_half_batch", "float64"), ("float32", "float32_half_batch")):
        rel = [np.linalg.norm(x - y) / np.linalg.norm(y) for x, y in zip(scores[a], scores[b], strict=True)]
        mx = [np.abs(x - y).max() / np.abs(y).max() for x, y in zip(scores[a], scores[b], strict=True)]
        rho = [spearmanr(x, y).statistic for x, y in zip(scores[a], scores[b], strict=True)]
        top = [len(np.intersect1d(np.argsort(-x)[:10], np.argsort(-y)[:10])) / 10
               for x, y in zip(scores[a], scores[b], strict=True)]
        record["pairs"][f"{a} vs {b}"] = {
            "rel_l2_median": float(np.median(rel)), "rel_l2_max": float(np.max(rel)),
            "max_error_median": float(np.median(mx)), "spearman_median": float(np.median(rho)),
            "top10": float(np.mean(top))}
        print(f"{a} vs {b}: rel L2 median {np.median(rel):.2e} (max {np.max(rel):.2e}), largest error "
              f"{np.median(mx):.2e} of the largest score, Spearman {np.median(rho):.6f}, top-10 {np.mean(top):.3f}")
    if args.out:
        save_json(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
