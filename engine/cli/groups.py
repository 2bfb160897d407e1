"""CLI subcommands ``group``, ``reverse``, ``copy-check``, ``group-retrain`` and ``group-bench`` (issue 15).

Thin: options become typed arguments of ``engine.attribution.group_attribution``,
``engine.attribution.pool``, ``engine.attribution.copycheck``, ``engine.evaluation.group_retrain`` and
``engine.bench.groups``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .. import jsonio
from ..attribution.methods import METHODS, names_of_kind, parse_methods
from ..attribution.signs import removed_words, reverse_caveat
from ..config import COPY_CHECK, TRUE_MC_SAMPLES, CopyCheckConfig
from .attribution import _add_attribution_options, open_session, parse_damping
from .common import add_replace_results, at_least, fail, register, subcommand

QUERIES_HELP = "gallery (the checkpoint's 32 samples) | pool:N (N samples drawn once, then cached), default gallery"


def _add_query_set_options(p: argparse.ArgumentParser, methods: bool = True) -> None:
    """The query set, measurement, methods and damping options of group, reverse and copy-check; ``methods=False``
    keeps ``--methods`` out of the help (copy-check takes one ``--method``, and refuses ``--methods`` in words)."""
    p.add_argument("--queries", default="gallery", help=QUERIES_HELP)
    p.add_argument("--pool-seed", type=int, default=0, help="seed of a generated pool (default 0)")
    p.add_argument(
        "--pool-dir",
        default=None,
        help="folder of generated pools and their score matrices (default: <cache root>/pools)",
    )
    p.add_argument(
        "--measurement",
        default="loss",
        help="loss | loss@t=NNN (paper's 1-based t) | elbo | elbo-exact | square-norm | trajectory (gallery only) "
        "(default loss)",
    )
    p.add_argument("--methods", default=None, help="influence methods, comma list (default: every influence method)"
                   if methods else argparse.SUPPRESS)
    p.add_argument(
        "--damping", action="append", default=None, metavar="NAME=VALUE",
        help="damping of one influence method, e.g. kfac=1e-6 (repeatable; default: the preset's)",
    )
    p.add_argument("--auto-build", action="store_true", help="build missing caches instead of reporting them")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    _add_attribution_options(p)


def _damping(args: argparse.Namespace) -> dict[str, float]:
    return parse_damping(args.damping)


def _pool_dir(args: argparse.Namespace, session) -> Path:
    return Path(args.pool_dir) if args.pool_dir else Path(session.cache_root) / "pools"


def _run_group(args: argparse.Namespace, group_specs: list[str]):
    """Session and one result per group, all from every method's matrix over the query set, computed
    once (shared by group and reverse): a further group costs one sum over the matrix's columns."""
    from ..attribution.group_attribution import (
        check_influence_methods,
        group_attribution,
        refuse_similarities,
    )
    from ..attribution.groups import parse_group
    from ..attribution.pool import parse_query_set, pool_size_of
    from ..attribution.terminal_progress import terminal_progress

    methods = parse_methods(args.methods)
    refuse_similarities(methods)  # before the session loads (~10 s)
    damping = _damping(args)
    session = open_session(args)
    groups = [parse_group(spec, session.dataset) for spec in group_specs]  # every spec checked before any work
    # a pool takes minutes to draw: refused first (its spec and seed checked before) when no method asked for can
    # score it
    if pool_size_of(args.queries, args.pool_seed) is not None and not args.auto_build:
        asked = check_influence_methods(session, methods)
        unbuilt = {m: session.unbuilt_status(m, {}) for m in asked if not session.method(m).is_built(session.ctx)}
        if unbuilt and len(unbuilt) == len(asked):  # QA 27 #17: it drew the pool, then said "not built"
            raise ValueError("no method asked for can score: " + "; ".join(
                f"{m}: {reason}" for m, (_, reason) in unbuilt.items()) + " (or add --auto-build)")
    pool_dir = _pool_dir(args, session)
    qset = parse_query_set(session, args.queries, pool_dir, args.pool_seed, progress=True)
    cache = pool_dir if qset.name.startswith("pool") else None

    def score():  # the query gradients of a pool take seconds per 100 samples: a bar (QA 25 #1: 12-22 s silent)
        with terminal_progress(f"scoring {qset.name}") as progress:
            return group_attribution(session, groups[0], qset, args.measurement, methods, damping, cache, progress)

    result = score()
    if not args.auto_build:  # a fresh clone answers over the gallery from the shipped scores, as the app does
        from ..attribution.precomputed_groups import NOTE, fill_unbuilt_groups

        if filled := fill_unbuilt_groups(session, result, damping):
            print(f"note: {', '.join(filled)}: {NOTE}; `{session.build_command(filled)}` computes them live",
                  file=sys.stderr)
    # --auto-build after that first pass, which refuses a bad measurement or query set before minutes of
    # building; ``session.build_missing`` shows a progress bar on stderr
    if args.auto_build and session.build_missing(check_influence_methods(session, methods)):
        result = score()
    for name, r in result.methods.items():
        if r.status != "ok":
            print(f"warning: {name} {r.status}: {r.reason}", file=sys.stderr)
        elif r.warning:  # a damping below the method's resolution floor, as query says it
            print(f"warning: {name}: {r.warning}", file=sys.stderr)
    if not result.ok():
        raise RuntimeError("no method could score these queries (see the warnings above)")
    return session, [dataclasses.replace(result, group=g) for g in groups]


