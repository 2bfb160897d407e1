"""What Streamlit's post-script garbage collection costs a pending exact re-rank (.streamlit/config.toml).

Streamlit runs ``gc.collect(2)`` after every script run, fragments included, unless
``runner.postScriptGC`` is off; the app's poller (``explorer.exact_view.await_exact``) is a
fragment run once a second per tab with a pending re-rank.  In a process that holds the engine
(torch imported, a session open), this measures, side by side in one run:

1. the seconds one ``gc.collect(2)`` takes (median of ``--collections``) and the objects it walks;
2. a compressed bank's deferred re-rank (``fill_exact``) of gallery queries, alternately alone and
   beside a thread that runs ``gc.collect(2)`` once a second (what one polling tab did), ``--pairs``
   times; each pair uses two fresh gallery queries.

Needs a preset whose K-FAC bank is compressed, built (``attribution-engine build --preset <json>``),
e.g. the mnist preset with ``"kfac_bank": "compressed"`` in its attribution section.

    python scripts/bench_poll_gc.py --preset <json> [--cache-root DIR] [--pairs 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import threading
import time

from engine.attribution.session import AttributionSession
from engine.threads import configure_threads


def _rerank_seconds(session: AttributionSession, gallery_index: int, collect_each_s: float | None) -> tuple[float, int]:
    """Seconds of one deferred re-rank, and the collections a 1 Hz ``gc.collect(2)`` thread ran beside it."""
    result = session.query(session.parse_query(f"gallery:{gallery_index}"), "loss", methods=["kfac"], defer_exact=True)
    stop, count = threading.Event(), [0]

    def collector() -> None:
        while not stop.wait(collect_each_s):
            gc.collect(2)
            count[0] += 1

    thread = threading.Thread(target=collector, daemon=True)
    if collect_each_s is not None:
        thread.start()
    t0 = time.perf_counter()
    session.fill_exact(result)
    seconds = time.perf_counter() - t0
    stop.set()
    return seconds, count[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, help="a preset (name or .json) with a built compressed K-FAC bank")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--cache-root", default=None)
    p.add_argument("--collections", type=int, default=5)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--first-query", type=int, default=8, help="gallery index of the first query")
    args = p.parse_args(argv)
    configure_threads()
    session = AttributionSession(args.preset, args.checkpoint, "cpu", args.cache_root)
    session.query(session.parse_query("gallery:0"), "loss", methods=None, defer_exact=True)  # the app's state
    times = []
    for _ in range(args.collections):
        t0 = time.perf_counter()
        gc.collect(2)
        times.append(time.perf_counter() - t0)
    out = {"tracked_objects": len(gc.get_objects()), "collect_s": [round(t, 3) for t in times],
           "collect_s_median": round(statistics.median(times), 3), "pairs": []}
    print(f"{out['tracked_objects']:,} tracked objects; gc.collect(2): median {out['collect_s_median']} s", flush=True)
    q = args.first_query
    for _ in range(args.pairs):
        alone, _ = _rerank_seconds(session, q, None)
        beside, n = _rerank_seconds(session, q + 1, 1.0)
        q += 2
        out["pairs"].append({"alone_s": round(alone, 1), "beside_1hz_gc_s": round(beside, 1), "collections": n})
        print(f"re-rank alone {alone:.1f} s, beside a 1 Hz gc.collect(2) {beside:.1f} s ({n} collections)", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
