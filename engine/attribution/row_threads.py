"""Data-parallel threads for gradient passes on the CPU: one single-threaded worker per core.

Why: the digits model's operations are small (8x8 images, 32 channels, 64 rows per example), so
torch's intra-op threads share each convolution badly: 2 threads were 1.1-1.35x faster than 1.  Two
Python threads that each compute *different* examples' gradients with one intra-op thread were
1.54x faster than one thread computing them with 2 intra-op threads (32 examples, loss and
square-norm gradients, 3.35 s vs 5.15 s, interleaved in one process on the idle 2-core machine).
Torch releases the GIL inside its operations and a CPU backward runs on the calling thread, so
the workers overlap; graphs are separate and ``autograd.grad`` never writes ``.grad``, so sharing
the model's parameters is safe.

How many workers: the torch thread count ``engine.threads.configure_threads`` chose for this
process (the free cores), so a busy machine still gets one worker.  While workers run, torch's
global intra-op thread count is 1 (restored afterwards); each example's gradient is then the
same computation as a single-threaded pass.  Other devices: one worker (the device parallelises).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

THREAD_PREFIX = "grad-worker"
T = TypeVar("T")
R = TypeVar("R")


def gradient_workers(device: torch.device | str) -> int:
    """Worker threads for a gradient pass on ``device``: torch's configured thread count on the CPU, else 1."""
    if torch.device(device).type != "cpu":
        return 1
    return max(1, int(torch.get_num_threads()))


_THREADS_LOCK = threading.Lock()
_THREADS_STATE = {"users": 0, "before": 1}


@contextlib.contextmanager
def single_op_threads(workers: int) -> Iterator[None]:
    """Torch intra-op threads = 1 while ``workers`` > 1 threads run; the count the first of several
    overlapping users found is restored when the last one leaves (the setting is process-wide)."""
    if workers <= 1:
        yield
        return
    with _THREADS_LOCK:
        if _THREADS_STATE["users"] == 0:
            _THREADS_STATE["before"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS_STATE["users"] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_STATE["users"] -= 1
            if _THREADS_STATE["users"] == 0:
                torch.set_num_threads(_THREADS_STATE["before"])


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` threads, kept: new threads would pay torch's per-thread
    set-up (oneDNN and allocator state) on every query gradient.  Callers in different threads (the
    app's build worker and a query) share it: their tasks queue, none waits on another."""
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=THREAD_PREFIX)
        return pool


def map_ordered(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``fn(item)`` for every item, results yielded in input order, computed by ``workers`` threads
    (at most ``workers`` items ahead of the consumer, so memory stays bounded).  One worker: a plain loop."""
    items = list(items)
    if threading.current_thread().name.startswith(THREAD_PREFIX):
        workers = 1  # called from one of our own workers: no nested pool (its tasks would wait on each other)
    if workers <= 1 or len(items) <= 1:
        for item in items:
            yield fn(item)
        return
    with single_op_threads(workers):
        pool = _pool(workers)
        pending = [pool.submit(fn, item) for item in items[:workers]]
        nxt = workers
        while pending:
            result = pending.pop(0).result()
            if nxt < len(items):
                pending.append(pool.submit(fn, items[nxt]))
                nxt += 1
            yield result
            del result  # not held while the next batch is computed


__all__ = ["gradient_workers", "map_ordered", "single_op_threads"]
