"""A numba kernel compiled on first use, with an environment switch back to the torch path.

Why one class: every compiled kernel here (the fused int8 bank scan, the Walsh-Hadamard
butterflies) is optional in the same way: compiled the first time it is asked for (numba caches it
on disk where it can write), unusable without numba or when compiling fails, and switched off by
setting its environment variable to ``torch``; the torch path then stays in use.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any


class CompiledKernel:
    """``compile()`` -> the jitted function, tried once; ``switch``: the variable that turns it off."""

    def __init__(self, compile: Callable[[], Any], switch: str):
        self._compile, self.switch = compile, switch
        self._fn: Any = None
        self._tried = False
        self._lock = threading.Lock()

    def available(self) -> bool:
        """Whether the kernel can run here (numba importable, compiled, not switched off)."""
        if os.environ.get(self.switch, "").lower() == "torch":
            return False
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    self._fn = self._compile()
                except Exception:  # noqa: BLE001 - no numba (or a broken one): the torch path stays
                    self._fn = None
        return self._fn is not None

    @property
    def fn(self) -> Any:
        """The compiled function (call ``available()`` first)."""
        return self._fn


__all__ = ["CompiledKernel"]
