"""Seeded random projections for TRAK (docs/architecture.md §5; Park et al. 2023, section 3).

P is a (num_params x dim) matrix with i.i.d. entries, Rademacher (+-1) or standard
Gaussian, scaled by 1/sqrt(dim) so that E[P P^T] = I: inner products of projected
gradients are unbiased estimates of the inner products of the gradients,
E[(P^T g)^T (P^T h)] = g^T h.

P is never stored.  Its rows are generated in fixed tiles of ``TILE_ROWS`` rows, tile
``j`` from its own generator seeded by (seed, j), so

* the matrix depends only on (num_params, dim, seed, kind, device type), never on the
  batch or block sizes the caller uses (blocks are cut from the same tiles);
* projecting a (b, num_params) batch is a loop over tiles, with memory
  ``TILE_ROWS x dim`` rather than ``num_params x dim``.

When the whole dense matrix fits in ``max_dense_bytes`` it is generated once (from the same
tiles, so the values are identical) and kept, so repeated projections are one matmul.

Random numbers come from NumPy's PCG64 on the CPU, so P is the same on every device.
Rademacher signs (the dense kind's default; TRAK's default kind is ``srht``, below) are drawn as packed random bytes (one bit per entry, 1/32
of the float32 volume) and unpacked on the projection's device; that is what makes
generating P on the fly cheap.  Gaussian entries are drawn as float32 (slower, mainly for
ablations).

``srht`` (the default for TRAK on the CPU) is a subsampled randomised Hadamard transform:
P^T g = (1/sqrt(k)) S H D g~, with g~ the gradient zero-padded to n = 2^ceil(log2 P),
D a seeded diagonal of Rademacher signs, H the n x n Sylvester-Hadamard matrix (entries
+-1) and S a seeded choice of k distinct rows.  Since H^T H = n I and E[S^T S] = (k/n) I,
E[P P^T] = I exactly as for a dense Rademacher P, and the same Johnson-Lindenstrauss
guarantees hold (Ailon & Chazelle 2009; Tropp 2011).  It is applied in O(n log n) per
gradient with no matrix at all, so a query projects in milliseconds instead of the
seconds a regenerated dense (P x k) matrix costs on two CPU cores.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from ..validation import TRAK_PROJECTIONS
from . import hadamard_kernel

KINDS = TRAK_PROJECTIONS
TILE_ROWS = 4096


# bytes of zero-padded float32 rows the ``srht`` projection holds at a time (at least one row, at most 64): 64
# rows of digits' 2^19 (128 MiB) as before; one row of CIFAR's 2^26 (256 MiB) rather than 32 (8 GiB, QA 54 F1)
SRHT_CHUNK_BYTES = 256 << 20


def srht_chunk_rows(padded: int) -> int:
    """Rows the ``srht`` projection pads and transforms at a time: at most 64 and ``SRHT_CHUNK_BYTES``, at least 1."""
    return max(1, min(64, SRHT_CHUNK_BYTES // (4 * int(padded))))


def _tile_seed(seed: int, tile: int) -> int:
    """Well-mixed 63-bit seed for tile ``tile`` of projection ``seed`` (SeedSequence hashing)."""
    state = np.random.SeedSequence([int(seed), int(tile), 0x7A4B]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (n,) -> (8n,) 0/1 uint8, most significant bit first (NumPy's ``unpackbits`` order)."""
    if packed.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.numpy()))
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    return ((packed[:, None] >> shifts) & 1).reshape(-1)


@functools.lru_cache(maxsize=32)
def _hadamard(m: int, device: torch.device) -> torch.Tensor:
    """Sylvester-Hadamard matrix H_m (m a power of 2): entries (-1)^popcount(i & j); cached."""
    idx = torch.arange(m, device=device)
    return _popcount_sign(idx[:, None] & idx[None, :])


def _popcount_sign(v: torch.Tensor) -> torch.Tensor:
    """(-1)^popcount(v) as float32, elementwise for non-negative int64 v."""
    parity = torch.zeros_like(v)
    while bool((v > 0).any()):
        parity ^= v & 1
        v = v >> 1
    return 1.0 - 2.0 * parity.to(torch.float32)