def _set_words(qset) -> str:
    """``pool:256 (pool seed 3)``: a pool's seed is what ``query --query pool:I --pool-seed S`` needs."""
    return qset.name + ("" if qset.seed is None else f" (pool seed {qset.seed})")


def _print_json(objs: list[dict], session=None) -> None:
    """One group's object as before; several (``--remove`` repeated): ``{"groups": [one per group]}``.  With
    ``session``, each object also says which model scored it, with how many draws and which cache settings
    (as ``query --json``: ``engine.attribution.provenance``)."""
    if session is not None:
        from ..attribution.provenance import session_settings

        objs = [{**obj, **session_settings(session)} for obj in objs]
    print(jsonio.dumps(objs[0] if len(objs) == 1 else {"groups": objs}, indent=2))


# --- group -------------------------------------------------------------------------------


@register
def add_group(sub: argparse._SubParsersAction) -> None:
    p = subcommand(
        sub,
        "group",
        cmd_group,
        help="predicted change of each query's measurement if a group of training images were removed",
        description="First-order influence is additive: removing a group changes a query's measurement by "
        "the sum of its members' scores (same sign and 1/N scale; positive = removing the group would raise "
        "the loss, i.e. the group supports the query). Printed per method for every query of the set.",
    )
    p.add_argument(
        "--remove", action="append", required=True,
        help="label:C | train:I,J,K (ranges 10-20) | file:PATH (JSON list or text); repeat the option for "
        "several groups, each answered on its own (JSON: {\"groups\": [...]})",
    )
    p.add_argument("--strongest", type=int, default=3,
                   help="strongest group members to list per query (text output; 0: none; default 3)")
    _add_query_set_options(p)


def cmd_group(args: argparse.Namespace) -> int:
    try:
        if args.strongest < 0:  # a negative k was taken as a slice: all members but the last |k|
            raise ValueError(f"--strongest must be 0 (none listed) or more, got {args.strongest}")
        session, results = _run_group(args, args.remove)
    except (ValueError, RuntimeError) as e:
        return fail(e)
    if args.json:
        _print_json([r.to_json() for r in results], session)
        return 0
    labels = session.labels
    for n, result in enumerate(results):
        g = result.group
        print(("\n" if n else "") + f"group {g.spec}: {g.description}; measurement {result.measurement}; "
              f"queries {_set_words(result.qset)}")
        if size_note := result.size_caveat():
            print(f"caveat: {size_note}")
        for name in result.ok():
            changes = result.changes(name)
            used = result.measurement_of(name)
            print(f"\n[{name}] predicted change if removed (positive: the group supports the query)"
                  + (f"; uses the {used} measurement" if used != result.measurement else ""))
            if result.note(name):
                print(f"  ({result.note(name)})")
            if result.methods[name].reason == "precomputed":
                print("  (the checkpoint's precomputed gallery scores: see the note on stderr)")
            for q, c in enumerate(changes):
                lab = result.qset.labels[q]
                line = f"  {result.qset.names[q]:<12} label {'-' if lab < 0 else lab}  {c:+.4e}"
                if args.strongest:
                    line += "   strongest: " + "  ".join(
                        f"#{i}" + (f"({labels[i]})" if labels is not None else "") + f" {s:+.2e}"
                        for i, s in result.strongest(name, q, args.strongest)
                    )
                print(line)
    return 0


