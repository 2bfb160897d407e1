"""Rotated, int8-quantised bank of training gradients (docs/architecture.md §4, "The int8 bank").

With A_l = Q_A diag(a) Q_A^T and B_l = Q_B diag(b) Q_B^T, for a weight gradient W (out x in)

    (B (x) A + lambda I)^{-1} vec(W)  <->  Q_B [ (Q_B^T W Q_A) / (b a^T + lambda) ] Q_A^T,

and for a bias gradient (block B alone) Q_B [ (Q_B^T g) / (b + lambda) ].  Since the Q are
orthogonal, the influence (paper eq. 6; docs/architecture.md §4)

    tau_i(q) = (1/N) grad m(q)^T (G + lambda I)^{-1} grad l(x_i)
             = (1/N) sum_blocks < (Q_B^T W_q Q_A) / (b a^T + lambda),  R_i >,   R_i = Q_B^T W_i Q_A.

So each training gradient is stored once, rotated (R_i), and a query needs one rotation,
one elementwise division for the damping chosen now, and one pass over the bank: changing
damping costs no gradient.  EK-FAC only replaces b a^T by its corrected eigenvalues.

Storage: one array per parameter block (weight or bias of a Conv2d/Linear), (N, size),
int8 with a symmetric scale per (example, block).  The grid is whitened by the factors'
eigenvalues e (``whitening``): the stored row is W_i = R_i / w with w = sqrt(e + f max_b e)
(f = ``AttributionConfig.kfac_bank_whiten``, relative to the block's largest eigenvalue), rounded as
W_i ~= scale * int8 with scale = max|W_i| / 127 over the block, and a query multiplies its damped
rotated vector by w once, so <R_i, q> = <W_i, w * q> is eq. 6 unchanged.  Why: the damped query
q / (e + lambda) weighs most the coordinates whose eigenvalue is small, and there the training rows
are small too (E R_ij^2 ~ e_j), so on the plain grid (scale = max|R_i| / 127, the bank before
2026-12-05, ``kfac_bank_whiten = None``) round-to-nearest zeroes exactly the coordinates the score
weighs most: every score came out shrunk, by a median 0.4% on mnist and 0.6% on digits at the
default damping and 1.2-1.8% at 1e-12, with a largest error (median over queries) of 0.3-3% of the
largest score.  On the whitened grid each coordinate's rounding error carries about the same weight in
the score: slope 1.0000, largest error 0.04% of the largest score, the same scan time
(``scripts/bank_rounding.py``; docs/architecture.md §4).
(Weights and biases of a layer get separate scales: a finer grain than one per layer, at
no cost.)  Blocks are contiguous.  On a CPU a single-damping pass uses the fused kernel of
``int8_scan`` (numba: each int8 read once, widened in registers); without numba it converts each
block to float in row chunks of about 4 MiB (``ComputeConfig.scan_chunk_bytes_cpu``: a chunk stays in cache while it is multiplied) and
applies the per-row scales to the chunk's products.  Measured on the digits bank (486 MiB, one
thread, other jobs paused), side by side: 90 ms per pass with the fused kernel, 199 ms with 4 MiB
chunks, 263 ms with 1 MiB chunks, 713 ms with ``torch.ops.aten._weight_int8pack_mm`` (torch's fused
int8-weight kernel) (``scripts/bank_scan_kernels.py``, ``assets/results/bank_scan_kernels.json``).  The build
(``engine.attribution.bank_build.build_bank``) runs in chunks of examples, each saved as soon as it is done
(``Store.partial``: resumable), published atomically at the end and memory-mapped on load; the bank kind
that stores no rows is ``engine.attribution.streamed_bank``.  ``quantize=False`` keeps the rotated
gradients unquantised, in the gradients' dtype (float32, or float64 in tests) or in ``store_dtype``
(say float16: half the bytes, each chunk converted before it is saved).  Whatever float type the rows are
kept in, every product accumulates in float32 at least (``product_dtype``): the damped query
q / (e + lambda) reaches 1e8 and more at lambda = 1e-8, far past float16's 65,504 (QA 30b).
The settings a bank is stored under are ``artefact_settings``'s: a bank kind's ``cache_key`` uses it
with the arguments its ``build_bank`` call takes, so the two cannot name different folders.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch

from ..config import COMPUTE, ComputeConfig
from . import int8_scan
from .curvature import Block
from .foreground import pause_point
from .scoring import to_scores

SCALES = "scales"


def pack_limit_bytes(max_bytes: int = COMPUTE.pack_max_bytes) -> int:
    """The largest bank ``RotatedBank`` packs in memory: ``max_bytes`` (``ComputeConfig.pack_max_bytes``), or a
    quarter of the memory available now if that is less (a bigger bank keeps its memory maps, which the OS
    may page out)."""
    free = _available_memory_bytes()
    return max_bytes if free is None else min(max_bytes, free // 4)


def _available_memory_bytes() -> int | None:
    """Linux's MemAvailable (free plus reclaimable page cache), else POSIX free pages, else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