def fwht(x: torch.Tensor, max_bits: int | None = None) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform along the last axis: x @ H_n (H symmetric).

    H_n = H_{m_1} (x) ... (x) H_{m_r} (Sylvester), so the vector is viewed as an r-way
    tensor and a small Hadamard matrix (m_i <= 2^max_bits) is applied along each axis:
    r passes over memory instead of log2(n).
    """
    b, n = x.shape
    if max_bits is None:
        # 2^19 entries (digits), 2 idle cores, medians side by side: one vector 4.5-6 ms with
        # 2^7-wide passes vs 11-17 ms with 2^10 (each pass costs n * m multiply-adds); 64 vectors
        # 0.82 s vs 1.01 s with 2^8 (narrower passes add more memory traffic than they save)
        max_bits = 7
    bits = n.bit_length() - 1
    if 1 << bits != n:
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    post = n
    done = 0
    while done < bits:
        k = min(max_bits, bits - done)
        m = 1 << k
        post //= m
        pre = n // (m * post)
        h = _hadamard(m, x.device).to(x.dtype)
        x = torch.einsum("bpmq,mr->bprq", x.reshape(b, pre, m, post), h).reshape(b, n)
        done += k
    return x


class RandomProjection:
    """P (num_params x dim), E[P P^T] = I, generated tile by tile from a seed."""

    def __init__(
        self,
        num_params: int,
        dim: int,
        seed: int = 0,
        kind: str = "rademacher",
        device: torch.device | str = "cpu",
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
        self.scale = 1.0 / float(np.sqrt(self.dim))
        self._dense: torch.Tensor | None = None
        if kind == "srht":
            self._init_srht()
        elif kind != "identity" and self.num_params * self.dim * 4 <= max_dense_bytes:
            self._dense = self.block(0, self.num_params)

    def _init_srht(self) -> None:
        self.padded = 1 << max(0, (self.num_params - 1).bit_length())
        if self.dim > self.padded:
            raise ValueError(f"srht keeps at most {self.padded} dimensions, asked for {self.dim}")
        rng = np.random.Generator(np.random.PCG64(_tile_seed(self.seed, 0x5348_5254)))
        signs = rng.integers(0, 2, self.num_params, dtype=np.int8) * 2 - 1
        rows = np.sort(rng.choice(self.padded, self.dim, replace=False))
        self.signs = torch.from_numpy(signs.astype(np.float32)).to(self.device)
        self.rows = torch.from_numpy(rows.astype(np.int64)).to(self.device)

    def settings(self) -> dict[str, Any]:
        """What determines P (for cache keys)."""
        return {
            "kind": self.kind,
            "dim": self.dim,
            "seed": self.seed,
            "num_params": self.num_params,
            "tile_rows": TILE_ROWS,
        }

    def _tile(self, j: int) -> torch.Tensor:
        rows = min(TILE_ROWS, self.num_params - j * TILE_ROWS)
        rng = np.random.Generator(np.random.PCG64(_tile_seed(self.seed, j)))
        n = rows * self.dim
        if self.kind == "rademacher":
            packed = np.frombuffer(rng.bytes(-(-n // 8)), dtype=np.uint8)
            bits = unpack_bits(torch.from_numpy(packed.copy()).to(self.device))[:n]
            t = bits.to(torch.float32).mul_(2.0 * self.scale).sub_(self.scale)
        else:
            t = torch.from_numpy(rng.standard_normal(n, dtype=np.float32)).to(self.device).mul_(self.scale)
        return t.view(rows, self.dim)

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of P, float32 on the projection's device."""
        start, stop = max(0, int(start)), min(self.num_params, int(stop))
        if self.kind == "identity":
            return torch.eye(self.num_params, device=self.device)[start:stop]
        if self.kind == "srht":
            p = torch.arange(start, stop, device=self.device)
            h = _popcount_sign(p[:, None] & self.rows[None, :])  # H[S_j, p], (rows, k)
            return h * (self.signs[start:stop, None] * self.scale)
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

    def project(self, grads: torch.Tensor, build: bool = False) -> torch.Tensor:
        """P^T g for g of shape (P,) or (b, P); float32, on the input's device.

        ``srht`` pads at most ``SRHT_CHUNK_BYTES`` of rows at a time (at least one row), writing the signed
        gradient straight into the padded rows: at CIFAR size a padded row is 2^26 floats (268 MB), and 32 of
        them plus a signed copy of the batch were most of TRAK's 20 GiB build (QA 54 F1).  ``build``: a build's
        batch, projected with the compiled kernel whenever it is available, whatever its row count, so that a
        feature does not depend on the batch it came in (``ComputeConfig.gradient_batch_bytes`` may make it 1 row);
        otherwise batches of fewer than 4 rows keep torch's passes (a query's vector: every intra-op thread)."""
        squeeze = grads.dim() == 1
        g = grads[None] if squeeze else grads
        if g.shape[1] != self.num_params:
            raise ValueError(f"gradient has {g.shape[1]} entries, projection expects {self.num_params}")
        out_device = g.device
        g = g.to(self.device, torch.float32)
        if self.kind == "identity":
            out = g.clone()
        elif self.kind == "srht":
            out = torch.empty((g.shape[0], self.dim), device=self.device, dtype=torch.float32)
            # the compiled butterflies for batches (the build: 3-4x faster per row); a query's single vector
            # keeps torch's matmul passes, which use every intra-op thread (numba's kernel runs on one)
            compiled = (self.device.type == "cpu" and (g.shape[0] >= 4 or build)
                        and hadamard_kernel.available())
            step = srht_chunk_rows(self.padded)  # bounded memory: at most 64 rows, at most SRHT_CHUNK_BYTES
            for s in range(0, g.shape[0], step):
                rows = min(step, g.shape[0] - s)
                padded = torch.zeros((rows, self.padded), device=self.device)
                torch.mul(g[s : s + rows], self.signs, out=padded[:, : self.num_params])  # no signed copy
                if compiled:  # in-place butterflies (engine.attribution.hadamard_kernel): 3-4x faster
                    hadamard_kernel.fwht_rows_inplace(padded.numpy())
                else:
                    padded = fwht(padded)
                out[s : s + rows] = padded[:, self.rows] * self.scale
                del padded
        elif self._dense is not None:
            out = g @ self._dense
        else:
            out = torch.zeros((g.shape[0], self.dim), device=self.device, dtype=torch.float32)
            for j in range(-(-self.num_params // TILE_ROWS)):  # one generated tile at a time
                s = j * TILE_ROWS
                tile = self._tile(j)
                out.addmm_(g[:, s : s + tile.shape[0]], tile)
        out = out.to(out_device)
        return out[0] if squeeze else out
