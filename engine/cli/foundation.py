"""``bench-foundation``: sizes and speeds of the foundation on this machine.

Prints the parameter count of every preset, training steps/s of the digits preset (the
real ``engine.model.train.train`` loop, timed per step after a warm-up; median), the seconds to
draw digits samples with all T steps, and the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import at_least, check_output_file, fail, register, resolve, subcommand


@register
def add_bench_foundation(sub: argparse._SubParsersAction) -> None:
    p = subcommand(
        sub,
        "bench-foundation",
        cmd_bench_foundation,
        help="time training and sampling of one preset (default digits); print preset sizes",
        description="Parameters of each preset, training steps/s for --preset (default digits; median "
        "per-step time of a short run after a warm-up), seconds to draw its samples with all "
        "T steps (its checkpoint: --checkpoint, else the shipped one if present, else random weights), "
        "and peak RSS memory.",
    )
    p.add_argument("--steps", type=at_least(1), default=100, help="timed training steps (default 100)")
    # at least 1: a step is timed from the end of the step before, so with no warm-up the first timed step had no
    # start and --steps 1 failed after the run ("no median for empty data", QA round 20)
    p.add_argument("--warmup", type=at_least(1), default=10, help="untimed warm-up training steps (default 10, at least 1)")
    p.add_argument("--samples", type=at_least(1), default=16, help="number of samples to draw (default 16)")
    p.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads (default: torch's choice)")
    # --out, as the other bench commands name their JSON file; --json, its first name, still works (it took a file
    # name, unlike the query commands' --json switch, which prints JSON instead of a table)
    p.add_argument("--out", "--json", dest="out", default=None,
                   help="also write the figures to this JSON file (--json: the same, its older name)")


def cmd_bench_foundation(args: argparse.Namespace) -> int:
    from ..bench.foundation import bench_foundation

    try:
        if args.out:  # checked before minutes of timing, not after (a folder failed at the end, QA round 20)
            check_output_file(Path(args.out), "--out")
    except ValueError as e:
        return fail(e)
    preset, ckpt, device = resolve(args)
    try:
        bench_foundation(
            ckpt, device, steps=args.steps, warmup=args.warmup, samples=args.samples, threads=args.threads,
            json_out=Path(args.out) if args.out else None, preset=preset,
            checkpoint_required=args.checkpoint is not None,  # a checkpoint asked for by name must load
        )
    except ValueError as e:  # a checkpoint that does not load or is another preset's (before any timing)
        return fail(e)
    return 0
