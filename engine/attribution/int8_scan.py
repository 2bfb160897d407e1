"""Fused int8 row-dot kernel for the stored bank's single-damping scan on a CPU (docs/architecture.md §4).

Why: a query's K-FAC answer is one pass over the int8 bank,

    <R_i, q> = sum_blocks scale_{i,b} * sum_j int8_{i,b,j} * q_{b,j}        (paper eq. 6 in the eigenbasis)

and torch has no CPU kernel that multiplies int8 rows by a float vector without first writing them
out as float32 (its fused ``_weight_int8pack_mm`` is slower than converting chunks, and ``_int_mm`` is
int8 x int8).  Converting writes and re-reads four bytes per stored byte; this kernel reads each
int8 once, widens it in registers and accumulates in float32 (SIMD through LLVM), rows in parallel.
Measured on the 486 MB digits bank's shape, idle 2-core AVX2 CPU, side by side: 68 ms on one
thread and 42 ms on two, against 190 ms for torch's 4 MiB float chunks
(``scripts/bank_scan_kernels.py``).

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

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def scaled_row_dots(data, q, scales, out):  # pragma: no cover - compiled
        n, p = data.shape
        for i in prange(n):
            acc = np.float32(0.0)
            row = data[i]
            for j in range(p):
                acc += np.float32(row[j]) * q[j]
            out[i] += acc * scales[i]

    return scaled_row_dots


_KERNEL = CompiledKernel(_compile, "ATTRIBUTION_INT8_KERNEL")


def available() -> bool:
    """Whether the fused kernel can run here (numba importable, not switched off)."""
    return _KERNEL.available()


def warm_up() -> bool:
    """Compile (or load from numba's cache) the kernel now, on a tiny array; True if it is usable."""
    if not available():
        return False
    out = np.zeros(2, np.float32)
    scaled_row_dots_into(np.ones((2, 8), np.int8), np.ones(8, np.float32), np.ones(2, np.float32), out)
    return True


def _threads() -> int:
    import numba

    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def scaled_row_dots_into(data: np.ndarray, q: np.ndarray, scales: np.ndarray, out: np.ndarray) -> None:
    """out[i] += scales[i] * <data[i], q> for int8 ``data`` (n, p), float32 ``q`` (p,), ``scales`` (n,).

    Uses as many threads as torch is set to (``engine.threads.configure_threads``)."""
    if not available():
        raise RuntimeError("the fused int8 kernel needs numba (pip install numba)")
    import numba

    if data.dtype != np.int8 or q.dtype != np.float32 or scales.dtype != np.float32 or out.dtype != np.float32:
        raise TypeError("expected int8 data and float32 q, scales and out")
    with _LOCK:
        numba.set_num_threads(_threads())
        _KERNEL.fn(data, np.ascontiguousarray(q), np.ascontiguousarray(scales), out)
