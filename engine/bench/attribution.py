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
  (DESIGN.md 4 asks for >= 0.99);
* qualitative agreement: fraction of each method's top-10 proponents whose digit label
  equals the label a logistic regression (trained on all digits) gives the query;
* ``--kronfluence``: kronfluence's KFAC on the same model, N and M (sampled labels, same
  draws), on a few gallery queries: time to fit factors, time to score one query, and
  Spearman against our K-FAC scores.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import files
from ..evaluation.stats import spearman
from .memory import memory_mb

# --- measurement helpers --------------------------------------------------------------------


def _median(xs: list[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


def _cold_build(preset, ckpt: str, device: str, config, cache_root: str, methods: list[str], threads: int) -> dict:
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
                print(f"  [build] {msg} ({100 * frac:.0f}%)", flush=True)

        was_built = s.status()[name]["built"]
        out["methods"].update(s.build([name], progress))
        out["methods"][name]["cold"] = not was_built  # False: the cache existed and was only loaded
        if was_built:
            out["methods"][name]["recorded_build_seconds"] = s.recorded_build_seconds(name)
    out["memory"] = memory_mb()
    return out


def run_cold_build(preset, ckpt, device, config, cache_root, methods) -> dict:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
        fut = ex.submit(
            _cold_build, preset, str(ckpt), str(device), config, str(cache_root), methods, torch.get_num_threads()
        )
        return fut.result()


# --- the benchmark ------------------------------------------------------------------------


def run_bench(
    preset,
    ckpt: Path,
    device: str,
    config,
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
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "memory_after_imports": memory_mb(),  # torch alone is ~0.7 GB resident on CPU
    }
    tmp = None
    if reuse_cache:
        root = Path(cache_root) if cache_root else default_cache_root()
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-cache-")
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
            raise ValueError(f"no gallery.npz in {ckpt}: run `attribution-engine assets --checkpoint {ckpt}` first")
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

        print("== damping changes (rescore)", flush=True)
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
            results["kronfluence"] = _guarded(
                compare_kronfluence, session, queries[:kronfluence_queries], query_results
            )
    finally:
        if tmp is not None:
            tmp.cleanup()
    return results


def time_rescore(session, query_results) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Median ms of a damping change per influence method:
    (any damping, a damping of the method's grid, K-FAC's exact pass).

    K-FAC scores a grid of dampings in its first pass and keeps them: a grid value is a lookup,
    any damping in ``damping_grid.SUPPORTED`` (here lambda * 3.7) a weighted sum of the grid's
    scores (engine.attribution.damping_grid), and one below it one division and one bank pass.
    """
    from ..attribution.damping_grid import SUPPORTED

    outside = SUPPORTED[0] / 100
    grid_of = {"kfac": _kfac_grid()}
    anyd: dict[str, float] = {}
    grid: dict[str, float] = {}
    exact: dict[str, float] = {}
    for name in ("kfac", "trak", "dtrak"):
        t_any, t_grid, t_exact = [], [], []
        for r in query_results:
            m = r.methods.get(name)
            if m is None or m.status != "ok":
                continue
            t0 = time.perf_counter()
            session.rescore(r, {name: m.damping * 3.7})
            t_any.append((time.perf_counter() - t0) * 1000.0)
            g = [x for x in grid_of.get(name, []) if x != m.damping]
            if g:
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


def _kfac_grid() -> list[float]:
    from ..attribution.damping_grid import DAMPING_GRID

    return sorted(float(x) for x in DAMPING_GRID)


def save_json(results: dict[str, Any], out: Path | None) -> None:
    """Write the figures so far (after every phase: a late failure keeps the rest)."""
    if out is not None:
        files.save_json(out, results)


def _guarded(fn, *args) -> dict[str, Any]:
    """Run an optional phase; a failure is recorded (with its message) instead of losing the other figures."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - reported in the results
        import traceback

        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"}


def label_agreement(session, queries, query_results, k: int = 10) -> dict[str, Any]:
    """Per method: mean fraction of the top-k whose training label equals the query's classifier label."""
    labels = session.labels
    if labels is None or session.preset.data.name != "digits":
        return {"note": "needs a labelled digits data set"}
    from ..model.gallery import classify, digits_classifier

    clf = digits_classifier(session.dataset)
    qlab, _ = classify(clf, torch.stack([q.image for q in queries]))
    out: dict[str, Any] = {
        "k": k,
        "chance": float(np.mean([(labels == y).mean() for y in qlab])),
        "classifier": "sklearn LogisticRegression on all digits",
    }
    for name in query_results[0].methods:
        fr = []
        for y, r in zip(qlab, query_results, strict=True):
            m = r.methods[name]
            if m.status == "ok":
                fr.append(float(np.mean([it.label == y for it in m.top(k, labels)])))
        if fr:
            out[name] = float(np.mean(fr))
    return out


@torch.no_grad()
def int8_vs_float32(session, query_results) -> dict[str, Any]:
    """Spearman of the int8 bank's K-FAC scores against float32 scores of the same rotated gradients.

    The float32 scores stream the training gradients once more (same draws), rotate them with the
    same factors and score all queries at once: nothing of size N x P is stored.
    """
    from ..attribution.gradients import per_example_grads

    method = session.method("kfac")
    ctx = session.ctx
    preps = [r._prepared["kfac"].data for r in query_results]
    damping = query_results[0].methods["kfac"].damping
    eig = preps[0]["eigenvalues"]
    qmat = torch.stack([p["rotated"] / (eig.to(p["rotated"].dtype) + damping) for p in preps])  # (Q, P)
    n = len(session.dataset)
    f32 = torch.zeros(len(preps), n, dtype=torch.float64)
    t0 = time.perf_counter()
    batch = 16
    for s in range(0, n, batch):
        rows = slice(s, min(n, s + batch))
        with torch.enable_grad():
            g = per_example_grads(
                ctx.model, ctx.diffusion, ctx.dataset.images[rows], ctx.train_draws.for_rows(rows), "loss", ctx.params
            )
        rot = method.factors.rotate(g)
        f32[:, rows] = (qmat @ rot.T).double().cpu() / n
    seconds = time.perf_counter() - t0
    rhos = []
    rel = []
    for i, r in enumerate(query_results):
        a = r.methods["kfac"].scores
        b = f32[i].numpy()
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


# --- kronfluence ------------------------------------------------------------------------


def _make_kronfluence_task(diffusion, shape: tuple[int, int, int]):
    """A kronfluence Task whose loss is the diffusion MSE on (x_0, t, eps) triples.

    Each data item is one (x_0, t, eps) triple.  Train loss (summed over the batch, as
    kronfluence expects): (1/D)||eps - eps_theta(x_t, t)||^2.  With ``sample=True`` the target
    is drawn from the Gaussian whose negative log-likelihood is this loss,
    y ~ N(eps_theta, (D/2) I), so E[grad grad^T] = J^T (2/D) J, the GGN (MC-Fisher).
    The measurement is the same loss with the true eps (our ``loss`` measurement).
    """
    from kronfluence.task import Task

    d = math.prod(shape)

    class DiffusionMSETask(Task):
        def _pred(self, batch, model):
            x0, t, eps = batch
            return model(diffusion.q_sample(x0, t, eps), t), eps

        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            pred, eps = self._pred(batch, model)
            if sample:
                with torch.no_grad():
                    target = pred.detach() + math.sqrt(d / 2.0) * torch.randn_like(pred)
            else:
                target = eps
            return (target - pred).pow(2).flatten(1).mean(1).sum()

        def compute_measurement(self, batch, model) -> torch.Tensor:
            pred, eps = self._pred(batch, model)
            return (eps - pred).pow(2).flatten(1).mean(1).sum()

    return DiffusionMSETask()


class _Triples(torch.utils.data.Dataset):
    """Item j = (x_{j // M}, t_{j % M}, eps_{j % M}): every example with every draw."""

    def __init__(self, images: torch.Tensor, t: torch.Tensor, eps: torch.Tensor):
        self.images, self.t, self.eps = images, t, eps
        self.m = int(t.shape[0])

    def __len__(self) -> int:
        return int(self.images.shape[0]) * self.m

    def __getitem__(self, j: int):
        i, k = divmod(int(j), self.m)
        return self.images[i], self.t[k], self.eps[k]


def compare_kronfluence(session, queries, query_results, batch_size: int = 512) -> dict[str, Any]:
    """kronfluence KFAC (same model, N, M, draws; sampled labels) vs our K-FAC on a few queries.

    A query's score for training example i is the mean over its M triples of the triple scores
    with the summed query gradient (the query's M triples, ``aggregate_query_gradients``):
    scores are linear in both gradients, so this equals grad m^T (G + lambda)^-1 grad l_i up to
    the constant factors kronfluence's own normalisation puts on G (irrelevant to Spearman).
    """
    import copy
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    ctx = session.ctx
    shape = session.shape
    task = _make_kronfluence_task(session.diffusion, shape)
    model = prepare_model(copy.deepcopy(session.model).cpu().eval(), task)
    draws = ctx.train_draws
    if getattr(draws, "batched", False) or getattr(draws, "flip", None) is not None:
        raise ValueError("the kronfluence comparison supports shared draws without flips only (digits default)")
    qdraws = session.query_draws()
    train = _Triples(session.dataset.images, draws.t, draws.eps)
    m = len(draws)
    out: dict[str, Any] = {"N": len(session.dataset), "M": m, "triples": len(train), "strategy": "kfac"}
    with tempfile.TemporaryDirectory(prefix="kronfluence-") as folder:
        analyzer = Analyzer(
            analysis_name="bench", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=folder
        )
        fargs = FactorArguments(strategy="kfac", use_empirical_fisher=False)
        t0, c0 = time.perf_counter(), time.process_time()
        analyzer.fit_all_factors("kfac", dataset=train, per_device_batch_size=batch_size, factor_args=fargs)
        out["fit_factors_s"] = time.perf_counter() - t0
        out["fit_factors_cpu_s"] = time.process_time() - c0
        damping = query_results[0].methods["kfac"].damping
        sargs = ScoreArguments(damping_factor=damping, aggregate_query_gradients=True)
        rhos, times, cpu, ours, ours_cpu = [], [], [], [], []
        for qi, (q, r) in enumerate(zip(queries, query_results, strict=False)):
            # ours, in the same conditions (a busy machine inflates both alike; CPU time is fairer)
            t0, c0 = time.perf_counter(), time.process_time()
            session.query(q, "loss", methods=["kfac"])
            ours.append(time.perf_counter() - t0)
            ours_cpu.append(time.process_time() - c0)
            qset = _Triples(q.image[None].float(), qdraws.t, qdraws.eps)
            t0, c0 = time.perf_counter(), time.process_time()
            analyzer.compute_pairwise_scores(
                scores_name=f"q{qi}",
                factors_name="kfac",
                query_dataset=qset,
                train_dataset=train,
                per_device_query_batch_size=len(qset),
                per_device_train_batch_size=batch_size,
                score_args=sargs,
                overwrite_output_dir=True,
            )
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            scores = analyzer.load_pairwise_scores(f"q{qi}")["all_modules"]
            per_example = scores.reshape(-1, len(session.dataset), m).sum(0).mean(1).double().numpy()
            rhos.append(spearman(per_example, r.methods["kfac"].scores))
    out.update(
        score_one_query_s_median=_median(times),
        score_one_query_cpu_s_median=_median(cpu),
        ours_query_s_median=_median(ours),
        ours_query_cpu_s_median=_median(ours_cpu),
        speedup_wall=_median(times) / _median(ours),
        speedup_cpu=_median(cpu) / _median(ours_cpu),
        spearman_vs_ours=rhos,
        spearman_median=_median(rhos),
        damping=damping,
        queries=len(rhos),
    )
    return out


# --- report ---------------------------------------------------------------------------------


def format_table(r: dict[str, Any]) -> str:
    lines = [
        f"attribution benchmark: preset {r['preset']}, M={r['mc_samples']}, device {r['device']}, "
        f"{r['threads']} threads, {r['cache']} cache"
    ]
    b = r.get("build", {})
    lines.append("")
    lines.append(f"{'method':8} {'status':12} {'build s':>9} {'size MB':>9} {'grad ms':>9} {'prep ms':>9} {'score ms':>9} {'rescore ms':>11} {'top-10 agree':>13}")
    pm = r.get("query_ms", {}).get("per_method_median", {})
    ag = r.get("agreement_top10", {})
    for name in r["methods"]:
        s = b.get("methods", {}).get(name, {})
        t = pm.get(name, {})

        def f(x, w=9, p=1):
            return f"{x:{w}.{p}f}" if isinstance(x, (int, float)) and x is not None else f"{'-':>{w}}"

        status = r.get("status", {}).get(name, {}).get("status", s.get("status", "?"))
        if s.get("cold") is False:  # loaded from an existing cache: show the time recorded when it was built
            s = {**s, "seconds": s.get("recorded_build_seconds")}
            status += "*"
        lines.append(
            f"{name:8} {status:12} {f(s.get('seconds'))} {f(s.get('size_mb'), p=2)} {f(t.get('gradient'))} "
            f"{f(t.get('prepare'))} {f(t.get('score'))} {f(r.get('rescore_ms_median', {}).get(name), 11)} "
            f"{f(ag.get(name), 13, 3)}"
        )
        reason = r.get("status", {}).get(name, {}).get("reason")
        if status != "ok" and reason:
            lines.append(f"{'':8} {reason}")
    if any(v.get("cold") is False for v in b.get("methods", {}).values()):
        lines.append("* cache existed: build time as recorded in the cache when it was built")
    lines.append("")
    if r.get("rescore_grid_ms_median"):
        from ..attribution.damping_grid import SUPPORTED

        span = f"{SUPPORTED[0]:.0e}..{SUPPORTED[1]:.0e}"
        lines.append(
            f"rescore = damping change to an arbitrary value (K-FAC in {span}: interpolated from its grid); "
            "to a value of K-FAC's damping grid (precomputed in the first pass): "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in r["rescore_grid_ms_median"].items())
            + f"; outside {span} (one exact pass over the bank): "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in r.get("rescore_exact_pass_ms_median", {}).items())
        )
    lines.append(f"cold session start (child):  {b.get('session_start_s', float('nan')):.2f} s")
    lines.append(
        f"warm session start:          {r.get('warm_start_s', float('nan')):.2f} s "
        f"(open {r.get('warm_open_s', float('nan')):.2f} s + load caches "
        f"{sum(r.get('warm_load_s', {}).values()):.2f} s)"
    )
    lines.append(f"first query after start:     {r.get('first_query_ms', float('nan')):.0f} ms")
    lines.append(f"query, all methods, median:  {r.get('query_ms', {}).get('median_total') or float('nan'):.0f} ms")
    mem = r.get("memory_warm_session", {})
    lines.append(f"warm session peak RSS:       {mem.get('peak_rss_mb', float('nan')):.0f} MB (now {mem.get('rss_mb', float('nan')):.0f} MB)")
    lines.append(f"  (this process after imports, before any session: {r.get('memory_after_imports', {}).get('rss_mb', float('nan')):.0f} MB)")
    lines.append(f"build process peak RSS:      {b.get('memory', {}).get('peak_rss_mb', float('nan')):.0f} MB")
    if "chance" in ag:
        lines.append(f"top-10 label agreement chance level: {ag['chance']:.3f}")
    q = r.get("int8_vs_float32")
    if q and "error" in q:
        lines.append(f"int8 vs float32 K-FAC: failed: {q['error']}")
    elif q:
        lines.append(
            f"int8 vs float32 K-FAC Spearman: median {q['spearman_median']:.4f}, min {q['spearman_min']:.4f} "
            f"over {q['queries']} queries (rel. L2 error {q['relative_l2_error_median']:.3g})"
        )
    k = r.get("kronfluence")
    if k and "error" in k:
        lines.append(f"kronfluence: failed: {k['error']}")
    elif k:
        lines.append(
            f"kronfluence KFAC ({k['triples']} triples): fit factors {k['fit_factors_s']:.1f} s, "
            f"score one query {k['score_one_query_s_median']:.1f} s; Spearman vs ours median "
            f"{k['spearman_median']:.3f} over {k['queries']} queries"
        )
        if "speedup_cpu" in k:
            lines.append(
                f"  same conditions, per query: kronfluence {k['score_one_query_s_median']:.1f} s wall / "
                f"{k['score_one_query_cpu_s_median']:.1f} s CPU, ours {k['ours_query_s_median']:.2f} s / "
                f"{k['ours_query_cpu_s_median']:.2f} s: {k['speedup_wall']:.0f}x (wall), {k['speedup_cpu']:.0f}x (CPU)"
            )
        kf = b.get("methods", {}).get("kfac", {})
        if kf:
            built = kf.get("recorded_build_seconds") if kf.get("cold") is False else kf.get("seconds")
            lines.append(
                f"  ours: build {built or float('nan'):.1f} s once, then query "
                f"{sum((pm.get('kfac') or {}).get(x) or 0.0 for x in ('gradient', 'prepare', 'score')):.0f} ms"
            )
    return "\n".join(lines)
