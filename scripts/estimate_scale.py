"""The compressed bank's estimates against eq. 6's exact scores, raw and rescaled (``rerank.scale_estimates``).

A compressed K-FAC bank answers with its 2C re-ranked candidates exact and the other N - 2C entries
estimated by the compressed scan, whose scores are on a smaller scale.  The product multiplies those
estimates by the least-squares factor b fitted on the candidates (exact on estimate, through the
origin).  For each query this takes the compressed scores (a bank derived from the stored one,
``compress_stored_bank``, at the preset's projection and ratio), picks the candidates as the product
does (the preset's ``kfac_rerank`` and split), takes their exact scores from the stored bank (what the
re-rank computes), and compares the answer's whole column with the stored bank's over all N:

- ``scale_candidates``: b, fitted on the candidates (what the product uses); ``scale_rest``: the same
  fit over the other entries against their exact scores (what b should be for them);
- ``rel_l2``: ||column - exact|| / ||exact|| over all N, for the raw column (candidates exact, the rest
  raw estimates) and the rescaled one (the product's);
- ``rest_max_error``: the largest |estimate - exact| over the non-candidates, over the largest |exact|;
- ``spearman``: of the column with the exact scores over all N.

Each as median and range over the queries: the 32 gallery samples and, with ``--fresh N``, N fresh
samples of the model.

    python scripts/estimate_scale.py --preset mnist --cache-root DIR --out assets/results/estimate_scale_mnist.json

Needs the preset's stored K-FAC bank (``attribution-engine build --preset P --methods kfac --cache-root DIR``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's engine

from engine.attribution.compressed_bank import CandidateSplit, gather_candidates  # noqa: E402
from engine.attribution.rerank import EVEN, scale_estimates  # noqa: E402
from engine.bench.compressed import derive_compressed, open_stored_kfac, query_sets  # noqa: E402
from engine.evaluation.stats import spearman  # noqa: E402
from engine.files import save_json  # noqa: E402
from engine.model.measurements import parse_measurement  # noqa: E402


def column_figures(full: np.ndarray, approx: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    """The figures of one query (see the module docstring)."""
    mask = np.zeros(full.shape[0], dtype=bool)
    mask[cand] = True
    raw = np.where(mask, full, approx).astype(np.float32)
    scaled, b = scale_estimates(raw, approx, mask)
    rest = ~mask
    a, t = approx[rest].astype(np.float64), full[rest].astype(np.float64)
    top = float(np.abs(full).max())
    out = {"scale_candidates": float("nan") if b is None else b,
           "scale_rest": float(a @ t / (a @ a)) if float(a @ a) > 0 else float("nan")}
    for name, col in (("raw", raw), ("scaled", scaled)):
        out[f"rel_l2_{name}"] = float(np.linalg.norm(col - full) / np.linalg.norm(full))
        out[f"rest_max_error_{name}"] = float(np.abs(col[rest] - full[rest]).max() / top)
        out[f"spearman_{name}"] = float(spearman(col, full))
    return out


def summarise(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {k: {"median": round(statistics.median(r[k] for r in rows), 4),
                "min": round(min(r[k] for r in rows), 4), "max": round(max(r[k] for r in rows), 4)}
            for k in rows[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mnist")
    p.add_argument("--cache-root", default="cache")
    p.add_argument("--fresh", type=int, default=0, help="also this many fresh samples of the model as queries")
    p.add_argument("--fresh-seed", type=int, default=2000, help="sampling seed of --fresh (the gallery's is 1000)")
    p.add_argument("--out", default=None, help="JSON output (default: print only)")
    args = p.parse_args()
    try:
        s, kfac = open_stored_kfac(args.preset, args.cache_root)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    config = s.config
    c = int(config.kfac_rerank)
    split = CandidateSplit() if config.kfac_rerank_split == "adaptive" else EVEN
    derived = derive_compressed(kfac, config)
    meas, draws, lam = parse_measurement("loss", s.diffusion.T), s.query_draws(), kfac.default_damping
    sets = query_sets(s, args.fresh, args.fresh_seed)
    record = {"preset": args.preset, "projection": config.kfac_projection, "ratio": config.kfac_compression,
              "candidates_per_end": c, "split": config.kfac_rerank_split, "num_train": len(s.dataset),
              "damping": lam, "query_sets": {}}
    t0 = time.perf_counter()
    for set_name, queries in sets:
        rows = []
        for q in queries:
            full, approx = derived.scores(s.query_gradient(meas, q, draws), lam)
            rows.append(column_figures(full, approx, gather_candidates(approx, 0, c, split)))
        record["query_sets"][set_name] = {"queries": len(queries), **summarise(rows)}
        print(set_name, record["query_sets"][set_name])
    record["seconds"] = round(time.perf_counter() - t0, 1)
    if args.out:
        save_json(Path(args.out), record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
