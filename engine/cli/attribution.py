"""CLI subcommands ``build`` and ``query`` (the attribution half of ``attribution-engine``).

They are thin: every computation goes through ``engine.attribution.session.AttributionSession``, the
same object the app uses, so the CLI and the app cannot disagree.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .. import jsonio
from ..attribution.methods import METHODS, method_names, names_of_kind, parse_methods
from ..attribution.setting_flags import add_setting_options, apply_settings, setting_changes
from ..validation import (
    check_damping,
)
from .common import (
    at_least,
    build_progress,
    check_output_file,
    fail,
    preset_named,
    register,
    resolve,
    subcommand,
    with_attribution_source,
)
from .query_output import format_result, write_scores

if TYPE_CHECKING:  # the parser must not import torch (tests/test_architecture.py)
    from ..attribution.session import AttributionSession


def _add_attribution_options(p: argparse.ArgumentParser) -> None:
    add_setting_options(p)  # the app takes the same (engine.attribution.setting_flags)
    p.add_argument("--cache-root", default=None, help="cache folder (default: $ATTRIBUTION_CACHE or cache/ under the repository)")


class OneQuery(argparse.Action):
    """``--query`` may be given once: a second one silently replaced the first (QA round 20), and a script
    that meant to ask two queries got one answer and exit 0."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)!r} and {values!r}); one "
                         "query per call: for many images use group/reverse --queries or a Python session "
                         "(README, 'From Python')")
        setattr(namespace, self.dest, values)


def parse_damping(specs: list[str] | None) -> dict[str, float]:
    """``--damping NAME=VALUE`` (repeatable) -> {name: value}.

    A bare VALUE is K-FAC's damping, as ``--damping`` meant before it took names (kept for one
    release, like ``--trak-damping``/``--dtrak-damping``).  Unknown names and values that are
    not numbers: ValueError; values that are not finite and in (0, MAX_DAMPING]: InvalidSettingError
    (``engine.validation.check_damping``), whichever methods run.  A similarity (clip, pixel), or an
    influence method without a ``damping_field`` or ``damping_default``, has no damping: its scores would ignore the value, so
    asking for one is refused rather than dropped.
    """
    out: dict[str, float] = {}
    valid = method_names()
    for spec in specs or []:
        name, sep, value = spec.partition("=")
        if not sep:
            name, value = "kfac", spec
        name = name.strip().lower()
        if name not in valid:
            raise ValueError(f"--damping {spec!r}: unknown method {name!r}; valid methods: {', '.join(valid)}")
        if METHODS[name].kind != "influence":
            raise ValueError(f"--damping {spec!r}: {name} has no damping (it is a {METHODS[name].kind}, not an "
                             "influence method)")
        if name in out:  # the last one silently won (QA round 20)
            raise ValueError(f"--damping {spec!r}: {name}'s damping is given twice")
        if not METHODS[name].takes_damping():
            raise ValueError(f"--damping {spec!r}: {name} has no damping (its scores do not depend on one)")
        try:
            lam = float(value)
        except ValueError:
            raise ValueError(f"--damping {spec!r}: {value!r} is not a number") from None
        # checked here, not only when the method runs: a typo for a method left out of --methods is still a typo
        out[name] = check_damping(lam, f"{name} damping")
    return out


def open_session(args: argparse.Namespace, auto_build: bool = False) -> AttributionSession:
    """An AttributionSession from the common CLI options."""
    from ..attribution.session import AttributionSession

    preset, ckpt, device = resolve(args)
    named = preset_named(args)
    # whose attribution settings: the named preset's, else the checkpoint's own (QA 33: digits' for any model)
    base = with_attribution_source(args, preset, ckpt).attribution
    # ranges (M >= 1, a known bank kind, ...) are engine.validation.check_attribution_config's, which the
    # session runs on this config before any work: one refusal, exit 2, naming the flag
    config = apply_settings(base, setting_changes(args), note=lambda line: print(line, file=sys.stderr))
    # the default checkpoint is left to the session (the same folder), so the commands it prints name
    # --checkpoint only when the user did
    return AttributionSession(
        preset, checkpoint=ckpt if args.checkpoint else None, device=device, cache_root=getattr(args, "cache_root", None), config=config,
        auto_build=auto_build, preset_spec=args.preset, preset_named=named, attribution_base=base,
    )


