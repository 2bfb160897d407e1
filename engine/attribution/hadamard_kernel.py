"""In-place fast Walsh-Hadamard transform of float32 rows on a CPU, compiled with numba.

Why: TRAK's and D-TRAK's SRHT projection (``engine.attribution.projection``) is one unnormalised
Walsh-Hadamard transform of each zero-padded gradient (n = 2^19 on digits),

    y = x H_n,   H_n = H_2 (x) H_2 (x) ... (x) H_2   (Sylvester; log2 n butterfly stages),

and torch has no such kernel: the matmul-based passes of ``projection.fwht`` cost about 30 ms per
row in batches of 32 on one thread, where the butterflies below take 7-10 ms (measured side by side
on the digits size, one-off).  In a cold build the bank pass projects 2 x 1,797 gradients in the
main thread while the gradient workers run, so this is CPU time taken from them; in a query it is
TRAK's and D-TRAK's ``prepare``.  Rows are transformed one after another (no threads of its own:
the callers run beside gradient workers), without the GIL.

Like ``int8_scan``: compiled on first use (cached on disk where numba can write), unused without
numba or with ``ATTRIBUTION_FWHT_KERNEL=torch``; both paths agree to float32 rounding (tests).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .compiled_kernel import CompiledKernel


def _compile() -> Any:
    from numba import njit

    @njit(fastmath=True, cache=True, nogil=True)
    def fwht_rows(x):  # pragma: no cover - compiled
        b, n = x.shape
        for r in range(b):
            v = x[r]
            h = 1
            while h < n:
                for i in range(0, n, 2 * h):
                    for j in range(i, i + h):
                        a = v[j]
                        c = v[j + h]
                        v[j] = a + c
                        v[j + h] = a - c
                h *= 2

    return fwht_rows


_KERNEL = CompiledKernel(_compile, "ATTRIBUTION_FWHT_KERNEL")


def available() -> bool:
    """Whether the compiled transform can run here (numba importable, not switched off)."""
    return _KERNEL.available()


def fwht_rows_inplace(x: np.ndarray) -> None:
    """x <- x H_n for every row of a C-contiguous float32 (b, n) array, n a power of two."""
    if not available():
        raise RuntimeError("the compiled Walsh-Hadamard transform needs numba (pip install numba)")
    if x.dtype != np.float32 or x.ndim != 2 or not x.flags.c_contiguous:
        raise TypeError("expected a C-contiguous float32 (rows, n) array")
    n = x.shape[1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    _KERNEL.fn(x)


__all__ = ["available", "fwht_rows_inplace"]
