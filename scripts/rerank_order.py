"""How soon a compressed bank's re-rank makes the shown ends exact, going most extreme first.

The re-rank (``engine.attribution.rerank``) takes the C_top highest and C_bottom lowest compressed
scores as candidates (2C in all, ``CandidateSplit``) and recomputes their exact K-FAC scores (eq. 6),
the most extreme first (``merge_candidates``: the highest, the lowest, the second highest, ...); the
app shows the candidates done so far exact while it runs.  For each gallery query this reports:

- ``top_candidates``: C_top, the candidates of the top end;
- ``top_needs`` / ``bottom_needs``: the smallest number of candidates per end, by compressed rank,
  that hold the final exact top-k (bottom-k) of all 2C;
- ``top_final_s`` / ``bottom_final_s``: the seconds into the re-rank after which the top-k (bottom-k)
  shown were the final ones, against ``rerank_s`` for the whole re-rank (timed from its batches).

    python scripts/rerank_order.py --preset <json with "kfac_bank": "compressed"> [--cache-root DIR]
        [--queries 32] [--k 10] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from engine.attribution.rerank import score_moments, split_ends
from engine.attribution.scoring import EigenbasisQuery
from engine.attribution.session import AttributionSession
from engine.threads import configure_threads


def final_ends(exact: dict[int, float], k: int) -> tuple[set[int], set[int]]:
    """The final exact top-k and bottom-k of the candidates (ties by index)."""
    idx = np.array(sorted(exact))
    ex = np.array([exact[i] for i in idx])
    return set(idx[np.argsort(-ex, kind="stable")[:k]].tolist()), set(idx[np.argsort(ex, kind="stable")[:k]].tolist())


def needed_per_end(approx: np.ndarray, top_final: set[int], low_final: set[int], c: int) -> tuple[int, int]:
    """(candidates per end, most extreme first, that hold the final exact top-k; the same for the bottom-k);
    ``c``: the deepest either end can go (``CandidateSplit.depth``)."""

    def reach(order: list[int], final: set[int]) -> int:
        pos = {i: r for r, i in enumerate(order)}
        return 1 + max(pos.get(i, c - 1) for i in final)  # one from the other end's list counts as the deepest

    return (reach(np.argsort(-approx, kind="stable")[:c].tolist(), top_final),
            reach(np.argsort(approx, kind="stable")[:c].tolist(), low_final))


def seconds_until(order: np.ndarray, final: set[int], batches: list[tuple[int, float]]) -> float:
    """Seconds into the re-rank (``batches``: candidates done, seconds) once every index of ``final`` is done."""
    need = 1 + max(int(np.flatnonzero(order == i)[0]) for i in final)
    return next(t for done, t in batches if done >= need)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, help="a preset (name or .json) with a built compressed K-FAC bank")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--cache-root", default=None)
    p.add_argument("--queries", type=int, default=32, help="gallery queries 0..n-1")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--out", default=None, help="write the per-query rows and the summary here (JSON)")
    args = p.parse_args(argv)
    configure_threads()
    session = AttributionSession(args.preset, args.checkpoint, "cpu", args.cache_root)
    rows = []
    for g in range(args.queries):
        result = session.query(session.parse_query(f"gallery:{g}"), "loss", methods=["kfac"], defer_exact=True)
        rq = result.prepared["kfac"].query
        lam = float(result.methods["kfac"].damping)
        approx = np.asarray(EigenbasisQuery.score(rq, lam), dtype=np.float64)  # the scan alone
        r = rq.reranker
        batches: list[tuple[int, float]] = []
        report, t0 = r.report, time.perf_counter()

        def timed(done, total, part=None, report=report, batches=batches, t0=t0):
            batches.append((int(done), time.perf_counter() - t0))
            report(done, total, part)

        r.report = timed
        session.fill_exact(result)
        exact = dict(zip(r.indices.tolist(), r.cache[lam].tolist(), strict=True))
        top_final, low_final = final_ends(exact, args.k)
        depth = r.split.depth(r.c)
        top, low = needed_per_end(approx, top_final, low_final, depth)
        c_top, _ = split_ends(-np.sort(-approx)[:depth], np.sort(approx)[:depth], score_moments(approx), r.c, r.split)
        row = {"gallery": g, "candidates": len(r.indices), "top_candidates": c_top, "top_needs": top, "bottom_needs": low,
               "top_final_s": round(seconds_until(r.indices, top_final, batches), 1),
               "bottom_final_s": round(seconds_until(r.indices, low_final, batches), 1),
               "rerank_s": round(batches[-1][1], 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {}
    for key in ("top_needs", "bottom_needs", "top_final_s", "bottom_final_s", "rerank_s"):
        v = [r[key] for r in rows]
        summary[key] = {"median": statistics.median(v), "max": max(v)}
    share = [r["top_final_s"] / r["rerank_s"] for r in rows]
    summary["top_final_share_of_rerank"] = {"median": round(statistics.median(share), 3), "max": round(max(share), 3)}
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"k": args.k, "queries": rows, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
