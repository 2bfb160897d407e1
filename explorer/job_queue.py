"""A per-server queue for background jobs (retraining): at most ``max_running`` at once, the rest wait.

The app is a shared server: without a cap, every visitor's click starts two model trainings on
the same cores.  ``JobQueue.submit(start)`` returns a ``QueuedJob`` at once; ``start()`` (which
launches the real job and returns an object with ``progress()``, ``done()`` and ``result()``,
e.g. ``engine.evaluation.retrain_top.RetrainJob``) is called only when fewer than ``max_running`` started
jobs are unfinished.  A waiting job reports its place in the line through ``progress()``.
A daemon thread promotes waiting jobs as running ones finish, so the line moves even when no
browser tab is polling.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class QueueFullError(RuntimeError):
    """Too many jobs are waiting; the message says how many and what to do."""


class QueuedJob:
    """A job that may still be waiting for a slot; the same interface as the job it wraps."""

    def __init__(self, queue: JobQueue, start: Callable[[], Any]):
        self._queue = queue
        self._start = start
        self.job: Any = None  # the real job once started
        self.error: BaseException | None = None

    def position(self) -> int | None:
        """1-based place among the waiting jobs; None once started."""
        return self._queue.position(self)

    def progress(self) -> tuple[str, float]:
        self._queue.pump()
        if self.error is not None:
            return f"failed to start: {self.error}", 1.0
        if self.job is None:
            pos = self.position()
            running = self._queue.running()
            return (
                f"queued: {pos} of {self._queue.waiting()} waiting; {running} job(s) running "
                f"(this server runs at most {self._queue.max_running} at a time)",
                0.0,
            )
        return self.job.progress()

    def done(self) -> bool:
        self._queue.pump()
        return self.error is not None or (self.job is not None and bool(self.job.done()))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is done (or ``timeout`` seconds); True when done."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.job is None and self.error is None:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self._queue.pump()
            time.sleep(min(self._queue.poll_s, 0.1))
        if self.job is not None and hasattr(self.job, "wait"):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self.job.wait(left)
        return self.done()

    def result(self) -> Any:
        if self.error is not None:
            raise RuntimeError(f"the job could not start: {self.error}") from self.error
        if self.job is None:
            raise RuntimeError("the job is still queued; poll done() first")
        return self.job.result()


class JobQueue:
    """FIFO of ``QueuedJob``; at most ``max_running`` started and unfinished, at most ``max_waiting`` waiting."""

    def __init__(self, max_running: int = 1, max_waiting: int = 20, poll_s: float = 0.5):
        if max_running < 1:
            raise ValueError(f"max_running must be at least 1, got {max_running}")
        self.max_running = int(max_running)
        self.max_waiting = int(max_waiting)
        self.poll_s = float(poll_s)
        self._lock = threading.RLock()
        self._waiting: list[QueuedJob] = []
        self._started: list[QueuedJob] = []
        self._thread: threading.Thread | None = None

    def submit(self, start: Callable[[], Any]) -> QueuedJob:
        """Queue a job; it starts now if a slot is free.  QueueFullError when the line is full."""
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFullError(
                    f"{len(self._waiting)} retraining jobs are already waiting on this server; try again later"
                )
            job = QueuedJob(self, start)
            self._waiting.append(job)
            self.pump()
            if self._waiting and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._loop, name="job-queue", daemon=True)
                self._thread.start()
            return job

    def running(self) -> int:
        with self._lock:
            self._started = [j for j in self._started if j.job is not None and not j.job.done()]
            return len(self._started)

    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def position(self, job: QueuedJob) -> int | None:
        with self._lock:
            return self._waiting.index(job) + 1 if job in self._waiting else None

    def pump(self) -> None:
        """Start waiting jobs while slots are free (FIFO)."""
        with self._lock:
            while self._waiting and self.running() < self.max_running:
                job = self._waiting.pop(0)
                try:
                    job.job = job._start()
                except Exception as e:  # noqa: BLE001 - reported through the job
                    job.error = e
                    continue
                self._started.append(job)

    def _loop(self) -> None:
        import time

        while True:
            time.sleep(self.poll_s)
            with self._lock:
                self.pump()
                if not self._waiting:
                    self._thread = None
                    return
