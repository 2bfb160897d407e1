"""How well the compressed bank's re-ranked candidates hold the full bank's ends, per candidate split.

The compressed bank re-ranks 2C candidates exactly (``engine.attribution.rerank``); which images they
are decides which proponents and opponents the product can list.  For each query this takes the
compressed scores (a bank derived from the stored one, ``compress_stored_bank``, at the preset's
projection and ratio: equal to a built compressed bank up to int8 rounding), picks the candidates as
the product does under each split (``CandidateSplit``: even, C per end, or adaptive), and compares the
candidates' exact top-k and bottom-k (their stored-bank scores: what re-ranking computes) with the
full stored bank's over all N:

- ``top_recall`` / ``bottom_recall``: the share of the full bank's top-k (bottom-k) that the
  re-ranked candidates list, mean and minimum over queries;
- ``bottom_score_share``: the sum of the listed bottom-k's exact scores over the full bank's bottom-k
  sum (1: as strong as the true opponents), mean and minimum;
- ``top_candidates``: C_top of the split, median and range;
- ``ends_iqr``: where the full bank's top-10 and bottom-10 stand, in interquartile ranges of all N
  exact scores from their median (the median over the 10 and over queries): why the split is uneven.

Queries: the 32 gallery samples (on which ``CandidateSplit``'s boundary and width were chosen) and,
with ``--fresh N``, N fresh samples of the model (sampling seed ``--fresh-seed``), which were not.

    python scripts/candidate_split.py --preset mnist --cache-root DIR --fresh 64 --out assets/results/candidate_split_mnist.json

Needs the preset's stored K-FAC bank (``attribution-engine build --preset P --methods kfac --cache-root DIR``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's engine

from engine.attribution.compressed_bank import (  # noqa: E402
    EVEN,
    CandidateSplit,
    gather_candidates,
)
from engine.attribution.rerank import score_moments, split_ends  # noqa: E402
from engine.bench.compressed import derive_compressed, open_stored_kfac, query_sets  # noqa: E402
from engine.model.measurements import parse_measurement  # noqa: E402

SPLITS = {"even": EVEN, "adaptive": CandidateSplit()}


def ends_held(full: np.ndarray, cand: np.ndarray, k: int) -> tuple[float, float, float]:
    """(top-k recall, bottom-k recall, bottom-k score share) of the candidates' exact ends against the full bank's."""
    shown_top = cand[np.argsort(-full[cand], kind="stable")[:k]]
    shown_low = cand[np.argsort(full[cand], kind="stable")[:k]]
    true_top = np.argsort(-full, kind="stable")[:k]
    true_low = np.argsort(full, kind="stable")[:k]
    top = len(np.intersect1d(shown_top, true_top)) / k
    low = len(np.intersect1d(shown_low, true_low)) / k
    return top, low, float(full[shown_low].sum() / full[true_low].sum())


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": round(float(np.mean(values)), 4), "min": round(float(min(values)), 4)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="digits")
    p.add_argument("--cache-root", default="cache")
    p.add_argument("--candidates", type=int, default=None, help="C per end (default: the preset's kfac_rerank)")
    p.add_argument("--ks", default="10,32", help="the ends' sizes compared (default 10,32; the app shows up to 32)")
    p.add_argument("--fresh", type=int, default=0, help="also this many fresh samples of the model as queries")
    p.add_argument("--fresh-seed", type=int, default=2000, help="sampling seed of --fresh (the gallery's is 1000)")
    p.add_argument("--compressed-grid", choices=("plain", "whitened"), default="plain",
                   help="the compressed rows' int8 grid: plain (what the product builds, the default) or whitened "
                        "by the projected eigenvalues as the stored bank's is (a measurement)")
    p.add_argument("--out", default=None, help="JSON output (default: print only)")
    args = p.parse_args()
    try:
        s, kfac = open_stored_kfac(args.preset, args.cache_root)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    config = s.config
    c = int(args.candidates if args.candidates is not None else config.kfac_rerank)
    ks = [int(k) for k in args.ks.split(",")]
    whiten = config.kfac_bank_whiten if args.compressed_grid == "whitened" else None
    if args.compressed_grid == "whitened" and whiten is None:
        raise SystemExit("--compressed-grid whitened needs the preset's kfac_bank_whiten floor (it is null)")
    derived = derive_compressed(kfac, config, whiten=whiten)
    meas, draws, lam = parse_measurement("loss", s.diffusion.T), s.query_draws(), kfac.default_damping
    sets = query_sets(s, args.fresh, args.fresh_seed)
    record = {"preset": args.preset, "projection": config.kfac_projection, "ratio": config.kfac_compression,
              "compressed_grid": args.compressed_grid,
              "candidates_per_end": c, "num_train": len(s.dataset), "damping": lam,
              "splits": {name: dataclasses.asdict(sp) for name, sp in SPLITS.items()}, "query_sets": {}}
    t0 = time.perf_counter()
    for set_name, queries in sets:
        rows: dict[str, dict[str, list[float]]] = {name: {} for name in SPLITS}
        ends: dict[str, list[float]] = {"top10": [], "bottom10": []}
        for q in queries:
            full, approx = derived.scores(s.query_gradient(meas, q, draws), lam)
            q1, med, q3 = np.percentile(full, [25, 50, 75])
            ends["top10"].append(float(np.median((np.sort(full)[-10:] - med) / (q3 - q1))))
            ends["bottom10"].append(float(np.median((np.sort(full)[:10] - med) / (q3 - q1))))
            for name, split in SPLITS.items():
                cand = gather_candidates(approx, 0, c, split)
                r = rows[name]
                d = split.depth(c)
                top_end, low_end = -np.sort(-approx)[:d], np.sort(approx)[:d]
                r.setdefault("top_candidates", []).append(split_ends(top_end, low_end, score_moments(approx), c, split)[0])
                for k in ks:
                    top, low, share = ends_held(full, cand, k)
                    r.setdefault(f"top{k}_recall", []).append(top)
                    r.setdefault(f"bottom{k}_recall", []).append(low)
                    r.setdefault(f"bottom{k}_score_share", []).append(share)
        out = {}
        for name, r in rows.items():
            tc = r.pop("top_candidates")
            out[name] = {key: summary(v) for key, v in r.items()}
            out[name]["top_candidates"] = {"median": statistics.median(tc), "min": min(tc), "max": max(tc)}
        record["query_sets"][set_name] = {"queries": len(queries), **out,
                                          "ends_iqr": {k: round(statistics.median(v), 2) for k, v in ends.items()}}
        print(set_name, json.dumps(record["query_sets"][set_name]))
    record["seconds"] = round(time.perf_counter() - t0, 1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