# --- reverse -----------------------------------------------------------------------------


@register
def add_reverse(sub: argparse._SubParsersAction) -> None:
    p = subcommand(
        sub,
        "reverse",
        cmd_reverse,
        help="the generated samples a training image (or a group) supports most",
        description="Ranks the queries (the gallery or a generated pool) by how much removing the training "
        "image (or group) would raise their measurement: tau_i(q) for one image, the group's sum otherwise. "
        "All queries are scored in one batched product per method.",
    )
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--train", type=int, help="training index")
    who.add_argument("--remove", action="append",
                     help="a group instead: label:C | train:I,J,K | file:PATH (repeat the option for several)")
    p.add_argument("--top-k", type=int, default=10, help="samples to list per method (default 10)")
    _add_query_set_options(p)


def cmd_reverse(args: argparse.Namespace) -> int:
    try:
        if args.top_k < 1:
            raise ValueError("--top-k must be at least 1")
        specs = [f"train:{args.train}"] if args.train is not None else args.remove
        session, results = _run_group(args, specs)
    except (ValueError, RuntimeError) as e:
        return fail(e)
    if args.json:
        _print_json([r.reverse_json(args.top_k) for r in results], session)
        return 0
    for n, result in enumerate(results):
        print(("\n" if n else "") + f"what {result.group.spec} supports most ({result.group.description}); "
              f"queries {_set_words(result.qset)}")
        if size_note := result.size_caveat():
            print(f"caveat: {size_note}")
        for name in result.ok():
            used = result.measurement_of(name)
            print(f"\n[{name}] removing it would raise these samples' {used} the most"
                  + (f" (it uses the {used} measurement whatever is asked)" if used != result.measurement else ""))
            if result.note(name):
                print(f"  ({result.note(name)})")
            if result.methods[name].reason == "precomputed":
                print("  (the checkpoint's precomputed gallery scores: see the note on stderr)")
            ranked = result.ranking(name, args.top_k)
            caveat = reverse_caveat([s.change for s in ranked], removed_words(result.group.size))
            if caveat:
                print(f"  ({caveat})")
            for s in ranked:
                print(f"  {s.rank:>3}. {s.query:<12} label {'-' if s.label is None else s.label}  {s.change:+.4e}")
    return 0


# --- copy check --------------------------------------------------------------------------


@register
def add_copy_check(sub: argparse._SubParsersAction) -> None:
    p = subcommand(
        sub,
        "copy-check",
        cmd_copy_check,
        help="which generated samples look like near-copies of a training image (evidence, not proof)",
        description="For each sample: the top-1 and top-5 shares of its positive influence mass, the pixel "
        "distance to its nearest training image and that distance relative to the next "
        f"{COPY_CHECK.neighbours} nearest (--neighbours); flagged as a near-copy when the relative distance is "
        f"below {COPY_CHECK.near_copy_ratio} (--near-copy-ratio; engine/attribution/copycheck.py).",
    )
    p.add_argument("--method", default="kfac", help="influence method for the concentration (default kfac)")
    p.add_argument("--top-k", type=int, default=10, help="samples to list, most copy-like first (default 10)")
    p.add_argument("--neighbours", type=at_least(1), default=COPY_CHECK.neighbours,
                   help="next-nearest training images the typical distance averages "
                        f"(default {COPY_CHECK.neighbours}; fewer when the training set is smaller)")
    p.add_argument("--near-copy-ratio", type=_ratio_arg, default=COPY_CHECK.near_copy_ratio,
                   help="flag a sample whose nearest training image is less than this times as far as the next "
                        f"nearest are on average, in (0, 1) (default {COPY_CHECK.near_copy_ratio})")
    _add_query_set_options(p, methods=False)


