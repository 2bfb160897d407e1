"""K-FAC's first scoring pass: the whole 49-damping grid against one damping (issue 11's query time).

Why: the stored int8 bank is N x P bytes; scoring the damping grid in the first pass makes every
later slider move instant but costs several single-damping passes.  This times both on the same
query gradient, interleaved, so the ratio holds on a busy machine.

    python scripts/grid_vs_single_damping.py [--preset digits] [--cache-root cache] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.attribution.scoring import EigenbasisQuery  # noqa: E402
from engine.attribution.session import AttributionSession  # noqa: E402
from engine.cli.common import build_progress  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="digits")
    ap.add_argument("--cache-root", default=None)
    ap.add_argument("--query", default="gallery:0")
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    s = AttributionSession(preset=args.preset, cache_root=args.cache_root)
    with build_progress("kfac") as progress:
        s.build(["kfac"], progress)
    base = s.query(s.parse_query(args.query), "loss", methods=["kfac"]).prepared["kfac"].query
    times: dict[str, list[float]] = {"grid": [], "single": []}
    for _ in range(args.repeats):
        for kind in times:
            q = EigenbasisQuery(rotated=base.rotated, eigenvalues=base.eigenvalues, rows=base.rows,
                                use_grid=kind == "grid")
            t0 = time.perf_counter()
            q.score(args.damping)
            times[kind].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"{args.preset}, {args.query}: first K-FAC pass, median of {args.repeats}: "
          f"grid {med['grid']:.0f} ms, one damping {med['single']:.0f} ms (ratio {med['grid'] / med['single']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
