"""``bench``: the attribution benchmark's options (the figures are computed by ``engine.bench.attribution``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from ..attribution.methods import method_names, parse_methods
from ..paths import ASSETS
from .common import at_least, check_output_file, fail, int_list, register, resolve, subcommand

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
    p.add_argument("--mc-samples", type=int, default=None,
                   help="Monte Carlo draws M (default: the preset's, 64 on digits, 16 on mnist)")
    p.add_argument("--trak-dim", type=int, default=None, help="TRAK projection dimension (default: preset's)")
    p.add_argument("--queries", type=at_least(1), default=32, help="gallery queries to time (default 32, all)")
    p.add_argument("--methods", default=None, help="comma list of methods to build and query (default: all)")
    p.add_argument(
        "--reuse-cache",
        action="store_true",
        help="use the normal cache (--cache-root or $ATTRIBUTION_CACHE) instead of a fresh temporary one",
    )
    p.add_argument("--cache-root", default=None, help="cache folder for --reuse-cache")
    p.add_argument("--no-float32", action="store_true", help="skip the int8 vs float32 comparison (one gradient pass)")
    p.add_argument("--kronfluence", action="store_true", help="also compare against kronfluence's KFAC")
    p.add_argument("--kronfluence-queries", type=at_least(1), default=3, help="gallery queries for kronfluence (default 3)")
    p.add_argument("--threads", type=at_least(1), default=None, help="torch threads (default: torch's)")


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
    changes: dict[str, Any] = {}
    if args.mc_samples is not None:
        changes["mc_samples"] = args.mc_samples
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


# --- the compressed K-FAC bank's figures (issue 11) -------------------------------------------


def ratio_list(text: str) -> tuple[float, ...]:
    """An argparse type: '8,32' -> (8.0, 32.0), every ratio a number >= 1, refused while parsing (QA 27 #10:
    ``--ratios 0`` failed after the 32 gallery query gradients, ``--ratios abc`` said only "could not convert
    string to float")."""
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {text!r}") from None
    if not values or not all(v >= 1 for v in values):  # NaN too
        raise argparse.ArgumentTypeError(f"every compression ratio must be at least 1, got {text!r}")
    return values


def ratio(text: str) -> float:
    """An argparse type: one compression ratio, a number >= 1 (refused while parsing)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 1:  # NaN too
        raise argparse.ArgumentTypeError(f"a compression ratio must be at least 1, got {text!r}")
    return value


def _projections(text: str) -> tuple[str, ...]:
    """``--projections`` as a tuple of known kinds; ValueError naming the option (checked before any work)."""
    from ..attribution.layer_projection import KINDS  # torch, which the parser must not import

    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise ValueError(f"--projections {text!r}: expected a comma list of {', '.join(KINDS)}"
                         + (f" ({', '.join(unknown)} unknown)" if unknown else ""))
    return kinds


def _lds_full(path: str | None, mc_samples: int) -> float | None:
    """The full bank's LDS from ``--lds-json``: an error (not a silent null, QA 27 #7) when the file is
    missing or unreadable, scored at another M, or holds no K-FAC LDS."""
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--lds-json {file} does not exist" if not file.exists() else f"--lds-json {file} is not a file")
    try:
        rec = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--lds-json {file} is not a readable JSON file ({e})") from None
    attribution = rec.get("config", {}).get("attribution", {}) if isinstance(rec, dict) else {}
    scored = attribution.get("mc_samples") if isinstance(attribution, dict) else None
    if scored != mc_samples:
        raise ValueError(f"--lds-json {file} scored K-FAC at M={scored}, but the stored bank has M={mc_samples}: "
                         "give the LDS file of the same M (or --mc-samples to match)")
    lds = rec.get("methods", {}).get("kfac", {}).get("lds")
    if not isinstance(lds, (int, float)):
        raise ValueError(f"--lds-json {file} holds no K-FAC LDS (methods.kfac.lds)")
    return float(lds)


@register
def add_bench_compressed(sub: argparse._SubParsersAction) -> None:
    p = subcommand(
        sub,
        "bench-compressed",
        cmd_bench_compressed,
        help="fidelity and speed of the compressed K-FAC bank against the stored one (gallery queries)",
        description="Needs the stored K-FAC bank of the preset (python -m engine build --methods kfac). "
        "Writes assets/results/compressed_<preset>.json.",
    )
    p.add_argument("--cache-root", default=None, help="cache folder holding the stored K-FAC bank (read only)")
    p.add_argument("--mc-samples", type=at_least(1), default=None, help="M of the stored bank (default: preset's)")
    p.add_argument("--ratios", type=ratio_list, default=(8.0, 32.0, 128.0),
                   help="target compression ratios, each at least 1 (default 8,32,128)")
    p.add_argument("--projections", default="eigen,gaussian", help="projection kinds (default eigen,gaussian)")
    # at least 1: 0 ranked every non-candidate at -inf, a negative count gave negative times (QA 27 #1)
    p.add_argument("--candidates", type=at_least(1), default=256, help="re-ranked candidates per end (default 256)")
    p.add_argument("--build-examples", type=at_least(1), default=16,
                   help="examples whose hooks-projected gradients time the build (default 16)")
    p.add_argument("--lds-json", default=None, help="LDS results of the full bank (its kfac entry is copied)")
    p.add_argument("--lds-run", default=None,
                   help="LDS run folder with its trained subset models (e.g. runs/lds/digits): LDS per variant")
    p.add_argument("--lds-partial", action="store_true",
                   help="with --lds-run: a PRELIMINARY LDS on the subset models trained so far (>= 3)")
    p.add_argument("--out", default=None, help="output JSON (default assets/results/compressed_<preset>.json)")


def cmd_bench_compressed(args: argparse.Namespace) -> int:
    from ..attribution.session import AttributionSession
    from ..bench.compressed import run_compressed_digits, save

    try:  # every option before any work (QA 27 #10: bad ones failed after the 32 query gradients)
        kinds = _projections(args.projections)
        if args.lds_partial and not args.lds_run:
            raise ValueError("--lds-partial needs --lds-run")
        if args.out:
            check_output_file(Path(args.out), "--out")
        preset, ckpt, device = resolve(args)
        config = preset.attribution
        if args.mc_samples is not None:
            config = dataclasses.replace(config, mc_samples=args.mc_samples)
        config = dataclasses.replace(config, kfac_bank="stored")
        lds = _lds_full(args.lds_json, config.mc_samples)
        session = AttributionSession(preset, checkpoint=ckpt, device=device, cache_root=args.cache_root,
                                     config=config, auto_build=False)
        if not session.method("kfac").is_built(session.ctx):
            raise RuntimeError(f"no stored K-FAC bank for M={config.mc_samples} under {session.cache_root}: "
                               f"build it first (`{session.build_command(['kfac'])} --kfac-bank stored`)")
        # a missing or foreign --lds-run is refused first thing in run_compressed_digits, before any work
        record = run_compressed_digits(session, args.ratios, kinds, args.candidates,
                                       build_examples=args.build_examples, lds_full=lds,
                                       lds_run=Path(args.lds_run) if args.lds_run else None,
                                       lds_partial=args.lds_partial, lds_flag="--lds-run")
    except (ValueError, RuntimeError) as e:
        return fail(e)
    out = Path(args.out) if args.out else ASSETS / "results" / f"compressed_{preset.name}.json"
    save(record, out)
    print(f"wrote {out}")
    return 0


@register
def add_bench_scale(sub: argparse._SubParsersAction) -> None:
    # not ``subcommand``: its --preset, --checkpoint and --data-root did nothing here (the model is always the
    # CIFAR preset's, randomly initialised, on synthetic images; QA 27 #11), so only --device is taken
    p = sub.add_parser(
        "bench-scale",
        help="K-FAC banks at CIFAR scale on SYNTHETIC images: gradient throughput, bytes, build and query time",
        description="The CIFAR-preset U-Net (35.7M parameters, random init) on synthetic 32x32 images "
        "(no CIFAR needed: timings do not depend on content). Prints sizes in KiB/MiB/GiB (2^10 bytes each step) and "
        "times in ms/s; writes assets/results/bench_scale.json (its config.units names each key's unit).",
    )
    # no options for these, but resolve() reads them: --device is then resolved (and checked) as every command's
    p.set_defaults(func=cmd_bench_scale, preset="digits", checkpoint=None, data_root=None)
    p.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--sizes", default="2,4", help="N of the timed compressed builds (default 2,4)")
    # sizes and batches are refused while parsing: --grad-batch 0 ended in a traceback after 11 s, a negative
    # --factor-rows was taken as "not timed" (QA 27 #5)
    p.add_argument("--factor-rows", type=at_least(0), default=0,
                   help="(example, draw) rows for timing the K-FAC factor pass (default 0: not timed)")
    p.add_argument("--scan-sizes", default="256,1024,4096", help="N of the timed bank scans (default 256,1024,4096)")
    p.add_argument("--mc", type=at_least(1), default=1, help="M draws per example for the timed passes (default 1)")
    p.add_argument("--ratio", type=ratio, default=128.0, help="compression ratio, at least 1 (default 128)")
    p.add_argument("--projection", default="gaussian", choices=("eigen", "gaussian"),
                   help="projection of the compressed bank: seeded gaussian or top eigenvectors of the factors")
    p.add_argument("--grad-batch", type=at_least(1), default=2,
                   help="examples per per-example-gradient call (default 2; tens keep a GPU busy)")
    p.add_argument("--jvp-batch", type=at_least(1), default=2,
                   help="examples per forward-mode directional-derivative call (the re-ranking alternative)")
    p.add_argument("--out", default=None, help="output JSON (default assets/results/bench_scale.json)")


def cmd_bench_scale(args: argparse.Namespace) -> int:
    try:  # before the model is built
        sizes, scan_sizes = int_list(args.sizes, "--sizes"), int_list(args.scan_sizes, "--scan-sizes")
        out = Path(args.out) if args.out else ASSETS / "results" / "bench_scale.json"
        check_output_file(out, "--out")
    except ValueError as e:
        return fail(e)
    _, _, device = resolve(args)
    import torch

    from ..bench.scale import run_bench_scale

    torch.set_num_threads(max(1, torch.get_num_threads()))
    record = run_bench_scale(sizes, scan_sizes, args.mc, args.ratio, args.projection,
                             factor_rows=args.factor_rows, device=device,
                             grad_batch=args.grad_batch, jvp_batch=args.jvp_batch)
    out.parent.mkdir(parents=True, exist_ok=True)
    from .. import files

    files.save_json(out, record)  # atomically, as every results file
    print(f"wrote {out}")
    return 0
