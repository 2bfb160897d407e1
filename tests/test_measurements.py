"""Measurements against independent computations: trajectory log-density, ELBO terms (Ho et al. eq. 5),
Monte Carlo ELBO unbiasedness, parsing, loss@t, and the ELBO of the shipped digits model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from engine.config import DiffusionConfig
from engine.model.diffusion import Diffusion, MCDraws, make_draws
from engine.model.measurements import (
    CATALOGUE,
    Measurement,
    discretized_gaussian_log_likelihood,
    elbo_bpd,
    elbo_terms,
    measure,
    measurement_info,
    parse_measurement,
    prior_kl,
    quantize,
    trajectory_nll,
)

ASSET = Path(__file__).resolve().parent.parent / "assets" / "digits"
T_SHORT = 20


@pytest.fixture
def short() -> Diffusion:
    return Diffusion(DiffusionConfig(num_timesteps=T_SHORT))


@pytest.fixture
def model64(tiny_model):
    return tiny_model.double()


def _schedule(T):
    b = np.linspace(1e-4, 0.02, T)
    ab = np.cumprod(1 - b)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    return b, ab, ab_prev


def _p_mean(model, x, t_idx, T):
    """Ho et al. eq. 11, written out again: (x_t - beta_t / sqrt(1 - abar_t) eps_theta) / sqrt(alpha_t)."""
    b, ab, _ = _schedule(T)
    eps = model(x, torch.full((x.shape[0],), t_idx))
    return (x - b[t_idx] / math.sqrt(1 - ab[t_idx]) * eps) / math.sqrt(1 - b[t_idx])


# --- parsing ---------------------------------------------------------------------------------


def test_parse_measurement():
    assert parse_measurement("loss", 1000) == Measurement("loss")
    assert parse_measurement(" ELBO ", 1000) == Measurement("elbo")
    assert parse_measurement("elbo-exact", 1000) == Measurement("elbo", exact=True)
    for spec in ("loss", "loss@t=1", "loss@t=500", "elbo", "elbo-exact", "trajectory", "square-norm"):
        assert str(parse_measurement(spec, 1000)) == spec  # names round-trip
    for info in CATALOGUE:
        spec = info.spec + ("=7" if info.spec == "loss@t" else "")
        assert str(parse_measurement(spec, 1000)) == spec and measurement_info(spec) is info
    assert parse_measurement("loss@t=500", 1000) == Measurement("loss@t", t_idx=499)
    assert parse_measurement("loss@t=1", 1000) == Measurement("loss@t", t_idx=0)
    assert str(parse_measurement("loss@t=7", 1000)) == "loss@t=7"
    assert parse_measurement("trajectory", 1000).kind == "trajectory"
    assert parse_measurement("square-norm", 1000).kind == "square-norm"
    for bad, msg in [("loss@t=0", "out of range"), ("loss@t=1001", "out of range"), ("loss@t=abc", "bad timestep"),
                     ("nll", "unknown measurement"), ("", "unknown measurement")]:
        with pytest.raises(ValueError, match=msg):
            parse_measurement(bad, 1000)
    assert parse_measurement("loss@t=20", num_timesteps=20).t_idx == 19
    with pytest.raises(ValueError):
        parse_measurement("loss@t=21", num_timesteps=20)


def test_loss_at_t_uses_pinned_t(tiny_model, diffusion, digits_small):
    x = digits_small.images[:2]
    draws = make_draws(4, (1, 8, 8), 1000, seed=0)
    with torch.no_grad():
        got = measure("loss@t=300", tiny_model, diffusion, x, draws)
        direct = []
        for i in range(2):
            for m in range(4):
                xt = diffusion.q_sample(x[i : i + 1], torch.tensor([299]), draws.eps[m : m + 1])
                direct.append(((draws.eps[m] - tiny_model(xt, torch.tensor([299]))[0]) ** 2).mean())
        assert torch.allclose(got, torch.stack(direct).mean(), atol=1e-6)
        assert not torch.allclose(got, measure("loss@t=900", tiny_model, diffusion, x, draws))
        # plain loss uses the draws' own t
        assert not torch.allclose(got, measure("loss", tiny_model, diffusion, x, draws))


def test_square_norm_direct(tiny_model, diffusion, digits_small):
    x = digits_small.images[5]
    draws = make_draws(3, (1, 8, 8), 1000, seed=1)
    with torch.no_grad():
        got = measure("square-norm", tiny_model, diffusion, x, draws)
        xt = diffusion.q_sample(x[None].expand(3, -1, -1, -1), draws.t, draws.eps)
        assert torch.allclose(got, tiny_model(xt, draws.t).pow(2).mean(), atol=1e-6)


# --- trajectory ------------------------------------------------------------------------------


def test_trajectory_nll_is_sum_of_gaussian_steps(model64, short):
    """-log p(x_{0:T}) in nats = prior + every reverse step, the last one x_1 -> x_0 included."""
    _, traj = short.sample(model64, 1, (1, 8, 8), seed=3, trajectory=True)
    traj = traj[0].double()
    traj[-1] += 0.01 * torch.randn(traj[-1].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    b, ab, ab_prev = _schedule(T_SHORT)
    beta_tilde = b * (1 - ab_prev) / (1 - ab)
    with torch.no_grad():
        logp = Normal(0.0, 1.0).log_prob(traj[0]).sum()
        for k in range(T_SHORT):  # x_t (t_idx = T-1-k) -> x_{t-1}
            t_idx = T_SHORT - 1 - k
            mean = _p_mean(model64, traj[k][None], t_idx, T_SHORT)[0]
            # the decoder step (t_idx 0) has beta_tilde_1 = 0: Ho et al.'s clipped variance beta_tilde_2
            var = beta_tilde[t_idx] if t_idx > 0 else beta_tilde[1]
            logp = logp + Normal(mean, math.sqrt(var)).log_prob(traj[k + 1]).sum()
        got = trajectory_nll(model64, short, traj)
    assert torch.allclose(got, -logp, rtol=1e-10)
    with pytest.raises(ValueError, match="T\\+1"):
        trajectory_nll(model64, short, traj[:-1])
    # a trajectory the model did not produce is less likely
    other = traj.clone()
    other[5:] += 0.05
    with torch.no_grad():
        assert trajectory_nll(model64, short, other) > got


def test_trajectory_last_step_depends_on_theta(model64, short):
    """Changing only the model's output at t = 1 changes the measurement (the decoder step counts)."""
    _, traj = short.sample(model64, 1, (1, 8, 8), seed=4, trajectory=True)
    traj = traj[0].double()
    with torch.no_grad():
        base = trajectory_nll(model64, short, traj)

    class ShiftAtOne(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, t):
            out = self.net(x, t)
            return out + 0.1 * (t == 0).to(out.dtype).reshape(-1, 1, 1, 1)

    with torch.no_grad():
        shifted = trajectory_nll(ShiftAtOne(model64), short, traj)
    # x_0 is the mean of the last step under model64, so any change there makes it less likely
    assert shifted > base + 1e-6


