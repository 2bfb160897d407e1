"""Query time of two checkouts of this repository, side by side: which commit answers faster.

Why: this machine changes speed by up to 2x within minutes, so a query time measured today cannot be
compared with one measured yesterday.  This runs ``session.query`` with every method over the same
gallery queries and the same built caches from two checkouts (for example ``git worktree add
/tmp/before <commit>`` and this one), alternating the two several times, and prints each run's median
and the ratio of the medians of medians.

    git worktree add /tmp/before 85a8307
    python scripts/compare_query_checkouts.py --before /tmp/before --after . --cache-root cache --rounds 3

Each run is a fresh Python process (``--worker``), so neither checkout's code or caches leak into the
other's; the caches must already be built (``attribution-engine build``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def worker(args: argparse.Namespace) -> int:
    """Time ``args.queries`` gallery queries with this checkout's engine; print one JSON line."""
    import torch

    from engine.attribution.session import AttributionSession
    from engine.config import get_preset
    from engine.paths import default_checkpoint

    torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    session = AttributionSession(
        preset, checkpoint=default_checkpoint(args.preset), device="cpu", cache_root=Path(args.cache_root),
        config=preset.attribution, auto_build=False,
    )
    methods = args.methods.split(",")
    session.load(methods)
    queries = [session.parse_query(f"gallery:{i}") for i in range(args.queries)]
    first = session.query(queries[0], "loss", methods=methods)  # warm: kernels, memory maps
    missing = [n for n, r in first.methods.items() if r.status == "unavailable" and n in ("kfac", "trak", "dtrak")]
    if missing:
        raise SystemExit(f"not built under {args.cache_root}: {', '.join(missing)}")
    totals = [session.query(q, "loss", methods=methods).timing_ms["total"] for q in queries]
    print(json.dumps({"median_ms": statistics.median(totals), "ms": totals}))
    return 0


def run_checkout(root: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root))  # this checkout's engine first on the path
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--preset", args.preset,
           "--cache-root", str(Path(args.cache_root).resolve()), "--queries", str(args.queries),
           "--methods", args.methods, "--threads", str(args.threads)]
    out = subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _commit(root: Path) -> str | None:
    """The checkout's HEAD commit, with "+changes" when its tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", help="checkout to compare against (a git worktree)")
    ap.add_argument("--after", default=".", help="the other checkout (default: this one)")
    ap.add_argument("--preset", default="digits")
    ap.add_argument("--cache-root", default="cache")
    ap.add_argument("--queries", type=int, default=16, help="gallery queries per run")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the two checkouts")
    ap.add_argument("--methods", default="kfac,trak,dtrak,clip,pixel")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the record to this JSON file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if not args.before:
        ap.error("--before is required")
    roots = {"before": Path(args.before).resolve(), "after": Path(args.after).resolve()}
    for name, root in roots.items():
        if not (root / "engine" / "__init__.py").is_file():
            raise SystemExit(f"--{name} {root} is not a checkout of this repository")
    runs: dict[str, list[float]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for name, root in roots.items():
            got = run_checkout(root, args)
            runs[name].append(got["median_ms"])
            print(f"round {r + 1} {name:6s} median {got['median_ms']:.1f} ms", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    record = {
        "before": str(roots["before"]), "after": str(roots["after"]),
        "commits": {k: _commit(root) for k, root in roots.items()},
        "queries": args.queries, "rounds": args.rounds, "threads": args.threads,
        "run_medians_ms": runs, "median_of_medians_ms": med, "ratio_after_over_before": med["after"] / med["before"],
    }
    print(json.dumps(record, indent=1))
    if args.out:
        # atomic write; imported here, the parent process needs no other engine code
        from engine.files import save_json

        save_json(args.out, record, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
