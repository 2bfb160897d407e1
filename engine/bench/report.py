"""The attribution bench's figures as a plain-text table."""

from __future__ import annotations

import statistics
from typing import Any

from ..attribution.caches import sharing_words


def median(xs: list[float]) -> float | None:
    """The median of the figures measured, None when there are none."""
    return float(statistics.median(xs)) if xs else None


def sharing_note(name: str, sharing: dict[str, Any] | None) -> str | None:
    """``name: <what its recorded build time means>`` when its cache was built in a shared gradient pass
    (``engine.attribution.caches.sharing_words``), or None."""
    words = sharing_words(name, sharing)
    return None if words is None else f"{name}: {words}"


def format_table(r: dict[str, Any]) -> str:
    lines = [
        f"attribution benchmark: preset {r['preset']}, M={r['mc_samples']}, device {r['device']}, "
        f"{r['threads']} threads, {r['cache']} cache"
    ]
    b = r.get("build", {})
    lines.append("")
    lines.append(f"{'method':8} {'status':12} {'build s':>9} {'size MiB':>9} {'grad ms':>9} {'prep ms':>9} {'score ms':>9} {'rescore ms':>11} {'top-10 agree':>13}")
    pm = r.get("query_ms", {}).get("per_method_median", {})
    ag = r.get("agreement_top10", {})
    shared_notes: list[str] = []
    for name in r["methods"]:
        s = b.get("methods", {}).get(name, {})
        t = pm.get(name, {})

        def f(x, w=9, p=1):
            return f"{x:{w}.{p}f}" if isinstance(x, (int, float)) and x is not None else f"{'-':>{w}}"

        status = r.get("status", {}).get(name, {}).get("status", s.get("status", "?"))
        if s.get("cold") is False:  # loaded from an existing cache: show the time recorded when it was built
            s = {**s, "seconds": s.get("recorded_build_seconds")}
            status += "*"
            note = sharing_note(name, s.get("recorded_build_sharing"))
            if note:
                status += "+"
                shared_notes.append(note)
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
    for note in shared_notes:
        lines.append(f"+ {note}")
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
    lines.append(f"warm session peak RSS:       {mem.get('peak_rss_mb', float('nan')):.0f} MiB (now {mem.get('rss_mb', float('nan')):.0f} MiB)")
    lines.append(f"  (this process after imports, before any session: {r.get('memory_after_imports', {}).get('rss_mb', float('nan')):.0f} MiB)")
    lines.append(f"build process peak RSS:      {b.get('memory', {}).get('peak_rss_mb', float('nan')):.0f} MiB")
    if ag.get("note"):  # the column's "-": say why (it was only in the JSON)
        lines.append(f"top-10 label agreement: not measured: {ag['note']}")
    if "chance" in ag:
        lines.append(f"top-10 label agreement chance level: {ag['chance']:.3f}")
    if ag.get("ci95"):
        lines.append("top-10 label agreement, 95% bootstrap interval over the queries: "
                     + ", ".join(f"{k} [{lo:.3f}, {hi:.3f}]" for k, (lo, hi) in ag["ci95"].items()))
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
            fed = (kf.get("recorded_build_sharing") or {}).get("fed") if kf.get("cold") is False else None
            lines.append(
                f"  ours: build {built or float('nan'):.1f} s once"
                + (f" (its gradient pass also filled {', '.join(fed)})" if fed else "")
                + f", then query {sum((pm.get('kfac') or {}).get(x) or 0.0 for x in ('gradient', 'prepare', 'score')):.0f} ms"
            )
    return "\n".join(lines)
