"""LDS ablations on an existing LDS run: same subsets, models, queries and statistics, other settings.

Each ablation is a list of variants of ``AttributionConfig`` (docs/architecture.md §4-6, issue "fidelity to
the paper"); every variant is scored with ``engine.evaluation.lds``'s protocol (its damping sweep, predicted
m(S_j) = m_full + sum_{i not in S_j} tau_i, Spearman over subsets, mean over queries, bootstrap
95% intervals over queries) against the run's retrained subset models:

* ``draws``: K-FAC with the same M draws for every example (``shared``) vs independent draws per
  example (``per-example``, paper G.3);
* ``trak_dim`` (per-example draws, the default) and ``trak_dim_shared`` (round 1's shared draws): TRAK
  and D-TRAK at projection dimension k = 2,048, 8,192 and 32,768 (the paper's),
  each also at its best damping of the sweep (chosen on the same queries: optimistic for the
  baselines, which is the point: they get their best shot);
* ``kfac_blocks``: K-FAC with weight and bias in separate blocks vs one joint block per layer;
* ``factor_draws``: K-FAC factors from all M per-example draws vs the first k = 8 (an 8x cheaper factor pass);
* ``mc_samples``: M = 64 (the default) vs 32 and 128 Monte Carlo draws per example for every gradient method;
* ``query_draws``: the query gradient on its own draws vs the bank's shared draws (common random numbers);
* ``bank_grid``: the stored K-FAC bank's int8 rows on the plain grid vs the grid whitened by the eigenvalues.

The run folder (``attribution-engine lds`` output) is only read: true measurements already cached
beside its models are reused, missing ones are computed into ``out``.  Caches of settings other
than the defaults go to their own cache root (their keys differ); a ``baseline`` root holding the
defaults (e.g. the shared digits cache) is used read-only when it has them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..attribution.methods import gradient_methods
from ..config import AttributionConfig
from ..files import save_json
from ..npy_read import load_npz
from .lds import (
    SWEEP_FIELDS,
    LDSConfig,
    best_sweep_point,
    bind_run_to_checkpoint,
    lds_table,
    model_folder,
    noise_report,
    predicted_matrix,
    seed_average,
    sweep_points,
)
from .lds_report import run_identity
from .lds_run import SWEEP_GRID, _rows_score_fn, lds_queries, session_scores
from .runs import MeasureSpec, cached_measurements, is_finished, measurement_file_name
from .setup import RunSetup, load_queries_file
from .stats import bootstrap_ci

TRAK_DIMS = (2048, 8192, 32768)


@dataclass(frozen=True)
class Variant:
    """One setting of an ablation: a label, the config changes and the methods it scores (``names()``).

    ``methods`` None: every gradient method of the registry (``gradient_methods``: K-FAC, TRAK, D-TRAK and any
    method file added since, QA 70 F3), read when the variant is used."""

    label: str
    changes: dict[str, Any] = field(default_factory=dict)
    methods: tuple[str, ...] | None = ("kfac",)

    def names(self) -> tuple[str, ...]:
        """The methods this variant scores, in the registry's display order for ``methods`` None."""
        return tuple(gradient_methods()) if self.methods is None else self.methods


EVERY_GRADIENT_METHOD = None  # Variant.methods for "every gradient method"


# Every variant names the draw settings it was measured with, so that its label stays true whatever the
# preset's defaults are (digits: per-example draws, factors from 8 of 64 since the K=32 LDS below)
SHARED_ALL = {"draws": "shared", "kfac_factor_draws": None, "kfac_factor_draws_mode": "same"}
PER_EXAMPLE_ALL = {"draws": "per-example", "kfac_factor_draws": None, "kfac_factor_draws_mode": "same"}

