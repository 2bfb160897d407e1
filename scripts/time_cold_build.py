"""The full cold build of every method, timed as a user runs it (issue 12's "cold build" figure).

Runs ``python -m engine build --preset P`` in a child process on an empty cache folder (a temporary
one, or ``--cache-root`` to keep the caches), and reports its wall time, its peak resident memory
(``wait4``'s resource use of the child) and the build seconds every cache recorded when it was published (the
K-FAC factor pass, the bank pass that also feeds TRAK's and D-TRAK's projections, and what each
of those still had to do afterwards), with which caches shared that pass (``gradient_pass_sharing``).  Run it on an otherwise idle machine: the figure is a wall time.

    python scripts/time_cold_build.py [--preset digits] [--runs 3] [--cache-root DIR] [--out assets/results/cold_build_idle.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _published(cache_root: Path):
    """(cache folder kind, its recorded meta) of every published cache under ``cache_root``."""
    for settings in sorted(cache_root.rglob("settings.json")):
        if any(part.startswith(".") for part in settings.relative_to(cache_root).parts):
            continue
        meta = json.loads(settings.read_text())
        yield settings.parent.name.rsplit("-", 1)[0], {**meta, **(meta.get("meta") or {})}


def recorded_seconds(cache_root: Path) -> dict[str, float]:
    """{cache folder kind: build_seconds} from every published cache's settings.json."""
    out: dict[str, float] = {}
    for kind, meta in _published(cache_root):
        seconds = meta.get("build_seconds")
        if seconds is not None:
            out[kind] = round(out.get(kind, 0.0) + float(seconds), 1)
    return out


def recorded_sharing(cache_root: Path) -> dict[str, dict]:
    """{cache folder kind: {"shared_with": method} or {"fed": [methods]}}: which caches came from one shared
    gradient pass.  A fed cache's seconds are only its own work after the pass, the pass's are its maker's,
    so a reader of ``build_seconds`` must not add them up as separate passes nor take a fed one for the whole
    cost (QA round 12)."""
    out: dict[str, dict] = {}
    for kind, meta in _published(cache_root):
        if meta.get("gradient_pass_shared_with"):
            out[kind] = {"shared_with": str(meta["gradient_pass_shared_with"])}
        elif meta.get("gradient_pass_fed"):
            out[kind] = {"fed": [str(m) for m in meta["gradient_pass_fed"]]}
    return out


def timed_build(preset: str, root: Path, extra: list[str]) -> dict:
    """One ``engine build`` into the empty folder ``root``: wall time, load before, build seconds."""
    if any(root.iterdir()):
        raise SystemExit(f"{root} is not empty: a cold build needs an empty cache folder")
    cmd = [sys.executable, "-m", "engine", "build", "--preset", preset, "--cache-root", str(root), *extra]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource use (its peak memory)
    wall = time.perf_counter() - t0
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"build failed with exit code {code}")
    return {
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "load_average_before": round(load_before, 2),
        "build_seconds": recorded_seconds(root),
        "gradient_pass_sharing": recorded_sharing(root),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="digits")
    ap.add_argument("--cache-root", default=None, help="an empty folder to build into (default: a temporary one)")
    ap.add_argument("--runs", type=int, default=1,
                    help="cold builds one after another, each into its own empty folder; the record gives the median "
                         "(the machine is shared: one wall time is one draw of its speed)")
    ap.add_argument("--out", default=None,
                    help="write the record here as JSON (a record already there moves to the new one's earlier_runs)")
    ap.add_argument("extra", nargs="*", help="more arguments for `engine build` (after --)")
    args = ap.parse_args(argv)
    if args.runs < 1:
        raise SystemExit("--runs must be at least 1")
    if args.cache_root and args.runs > 1:
        raise SystemExit("--cache-root keeps one build's caches: use it with --runs 1")
    runs = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(args.cache_root or tmp)
            root.mkdir(parents=True, exist_ok=True)
            runs.append(timed_build(args.preset, root, args.extra))
    median = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    record = {
        "command": " ".join(["python", "scripts/time_cold_build.py", *(argv if argv is not None else sys.argv[1:])]),
        "build_command": " ".join(["python", "-m", "engine", "build", "--preset", args.preset, "--cache-root", "<empty>",
                                   *args.extra]),
        "date": time.strftime("%Y-%m-%d"),
        "cores": os.cpu_count(),
        "wall_s": median["wall_s"],  # the median run (the upper median for an even count)
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),  # the largest over the runs
        "build_seconds": median["build_seconds"],
        "gradient_pass_sharing": median.get("gradient_pass_sharing", {}),
        "load_average_before": median["load_average_before"],
    }
    if args.runs > 1:
        record["runs"] = runs
    if args.out and Path(args.out).exists():
        earlier = json.loads(Path(args.out).read_text())
        older = earlier.pop("earlier_runs", {})
        key = f"{earlier.get('date', '?')}, {earlier.get('command', '?')}"
        while key in older:  # the same command on the same day: keep both
            key += " (earlier)"
        record["earlier_runs"] = {key: earlier, **older}
    print(json.dumps(record, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
