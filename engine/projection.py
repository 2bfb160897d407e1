"""Seeded random projections for TRAK (DESIGN.md 5; Park et al. 2023, section 3).

P is a (num_params x dim) matrix with i.i.d. entries, Rademacher (+-1) or standard
Gaussian, scaled by 1/sqrt(dim) so that E[P P^T] = I: inner products of projected
gradients are unbiased estimates of the inner products of the gradients,
E[(P^T g)^T (P^T h)] = g^T h.

P is never stored.  Its rows are generated in fixed tiles of ``TILE_ROWS`` rows, tile
``j`` from its own generator seeded by (seed, j), so

* the matrix depends only on (num_params, dim, seed, kind, device type), never on the
  batch or block sizes the caller uses (blocks are cut from the same tiles);
* projecting a (b, num_params) batch is a loop over row blocks, with memory
  ``block_rows x dim`` rather than ``num_params x dim``.

When the whole dense matrix fits in ``max_dense_bytes`` it is generated once (from the same
tiles, so the values are identical) and kept, so repeated projections are one matmul.

CPU and CUDA generators produce different streams, so the device type is part of the
projection's identity (``settings()``), and caches built on a GPU are keyed apart.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

KINDS = ("rademacher", "gaussian", "identity")
TILE_ROWS = 4096


def _tile_seed(seed: int, tile: int) -> int:
    """Well-mixed 63-bit seed for tile ``tile`` of projection ``seed`` (SeedSequence hashing)."""
    state = np.random.SeedSequence([int(seed), int(tile), 0x7A4B]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


class RandomProjection:
    """P (num_params x dim), E[P P^T] = I, generated tile by tile from a seed."""

    def __init__(
        self,
        num_params: int,
        dim: int,
        seed: int = 0,
        kind: str = "rademacher",
        device: torch.device | str = "cpu",
        block_rows: int = 65536,
        max_dense_bytes: int = 256 * 2**20,
    ):
        if kind not in KINDS:
            raise ValueError(f"unknown projection kind {kind!r}; choose one of {KINDS}")
        if kind == "identity" and dim != num_params:
            raise ValueError("the identity projection keeps every dimension: dim must equal num_params")
        if not 1 <= dim:
            raise ValueError("dim must be positive")
        self.num_params = int(num_params)
        self.dim = int(dim)
        self.seed = int(seed)
        self.kind = kind
        self.device = torch.device(device)
        self.block_rows = max(1, int(block_rows))
        self.scale = 1.0 / float(np.sqrt(self.dim))
        self._dense: torch.Tensor | None = None
        if kind != "identity" and self.num_params * self.dim * 4 <= max_dense_bytes:
            self._dense = self.block(0, self.num_params)

    def settings(self) -> dict[str, Any]:
        """What determines P (for cache keys)."""
        return {
            "kind": self.kind,
            "dim": self.dim,
            "seed": self.seed,
            "num_params": self.num_params,
            "tile_rows": TILE_ROWS,
            "device_type": self.device.type if self.kind != "identity" else "any",
        }

    def _tile(self, j: int) -> torch.Tensor:
        rows = min(TILE_ROWS, self.num_params - j * TILE_ROWS)
        g = torch.Generator(device=self.device).manual_seed(_tile_seed(self.seed, j))
        if self.kind == "rademacher":
            t = torch.empty((rows, self.dim), device=self.device, dtype=torch.float32)
            t.bernoulli_(0.5, generator=g).mul_(2.0).sub_(1.0)
        else:
            t = torch.randn((rows, self.dim), device=self.device, dtype=torch.float32, generator=g)
        return t.mul_(self.scale)

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of P, float32 on the projection's device."""
        start, stop = max(0, int(start)), min(self.num_params, int(stop))
        if self.kind == "identity":
            return torch.eye(self.num_params, device=self.device)[start:stop]
        if self._dense is not None:
            return self._dense[start:stop]
        pieces = []
        for j in range(start // TILE_ROWS, (stop - 1) // TILE_ROWS + 1):
            t0 = j * TILE_ROWS
            tile = self._tile(j)
            pieces.append(tile[max(start, t0) - t0 : min(stop, t0 + TILE_ROWS) - t0])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def dense(self) -> torch.Tensor:
        """The whole matrix (tests and small models only)."""
        return self.block(0, self.num_params)

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """P^T g for g of shape (P,) or (b, P); float32, on the input's device."""
        squeeze = grads.dim() == 1
        g = grads[None] if squeeze else grads
        if g.shape[1] != self.num_params:
            raise ValueError(f"gradient has {g.shape[1]} entries, projection expects {self.num_params}")
        out_device = g.device
        g = g.to(self.device, torch.float32)
        if self.kind == "identity":
            out = g.clone()
        elif self._dense is not None:
            out = g @ self._dense
        else:
            out = torch.zeros((g.shape[0], self.dim), device=self.device, dtype=torch.float32)
            # blocks aligned to tiles so each tile is generated once per call
            step = max(TILE_ROWS, (self.block_rows // TILE_ROWS) * TILE_ROWS)
            for s in range(0, self.num_params, step):
                e = min(self.num_params, s + step)
                out.addmm_(g[:, s:e], self.block(s, e))
        out = out.to(out_device)
        return out[0] if squeeze else out
