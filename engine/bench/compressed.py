"""Fidelity and speed of the compressed K-FAC bank on the digits default (issue 11).

For each projection kind (eigen, gaussian) and target ratio (8, 32, 128 by default) and the
32 gallery queries (measurement ``loss``, the default damping), against the full stored bank:

* ``spearman_median``: Spearman of the compressed scores (before re-ranking) with the full
  bank's over all N training images, median over queries;
* ``top10_overlap``: |top-10 compressed ∩ top-10 full| / 10, mean over queries;
* ``top10_overlap_reranked``: the same after exact re-ranking of the 2C = 512 candidates, shared
  between the ends as the product shares them (``rerank.CandidateSplit``, the config's
  ``kfac_rerank_split``; ``compressed_bank.Reranker``).  The candidates' exact scores are taken from the full
  stored bank, which is what re-ranking computes from fresh gradients (tests/test_compressed_bank.py
  checks the equality; here it spares 32 x 6 re-rank passes on a shared 2-core machine);
* ``query_ms``: median time of the compressed query's first pass (project + rotate the query
  gradient, score the damping grid: its 49 points and the chosen damping), without re-ranking; the full bank's is timed in the
  same run, and the re-ranking cost is timed separately (``config.rerank``);
* ``bank_mib``, ``build_s``: the bank's size in MiB (2**20 bytes), and its build time from the hooks
  (``projected_grads``) timed on ``build_examples`` examples and scaled to N (the banks used
  for the scores are derived from the stored bank, ``compress_stored_bank``: equal up to the
  stored bank's int8 rounding, and no gradient pass).

Results go to stdout (one JSON line per variant); what is about to run, and notes, to stderr (QA 27 #9).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..attribution.compressed_bank import (
    CandidateSplit,
    CompressedRows,
    compress_factors,
    compress_stored_bank,
    gather_candidates,
    local_candidates,
    rerank_scores,
)
from ..attribution.damping_grid import DAMPING_GRID
from ..attribution.layer_projection import projected_grads
from ..attribution.rerank import scale_estimates
from ..code_version import code_version
from ..config import TRUE_MC_SAMPLES
from ..evaluation.setup import load_queries_file
from ..evaluation.stats import spearman
from ..npy_read import load_npz
from . import announce
from .memory import MIB


def _overlap(a: np.ndarray, b: np.ndarray, k: int = 10, sign: float = 1.0) -> float:
    ta = set(np.argsort(-sign * a, kind="stable")[:k])
    tb = set(np.argsort(-sign * b, kind="stable")[:k])
    return len(ta & tb) / k


def _reranked(approx: np.ndarray, exact: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores as re-ranking leaves them, candidates ``idx`` exact and ranked before the rest
    (engine.attribution.results): (for the top end, for the bottom end)."""
    out = np.full_like(approx, -np.inf)
    out[idx] = exact[idx]
    low = np.full_like(approx, np.inf)
    low[idx] = exact[idx]
    return out, low


