"""Subcommands ``lds`` and ``retrain-top``: the paper's two evaluations (section 4, App. G.5-G.6).

Both are resumable: every retrained model is saved as it finishes and skipped on rerun,
every true measurement is cached beside its model, and per-query scores are cached in
the run folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..config import TRUE_MC_SAMPLES
from .common import add_replace_results, at_least, register, resolve, subcommand, with_attribution_source


def _names(text: str | None) -> tuple[str, ...] | None:
    """'kfac, trak' -> ('kfac', 'trak'); None or empty -> None."""
    names = tuple(s.strip() for s in (text or "").split(",") if s.strip())
    return names or None



@register
def add_lds(sub: argparse._SubParsersAction) -> None:
    p = subcommand(
        sub,
        "lds",
        cmd_lds,
        help="Linear Data-modelling Score: retrain on random subsets, measure, correlate",
        description="LDS benchmark (paper section 4, eq. 13). Draws K random subsets of a fraction "
        "alpha of the training set (saved in OUT/subsets.npz), trains R seeds on each with the full "
        "model's recipe and steps scaled by alpha (OUT/models/kKKK_rR, resumable, finished models "
        "skipped), measures the Q queries on every model with common random numbers (cached), scores "
        "the queries with each method on the full model and writes the LDS per method with a "
        "bootstrap 95% interval, damping sweeps, a table and a figure.",
    )
    p.add_argument(
        "--subsets", type=at_least(1), default=None, help="number of random subsets K (default 32; quick 4)"
    )
    p.add_argument("--seeds", type=int, default=1, help="training seeds R per subset (default 1)")
    p.add_argument("--fraction", type=float, default=0.5, help="subset fraction alpha (default 0.5)")
    p.add_argument("--subset-seed", type=int, default=0, help="seed of the subset draw (default 0)")
    p.add_argument("--queries", type=at_least(1), default=None, help="number of queries Q (default 32; quick 2)")
    p.add_argument(
        "--measurement",
        default="loss",
        help="measurement to predict: loss, elbo, loss@t=NNN, ... (default loss)",
    )
    p.add_argument("--methods", default=None, help="comma list of methods (default: all)")
    p.add_argument(
        "--true-mc-samples", "--mc-samples", dest="mc_samples", type=at_least(1), default=None,
        help=f"Monte Carlo draws per TRUE measurement of each retrained model (default {TRUE_MC_SAMPLES}; quick 64); not the "
        "attribution's M, which is --attribution-mc (in build and query, --mc-samples is that M)"
    )
    p.add_argument("--no-sweep", action="store_true", help="skip the damping sweeps")
    p.add_argument("--workers", type=at_least(1), default=1, help="parallel training processes (default 1)")
    p.add_argument(
        "--quick", action="store_true", help="tiny CI-sized run (tiny model, 64 digits, 4 subsets)"
    )
    p.add_argument("--out", default=None, help="run folder (default runs/lds/<preset>)")
    p.add_argument("--results", default=None, help="results folder (default assets/results)")
    add_replace_results(p)
    p.add_argument("--train-only", action="store_true", help="only train the subset models")
    p.add_argument(
        "--no-train",
        action="store_true",
        help="do not train: measure and score the models finished so far (safe beside a --train-only run)",
    )
    p.add_argument("--cache-root", default=None, help="attribution cache root (default: the app's, cache/)")
    p.add_argument(
        "--attribution-mc",
        type=at_least(1),
        default=None,
        help="MC draws M for attribution gradients (default: preset's)",
    )


def cmd_lds(args: argparse.Namespace) -> int:
    from ..evaluation.lds import LDSConfig
    from ..evaluation.lds_run import LDSRun, run_lds
    from ..evaluation.setup import resolve_setup

    t0 = time.time()
    preset, ckpt, device = resolve(args)
    preset = with_attribution_source(args, preset, ckpt)  # the named preset's, else the checkpoint's own
    setup = resolve_setup(preset, ckpt, device, "lds", out=args.out, results=args.results, quick=args.quick)
    cfg = LDSConfig(
        subsets=args.subsets if args.subsets is not None else (4 if setup.quick else 32),
        seeds=args.seeds,
        fraction=args.fraction,
        subset_seed=args.subset_seed,
    )
    run = LDSRun(
        queries=args.queries,
        measurement=args.measurement,
        methods=_names(args.methods),
        mc_samples=args.mc_samples,
        sweep=not args.no_sweep,
        workers=args.workers,
        cache_root=args.cache_root,
        attribution_mc=args.attribution_mc,
        train=not args.no_train,
        evaluate=not args.train_only,
        replace_results=args.replace_results,
    )
    rc = run_lds(setup, cfg, run)
    print(f"lds: {time.time() - t0:.1f} s this run")
    return rc


@register
def add_retrain_top(sub: argparse._SubParsersAction) -> None:
    p = subcommand(
        sub,
        "retrain-top",
        cmd_retrain_top,
        help="retrain without each method's top proponents (and a random control), measure the change",
        description="Retraining without top influences (paper section 4, App. G.6). For each query and "
        "method removes the top FRACTION*N proponents, retrains with the full recipe and the same "
        "number of steps, and reports the change of the measurement versus the full model (same MC "
        "draws); a random removal of the same size is the control. Resumable.",
    )
    p.add_argument("--query", required=True, help="comma list of queries, e.g. gallery:0,gallery:1")
    p.add_argument("--fraction", type=float, default=0.02, help="fraction of N removed (default 0.02)")
    p.add_argument("--methods", default=None, help="comma list of methods (default: every available one)")
    p.add_argument("--measurement", default="loss", help="measurement (default loss)")
    p.add_argument(
        "--true-mc-samples", "--mc-samples", dest="mc_samples", type=at_least(1), default=TRUE_MC_SAMPLES,
        help=f"Monte Carlo draws per TRUE measurement of each retrained model (default {TRUE_MC_SAMPLES}); not the attribution's "
        "M, which is the preset's here"
    )
    p.add_argument("--workers", type=at_least(1), default=1, help="parallel training processes (default 1)")
    p.add_argument("--steps", type=at_least(1), default=None, help="training steps (default: the full model's)")
    p.add_argument("--out", default=None, help="run folder (default runs/retrain_top/<preset>)")
    p.add_argument("--results", default=None, help="results folder (default assets/results)")
    add_replace_results(p)
    p.add_argument("--cache-root", default=None, help="attribution cache root (default: the app's, cache/)")
    p.add_argument(
        "--no-train",
        action="store_true",
        help="measure only, from models already trained (e.g. the queries a still-running run has finished); "
        "stops if any is missing",
    )


def cmd_retrain_top(args: argparse.Namespace) -> int:
    from ..evaluation.retrain_top_run import RetrainTopConfig, run_retrain_top
    from ..evaluation.setup import resolve_setup
    from ..validation import InvalidSettingError

    t0 = time.time()
    if not _names(args.query):  # QA 48 #2: "" or ",", before the model and the session are opened
        raise InvalidSettingError("--query names no query")
    preset, ckpt, device = resolve(args)
    preset = with_attribution_source(args, preset, ckpt)  # the named preset's, else the checkpoint's own
    setup = resolve_setup(preset, ckpt, device, "retrain_top", out=args.out, results=args.results, steps=args.steps)
    cfg = RetrainTopConfig(
        queries=_names(args.query) or (),
        methods=_names(args.methods),
        fraction=args.fraction,
        measurement=args.measurement,
        mc_samples=args.mc_samples,
        workers=args.workers,
        steps=args.steps,
        cache_root=args.cache_root,
        train=not args.no_train,
        replace_results=args.replace_results,
    )
    rc = run_retrain_top(setup, cfg)
    print(f"retrain-top: {time.time() - t0:.1f} s this run")
    return rc


__all__ = ["add_lds", "add_retrain_top", "main", "Path"]


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.cli.evaluate lds|retrain-top ...``: these subcommands alone.

    Long background runs use this entry, so that they do not depend on other plugins.
    """
    parser = argparse.ArgumentParser(prog="attribution-engine")
    sub = parser.add_subparsers(dest="command", required=True)
    add_lds(sub)
    add_retrain_top(sub)
    args = parser.parse_args(argv)
    from .common import run_handler

    return run_handler(args)


if __name__ == "__main__":
    sys.exit(main())
