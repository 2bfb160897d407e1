"""Noise schedule, forward process, draws and the DDPM ancestral sampler (Ho et al. 2020)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from engine.config import DiffusionConfig
from engine.model.diffusion import Diffusion, index_t, make_draws, paper_t


def test_schedule_values(diffusion):
    T = diffusion.T
    assert T == 1000
    b = diffusion.betas.numpy()
    assert np.isclose(b[0], 1e-4) and np.isclose(b[-1], 0.02)
    assert np.allclose(np.diff(b), (0.02 - 1e-4) / 999)
    ab = diffusion.alpha_bars.numpy()
    assert np.all(np.diff(ab) < 0)  # strictly decreasing
    assert np.isclose(ab[0], 1 - 1e-4)
    assert np.isclose(ab[-1], np.prod(1 - np.linspace(1e-4, 0.02, 1000)))
    assert 3e-5 < ab[-1] < 5e-5  # Ho et al.: x_T is almost pure noise
    # posterior variance beta_tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t); 0 at paper t = 1
    pv = diffusion.posterior_var.numpy()
    assert pv[0] == 0
    assert np.isclose(pv[10], b[10] * (1 - ab[9]) / (1 - ab[10]))
    assert np.all(pv[1:] < b[1:])
    assert paper_t(0) == 1 and index_t(1000) == 999


def test_q_sample_statistics(diffusion):
    x0 = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    for t_idx in (0, 300, 999):
        n = 20000
        eps = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
        t = torch.full((n,), t_idx)
        xt = diffusion.q_sample(x0.double().expand(n, -1, -1, -1), t, eps)
        ab = float(diffusion.alpha_bars[t_idx])
        se = np.sqrt((1 - ab) / n)
        assert torch.allclose(xt.mean(0), np.sqrt(ab) * x0[0].double(), atol=5 * se)
        assert torch.allclose(xt.var(0), torch.full_like(xt[0], 1 - ab), rtol=0.05, atol=1e-6)


def test_per_sample_loss_is_mean_squared_error(diffusion):
    class Const(nn.Module):
        def forward(self, x, t):
            return torch.full_like(x, 0.5)

    eps = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    loss = diffusion.per_sample_loss(Const(), torch.zeros(2, 1, 4, 4), torch.tensor([0, 5]), eps)
    assert torch.allclose(loss, ((eps - 0.5) ** 2).flatten(1).mean(1))


def test_draws_seeded_and_pinned():
    a = make_draws(8, (1, 4, 4), 1000, seed=3)
    b = make_draws(8, (1, 4, 4), 1000, seed=3)
    c = make_draws(8, (1, 4, 4), 1000, seed=4)
    p = make_draws(8, (1, 4, 4), 1000, seed=3, t_fixed=499)
    assert torch.equal(a.t, b.t) and torch.equal(a.eps, b.eps)
    assert not torch.equal(a.eps, c.eps)
    assert torch.equal(p.eps, a.eps) and torch.all(p.t == 499)  # common random numbers
    assert a.t.min() >= 0 and a.t.max() <= 999 and len(a) == 8


class _Linear(nn.Module):
    """eps_theta(x, t) = w_t * x: a model whose sampler path can be computed by hand."""

    def __init__(self, T):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.1, 0.9, T))

    def forward(self, x, t):
        return self.w[t].reshape(-1, 1, 1, 1).to(x.dtype) * x


def test_sampler_small_variance_and_trajectory_conventions():
    """Compare with a hand-written loop in numpy: sigma_t^2 = beta_tilde_t, no noise at the last step."""
    T = 5
    diff = Diffusion(DiffusionConfig(num_timesteps=T))
    model = _Linear(T)
    shape = (1, 2, 2)
    seed = 7
    imgs, traj = diff.sample(model, 2, shape, seed=seed, trajectory=True)
    b = np.linspace(1e-4, 0.02, T)
    ab = np.cumprod(1 - b)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    w = model.w.detach().numpy().astype(np.float64)
    for i in range(2):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        x = torch.randn(shape, generator=g).double().numpy()
        states = [x]
        for t in reversed(range(T)):
            mean = (x - b[t] / np.sqrt(1 - ab[t]) * w[t] * x) / np.sqrt(1 - b[t])
            if t > 0:
                var = b[t] * (1 - ab_prev[t]) / (1 - ab[t])
                x = mean + np.sqrt(var) * torch.randn(shape, generator=g).double().numpy()
            else:
                x = mean
            states.append(x)
        assert np.allclose(traj[i].numpy(), np.stack(states), atol=1e-5)
        assert np.allclose(imgs[i].numpy(), states[-1], atol=1e-5)


def test_sampler_reproducible_and_batch_independent(tiny_model):
    diff = Diffusion(DiffusionConfig(num_timesteps=20))
    steps = []
    a, ta = diff.sample(tiny_model, 3, (1, 8, 8), seed=1, trajectory=True, progress=lambda s, T: steps.append(s))
    b, _ = diff.sample(tiny_model, 3, (1, 8, 8), seed=1, batch_size=2)
    c, _ = diff.sample(tiny_model, 3, (1, 8, 8), seed=2)
    assert steps == list(range(1, 21))
    assert torch.allclose(a, b, atol=1e-5)  # batch size does not change a sample
    one, _ = diff.sample(tiny_model, 1, (1, 8, 8), seed=1)
    assert torch.allclose(one[0], a[0], atol=1e-5)
    assert not torch.allclose(a, c)
    assert ta.shape == (3, 21, 1, 8, 8)
    assert torch.equal(ta[:, -1], a)  # last state is the returned image
    assert not torch.equal(ta[:, 0], ta[:, 1])