ABLATIONS: dict[str, tuple[Variant, ...]] = {
    "draws": (Variant("shared", SHARED_ALL), Variant("per-example", PER_EXAMPLE_ALL)),
    # TRAK / D-TRAK at the paper's k, with today's per-example draws and with round 1's shared ones
    "trak_dim": tuple(Variant(f"k={k}", {**PER_EXAMPLE_ALL, "trak_dim": k}, ("trak", "dtrak")) for k in TRAK_DIMS),
    "trak_dim_shared": tuple(
        Variant(f"k={k}", {**SHARED_ALL, "trak_dim": k}, ("trak", "dtrak")) for k in TRAK_DIMS
    ),
    "kfac_blocks": (
        Variant("separate", {**SHARED_ALL, "kfac_blocks": "separate"}),
        Variant("joint", {**SHARED_ALL, "kfac_blocks": "joint"}),
    ),
    # factors from the first k of the M draws (issue 12: the factor pass is most of a cold build); only with
    # per-example draws (with shared ones the factors would see k of the bank's M timesteps: refused)
    "factor_draws": tuple(
        Variant(label, {**PER_EXAMPLE_ALL, "kfac_factor_draws": k})
        for label, k in (("per-example, all", None), ("per-example, k=8", 8), ("per-example, k=4", 4),
                         ("per-example, k=2", 2))
    ),
    # issue 12: what halving the Monte Carlo draws per example would cost (the bank pass, which feeds all three
    # gradient methods, is most of a cold build and scales with M), and what doubling them gains (the paper used
    # 250); every gradient method, the preset's factor draws (8), the query gradient at the same M
    "mc_samples": tuple(
        Variant(f"M={m}", {**PER_EXAMPLE_ALL, "kfac_factor_draws": 8, "mc_samples": m}, EVERY_GRADIENT_METHOD)
        for m in (64, 32, 128)
    ),
    # issue 13 item 5, the baselines' best shot: TRAK and D-TRAK at the paper's k = 32,768 and the larger of the
    # mc_samples ablation's M (both raise their LDS there; K-FAC at that M is in mc_samples)
    "trak_best": (
        Variant("k=32768, M=128", {**PER_EXAMPLE_ALL, "kfac_factor_draws": 8, "mc_samples": 128, "trak_dim": 32768},
                ("trak", "dtrak")),
    ),
    # issue 13 item 2 for the factors alone: the bank keeps the shared draws, the factors get 8 independent
    # draws per example (every timestep seen; an eighth of the factor pass)
    "factor_draws_mode": (
        Variant("shared", SHARED_ALL),  # the bank's draws
        Variant("per-example, k=8", {**SHARED_ALL, "kfac_factor_draws_mode": "per-example", "kfac_factor_draws": 8}),
    ),
    # the query gradient on its own draws (paper G.3) or on the bank's shared draws (common random numbers with
    # every training example: AttributionSession.query_draws); same banks, only the query side differs
    "query_draws": tuple(
        Variant(label, {**SHARED_ALL, "query_draws": label}, EVERY_GRADIENT_METHOD) for label in ("own", "bank")
    ),
    # the stored bank's int8 grid: one step per (example, block), or whitened by the eigenvalues (bank.whitening,
    # 2026-12-05); the preset's draws and factors, only the rounding differs
    "bank_grid": (
        Variant("plain", {"kfac_bank_whiten": None}),
        Variant("whitened", {"kfac_bank_whiten": AttributionConfig.kfac_bank_whiten}),  # the default floor
    ),
}


def measured_readonly(
    run: Path,
    masks: np.ndarray,
    seeds: int,
    queries: torch.Tensor,
    spec: MeasureSpec,
    levels: int,
    out: Path,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> np.ndarray:
    """True measurements (R, Q, K) of the run's finished models without writing into the run:
    values the run cached beside a model are read, others are computed into ``out/measurements``."""
    vals = np.full((seeds, len(queries), len(masks)), np.nan)
    name = measurement_file_name(spec, queries)
    for r in range(seeds):
        for k in range(len(masks)):
            folder = model_folder(run, k, r)
            if not is_finished(folder):
                continue
            existing = folder / "measurements" / name
            if existing.is_file():
                vals[r, :, k] = json.loads(existing.read_text())["values"]
                continue
            log(f"measuring {folder.name} ({spec.mc_samples} draws per query)")
            vals[r, :, k] = cached_measurements(
                folder, queries, spec, levels, device, cache_dir=Path(out) / "measurements" / folder.name
            )
    return vals


def read_subsets(run: Path, dataset: Any, cfg: Any) -> np.ndarray:
    """The run's keep masks (K, N), read only; an error if they were made for other data or settings."""
    from .lds import data_digest

    path = Path(run) / "subsets.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{run} has no subsets.npz: not an LDS run folder")
    with load_npz(path) as z:
        settings, masks = json.loads(str(z["settings"])), z["masks"]
    want = {"fraction": cfg.fraction, "subset_seed": cfg.subset_seed, "data": data_digest(dataset)}
    if settings != want or len(masks) < cfg.subsets:
        raise ValueError(f"{path} holds {len(masks)} subsets made with {settings}, not {cfg.subsets} with {want}")
    return masks[: cfg.subsets]


