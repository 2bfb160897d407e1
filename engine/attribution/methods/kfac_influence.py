"""K-FAC Influence (paper eqs. 5, 6, 9-12; DESIGN.md 4): the recommended method.

    tau_i(q) = (1/N) grad m(q)^T (G + lambda I)^{-1} grad l(x_i),

G = K-FAC (expand, MC-Fisher by default; or empirical / reduce / EK-FAC) of the GGN of the
mean training loss L, one block per Conv2d/Linear layer.  Positive tau_i: removing x_i
would raise the query's (loss-like) measurement, i.e. x_i is a proponent.

build():   factors in one pass over the N x M (example, draw) rows, then the rotated int8
           bank in one pass of per-example train gradients (both cached in ctx.store;
           the bank is resumable).  When the bank would not fit (``bank_mode``:
           config.kfac_bank, "auto" by size) only the factors are cached and each query's
           damping grid is scored by one streamed gradient pass (``StreamedBank``).
prepare(): rotate the query gradient into the eigenbasis once.
score():   divide by (eigenvalues + lambda) and take one pass over the bank.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np
import torch

from ... import distributed
from ...config import AttributionConfig
from ..bank import RotatedBank, StreamedBank, build_bank
from ..curvature import KFACFactors, compute_kfac, layout
from ..damping_grid import COARSE_GRID, DAMPING_GRID, interpolate
from ..train_draws import draw_settings
from .base import AttributionMethod, Prepared, Progress, QueryInput, no_progress

FACTORS = "kfac-factors"
BANK = "kfac-bank"
FACTOR_SHARE = 0.75  # share of the progress bar for the factor pass (the costlier one on CPU)
# Dampings scored together with the first requested one (one pass over the bank): moving the
# app's power-of-ten damping slider is a lookup, and any damping in damping_grid.SUPPORTED is
# interpolated from them (engine.attribution.damping_grid) instead of another pass.
GRID_MAX_BYTES = 256 << 20  # fall back to the coarse grid (then none) when G x P float32 queries exceed this
# ... unless the bank is streamed: then every uncached damping is a full gradient pass
GRID_MAX_BYTES_STREAMED = 4 << 30
BANK_MODES = ("auto", "stored", "streamed")
KFAC_BLOCKS = ("separate", "joint")


def _params_digest(params: list[tuple[str, torch.nn.Parameter]]) -> str:
    text = ";".join(f"{n}:{tuple(p.shape)}" for n, p in params)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class KFACInfluence(AttributionMethod):
    name = "kfac"
    title = "K-FAC Influence"
    kind = "influence"
    caption = (
        "Training images whose removal would most lower (proponents) or raise (opponents) "
        "the probability of generating this image"
    )
    needs_gradient = True

    def __init__(self, config: AttributionConfig, quantize: bool = True, factor_draws: int | None = None):
        """``factor_draws``: use only the first k of the M train draws for the factors (None: all M,
        the DESIGN.md default).  The factor pass costs several times the bank pass on CPU
        (K-FAC-expand input covariances of 3x3 convolutions), and N*k rows are plenty for
        an average, so this is the knob that trades build time for factor accuracy."""
        self.config = config
        self.quantize = bool(quantize)
        self.factor_draws = None if factor_draws is None else int(factor_draws)
        self.default_damping = config.kfac_damping
        self.factor_batch = 256  # (example, draw) rows per curvlinops batch
        self.chunk_size = 128  # examples per saved bank part
        self.factors: KFACFactors | None = None
        self.bank: RotatedBank | StreamedBank | None = None
        self._eigenvalues: torch.Tensor | None = None
        self._key: tuple | None = None

    # --- cache keys ---------------------------------------------------------------------

    def factor_settings(self, ctx: Any) -> dict[str, Any]:
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
            **({"kfac_blocks": c.kfac_blocks} if c.kfac_blocks != "separate" else {}),
            "num_examples": len(ctx.dataset),
            "params": _params_digest(ctx.params),
            "dtype": dtype,
            "factor_draws": self.factor_draws,
        }

    def bank_settings(self, ctx: Any) -> dict[str, Any]:
        s = self.factor_settings(ctx)
        s.update(loss="loss", quantize=self.quantize, chunk_size=self.chunk_size)
        return s

    def settings(self, ctx: Any) -> dict[str, Any]:
        """For display (cache status): the bank's key plus how the bank is kept."""
        return {**self.bank_settings(ctx), "bank": self.bank_mode(ctx)}

    def cache_keys(self, ctx: Any) -> list[tuple[str, dict[str, Any]]]:
        keys = [(FACTORS, self.factor_settings(ctx))]
        if self.bank_mode(ctx) == "stored":
            keys.append((BANK, self.bank_settings(ctx)))
        return keys

    # --- life cycle ---------------------------------------------------------------------

    def is_built(self, ctx: Any) -> bool:
        if self._key == self._ctx_key(ctx):
            return True
        if ctx.store is None:
            return False
        if not ctx.store.exists(FACTORS, self.factor_settings(ctx)):
            return False
        return self.bank_mode(ctx) == "streamed" or ctx.store.exists(BANK, self.bank_settings(ctx))

    def bank_mode(self, ctx: Any) -> str:
        """"stored" or "streamed": config.kfac_bank, or for "auto" stored when the int8 bank
        (N x P bytes; 4x that unquantised) fits in config.kfac_bank_max_gb GiB."""
        mode = self.config.kfac_bank
        if mode not in BANK_MODES:
            raise ValueError(f"kfac_bank must be one of {BANK_MODES}, not {mode!r}")
        if mode != "auto":
            return mode
        nbytes = len(ctx.dataset) * ctx.num_params * (1 if self.quantize else 4)
        return "stored" if nbytes <= self.config.kfac_bank_max_gb * (1 << 30) else "streamed"

    def _joint(self) -> bool:
        if self.config.kfac_blocks not in KFAC_BLOCKS:
            raise ValueError(f"kfac_blocks must be one of {KFAC_BLOCKS}, not {self.config.kfac_blocks!r}")
        return self.config.kfac_blocks == "joint"

    def _ctx_key(self, ctx: Any) -> tuple:
        return (id(ctx.model), ctx.checkpoint_hash, tuple(sorted(self.bank_settings(ctx).items())))

    def build(self, ctx: Any, progress: Progress = no_progress) -> None:
        """Compute or load the factors, then the bank (progress: factors 0-0.75, bank 0.75-1)."""
        if self._key == self._ctx_key(ctx):
            return
        t0 = time.perf_counter()
        fs = self.factor_settings(ctx)
        factors = None
        template, _ = layout(ctx.model, ctx.params, joint=self._joint())
        if ctx.store is not None:
            arrays = ctx.store.load_arrays(FACTORS, fs, mmap=False)
            if arrays is not None:
                factors = KFACFactors.from_arrays(arrays, template, ctx.device)
        shard = distributed.current()
        if factors is None and ctx.store is not None and not shard.is_main:
            shard.barrier()  # under torchrun rank 0 computes and saves the factors (below)
            factors = KFACFactors.from_arrays(ctx.store.load_arrays(FACTORS, fs, mmap=False), template, ctx.device)
        if factors is None:
            draws = ctx.train_draws
            if self.factor_draws is not None and self.factor_draws < len(draws):
                draws = draws.head(self.factor_draws)
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
                progress=lambda msg, f: progress(f"{self.title}: {msg}", FACTOR_SHARE * f),
                joint=self._joint(),
            )
            if ctx.store is not None:
                ctx.store.save_arrays(
                    FACTORS,
                    fs,
                    factors.to_arrays(),
                    meta={"build_seconds": round(time.perf_counter() - t0, 3)},
                )
                shard.barrier()  # the other ranks may load them now
        self.factors = factors
        self._eigenvalues = factors.eigenvalues().to(ctx.device)
        if self.bank_mode(ctx) == "streamed":
            self.bank = StreamedBank(
                ctx.model, ctx.diffusion, ctx.dataset.images, ctx.train_draws, factors, ctx.params
            )
            self._key = self._ctx_key(ctx)
            progress(f"{self.title}: ready (training gradients streamed per query)", 1.0)
            return
        bs = self.bank_settings(ctx)
        bank_settings = {k: v for k, v in bs.items() if k not in ("quantize", "chunk_size")}
        self.bank = build_bank(
            ctx.model,
            ctx.diffusion,
            ctx.dataset.images,
            ctx.train_draws,
            factors,
            ctx.params,
            store=ctx.store,
            name=BANK,
            settings=bank_settings,
            loss="loss",
            quantize=self.quantize,
            chunk_size=self.chunk_size,
            device=ctx.device,
            progress=lambda msg, f: progress(f"{self.title}: {msg}", FACTOR_SHARE + (1 - FACTOR_SHARE) * f),
        )
        self._key = self._ctx_key(ctx)
        progress(f"{self.title}: ready", 1.0)

    def prepare(self, ctx: Any, query: QueryInput, query_grad: torch.Tensor | None) -> Prepared:
        if query_grad is None:
            raise ValueError("K-FAC Influence needs the query's measurement gradient")
        if self._key != self._ctx_key(ctx):
            self.build(ctx)
        assert self.factors is not None and self.bank is not None and self._eigenvalues is not None
        t0 = time.perf_counter()
        g = query_grad.to(ctx.device, ctx.params[0][1].dtype)
        rotated = self.factors.rotate(g)
        ms = (time.perf_counter() - t0) * 1000.0
        return Prepared(
            data={"rotated": rotated, "eigenvalues": self._eigenvalues, "bank": self.bank},
            timing_ms={"rotate": ms},
        )

    def score(self, prepared: Prepared, damping: float | None = None) -> np.ndarray:
        """tau (N,) float32 for this damping: one division and one pass over the bank.

        The first call for a query also scores every damping of ``DAMPING_GRID`` (49 values,
        1e-13..1e3) in the same pass (``RotatedBank.score_many``) and keeps them in
        ``prepared``; a later call with a grid damping is a lookup, one within
        ``damping_grid.SUPPORTED`` is a weighted sum of the grid's scores (exact up to a
        relative 1e-4 per eigen-coordinate, engine.attribution.damping_grid), and any other is one more pass.
        """
        lam = self.default_damping if damping is None else float(damping)
        d = prepared.data
        cache: dict[float, np.ndarray] = d.setdefault("scores", {})
        t0 = time.perf_counter()
        if lam not in cache:
            grid = d.get("grid_values")
            interpolated = interpolate(cache, lam, grid) if grid else None
            if interpolated is not None:
                cache[lam] = interpolated
            else:
                eig = d["eigenvalues"].to(d["rotated"].dtype)
                grid = self._grid_for(d) if not cache and d.get("grid", True) else None
                if grid:
                    lams = sorted(set(grid) | {lam})
                    lam_t = torch.tensor(lams, dtype=eig.dtype, device=eig.device)[:, None]
                    many = d["bank"].score_many(d["rotated"][None] / (eig[None] + lam_t))
                    cache.update({lv: many[i] for i, lv in enumerate(lams)})
                    d["grid_values"] = grid
                else:
                    cache[lam] = d["bank"].score(d["rotated"] / (eig + lam))
        prepared.timing_ms["score"] = (time.perf_counter() - t0) * 1000.0
        return cache[lam]

    @staticmethod
    def _grid_for(d: dict[str, Any]) -> tuple[float, ...] | None:
        """The fine grid if its G x P queries fit the limit, else the powers of ten, else none."""
        limit = GRID_MAX_BYTES_STREAMED if isinstance(d["bank"], StreamedBank) else GRID_MAX_BYTES
        for grid in (DAMPING_GRID, COARSE_GRID):
            if (len(grid) + 1) * d["rotated"].numel() * 4 <= limit:
                return grid
        return None
