"""DDPM U-Net in the shape of Ho et al. (2020).

Residual blocks with a time embedding, GroupNorm, strided-conv down-sampling,
nearest-neighbour up-sampling and self-attention at chosen resolutions.

K-FAC (docs/architecture.md §4) treats every ``nn.Conv2d`` and ``nn.Linear`` as one block and hooks
each module's input and output-gradient.  That only works if each module is *called
once per forward*: attention therefore uses three separate ``nn.Linear`` projections
(q, k, v) and one output projection, never a shared module used twice.

Timestep convention: ``forward(x, t)`` takes the 0-based index ``t`` in ``0..T-1``;
the paper's timestep is ``t + 1`` (see ``engine.model.diffusion``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (0-based) timesteps, as in Ho et al. (2020) / Transformer."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1)
    )
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over spatial positions with nn.Linear projections."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(min(groups, ch), ch)
        self.q = nn.Linear(ch, ch)
        self.k = nn.Linear(ch, ch)
        self.v = nn.Linear(ch, ch)
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x).reshape(b, c, h * w).transpose(1, 2)  # (b, hw, c)
        q, k, v = self.q(hn), self.k(hn), self.v(hn)
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1)
        out = self.proj_out(attn @ v)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x_t, t): predicts the noise added to x_0 (Ho et al. 2020, eq. 11; trained by their eq. 14, L_simple)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.base_channels
        temb_dim = 4 * ch
        g = cfg.num_groups
        self.temb_dense0 = nn.Linear(ch, temb_dim)
        self.temb_dense1 = nn.Linear(temb_dim, temb_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skip_chs = [ch]
        cur, res = ch, cfg.image_size
        for level, mult in enumerate(cfg.channel_mults):
            cout = ch * mult
            for _ in range(cfg.num_res_blocks):
                blocks = nn.ModuleList([ResBlock(cur, cout, temb_dim, cfg.dropout, g)])
                cur = cout
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(cur, g))
                self.down.append(blocks)
                skip_chs.append(cur)
            if level != len(cfg.channel_mults) - 1:
                self.down.append(nn.ModuleList([Downsample(cur)]))
                skip_chs.append(cur)
                res //= 2

        self.mid = nn.ModuleList(
            [
                ResBlock(cur, cur, temb_dim, cfg.dropout, g),
                AttnBlock(cur, g),
                ResBlock(cur, cur, temb_dim, cfg.dropout, g),
            ]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            cout = ch * mult
            for _ in range(cfg.num_res_blocks + 1):
                blocks = nn.ModuleList(
                    [ResBlock(cur + skip_chs.pop(), cout, temb_dim, cfg.dropout, g)]
                )
                cur = cout
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(cur, g))
                self.up.append(blocks)
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(cur)]))
                res *= 2

        self.norm_out = nn.GroupNorm(min(g, cur), cur)
        self.conv_out = nn.Conv2d(cur, cfg.in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        temb = timestep_embedding(t, self.cfg.base_channels).to(x.dtype)
        temb = self.temb_dense1(F.silu(self.temb_dense0(temb)))

        h = self.conv_in(x)
        hs = [h]
        for blocks in self.down:
            h = self._run(blocks, h, temb)
            hs.append(h)
        h = self._run(self.mid, h, temb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(blocks, h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))

    @staticmethod
    def _run(blocks: nn.ModuleList, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            h = block(h, temb) if isinstance(block, ResBlock) else block(h)
        return h


def build_model(cfg: ModelConfig) -> UNet:
    """The U-Net a preset's ``ModelConfig`` describes, freshly initialised."""
    return UNet(cfg)


def count_parameters(model: nn.Module) -> int:
    """All parameters of ``model`` (the figure the README gives per preset)."""
    return sum(p.numel() for p in model.parameters())