# --- ELBO ------------------------------------------------------------------------------------


def test_kl_terms_match_closed_form(model64, short, digits_small):
    x0 = quantize(digits_small.images[:3].double(), 17)
    t = torch.tensor([1, 7, 19])
    eps = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    b, ab, ab_prev = _schedule(T_SHORT)
    with torch.no_grad():
        got = elbo_terms(model64, short, x0, t, eps, levels=17)
        for i, ti in enumerate(t.tolist()):
            xt = math.sqrt(ab[ti]) * x0[i] + math.sqrt(1 - ab[ti]) * eps[i]
            # Ho eq. 7: posterior mean and variance of q(x_{t-1} | x_t, x_0)
            mu_q = (math.sqrt(ab_prev[ti]) * b[ti] / (1 - ab[ti])) * x0[i] + (
                math.sqrt(1 - b[ti]) * (1 - ab_prev[ti]) / (1 - ab[ti])
            ) * xt
            var = b[ti] * (1 - ab_prev[ti]) / (1 - ab[ti])
            mu_p = _p_mean(model64, xt[None], ti, T_SHORT)[0]
            kl = kl_divergence(Normal(mu_q, math.sqrt(var)), Normal(mu_p, math.sqrt(var))).sum()
            assert torch.allclose(got[i], kl, rtol=1e-9), (ti, got[i], kl)


