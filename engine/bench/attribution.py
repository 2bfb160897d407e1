"""Attribution benchmark: what a user waits for, how much memory it takes, how exact it is.

Measured on the preset's checkpoint and its shipped gallery (digits default: 32 generated
queries), M = 64 draws unless told otherwise:

* cold build time and cache size per method, in a fresh temporary cache (``--reuse-cache``
  builds into / loads from the normal cache instead), in a child process so the parent's
  peak memory is that of a warm session only;
* warm session start (model, data and cache index; banks are memory-mapped on first use)
  and the first query (which maps the banks);
* a query with every method (measurement ``loss``): median over the gallery, per method
  split into gradient / prepare / score;
* a damping change (``rescore``, no gradient) for K-FAC and TRAK: median;
* peak resident memory (VmHWM) of the warm session after all queries;
* int8 vs float32 K-FAC: Spearman between the int8 bank's scores and scores from the same
  rotated gradients in float32 (streamed, never stored), median over the gallery
  (docs/architecture.md §4 asks for >= 0.99);
* qualitative agreement: fraction of each method's top-10 proponents whose digit label
  equals the label a logistic regression (trained on all digits) gives the query;
* ``--kronfluence``: kronfluence's KFAC on the same model, N and M (sampled labels, same
  draws), on a few gallery queries: time to fit factors, time to score one query, and
  Spearman against our K-FAC scores.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import files
from ..code_version import code_version
from ..evaluation.label_agreement import chance_level, summarise
from ..evaluation.stats import spearman
from .memory import memory_mb
from .report import median as _median

if TYPE_CHECKING:  # annotations only: the session (and the methods it loads) is imported where a bench runs
    from ..attribution.query import QueryInput
    from ..attribution.results import QueryResult
    from ..attribution.session import AttributionSession
    from ..config import AttributionConfig, Preset

# --- measurement helpers --------------------------------------------------------------------

_BENCH_CACHE = re.compile(r"^bench-cache-(\d+)-")


def sweep_dead_bench_caches(folder: str | Path | None = None) -> list[Path]:
    """Remove the fresh temporary caches of benches that were killed (``bench-cache-<pid>-*`` of a process that
    is gone) and return them.  Why: a ``kill -9`` skips the temporary folder's clean-up, and each run picks a
    new name, so nothing ever removed it (QA 25 #4: 117 MB left in /tmp by one kill, about 580 MB for a whole
    digits build).  A folder of a live bench, or one named before the pid was part of the name, is kept."""
    from ..attribution.store_files import pid_alive

    removed = []
    for path in Path(folder or tempfile.gettempdir()).glob("bench-cache-*"):
        hit = _BENCH_CACHE.match(path.name)
        if hit and path.is_dir() and int(hit.group(1)) != os.getpid() and not pid_alive(int(hit.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            print(f"removed {path}, the temporary cache of a bench that was killed", file=sys.stderr)
    return removed



def _cold_build(
    preset: Preset, ckpt: str, device: str, config: AttributionConfig, cache_root: str, methods: list[str], threads: int
) -> dict[str, Any]:
    """Child process: open a session and build each method (timed separately)."""
    torch.set_num_threads(threads)
    from ..attribution.session import AttributionSession

    t0 = time.perf_counter()
    s = AttributionSession(preset, checkpoint=ckpt, device=device, cache_root=cache_root, config=config)
    start = time.perf_counter() - t0
    out: dict[str, Any] = {"session_start_s": start, "methods": {}}
    for name in methods:
        last = [-1.0]

        def progress(msg: str, frac: float, last: list[float] = last) -> None:
            if frac - last[0] >= 0.1 or frac >= 1.0:
                last[0] = frac
                # progress, not figures: on stderr, as every command's (QA 25 #5: `bench > log` showed none)
                print(f"  [build] {msg} ({100 * frac:.0f}%)", file=sys.stderr, flush=True)

        was_built = s.status()[name]["built"]
        out["methods"].update(s.build([name], progress))
        out["methods"][name]["cold"] = not was_built  # False: the cache existed and was only loaded
        if was_built:
            out["methods"][name]["recorded_build_seconds"] = s.recorded_build_seconds(name)
            # a gradient pass shared with another method cannot be split: say whose it was (report.py shows it)
            out["methods"][name]["recorded_build_sharing"] = s.caches.recorded_build_sharing(name)
    out["memory"] = memory_mb()
    return out


def run_cold_build(
    preset: Preset,
    ckpt: str | Path,
    device: str | torch.device,
    config: AttributionConfig,
    cache_root: str | Path,
    methods: list[str],
) -> dict[str, Any]:
    """Open a session on ``cache_root`` and build each of ``methods`` there, timed one by one, in a spawned child
    process (``_cold_build``): this process's peak memory then stays a warm session's.  Returns the child's
    figures: session start, each method's build (or, when its cache existed, the time recorded at its build)
    and the child's memory."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from ..child_process import init_worker

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"), initializer=init_worker) as ex:
        fut = ex.submit(
            _cold_build, preset, str(ckpt), str(device), config, str(cache_root), methods, torch.get_num_threads()
        )
        return fut.result()


