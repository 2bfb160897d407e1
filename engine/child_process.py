"""Worker processes that never outlive the process that started them.

Why: the benchmark's cold build, the LDS measurements and the retraining jobs run in
``spawn`` process pools.  When the parent was killed (``kill``, ``kill -9``, an OOM kill, a
closed terminal's SIGHUP reaching only the parent), its pool workers went on computing for
tens of minutes, holding build locks: the next build waited on a lock of an orphan nobody
could see.  Each worker now watches its parent: when the parent's pid is no longer its parent
(the worker was re-parented to init or a subreaper), the worker exits at once.  Everything a
worker writes is atomic or resumable (``engine.attribution.store``, ``pass_checkpoint``,
training states), so exiting mid-pass loses at most one chunk.

Polling ``os.getppid()`` rather than ``prctl(PR_SET_PDEATHSIG)``: the latter fires when the
*thread* that forked the worker ends, and pools may start workers from short-lived threads.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

POLL_S = 1.0
TERM_GRACE_S = 5.0  # seconds a terminated worker has to exit before it is killed


def exit_with_parent(poll_s: float = POLL_S) -> threading.Thread:
    """Start a daemon thread that ends this process (exit status 1) once its parent has died."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)  # no cleanup handlers: the parent that would collect results is gone
            time.sleep(poll_s)

    t = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    t.start()
    return t


def init_worker(threads: int | None = None) -> None:
    """Pool initializer: exit with the parent, and use ``threads`` torch intra-op threads if given."""
    exit_with_parent()
    if threads is not None:
        import torch

        torch.set_num_threads(int(threads))
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass


def stop_pool(pool: Any) -> None:
    """End a process pool now: drop the tasks it has not started and terminate its workers.

    Why: leaving a ``with ProcessPoolExecutor(...)`` block on an exception waits for every submitted task,
    so a SIGTERM to a ``retrain-top --workers 2`` ended it 38 s later, after the pool had also trained the
    queued model (QA 24), and an LDS would train for hours. The work is resumable (a model continues from its
    ``train_state.pt``, a measurement is cached when done), so stopping mid-task loses at most a few steps."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # before shutdown forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    end_processes(processes, TERM_GRACE_S)


def end_processes(processes: list[Any], grace_s: float = TERM_GRACE_S) -> None:
    """SIGTERM each live process, then SIGKILL those still alive after ``grace_s``, and reap them all.

    Why the second step: a worker that does not exit on SIGTERM (a handler some library installed, or an exit
    slowed by a loaded machine) was left running after the old 10 s join, still training; a CI run once found a
    worker alive after ``stop_pool``. A SIGKILL cannot be caught, and the last join waits until it has acted."""
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in processes:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join()
    # A pool's own manager thread joins its workers too, and when its waitpid reaps one first, ours gets ECHILD and
    # multiprocessing reports the worker alive until that thread records the exit code, a moment later (CI, twice:
    # "a worker alive after stop_pool"). Wait for the record, briefly: the kill above has acted.
    settle = time.monotonic() + 5.0
    while any(p.exitcode is None for p in processes) and time.monotonic() < settle:
        time.sleep(0.01)