def _log_mass(mpmath, x: float, m: float, s: float, levels: int) -> float:
    """log of the Gaussian N(m, s^2) mass of the bin [x - h, x + h], h = 1/(levels-1), in 50+ digits;
    the outermost bins reach to -inf / +inf.  The CDF difference is written on the side of the
    mean where the two terms do not cancel (the survival function Phi(-z) to the right)."""
    h = mpmath.mpf(1) / (levels - 1)
    x, m, s = mpmath.mpf(x), mpmath.mpf(m), mpmath.mpf(s)
    lo = -mpmath.inf if x < -1 + h / 2 else (x - h - m) / s
    hi = mpmath.inf if x > 1 - h / 2 else (x + h - m) / s
    if x > m:
        p = mpmath.ncdf(-lo) - mpmath.ncdf(-hi)
    else:
        p = mpmath.ncdf(hi) - mpmath.ncdf(lo)
    return float(mpmath.log(p))


def test_decoder_matches_explicit_cdf_differences(model64, short, digits_small):
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    x0 = quantize(digits_small.images[:2].double(), 17)
    eps = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.zeros(2, dtype=torch.long)
    b, ab, ab_prev = _schedule(T_SHORT)
    # decoder variance at paper t = 1: beta_tilde_2 (beta_tilde_1 = 0; Ho et al.'s clipped log-variance)
    sigma = math.sqrt(b[1] * (1 - ab_prev[1]) / (1 - ab[1]))
    with torch.no_grad():
        got = elbo_terms(model64, short, x0, t, eps, levels=17)
        xt = math.sqrt(ab[0]) * x0 + math.sqrt(1 - ab[0]) * eps
        mu = _p_mean(model64, xt, 0, T_SHORT)

    for i in range(2):
        expect = -sum(
            _log_mass(mpmath, float(x0[i].flatten()[j]), float(mu[i].flatten()[j]), sigma, 17) for j in range(64)
        )
        assert got[i].item() == pytest.approx(expect, rel=1e-6, abs=1e-6)


def test_discretized_likelihood_levels_edges_and_tails():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 60
    levels = 256
    x = torch.tensor([-1.0, -1 + 2 / 255 * 3, 0.0, 1 - 2 / 255, 1.0, 0.2, -0.6], dtype=torch.float64)
    mean = torch.tensor([-0.9, -0.98, 0.001, 0.5, 0.95, -0.6, 0.2], dtype=torch.float64)
    log_s = torch.full_like(x, math.log(0.01))
    got = discretized_gaussian_log_likelihood(x, mean, log_s, levels)
    for i in range(len(x)):
        expect = _log_mass(mpmath, float(x[i]), float(mean[i]), 0.01, levels)
        assert float(got[i]) == pytest.approx(expect, rel=1e-6), i
    assert torch.isfinite(got).all()
    # the masses of all 256 bins sum to one (bin width 2/255)
    grid = torch.linspace(-1, 1, levels, dtype=torch.float64)
    lp = discretized_gaussian_log_likelihood(grid, torch.full_like(grid, 0.3), torch.full_like(grid, math.log(0.05)), levels)
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    # float32 input gives finite values and gradients far in the tails
    m = torch.tensor([0.9], requires_grad=True)
    v = discretized_gaussian_log_likelihood(torch.tensor([-0.5]), m, torch.tensor([math.log(0.01)]), levels)
    v.sum().backward()
    assert torch.isfinite(v).all() and torch.isfinite(m.grad).all()