# the settings ``build_bank`` adds to its caller's (``artefact_settings``)
BUILD_SETTINGS = ("quantize", "chunk_size", "whiten", "store_dtype")


def block_key(j: int) -> str:
    """The stored array name of parameter block j's rows (``b0000``, ``b0001``, ...)."""
    return f"b{j:04d}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def artefact_settings(
    settings: dict[str, Any] | None = None,
    quantize: bool = True,
    chunk_size: int = 128,
    whiten: float | None = None,
    store_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """The settings ``build_bank`` stores (and looks up) a bank under, for the same arguments: the caller's
    ``settings`` plus ``quantize`` and ``chunk_size``, ``whiten`` for a whitened int8 grid and ``store_dtype``
    for unquantised rows kept in another float type.

    A bank kind's ``cache_key`` returns ``(name, artefact_settings(settings, quantize=..., ...))`` with the
    arguments its ``build_bank`` call passes, so that ``is_built`` and ``status`` look where the build
    writes (QA 30b: a key of the caller's settings alone named a folder that was never written, and the
    kind reported itself unbuilt for ever).  Idempotent: keys of ``BUILD_SETTINGS`` already in ``settings``
    are replaced by the arguments' (``build_bank`` refuses settings whose such keys disagree with its
    arguments)."""
    out = {k: v for k, v in (settings or {}).items() if k not in BUILD_SETTINGS}
    out.update(quantize=bool(quantize), chunk_size=int(chunk_size))
    if quantize and whiten is not None:
        out["whiten"] = float(whiten)
    if store_dtype is not None:
        if quantize:
            raise ValueError("store_dtype is for unquantised rows (quantize=False): an int8 bank is int8")
        if not store_dtype.is_floating_point:
            raise ValueError(f"store_dtype must be a float type, not {store_dtype}")
        out["store_dtype"] = _dtype_name(store_dtype)
    return out


def product_dtype(stored: torch.dtype) -> torch.dtype:
    """The dtype rows stored as ``stored`` are multiplied in: float32 for int8 and for any float type narrower
    than float32 (float16, bfloat16), the stored type otherwise (float64 in tests).  The damped query
    q / (e + lambda) overflows float16 at small dampings, and float16 sums lose digits over P terms."""
    if not stored.is_floating_point:
        return torch.float32
    return torch.promote_types(stored, torch.float32)


def whitening(eigenvalues: torch.Tensor, blocks: list[Block], floor: float) -> torch.Tensor:
    """The int8 grid's per-coordinate weights w (P,) float32: w_j = sqrt(e_j + floor * max_{k in b} e_k)
    for coordinate j of block b (module docstring).  E R_ij^2 ~ e_j in the factors' eigenbasis, so
    R / w has about the same spread in every coordinate; the floor keeps w > 0 where an eigenvalue is
    zero (a rank-deficient factor) and stops the near-zero directions from setting a row's scale."""
    e = eigenvalues.detach().to(torch.float64).clamp_min(0.0)
    w = torch.empty_like(e)
    for blk in blocks:
        eb = e[blk.offset : blk.offset + blk.size]
        top = float(eb.max()) if eb.numel() else 0.0
        w[blk.offset : blk.offset + blk.size] = (eb + floor * top).sqrt() if top > 0 else 1.0
    w = torch.where(w > 0, w, torch.ones_like(w))
    return w.to(torch.float32)


