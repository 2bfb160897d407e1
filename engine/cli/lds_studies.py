"""Studies on a finished LDS run: ``lds-ablation`` (other settings against the same retrained models)
and ``lds-best`` (every method at its best setting over the run and its ablations).

The work is ``engine.evaluation.lds_ablation.run_ablations`` and ``engine.evaluation.lds_best
.update_best_settings``; ``scripts/lds_ablation.py`` and ``scripts/lds_best_settings.py`` call these
subcommands.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import TRUE_MC_SAMPLES
from ..paths import REPO_ROOT
from .common import at_least, register, resolve, subcommand


@register
def add_lds_ablation(sub: argparse._SubParsersAction) -> None:
    p = subcommand(
        sub,
        "lds-ablation",
        cmd_lds_ablation,
        help="LDS of other settings on an LDS run's subsets, models and queries",
        description="Scores variants of the attribution settings (draws, TRAK's k, K-FAC blocks, factor "
        "draws, M, query draws, the bank's int8 grid) with the LDS protocol against an existing run's retrained "
        "subset models; the run folder is only read. Writes <results>/lds_<preset>_ablation_<name>.json.",
    )
    p.add_argument("--run", required=True, help="LDS run folder (attribution-engine lds --out), read only")
    p.add_argument("--ablations", default=None,
                   help="comma list of ablations (default: all; a wrong name is answered with the list)")
    p.add_argument("--cache-root", default=str(REPO_ROOT / "cache-ablation"), help="caches of the variants (default <repo>/cache-ablation)")
    p.add_argument("--baseline-cache", default=None, help="read-only cache with the default settings built: a variant uses it when it holds all the variant needs, and copies from it the caches the variant shares (e.g. the K-FAC factors of a bank-grid variant)")
    p.add_argument("--out", default=str(REPO_ROOT / "runs" / "lds_ablation"), help="scores and measurements (default <repo>/runs/lds_ablation)")
    p.add_argument("--results", default=str(REPO_ROOT / "assets" / "results"), help="where the ablation JSON goes (default <repo>/assets/results, beside the shipped results)")
    p.add_argument("--subsets", type=at_least(1), default=32, help="the run's subsets (default 32)")
    p.add_argument("--seeds", type=int, default=1, help="the run's seeds (default 1)")
    p.add_argument("--fraction", type=float, default=0.5, help="the run's subset fraction (default 0.5)")
    p.add_argument("--queries", type=at_least(1), default=32, help="the run's queries to score (default 32)")
    p.add_argument("--true-mc-samples", "--mc-samples", dest="mc_samples", type=at_least(1), default=TRUE_MC_SAMPLES,
                   help=f"Monte Carlo draws per TRUE measurement of the run's models (default {TRUE_MC_SAMPLES}); not the "
                   "attribution's M, which each ablation sets")
    p.add_argument("--measurement", default="loss", help="measurement (default loss)")
    p.add_argument("--build-only", action="store_true", help="only build the variants' caches")


def cmd_lds_ablation(args: argparse.Namespace) -> int:
    from ..evaluation.lds import LDSConfig
    from ..evaluation.lds_ablation import ABLATIONS, AblationJob, run_ablations
    from ..evaluation.runs import MeasureSpec

    preset, ckpt, device = resolve(args)
    job = AblationJob(
        run=Path(args.run),
        checkpoint=ckpt,
        ablations=tuple(a.strip() for a in args.ablations.split(",") if a.strip()) if args.ablations else tuple(ABLATIONS),
        cache_root=Path(args.cache_root),
        baseline_cache=Path(args.baseline_cache) if args.baseline_cache else None,
        out=Path(args.out),
        results=Path(args.results),
        lds=LDSConfig(subsets=args.subsets, seeds=args.seeds, fraction=args.fraction),
        queries=args.queries,
        spec=MeasureSpec(measurement=args.measurement, mc_samples=args.mc_samples),
        device=device,
        build_only=args.build_only,
        attribution=preset.attribution,
    )
    try:
        written = run_ablations(job)
    except RuntimeError as e:  # too few finished models: not an error of the input, a wait
        print(e)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


@register
def add_lds_best(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lds-best",
        help="every method at its best setting over an LDS run and its ablations",
        description="Picks, per method, the variant and damping with the highest LDS among the run's results "
        "and its comparable ablations, writes it as best_settings into <results>/lds_<preset>_<measurement>.json "
        "and prints the table.",
    )
    p.add_argument("--results", default=str(REPO_ROOT / "assets" / "results"),
                   help="folder with the run's and ablations' JSON (default <repo>/assets/results)")
    p.add_argument("--preset", default="digits",
                   help="preset name in the result files' names, or a preset .json file (its name) (default digits)")
    p.add_argument("--measurement", default="loss", help="measurement (default loss)")
    p.add_argument("--ablations", default=None, help="comma list (default: every ablation file of the preset)")
    p.add_argument("--attribution-mc", type=at_least(1), default=None,
                   help="the run made with `lds --attribution-mc M` (its lds_<preset>_<measurement>_attribution_m<M>"
                        ".json; default: the headline run)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the table without writing best_settings (the default --results is the shipped one)")
    p.set_defaults(func=cmd_lds_best)


def cmd_lds_best(args: argparse.Namespace) -> int:
    from ..config import get_preset
    from ..evaluation.lds_best import table, update_best_settings

    names = [a.strip() for a in args.ablations.split(",") if a.strip()] if args.ablations else None
    # a .json preset as every other --preset takes it (its name is in the file names); any other text is a
    # name as it is: result files of a preset not shipped here are still read by that name
    preset = get_preset(args.preset).name if args.preset.endswith(".json") else args.preset
    path, summary, notes = update_best_settings(Path(args.results), preset, args.measurement, names,
                                                write=not args.dry_run, attribution_mc=args.attribution_mc)
    for note in notes:
        print(note)
    print(table(summary))
    for what in summary["skipped"]:
        print(f"left out of the comparison: {what}")
    print(f"--dry-run: {path} left as it was" if args.dry_run else f"wrote best_settings into {path}")
    return 0


__all__ = ["add_lds_ablation", "add_lds_best"]
