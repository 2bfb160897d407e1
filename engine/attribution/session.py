"""AttributionSession: the one object the app and the CLI talk to.

It loads the checkpoint, the training set, the on-disk cache and the engine context
once, and then answers queries with every attribution method behind the same
interface (``engine.attribution.methods.base``).  Data flows one way (docs/architecture.md §2): the session
turns a query spec into a ``QueryInput``, computes the query gradient(s), hands them to
the methods and returns plain ``QueryResult`` records (score arrays, no tensors).

Why the query path is shaped this way:

* **Common random numbers** (docs/architecture.md §6): one seeded set of M draws (t, eps) is
  shared by every method, so two methods differ only in what they are, not in Monte Carlo
  noise (``query_draws``).  With ``config.query_draws == "own"`` (the paper's estimator, the
  default) it is ``make_draws(M, shape, T, seed=config.seed + 1)``: offset from the training
  draws' seed so that a training image used as a query does not reuse its own training draws.
  With ``"bank"`` (the mnist preset; shared training draws only) it is the training draws
  themselves, common to the query and every training image.
* **One gradient per measurement**: grad m(q) is computed once per distinct
  ``method.query_measurement(measurement)`` (K-FAC and TRAK share the loss gradient;
  D-TRAK asks for the square norm) and shared.
* **Damping is cheap**: each method's damping-independent state (``Prepared``) is kept
  with the result (``QueryResult.prepared``), so ``rescore`` only calls ``score``: for K-FAC,
  TRAK and D-TRAK a lookup in, or an interpolation of, their damping grid, scored in one pass
  over the rows with the first answer where the gradients dominate a query (a streamed bank),
  else with the second damping asked or by the app's grid filler after the first answer (the
  stored int8 bank, TRAK's rows: ``Rows.grid_in_first_pass``; ``engine.attribution.scoring``,
  docs/architecture.md §4).

The session only orchestrates: query sources are ``engine.attribution.query``, cache status
and builds ``engine.attribution.caches``, the maths is in the methods and the scoring operator.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed
from ..config import SETTING_FLAGS, AttributionConfig, Preset, get_preset
from ..model.checkpoint import CheckpointError, checkpoint_hash, load_checkpoint
from ..model.data import ImageDataset, load_dataset
from ..model.diffusion import Diffusion, MCDraws, make_draws
from ..model.measurements import Measurement, parse_measurement
from ..model.train import trained_on_problem
from ..paths import best_device, default_checkpoint
from ..paths import cache_root as default_cache_root
from ..precision import configure_float32
from ..validation import InvalidSettingError, check_attribution_config, check_damping, check_data_fits_model
from .bank_kinds import bank_modes
from .caches import MethodCaches
from .context import EngineContext
from .damping_grid import damping_steps
from .methods.base import SERVER, AttributionMethod, MissingMethod, Prepared, Progress, Unavailable
from .query import GalleryItem, QueryError, QueryInput, QuerySources, describe, no_trajectory
from .results import MethodResult, QueryResult
from .store import Store, data_key
from .terminal_progress import terminal_progress
from .train_draws import SHARED_DRAW_MODES

log = logging.getLogger(__name__)


class AttributionSession:
    """Model + training set + caches, loaded once; answers attribution queries.

    ``auto_build``: build the missing caches a query needs before it runs (``build_missing``: one shared
    gradient pass, a progress bar on stderr) instead of reporting them as "unavailable: not built".  The
    evaluations turn it on; the app builds in its own worker (``build_worker``).
    """

    def __init__(
        self,
        preset: str | Preset = "digits",
        checkpoint: str | Path | None = None,
        device: str | None = None,
        cache_root: str | Path | None = None,
        config: AttributionConfig | None = None,
        dataset: ImageDataset | None = None,
        auto_build: bool = False,
        preset_spec: str | None = None,
        check_trained_on: bool = True,
    ):
        """``preset_spec``: how the preset was named on the command line (a name or a .json path),
        for the commands this session prints; defaults to ``preset`` when that is a string.
        ``check_trained_on=False``: open the checkpoint on a training set it was not trained on (a
        benchmark timing the passes on a subset); attribution then means nothing, so only for timing."""
        t0 = time.perf_counter()
        wanted = get_preset(preset) if isinstance(preset, str) else preset
        folder = Path(checkpoint) if checkpoint is not None else default_checkpoint(wanted.name)
        self._preset_arg = preset if isinstance(preset, str) else (preset_spec or wanted.name)
        self._data_root_arg = str(wanted.data.root) if wanted.data.root else None
        self._checkpoint_arg = None if checkpoint is None else str(checkpoint)
        self.device = torch.device(device or best_device())
        self.tf32 = configure_float32(self.device)  # exact float32 scores on a GPU (engine.precision)
        try:
            model, ckpt_preset, extra = load_checkpoint(folder, self.device, wanted)
        except CheckpointError as e:
            if checkpoint is not None and folder.is_dir():  # a folder the caller named, with something else in it
                raise  # (a diffusers pipeline, say): training into it is not the fix
            raise CheckpointError(
                f"{e}. Train one with `{self.command('train')}` (or pass --checkpoint FOLDER)"
            ) from e
        # The checkpoint's own preset describes the model and data it was trained on (a diffusers folder
        # without a preset file names no data: load_checkpoint takes them from the caller's preset); the
        # caller chooses the data root (--data-root) and the attribution settings.
        self.preset: Preset = ckpt_preset
        if wanted.data.root:
            self.preset = self.preset.replace(data={"root": wanted.data.root})
        self.config: AttributionConfig = config or wanted.attribution
        try:  # M, projection dim, dampings, bank mode: refused up front
            check_attribution_config(self.config, bank_modes=bank_modes())
        except InvalidSettingError as e:
            # a preset file's bank mode is checked here, not with the rest of the file (bank kinds are plugins of
            # this package, which the preset loader sits below): name the file as its other errors do
            from_file = self._preset_arg.endswith(".json") and self.config.kfac_bank == wanted.attribution.kfac_bank
            if from_file and self.config.kfac_bank not in bank_modes():
                raise InvalidSettingError(f"preset file {self._preset_arg}: {e}") from None
            raise
        # the caller's speed and memory settings (a preset file's "compute"): the checkpoint records none
        self.preset = self.preset.replace(attribution=self.config, compute=wanted.compute)
        self.checkpoint = folder
        self.checkpoint_extra = extra
        self.model = model
        self.diffusion = Diffusion(self.preset.diffusion)
        self.dataset: ImageDataset = dataset if dataset is not None else load_dataset(self.preset.data)
        check_data_fits_model(self.preset.model, self.dataset.shape)
        # hashed once: the training-set check, the cache key and the precomputed file's key all use it
        self.data_digest = self.dataset.content_digest()
        problem = trained_on_problem(extra, self.dataset, self.data_digest) if check_trained_on else None
        if problem is not None:
            where = f" from {self.preset.data.root}" if self.preset.data.root else ""
            raise CheckpointError(
                f"checkpoint {folder} was not trained on this training set ({self.preset.data.name}{where}): "
                f"{problem}. Influence attributes a model to its own training images: use the data it was "
                "trained on (--data-root), or a --checkpoint trained on these data"
            )
        self.checkpoint_hash = checkpoint_hash(folder)
        self.auto_build = auto_build

        self.cache_root = Path(cache_root) if cache_root is not None else default_cache_root()
        # TF32 gradients are not the exact float32 ones: their caches live apart (engine.precision)
        key = data_key(self.dataset, self.data_digest) + ("-tf32" if self.tf32 else "")
        self.store = Store(self.cache_root, self.checkpoint_hash, key)
        self._cache_arg = None if cache_root is None else str(cache_root)
        self._preset_attribution = wanted.attribution  # what `build --preset <_preset_arg>` uses without flags
        self.store.rebuild_hint = self.build_command(rebuild=True)
        self.ctx: EngineContext = self._make_context()
        from .methods import METHODS, declaration, make_method, source_file

        self._methods: dict[str, AttributionMethod] = {}
        for name in METHODS:  # the registry's order
            try:
                m = make_method(name, self.config)
                # defaults that scale with the training set (TRAK's 0.1/N) need this data set's N
                m.default_damping = m.configured_damping(self.config, len(self.dataset))
                self._methods[name] = m
            except ImportError as e:  # a missing optional dependency disables one method only
                where = f" ({source_file(name)})" if source_file(name) else ""
                self._methods[name] = MissingMethod(
                    name, f"cannot import the {name} method{where}: {e}", declaration(name))
            except Exception as e:  # noqa: BLE001 - a broken method file disables that method only (QA round 19)
                where = source_file(name) or f"the {name} method's module"
                self._methods[name] = MissingMethod(
                    name, f"{where} failed to load: {type(e).__name__}: {e}", declaration(name))
        self.caches = MethodCaches(self._methods, self.ctx, self.build_command)
        self.sources = QuerySources(
            self.preset, model, self.diffusion, self.dataset, self.device, folder, self.command("assets"),
            self.checkpoint_hash,
        )
        self.startup_ms = (time.perf_counter() - t0) * 1000.0

    # --- setup ------------------------------------------------------------------------

    def _make_context(self):
        from .context import make_context

        return make_context(
            self.preset,
            self.model,
            self.dataset,
            self.device,
            config=self.config,
            checkpoint_hash=self.checkpoint_hash,
            store=self.store,
            diffusion=self.diffusion,
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        m = self.preset.model
        return (m.in_channels, m.image_size, m.image_size)

    @property
    def labels(self) -> np.ndarray | None:
        return None if self.dataset.labels is None else self.dataset.labels.cpu().numpy()

    # --- methods ----------------------------------------------------------------------

    def method_names(self) -> list[str]:
        return list(self._methods)

    def method(self, name: str) -> AttributionMethod:
        try:
            return self._methods[name]
        except KeyError:
            raise ValueError(
                f"unknown method {name!r}; valid methods: {', '.join(self._methods)}"
            ) from None

    def _resolve_methods(self, methods: list[str] | None) -> list[str]:
        if methods is None:
            return self.method_names()
        for n in methods:
            self.method(n)
        return list(dict.fromkeys(methods))

    def measurement_used(self, name: str, measurement: str) -> str:
        """The measurement method ``name`` scores when ``measurement`` is asked for: the same, except for a
        method that always scores its own (D-TRAK: the square norm), which every label must name."""
        meas = parse_measurement(measurement, self.diffusion.T)
        used = self._methods[name].query_measurement(meas)
        return str(meas if used is None else used)

    def method_info(self) -> dict[str, dict]:
        """name -> {"title", "kind", "caption", "default_damping", "damping_steps"} for the app.

        ``damping_steps``: the dampings a slider offers (the grid values inside the method's
        ``damping_range`` and its default, ascending), [] for methods without damping.
        """
        return {
            n: {
                "title": m.title,
                "kind": m.kind,
                "caption": m.caption,
                "default_damping": m.default_damping,
                "damping_steps": damping_steps(m.damping_range, m.default_damping),
            }
            for n, m in self._methods.items()
        }

    def available(self, name: str) -> tuple[bool, str | None]:
        """(whether method ``name`` can run here, why not)."""
        return self._availability(self.method(name))

    def _availability(self, m: AttributionMethod) -> tuple[bool, str | None]:
        return self.caches.availability(m)

    def recorded_build_seconds(self, name: str) -> float | None:
        """Build time stored with a method's current caches when they were built."""
        return self.caches.recorded_build_seconds(name)

    def status(self, names: list[str] | None = None) -> dict[str, dict]:
        """name -> {"built", "available", "reason", "settings", "size_mb"} (``MethodCaches.status``), for
        ``names`` (default: every method)."""
        return self.caches.status(names)

    def _not_built_reason(self, name: str) -> str:
        return self.caches.not_built_reason(name)

    def build(
        self, methods: list[str] | None = None, progress: Progress | None = None, rebuild: bool = False
    ) -> dict:
        """Build (or load) each method's cache; {method: {"seconds", "size_mb", "status"[, "reason"]}}.

        ``rebuild``: first verify the caches (checksums included) and delete those that fail.
        A corrupt cache otherwise comes back with status "corrupt" and the store's message.
        """
        names = self._resolve_methods(methods)
        self.share_gradient_passes(names)
        return self.caches.build(names, progress, rebuild=rebuild)

    def build_missing(self, methods: list[str] | None = None, progress: Progress | None = None) -> dict[str, dict]:
        """Build the caches of ``methods`` (default: all) that can run here and are not built, sharing one
        gradient pass as ``build`` does: what ``auto_build`` does before a query, and ``--auto-build``.
        A corrupt cache is left alone (the query reports it with how to rebuild).  Returns ``build``'s
        summary of the methods it built ({} when none was missing).

        ``progress``: a ``progress(message, fraction)`` callback; by default a tqdm bar on stderr, since a
        build on an empty cache takes minutes and a silent one was taken for a hung query (QA round 12)."""
        names = self._resolve_methods(methods)
        todo = [n for n in names if self._availability(self._methods[n])[0]
                and not self._methods[n].is_built(self.ctx) and self.cache_problem(n) is None]
        if not todo:
            return {}
        if progress is not None:
            return self.build(todo, progress)
        # one bar per method, each to 100%: on one bar the methods' equal shares read 33% for the minutes of
        # K-FAC's pass, then jumped to 100% for TRAK and D-TRAK fed by it
        self.share_gradient_passes(todo)
        summary: dict[str, dict] = {}
        for name in todo:
            with terminal_progress(f"building {name}") as bar:
                summary.update(self.caches.build([name], bar))
        return summary

    def unbuilt_status(self, name: str, built_now: dict[str, dict]) -> tuple[str, str]:
        """(status, reason) of a method that can run here but whose cache is not built, for a query or a query
        set: "error" with the store's words when the cache is corrupt or stale; else "unavailable", with the
        reason its build just gave (``build_missing``'s summary: it found the method unavailable) or how to
        build it."""
        problem = self.cache_problem(name)
        if problem is not None:
            return "error", problem
        return "unavailable", built_now.get(name, {}).get("reason") or self._not_built_reason(name)

    def share_gradient_passes(self, names: list[str]) -> dict[str, list[str]]:
        """One training-gradient pass for K-FAC's bank, TRAK and D-TRAK: {the method making the pass:
        the methods it feeds} (``MethodCaches.share_gradient_passes``)."""
        return self.caches.share_gradient_passes(names)

    def cache_problem(self, name: str) -> str | None:
        """Why method ``name``'s cache exists but is refused (``MethodCaches.cache_problem``), or None."""
        return self.caches.cache_problem(name)

    def repair(self, methods: list[str] | None = None) -> list[str]:
        """Delete these methods' caches that fail verification; returns the removed folders."""
        return self.caches.repair(self._resolve_methods(methods))

    def command(self, subcommand: str) -> str:
        """``attribution-engine SUBCOMMAND`` for this session's model and data: the preset as it was
        named (a .json path stays a path), the checkpoint and the data root when they were given.
        Every command the session prints starts here, so that pasting one acts on the same files."""
        cmd = f"attribution-engine {subcommand} --preset {shlex.quote(self._preset_arg)}"
        if self._checkpoint_arg:
            cmd += f" --checkpoint {shlex.quote(self._checkpoint_arg)}"
        if self._data_root_arg:
            cmd += f" --data-root {shlex.quote(self._data_root_arg)}"
        return cmd

    def build_command(self, methods: list[str] | None = None, rebuild: bool = False) -> str:
        """The CLI command that builds (``rebuild``: verifies and rebuilds) these methods' caches."""
        cmd = self.command("build")
        if self._cache_arg:
            cmd += f" --cache-root {shlex.quote(self._cache_arg)}"
        if methods:
            cmd += f" --methods {','.join(methods)}"
        if not methods or any(self._methods[m].needs_gradient for m in methods if m in self._methods):
            cmd += "".join(f" {flag} {value}" for flag, value in _setting_flags(self.config, self._preset_attribution))
        return cmd + (" --rebuild" if rebuild else "")

    def load(self, methods: list[str] | None = None) -> dict[str, float]:
        """Load every *built* cache now so the first query is as fast as the others; builds nothing."""
        return self.caches.load(self._resolve_methods(methods))

    # --- queries ----------------------------------------------------------------------

    def gallery(self) -> list[GalleryItem]:
        """The checkpoint's ``gallery.npz`` (generated samples with trajectories); [] if absent."""
        return self.sources.gallery()

    def parse_query(self, spec: str) -> QueryInput:
        """``gallery:3`` | ``train:17`` | ``image:PATH`` | ``generate:SEED`` -> QueryInput (``QuerySources.parse``)."""
        return self.sources.parse(spec)

    def query_from_upload(self, data: bytes, name: str | None = None) -> QueryInput:
        """PNG/JPEG bytes -> the model's size and channels; ``notes`` say what was done; ValueError on bad data."""
        return self.sources.query_from_upload(data, name)

    def generate(self, seed: int, progress: Callable[[int, int], None] | None = None) -> QueryInput:
        """One new DDPM sample with its recorded trajectory (all T steps)."""
        return self.sources.generate(seed, progress)

    def query_draws(self, mc_samples: int | None = None) -> MCDraws:
        """The draws of every query's measurement, shared by all queries and methods.

        ``config.query_draws == "own"``: M draws of their own, seeded by config.seed + 1, independent
        of the training gradients' (paper G.3).  ``"bank"``: the training gradients' shared draws
        (t_m, eps_m) themselves, without flip bits (the query is attributed as it is), the first
        ``mc_samples`` of them when fewer are asked.  Then every inner product g_q^T K g_i (eq. 6) pairs
        estimates made on the same draws (common random numbers), so its Monte Carlo error is that of
        a difference on common noise; in expectation it adds (1/M) tr(K Cov_eps[grad l_q, grad l_i])
        to the influence, which is why it is an option measured by LDS (``lds_ablation`` ``query_draws``)
        and not the paper's estimator."""
        m = int(mc_samples or self.config.mc_samples)
        if self.config.query_draws == "bank":
            if self.config.draws not in SHARED_DRAW_MODES:
                raise ValueError("query_draws 'bank' needs shared training draws (--draws shared or stratified)")
            if m > self.config.mc_samples:
                raise ValueError(
                    f"query_draws 'bank': the query can use at most the bank's M = {self.config.mc_samples} draws, "
                    f"{m} asked"
                )
            bank = self.ctx.train_draws
            return MCDraws(bank.t[:m], bank.eps[:m], None)
        return make_draws(m, self.shape, self.diffusion.T, seed=self.config.seed + 1)

    def query_gradient(self, measurement: Measurement, query: QueryInput, draws: MCDraws) -> torch.Tensor:
        """grad_theta m(theta, x_q) (P,) in ``ctx.params`` order (model in eval mode)."""
        from . import gradients

        return gradients.measurement_grad(
            self.model,
            self.diffusion,
            measurement,
            query,
            draws.to(self.device),
            self.dataset.levels,
            params=list(self.ctx.params),
        )

    def _shared_forward_plan(
        self, names: list[str], meas: Measurement, query: QueryInput, ready: dict[str, bool]
    ) -> list[Measurement]:
        """The query measurements that one shared forward pass should serve (``gradients.shared_forward_grads``):
        the distinct loss / square-norm measurements of the methods that will run (``ready``: available, and
        built or to be built), when there are two."""
        from .gradients import SHARED_FORWARD_KINDS

        if query.image is None:
            return []
        needed: list[Measurement] = []
        for name in names:
            m = self._methods[name]
            qm = m.query_measurement(meas)
            if qm is None or qm.kind not in SHARED_FORWARD_KINDS or qm in needed or not ready[name]:
                continue
            needed.append(qm)
        return needed if len(needed) > 1 else []

    def _shared_query_gradients(
        self, measurements: list[Measurement], query: QueryInput, draws: MCDraws
    ) -> dict[Measurement, torch.Tensor]:
        from . import gradients

        return gradients.shared_forward_grads(
            self.model, self.diffusion, query.image, draws.to(self.device), measurements, params=list(self.ctx.params),
            min_rows_per_worker=self.ctx.compute.min_rows_per_worker,
        )

    def query(
        self,
        query: QueryInput,
        measurement: str = "loss",
        methods: list[str] | None = None,
        damping: dict[str, float] | None = None,
        mc_samples: int | None = None,
        defer_exact: bool = False,
    ) -> QueryResult:
        """Scores of every training image for ``query`` under each method.

        Methods that are not built (and ``auto_build`` is off) or cannot run here come back
        with status "unavailable" and a reason saying how to enable them.  ``defer_exact``: answer
        from a compressed bank's scan first (marked ``exact_pending``) and leave its exact re-rank to
        ``fill_exact`` / ``fill_grids``; only the app's interactive answer asks for it, every other
        caller (the CLI, evaluations, the app's retrain check) gets the exact answer.
        """
        t_start = time.perf_counter()
        names = self._resolve_methods(methods)
        meas = parse_measurement(measurement, self.diffusion.T)
        self._check_query(query, meas)
        damping = dict(damping or {})
        self._check_dampings(names, damping)
        draws = self.query_draws(mc_samples)
        # each method's availability and cache checked once per query (is_built may read manifests and array
        # headers), the cache only of methods that can run here
        avail = {name: self._availability(self._methods[name]) for name in names}
        built_now = self.build_missing([n for n in names if avail[n][0]]) if self.auto_build else {}
        built = {name: avail[name][0] and self._methods[name].is_built(self.ctx) for name in names}
        ready = {name: built[name] for name in names}
        shared = self._shared_forward_plan(names, meas, query, ready)
        grads: dict[Measurement, tuple[torch.Tensor, float]] = {}
        results: dict[str, MethodResult] = {}
        prepared: dict[str, Prepared] = {}
        total_grad_ms = 0.0
        for name in names:
            m = self._methods[name]
            res = self._empty_result(name)
            results[name] = res
            available, reason = avail[name]
            if not available:  # availability never sees the query: a reason about this server
                res.status, res.reason, res.reason_about = "unavailable", reason, SERVER
                continue
            if name in built_now:
                res.timing_ms["build"] = built_now[name]["seconds"] * 1000.0
            if not built[name]:
                res.status, res.reason = self.unbuilt_status(name, built_now)
                res.reason_about = SERVER if res.status == "unavailable" else None
                continue
            try:
                qm = m.query_measurement(meas)
                grad = None
                if qm is not None:
                    if qm.kind == "trajectory" and query.trajectory is None:
                        raise QueryError(no_trajectory(query))
                    if qm not in grads:
                        t0 = time.perf_counter()
                        if qm in shared:  # one forward for the loss and the square norm
                            got = self._shared_query_gradients(shared, query, draws)
                        else:
                            got = {qm: self.query_gradient(qm, query, draws)}
                        ms = (time.perf_counter() - t0) * 1000.0
                        for key, g in got.items():  # a shared pass's time is split evenly between its gradients
                            grads[key] = (g, ms / len(got))
                        total_grad_ms += ms
                    grad, ms = grads[qm]
                    res.timing_ms["gradient"] = ms
                else:
                    res.timing_ms["gradient"] = 0.0
                t0 = time.perf_counter()
                prep = m.prepare(self.ctx, query, grad)
                self._defer_exact_work(prep, defer_exact)
                res.timing_ms["prepare"] = (time.perf_counter() - t0) * 1000.0
                prepared[name] = prep
                res.damping = self.damping_for(name, damping)
                self._score_into(res, m, prep)
                if m.needs_gradient:
                    res.measurement = str(meas if qm is None else qm)
                if qm is not None and qm != meas:
                    res.reason = f"uses the {qm} measurement"
            except Unavailable as e:
                res.status, res.reason, res.reason_about = "unavailable", str(e), e.about
            except QueryError:
                raise
            except Exception as e:  # noqa: BLE001 - one broken method must not hide the others
                # one line; the traceback with ATTRIBUTION_DEBUG (QA round 20: a CLI query printed a whole
                # traceback on stderr for a corrupt cache and still answered with the other methods)
                log.warning("method %s failed: %s: %s", name, type(e).__name__, e,
                            exc_info=bool(os.environ.get("ATTRIBUTION_DEBUG")))
                res.status, res.reason = "error", f"{type(e).__name__}: {e}"
        timing = {"total": (time.perf_counter() - t_start) * 1000.0, "gradients": total_grad_ms}
        return QueryResult(
            query=self._query_dict(query, len(draws)),
            measurement=str(meas),
            methods=results,
            timing_ms=timing,
            prepared=prepared,
        )

    def rescore(self, result: QueryResult, damping: dict[str, float]) -> QueryResult:
        """The same query with other damping values: only ``score`` runs, no gradient, no prepare."""
        prepared = result.prepared
        if not prepared:
            raise ValueError("this result holds no per-query state (was it copied or loaded?); run query() again")
        t_start = time.perf_counter()
        self._check_dampings([n for n in damping if n in self._methods], damping)
        methods: dict[str, MethodResult] = {}
        for name, old in result.methods.items():
            if name not in damping or name not in prepared or old.status != "ok":
                methods[name] = old
                continue
            m = self._methods[name]
            res = replace(old, timing_ms={**old.timing_ms})
            res.damping = self.damping_for(name, damping)
            self._score_into(res, m, prepared[name])
            methods[name] = res
        # the first answer's times, and this re-scoring's beside them (QA 28 #1: "rescore" held a flag, 1.0, which the
        # page printed as "rescore 1.0 ms" beside a "total" of the rescore alone, under a table of 650 ms gradients)
        timing = {**result.timing_ms, "rescore": (time.perf_counter() - t_start) * 1000.0}
        return QueryResult(
            query=result.query, measurement=result.measurement, methods=methods, timing_ms=timing, prepared=prepared
        )

    def fill_grids(self, result: QueryResult, should_stop: Callable[[], bool] | None = None) -> list[str]:
        """The work deferred from the first answer: each method's deferred exact scores (``fill_exact``),
        then the damping grid of every method whose first answer was one exact pass (K-FAC on a
        stored bank: ``EigenbasisQuery.grid_first=False``), so that later damping changes are lookups.

        Run it in a background thread while the answer is on screen (the app does; a ``rescore`` meanwhile
        waits for a grid pass).  Returns the methods whose work ran; one failure is logged, the rest run."""
        try:
            done = self.fill_exact(result, should_stop)
        except Exception:  # noqa: BLE001 - it stays pending (the app says the re-rank stopped); grids still fill
            log.exception("the exact re-rank failed")
            done = []
        for name, prep in (result.prepared or {}).items():
            query = getattr(prep, "query", None)
            res = result.methods.get(name)
            if query is None or getattr(query, "grid_first", True) or res is None or res.status != "ok":
                continue  # grid-first rows (streamed: a gradient pass) already have theirs, or never will
            try:
                if query.fill_grid() and name not in done:
                    done.append(name)
            except Exception:  # noqa: BLE001 - the next damping change scores exactly instead
                log.exception("filling the damping grid of %s failed", name)
        return done

    def fill_exact(self, result: QueryResult, should_stop: Callable[[], bool] | None = None) -> list[str]:
        """Run the exact work deferred from ``result``'s first answer (the compressed bank's re-rank, when
        the query deferred it: ``query(defer_exact=True)``); returns the methods whose work ran.  A call
        while another thread runs the same work waits for it.  ``should_stop`` is asked between batches
        of this call's own work; True stops it (it stays pending; the app's worker stops when a newer
        query is waiting)."""
        done = []
        for name, prep in (result.prepared or {}).items():
            fill = getattr(getattr(prep, "query", None), "fill_exact", None)
            res = result.methods.get(name)
            if fill is not None and res is not None and res.status == "ok" and fill(should_stop):
                done.append(name)
        return done

    def _defer_exact_work(self, prep: Prepared, defer: bool) -> None:
        """Let a prepared query defer the work that makes its scores exact, when the call asks for it.

        Why: on a compressed bank the exact re-rank costs 2C x M fresh gradient rows, seconds to minutes,
        while the compressed scan takes milliseconds; an interactive caller (the app) shows the scan's
        answer first and runs ``fill_exact`` in the background.  Never under torchrun (the re-rank's
        candidate merge is a collective every rank must enter from its own query).
        """
        query = getattr(prep, "query", None)
        if hasattr(query, "defer_exact"):
            query.defer_exact = bool(defer) and distributed.current().world == 1

    # --- helpers ----------------------------------------------------------------------

    def _empty_result(self, name: str) -> MethodResult:
        m = self._methods[name]
        return MethodResult(name=name, title=m.title, kind=m.kind, caption=m.caption, status="ok")

    def damping_for(self, name: str, damping: dict[str, float]) -> float | None:
        """The damping method ``name`` scores with: the asked value, else its default; None for a similarity
        or an influence method without a damping (its scores ignore one).  The one rule for every caller
        (queries, rescoring, the pool's matrices, the precomputed scores).  Bad values: InvalidSettingError."""
        if not self._methods[name].takes_damping():
            return None  # a similarity, or an influence method without a damping: its scores ignore one
        if name in damping and damping[name] is not None:
            return check_damping(damping[name], f"{name} damping")
        value = self._methods[name].default_damping
        return None if value is None else check_damping(value, f"{name} damping (from the preset)")

    def _check_dampings(self, names: list[str], damping: dict[str, float]) -> None:
        """Refuse a bad damping before any gradient is computed (InvalidSettingError, a ValueError)."""
        for name in names:
            self.damping_for(name, damping)

    def _score_into(self, res: MethodResult, m: AttributionMethod, prep: Prepared) -> None:
        t0 = time.perf_counter()
        scores = np.asarray(m.score(prep, res.damping), dtype=np.float32).reshape(-1)
        res.timing_ms["score"] = (time.perf_counter() - t0) * 1000.0
        if scores.shape[0] != len(self.dataset):
            raise RuntimeError(f"{m.name} returned {scores.shape[0]} scores for {len(self.dataset)} training images")
        reason = self.non_finite_reason(m, scores)
        if reason is not None:  # never an "ok" result with NaN/inf scores (a corrupt cache, an overflow)
            res.scores, res.status, res.reason = None, "error", reason
            return
        res.scores = scores
        res.bank, res.exact, res.exact_pending = prep.bank, prep.exact, prep.exact_pending
        res.estimate_scale = prep.estimate_scale
        res.warning, res.damping_floor = m.damping_warning(res.damping), m.damping_floor()
        res.status = "ok"

    def non_finite_reason(self, m: AttributionMethod, scores: np.ndarray) -> str | None:
        """Why scores with NaN or inf cannot be shown (None when all are finite), for a query's vector and a
        query set's matrix alike.  A method with a cache is told to rebuild it; one without a cache has
        nothing to rebuild (QA round 19: a plugin's NaN was called a corrupt cache), so its code is named."""
        bad = int(np.count_nonzero(~np.isfinite(scores)))
        if not bad:
            return None
        head = f"{bad} of {scores.size} scores are not finite (NaN or inf)"
        if m.cache_keys(self.ctx):
            return f"{head}; the cache may be corrupt: rebuild it with `{self.build_command([m.name], rebuild=True)}`"
        return f"{head}; {m.name} keeps no cache, so its scoring code produced them"

    def _check_query(self, query: QueryInput, meas: Measurement) -> None:
        if query.image is None and meas.kind != "trajectory":
            raise QueryError(f"measurement {meas} needs a query image")
        if query.image is not None and tuple(query.image.shape) != self.shape:
            raise QueryError(f"query image is {tuple(query.image.shape)}, the model takes {self.shape}")
        if meas.kind == "trajectory":
            if query.trajectory is None:
                raise QueryError(no_trajectory(query))
            want = (self.diffusion.T + 1, *self.shape)
            if tuple(query.trajectory.shape) != want:  # the query's source named (QA 26 #6: a samples file)
                raise QueryError(f"the trajectory of {query.description} is {tuple(query.trajectory.shape)} (T + 1 "
                                 f"states of the image), but this model's is {want}: it was drawn by a model with "
                                 f"another number of steps T")

    def _query_dict(self, query: QueryInput, m: int) -> dict[str, Any]:
        return {
            "spec": query.description,
            "image_digest": query.digest(),
            "description": describe(query.description),
            "label": query.label,
            "notes": list(query.notes),
            "has_trajectory": query.trajectory is not None,
            "mc_samples": m,
        }


def _setting_flags(config: AttributionConfig, base: AttributionConfig) -> list[tuple[str, object]]:
    """(flag, value) for every setting where ``config`` differs from ``base``, the preset's (what ``build
    --preset`` uses without flags), so a printed build command builds the cache that this session reads.
    A None value (K-FAC factors from all M draws) has no flag: the CLI sets it itself when --draws asks."""
    return [(flag, getattr(config, name)) for name, flag in SETTING_FLAGS.items()
            if getattr(config, name) != getattr(base, name) and getattr(config, name) is not None]


__all__ = ["AttributionSession", "GalleryItem", "QueryError", "QueryInput", "data_key"]
