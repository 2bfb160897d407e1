"""Noise schedule, forward process, training loss and the DDPM ancestral sampler.

Timestep convention (the one place it is fixed): code indexes timesteps 0-based,
``t_idx in {0, ..., T-1}``; the paper's (Ho et al. 2020) timestep is ``t = t_idx + 1``.
So ``alpha_bar[t_idx]`` is the paper's bar-alpha_t, and ``t_idx == 0`` is the decoder step
p(x_0 | x_1).  Conversion happens only at the CLI/UI boundary (``paper_t``/``index_t``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import DiffusionConfig
from ..validation import check_seed

if TYPE_CHECKING:
    import numpy as np

# sample i of a call with seed s draws from its own generator, seeded s * SAMPLE_SEED_STRIDE + i
SAMPLE_SEED_STRIDE = 1_000_003


def check_sample_seed(seed: int, n: int, what: str = "sampling seed") -> int:
    """``seed`` if ``Diffusion.sample(n=n, seed=seed)`` can seed all n generators (torch's 64 bits);
    InvalidSettingError naming ``what`` otherwise.  Callers that show a progress bar call it first."""
    return check_seed(seed, what, SAMPLE_SEED_STRIDE, n)


def paper_t(t_idx: int) -> int:
    """0-based code index -> the paper's 1-based timestep."""
    return t_idx + 1


def index_t(t: int) -> int:
    """The paper's 1-based timestep -> 0-based code index."""
    return t - 1


@dataclass
class MCDraws:
    """Monte Carlo draws of (t, eps) and, for presets trained with flips, a horizontal-flip bit.

    Shared (the default): t (M,), eps (M, C, H, W), flip (M,) or None -- the same M draws for
    every example (and, for queries, every method: common random numbers).  Batched: t (b, M),
    eps (b, M, C, H, W), flip (b, M) or None -- example j of a batch has its own draws (``draws=
    "per-example"``, engine.attribution.train_draws).  ``flip`` augments the training example x_0 only
    (paper G.8: l(theta, x) is also an expectation over the data augmentation).
    """

    t: torch.Tensor
    eps: torch.Tensor
    flip: torch.Tensor | None = None
    # t drawn one per stratum of {0..T-1} (``make_draws(stratify_t=True)``); recorded for cache keys only,
    # so views made by ``head``/``to``/``for_rows`` drop it
    stratified: bool = False

    def __len__(self) -> int:
        """M, the number of draws per example."""
        return int(self.t.shape[-1])

    @property
    def batched(self) -> bool:
        """True when each example has draws of its own (t of shape (B, M)), False for one shared set (M,)."""
        return self.t.dim() == 2

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> MCDraws:
        flip = None if self.flip is None else self.flip.to(device)
        return MCDraws(self.t.to(device), self.eps.to(device, dtype or self.eps.dtype), flip)

    def for_rows(self, rows: slice) -> MCDraws:
        """The draws of examples ``rows`` (relative to this object): shared draws are everyone's."""
        if not self.batched:
            return self
        flip = None if self.flip is None else self.flip[rows]
        return MCDraws(self.t[rows], self.eps[rows], flip)

    def for_indices(self, indices: torch.Tensor | np.ndarray | Sequence[int]) -> MCDraws:
        """The draws of examples ``indices`` (any index array): shared draws are everyone's."""
        if not self.batched:
            return self
        idx = torch.as_tensor(indices, dtype=torch.long)
        return MCDraws(self.t[idx], self.eps[idx], None if self.flip is None else self.flip[idx])

    def example(self, j: int) -> MCDraws:
        """Example j's M draws, shared form (t (M,))."""
        if not self.batched:
            return self
        return MCDraws(self.t[j], self.eps[j], None if self.flip is None else self.flip[j])

    def head(self, k: int) -> MCDraws:
        """The first k draws of every example."""
        if self.batched:
            flip = None if self.flip is None else self.flip[:, :k]
            return MCDraws(self.t[:, :k], self.eps[:, :k], flip)
        return MCDraws(self.t[:k], self.eps[:k], None if self.flip is None else self.flip[:k])

    def rows(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every (example, draw) row, example-major: row j*M + m is (flip_jm(x_j), t_jm, eps_jm).

        ``x0`` is (b, C, H, W); batched draws must have b rows.
        """
        b, m = x0.shape[0], len(self)
        x = x0.repeat_interleave(m, dim=0)
        if self.batched:
            if self.t.shape[0] != b:
                raise ValueError(f"per-example draws for {self.t.shape[0]} examples, got {b} images")
            t = self.t.reshape(-1).to(x0.device)
            eps = self.eps.reshape(b * m, *self.eps.shape[2:]).to(x0.device, x0.dtype)
            flip = None if self.flip is None else self.flip.reshape(-1)
        else:
            t = self.t.to(x0.device).repeat(b)
            eps = self.eps.to(x0.device, x0.dtype).repeat(b, 1, 1, 1)
            flip = None if self.flip is None else self.flip.repeat(b)
        if flip is not None:
            x = apply_flip(x, flip.to(x0.device))
        return x, t, eps


def apply_flip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Rows of x (n, C, H, W) with flip[r] True mirrored left-right (the training augmentation)."""
    return torch.where(flip.reshape(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)


def make_draws(
    m: int,
    shape: tuple[int, int, int],
    num_timesteps: int,
    seed: int,
    t_fixed: int | None = None,
    flip: bool = False,
    stratify_t: bool = False,
) -> MCDraws:
    """Seeded draws t ~ U{0..T-1}, eps ~ N(0, I); ``t_fixed`` pins every t (loss@t); ``flip`` adds
    a Bernoulli(1/2) flip bit per draw, drawn after t and eps so that those do not change.

    ``stratify_t``: stratified timesteps, t_m = floor(T (s_m + u_m) / M) with u_m ~ U[0, 1) and
    (s_1..s_M) a random permutation of 0..M-1, so the M draws cover {0..T-1} evenly.  Each t_m still has
    marginal U{0..T-1} ((s_m + u_m) / M is U[0, 1) since s_m is uniform on 0..M-1), so every average over
    the draws stays an unbiased estimate of E_t, while the timestep part of its variance shrinks.  The permutation keeps
    the first k draws (``head``) a spread-out subset.  u and s come from a second generator, so eps
    (and the flip bits) equal the unstratified draws' of the same seed: the two differ in t alone."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, num_timesteps, (m,), generator=g)
    if stratify_t:
        g2 = torch.Generator().manual_seed(int(seed) ^ 0x57A7)
        u = torch.rand((m,), generator=g2, dtype=torch.float64)
        s = torch.randperm(m, generator=g2).to(torch.float64)
        t = torch.clamp(torch.floor(num_timesteps * (s + u) / m), 0, num_timesteps - 1).long()
    if t_fixed is not None:
        t = torch.full((m,), int(t_fixed), dtype=torch.long)
    eps = torch.randn((m, *shape), generator=g)
    bits = torch.randint(0, 2, (m,), generator=g).bool() if flip else None
    return MCDraws(t, eps, bits, stratified=bool(stratify_t and t_fixed is None))


class Diffusion:
    """Schedule constants in float64, cast on use."""

    def __init__(self, cfg: DiffusionConfig | None = None):
        self.cfg = cfg or DiffusionConfig()
        T = self.cfg.num_timesteps
        self.T = T
        betas = torch.linspace(self.cfg.beta_start, self.cfg.beta_end, T, dtype=torch.float64)
        alphas = 1.0 - betas
        alpha_bars = torch.cumprod(alphas, 0)
        alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])
        self.betas = betas
        self.alphas = alphas
        self.alpha_bars = alpha_bars
        self.alpha_bars_prev = alpha_bars_prev
        # beta_tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t) ("small" variance, Ho eq. 7)
        self.posterior_var = betas * (1.0 - alpha_bars_prev) / (1.0 - alpha_bars)
        self.posterior_coef_x0 = betas * alpha_bars_prev.sqrt() / (1.0 - alpha_bars)
        self.posterior_coef_xt = (1.0 - alpha_bars_prev) * alphas.sqrt() / (1.0 - alpha_bars)

    @staticmethod
    def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = values.to(like.device)[t].to(like.dtype)
        return out.reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho eq. 4)."""
        ab = self._gather(self.alpha_bars, t, x0)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps

    def per_sample_loss(
        self, model: nn.Module, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        """l(theta; x_0, t, eps) = (1/D) ||eps - eps_theta(x_t, t)||^2, one value per row."""
        pred = model(self.q_sample(x0, t, eps), t)
        return (eps - pred).pow(2).flatten(1).mean(1)

    def q_posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x_0) (Ho eq. 7)."""
        return self._gather(self.posterior_coef_x0, t, x_t) * x0 + self._gather(
            self.posterior_coef_xt, t, x_t
        ) * x_t

    def p_mean(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """mu_theta(x_t, t) = (x_t - beta_t / sqrt(1 - abar_t) eps_theta) / sqrt(alpha_t) (Ho eq. 11).

        No clipping of the predicted x_0 (docs/architecture.md §3).
        """
        eps_pred = model(x_t, t)
        b = self._gather(self.betas, t, x_t)
        a = self._gather(self.alphas, t, x_t)
        ab = self._gather(self.alpha_bars, t, x_t)
        return (x_t - b / (1.0 - ab).sqrt() * eps_pred) / a.sqrt()

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module,
        n: int,
        shape: tuple[int, int, int],
        seed: int,
        trajectory: bool = False,
        device: torch.device | str = "cpu",
        batch_size: int = 256,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Ancestral DDPM sampling over all T steps with sigma_t^2 = beta_tilde_t.

        Sample ``i``'s noise depends only on ``seed`` and ``i`` (its own generator), so a sample is the same
        whatever the batch size, up to float rounding: batched kernels round differently (QA round 21: sample
        0 of batches of 1, 2, 8 and 16 differed by up to 5.4e-7 in the image), so bit-identical reruns
        need the same batches too.  Returns images (n, C, H, W), about [-1, 1]
        but not clamped (the model's own output: callers clamp where they need the data range) and, if asked, the trajectory (n, T+1, C, H, W) ordered
        x_T, x_{T-1}, ..., x_0.  ``progress(step, T)`` is called after each step.
        """
        check_sample_seed(seed, n)
        model.eval()
        dtype = next(model.parameters()).dtype  # a float64 model samples in float64
        images, trajs = [], []
        for start in range(0, n, batch_size):
            idx = range(start, min(n, start + batch_size))
            gens = [torch.Generator().manual_seed(seed * SAMPLE_SEED_STRIDE + i) for i in idx]
            x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device, dtype)
            traj = [x.cpu()] if trajectory else None
            for step, t_idx in enumerate(reversed(range(self.T))):
                t = torch.full((x.shape[0],), t_idx, dtype=torch.long, device=device)
                mean = self.p_mean(model, x, t)
                if t_idx > 0:
                    noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device, dtype)
                    x = mean + self._gather(self.posterior_var, t, x).sqrt() * noise
                else:
                    x = mean
                if traj is not None:
                    traj.append(x.cpu())
                if progress is not None:
                    progress(step + 1, self.T)
            images.append(x.cpu())
            if traj is not None:
                trajs.append(torch.stack(traj, dim=1))
        return torch.cat(images), (torch.cat(trajs) if trajectory else None)