def run_queries(run: Path, setup: RunSetup, num: int) -> tuple[torch.Tensor, str]:
    """The run's own query images when it saved them (read only), else the same ones ``engine.evaluation.lds``
    would pick (the gallery beside the checkpoint, or samples of the full model), kept in ``setup.out``."""
    path = Path(run) / "queries.pt"
    if path.is_file():
        saved = load_queries_file(path)  # tensors and strings only: unpickling could run code
        if saved["images"].shape[0] >= num:
            return saved["images"][:num], f"{saved['source']} (from {path})"
    return lds_queries(setup, num)


def variant_session(
    setup: RunSetup, variant: Variant, cache_root: Path, baseline: Path | None,
    log: Callable[[str], None] | None = None,
) -> tuple[Any, Path]:
    """A session with the variant's settings: on ``baseline`` (read-only) when every method of the
    variant is already built there, else on ``cache_root`` building what is missing, after copying from
    ``baseline`` the caches it holds under the variant's keys (a bank-grid variant shares the baseline's
    K-FAC factors: QA 25 #2; ``log`` names each one copied)."""
    from ..attribution.session import AttributionSession

    config = replace(setup.preset.attribution, **variant.changes)
    base = None
    if baseline is not None and Path(baseline).is_dir():
        base = AttributionSession(
            preset=setup.preset, checkpoint=setup.checkpoint, device=setup.device, cache_root=baseline,
            config=config, dataset=setup.dataset, auto_build=False,
        )
        if all(base.method(m).is_built(base.ctx) for m in variant.names()):
            return base, Path(baseline)
    s = AttributionSession(
        preset=setup.preset, checkpoint=setup.checkpoint, device=setup.device, cache_root=cache_root,
        config=config, dataset=setup.dataset, auto_build=True,
    )
    if base is not None and base.ctx.store is not None and s.ctx.store is not None:
        for m in variant.names():
            for name, settings in s.method(m).cache_keys(s.ctx):
                if s.ctx.store.copy_from(base.ctx.store, name, settings) and log is not None:
                    log(f"[{variant.label}] {name} copied from the baseline cache {baseline} (same key)")
    return s, Path(cache_root)


def build_variants(
    setup: RunSetup, names: list[str], cache_root: Path, baseline: Path | None, log: Callable[[str], None] = print
) -> None:
    """Build every cache the ablations need (no subset models needed: run it while they train).

    TRAK and D-TRAK build all k of the sweep from one gradient pass each (``TRAK.build_dims``).  Each build
    shows a bar on stderr, as ``build`` does (QA 25 #2: a variant's factor and bank passes ran 159 s in silence).
    """
    from ..attribution.terminal_progress import terminal_progress

    for name in names:
        for variant in ABLATIONS[name]:
            session, root = variant_session(setup, variant, cache_root, baseline, log=log)
            todo = [m for m in variant.names() if not session.method(m).is_built(session.ctx)]
            if len(todo) > 1 and name != "trak_dim":  # one training-gradient pass for K-FAC's bank and the TRAKs
                t0 = time.perf_counter()
                log(f"[{name}/{variant.label}] building {', '.join(todo)} into {root} (one shared gradient pass)")
                with terminal_progress(f"{name}/{variant.label}") as progress:
                    session.build(todo, progress=progress)
                log(f"[{name}/{variant.label}] built in {time.perf_counter() - t0:.0f} s")
            for m in variant.names():
                method = session.method(m)
                if method.is_built(session.ctx):
                    continue
                t0 = time.perf_counter()
                log(f"[{name}/{variant.label}] building {m} into {root}")
                with terminal_progress(f"{name}/{variant.label} {m}") as progress:
                    if m in ("trak", "dtrak") and name == "trak_dim":
                        method.build_dims(session.ctx, list(TRAK_DIMS), progress)
                    else:
                        method.build(session.ctx, progress)
                log(f"[{name}/{variant.label}] {m} built in {time.perf_counter() - t0:.0f} s")


