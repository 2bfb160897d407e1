"""Everything an attribution method needs about one checkpoint + training set (docs/architecture.md §2).

``params`` is the parameter set of every attribution gradient (train, query, curvature):
the weights and biases of all Conv2d and Linear layers (``engine.attribution.gradients.influence_params``).
Normalisation layers have no K-FAC block (docs/architecture.md §4) and are left out of influence
gradients for every method, so all methods score the same gradient.

``train_draws`` are the M Monte Carlo draws (t, eps, and a flip bit for presets trained with
flips) of every training example's gradient and curvature row, seeded by ``config.seed``:
independent per example (``config.draws = "per-example"``, paper G.3; the default) or shared by
every example (``"shared"`` / ``"stratified"``: common random numbers, docs/architecture.md §6, the mnist
preset's); see
``engine.attribution.train_draws``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import AttributionConfig, ComputeConfig, Preset
from ..model.data import ImageDataset
from ..model.diffusion import Diffusion
from .gradients import influence_params, num_params
from .store import Store
from .train_draws import TrainDraws, training_draws


@dataclass
class EngineContext:
    """What every method's ``build``, ``prepare`` and ``score`` share: the model (eval mode), its
    diffusion, the training set, the device and the attribution settings (and the preset's speed and memory
    settings, ``compute``), opened once by the session."""

    preset: Preset
    model: nn.Module  # eval mode
    diffusion: Diffusion
    dataset: ImageDataset
    device: torch.device
    config: AttributionConfig
    checkpoint_hash: str
    store: Store | None  # on-disk cache for this checkpoint + data (None: nothing cached)
    params: list[tuple[str, nn.Parameter]]  # parameters that gradients cover, in flat order
    train_draws: TrainDraws  # M draws per train gradient and curvature row (engine.attribution.train_draws)

    @property
    def num_params(self) -> int:
        return num_params(self.params)

    @property
    def compute(self) -> ComputeConfig:
        """The preset's batch sizes and memory budgets (``ComputeConfig``): what the methods and the banks they
        build read, never what the answer is."""
        return self.preset.compute


def make_context(
    preset: Preset,
    model: nn.Module,
    dataset: ImageDataset,
    device: torch.device | str,
    config: AttributionConfig | None = None,
    checkpoint_hash: str = "",
    store: Store | None = None,
    diffusion: Diffusion | None = None,
) -> EngineContext:
    """Fill ``params`` (Conv2d/Linear weights and biases) and ``train_draws`` =
    training_draws(config.draws, config.mc_samples, image shape, T, seed=config.seed,
    flip=preset.data.flip); the model is moved to ``device`` and put in eval mode."""
    config = config or preset.attribution
    device = torch.device(device)
    model = model.to(device).eval()
    diffusion = diffusion or Diffusion(preset.diffusion)
    draws = training_draws(
        config.draws, config.mc_samples, dataset.shape, diffusion.T, seed=config.seed, flip=preset.data.flip
    )
    return EngineContext(
        preset=preset,
        model=model,
        diffusion=diffusion,
        dataset=dataset,
        device=device,
        config=config,
        checkpoint_hash=checkpoint_hash,
        store=store,
        params=influence_params(model),
        train_draws=draws,
    )