def test_prior_kl_closed_form(diffusion):
    x0 = torch.linspace(-1, 1, 4, dtype=torch.float64).reshape(1, 1, 2, 2)
    ab = float(diffusion.alpha_bars[-1])
    expect = kl_divergence(Normal(math.sqrt(ab) * x0, math.sqrt(1 - ab)), Normal(0.0, 1.0)).sum()
    assert torch.allclose(prior_kl(diffusion, x0), expect.reshape(1), rtol=1e-9)


def test_exact_elbo_is_prior_plus_sum_of_terms(model64, short, digits_small):
    x0 = quantize(digits_small.images[:2].double(), 17)
    draws = make_draws(7, (1, 8, 8), T_SHORT, seed=2).to("cpu", torch.float64)
    with torch.no_grad():
        got = elbo_bpd(model64, short, x0, draws, levels=17, exact=True, chunk=6)
        tot = []
        for i in range(2):
            terms = [elbo_terms(model64, short, x0[i : i + 1], torch.tensor([t]), draws.eps[t % 7][None], 17)
                     for t in range(T_SHORT)]
            tot.append(prior_kl(short, x0[i : i + 1])[0] + torch.cat(terms).sum())
        assert torch.allclose(got, torch.stack(tot).mean() / (64 * math.log(2)), rtol=1e-9)


@pytest.mark.slow
def test_mc_elbo_is_unbiased(tiny_model, short, digits_small):
    x0 = digits_small.images[:1]
    with torch.no_grad():
        # reference: every t, with the expectation over eps converged by averaging 200 draws per t
        per_t = []
        for t in range(T_SHORT):
            d = make_draws(200, (1, 8, 8), T_SHORT, seed=100 + t, t_fixed=t)
            xs = quantize(x0, 17).expand(200, -1, -1, -1)
            per_t.append(elbo_terms(tiny_model, short, xs, d.t, d.eps, 17))
        per_t = torch.stack(per_t).double()  # (T, 200)
        exact = (prior_kl(short, quantize(x0, 17)).double()[0] + per_t.mean(1).sum()) / (64 * math.log(2))
        exact_se = per_t.var(1).div(200).sum().sqrt() / (64 * math.log(2))
        ests = torch.stack(
            [elbo_bpd(tiny_model, short, x0, make_draws(10, (1, 8, 8), T_SHORT, seed=s), 17) for s in range(300)]
        ).double()
    se = (ests.std() ** 2 / len(ests) + exact_se**2).sqrt()
    assert abs(ests.mean() - exact) < 4 * se, (float(ests.mean()), float(exact), float(se))
    assert se < 0.05 * abs(exact)  # the check is sharp enough to catch a wrong weight


def test_elbo_differentiable(tiny_model, diffusion, digits_small):
    draws = make_draws(4, (1, 8, 8), 1000, seed=0)
    draws = MCDraws(torch.tensor([0, 1, 500, 999]), draws.eps)
    v = measure("elbo", tiny_model, diffusion, digits_small.images[0], draws, levels=17)
    v.backward()
    grads = [p.grad for p in tiny_model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.slow
def test_trained_digits_elbo_real_below_noise(digits):
    """Issue 2: the full-sum ELBO of the trained digits model is lower on real digits than on noise."""
    if not (ASSET / "model.safetensors").is_file():
        pytest.skip(f"shipped digits checkpoint not found at {ASSET}")
    from engine.model.checkpoint import load_checkpoint

    model, preset, _ = load_checkpoint(ASSET)
    diff = Diffusion(preset.diffusion)
    real = digits.images[[0, 1, 2, 3]]
    noise = quantize(torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1, 17)
    draws = make_draws(diff.T, (1, 8, 8), diff.T, seed=0)
    with torch.no_grad():
        r = [float(elbo_bpd(model, diff, x, draws, 17, exact=True)) for x in real]
        n = [float(elbo_bpd(model, diff, x, draws, 17, exact=True)) for x in noise]
    assert max(r) < min(n), (r, n)
    assert all(v > 0 for v in r)  # a negative log-likelihood of discrete data is positive
