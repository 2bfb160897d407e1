"""K-FAC Influence (paper eqs. 5, 6, 9-12; docs/architecture.md §4): the recommended method.

    tau_i(q) = (1/N) grad m(q)^T (G + lambda I)^{-1} grad l(x_i),

G = K-FAC (expand, MC-Fisher by default; or empirical / reduce / EK-FAC) of the GGN of the
mean training loss L, one block per Conv2d/Linear layer.  Positive tau_i: removing x_i
would raise the query's (loss-like) measurement, i.e. x_i is a proponent.

build():   factors in one pass over the N x M (example, draw) rows, then the rotated int8
           bank in one pass of per-example train gradients (both cached in ctx.store;
           the bank is resumable).  How the rotated rows are kept is the bank kind's
           (``bank_mode``: config.kfac_bank; "auto" keeps the int8 bank when it fits in
           kfac_bank_max_gb and builds the compressed bank, with exact re-ranking, otherwise;
           "streamed", only when asked, caches the factors alone and scores each query's
           damping grid by one streamed gradient pass, ``StreamedBank``).
prepare(): rotate the query gradient into the eigenbasis once.
score():   divide by (eigenvalues + lambda) and take one pass over the bank.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ... import distributed
from ...config import AttributionConfig
from ...validation import KFAC_BLOCKS, check_factor_draws
from ..bank import artefact_settings
from ..bank_kinds import bank_kind
from ..context import EngineContext
from ..curvature import KFACFactors, compute_kfac, layout
from ..damping_grid import SUPPORTED
from ..gradients import num_params, params_digest
from ..pass_checkpoint import PassCheckpoint
from ..scoring import EigenbasisQuery, Rows
from ..train_draws import PerExampleDraws, TrainDraws, draw_settings, training_draws
from . import register
from .base import (
    AttributionMethod,
    EigenPrepared,
    ExactGroupScores,
    Prepared,
    Progress,
    QueryInput,
    no_progress,
)

FACTORS = "kfac-factors"
BANK = "kfac-bank"
# Seconds of the factor pass per (example, draw) row over those of the bank's gradient pass, for the build bar's
# split between the two passes (``KFACInfluence.factor_share``).  The shipped caches' records (``build``;
# settings.json, meta.build_seconds): digits 71 s for 1,797 x 8 factor rows and 318 s for 1,797 x 64 bank rows
# (1.8x per row), mnist 467 s and 145 s for 1,000 x 16 each (3.2x).  A fixed 75% for the factors put the bar at 75%
# after 18% of a digits build (QA 25 #6).
FACTOR_ROW_COST = 2.5
SHARE_NOTE = "factor_share"  # the bank build's note of the share its bar began with (``build``)


@register
class KFACInfluence(AttributionMethod):
    """tau_i = (1/N) grad m(q)^T (G + lambda I)^{-1} grad l(x_i) with G = K-FAC of the GGN (paper eqs.
    6, 12): the factors (one pass), then the training gradients rotated into their eigenbasis and kept by a
    bank kind (``bank_kinds``: stored int8, streamed, compressed), scored by ``scoring.EigenbasisQuery``."""

    name = "kfac"
    order = 0
    title = "K-FAC Influence"
    kind = "influence"
    caption = (  # "the measurement", not "the probability": the square norm is no likelihood (QA 67 F1)
        "Training images whose removal would most raise (proponents) or lower (opponents) the query's measurement: "
        "for the loss-like ones, make generating this image less (or more) likely"
    )
    needs_gradient = True
    damping_field = "kfac_damping"
    damping_range = SUPPORTED
    config_fields = (
        "fisher_type", "kfac_approx", "ekfac", "kfac_blocks", "draws", "kfac_factor_draws", "kfac_factor_draws_mode"
    )
    shards = True
    in_sweeps = True
    lds_loss_variant = True

    def __init__(self, config: AttributionConfig, quantize: bool = True, factor_draws: int | None = None):
        """``factor_draws`` (default ``config.kfac_factor_draws``): use only the first k of the M train
        draws for the factors (None: all M, the default of docs/architecture.md §6).  The factor pass
        costs several times the bank pass on CPU (K-FAC-expand input covariances of 3x3 convolutions),
        and N*k rows are plenty for an average, so this is the knob that trades build time for factor
        accuracy (``scripts/factor_draws_agreement.py`` measures what it changes in the scores)."""
        super().__init__(config)
        self.quantize = bool(quantize)
        if factor_draws is None:
            factor_draws = config.kfac_factor_draws
        # shared draws need all M, unless the factors get draws of their own per example
        check_factor_draws(factor_draws, config.mc_samples, config.draws, factor_mode=config.kfac_factor_draws_mode)
        # k >= M draws is all of them: the same factors, so the same cache key as None
        self.factor_draws = None if factor_draws is None or factor_draws >= config.mc_samples else int(factor_draws)
        # (example, draw) rows per curvlinops batch at most: ComputeConfig.factor_batch_bytes may make it fewer
        self.factor_batch = 256
        self.chunk_size = 128  # examples per saved bank part
        self.checkpoint_rows = 8192  # (example, draw) rows of the factor pass between checkpoints
        self.checkpoint_seconds = 30.0  # ... or seconds, whichever comes first (a save: ~0.1 s for mnist's factors)
        self._factor_share = 0.0  # the factor pass's share of the build bar (``factor_share``), set by ``build``
        # other caches fed by the bank's gradient pass (``AttributionSession.share_gradient_passes``)
        self.gradient_consumers: list[Any] = []
        self.factors: KFACFactors | None = None
        self.bank: Rows | None = None
        self._eigenvalues: torch.Tensor | None = None
        self._resolution_floor: float | None = None  # KFACFactors.resolution_floor of the built factors
        self._pass_dtype: torch.dtype | None = None  # the factor pass's dtype (``factor_pass_dtype``), once built
        self._key: tuple | None = None

    # --- cache keys ---------------------------------------------------------------------

    def factor_settings(self, ctx: EngineContext) -> dict[str, Any]:
        """The settings the factors depend on (the parameters' digest, N, M, the seed and draws, the Fisher
        type, the K-FAC variant, EK-FAC, the dtype): part of the factor cache's key (the store adds the
        checkpoint and data set), so a change of any of them builds new factors."""
        c = self.config
        dtype = str(ctx.params[0][1].dtype).removeprefix("torch.")
        return {
            "method": self.name,
            "mc_samples": int(c.mc_samples),
            "seed": int(c.seed),
            "fisher_type": c.fisher_type,
            "kfac_approx": c.kfac_approx,
            "ekfac": bool(c.ekfac),
            **draw_settings(ctx.train_draws),
            **({"factor_draws_mode": "per-example"} if self._own_factor_draws(ctx) else {}),
            **({"kfac_blocks": c.kfac_blocks} if c.kfac_blocks != "separate" else {}),
            "num_examples": len(ctx.dataset),
            "params": params_digest(ctx.params, 12),
            "dtype": dtype,
            "factor_draws": self.factor_draws,
            # the pass's arithmetic when it is not the model's (absent for float32: the caches built before stay valid)
            **({"factor_dtype": c.kfac_factor_dtype} if c.kfac_factor_dtype != "float32" else {}),
        }

    def _own_factor_draws(self, ctx: EngineContext) -> bool:
        """Whether the factors get per-example draws of their own (``kfac_factor_draws_mode``) while the
        bank's are shared (with per-example bank draws "per-example" is the same draws: same key)."""
        return self.config.kfac_factor_draws_mode == "per-example" and not isinstance(ctx.train_draws, PerExampleDraws)

    def factor_train_draws(self, ctx: EngineContext) -> TrainDraws:
        """The draws of the factor pass: the bank's (``ctx.train_draws``), or with
        ``kfac_factor_draws_mode="per-example"`` independent draws per example (paper G.3) from the same
        seed, so the factors average over every timestep even when the bank's M draws are shared (the
        compressed bank's projected factors keep the bank's draws); then the first ``factor_draws``."""
        draws = ctx.train_draws
        if self._own_factor_draws(ctx):
            draws = training_draws("per-example", self.config.mc_samples, tuple(ctx.dataset.shape), ctx.diffusion.T,
                                   seed=self.config.seed, flip=ctx.preset.data.flip)
        if self.factor_draws is not None and self.factor_draws < len(draws):
            draws = draws.head(self.factor_draws)
        return draws

    def bank_whiten(self) -> float | None:
        """The stored int8 bank's whitening floor (``bank.whitening``): None for the plain grid (older caches)
        and for an unquantised bank."""
        return float(self.config.kfac_bank_whiten) if self.quantize and self.config.kfac_bank_whiten is not None else None

    def bank_settings(self, ctx: EngineContext) -> dict[str, Any]:
        """The stored bank cache's key: the factors' settings plus the loss, through ``bank.artefact_settings``
        with this method's quantisation, chunking and whitening, exactly what ``bank_build.build_bank`` stores the
        bank under (``kfac_bank_kinds._stored_bank`` passes the same arguments)."""
        return artefact_settings({**self.factor_settings(ctx), "loss": "loss"}, quantize=self.quantize,
                                 chunk_size=self.chunk_size, whiten=self.bank_whiten())

    def settings(self, ctx: EngineContext) -> dict[str, Any]:
        """For display (cache status): the bank's key plus how the bank is kept."""
        key = self._bank_key(ctx)
        return {**(key[1] if key else self.bank_settings(ctx)), "bank": self.bank_mode(ctx)}

    def _bank_key(self, ctx: EngineContext) -> tuple[str, dict[str, Any]] | None:
        """(name, settings) of the bank kind's cache artefact; None when it keeps none (streamed)."""
        kind = bank_kind(self.bank_mode(ctx))
        if not kind.stored:
            return None
        return kind.cache_key(self, ctx) if kind.cache_key is not None else (BANK, self.bank_settings(ctx))

    def cache_keys(self, ctx: EngineContext) -> list[tuple[str, dict[str, Any]]]:
        keys = [(FACTORS, self.factor_settings(ctx))]
        bank = self._bank_key(ctx)
        return keys + ([bank] if bank else [])

    # --- life cycle ---------------------------------------------------------------------

    def is_built(self, ctx: EngineContext) -> bool:
        if self._key == self._ctx_key(ctx):
            return True
        if ctx.store is None:
            return False
        if not ctx.store.exists(FACTORS, self.factor_settings(ctx)):
            return False
        bank = self._bank_key(ctx)
        return bank is None or ctx.store.exists(*bank)

    def bank_mode(self, ctx: EngineContext) -> str:
        """config.kfac_bank, or for "auto": stored when the int8 bank (N x P bytes; 4x that
        unquantised) fits in config.kfac_bank_max_gb GiB, compressed otherwise; streamed only when asked.

        Why stored whenever it fits: a query then costs one scan of the bank, while the compressed
        bank's costs a scan 1/ratio as long plus fresh gradients of its 2C re-ranked candidates
        (digits default, idle 2-core CPU: stored first answer, one pass at the chosen damping, ~0.2 s; 512 candidates at M=64 ~23 s
        of gradients), so the compressed bank is for banks that do not fit (issue 11 figures)."""
        mode = self.config.kfac_bank
        if mode != "auto":
            bank_kind(mode)  # ValueError naming the valid kinds
            return mode
        return "stored" if self.stored_bank_bytes(ctx) <= self.config.kfac_bank_max_gb * (1 << 30) else "compressed"

    def stored_bank_bytes(self, ctx: EngineContext) -> int:
        """N x P bytes of a stored int8 bank (4x that unquantised): what ``auto`` weighs against kfac_bank_max_gb."""
        return len(ctx.dataset) * num_params(ctx.params) * (1 if self.quantize else 4)

    def build_plan(self, ctx: EngineContext) -> str | None:
        """What a build of this method will do, said before it starts (QA 33: a cifar2 build on a CPU showed a bar at
        0% for a minute and never said that ``auto`` had chosen the compressed bank, nor how many rows each pass has):
        the bank kind and why, and the (example, draw) rows of the factor pass and of the bank's gradient pass."""
        n, p, m = len(ctx.dataset), num_params(ctx.params), self.config.mc_samples
        mode = self.bank_mode(ctx)
        why = ""
        if self.config.kfac_bank == "auto":  # bank_mode's rule, in words
            why = (f" (auto: a stored int8 bank of N x P = {n:,} x {p:,} bytes, "
                   f"{self.stored_bank_bytes(ctx) / (1 << 30):.3g} GiB, {'fits' if mode == 'stored' else 'exceeds'} "
                   f"kfac_bank_max_gb {self.config.kfac_bank_max_gb:g})")
        factor_rows = n * (self.factor_draws or m)
        if ctx.store is not None and ctx.store.exists(FACTORS, self.factor_settings(ctx)):
            # saved by an earlier build (another bank kind's, or a killed one's): no factor pass runs (QA 62 F5: the
            # plan announced one while the next line said "K-FAC factors loaded")
            passes = "factors saved by an earlier build"
        else:
            passes = (f"factor pass over {factor_rows:,} (example, draw) rows"
                      + (", twice (EK-FAC)" if self.config.ekfac else ""))
        if bank_kind(mode).gradient_pass:
            # in images, as the bank's bar counts them (QA 34: "14,376 rows" announced, a bar at 224/1797)
            passes += f", then a gradient pass over {n:,} images x {m} draws for the bank"
        return f"{mode} bank{why}; {passes}"

    def joint_blocks(self) -> bool:
        """Whether a layer's weight and bias share one [W | b] block (``kfac_blocks="joint"``, an ablation) rather
        than the paper's separate blocks: every reload of the factors must use the layout they were built with."""
        if self.config.kfac_blocks not in KFAC_BLOCKS:
            raise ValueError(f"kfac_blocks must be one of {KFAC_BLOCKS}, not {self.config.kfac_blocks!r}")
        return self.config.kfac_blocks == "joint"

    def _ctx_key(self, ctx: EngineContext) -> tuple:
        bank = self._bank_key(ctx)
        return (id(ctx.model), ctx.checkpoint_hash, tuple(sorted(self.bank_settings(ctx).items())),
                self.bank_mode(ctx), None if bank is None else tuple(sorted(bank[1].items())))

    def factor_share(self, ctx: EngineContext, factors_built: bool = False) -> float:
        """The factor pass's share of this method's build bar, its estimated share of the build's time:
        r F / (r F + M) for F factor draws and M bank draws per example (r = ``FACTOR_ROW_COST``, twice that with
        EK-FAC's second pass over the rows); 0 when the factors are built, 1 when the bank kind makes no gradient
        pass at build time (streamed)."""
        if factors_built:
            return 0.0
        if not bank_kind(self.bank_mode(ctx)).gradient_pass:
            return 1.0
        factor_rows = FACTOR_ROW_COST * (2 if self.config.ekfac else 1) * (self.factor_draws or self.config.mc_samples)
        return factor_rows / (factor_rows + self.config.mc_samples)

    def bank_progress(self, progress: Progress) -> Progress:
        """``progress`` for a bank kind's build: its fraction f in [0, 1] lands after the factor pass's share of
        the bar, with this method's title before its message."""
        share = self._factor_share
        return lambda msg, f: progress(f"{self.title}: {msg}", share + (1.0 - share) * f)

    def build(self, ctx: EngineContext, progress: Progress = no_progress) -> None:
        """Compute or load the factors, then the bank (progress: the factor pass first, for its estimated share
        of the time, ``factor_share``; then the bank's build)."""
        if self._key == self._ctx_key(ctx):
            return
        mode = self.bank_mode(ctx)
        kind = bank_kind(mode)
        if kind.check is not None:  # before the factor pass: a combination the kind refuses fails at once
            chosen = "" if self.config.kfac_bank != "auto" else (
                f"kfac_bank 'auto' chose the {mode} bank: a stored int8 bank would be "
                f"{self.stored_bank_bytes(ctx) / (1 << 30):.3g} GiB, {'within' if mode == 'stored' else 'above'} "
                f"kfac_bank_max_gb "
                f"{self.config.kfac_bank_max_gb:g}")
            kind.check(self.config, chosen)
        t0 = time.perf_counter()
        fs = self.factor_settings(ctx)
        factors = None
        template, _ = layout(ctx.model, ctx.params, joint=self.joint_blocks())
        if ctx.store is not None:
            arrays = ctx.store.load_arrays(FACTORS, fs, mmap=False)
            if arrays is not None:
                factors = KFACFactors.from_arrays(arrays, template, ctx.device)
        # factors built by an earlier attempt of this build (its bank's build began: a resumed build) keep their
        # share, so the bar restarts where it stood, not at 0 (QA 30c: 80% -> 26% after a restart; QA 43: a build
        # killed after its factors and before its bank's first part read 0%); factors built for another bank give
        # the bank the whole bar.  Either way the reload is said, in the words a resumed pass ends with
        # (terminal_progress.EARLIER_RUN), so that the page says the build reused saved work (QA 43: it was silent)
        bank_key = self._bank_key(ctx)
        resumed = factors is not None and ctx.store is not None and bank_key is not None and \
            ctx.store.build_started(*bank_key)
        self._factor_share = self.factor_share(ctx, factors_built=factors is not None and not resumed)
        # the share the bank's first attempt drew its bar with, noted in its partial folder, which is made with the
        # note (``Store.note_new_build``): factors built before that attempt (for another bank, or a bank deleted
        # since) gave it the whole bar, and a resumed attempt that counted them as its own jumped from 24% to 71%
        # (QA 50 #3).  A begun bank without a note (an older version's) keeps the rule above, noted now.
        if resumed:
            noted = ctx.store.build_note(*bank_key).get(SHARE_NOTE)
            if isinstance(noted, (int, float)) and 0.0 <= noted <= 1.0:
                self._factor_share = float(noted)
            else:
                ctx.store.write_build_note(*bank_key, {SHARE_NOTE: self._factor_share})
        elif ctx.store is not None and bank_key is not None:
            ctx.store.note_new_build(*bank_key, {SHARE_NOTE: self._factor_share})
        if factors is not None and bank_key is not None and not ctx.store.exists(*bank_key):  # the bank is to build
            progress(f"{self.title}: K-FAC factors loaded (saved by an earlier run)", self._factor_share)
        shard = distributed.current()
        shared = ctx.store is not None and shard.world > 1  # torchrun: rank 0 computes and saves the factors
        if factors is None and (not shared or shard.is_main):
            # resumable: a killed factor pass restarts at its last checkpoint (engine.attribution.pass_checkpoint)
            checkpoint = None if ctx.store is None else PassCheckpoint.for_store(ctx.store, FACTORS, fs)
            draws = self.factor_train_draws(ctx)
            factors = compute_kfac(
                ctx.model,
                ctx.diffusion,
                ctx.dataset.images,
                draws,
                ctx.params,
                fisher_type=self.config.fisher_type,
                kfac_approx=self.config.kfac_approx,
                ekfac=self.config.ekfac,
                batch_size=self.factor_batch,
                seed=self.config.seed,
                progress=lambda msg, f: progress(f"{self.title}: {msg}", self._factor_share * f),
                checkpoint=checkpoint,
                checkpoint_rows=self.checkpoint_rows,
                checkpoint_seconds=self.checkpoint_seconds,
                joint=self.joint_blocks(),
                factor_dtype=self.factor_pass_dtype(ctx),
                # fewer rows than factor_batch where they would hold more than this (QA 62 F1)
                batch_bytes=ctx.compute.factor_batch_bytes,
            )
            if ctx.store is not None:
                ctx.store.save_arrays(
                    FACTORS,
                    fs,
                    factors.to_arrays(),
                    # a resumed pass counts its earlier attempts too (KFACFactors.seconds_before)
                    meta={"build_seconds": round(time.perf_counter() - t0 + factors.seconds_before, 3)},
                )
                checkpoint.clear()
        if shared:
            # every rank meets here once, whether it found the factors saved or not: a rank that found them
            # (rank 0 was quicker) and skipped the barrier would meet the others' next one out of step
            shard.barrier()
            if factors is None:
                factors = KFACFactors.from_arrays(ctx.store.load_arrays(FACTORS, fs, mmap=False), template, ctx.device)
        self.factors = factors
        self._eigenvalues = factors.eigenvalues().to(ctx.device)
        self._pass_dtype = self.factor_pass_dtype(ctx)
        self._resolution_floor = factors.resolution_floor(self._pass_dtype, self._eigenvalues)
        self.bank = bank_kind(self.bank_mode(ctx)).build(self, ctx, factors, progress)
        self.gradient_consumers = []  # used once (the stored bank's pass feeds them)
        self._key = self._ctx_key(ctx)
        progress(f"{self.title}: ready", 1.0)

    def opens_gradient_pass(self, ctx: EngineContext) -> bool:
        """The stored bank's pass (not yet built) computes every training gradient on the bank's
        draws, which TRAK's and D-TRAK's sinks can project as they go."""
        return not self.is_built(ctx) and self.bank_mode(ctx) == "stored"

    def feed_gradient_pass(self, sinks: list[Any]) -> None:
        """Other methods' sinks (TRAK's, D-TRAK's) fed by this method's bank pass: one gradient pass fills
        all three caches (``MethodCaches.share_gradient_passes``)."""
        self.gradient_consumers = list(sinks)

    def rotate(self, grads: torch.Tensor) -> torch.Tensor:
        """Gradients (P,) or (b, P) in ``ctx.params`` order -> the eigenbasis of the factors
        (per block Q_B^T W Q_A, eqs. 9-12): the coordinates of the bank's rows."""
        if self.factors is None:
            raise RuntimeError(f"{self.title} is not built yet: call build() first")
        return self.factors.rotate(grads)

    def prepare(self, ctx: EngineContext, query: QueryInput, query_grad: torch.Tensor | None) -> Prepared:
        """The query's damping-independent state: q = U^T grad m(q) and the eigenvalues e, bound to the
        bank's rows (an ``EigenbasisQuery``; a compressed bank's ``RerankedQuery``)."""
        if query_grad is None:
            raise ValueError("K-FAC Influence needs the query's measurement gradient")
        if self._key != self._ctx_key(ctx):
            self.build(ctx)
        assert self.factors is not None and self.bank is not None and self._eigenvalues is not None
        t0 = time.perf_counter()
        g = query_grad.to(ctx.device, ctx.params[0][1].dtype)
        rotated = self.factors.rotate(g)
        ms = (time.perf_counter() - t0) * 1000.0
        make_query = getattr(self.bank, "make_query", None)  # a bank kind with coordinates of its own
        if make_query is not None:
            query = make_query(g, rotated)
        else:
            # rows whose grid pass costs about one single pass (streamed: the gradients dominate) score the
            # grid first; a stored bank's first answer is one pass at the damping asked for, and its grid
            # comes at the second damping or from ``fill_grid`` while the answer is on screen
            first = getattr(self.bank, "grid_in_first_pass", True)
            query = EigenbasisQuery(rotated=rotated, eigenvalues=self._eigenvalues, rows=self.bank, grid_first=first)
        return EigenPrepared(query=query, timing_ms={"rotate": ms}, bank=self.bank_mode(ctx))

    def exact_group_scores(self, ctx: EngineContext, query_grads: Callable[[], torch.Tensor],
                           damping: float | None) -> ExactGroupScores | None:
        """A compressed bank's batched product is its compressed scan (another scale than eq. 6, ranks
        approximate), so the group views take, instead of its matrix's columns:

        * the group's predicted change, exact from one summed gradient (eqs. 5-6 summed over R):
          sum_{i in R} tau_i(q) = (1/N) (Q^T g_q / (e + lambda)) . (Q^T g_R), g_R = sum_{i in R} grad l(x_i)
          with the bank's draws (``group_gradient.kfac_group_changes``; one batched backward per batch of members);
        * members' scores for every query, exact from their fresh per-example gradients, each computed once
          for all queries (``rerank.exact_columns``).

        None for the stored and streamed banks, whose batched product is eq. 6 itself."""
        if not bank_kind(self.bank_mode(ctx)).estimates:
            return None
        if self._key != self._ctx_key(ctx):
            self.build(ctx)  # loads the built bank (the group views may ask before any query did)
        rows = self.bank
        columns, changes = getattr(rows, "columns", None), getattr(rows, "group_changes", None)
        if columns is None or changes is None:
            return None
        lam = float(self.default_damping if damping is None else damping)

        def group_changes(members: np.ndarray) -> np.ndarray:
            return changes(np.asarray(members, dtype=np.int64), query_grads(), lam)

        def member_scores(indices: np.ndarray) -> np.ndarray:
            return np.asarray(columns(np.asarray(indices, dtype=np.int64), query_grads(), lam), np.float64).T

        return ExactGroupScores(
            group_changes, member_scores,
            "compressed bank: the group's predicted changes are exact (its summed gradient); its strongest "
            "members are picked from the compressed estimates and their scores computed exactly")

    def factor_pass_dtype(self, ctx: EngineContext) -> torch.dtype:
        """The dtype the factor pass sums in: ``kfac_factor_dtype`` unless it is "float32", the default, which
        leaves the pass in the parameters' own dtype (float32 in the CLI and the app; a float64 model's factors
        are float64, and their resolution floor was reckoned, and named in the warning, as float32's: QA 55 #8)."""
        if self.config.kfac_factor_dtype != "float32":
            return getattr(torch, self.config.kfac_factor_dtype)
        return ctx.params[0][1].dtype  # (name, parameter) pairs

    def damping_floor(self) -> float | None:
        """``KFACFactors.resolution_floor`` of the built factors (None before a build)."""
        return self._resolution_floor

    def damping_warning(self, damping: float | None, floor: float | None = None) -> str | None:
        """Why scores at ``damping`` weigh the factors' rounding, when it is below their resolution floor
        (``KFACFactors.resolution_floor``: eps of the factor pass's dtype x the median block's largest eigenvalue).
        QA 32 #7: ``--damping kfac=1e-15`` answered with no word that its scores were mostly float32 rounding.
        ``floor``: a recorded floor, for scores read from a file before these factors are loaded (QA 36 #1, #2)."""
        floor = self.floor_or_recorded(floor)
        lam = self.default_damping if damping is None else float(damping)
        if floor is None or lam is None or lam >= floor:
            return None
        dtype = str(self._pass_dtype).removeprefix("torch.") if self._pass_dtype else self.config.kfac_factor_dtype
        fix = (f"use at least {floor:.1e}, or factors built in float64 (build --kfac-factor-dtype float64)"
               if dtype == "float32" else f"use at least {floor:.1e}")
        # the default's own words (QA 45 #5: on a user's small model the preset's default, 1e-8, sat just under its
        # floor, 1.1e-8, and every first answer warned as if the user had chosen it)
        whose = " (the default)" if damping is None or float(damping) == self.default_damping else ""
        # short: it stands above K-FAC's column in the app (QA 34: 20 lines tall there); the floor's definition is
        # in the docs and the JSON's damping_floor
        return (f"damping {lam:.1e}{whose} is below the {dtype} factors' resolution, {floor:.1e}: the smallest "
                f"eigenvalues are rounding, and these scores may weigh it (often little); {fix}")

    def score(self, prepared: Prepared, damping: float | None = None) -> np.ndarray:
        """tau (N,) float32 for this damping (eq. 6 through ``scoring.EigenbasisQuery``).

        The first call for a query is one pass over the rows at the damping asked for (the stored
        and compressed banks; the streamed bank, whose pass is a gradient pass, scores every damping
        of ``damping_grid.DAMPING_GRID``, 49 values 1e-13..1e3, in that first pass instead).  The
        grid comes with the query's second damping or ``EigenbasisQuery.fill_grid`` (the app fills
        it in the background); after it a grid damping is a lookup, one within
        ``damping_grid.SUPPORTED`` a weighted sum of the grid's scores (exact up to a relative 1e-4
        per eigen-coordinate), and any other one more pass (``scoring.EigenbasisQuery.score``).
        """
        assert isinstance(prepared, EigenPrepared)
        lam = self.default_damping if damping is None else float(damping)
        t0 = time.perf_counter()
        scores = prepared.query.score(lam)
        prepared.timing_ms["score"] = (time.perf_counter() - t0) * 1000.0
        prepared.exact = getattr(prepared.query, "exact_mask", None)  # compressed bank: the re-ranked entries
        prepared.exact_end = getattr(prepared.query, "exact_end", None)  # and which end each was a candidate of
        prepared.exact_pending = bool(getattr(prepared.query, "answer_pending", False))  # of this very answer
        prepared.estimate_scale = getattr(prepared.query, "estimate_scale", None)
        reranker = getattr(prepared.query, "reranker", None)
        if reranker is not None:
            prepared.timing_ms.update(reranker.timing_ms)
        return scores