# --- the benchmark ------------------------------------------------------------------------


def run_bench(
    preset: Preset,
    ckpt: Path,
    device: str,
    config: AttributionConfig,
    methods: list[str],
    n_queries: int = 32,
    reuse_cache: bool = False,
    cache_root: str | None = None,
    float32: bool = True,
    kronfluence: bool = False,
    kronfluence_queries: int = 3,
    out: Path | None = None,
) -> dict[str, Any]:
    """All figures as one JSON-ready dict; written to ``out`` after every phase (a late failure keeps the rest)."""
    from ..attribution import int8_scan
    from ..attribution.session import AttributionSession
    from ..paths import cache_root as default_cache_root

    results: dict[str, Any] = {
        "preset": preset.name,
        "checkpoint": str(ckpt),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "mc_samples": config.mc_samples,
        "trak_dim": config.trak_dim,
        "methods": methods,
        # which kernel scans a stored int8 bank on the CPU (engine.attribution.int8_scan)
        "int8_scan": "numba" if int8_scan.available() else "torch chunks",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code": code_version(),  # which code made the figures
        "memory_after_imports": memory_mb(),  # MiB; torch alone is ~700 MiB resident on CPU
    }
    tmp = None
    if reuse_cache:
        root = Path(cache_root) if cache_root else default_cache_root()
    else:
        sweep_dead_bench_caches()
        tmp = tempfile.TemporaryDirectory(prefix=f"bench-cache-{os.getpid()}-")
        root = Path(tmp.name)
    results["cache"] = "reused" if reuse_cache else "fresh temporary"
    try:
        print(f"== cold build ({results['cache']} cache {root}), M={config.mc_samples}", flush=True)
        results["build"] = run_cold_build(preset, ckpt, device, config, root, methods)
        save_json(results, out)

        print("== warm session", flush=True)
        t0 = time.perf_counter()
        session = AttributionSession(preset, checkpoint=ckpt, device=device, cache_root=root, config=config)
        results["warm_open_s"] = time.perf_counter() - t0
        results["warm_load_s"] = session.load(methods)
        results["warm_start_s"] = time.perf_counter() - t0
        gallery = session.gallery()
        if not gallery:
            raise ValueError(f"no gallery.npz in {ckpt}: run `{session.command('assets')}` first")
        queries = [session.parse_query(f"gallery:{i}") for i in range(min(n_queries, len(gallery)))]

        t0 = time.perf_counter()
        first = session.query(queries[0], "loss", methods=methods)
        results["first_query_ms"] = (time.perf_counter() - t0) * 1000.0
        results["status"] = {n: {"status": r.status, "reason": r.reason} for n, r in first.methods.items()}

        print(f"== {len(queries)} queries x {len(methods)} methods", flush=True)
        query_results = []
        totals: list[float] = []
        per_method: dict[str, dict[str, list[float]]] = {}
        for q in queries:
            r = session.query(q, "loss", methods=methods)
            query_results.append(r)
            totals.append(r.timing_ms["total"])
            for name, m in r.methods.items():
                if m.status == "ok":
                    for k, v in m.timing_ms.items():
                        per_method.setdefault(name, {}).setdefault(k, []).append(v)
        results["query_ms"] = {
            "median_total": _median(totals),
            "per_method_median": {n: {k: _median(v) for k, v in d.items()} for n, d in per_method.items()},
        }

        # what the app's background thread does while the first answer is on screen: the damping grid
        # of the methods whose first answer was one pass (K-FAC on a stored bank)
        fills: list[float] = []
        for r in query_results:
            t0 = time.perf_counter()
            if session.fill_grids(r):
                fills.append((time.perf_counter() - t0) * 1000.0)
        results["fill_grid_ms_median"] = _median(fills) if fills else None

        print("== damping changes (rescore, after the grid was filled)", flush=True)
        (
            results["rescore_ms_median"],
            results["rescore_grid_ms_median"],
            results["rescore_exact_pass_ms_median"],
        ) = time_rescore(session, query_results)
        results["memory_warm_session"] = memory_mb()

        results["agreement_top10"] = label_agreement(session, queries, query_results, k=10)
        save_json(results, out)

        if float32 and "kfac" in methods and query_results[0].methods["kfac"].status == "ok":
            print("== int8 vs float32 K-FAC (one more gradient pass)", flush=True)
            results["int8_vs_float32"] = _guarded(int8_vs_float32, session, query_results)
            save_json(results, out)

        if kronfluence and "kfac" in methods and query_results[0].methods["kfac"].status == "ok":
            print("== kronfluence", flush=True)
            from .kronfluence import compare_kronfluence

            results["kronfluence"] = _guarded(
                compare_kronfluence, session, queries[:kronfluence_queries], query_results
            )
    finally:
        if tmp is not None:
            tmp.cleanup()
    return results