def quantize_blocks(
    rotated: torch.Tensor, blocks: list[Block], weights: torch.Tensor | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(n, P) rotated gradients -> per-block int8 (n, size) and scales (n, num_blocks) float32.

    ``weights`` (P,): round R / w instead of R (``whitening``); the bank then multiplies the query by w."""
    data, scales = [], []
    for blk in blocks:
        r = rotated[:, blk.offset : blk.offset + blk.size].float()
        if weights is not None:
            r = r / weights[blk.offset : blk.offset + blk.size].to(r.device)
        s = r.abs().amax(dim=1) / 127.0
        s = torch.where(s > 0, s, torch.ones_like(s))
        data.append(torch.round(r / s[:, None]).clamp_(-127, 127).to(torch.int8))
        scales.append(s)
    return data, torch.stack(scales, dim=1)


# torch warns that a read-only memory map (a published bank's) gives a tensor it could write to: we never write to
# them.  A filter for that one message from this module, set once: a ``catch_warnings`` around each call swapped
# process-wide state from the query and build threads, and two calls that overlapped could leave every
# UserWarning of the process ignored (engine.warning_lines)
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning,
                        module=__name__)


def _as_tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(a).to(device)


class RotatedBank:
    """The rotated training gradients R_i of all N examples, per block, on one device
    (``scoring.Rows``: the scoring operator takes the 1/N, the division and the grid).

    ``compute``: the context's speed and memory settings (None: the defaults): the grid pass's budget
    (``grid_max_bytes``), the largest bank packed on load (``pack_max_bytes``) and the torch scan's chunks
    (``scan_chunk_bytes_cpu``/``_gpu``); none of them changes a score."""

    # a grid pass costs ~G single passes here (the scan dominates): answer first, grid after
    # (digits bank, one thread: one damping ~0.2-0.3 s, the 50-damping grid ~1.5 s)
    grid_in_first_pass = False

    def __init__(
        self,
        blocks: list[Block],
        data: list[torch.Tensor],
        scales: torch.Tensor | None,
        pack: bool = True,
        weights: torch.Tensor | None = None,
        compute: ComputeConfig | None = None,
    ):
        if len(data) != len(blocks):
            raise ValueError("one data array per block expected")
        self.compute = compute or COMPUTE
        self.grid_max_bytes = self.compute.grid_max_bytes  # scoring.Rows: one grid pass's damped queries
        self.blocks = blocks
        self.data = data
        self.scales = scales  # (N, num_blocks) float32 when quantised
        # (P,) the whitened grid's w: the stored rows are R / w, and every query is multiplied by w once
        self.weights = None if weights is None else weights.to(data[0].device, torch.float32).contiguous()
        if self.weights is not None and self.weights.shape[0] != sum(b.size for b in blocks):
            raise ValueError(f"whitening weights have {self.weights.shape[0]} entries for "
                             f"{sum(b.size for b in blocks)} coordinates")
        # each block's scale column, contiguous: sliced per row chunk in every scan
        self._scale_cols = None if scales is None else [scales[:, j].contiguous() for j in range(len(blocks))]
        self.num_examples = int(data[0].shape[0])
        self._packed: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        if self._fused_ok():
            if pack and self.nbytes <= pack_limit_bytes(self.compute.pack_max_bytes):  # pack=False: keep the blocks
                self._pack()
            # compile (or load) the scan kernel now, not in the first query
            int8_scan.warm_up(packed=self._packed is not None)

    def _pack(self) -> None:
        """Copy the blocks into one (N, P) int8 array, rows contiguous, and keep the blocks as its views.

        Why: the fused scan then runs one parallel loop over rows for the whole bank
        (``int8_scan.packed_row_dots_into``) instead of one per block, each ending at a barrier that
        waits for the slowest thread (digits bank, 100 blocks, 2 threads: 47-48 ms against 58-89 ms in two
        runs of ``scripts/bank_scan_kernels.py --threads 2``; ``assets/results/bank_scan_kernels_2threads.json``).
        The copy is made once, on load (memory-mapped blocks are read once; the bank then lives in
        memory, as it does on a GPU).  Blocks must tile [0, P) in order (``curvature.layout`` makes them so).
        """
        offsets = [blk.offset for blk in self.blocks] + [self.blocks[-1].offset + self.blocks[-1].size]
        if offsets[0] != 0 or any(blk.offset + blk.size != nxt for blk, nxt in zip(self.blocks, offsets[1:], strict=True)):
            return  # blocks that do not tile the parameter vector: keep the per-block scan
        packed = np.empty((self.num_examples, offsets[-1]), np.int8)
        blocks = [d.numpy() for d in self.data]
        step = max(1, (32 << 20) // offsets[-1])  # ~32 MiB of rows at a time: each block's slice is written
        for r in range(0, self.num_examples, step):  # while that part of the array is in cache (8x faster
            for blk, d in zip(self.blocks, blocks, strict=True):  # than whole columns: 0.23 vs 1.9 s on digits)
                packed[r : r + step, blk.offset : blk.offset + blk.size] = d[r : r + step]
        scales = np.ascontiguousarray(self.scales.numpy())  # type: ignore[union-attr]
        self._packed = (packed, np.asarray(offsets, np.int64), scales)
        self.data = [torch.from_numpy(packed[:, blk.offset : blk.offset + blk.size]) for blk in self.blocks]

    @property
    def quantized(self) -> bool:
        """Whether the rows are int8 with per-(example, block) scales."""
        return self.scales is not None

    @property
    def device(self) -> torch.device:
        """Where the rows are (and every product is taken)."""
        return self.data[0].device

    @property
    def product_dtype(self) -> torch.dtype:
        """What the rows are multiplied in: float32 for int8 and float16/bfloat16 rows (``product_dtype``)."""
        return product_dtype(self.data[0].dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the rows, scales and whitening weights."""
        n = sum(d.numel() * d.element_size() for d in self.data)
        n += 0 if self.weights is None else self.weights.numel() * 4
        return n + (0 if self.scales is None else self.scales.numel() * 4)

    def row(self, i: int) -> torch.Tensor:
        """Example i's rotated gradient R_i (P,), dequantised (for checks)."""
        dtype = self.product_dtype
        return torch.cat([self.block_rows(j, slice(i, i + 1), dtype)[0] for j in range(len(self.data))])

    def block_rows(self, j: int, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        """Block j of examples ``rows``, dequantised: R_i's entries in that block ((rows, size), ``dtype``)."""
        x = self.data[j][rows].to(dtype)
        if self.scales is not None:
            x = x * self.scales[rows, j : j + 1].to(dtype)
        if self.weights is not None:
            blk = self.blocks[j]
            x = x * self.weights[blk.offset : blk.offset + blk.size].to(dtype)
        return x

    def _weighted(self, q: torch.Tensor) -> torch.Tensor:
        """The query in the stored rows' coordinates: w * q on the whitened grid (<R_i, q> = <W_i, w * q>)."""
        return q if self.weights is None else q * self.weights.to(q.dtype)

    def inner(self, query: torch.Tensor, chunk_bytes: int | None = None) -> torch.Tensor:
        """<R_i, q> = sum_blocks scale_{i,b} <int8_{i,b}, q_b> (N,), for one damped rotated query (P,).

        On a CPU with numba, the fused kernel of ``int8_scan`` reads each int8 once (no float copy);
        otherwise, or when ``chunk_bytes`` is given, each block is converted to float ``chunk_bytes``
        at a time (by default ``compute.scan_chunk_bytes_cpu``, cache-sized 4 MiB chunks, on a CPU;
        ``scan_chunk_bytes_gpu``, 256 MiB, on a GPU, where small chunks would mean thousands of tiny kernel
        launches).  Float rows narrower than float32 (float16, bfloat16)
        are widened the same way, so the damped query and the sums stay in float32 (``product_dtype``).
        """
        n = self.num_examples
        dtype = self.product_dtype
        q = self._weighted(query.to(self.device, dtype))
        if chunk_bytes is None and self._fused_ok():
            return self._inner_fused(q)
        if chunk_bytes is None:
            c = self.compute
            chunk_bytes = c.scan_chunk_bytes_cpu if self.device.type == "cpu" else c.scan_chunk_bytes_gpu
        out = torch.zeros(n, dtype=q.dtype, device=self.device)
        for j, (blk, d) in enumerate(zip(self.blocks, self.data, strict=True)):
            qb = q[blk.offset : blk.offset + blk.size]
            if self.scales is None and d.dtype == dtype:
                out += d @ qb
                continue
            # int8, or float rows narrower than the product (float16): widened a chunk at a time
            rows = max(1, chunk_bytes // max(1, 4 * blk.size))
            for r in range(0, n, rows):
                part = d[r : r + rows].to(dtype) @ qb
                if self.scales is not None:
                    part *= self._scale_cols[j][r : r + rows]  # type: ignore[index]
                out[r : r + rows] += part
        return out

    def _fused_ok(self) -> bool:
        return (
            self.device.type == "cpu"
            and self.quantized
            and (self._packed is not None or all(d.is_contiguous() for d in self.data))
            and int8_scan.available()
        )

    def _inner_fused(self, q: torch.Tensor) -> torch.Tensor:
        out = np.zeros(self.num_examples, np.float32)
        qn = q.contiguous().numpy()
        if self._packed is not None:
            packed, offsets, scales = self._packed
            int8_scan.packed_row_dots_into(packed, offsets, qn, scales, out)
            return torch.from_numpy(out)
        blocks = [
            (d.numpy(), qn[blk.offset : blk.offset + blk.size], self._scale_cols[j].numpy())  # type: ignore[index]
            for j, (blk, d) in enumerate(zip(self.blocks, self.data, strict=True))
        ]
        int8_scan.scaled_block_dots_into(blocks, out)
        return torch.from_numpy(out)

    def inner_many(self, queries: torch.Tensor, chunk_bytes: int = 32 << 20) -> torch.Tensor:
        """(G, N) inner products for G queries at once: one pass over the bank.

        Each int8 chunk is dequantised once and multiplied by all G queries, so G dampings
        of the same query cost about one dequantising pass (G = 1 goes to ``inner``).
        """
        if queries.shape[0] == 1:
            return self.inner(queries[0])[None]
        n, g = self.num_examples, queries.shape[0]
        dtype = self.product_dtype
        q = self._weighted(queries.to(self.device, dtype))
        out = torch.zeros((n, g), dtype=dtype, device=self.device)
        for j, (blk, d) in enumerate(zip(self.blocks, self.data, strict=True)):
            qb = q[:, blk.offset : blk.offset + blk.size].T.contiguous()  # (size, G)
            rows = max(1, chunk_bytes // max(1, 4 * blk.size))
            for r in range(0, n, rows):
                pause_point()  # the app's grid pass waits here while a page's query runs (engine.attribution.foreground)
                part = d[r : r + rows].to(dtype) @ qb
                if self.scales is not None:
                    part *= self._scale_cols[j][r : r + rows, None]  # type: ignore[index]
                out[r : r + rows] += part
        return out.T

    def score(self, query: torch.Tensor, chunk_bytes: int | None = None) -> np.ndarray:
        """(1/N) <R_i, q> (N,) float32: eq. 6 for one damped rotated query (``scoring.to_scores``)."""
        return to_scores(self.inner(query, chunk_bytes), self.num_examples)

    def score_many(self, queries: torch.Tensor, chunk_bytes: int = 32 << 20) -> np.ndarray:
        """(G, N) float32 scores of G damped rotated queries, one pass over the bank."""
        return to_scores(self.inner_many(queries, chunk_bytes), self.num_examples)

    # --- persistence -------------------------------------------------------------------

    @classmethod
    def from_arrays(
        cls,
        arrays: dict[str, np.ndarray],
        blocks: list[Block],
        device: torch.device | str,
        weights: torch.Tensor | None = None,
        compute: ComputeConfig | None = None,
    ) -> RotatedBank:
        """``weights``: the whitening the rows were stored with (None: the plain grid); not saved with
        the arrays, since it follows from the factors and the floor in the bank's cache key.  ``compute``: as
        the constructor's (not saved either: it changes no score)."""
        device = torch.device(device)
        data = [_as_tensor(arrays[block_key(j)], device) for j in range(len(blocks))]
        scales = _as_tensor(np.asarray(arrays[SCALES]), device) if SCALES in arrays else None
        return cls(blocks, data, scales, weights=weights, compute=compute)