# --- build ---------------------------------------------------------------------------------


@register
def add_methods(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "methods",
        help="list the attribution methods and K-FAC bank kinds this installation offers",
        description="Every attribution method (name for --methods, kind, title, the file that declares it) and "
        "K-FAC bank kind (for --kfac-bank), read from engine/attribution/methods/ without importing it, so "
        "a method added as one file is listed, and a file that could not be read is named on stderr.",
    )
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.set_defaults(func=cmd_methods)


def cmd_methods(args: argparse.Namespace) -> int:
    from .. import jsonio
    from ..attribution.bank_kinds import bank_modes, bank_notes
    from ..attribution.methods import declaration, method_names, source_file

    rows = []
    for name in method_names():
        d = declaration(name)  # None: registered by code outside the package (a script, a test)
        rows.append({"name": name, "kind": d.kind if d else None, "title": d.title if d else None,
                     "file": source_file(name)})
    notes = bank_notes()
    kinds = [{"name": k, "note": notes.get(k)} for k in bank_modes() if k != "auto"]
    if args.json:
        print(jsonio.dumps({"methods": rows, "kfac_bank_kinds": kinds}, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    print("methods (--methods):")
    for r in rows:
        print(f"  {r['name']:<{width}}  {r['kind'] or '?':<10}  {r['title'] or '-':<26}  {r['file'] or '(registered by code)'}")
    print("K-FAC bank kinds (--kfac-bank; auto picks stored or compressed by size):")
    for k in kinds:
        print(f"  {k['name']}" + (f": {k['note']}" if k["note"] else ""))
    return 0


@register
def add_build(sub: argparse._SubParsersAction) -> None:
    p = subcommand(
        sub,
        "build",
        cmd_build,
        help=f"build each method's attribution cache ({', '.join(method_names())}; K-FAC: factors and bank)",
        description="Compute or load each method's cache for the checkpoint and data set. Resumable: "
        "finished parts of a bank are kept when a build is interrupted.",
    )
    p.add_argument("--methods", default=None, help=f"comma list from {','.join(method_names())} (default: all)")
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="verify every cache of these methods (checksums included) and rebuild the ones that are corrupt or stale",
    )
    _add_attribution_options(p)


def build_note(name: str, s: dict, summary: dict[str, dict], fed_by: dict[str, str], shared: dict[str, list[str]],
               sharing_words: Callable[[str, dict | None], str | None]) -> str:
    """The build table's note on what one method's seconds were.

    A cache another process built while this one waited is said to be that (QA round 18: such a run
    printed the shared-pass notes, "its gradient pass also filled trak, dtrak", for a pass it never made);
    otherwise a shared pass's seconds are its maker's (``caches.sharing_words``)."""
    waited = float(s.get("waited") or 0.0)
    if waited > 0.0 and s.get("was_built"):
        return f"waited {waited:.0f} s for another process's build of this cache, then loaded it"
    maker = summary.get(fed_by.get(name, ""), {})
    if s.get("was_built") and (name not in fed_by or maker.get("was_built")):
        return "already built; loaded"
    if name in fed_by and maker.get("was_built"):  # the pass that was to feed it was never made here
        return ""
    sharing = {"shared_with": fed_by[name]} if name in fed_by else {"fed": shared[name]} if name in shared else None
    return sharing_words(name, sharing) or ""


def cmd_build(args: argparse.Namespace) -> int:
    """Build caches; under ``torchrun`` the gradient passes are split over the ranks (engine.distributed).

    A full disk (``DiskFullError``) stops the build at once: it is reported when it happens, the methods
    after it are skipped (they would write to the same disk), and the rerun resumes from the kept parts."""
    from ..attribution.caches import sharing_words
    from ..attribution.store_files import DiskFullError
    from ..distributed import init_from_env
    from ..threads import configure_threads

    try:
        methods = parse_methods(args.methods)
        _, _, device = resolve(args)
        shard, args.device = init_from_env(device)
        session = open_session(args)
        names = methods or session.method_names()
        session.caches.check_writable(names)  # an unwritable cache root: one error line now, not one per method
    except (ValueError, RuntimeError, OSError) as e:
        return fail(e)
    summary: dict[str, dict] = {}
    shared = session.share_gradient_passes(names)  # one training-gradient pass for K-FAC's bank and TRAK
    fed_by = {fed: maker for maker, fed_list in shared.items() for fed in fed_list}
    reported: set[str] = set()
    for k, name in enumerate(names):
        if not shard.is_main and not METHODS[name].shards:
            continue  # one rank is enough; the others wait at the barrier below
        configure_threads(f"building {name}")  # other processes come and go during a long build
        plan = None if session.method(name).is_built(session.ctx) else session.method(name).build_plan(session.ctx)
        if plan and name in fed_by:  # its gradients come from another method's pass (share_gradient_passes)
            plan += f" (from {fed_by[name]}'s gradient pass, not a pass of its own)"
        if plan and shard.is_main:
            print(f"{name}: {plan}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        full = None
        with build_progress(name if shard.world == 1 else f"{name}[{shard.rank}]", shard.rank) as progress:
            try:
                summary.update(session.build([name], progress, rebuild=args.rebuild))
            except (ValueError, RuntimeError, OSError) as e:  # one method's failure is reported, the others build
                # the time spent is shown (it was 0.0 after 20 minutes); nothing was published, so size 0
                summary[name] = {"status": "error", "reason": str(e), "seconds": time.perf_counter() - t0,
                                 "size_mb": 0.0}
                full = e if isinstance(e, DiskFullError) else None
        if full is not None:  # the others would write to the same full disk: say so now and stop
            print(f"error: {name}: {full}", file=sys.stderr)
            reported.add(name)
            for rest in names[k + 1:]:
                summary[rest] = {"status": "not built", "reason": "skipped: the cache's disk is full", "seconds": 0.0,
                                 "size_mb": 0.0}
            break
    shard.barrier()
    if not shard.is_main:
        return 0
    print()
    print(f"{'method':8} {'status':12} {'seconds':>9} {'size MiB':>9}  note")
    built = [n for n, s in summary.items() if s["status"] == "ok"]
    one_cache = session.caches.shared_caches(built)  # a contributor's two methods over one stored artefact
    for name, s in summary.items():
        note = s.get("reason") or ""
        if not note and s["status"] == "ok":
            note = build_note(name, s, summary, fed_by, shared, sharing_words)
        if one_cache.get(name):
            note = "; ".join(filter(None, [note, f"shares its cache with {', '.join(one_cache[name])} (counted once in the total)"]))
        print(f"{name:8} {s['status']:12} {s['seconds']:9.1f} {s['size_mb']:9.2f}  {note}")
    total_s = sum(s["seconds"] for s in summary.values())
    total_mb = session.caches.total_size_mb(built)  # each artefact once, however many methods read it
    print(f"{'total':8} {'':12} {total_s:9.1f} {total_mb:9.2f}  cache: {session.store.base}")
    # a method asked for by name that cannot be built (CLIP without its weights) is a failure; left to the
    # default "all methods" it is a notice, so a plain `build` on a machine without CLIP still succeeds
    failed = [n for n, s in summary.items() if s["status"] in ("error", "corrupt")
              or (methods and s["status"] == "unavailable")]
    for n in failed:
        if n not in reported:
            print(f"error: {n}: {summary[n]['reason']}", file=sys.stderr)
    for n, s in summary.items():
        if n not in failed and s["status"] == "unavailable":
            print(f"notice: {n} skipped: {s['reason']}", file=sys.stderr)
    return 1 if failed else 0


# --- query ---------------------------------------------------------------------------------


@register
def add_query(sub: argparse._SubParsersAction) -> None:
    p = subcommand(
        sub,
        "query",
        cmd_query,
        help="attribute one generated or given image to the training images",
        description=f"Scores every training image for one query. Influence scores ({', '.join(names_of_kind('influence'))}) "
        "follow the paper's sign and scale: positive = proponent (removing it would raise the query's "
        "loss), tau_i = (1/N) grad m^T (G + lambda I)^-1 grad l_i. "
        f"The similarities ({', '.join(names_of_kind('similarity'))}) rank by likeness, not by what a removal would do.",
    )
    p.add_argument(
        "--query", required=True, action=OneQuery,
        help="gallery:N | train:N | image:PATH (PNG/JPEG) | generate:SEED | samples:FILE.npz:N (sample N of a "
        "`sample --out FILE.npz` file) | pool:N (sample N of the pool of "
        "--pool-seed that group/reverse/copy-check drew); one per call (many images: group/reverse --queries, "
        "or a Python session, README 'From Python')",
    )
    p.add_argument("--pool-seed", type=int, default=None, help="with --query pool:N: the pool's seed (default 0)")
    p.add_argument("--pool-size", type=at_least(1), default=None,
                   help="with --query pool:N: the pool's size, when pools of several sizes are cached (drawn if "
                   "not cached)")
    p.add_argument("--pool-dir", default=None,
                   help="with --query pool:N: the folder of generated pools (default: <cache root>/pools)")
    p.add_argument(
        "--measurement",
        default="loss",
        help="loss | loss@t=NNN (paper's 1-based t) | elbo | elbo-exact | trajectory | square-norm (default loss)",
    )
    p.add_argument("--methods", default=None, help=f"comma list from {','.join(method_names())} (default: all)")
    p.add_argument("--top-k", type=int, default=10, help="proponents/opponents to list (default 10)")
    p.add_argument(
        "--damping",
        action="append",
        default=None,
        metavar="NAME=VALUE",
        help="damping lambda of one influence method, e.g. kfac=1e-6 (repeatable; default: the preset's; "
        "a bare VALUE is K-FAC's)",
    )
    p.add_argument(
        "--trak-damping", dest="damping", action="append", type=lambda v: f"trak={v}", help="alias of --damping trak=VALUE"
    )
    p.add_argument(
        "--dtrak-damping", dest="damping", action="append", type=lambda v: f"dtrak={v}",
        help="alias of --damping dtrak=VALUE",
    )
    _add_attribution_options(p)
    p.add_argument("--auto-build", action="store_true", help="build missing caches instead of reporting them")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--scores-out", default=None, help="write every method's full score vector to this .npz")


def _parse_query(session, args: argparse.Namespace):
    """``--query``; ``pool:I`` is sample I of a generated pool (``engine.attribution.pool.pool_query``), as the
    group commands name it, so a script can follow up one of their rows (QA round 20)."""
    kind, _, arg = args.query.strip().partition(":")
    if kind.lower() != "pool":
        if args.pool_seed is not None or args.pool_size is not None or args.pool_dir is not None:
            raise ValueError("--pool-seed, --pool-size and --pool-dir go with --query pool:N")
        return session.parse_query(args.query)
    from ..attribution.pool import pool_query

    try:
        index = int(arg)
    except ValueError:
        raise ValueError(f"bad pool sample {arg!r} in {args.query!r}: expected pool:N, e.g. pool:17") from None
    return pool_query(session, index, args.pool_seed or 0, args.pool_dir, args.pool_size)


def cmd_query(args: argparse.Namespace) -> int:
    try:
        methods = parse_methods(args.methods)
        if args.top_k < 1:  # 0 printed empty lists and exited 0 (reverse and copy-check refuse it too)
            raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
        if args.scores_out and not args.scores_out.endswith(".npz"):
            raise ValueError(f"--scores-out must end in .npz, got {args.scores_out}")
        if args.scores_out:
            check_output_file(Path(args.scores_out), "--scores-out")
        damping = parse_damping(args.damping)  # before the session: a bad value is refused before any work
        # the query runs first, so that a bad measurement or query is refused before minutes of building
        # (review of QA round 12); ``build_missing`` then builds with a progress bar on stderr
        session = open_session(args)
        query = _parse_query(session, args)
        result = session.query(query, args.measurement, methods=methods, damping=damping)
        if args.auto_build and session.build_missing(methods):
            result = session.query(query, args.measurement, methods=methods, damping=damping)
        if not args.auto_build:  # a fresh clone answers a gallery query with the shipped scores
            from ..attribution.precomputed import fill_unbuilt

            fill_unbuilt(session, result, args.query, args.measurement, damping)
    except (ValueError, RuntimeError) as e:
        return fail(e)
    from ..attribution.provenance import result_settings

    labels = session.labels
    settings = result_settings(session, result)
    scored = any(r.status == "ok" for r in result.methods.values())
    for name, r in result.methods.items():  # on stderr too, as group says it (QA 20: --json hid it in the JSON);
        if r.status not in ("ok", "error"):  # a failure ("error") the engine has said already
            print(f"warning: {name} {r.status}: {r.reason}", file=sys.stderr)
    if args.scores_out and scored:  # no file when nothing scored: a Makefile would take it as done (QA 20)
        write_scores(Path(args.scores_out), result, labels, settings)
    if args.json:  # each method's damping and the draws are in it already; the model and the cache settings too
        out = {"model": settings["model"], **result.to_json(args.top_k, labels),
               **{k: settings[k] for k in ("attribution", "code", "threads")}}
        print(jsonio.dumps(out, indent=2))
    else:
        print(format_result(result, args.top_k, labels))
        if args.scores_out:
            print(f"scores written to {args.scores_out}")
    if not any(r.status == "ok" for r in result.methods.values()):
        # the statuses are printed above; a script must still see that nothing was scored (as for group)
        return fail(RuntimeError("no method could score this query (see each method's status above)"))
    return 0


# --- precomputed gallery results -------------------------------------------------------------


@register
def add_precompute(sub: argparse._SubParsersAction) -> None:
    p = subcommand(
        sub,
        "precompute",
        cmd_precompute,
        help="score the shipped gallery at the default settings for the app's first start",
        description="Write every built method's full score vector (measurement loss) and K-FAC's damping-grid "
        "scores for each gallery sample, float16 (similarity methods float32), keyed to the checkpoint hash, the data and the settings "
        "(engine.attribution.precomputed). The app shows them, marked precomputed, while its caches build.",
    )
    p.add_argument("--methods", default=None, help=f"comma list from {','.join(method_names())} (default: all built)")
    p.add_argument("--out", default=None, help="output .npz (default: <checkpoint>/precomputed_gallery.npz)")
    _add_attribution_options(p)


def cmd_precompute(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..attribution.precomputed import FILE, PrecomputedGallery, write_precomputed
    from ..bar_redraw import add_done_before

    try:
        if args.out and not args.out.endswith(".npz"):
            raise ValueError(f"--out must end in .npz (the app reads numpy's .npz), got {args.out}")
        methods = parse_methods(args.methods)
        session = open_session(args)
        out = Path(args.out) if args.out else session.checkpoint / FILE
        with tqdm(total=len(session.gallery()), desc="gallery", unit="query") as bar:
            write_precomputed(session, out, methods, progress=lambda i, n: bar.update(1), notice=bar.write,
                              resumed=lambda k: add_done_before(bar, k))
    except (ValueError, RuntimeError) as e:
        return fail(e)
    pre = PrecomputedGallery(out)
    names = pre.methods_for(session)
    print(f"wrote {out}: {pre.nbytes / 2**20:.2f} MiB, {len(pre.rows)} gallery samples, methods {', '.join(names)}")
    for i in sorted(pre.rows):
        for name in names:
            why = pre.unavailable(i, name)
            if why:  # kept in the file, so the page says it too
                print(f"gallery:{i}: {name} unavailable for this sample: {why}")
    return 0
