"""The Monte Carlo draws of the training examples' gradients and curvature rows (docs/architecture.md §3, §6).

l(theta, x_i) = E_{t, eps, flip} (1/D) ||eps - eps_theta(x_t(flip(x_i)), t)||^2 is estimated with
M draws per example.  Two ways to choose them (``AttributionConfig.draws``):

* ``per-example`` (paper G.3; the default since the K=32 digits LDS found it no worse than shared:
  +0.013 [-0.028, +0.054]): example i gets its own M draws, seeded by (seed, i) alone, so a
  gradient does not depend on batching, sharding or which other examples are in the set, and the
  curvature sees every timestep.
* ``shared``: the same M draws (t_m, eps_m, flip_m) for every example.  Common random numbers
  across examples: differences between examples' gradients are not Monte Carlo noise, but the
  whole training set sees only M distinct timesteps (on digits, M = 64 gives 61 distinct t, so the
  time-embedding layers' K-FAC input factor has rank 61 of 128).
* ``stratified``: shared draws whose M timesteps are stratified over {0..T-1} (one per stratum of
  width T/M, ``make_draws(stratify_t=True)``), with the same eps as ``shared`` at the same seed.
  Each t is still uniform, so the estimates stay unbiased; the M timesteps cannot cluster.

The flip bit is the data augmentation of presets trained with random horizontal flips
(``DataConfig.flip``; paper G.8 takes the expectation over the augmentation too); without flips
there is no bit and the draws equal those of earlier versions.  Query measurements never use it:
the query is attributed as it is (``engine.attribution.session.AttributionSession.query_draws``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..model.diffusion import MCDraws, make_draws
from ..validation import DRAW_MODES, SHARED_DRAW_MODES  # noqa: F401 - the modes, named where they are validated


def example_seed(seed: int, index: int) -> int:
    """Well-mixed 63-bit seed of example ``index``'s draws (independent of batches and shards)."""
    state = np.random.SeedSequence([int(seed), int(index), 0x5D7A]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


@dataclass(frozen=True)
class PerExampleDraws:
    """Independent draws per training example: example i's are ``make_draws(m, ..., example_seed(seed, i))``.

    Offers the slicing interface of ``MCDraws`` for absolute example indices: ``for_rows(slice)``
    returns batched draws (t (b, M), eps (b, M, C, H, W)).  ``take`` keeps the first ``take`` of
    the M draws of every example (K-FAC's ``factor_draws``).
    """

    m: int
    shape: tuple[int, int, int]
    num_timesteps: int
    seed: int
    flip: bool = False
    take: int | None = None

    def __len__(self) -> int:
        return int(self.m if self.take is None else min(self.take, self.m))

    @property
    def batched(self) -> bool:
        """Always: every example has its own M draws (paper G.3)."""
        return True

    def example(self, index: int) -> MCDraws:
        """Training example ``index``'s M draws, a function of the seed and the index alone, so that a
        resumed pass, a torchrun shard and a re-rank all see the same draws for that example."""
        d = make_draws(self.m, self.shape, self.num_timesteps, example_seed(self.seed, index), flip=self.flip)
        return d if self.take is None else d.head(self.take)

    def for_rows(self, rows: slice) -> MCDraws:
        """Batched draws of examples rows.start .. rows.stop - 1."""
        per = [self.example(i) for i in range(rows.start or 0, rows.stop)]
        flip = torch.stack([d.flip for d in per]) if self.flip else None  # type: ignore[misc]
        return MCDraws(torch.stack([d.t for d in per]), torch.stack([d.eps for d in per]), flip)

    def for_indices(self, indices: torch.Tensor | np.ndarray | Sequence[int]) -> MCDraws:
        """Batched draws of examples ``indices`` (any index array), in that order."""
        idx = [int(i) for i in torch.as_tensor(indices).reshape(-1).tolist()]
        per = [self.example(i) for i in idx]
        flip = torch.stack([d.flip for d in per]) if self.flip else None  # type: ignore[misc]
        return MCDraws(torch.stack([d.t for d in per]), torch.stack([d.eps for d in per]), flip)

    def head(self, k: int) -> PerExampleDraws:
        """Each example's first ``k`` draws (the K-FAC factors from k of the bank's M draws)."""
        return PerExampleDraws(self.m, self.shape, self.num_timesteps, self.seed, self.flip, int(k))

    def digest(self) -> str:
        """16 hex identifying these draws (they are a function of these settings alone)."""
        text = f"per-example;{self.m};{self.shape};{self.num_timesteps};{self.seed};{self.flip};{self.take}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


TrainDraws = MCDraws | PerExampleDraws


def draw_settings(draws: TrainDraws) -> dict[str, Any]:
    """Cache-key entries for how training draws were made: nothing for the default (shared, no
    flips: keys of caches built before these options stay valid), else the mode and the augmentation."""
    out: dict[str, Any] = {}
    if isinstance(draws, PerExampleDraws):
        out["draws_mode"] = "per-example"
        flip = draws.flip
    else:
        flip = draws.flip is not None
        if draws.stratified:
            out["draws_mode"] = "stratified"
    if flip:
        out["augment"] = "hflip"
    return out


def training_draws(
    mode: str, m: int, shape: tuple[int, int, int], num_timesteps: int, seed: int, flip: bool = False
) -> TrainDraws:
    """The draws of every training gradient and curvature row under ``mode`` (see module docstring)."""
    if mode in SHARED_DRAW_MODES:
        return make_draws(m, shape, num_timesteps, seed=seed, flip=flip, stratify_t=mode == "stratified")
    if mode == "per-example":
        return PerExampleDraws(int(m), tuple(shape), int(num_timesteps), int(seed), bool(flip))  # type: ignore[arg-type]
    raise ValueError(f"unknown draws mode {mode!r}: expected one of {DRAW_MODES}")
