"""Figures for group attribution (issue 15): the class check, and the cost of a pool.

* **Class check.** For each class c, removing ``label:c`` should raise the loss of generated
  samples of class c more than that of the others: mean predicted change over the queries the
  classifier labels c, against the mean over the rest.  Counted over the classes that have at
  least one query of their own, per method, on the gallery and on the pool.
* **Cost.** Time to draw a pool of N samples, to compute its attribution matrix (batched
  query gradients + one batched product per method), for a group query over the cached matrix
  (load + one (Q, |R|) sum), and, side by side in the same run, the median time of single
  queries (``session.query``) so the batched cost can be compared with N separate ones.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..attribution.groups import group_change, parse_group
from ..attribution.pool import attribution_matrix, gallery_set, generate_pool
from ..code_version import code_version
from .announce import say


def class_check(scores: np.ndarray, query_labels: np.ndarray, dataset: Any,
                changes: np.ndarray | None = None) -> dict[str, Any]:
    """Per class c: mean predicted change (removing label:c) on queries labelled c vs the others.

    ``scores`` (Q, N) per-example scores, or ``changes`` (Q, C) the classes' predicted changes directly.
    """
    rows = []
    for c in sorted({int(v) for v in dataset.labels.tolist()}):
        change = changes[:, c] if changes is not None else group_change(scores, parse_group(f"label:{c}", dataset))
        own = query_labels == c
        if not own.any() or own.all():
            rows.append({"class": c, "own_queries": int(own.sum()), "holds": None})
            continue
        mean_own, mean_other = float(change[own].mean()), float(change[~own].mean())
        rows.append({"class": c, "own_queries": int(own.sum()), "mean_own": mean_own,
                     "mean_other": mean_other, "holds": mean_own > mean_other})
    evaluable = [r for r in rows if r["holds"] is not None]
    return {"holds": sum(r["holds"] for r in evaluable), "classes": len(evaluable), "per_class": rows}


def run_group_bench(
    session: Any,
    methods: list[str],
    pool_size: int = 256,
    pool_seed: int = 0,
    work_dir: str | Path = "runs/group_bench",
    single_queries: int = 5,
    log: Any = print,
) -> dict[str, Any]:
    """Class check on the gallery and the pool, and the pool's timings.

    The pool is drawn once into ``work_dir/pools`` (its drawing time is recorded with it); its
    matrices are computed cold in this run, in a fresh ``work_dir/cold``.
    """
    from ..model.diffusion import check_sample_seed

    # refused before any work (QA 27 #2, #10: an unbuilt method printed "0.0 s" timings, drew the pool and then
    # stopped on an assertion; a bad pool seed after the gallery's matrix)
    check_sample_seed(pool_seed, pool_size, "pool seed (--pool-seed)")
    missing = [m for m in methods if not session.method(m).is_built(session.ctx)]
    if missing:
        raise ValueError(f"group-bench times built caches; not built: {', '.join(missing)}: run "
                         f"`{session.build_command(missing)}` first")
    work = Path(work_dir)
    fresh = work / "cold"
    if fresh.exists():
        shutil.rmtree(fresh)  # cold: the matrices are computed in this run
    out: dict[str, Any] = {"config": {"preset": session.preset.name, "checkpoint_hash": session.checkpoint_hash,
                                      "pool_size": pool_size, "pool_seed": pool_seed, "methods": methods,
                                      "mc_samples": session.config.mc_samples, "measurement": "loss",
                                      "code": code_version()}}  # which code made the figures
    gallery = gallery_set(session)
    # said on stderr before each timed part (a bar would cost time in the timing; QA 27 #9: silent for 10-17 s)
    say(f"timing the gallery's attribution matrix ({len(gallery)} queries; {', '.join(methods)}) ...")
    t0 = time.perf_counter()
    gmats = attribution_matrix(session, gallery, "loss", methods)
    out["gallery_matrix_seconds"] = time.perf_counter() - t0
    log(f"gallery matrix ({len(gallery)} queries): {out['gallery_matrix_seconds']:.1f} s")

    pool = generate_pool(session, pool_size, pool_seed, work / "pools", progress=True)
    out["pool_draw_seconds"] = pool.drawn_seconds
    out["pool_drawn_in_this_run"] = pool.seconds > 0
    if out["pool_drawn_in_this_run"]:
        log(f"drawing the pool of {pool_size}: {out['pool_draw_seconds']:.1f} s")
    else:  # QA 27 #14: the earlier run's time was printed as this run's
        log(f"pool of {pool_size} loaded from {work / 'pools'} (drawn by an earlier run in "
            f"{out['pool_draw_seconds']:.1f} s)")
    say(f"timing the pool's attribution matrix ({pool_size} queries, computed afresh in {fresh}) ...")
    t0 = time.perf_counter()
    pmats = attribution_matrix(session, pool, "loss", methods, cache_dir=fresh)
    out["pool_matrix_seconds"] = time.perf_counter() - t0
    out["pool_matrix_timing_ms"] = {n: r.timing_ms for n, r in pmats.items()}
    log(f"its attribution matrix ({', '.join(methods)}): {out['pool_matrix_seconds']:.1f} s")

    # a group query over the cached pool: load the matrix from disk, sum the group's columns
    group = parse_group("label:3", session.dataset)
    say("timing a group query over the cached pool matrix (5 times from disk, 5 in memory) ...")
    cold, warm = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        mats = attribution_matrix(session, pool, "loss", methods, cache_dir=fresh)
        changes = {n: group_change(r.scores, group) for n, r in mats.items() if r.scores is not None}
        cold.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        changes = {n: group_change(r.scores, group) for n, r in mats.items() if r.scores is not None}
        warm.append(time.perf_counter() - t0)
    if len(changes) != len(methods):
        gave = ", ".join(f"{n}: {r.status} ({r.reason})" for n, r in mats.items() if r.scores is None)
        raise RuntimeError(f"a method gave no scores for the pool: {gave}")
    out["group_query_ms"] = {"from_disk_median": 1e3 * statistics.median(cold),
                             "in_memory_median": 1e3 * statistics.median(warm)}
    log(f"group query over the pool: {out['group_query_ms']['from_disk_median']:.1f} ms from disk, "
        f"{out['group_query_ms']['in_memory_median']:.3f} ms in memory")

    # single queries, same methods, same run: what N separate passes would cost
    singles = []
    say(f"timing {min(single_queries, len(pool.queries))} single queries ({', '.join(methods)}) ...")
    for q in pool.queries[:single_queries]:
        t0 = time.perf_counter()
        session.query(q, "loss", methods)
        singles.append(time.perf_counter() - t0)
    med = statistics.median(singles)
    out["single_query_median_seconds"] = med
    out["separate_queries_estimate_seconds"] = med * pool_size
    log(f"single query median {med * 1e3:.0f} ms -> {pool_size} separate queries ~{med * pool_size:.0f} s")

    out["class_check"] = {
        "gallery": {n: class_check(r.scores, gallery.labels, session.dataset) for n, r in gmats.items()
                    if r.scores is not None},
        "pool": {n: class_check(r.scores, pool.labels, session.dataset) for n, r in pmats.items()
                 if r.scores is not None},
    }
    for where, per in out["class_check"].items():
        for n, c in per.items():
            log(f"class check on the {where}: {n} holds in {c['holds']} of {c['classes']} classes")
    out["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return out


def class_check_from_factors(session: Any, measurement: str = "loss") -> dict[str, Any]:
    """The class check for K-FAC on the gallery from the factors alone (no bank): one summed
    training gradient per class (``engine.attribution.group_gradient``), so it runs as soon as
    the factors exist.  Same numbers as summing the bank's scores, up to the bank's int8 rounding."""
    from ..attribution.group_gradient import kfac_group_scores
    from ..attribution.pool import query_gradients
    from ..model.measurements import parse_measurement

    t0 = time.perf_counter()
    gallery = gallery_set(session)
    classes = sorted({int(v) for v in session.dataset.labels.tolist()})
    groups = [parse_group(f"label:{c}", session.dataset) for c in classes]
    meas = parse_measurement(measurement, session.diffusion.T)
    grads = query_gradients(session, gallery.queries, meas, session.query_draws())
    changes = kfac_group_scores(session, grads, groups, progress=True)
    out = class_check(None, gallery.labels, session.dataset, changes=changes)  # type: ignore[arg-type]
    out.update(seconds=time.perf_counter() - t0, source="K-FAC factors + one summed gradient per class",
               mc_samples=session.config.mc_samples, queries="gallery", changes=changes.tolist(),
               query_labels=gallery.labels.tolist(), code=code_version())
    return out


__all__ = ["class_check", "class_check_from_factors", "run_group_bench"]
