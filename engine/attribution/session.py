"""AttributionSession: the one object the app and the CLI talk to.

It loads the checkpoint, the training set, the on-disk cache and the engine context
once, and then answers queries with every attribution method behind the same
interface (``engine.attribution.methods.base``).  Data flows one way (docs/architecture.md §2): the session
turns a query spec into a ``QueryInput``, computes the query gradient(s), hands them to
the methods and returns plain ``QueryResult`` records (score arrays, no tensors).

This module holds what the session is: its constructor (the checkpoint, the data, the store, the context and
the methods, each checked once) and its methods' registry.  What it does lives in one mixin per job, which
``AttributionSession`` inherits:

* ``session_builds.SessionBuilds``: cache status, builds, repairs and the commands that build;
* ``session_inputs.SessionQueryInputs``: query inputs (specs, uploads, samples, the gallery), the query
  draws (common random numbers) and the query gradients;
* ``session_scoring.SessionScoring``: ``query`` and ``rescore``, and the damping each method scores with;
* ``session_deferred.SessionDeferredWork``: the exact re-rank and damping grids a first answer defers.

Why mixins and not helper objects: every caller (the CLI, the app, the evaluations, the scripts) and the tests
use these as the session's own methods and attributes, and patch some of them on the session or its class
(``query_gradient``, ``_score_into``, ``build``); the parts call one another through ``self`` (a query builds,
draws, computes gradients and scores), so such a patch still reaches every caller, and the facade needs no
forwarding stubs.  Each mixin keeps no state of its own: the constructor here sets every attribute they read.

The session only orchestrates: query sources are ``engine.attribution.query``, cache status
and builds ``engine.attribution.caches``, the maths is in the methods and the scoring operator.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..config import PRESETS, AttributionConfig, Preset, get_preset
from ..model.checkpoint import CheckpointError, checkpoint_hash, describe_data, load_checkpoint, preset_words
from ..model.data import DataError, ImageDataset, load_dataset
from ..model.diffusion import Diffusion
from ..model.measurements import parse_measurement
from ..model.train import trained_on_problem
from ..paths import best_device, default_checkpoint
from ..paths import cache_root as default_cache_root
from ..precision import configure_float32
from ..validation import InvalidSettingError, check_attribution_config, check_data_fits_model
from .bank_kinds import bank_modes
from .caches import MethodCaches
from .context import EngineContext
from .damping_grid import damping_steps
from .methods.base import AttributionMethod, MissingMethod
from .query import GalleryItem, QueryError, QueryInput, QuerySources
from .session_builds import SessionBuilds
from .session_deferred import SessionDeferredWork
from .session_inputs import SessionQueryInputs
from .session_scoring import SessionScoring
from .store import Store, data_key


class AttributionSession(SessionBuilds, SessionQueryInputs, SessionScoring, SessionDeferredWork):
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
        preset_named: bool = True,
        attribution_base: AttributionConfig | None = None,
    ):
        """``preset_spec``: how the preset was named on the command line (a name or a .json path),
        for the commands this session prints; defaults to ``preset`` when that is a string.
        ``preset_named=False``: the caller's preset is the command line's default, not one the user named, and
        ``attribution_base`` the settings the command took instead (the checkpoint's own,
        ``checkpoint.attribution_source``): the commands this session prints then name no ``--preset`` beside
        a ``--checkpoint``, and give flags for the settings that differ from ``attribution_base``.
        ``check_trained_on=False``: open the checkpoint on a training set it was not trained on (a
        benchmark timing the passes on a subset); attribution then means nothing, so only for timing."""
        t0 = time.perf_counter()
        wanted = get_preset(preset) if isinstance(preset, str) else preset
        folder = Path(checkpoint) if checkpoint is not None else default_checkpoint(wanted.name)
        self._preset_arg = preset if isinstance(preset, str) else (preset_spec or wanted.name)
        self._data_root_arg = str(wanted.data.root) if wanted.data.root else None
        self._checkpoint_arg = None if checkpoint is None else str(checkpoint)
        self._preset_named = preset_named
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
        self.dataset: ImageDataset = dataset if dataset is not None else self._load_training_set(folder, wanted)
        check_data_fits_model(self.preset.model, self.dataset.shape)
        # hashed once: the training-set check, the cache key and the precomputed file's key all use it
        self.data_digest = self.dataset.content_digest()
        self.checkpoint_hash = checkpoint_hash(folder)
        problem = (trained_on_problem(extra, self.dataset, self.data_digest, self.checkpoint_hash)
                   if check_trained_on else None)
        if problem is not None:
            where = f" from {self.preset.data.root}" if self.preset.data.root else ""
            raise CheckpointError(
                f"checkpoint {folder} was not trained on this training set ({self.preset.data.name}{where}): "
                f"{problem}. Influence attributes a model to its own training images: use the data it was "
                "trained on (--data-root), or a --checkpoint trained on these data"
            )
        self.auto_build = auto_build

        self.cache_root = Path(cache_root) if cache_root is not None else default_cache_root()
        # TF32 gradients are not the exact float32 ones: their caches live apart (engine.precision)
        key = data_key(self.dataset, self.data_digest) + ("-tf32" if self.tf32 else "")
        self.store = Store(self.cache_root, self.checkpoint_hash, key)
        self._cache_arg = None if cache_root is None else str(cache_root)
        # what the printed `build` uses without flags: the named preset's settings, or the checkpoint's own
        self._preset_attribution = attribution_base or wanted.attribution
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
            self.checkpoint_hash, cache=self.store.base,
        )
        self.startup_ms = (time.perf_counter() - t0) * 1000.0

    # --- setup ------------------------------------------------------------------------

    def _load_training_set(self, folder: Path, wanted: Preset) -> ImageDataset:
        """The checkpoint's training set, read from the caller's data root.

        The checkpoint names the kind of data it was trained on; the caller's preset names only where it lies. When
        the two presets name different kinds (a cifar2 checkpoint under a preset file for an image folder), the
        folder is read as the checkpoint's kind and fails; the error then says the checkpoint and the preset
        disagree, not only that the folder is not CIFAR (QA 33 #3)."""
        try:
            return load_dataset(self.preset.data)
        except DataError as e:
            trained, asked = self.preset, wanted
            # no preset named (the command line's default): nothing disagrees, the loader's own line is the cause
            # (QA 45 #1: `--checkpoint X --data-root FOLDER` with a corrupt image blamed a "--preset digits")
            if self._checkpoint_arg is None or not self._preset_named or trained.data.name == asked.data.name:
                raise
            # a preset this code knows can be named; a preset file's name cannot (QA 36 #3: "--preset shapes")
            named = f"--preset {trained.name}" if trained.name in PRESETS else "its preset file"
            raise DataError(
                f"{preset_words(folder, trained.name)} on {describe_data(trained)}, but "
                f"--preset {self._preset_arg} describes {describe_data(asked)}, so its data root was read as "
                f"{trained.data.name} data and failed ({e}). Attribute the checkpoint with the data it was trained "
                f"on (no --preset, or {named}, with --data-root where they are), or pass a "
                "--checkpoint trained on these data"
            ) from e

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


__all__ = ["AttributionSession", "GalleryItem", "QueryError", "QueryInput", "data_key"]