def time_rescore(
    session: AttributionSession, query_results: list[QueryResult]
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Median ms of a damping change per influence method:
    (any damping, a damping of the method's grid, an exact pass).

    The first pass scores a grid of dampings and keeps them (``engine.attribution.scoring``): a
    grid value is a lookup, any damping in the method's damping range (here lambda * 3.7) a
    weighted sum of the grid's scores, and one below the range one division and one pass.
    """
    info = session.method_info()
    anyd: dict[str, float] = {}
    grid: dict[str, float] = {}
    exact: dict[str, float] = {}
    names = [n for n in info if info[n]["kind"] == "influence"]
    for name in names:
        steps = info[name]["damping_steps"]
        lo = session.method(name).damping_range
        outside = None if lo is None else lo[0] / 100
        t_any, t_grid, t_exact = [], [], []
        for r in query_results:
            m = r.methods.get(name)
            if m is None or m.status != "ok" or m.damping is None:
                continue
            t0 = time.perf_counter()
            session.rescore(r, {name: m.damping * 3.7})
            t_any.append((time.perf_counter() - t0) * 1000.0)
            g = [x for x in steps if x != m.damping]
            if g and outside is not None:
                t0 = time.perf_counter()
                session.rescore(r, {name: g[len(g) // 2]})
                t_grid.append((time.perf_counter() - t0) * 1000.0)
                t0 = time.perf_counter()
                session.rescore(r, {name: outside})
                t_exact.append((time.perf_counter() - t0) * 1000.0)
        if t_any:
            anyd[name] = _median(t_any)
        if t_grid:
            grid[name] = _median(t_grid)
        if t_exact:
            exact[name] = _median(t_exact)
    return anyd, grid, exact


def save_json(results: dict[str, Any], out: Path | None) -> None:
    """Write the figures so far (after every phase: a late failure keeps the rest)."""
    if out is not None:
        files.save_json(out, results)


def _guarded(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run an optional phase; a failure is recorded (with its message) instead of losing the other figures."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - reported in the results
        import traceback

        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"}


def label_agreement(
    session: AttributionSession, queries: list[QueryInput], query_results: list[QueryResult], k: int = 10
) -> dict[str, Any]:
    """Per method: mean fraction of the top-k whose training label equals the query's classifier label.

    With a 95% percentile-bootstrap interval over the queries (``ci95``; each query's top-k is one
    unit, its k labels are not independent): over a 32-sample gallery the interval is about +-0.1, so
    two figures closer than that are not told apart by the gallery."""
    labels = session.labels
    from ..model.label_classifier import classifier_for, classify

    clf = None if labels is None else classifier_for(session.preset, session.dataset)
    if clf is None:
        return {"note": "needs a labelled data set with a classifier (digits, mnist)"}
    qlab, _ = classify(clf, torch.stack([q.image for q in queries]))
    out: dict[str, Any] = {
        "k": k,
        "chance": chance_level(labels, np.asarray(qlab)),
        "classifier": f"sklearn LogisticRegression on real {session.preset.data.name} (engine.model.label_classifier)",
    }
    for name in query_results[0].methods:
        fr, ys = [], []
        for y, r in zip(qlab, query_results, strict=True):
            m = r.methods[name]
            if m.status == "ok":
                fr.append(float(np.mean([it.label == y for it in m.top(k, labels)])))
                ys.append(y)
        if fr:
            got = summarise(name, np.asarray(fr), labels, np.asarray(ys), k)
            out[name] = got.share
            out.setdefault("ci95", {})[name] = list(got.ci95)
    return out


@torch.no_grad()
def float32_kfac_scores(session: AttributionSession, query_results: list[QueryResult]) -> np.ndarray:
    """(Q, N) float64 K-FAC scores of eq. 6 from float32 rotated gradients, never quantised or stored.

    The training gradients are streamed once more (the bank's draws), rotated with the same factors
    and scored against all Q damped queries at once: nothing of size N x P is held.
    """
    from ..attribution.gradients import per_example_grads

    method = session.method("kfac")
    ctx = session.ctx
    damping = query_results[0].methods["kfac"].damping
    qmat = torch.stack([r.prepared["kfac"].query.damped(damping) for r in query_results])  # (Q, P)
    n = len(session.dataset)
    f32 = torch.zeros(len(query_results), n, dtype=torch.float64)
    batch = 16
    for s in range(0, n, batch):
        rows = slice(s, min(n, s + batch))
        with torch.enable_grad():
            g = per_example_grads(
                ctx.model, ctx.diffusion, ctx.dataset.images[rows], ctx.train_draws.for_rows(rows), "loss", ctx.params
            )
        rot = method.rotate(g)
        f32[:, rows] = (qmat @ rot.T).double().cpu() / n
    return f32.numpy()


def int8_vs_float32(session: AttributionSession, query_results: list[QueryResult]) -> dict[str, Any]:
    """Spearman of the int8 bank's K-FAC scores against float32 scores of the same rotated gradients
    (``float32_kfac_scores``: one more gradient pass)."""
    damping = query_results[0].methods["kfac"].damping
    t0 = time.perf_counter()
    f32 = float32_kfac_scores(session, query_results)
    seconds = time.perf_counter() - t0
    rhos = []
    rel = []
    for i, r in enumerate(query_results):
        a = r.methods["kfac"].scores
        b = f32[i]
        rhos.append(spearman(a, b))
        rel.append(float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)))
    return {
        "spearman_median": _median(rhos),
        "spearman_min": float(min(rhos)),
        "relative_l2_error_median": _median(rel),
        "float32_pass_seconds": seconds,
        "queries": len(rhos),
        "damping": damping,
    }
