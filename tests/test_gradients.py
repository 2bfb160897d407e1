"""Per-example Monte Carlo gradients (engine.attribution.gradients): back-ends agree with plain autograd."""

from __future__ import annotations

import pytest
import torch

from engine.attribution.gradients import (
    influence_params,
    measurement_grad,
    per_example_grads,
    per_example_grads_by_loss,
    shared_forward_grads,
    train_loss_grads,
)
from engine.attribution.methods.base import QueryInput
from engine.model.diffusion import make_draws
from engine.model.measurements import diffusion_loss, parse_measurement, square_norm


@pytest.fixture
def setup(tiny_model, diffusion, digits_small):
    x = digits_small.images[:3]
    draws = make_draws(5, (1, 8, 8), diffusion.T, seed=1)
    return tiny_model, diffusion, x, draws


def _autograd(model, fn, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(fn(), [p for _, p in params])])


def test_influence_params_are_conv_and_linear_only(tiny_model):
    names = [n for n, _ in influence_params(tiny_model)]
    assert names and not any("norm" in n for n in names)
    trainable = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert len(trainable) > len(names) and any("norm" in n for n in trainable)  # GroupNorm affine params: excluded


@pytest.mark.parametrize("backend", ["loop", "func", "hooks"])
@pytest.mark.parametrize("loss", ["loss", "square-norm"])
def test_backends_match_autograd(setup, backend, loss):
    model, diffusion, x, draws = setup
    params = influence_params(model)
    g = per_example_grads(model, diffusion, x, draws, loss=loss, params=params, backend=backend)
    assert g.shape == (3, sum(p.numel() for _, p in params))
    fn = diffusion_loss if loss == "loss" else square_norm
    for i in range(3):
        ref = _autograd(model, lambda i=i: fn(model, diffusion, x[i], draws), params)
        torch.testing.assert_close(g[i], ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "hooks"])
def test_grads_by_loss_share_a_forward_and_equal_each_loss_alone(setup, backend, monkeypatch):
    """One forward per example (CPU loop) for the loss and the square norm; each equals its own
    ``per_example_grads``, and the order the losses are asked in does not matter."""
    model, diffusion, x, draws = setup
    params = influence_params(model)
    calls = [0]
    real_forward = type(model).forward

    def counting(self, *a, **k):
        calls[0] += 1
        return real_forward(self, *a, **k)

    monkeypatch.setattr(type(model), "forward", counting)
    both = per_example_grads_by_loss(model, diffusion, x, draws, ("square-norm", "loss"), params, backend)
    forwards = calls[0]
    assert list(both) == ["square-norm", "loss"]
    for loss in ("loss", "square-norm"):
        alone = per_example_grads(model, diffusion, x, draws, loss=loss, params=params, backend=backend)
        torch.testing.assert_close(both[loss], alone, rtol=1e-5, atol=1e-7)
    if backend == "auto":  # the CPU loop: one forward per example, not one per (example, loss)
        assert forwards == x.shape[0]
    with pytest.raises(ValueError, match="unknown training loss"):
        per_example_grads_by_loss(model, diffusion, x, draws, ("loss", "elbo"), params)


def test_common_random_numbers_and_batching(setup):
    """Batching does not change an example's gradient (same draws for every example)."""
    model, diffusion, x, draws = setup
    whole = torch.cat([g for _, g in train_loss_grads(model, diffusion, x, draws, batch_size=3)])
    parts = list(train_loss_grads(model, diffusion, x, draws, batch_size=2))
    assert [s for s, _ in parts] == [slice(0, 2), slice(2, 3)]
    torch.testing.assert_close(torch.cat([g for _, g in parts]), whole)
    assert not torch.allclose(whole[0], whole[1])


def test_measurement_grad_loss_equals_train_grad(setup):
    model, diffusion, x, draws = setup
    g_m = measurement_grad(
        model, diffusion, parse_measurement("loss", 1000), QueryInput(image=x[1]), draws, levels=17
    )
    g_t = per_example_grads(model, diffusion, x[1:2], draws)[0]
    torch.testing.assert_close(g_m, g_t, rtol=1e-4, atol=1e-7)


def test_shared_forward_grads_equal_separate_measurement_grads(setup):
    """One forward for the loss and the square norm gives each one's own gradient."""
    model, diffusion, x, draws = setup
    specs = [parse_measurement("square-norm", 1000), parse_measurement("loss", 1000)]
    both = shared_forward_grads(model, diffusion, x[2], draws, specs)
    assert list(both) == specs
    for spec in specs:
        alone = measurement_grad(model, diffusion, spec, QueryInput(image=x[2]), draws, levels=17)
        torch.testing.assert_close(both[spec], alone, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(both[specs[0]], both[specs[1]])
    with pytest.raises(ValueError, match="distinct measurements"):
        shared_forward_grads(model, diffusion, x[2], draws, [parse_measurement("elbo", 1000)])


@pytest.mark.parametrize("spec", ["elbo", "trajectory", "loss@t=10"])
def test_measurement_grad_other_measurements(setup, spec):
    model, diffusion, x, draws = setup
    gen = torch.Generator().manual_seed(0)
    traj = torch.randn(diffusion.T + 1, 1, 8, 8, generator=gen) * 0.5
    q = QueryInput(image=x[0], trajectory=traj)
    g = measurement_grad(model, diffusion, parse_measurement(spec, 1000), q, draws, levels=17)
    assert g.shape == (sum(p.numel() for _, p in influence_params(model)),)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_gradients_in_eval_mode(tiny_preset, diffusion, digits_small):
    """Dropout is off for attribution gradients even if the model was left in train mode."""
    import dataclasses

    from engine.model.unet import build_model

    torch.manual_seed(0)
    model = build_model(dataclasses.replace(tiny_preset.model, dropout=0.5))
    x, draws = digits_small.images[:2], make_draws(4, (1, 8, 8), diffusion.T, seed=1)
    ref = per_example_grads(model.eval(), diffusion, x, draws)
    model.train()
    for backend in ("loop", "hooks"):
        torch.testing.assert_close(per_example_grads(model, diffusion, x, draws, backend=backend), ref)
    q = measurement_grad(model, diffusion, parse_measurement("loss", 1000), QueryInput(image=x[0]), draws, 17)
    torch.testing.assert_close(q, ref[0], rtol=1e-4, atol=1e-7)
    assert model.training  # mode restored
