"""``bench``: the attribution benchmark's options (the figures are computed by ``engine.bench.attribution``)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ..attribution.methods import method_names, parse_methods
from ..paths import ASSETS
from .common import fail, register, resolve, subcommand

DEFAULT_OUT = ASSETS / "results" / "bench_attribution.json"


@register
def add_bench(sub: argparse._SubParsersAction) -> None:
    p = subcommand(
        sub,
        "bench",
        cmd_bench,
        help="benchmark attribution: build times, query latency, damping changes, memory, int8 vs float32, kronfluence",
        description="Measures the attribution engine on the preset's checkpoint and its gallery and "
        "writes the figures as JSON (default assets/results/bench_attribution.json).",
    )
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"JSON results file (default {DEFAULT_OUT})")
    p.add_argument("--mc-samples", type=int, default=64, help="Monte Carlo draws M (default 64)")
    p.add_argument("--trak-dim", type=int, default=None, help="TRAK projection dimension (default: preset's)")
    p.add_argument("--queries", type=int, default=32, help="gallery queries to time (default 32, all)")
    p.add_argument("--methods", default=None, help="comma list of methods to build and query (default: all)")
    p.add_argument(
        "--reuse-cache",
        action="store_true",
        help="use the normal cache (--cache-root or $ATTRIBUTION_CACHE) instead of a fresh temporary one",
    )
    p.add_argument("--cache-root", default=None, help="cache folder for --reuse-cache")
    p.add_argument("--no-float32", action="store_true", help="skip the int8 vs float32 comparison (one gradient pass)")
    p.add_argument("--kronfluence", action="store_true", help="also compare against kronfluence's KFAC")
    p.add_argument("--kronfluence-queries", type=int, default=3, help="gallery queries for kronfluence (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        return _bench(args)
    except (ValueError, RuntimeError) as e:
        return fail(e)


def _bench(args: argparse.Namespace) -> int:
    import torch

    from ..bench.attribution import run_bench, save_json
    from ..bench.report import format_table

    preset, ckpt, device = resolve(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = parse_methods(args.methods) or method_names()
    changes: dict[str, Any] = {"mc_samples": args.mc_samples}
    if args.trak_dim:
        changes["trak_dim"] = args.trak_dim
    config = dataclasses.replace(preset.attribution, **changes)
    results = run_bench(
        preset,
        ckpt,
        device,
        config,
        methods=methods,
        n_queries=args.queries,
        reuse_cache=args.reuse_cache,
        cache_root=args.cache_root,
        float32=not args.no_float32,
        kronfluence=args.kronfluence,
        kronfluence_queries=args.kronfluence_queries,
        out=Path(args.out),
    )
    out = Path(args.out)
    save_json(results, out)  # the final figures (run_bench wrote each phase's)
    print(format_table(results))
    print(f"\nresults written to {out}")
    return 0