def ablation_file_name(preset: str, name: str) -> str:
    """The results file of ablation ``name`` of a preset's LDS run (``lds_<preset>_ablation_<name>.json``): the
    name ``run_ablations`` writes and ``lds_best`` reads (``*`` for every ablation)."""
    return f"lds_{preset}_ablation_{name}.json"


def run_ablation(
    setup: RunSetup,
    name: str,
    masks: np.ndarray,
    per_seed: np.ndarray,
    queries: torch.Tensor,
    spec: MeasureSpec,
    source: str,
    cache_root: Path,
    baseline: Path | None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Score every variant of ablation ``name`` and return its results record."""
    measured = seed_average(per_seed)
    variants: dict[str, Any] = {}
    first: dict[str, tuple[str, list[float | None]]] = {}  # method -> (first variant's label, its per-query LDS)
    for variant in ABLATIONS[name]:
        session, root = variant_session(setup, variant, cache_root, baseline)
        out = setup.out / "ablation" / name / variant.label.replace("=", "")
        rows, info = session_scores(session, queries, spec.measurement, list(variant.names()), out)
        names = sorted({k for r in rows for k in r})
        table = lds_table(predicted_matrix(_rows_score_fn(rows, names), masks, len(queries)), measured)
        methods = {}
        for m in variant.names():
            if m not in table:
                methods[m] = {"status": info.get(m, {}).get("status"), "reason": info.get(m, {}).get("reason")}
                continue
            sweep = sweep_points(table, m)
            methods[m] = {
                **{k: table[m][k] for k in SWEEP_FIELDS},
                "damping": info.get(m, {}).get("damping"),
                "best": best_sweep_point(sweep),
                "sweep": sweep,
            }
            if m in first:
                methods[m]["vs_first"] = paired_difference(table[m]["per_query"], first[m][1], first[m][0])
            else:
                first[m] = (variant.label, table[m]["per_query"])
        variants[variant.label] = {
            "changes": variant.changes,
            "cache_root": str(root),
            "attribution": asdict(session.config),
            "methods": methods,
        }
        log(format_variant(name, variant.label, methods))
    identity = run_identity(setup, masks, per_seed, spec, source)
    created = identity.pop("created")
    return {
        "ablation": name,
        # the run's identity as its own record states it (lds_best.check_comparable compares the two)
        "config": {**identity, "run": str(setup.out), "damping_grid": list(SWEEP_GRID), "created": created},
        "variants": variants,
        "noise": noise_report(per_seed),
    }


def paired_difference(per_query: list[float | None], base: list[float | None], base_label: str,
                      seed: int = 0) -> dict[str, Any]:
    """LDS of a variant minus the ablation's first variant's, paired on the same queries and subsets.

    Why: both LDS values share the subsets, the retrained models and the queries, so most of their
    (wide) intervals is common noise; the difference of per-query Spearman correlations, bootstrapped
    over queries, is what says whether a setting matters."""
    a = np.array([np.nan if v is None else v for v in per_query], dtype=np.float64)
    b = np.array([np.nan if v is None else v for v in base], dtype=np.float64)
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    lo, hi = bootstrap_ci(d, seed=seed) if len(d) > 1 else (float("nan"), float("nan"))
    return {"baseline": base_label, "difference": float(d.mean()) if len(d) else float("nan"),
            "ci95": [float(lo), float(hi)], "queries": int(len(d))}


def format_variant(name: str, label: str, methods: dict[str, Any]) -> str:
    lines = []
    for m, r in methods.items():
        if "lds" not in r:
            lines.append(f"{name:<12}{label:<13}{m:<7} {r.get('status')}: {r.get('reason')}")
            continue
        b = r.get("best") or {}
        best = (
            f"  best {b['lds']:+.3f} [{b['ci95'][0]:+.3f}, {b['ci95'][1]:+.3f}] at {b['damping']:.0e}" if b else ""
        )
        lines.append(
            f"{name:<12}{label:<13}{m:<7} LDS {r['lds']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]"
            f" at {r['damping']:.1e}{best}"
        )
        v = r.get("vs_first")
        if v:
            lines.append(f"{'':<25}{m:<7} minus {v['baseline']}: {v['difference']:+.3f} "
                         f"[{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}] (paired over {v['queries']} queries)")
    return "\n".join(lines)


@dataclass(frozen=True)
class AblationJob:
    """What ``lds-ablation`` runs: the ablations of one LDS run folder (read only), typed for scripts.

    ``lds`` must be the run's own subsets/seeds/fraction (the subsets are read back, not drawn);
    ``build_only``: build the variants' caches and stop (no models needed, so it can run while the
    run's subset models train); ``attribution``: the requested preset's attribution settings, which
    every variant changes (as ``engine.evaluation.setup.resolve_setup`` gives the LDS run itself); None
    keeps those saved with the checkpoint when it was trained, which may be older than the preset's."""

    run: Path
    checkpoint: Path
    ablations: tuple[str, ...]
    cache_root: Path
    baseline_cache: Path | None
    out: Path
    results: Path
    lds: LDSConfig
    queries: int = 32
    spec: MeasureSpec = field(default_factory=MeasureSpec)
    device: str = "cpu"
    build_only: bool = False
    attribution: AttributionConfig | None = None


def run_ablations(job: AblationJob) -> list[Path]:
    """Build every variant's caches, then score each ablation against the run's finished models.

    Returns the result files written (none with ``build_only``); RuntimeError when fewer than 3
    subsets have finished models (an LDS over fewer subsets is not a rank correlation)."""
    from ..model.checkpoint import read_config
    from ..model.data import load_dataset

    bad = [a for a in job.ablations if a not in ABLATIONS]
    if bad or not job.ablations:
        raise ValueError(f"unknown ablation(s) {bad or list(job.ablations)}; choose from {', '.join(ABLATIONS)}")
    preset, _ = read_config(job.checkpoint)
    if job.attribution is not None:  # the checkpoint fixes the model's recipe, the preset the attribution settings
        preset = preset.replace(attribution=job.attribution)
    dataset = load_dataset(preset.data)
    # the run folder is checked before the builds (minutes), not after them; --build-only needs no models.
    # And before the output folder is made: a refused run left an empty runs/lds_ablation/ behind (QA round 22)
    masks = None if job.build_only else read_subsets(job.run, dataset, job.lds)
    job.out.mkdir(parents=True, exist_ok=True)
    setup = RunSetup(preset, job.checkpoint, dataset, job.out, job.results, job.device, False)
    if masks is not None:
        bind_run_to_checkpoint(job.run, job.checkpoint, record=False)  # another model's run: refused
    build_variants(setup, list(job.ablations), job.cache_root, job.baseline_cache)
    if masks is None:
        return []
    queries, source = run_queries(job.run, setup, job.queries)
    per_seed = measured_readonly(job.run, masks, job.lds.seeds, queries, job.spec, dataset.levels, job.out, job.device)
    finished = int(np.all(np.isfinite(seed_average(per_seed)), axis=0).sum())
    if finished < 3:
        raise RuntimeError(f"only {finished} subsets of {job.run} have finished models; wait for the training")
    job.results.mkdir(parents=True, exist_ok=True)
    written = []
    for name in job.ablations:
        record = run_ablation(setup, name, masks, per_seed, queries, job.spec, source, job.cache_root, job.baseline_cache)
        path = job.results / ablation_file_name(preset.name, name)
        save_json(path, record)
        written.append(path)
    return written
