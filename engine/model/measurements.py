"""Measurements m(theta, x_q): loss-like (lower means the query is more likely) but for ``square-norm``,
D-TRAK's mean square of the model's noise prediction, which is no likelihood proxy.

docs/architecture.md §3.  Each returns a scalar tensor that autograd can differentiate w.r.t. the
model's parameters, estimated with the given Monte Carlo draws (common random numbers:
the same ``MCDraws`` for every method and every model being compared).

Timesteps are 0-based indices here (``engine.model.diffusion``); ``loss@t=NNN`` in the text
form uses the paper's 1-based t and is converted at parsing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .diffusion import Diffusion, MCDraws, index_t

KINDS = ("loss", "loss@t", "elbo", "trajectory", "square-norm")


@dataclass(frozen=True)
class MeasurementInfo:
    """One entry of the catalogue the CLI help and the app show: ``spec`` is what
    ``parse_measurement`` takes (``loss@t`` needs ``=NNN``), ``title`` and ``help`` are for people."""

    spec: str
    title: str
    help: str
    needs_trajectory: bool = False
    uses_draws: bool = True  # estimated with the query's Monte Carlo (t, noise) draws (trajectory: exact, none)


CATALOGUE: tuple[MeasurementInfo, ...] = (
    MeasurementInfo(
        "loss", "Training loss",
        "The diffusion training loss of the query, averaged over timesteps and noise (paper eq. 2).",
    ),
    MeasurementInfo(
        "elbo", "Negative ELBO (bits per dimension)",
        "Negative evidence lower bound (Ho et al. eq. 5) in bits per dimension: a bound on -log p(x). Estimated "
        "from the M sampled timesteps: unbiased but heavy-tailed (most of the bound sits at the few small timesteps "
        "that M draws rarely hit), so one query's value and gradient vary much between draw sets; elbo-exact is the "
        "reliable one.",
    ),
    MeasurementInfo(
        "elbo-exact", "Negative ELBO, every timestep (bits per dimension)",
        "The same bound summed over all T timesteps instead of sampled ones: exact, T times dearer.",
    ),
    MeasurementInfo(
        "trajectory", "Trajectory negative log-probability",
        "Minus the log-probability of the exact sampling path x_T ... x_0 that produced the query "
        "(nats, summed over every step and value, the last step x_1 -> x_0 included); "
        "only generated samples have one.",
        needs_trajectory=True,
        uses_draws=False,
    ),
    MeasurementInfo(
        "loss@t", "Loss at one timestep t",
        "The loss at a single noise level t (1 = almost clean, T = pure noise; T is the model's number "
        "of diffusion steps: 1000 for the paper's DDPMs, 100 for the mnist preset).",
    ),
    MeasurementInfo(
        "square-norm", "Square norm (D-TRAK's measurement)",
        "Squared norm of the predicted noise, the surrogate D-TRAK uses (not a likelihood).",
    ),
)


def measurement_info(spec: str) -> MeasurementInfo | None:
    """The catalogue entry of a measurement name (``loss@t=500`` -> the ``loss@t`` entry)."""
    key = "loss@t" if spec.startswith("loss@t") else spec
    return next((m for m in CATALOGUE if m.spec == key), None)


def uses_draws(measurement: str) -> bool:
    """Whether a measurement is estimated with the query's Monte Carlo (t, noise) draws.

    Only ``trajectory`` uses none: it evaluates the recorded sampling path x_T ... x_0 exactly (``measure`` never
    reads the draws for it).  ``loss@t`` uses the draws' noise at its one t, ``elbo-exact`` every t with the draws'
    noise reused in turn, ``loss``, ``elbo`` and ``square-norm`` both halves (QA 40 #9: the app's page and its
    exports said "64 Monte Carlo draws" for trajectory)."""
    info = measurement_info(str(measurement))
    return True if info is None else info.uses_draws


def draws_phrase(measurement: str, m: int) -> str:
    """What a query's M means for ``measurement``, in the words the app's lines and the exports use."""
    measurement = str(measurement)
    if not uses_draws(measurement):
        return "no Monte Carlo draws (the recorded sampling path is evaluated exactly)"
    if measurement.startswith("loss@t"):
        return f"{m} Monte Carlo noise draws at that timestep"
    if measurement == "elbo-exact":
        return f"every timestep, {m} Monte Carlo noise draws reused across them"
    return f"{m} Monte Carlo draws"


@dataclass(frozen=True)
class Measurement:
    """Which measurement; ``t_idx`` (0-based) for loss@t; ``exact`` sums all t for the ELBO."""

    kind: str
    t_idx: int | None = None
    exact: bool = False

    def __str__(self) -> str:
        """The text form ``parse_measurement`` reads back: str(parse_measurement(s)) == s."""
        if self.kind == "loss@t":
            return f"loss@t={self.t_idx + 1}"
        return self.kind + ("-exact" if self.exact else "")


def parse_measurement(text: str, num_timesteps: int) -> Measurement:
    """Parse ``loss``, ``loss@t=500`` (paper's 1-based t), ``elbo``, ``elbo-exact``, ``trajectory``, ``square-norm``.

    ``num_timesteps``, the model's T, has no default: a default of 1,000 accepted ``loss@t=1000`` for the mnist
    preset's T = 100 in any caller that forgot it (QA 57 #3)."""
    s = text.strip().lower()
    if s.startswith("loss@t="):
        try:
            t = int(s.split("=", 1)[1])
        except ValueError as e:
            raise ValueError(f"bad timestep in {text!r}: expected loss@t=<1..{num_timesteps}>") from e
        if not 1 <= t <= num_timesteps:
            raise ValueError(f"timestep {t} out of range 1..{num_timesteps}")
        return Measurement("loss@t", t_idx=index_t(t))
    if s in ("elbo-exact", "elbo_exact"):
        return Measurement("elbo", exact=True)
    if s in ("loss", "elbo", "trajectory", "square-norm"):
        return Measurement(s)
    if s in ("square_norm", "squarenorm"):
        return Measurement("square-norm")
    raise ValueError(
        f"unknown measurement {text!r}: expected loss, loss@t=NNN, elbo, elbo-exact, trajectory or square-norm"
    )


def _as_batch(x0: torch.Tensor) -> torch.Tensor:
    return x0[None] if x0.dim() == 3 else x0


def draw_pairs(x0: torch.Tensor, draws: MCDraws) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (example, draw) pair: x0 repeated M times per example, t and eps tiled."""
    b, m = x0.shape[0], len(draws)
    x = x0.repeat_interleave(m, dim=0)
    t = draws.t.to(x0.device).repeat(b)
    eps = draws.eps.to(x0.device, x0.dtype).repeat(b, 1, 1, 1)
    return x, t, eps


def diffusion_loss(model: nn.Module, diffusion: Diffusion, x0: torch.Tensor, draws: MCDraws) -> torch.Tensor:
    """l(theta, x) = E_{t, eps} (1/D)||eps - eps_theta(x_t, t)||^2, mean over draws and examples.

    With draws whose t are all equal this is ``loss@t``.
    """
    x, t, eps = draw_pairs(_as_batch(x0), draws)
    return diffusion.per_sample_loss(model, x, t, eps).mean()


def square_norm(model: nn.Module, diffusion: Diffusion, x0: torch.Tensor, draws: MCDraws) -> torch.Tensor:
    """D-TRAK's output function: E_{t, eps} (1/D)||eps_theta(x_t, t)||^2."""
    x, t, eps = draw_pairs(_as_batch(x0), draws)
    return model(diffusion.q_sample(x, t, eps), t).pow(2).flatten(1).mean(1).mean()


# --- ELBO (Ho et al. 2020, eq. 5) ------------------------------------------------------


def _log_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return torch.special.log_ndtr(x)


def _log_diff_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(exp(a) - exp(b)) for a >= b, without cancellation: a + log(-expm1(b - a))."""
    return a + torch.log(-torch.expm1((b - a).clamp(max=-1e-30)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, levels: int
) -> torch.Tensor:
    """log p(x) for x on a grid of ``levels`` values in [-1, 1], per value (Ho et al. 2020, eq. 13).

    p(x) = Phi((x + delta - mu)/s) - Phi((x - delta - mu)/s) with half-bin delta = 1/(levels-1)
    (bin width 2/(levels-1): 2/255 for 8-bit images, 2/16 for the 17-level digits); the
    outermost bins extend to -inf (x = -1) and +inf (x = 1).  The difference of CDFs is
    taken on the side of the mean where it does not cancel (CDFs left of the mean,
    survival functions right of it), in float64, so it stays finite far in the tails.
    """
    half = 1.0 / (levels - 1)
    xd, md = x.double(), mean.double()
    inv_s = torch.exp(-log_scale.double())
    upper = (xd - md + half) * inv_s
    lower = (xd - md - half) * inv_s
    log_cdf_upper = _log_std_normal_cdf(upper)  # log Phi(upper)
    log_sf_lower = _log_std_normal_cdf(-lower)  # log (1 - Phi(lower))
    left = _log_diff_exp(log_cdf_upper, _log_std_normal_cdf(lower))
    right = _log_diff_exp(log_sf_lower, _log_std_normal_cdf(-upper))
    mid = torch.where(upper + lower <= 0, left, right)
    lo_edge = xd < -1.0 + half
    hi_edge = xd > 1.0 - half
    out = torch.where(lo_edge, log_cdf_upper, torch.where(hi_edge, log_sf_lower, mid))
    return out.to(x.dtype)


def quantize(x0: torch.Tensor, levels: int) -> torch.Tensor:
    """Snap values in [-1, 1] to the data grid (generated samples are continuous)."""
    k = levels - 1
    return torch.round((x0.clamp(-1, 1) + 1) / 2 * k) / k * 2 - 1


def decoder_log_variance(diffusion: Diffusion) -> torch.Tensor:
    """log sigma_t^2 with sigma_t^2 = beta_tilde_t, and beta_tilde_2 at t=1 where beta_tilde_1 = 0
    (Ho et al.'s clipped posterior log-variance)."""
    v = diffusion.posterior_var.clone()
    v[0] = v[1]
    return v.log()


def elbo_terms(
    model: nn.Module, diffusion: Diffusion, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, levels: int
) -> torch.Tensor:
    """Per-row term of the negative ELBO, in nats summed over dimensions.

    t_idx >= 1 (paper t >= 2): KL(q(x_{t-1}|x_t,x_0) || p_theta(x_{t-1}|x_t)) with x_t ~ q(x_t|x_0);
    t_idx == 0: -log p_theta(x_0 | x_1) with the discretised Gaussian decoder.
    """
    x_t = diffusion.q_sample(x0, t, eps)
    mean_p = diffusion.p_mean(model, x_t, t)
    logvar = decoder_log_variance(diffusion)
    logvar_p = Diffusion._gather(logvar, t, x0)
    mean_q = diffusion.q_posterior_mean(x0, x_t, t)
    logvar_q = Diffusion._gather(logvar, t, x0)  # q's variance is beta_tilde_t (clipped at t=1, unused)
    kl = 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mean_q - mean_p) ** 2) / logvar_p.exp() - 1.0)
    kl = kl.flatten(1).sum(1)
    nll = -discretized_gaussian_log_likelihood(x0, mean_p, 0.5 * logvar_p, levels).flatten(1).sum(1)
    return torch.where(t == 0, nll, kl)


