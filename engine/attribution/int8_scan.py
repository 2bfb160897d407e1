"""Fused int8 row-dot kernel for the stored bank's single-damping scan on a CPU (docs/architecture.md §4).

Why: a query's K-FAC answer is one pass over the int8 bank,

    <R_i, q> = sum_blocks scale_{i,b} * sum_j int8_{i,b,j} * q_{b,j}        (paper eq. 6 in the eigenbasis)

and torch has no CPU kernel that multiplies int8 rows by a float vector without first writing them
out as float32 (its fused ``_weight_int8pack_mm`` is slower than converting chunks, and ``_int_mm`` is
int8 x int8).  Converting writes and re-reads four bytes per stored byte; this kernel reads each
int8 once, widens it in registers and accumulates in float32 (SIMD through LLVM), rows in parallel.
Measured on the 486 MiB digits bank, 2-core AVX2 CPU, medians side by side: 90 ms on one thread
against 199 ms for torch's 4 MiB float chunks (``assets/results/bank_scan_kernels.json``), 48 ms on
two threads (``bank_scan_kernels_2threads.json``), both by ``scripts/bank_scan_kernels.py``.  A bank of up to ``ComputeConfig.pack_max_bytes`` is packed into one
(N, P) array on load and scanned by one parallel loop over its rows (``packed_row_dots_into``);
a bigger one runs the same row dot once per block (``scaled_block_dots_into``).

numba compiles it on first use (about 2 s; cached on disk where numba can write) and
``warm_up()`` lets a session pay that before its first query.  Without numba (or with
``ATTRIBUTION_INT8_KERNEL=torch``) ``available()`` is False and the bank converts chunks with torch
as before; the two agree to float32 rounding (tests check it).  Calls are serialised by a lock:
numba's default threading layer may not be entered from two Python threads at once (the app scores
in a background thread too), and one scan already uses every core.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from .compiled_kernel import CompiledKernel

_LOCK = threading.Lock()


def _compile() -> Any:
    import numba
    from numba import njit, prange

    if not os.environ.get("NUMBA_THREADING_LAYER"):
        # plain pthreads: numba's OpenMP layer would be a second OpenMP runtime beside torch's, whose idle
        # threads spin after each scan while torch computes the next gradient (calls are serialised below)
        numba.config.THREADING_LAYER = "workqueue"

    # (the row dot is written out in both kernels: a shared jitted helper would stop numba caching them)
    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def scaled_row_dots(data, q, scales, out):  # pragma: no cover - compiled
        for i in prange(data.shape[0]):
            acc = np.float32(0.0)
            row = data[i]
            for j in range(row.shape[0]):
                acc += np.float32(row[j]) * q[j]
            out[i] += acc * scales[i]

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def packed_row_dots(packed, offsets, q, scales, out):  # pragma: no cover - compiled
        for i in prange(packed.shape[0]):
            tot = np.float32(0.0)
            for b in range(offsets.shape[0] - 1):
                row = packed[i, offsets[b] : offsets[b + 1]]
                qb = q[offsets[b] : offsets[b + 1]]
                acc = np.float32(0.0)
                for j in range(row.shape[0]):
                    acc += np.float32(row[j]) * qb[j]
                tot += acc * scales[i, b]
            out[i] += tot

    return SimpleNamespace(block=scaled_row_dots, packed=packed_row_dots)


_KERNEL = CompiledKernel(_compile, "ATTRIBUTION_INT8_KERNEL")


def available() -> bool:
    """Whether the fused kernel can run here (numba importable, not switched off)."""
    return _KERNEL.available()


def warm_up(packed: bool | None = None) -> bool:
    """Compile (or load from numba's cache) the kernels now, on tiny arrays; True if they are usable.

    ``packed``: True warms only the packed bank's kernel, False only the per-block one, None both
    (loading each from numba's cache takes about 0.3 s)."""
    if not available():
        return False
    out = np.zeros(2, np.float32)
    if packed is not True:
        scaled_row_dots_into(np.ones((2, 8), np.int8), np.ones(8, np.float32), np.ones(2, np.float32), out)
    if packed is not False:
        offsets = np.array([0, 3, 8], np.int64)
        packed_row_dots_into(np.ones((2, 8), np.int8), offsets, np.ones(8, np.float32), np.ones((2, 2), np.float32), out)
    return True


def _threads() -> int:
    import numba

    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


@contextmanager
def _running() -> Iterator[Any]:
    """The compiled kernels, under the lock, with numba's threads set to torch's (see the module note)."""
    if not available():
        raise RuntimeError("the fused int8 kernel needs numba (pip install numba)")
    import numba

    with _LOCK:
        numba.set_num_threads(_threads())
        yield _KERNEL.fn


def scaled_row_dots_into(data: np.ndarray, q: np.ndarray, scales: np.ndarray, out: np.ndarray) -> None:
    """out[i] += scales[i] * <data[i], q> for int8 ``data`` (n, p), float32 ``q`` (p,), ``scales`` (n,).

    Uses as many threads as torch is set to (``engine.threads.configure_threads``)."""
    scaled_block_dots_into([(data, q, scales)], out)


def scaled_block_dots_into(blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]], out: np.ndarray) -> None:
    """out[i] += sum_b scales_b[i] * <data_b[i], q_b> over the (data_b, q_b, scales_b) of every block.

    One call for a whole bank: the checks, the lock and the thread setting are paid once per scan, not
    once per block (the digits bank has 100 blocks; per block they cost about 5 ms a query)."""
    if out.dtype != np.float32:
        raise TypeError("expected a float32 out")
    for data, q, scales in blocks:
        if data.dtype != np.int8 or q.dtype != np.float32 or scales.dtype != np.float32:
            raise TypeError("expected int8 data and float32 q, scales and out")
    with _running() as kernels:
        for data, q, scales in blocks:
            kernels.block(data, np.ascontiguousarray(q), np.ascontiguousarray(scales), out)


def packed_row_dots_into(
    packed: np.ndarray, offsets: np.ndarray, q: np.ndarray, scales: np.ndarray, out: np.ndarray
) -> None:
    """out[i] += sum_b scales[i, b] * <packed[i, o_b:o_{b+1}], q[o_b:o_{b+1}]> for a bank packed as one
    int8 (n, P) array whose blocks start at ``offsets`` (nb + 1,), with ``scales`` (n, nb).

    Why: one parallel loop over rows for the whole bank instead of one per block.  Each per-block
    loop ends at a barrier that waits for the slowest thread, so on a shared machine 100 blocks pay
    100 waits; packed, the digits bank's scan took 47-48 ms against 58-89 ms per block (2 threads, side
    by side, two runs of ``scripts/bank_scan_kernels.py --threads 2``)."""
    if packed.dtype != np.int8 or q.dtype != np.float32 or scales.dtype != np.float32 or out.dtype != np.float32:
        raise TypeError("expected int8 data and float32 q, scales and out")
    if offsets.dtype != np.int64 or offsets.shape[0] != scales.shape[1] + 1 or offsets[-1] != packed.shape[1]:
        raise ValueError("offsets must be int64 block starts plus the end, one block per scale column")
    if packed.shape[0] != scales.shape[0] or out.shape[0] != packed.shape[0] or q.shape[0] != packed.shape[1]:
        raise ValueError("packed (n, P), q (P,), scales (n, nb) and out (n,) disagree in shape")
    with _running() as kernels:
        kernels.packed(packed, offsets, np.ascontiguousarray(q), np.ascontiguousarray(scales), out)
