"""bench-scale's forward-mode alternative for re-ranking computes the same <grad l_i, v> as the
per-example gradients it would replace (its GPU throughput is then a fair comparison)."""

import torch

from engine.attribution.gradients import influence_params, per_example_grads
from engine.bench.scale import directional_derivatives
from engine.config import PRESETS
from engine.model.diffusion import Diffusion, make_draws
from engine.model.unet import build_model


def test_forward_mode_matches_per_example_gradients():
    torch.manual_seed(0)
    preset = PRESETS["digits"]
    model = build_model(preset.model).eval()
    diffusion = Diffusion(preset.diffusion)
    params = influence_params(model)
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    draws = make_draws(4, (1, 8, 8), diffusion.T, seed=1)
    tangent = tuple(torch.randn_like(p) for _, p in params)
    dots = directional_derivatives(model, diffusion, images, draws, params, tangent)
    grads = per_example_grads(model, diffusion, images, draws, "loss", params).detach()
    ref = grads @ torch.cat([v.reshape(-1) for v in tangent])
    assert dots.shape == (3,)
    torch.testing.assert_close(dots, ref, rtol=1e-4, atol=1e-6)
