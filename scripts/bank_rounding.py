"""How the stored bank's int8 grid changes K-FAC's scores: the plain grid against the whitened one.

The stored bank keeps each training row R_i = Q_B^T G_i Q_A in int8 with one scale per (example,
block) (``engine.attribution.bank``).  The plain grid (scale = max|R_i| / 127, the stored banks before
2026-12-05) rounds every coordinate with the same step, but the damped query q / (e + lambda) weighs
most the eigen-directions whose eigenvalue is small, where the rows are small too: rounding to nearest
zeroes exactly the coordinates the score weighs most, and every score comes out a little shrunk.  The
whitened grid (``whitening``: R / sqrt(e + f max e) rounded, the query multiplied back) gives each
coordinate a step in proportion to its spread.

For the preset's gallery queries this computes the training rows once in float32 (one gradient pass
with the bank's draws, no store), rounds them on both grids in memory, and compares each grid's
scores with the float rows' at several dampings:

- ``slope``: least-squares slope of the int8 scores on the float ones (1: no shrink), per query;
- ``max_error``: the largest |int8 - float| over the largest |float| score, per query;
- ``spearman``, ``top10`` / ``bottom10`` (share of the float top-10 / bottom-10 listed);
- ``class_change_ratio``: each class's summed scores (the group view's predicted change of removing
  that class) over the float rows', per query and class (classes with a float sum above 1% of the
  largest |sum|);
- ``scan_ms``: the damped query computed and one single-damping scan of each int8 bank (the whitened
  one multiplies the query by w first), median of repeats taken alternately.

    python scripts/bank_rounding.py --preset mnist --cache-root DIR --out assets/results/bank_rounding_mnist.json

The K-FAC factors come from the cache (built first when absent).  Holds the float rows in memory:
N x P x 4 bytes (mnist 1.4 GB, digits 2.0 GB), so it is for the embedded presets, not CIFAR.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's engine

from engine.attribution.bank import RotatedBank, quantize_blocks, whitening  # noqa: E402
from engine.attribution.bank_build import build_bank  # noqa: E402
from engine.attribution.session import AttributionSession  # noqa: E402
from engine.bench.compressed import item_query  # noqa: E402
from engine.config import get_preset  # noqa: E402
from engine.files import save_json  # noqa: E402
from engine.model.measurements import parse_measurement  # noqa: E402
from engine.paths import default_checkpoint  # noqa: E402


def grid_bank(exact: torch.Tensor, blocks: list, eigenvalues: torch.Tensor, floor: float | None) -> RotatedBank:
    """The float rows (N, P) rounded on the plain grid (floor None) or the whitened one, in memory."""
    weights = None if floor is None else whitening(eigenvalues, blocks, floor)
    data, scales = quantize_blocks(exact, blocks, weights)
    return RotatedBank(blocks, data, scales, weights=weights)


def quantiles(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}


def compare(got: np.ndarray, ref: np.ndarray, labels: np.ndarray | None) -> dict[str, list[float]]:
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    out = {
        "slope": [float(got @ ref / (ref @ ref))],
        "max_error": [float(np.abs(got - ref).max() / np.abs(ref).max())],
        "spearman": [float(spearmanr(got, ref).statistic)],
        "top10": [len(np.intersect1d(np.argsort(-got)[:10], np.argsort(-ref)[:10])) / 10],
        "bottom10": [len(np.intersect1d(np.argsort(got)[:10], np.argsort(ref)[:10])) / 10],
    }
    if labels is not None:
        sums_ref = np.array([ref[labels == c].sum() for c in np.unique(labels)])
        sums_got = np.array([got[labels == c].sum() for c in np.unique(labels)])
        keep = np.abs(sums_ref) > 0.01 * np.abs(sums_ref).max()
        out["class_change_ratio"] = list(sums_got[keep] / sums_ref[keep])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="digits")
    p.add_argument("--cache-root", default="cache")
    p.add_argument("--dampings", default="1e-12,1e-8,1e-5", help="comma list (default 1e-12,1e-8,1e-5)")
    p.add_argument("--floor", type=float, default=None,
                   help="the whitened grid's relative floor (default: the preset's kfac_bank_whiten)")
    p.add_argument("--queries", type=int, default=32, help="gallery queries (default 32)")
    p.add_argument("--repeats", type=int, default=15, help="timed scans per bank (default 15)")
    p.add_argument("--out", default=None, help="JSON output (default: print only)")
    args = p.parse_args()
    preset = get_preset(args.preset)
    floor = preset.attribution.kfac_bank_whiten if args.floor is None else args.floor
    if floor is None:
        raise SystemExit("the preset uses the plain grid: give --floor")
    # the streamed kind builds the factors only (cached); the float rows are computed here, with the bank's draws
    config = dataclasses.replace(preset.attribution, kfac_bank="streamed")
    s = AttributionSession(preset, checkpoint=str(default_checkpoint(args.preset)), cache_root=args.cache_root,
                           config=config)
    kfac = s.method("kfac")
    kfac.build(s.ctx)
    ctx, factors = s.ctx, kfac.factors
    blocks = factors.blocks
    t0 = time.perf_counter()
    from tqdm import tqdm

    with tqdm(total=100, desc="float rows", unit="%") as bar:
        def progress(_msg: str, frac: float) -> None:
            bar.update(int(100 * frac) - bar.n)

        exact_bank = build_bank(ctx.model, ctx.diffusion, ctx.dataset.images, ctx.train_draws, factors, ctx.params,
                                store=None, quantize=False, device="cpu", progress=progress)
    rows_seconds = time.perf_counter() - t0
    exact = torch.cat([d.float() for d in exact_bank.data], dim=1)
    del exact_bank
    eig = factors.eigenvalues().float().cpu()
    banks = {"plain": grid_bank(exact, blocks, eig, None), "whitened": grid_bank(exact, blocks, eig, floor)}
    float_bank = RotatedBank(blocks, [exact[:, b.offset : b.offset + b.size] for b in blocks], None, pack=False)
    labels = None if s.labels is None else np.asarray(s.labels)
    dampings = [float(x) for x in args.dampings.split(",")]
    meas, draws = parse_measurement("loss", s.diffusion.T), s.query_draws()
    found: dict[str, dict[float, dict[str, list[float]]]] = {k: {d: {} for d in dampings} for k in banks}
    times: dict[str, list[float]] = {k: [] for k in banks}
    items = s.gallery()[: args.queries]
    for item in tqdm(items, desc="queries"):
        rotated = kfac.rotate(s.query_gradient(meas, item_query(item), draws)).float().cpu()
        for lam in dampings:
            q = rotated / (eig + lam)
            ref = float_bank.score(q)
            for name, bank in banks.items():
                for key, v in compare(bank.score(q), ref, labels).items():
                    found[name][lam].setdefault(key, []).extend(v)
    lam = kfac.default_damping
    for _ in range(args.repeats):  # alternately, so both see the same machine
        for name, bank in banks.items():
            t = time.perf_counter()  # as a query does: the damped query freshly computed, then one scan
            bank.inner(rotated / (eig + lam))
            times[name].append((time.perf_counter() - t) * 1000)
    record = {
        "preset": args.preset, "num_train": int(exact.shape[0]), "parameters": int(exact.shape[1]),
        "queries": len(items), "whiten_floor": floor, "default_damping": kfac.default_damping,
        "float_rows_seconds": round(rows_seconds, 1),
        "grids": {name: {f"{lam:g}": {k: quantiles(v) for k, v in by.items()} for lam, by in per.items()}
                  for name, per in found.items()},
        "scan_ms": {name: round(float(np.median(t)), 2) for name, t in times.items()},
        "bytes": {name: int(bank.nbytes) for name, bank in banks.items()},
    }
    for name, per in record["grids"].items():
        for lam, m in per.items():
            print(f"{name:9s} damping {lam:>6s}: slope {m['slope']['median']:.5f} [{m['slope']['min']:.5f}, "
                  f"{m['slope']['max']:.5f}]  max error {m['max_error']['median']:.5f} (worst {m['max_error']['max']:.5f})"
                  f"  Spearman {m['spearman']['median']:.5f}  top-10 {m['top10']['mean']:.3f}"
                  f"  bottom-10 {m['bottom10']['mean']:.3f}"
                  + (f"  class change ratio {m['class_change_ratio']['median']:.5f}" if "class_change_ratio" in m else ""))
    print("scan ms (median):", record["scan_ms"])
    if args.out:
        save_json(args.out, record)  # atomic
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