def machine(device: Any) -> dict[str, Any]:
    """The machine the timings were taken on, as bench-scale records it (QA 27 #8: a fixed string said
    "shared 2-core CPU under heavy load" on every machine)."""
    import torch

    out: dict[str, Any] = {"device": str(device), "cpu": platform.processor() or platform.machine(),
                           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return out


def check_lds_run(session: Any, run: Path, flag: str = "LDS run") -> tuple[int, int]:
    """Refuse an LDS run folder that the benchmark could not score against, before any work (QA 27 #6, #7: a
    missing folder gave a stdout note and a null LDS; a run of 4 queries failed with a tensor-shape error
    after the whole benchmark): ValueError naming ``flag``, the folder and what differs.  Returns (subset
    models trained, subsets)."""
    from ..evaluation.lds import bind_run_to_checkpoint, model_folder
    from ..evaluation.runs import is_finished

    run = Path(run)
    if not run.exists():
        raise ValueError(f"{flag} {run} does not exist")
    if not run.is_dir():
        raise ValueError(f"{flag} {run} is not a folder")
    if not (run / "subsets.npz").is_file():
        raise ValueError(f"{flag} {run} holds no subsets.npz: not an LDS run folder (attribution-engine lds --out RUN)")
    bind_run_to_checkpoint(run, session.checkpoint, record=False)  # another model's run is refused
    gallery = session.gallery()
    saved = run / "queries.pt"
    if saved.is_file():
        import torch

        ref = load_queries_file(saved)["images"]
        q = torch.stack([torch.as_tensor(it.image) for it in gallery])
        if len(ref) < len(q):
            raise ValueError(f"{flag} {run} measured {len(ref)} queries, not the {len(q)} gallery images this "
                             "benchmark scores: give a run made on the gallery's queries")
        same = [bool(torch.allclose(ref[i].to(q.dtype), q[i])) for i in range(len(q))]
        if not all(same):
            raise ValueError(f"{flag} {run}: its queries are not the {len(q)} gallery images (query "
                             f"{same.index(False)} differs{f', {same.count(False)} in all' if same.count(False) > 1 else ''})")
    with load_npz(run / "subsets.npz") as z:
        k = int((z["masks"] if "masks" in z.files else z[z.files[0]]).shape[0])
    return sum(is_finished(model_folder(run, i, 0)) for i in range(k)), k


def run_compressed_digits(
    session: Any,
    ratios: tuple[float, ...] = (8.0, 32.0, 128.0),
    kinds: tuple[str, ...] = ("eigen", "gaussian"),
    candidates: int = 256,
    damping: float | None = None,
    build_examples: int = 16,
    timed_queries: int = 4,
    rerank_timed: int = 8,
    lds_full: float | None = None,
    lds_run: Path | None = None,
    lds_partial: bool = False,
    log: Callable[[str], None] = print,
    say: Callable[[str], None] = announce.say,
    lds_flag: str = "LDS run",
) -> dict[str, Any]:
    """The ``compressed_digits.json`` record for a session whose K-FAC bank is stored and built.

    ``lds_partial``: score the LDS on the subset models trained so far (a preliminary figure, the
    full bank's LDS then taken on the same subsets) instead of waiting for all of them.
    ``log``: the results (a line per variant); ``say``: what is about to run, and notes (stderr); ``lds_flag``:
    how an error about ``lds_run`` names it (the CLI's ``--lds-run``)."""
    from ..model.measurements import parse_measurement

    lds_note = "null: see the report for the command once the K=32 LDS subset models exist"
    if lds_run is not None:  # a missing, foreign or other-query run is refused before the work, not after it
        done, k = check_lds_run(session, Path(lds_run), flag=lds_flag)
        if done < (3 if lds_partial else k):  # said now, not after the benchmark; no LDS phase then
            say(f"warning: only {done} of {k} subset models in {lds_run} are trained: the LDS will be left null"
                + ("" if lds_partial else " (--lds-partial scores the ones trained so far, at least 3)"))
            lds_note = f"null: only {done} of {k} subset models of {lds_run} were trained"
            lds_run = None
    kfac = session.method("kfac")
    ctx = session.ctx
    say("loading the stored K-FAC bank ...")
    kfac.build(ctx)
    lam = kfac.default_damping if damping is None else float(damping)
    meas = parse_measurement("loss", session.diffusion.T)
    draws = session.query_draws()
    gallery = session.gallery()
    n = len(ctx.dataset)
    split = CandidateSplit(adaptive=session.config.kfac_rerank_split == "adaptive")  # the product's
    log(f"{len(gallery)} gallery queries, N={n}, M={len(ctx.train_draws)}, damping {lam:g}, "
        f"candidate split {session.config.kfac_rerank_split}")
    say(f"computing the {len(gallery)} gallery queries' gradients (M={len(draws)} draws each, not timed) ...")
    grads = [session.query_gradient(meas, item_query(item), draws) for item in gallery]

    say(f"timing the full stored bank's first pass on {min(timed_queries, len(grads))} queries, and scoring "
        f"all {len(grads)} ...")
    full_scores, full_ms = [], []
    for i, g in enumerate(grads):
        t0 = time.perf_counter()
        prep = kfac.prepare(ctx, None, g)
        if i >= timed_queries:  # fidelity only: one damping, no grid (the machine is shared)
            prep.query.use_grid = False
        full_scores.append(kfac.score(prep, lam))
        if i < timed_queries:
            full_ms.append((time.perf_counter() - t0) * 1000.0)
    full_mib = kfac.bank.nbytes / MIB

    variants, extras = [], {}
    product_scores: dict[str, list[np.ndarray]] = {"full": full_scores}
    rerank_info: dict[str, Any] = {}
    for kind in kinds:
        for ratio in ratios:
            say(f"{kind} {ratio:g}x: deriving the bank, timing its build on {min(build_examples, n)} examples "
                f"and its first pass on {min(timed_queries, len(grads))} queries, scoring all {len(grads)} ...")
            comp = compress_factors(kfac.factors, kind, ratio, seed=session.config.seed)
            t0 = time.perf_counter()
            bank = compress_stored_bank(kfac.bank, comp)
            derive_s = time.perf_counter() - t0
            b = min(build_examples, n)
            t0 = time.perf_counter()
            for s in range(0, b, 8):
                rows = slice(s, min(b, s + 8))  # per-example draws are each row's own (as compressed_bank's build)
                projected_grads(ctx.model, ctx.diffusion, ctx.dataset.images[rows], ctx.train_draws.for_rows(rows),
                                ctx.params, comp.projections, comp.blocks)
            build_s = (time.perf_counter() - t0) / b * n
            cfg = dataclasses.replace(session.config, kfac_bank="compressed", kfac_projection=kind,
                                      kfac_compression=ratio, kfac_rerank=0)
            method = type(kfac)(cfg)
            method.factors, method._eigenvalues = kfac.factors, kfac._eigenvalues
            method.bank = CompressedRows(bank, comp, lambda *a: None, 0)  # re-ranking emulated below
            ctx_c = dataclasses.replace(ctx, config=cfg)
            method._key = method._ctx_key(ctx_c)
            sp, top, top_rr, bot, bot_rr, ms = [], [], [], [], [], []
            for i, (g, ref) in enumerate(zip(grads, full_scores, strict=True)):
                t0 = time.perf_counter()
                prep = method.prepare(ctx_c, None, g)
                if i >= timed_queries:
                    prep.query.use_grid = False
                approx = method.score(prep, lam)
                if i < timed_queries:
                    ms.append((time.perf_counter() - t0) * 1000.0)
                cand = gather_candidates(approx, 0, candidates, split)
                hi, lo = _reranked(approx, ref, cand)
                shown = approx.copy()
                shown[cand] = ref[cand]
                mask = np.zeros(shown.shape[0], dtype=bool)
                mask[cand] = True
                # as the product answers: the estimates on the exact scale (rerank.scale_estimates); and raw
                product_scores.setdefault(f"{kind}@{ratio:g}", []).append(scale_estimates(shown, approx, mask)[0])
                product_scores.setdefault(f"{kind}@{ratio:g}:raw", []).append(shown)
                sp.append(spearman(approx, ref))
                top.append(_overlap(approx, ref))
                top_rr.append(_overlap(hi, ref))
                bot.append(_overlap(approx, ref, sign=-1.0))
                bot_rr.append(_overlap(lo, ref, sign=-1.0))
            if not rerank_info and rerank_timed > 0:
                say(f"timing the exact re-rank on {rerank_timed} candidates (fresh gradients) ...")
                prep = method.prepare(ctx_c, None, grads[0])
                idx, _ = local_candidates(method.score(prep, lam), rerank_timed // 2)
                t0 = time.perf_counter()
                exact = rerank_scores(ctx.model, ctx.diffusion, ctx.dataset.images[idx], ctx.train_draws.for_indices(idx),
                                      kfac.factors, ctx.params, kfac.factors.rotate(grads[0].to(ctx.device)),
                                      [lam], n)[:, 0]
                per = (time.perf_counter() - t0) / len(idx)
                rq = kfac.factors.rotate(grads[0].to(ctx.device))
                t0 = time.perf_counter()
                kfac.factors.unrotate(rq)
                unrotate_s = time.perf_counter() - t0
                grid = len(DAMPING_GRID) + 1
                rerank_info = {
                    "timed_candidates": int(len(idx)),
                    "ms_per_candidate": per * 1000.0,
                    "unrotate_query_ms": unrotate_s * 1000.0,
                    "projected_ms_for_2C": (per * 2 * candidates + grid * unrotate_s) * 1000.0,
                    "how": f"2C = {2 * candidates} fresh gradients at M={len(ctx.train_draws)} and {grid} damped "
                           f"queries ({len(DAMPING_GRID)} grid points and the chosen damping) rotated back once "
                           "(compressed_bank.rerank_scores)",
                    "max_abs_diff_vs_stored_bank": float(np.abs(exact - full_scores[0][idx]).max()),
                    "max_abs_score": float(np.abs(full_scores[0]).max()),
                }
            v = {
                "projection": kind,
                "ratio": round(kfac.bank.nbytes / bank.nbytes, 2),
                "bank_mib": bank.nbytes / MIB,
                "build_s": build_s,
                "query_ms": statistics.median(ms),
                "spearman_median": statistics.median(sp),
                "top10_overlap": float(np.mean(top)),
                "top10_overlap_reranked": float(np.mean(top_rr)),
                "lds": None,
            }
            extras[f"{kind}@{ratio:g}"] = {
                "target_ratio": ratio,
                "spearman_min": min(sp),
                "bottom10_overlap": float(np.mean(bot)),
                "bottom10_overlap_reranked": float(np.mean(bot_rr)),
                "derived_from_stored_s": derive_s,
            }
            variants.append(v)
            # without its LDS, which is scored after every variant (its own line then): "lds": null here was
            # shown even with --lds-run (QA 27 #9)
            log(json.dumps({k: x for k, x in v.items() if k != "lds"}))
    if lds_run is not None:
        per_query: dict[str, list[float | None]] = {}
        say(f"LDS: measuring the true losses of {lds_run}'s subset models on the {len(gallery)} queries "
            "(kept beside the models), then scoring every variant ...")
        lds = variant_lds(product_scores, Path(lds_run), [it.image for it in gallery], ctx.dataset,
                          lambda m: say(f"warning: {m}"), partial=lds_partial, per_query=per_query)
        if lds is not None:
            from ..evaluation.lds_ablation import paired_difference

            for v, key in zip(variants, extras, strict=True):
                v["lds"] = lds[key]
                extras[key]["lds_raw_estimates"] = lds[f"{key}:raw"]  # before estimates were rescaled (2026-12-05)
                # both columns share the candidates, subsets, models and queries: the paired difference is the test
                extras[key]["lds_rescaled_minus_raw"] = paired_difference(per_query[key], per_query[f"{key}:raw"],
                                                                          "raw estimates")
                extras[key]["lds_minus_full"] = paired_difference(per_query[key], per_query["full"], "full bank")
            lds_full_here, k_used = lds["full"], int(lds["subsets"])
            lds_note = (f"K={k_used} subsets of {lds_run}{' (PRELIMINARY: the models trained so far)' if lds_partial else ''}"
                        f", true loss measured with {TRUE_MC_SAMPLES} draws (engine.evaluation.lds); scores as the "
                        "product shows them (candidates exact, the rest compressed estimates times the factor "
                        "fitted on the candidates; per_variant.lds_raw_estimates: the estimates unscaled); "
                        f"full bank here: {lds_full_here:.3f}"
                        f" at M={len(ctx.train_draws)}")
            if lds_full is None or lds_partial:
                lds_full = lds_full_here
            log(f"LDS (K={k_used}): full bank {lds_full_here:.3f}; "
                + ", ".join(f"{key} {lds[key]:.3f}" for key in extras))
    return {
        "config": {
            "preset": session.preset.name,
            "checkpoint_hash": session.checkpoint_hash,
            "num_train": n,
            "mc_samples": len(ctx.train_draws),
            "queries": f"the {len(gallery)} gallery queries, measurement loss",
            "damping": lam,
            "candidates_per_end": candidates,
            "candidate_split": session.config.kfac_rerank_split,
            "reference": "the full stored int8 bank (same factors, same draws)",
            "scores": "compressed banks derived from the stored bank's rows (compress_stored_bank); re-ranked "
                      "candidates' exact scores taken from the stored bank (what re-ranking computes)",
            "build_s": f"hooks-projected gradients timed on {build_examples} examples, scaled to N",
            "query_ms": f"median over the first {timed_queries} queries of the first answer, without re-ranking: "
                        f"compressed banks project + rotate the query and score the damping grid ({len(DAMPING_GRID)} "
                        "points and the chosen damping) in that pass; "
                        "the full stored bank rotates and scores the one damping (its grid comes after the "
                        "answer: EigenbasisQuery.grid_first=False); the other queries are scored at the one "
                        "damping only",
            "rerank": rerank_info,
            "lds": lds_note,
            "machine": {**machine(session.device), "note": "full and compressed timed in one run"},
            "load_average_at_end": list(os.getloadavg()),
            "code": code_version(),  # which code made the figures
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "per_variant": extras,
        },
        "full": {"lds": lds_full, "bank_mib": full_mib, "query_ms": statistics.median(full_ms)},
        "variants": variants,
    }


def variant_lds(
    scores: dict[str, list[np.ndarray]], run: Path, queries: list, dataset: Any, log: Callable[[str], None] = print,
    partial: bool = False, per_query: dict[str, list[float | None]] | None = None,
) -> dict[str, float] | None:
    """LDS of each entry's per-query scores with the LDS run's subsets and true measurements (engine.evaluation.lds),
    plus ``"subsets"``: how many subsets had a model; ``per_query`` (when given) receives each entry's
    per-query Spearman correlations, for paired differences.

    None when the run's models are not all trained (the report gives the command to rerun); with
    ``partial`` the subsets whose model is trained are used (at least 3).
    """
    import torch

    from ..evaluation.lds import lds_table, measured_matrix, predicted_matrix, seed_average
    from ..evaluation.runs import MeasureSpec

    subsets = run / "subsets.npz"
    if not subsets.is_file():
        log(f"no LDS subsets in {run}: LDS left null")
        return None
    with load_npz(subsets) as z:
        masks = z[z.files[0]] if "masks" not in z.files else z["masks"]
    from ..evaluation.lds import model_folder
    from ..evaluation.runs import is_finished

    need = 3 if partial else masks.shape[0]
    done = sum(is_finished(model_folder(run, k, 0)) for k in range(masks.shape[0]))
    if done < need:  # measure nothing (cached beside the models) until enough exist
        log(f"only {done} of {masks.shape[0]} subset models in {run} are trained: LDS left null")
        return None
    q = torch.stack([torch.as_tensor(x) for x in queries])
    saved = run / "queries.pt"
    if saved.is_file():  # check_lds_run refuses such a run before the work; this guards other callers
        ref = load_queries_file(saved)["images"][: len(q)]  # no unpickling of code
        if ref.shape != q.shape or not torch.allclose(ref.to(q.dtype), q):
            raise ValueError(f"the LDS run {run}'s queries are not the {len(q)} queries scored here")
    measured = seed_average(measured_matrix(run, masks, 1, q, MeasureSpec("loss", TRUE_MC_SAMPLES), dataset.levels))
    usable = int(np.all(np.isfinite(measured), axis=0).sum())
    if usable < need:
        log(f"only {usable} of {masks.shape[0]} subset models are trained: LDS left null")
        return None
    predicted = predicted_matrix(lambda i: {k: v[i] for k, v in scores.items()}, masks, len(q))
    table = lds_table(predicted, measured)
    if per_query is not None:
        per_query.update({k: r["per_query"] for k, r in table.items()})
    return {**{k: float(r["lds"]) for k, r in table.items()}, "subsets": usable}


def open_stored_kfac(preset_name: str, cache_root: str) -> tuple[Any, Any]:
    """(session, its built K-FAC method) of a preset's shipped checkpoint with the *stored* bank under
    ``cache_root``, the reference the compressed bank's measurements compare with; RuntimeError naming the
    build command when it is not there."""
    from ..attribution.session import AttributionSession
    from ..config import get_preset
    from ..paths import default_checkpoint

    preset = get_preset(preset_name)
    config = dataclasses.replace(preset.attribution, kfac_bank="stored")
    s = AttributionSession(preset, checkpoint=str(default_checkpoint(preset_name)), cache_root=cache_root,
                           config=config, auto_build=False)
    kfac = s.method("kfac")
    if not kfac.is_built(s.ctx):
        raise RuntimeError(f"no stored K-FAC bank under {cache_root}: run `{s.build_command(['kfac'])}` first")
    kfac.build(s.ctx)
    return s, kfac


def item_query(item: Any) -> Any:
    from ..attribution.query import QueryInput

    return QueryInput(image=item.image, trajectory=item.trajectory, description=f"gallery:{item.index}")


def query_sets(session: Any, fresh: int = 0, fresh_seed: int = 2000) -> list[tuple[str, list[Any]]]:
    """[("gallery", its queries)] and, with ``fresh``, ("fresh:SEED", that many new samples of the model at
    sampling seed ``fresh_seed``; the gallery's is 1000): the query sets of the compressed bank's diagnostics,
    so that a figure chosen on the gallery can be checked on samples it was not chosen on."""
    from ..attribution.query import QueryInput

    sets: list[tuple[str, list[Any]]] = [("gallery", [item_query(item) for item in session.gallery()])]
    if fresh:
        from ..model.sampling import generate

        images, _ = generate(session.model, session.preset, fresh, fresh_seed, device=str(session.device), progress=True)
        sets.append((f"fresh:{fresh_seed}", [QueryInput(image=im, description=f"fresh:{i}")
                                             for i, im in enumerate(images.cpu().clamp(-1, 1))]))
    return sets


@dataclasses.dataclass
class DerivedCompressed:
    """A stored K-FAC bank and the compressed bank derived from its rows (``compress_stored_bank``) at the
    config's projection and ratio: equal to a built compressed bank up to int8 rounding, and no gradient
    pass, so the diagnostics can compare the two on every query (scripts/candidate_split.py, estimate_scale.py)."""

    kfac: Any  # the built KFACInfluence with the stored bank (``open_stored_kfac``)
    comp: Any  # CompressedFactors
    bank: Any  # the derived compressed RotatedBank

    def scores(self, grad: Any, damping: float) -> tuple[np.ndarray, np.ndarray]:
        """(eq. 6's scores from the stored bank, the compressed scan's estimates) of one query gradient, (N,) each."""
        k, c = self.kfac, self.comp
        full = k.bank.inner(k.factors.rotate(grad) / (k._eigenvalues + damping)).numpy()
        approx = self.bank.inner(c.factors.rotate(c.project(grad)) / (c.factors.eigenvalues() + damping)).numpy()
        return full, approx


def derive_compressed(kfac: Any, config: Any, whiten: float | None = None) -> DerivedCompressed:
    """The compressed bank of ``config`` (projection, ratio, seed) derived from ``kfac``'s stored bank;
    ``whiten``: on the whitened int8 grid (a measurement option; the product's compressed rows are plain)."""
    comp = compress_factors(kfac.factors, config.kfac_projection, config.kfac_compression, seed=config.seed)
    return DerivedCompressed(kfac, comp, compress_stored_bank(kfac.bank, comp, whiten=whiten))


def save(record: dict[str, Any], path: Path) -> None:
    """Atomically (``files.save_json``): a kill during the write must not leave a truncated results file in
    assets/results, which the README's figures come from (QA round 13)."""
    from .. import files

    path.parent.mkdir(parents=True, exist_ok=True)
    files.save_json(path, record)


__all__ = ["run_compressed_digits", "save"]