def prior_kl(diffusion: Diffusion, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per example, nats summed over dimensions."""
    ab = diffusion.alpha_bars[-1].to(x0.dtype)
    kl = 0.5 * (ab * x0**2 + (1 - ab) - 1 - torch.log1p(-ab))
    return kl.flatten(1).sum(1)


def elbo_bpd(
    model: nn.Module,
    diffusion: Diffusion,
    x0: torch.Tensor,
    draws: MCDraws,
    levels: int,
    exact: bool = False,
    chunk: int = 1000,
) -> torch.Tensor:
    """Negative ELBO in bits per dimension (mean over examples).

    -ELBO = L_T + sum_{t=1}^{T} L_{t-1};  Monte Carlo: L_T + T * mean_m L_{t_m - 1},
    t_m ~ U{1..T} from ``draws`` (unbiased); ``exact`` sums every t with each draw's eps
    reused cyclically.  Bits/dim = nats / (D ln 2).  ``x0`` is snapped to the data grid.
    """
    x0 = quantize(_as_batch(x0), levels)
    b = x0.shape[0]
    d = x0[0].numel()
    if exact:
        T = diffusion.T
        t_all = torch.arange(T, device=x0.device)
        eps_all = draws.eps.to(x0.device, x0.dtype)[torch.arange(T) % len(draws)]
        sums = []
        for i in range(b):
            acc = x0.new_zeros(())
            for s in range(0, T, chunk):
                tt = t_all[s : s + chunk]
                xi = x0[i : i + 1].expand(len(tt), *x0.shape[1:])
                acc = acc + elbo_terms(model, diffusion, xi, tt, eps_all[s : s + chunk], levels).sum()
            sums.append(acc)
        total = prior_kl(diffusion, x0) + torch.stack(sums)
    else:
        x, t, eps = draw_pairs(x0, draws)
        terms = elbo_terms(model, diffusion, x, t, eps, levels).reshape(b, len(draws))
        total = prior_kl(diffusion, x0) + diffusion.T * terms.mean(1)
    return (total / (d * math.log(2.0))).mean()


# --- sampling trajectory ---------------------------------------------------------------


def trajectory_nll(
    model: nn.Module, diffusion: Diffusion, trajectory: torch.Tensor, chunk: int = 500
) -> torch.Tensor:
    """-log p_theta(x_{0:T}) of one recorded trajectory (T+1, C, H, W), x_T first, in nats (summed
    over the D values, not divided by D; docs/architecture.md §3).

        -log p_theta(x_{0:T}) = -[ log N(x_T; 0, I)
                                   + sum_{t=2}^{T} log N(x_{t-1}; mu_theta(x_t, t), beta_tilde_t I)
                                   + log N(x_0; mu_theta(x_1, 1), sigma_1^2 I) ]

    (Ho et al. 2020, eq. 1-2 and 11, with the "small" variances of the sampler).  The last step
    x_1 -> x_0 depends on theta too: the sampler outputs its mean (beta_tilde_1 = 0), and its
    density is the decoder's Gaussian with Ho et al.'s clipped variance sigma_1^2 = beta_tilde_2
    (``decoder_log_variance``, the same as the ELBO's decoder), continuous since x_0 is not
    quantised.  At the model that drew the trajectory that term's gradient is 0 (x_0 is its
    mean); for any other model (a retrained one, the LDS ground truth) it is not.  All steps
    are independent given the recording, so they are evaluated in batches of ``chunk``.
    """
    T = diffusion.T
    if trajectory.shape[0] != T + 1:
        raise ValueError(f"trajectory has {trajectory.shape[0]} states, expected T+1 = {T + 1}")
    d = trajectory[0].numel()
    x_T = trajectory[0]
    log_prior = -0.5 * (x_T**2).sum() - 0.5 * d * math.log(2 * math.pi)
    logvar = decoder_log_variance(diffusion)  # beta_tilde_t, and beta_tilde_2 at t_idx 0
    # step k (k = 0..T-1) goes from traj[k] = x_t (t_idx = T-1-k) to traj[k+1]; k = T-1 is x_1 -> x_0
    total = log_prior
    for s in range(0, T, chunk):
        k = torch.arange(s, min(T, s + chunk), device=trajectory.device)
        t = (T - 1 - k).long()
        x_t, x_prev = trajectory[k], trajectory[k + 1]
        mean = diffusion.p_mean(model, x_t, t)
        lv = Diffusion._gather(logvar, t, x_t)
        logp = -0.5 * ((x_prev - mean) ** 2 / lv.exp() + lv + math.log(2 * math.pi))
        total = total + logp.sum()
    return -total


def measure(
    spec: Measurement | str,
    model: nn.Module,
    diffusion: Diffusion,
    x0: torch.Tensor | None,
    draws: MCDraws,
    levels: int = 256,
    trajectory: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatch on the measurement; ``loss@t`` pins every draw's t to ``spec.t_idx``."""
    if isinstance(spec, str):
        spec = parse_measurement(spec, diffusion.T)
    if spec.kind == "trajectory":
        if trajectory is None:
            raise ValueError("the trajectory measurement needs a recorded sampling trajectory")
        return trajectory_nll(model, diffusion, trajectory.to(next(model.parameters()).device))
    if x0 is None:
        raise ValueError(f"measurement {spec} needs an image")
    if spec.kind == "loss":
        return diffusion_loss(model, diffusion, x0, draws)
    if spec.kind == "loss@t":
        pinned = MCDraws(torch.full_like(draws.t, int(spec.t_idx)), draws.eps)
        return diffusion_loss(model, diffusion, x0, pinned)
    if spec.kind == "square-norm":
        return square_norm(model, diffusion, x0, draws)
    if spec.kind == "elbo":
        return elbo_bpd(model, diffusion, x0, draws, levels, exact=spec.exact)
    raise ValueError(f"unknown measurement {spec.kind!r}")