def _ratio_arg(text: str) -> float:
    """An argparse type: a number in (0, 1), refused while parsing."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    problem = CopyCheckConfig.ratio_problem(value)  # the rule's own bounds
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def cmd_copy_check(args: argparse.Namespace) -> int:
    from ..attribution.copycheck import (
        CAVEAT,
        ESTIMATED_SHARES,
        copy_check,
        explain,
        neighbour_count,
        training_flag_rate,
    )

    try:
        if args.top_k < 1:
            raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
        if args.methods is not None:  # the shared query-set options include --methods, which copy-check ignored
            raise ValueError("copy-check takes one influence method with --method (default kfac); "
                             "--methods is group's and reverse's")
        names = parse_methods(args.method) or []
        if len(names) != 1:
            raise ValueError(f"copy-check --method takes one method, got {args.method!r}")
        if METHODS[names[0]].kind != "influence":
            raise ValueError(
                f"copy-check --method {names[0]}: a similarity has no influence mass to concentrate on one "
                f"training image; use an influence method ({', '.join(names_of_kind('influence'))})"
            )
        rule = CopyCheckConfig(neighbours=args.neighbours, near_copy_ratio=args.near_copy_ratio)
        args.methods = names[0]
        session, (result,) = _run_group(args, ["train:0"])  # the group is unused: only the matrix matters
        rows = copy_check(
            result.methods[names[0]].scores,
            result.qset.images,
            session.dataset.images,
            result.qset.names,
            result.qset.labels,
            rule,
        )
    except (ValueError, RuntimeError, KeyError) as e:
        return fail(e)
    base = training_flag_rate(session.dataset.images, rule)
    used = neighbour_count(len(session.dataset), rule.neighbours)  # fewer than asked on a small training set
    if args.json:
        from ..attribution.provenance import session_settings

        print(jsonio.dumps({
            **result.qset.identity(),
            "method": names[0],
            # what the shares were computed with, as group and reverse say it (QA round 20: two runs at two
            # dampings could not be told apart)
            **result.damping_json(names[0]),
            "measurement": result.measurement_of(names[0]),
            "flagged": sum(r.near_copy for r in rows),
            "training_flag_rate": base,
            # the near-copy rule that flagged them (engine.config.CopyCheckConfig), and the neighbours it averaged
            # (fewer than asked when the training set is smaller: each row's ``neighbours``; QA 32)
            "rule": {**dataclasses.asdict(rule), "neighbours_used": used},
            "rows": [r.to_dict() for r in rows[: args.top_k]],
            "caveat": CAVEAT,
            **({"note": ESTIMATED_SHARES}
               if result.note(names[0]) else {}),
            **session_settings(session),
        }, indent=2))
        return 0
    flagged = sum(r.near_copy for r in rows)
    print(f"{flagged} of {len(rows)} samples flagged as possible near-copies: nearest training image under "
          f"{rule.near_copy_ratio:g} x the mean distance to the next {used} "
          f"(the same rule flags {base:.1%} of training images against the others)")
    for r in rows[: args.top_k]:
        print("- " + explain(r))
    if result.note(names[0]):
        print(f"note: {ESTIMATED_SHARES}")
    print(CAVEAT)
    return 0


# --- group retraining check ----------------------------------------------------------------


@register
def add_group_retrain(sub: argparse._SubParsersAction) -> None:
    p = subcommand(
        sub,
        "group-retrain",
        cmd_group_retrain,
        help="retrain without whole groups and compare predicted with measured change over the gallery",
        description="For each --remove group: train the full model's recipe without it (resumable; full steps "
        "by default), measure the loss of the 32 gallery samples on both models with 1,024 common draws, and "
        "report each method's Spearman of predicted against measured change. Writes "
        "<results>/group_retrain_<preset>.json.",
    )
    p.add_argument("--remove", action="append", required=True, help="a group (repeat the option): label:C | train:... | file:PATH")
    p.add_argument("--methods", default=None, help="influence methods, comma list (default: every influence method)")
    p.add_argument("--steps", type=at_least(1), default=None, help="training steps (default: the full model's)")
    p.add_argument("--workers", type=at_least(1), default=1, help="models trained in parallel processes (default 1)")
    p.add_argument("--true-mc-samples", type=at_least(1), default=TRUE_MC_SAMPLES,
                   help=f"draws per measured loss (default {TRUE_MC_SAMPLES})")
    p.add_argument("--out", default=None, help="model folder root (default runs/group_retrain/<preset>)")
    p.add_argument("--results", default=None, help="results folder (default assets/results)")
    add_replace_results(p)
    p.add_argument("--no-train", action="store_true", help="only evaluate groups whose model is finished")
    _add_attribution_options(p)


def cmd_group_retrain(args: argparse.Namespace) -> int:
    from ..attribution.group_attribution import check_influence_methods
    from ..evaluation.group_retrain import (
        format_group_retrain,
        planned_settings,
        record_settings,
        run_group_retrain,
    )
    from ..evaluation.setup import check_results_record, check_writable_folder
    from ..files import save_json
    from ..paths import REPO_ROOT

    results = Path(args.results) if args.results else REPO_ROOT / "assets" / "results"
    try:
        if args.out:  # QA 48 #7: said before the session and the training, naming the option
            check_writable_folder(args.out, "--out")
        check_writable_folder(results, "--results")
        asked = parse_methods(args.methods)
        session = open_session(args)
        methods = check_influence_methods(session, asked)
        path = results / f"group_retrain_{session.preset.name}.json"
        # QA 48 #1: a record of other groups, steps or draws is not replaced silently; said before any training
        check_results_record(path, planned_settings(session, args.remove, methods, args.steps, args.true_mc_samples),
                             record_settings, args.replace_results)
        out = Path(args.out) if args.out else REPO_ROOT / "runs" / "group_retrain" / session.preset.name
        record = run_group_retrain(
            session, args.remove, methods, out, args.steps, args.workers, args.true_mc_samples,
            train=not args.no_train,
        )
    except (ValueError, RuntimeError) as e:
        return fail(e)
    if not record["groups"]:  # --no-train before any model is finished: an empty record replaced the last one
        return fail(ValueError(f"no group's retrained model is finished yet, so nothing was measured; "
                               f"{path} is left as it was"))
    results.mkdir(parents=True, exist_ok=True)
    save_json(path, record, indent=1)
    print(format_group_retrain(record))
    print(f"wrote {path}")
    return 0


# --- figures -------------------------------------------------------------------------------


@register
def add_group_bench(sub: argparse._SubParsersAction) -> None:
    p = subcommand(
        sub,
        "group-bench",
        cmd_group_bench,
        help="figures of group attribution: the class check and the cost of a pool of N",
        description="Draws a pool into <work-dir>/pools (or loads the one an earlier run drew there) and times "
        "it, its attribution matrix (computed afresh in <work-dir>/cold), a group query over it and single "
        "queries side by side; counts per method the classes c for which removing label:c "
        "predicts a larger mean loss increase on samples of class c than on the others. Writes "
        "<results>/groups_<preset>.json.",
    )
    p.add_argument("--methods", default=None, help="influence methods, comma list (default: every influence method)")
    p.add_argument("--pool-size", type=at_least(1), default=256, help="pool size (default 256)")
    p.add_argument("--pool-seed", type=int, default=0, help="pool seed (default 0)")
    p.add_argument("--work-dir", default=None, help="scratch folder (default runs/group_bench/<preset>)")
    p.add_argument(
        "--kfac-factors-only", action="store_true",
        help="only the class check, for K-FAC on the gallery, from its factors (no bank, no pool): "
        "writes <results>/groups_<preset>_class_check_kfac.json",
    )
    p.add_argument("--results", default=None, help="results folder (default assets/results)")
    _add_attribution_options(p)


def cmd_group_bench(args: argparse.Namespace) -> int:
    from ..attribution.group_attribution import check_influence_methods
    from ..bench.groups import class_check_from_factors, run_group_bench
    from ..files import save_json
    from ..paths import REPO_ROOT

    try:
        asked = parse_methods(args.methods)
        session = open_session(args)
        methods = check_influence_methods(session, asked)
        work = Path(args.work_dir) if args.work_dir else REPO_ROOT / "runs" / "group_bench" / session.preset.name
        if args.kfac_factors_only:
            record = class_check_from_factors(session)
            print(f"class check, K-FAC on the gallery: holds in {record['holds']} of {record['classes']} classes")
        else:
            record = run_group_bench(session, methods, args.pool_size, args.pool_seed, work)
    except (ValueError, RuntimeError) as e:
        return fail(e)
    results = Path(args.results) if args.results else REPO_ROOT / "assets" / "results"
    suffix = "_class_check_kfac" if args.kfac_factors_only else ""
    path = results / f"groups_{session.preset.name}{suffix}.json"
    save_json(path, record, indent=1)
    print(f"wrote {path}")
    return 0
