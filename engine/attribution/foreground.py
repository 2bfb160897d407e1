"""Interactive work first: a background pass pauses between its chunks while a foreground query runs.

Why: the app scores the previous answer's damping grid in a background thread (one pass of 49 dampings over the
int8 bank, 1-2 s on mnist; ``session_deferred.fill_grids``) so that the damping slider is a lookup.  On a 2-core
machine the next click's query then ran beside that pass, both using every core: in a one-off script on mnist
gallery clicks (the page run through Streamlit's AppTest, every answer new, load 4.8), the page run's median was
1.03-1.12 s with the grid filler against 0.60-0.66 s without it, the engine's query 0.65-0.67 s against 0.36-0.39 s
(README has the repo command's figures, before and after).  The query is what a person waits for; the grid only has
to be ready before the slider moves.

The rule: a thread doing work a person waits for holds ``foreground()`` (``AttributionSession.query`` and
``rescore``: the work itself, never a wait for a lock the app takes around it, QA 52 #1).  A thread doing deferred work runs inside ``background()`` (the app's grid filler) and the engine's
long loops call ``pause_point()`` between chunks (the stored bank's grid pass, the re-rank's gradient batches).  A
pause point waits while any foreground work runs, and only in a thread marked background, so a foreground query's
own passes through the same loops never wait, and the CLI, which marks nothing, never pauses.  Nothing is lost:
the paused pass goes on from the chunk where it stopped.  ``foreground()`` inside a background thread changes
nothing (such a thread never waits for itself).  A foreground thread that must wait for a lock a paused pass holds
takes it through ``holding()``, which steps out of the foreground while it waits (else both would wait, the pass
for the query and the query for the pass, until ``MAX_PAUSE_S`` ran out); ``stepped_out()`` is that step, for any
other wait of a foreground thread on such a pass.  (The app's page runs are not foreground as a whole, so the "Exact
ranking" click, which waits in its page run for a worker, needs no step.)
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

# a background section pauses this long at most, all its pause points together, then runs on: a wait that the rule
# above does not foresee (a foreground thread blocked on something a paused pass holds) costs at most this, never a
# hang (QA 52 #1: page runs waiting for the handle's lock counted as foreground, and a 30 s cap per pause point,
# renewed at every chunk, held the page for minutes)
MAX_PAUSE_S = 10.0

_cv = threading.Condition()
_active = 0  # foreground sections running now, over every thread
_local = threading.local()
F = TypeVar("F", bound=Callable[..., Any])


def is_background() -> bool:
    """Whether the calling thread is inside ``background()``."""
    return getattr(_local, "background", 0) > 0


def _add(n: int) -> None:
    global _active
    with _cv:
        _active += n
        if _active == 0:
            _cv.notify_all()


@contextmanager
def foreground() -> Iterator[None]:
    """Work a person waits for: background threads pause at their next ``pause_point()`` until it ends."""
    if is_background():
        yield
        return
    _local.foreground = getattr(_local, "foreground", 0) + 1
    _add(1)
    try:
        yield
    finally:
        _local.foreground -= 1
        _add(-1)


@contextmanager
def stepped_out() -> Iterator[None]:
    """The calling thread leaves the foreground meanwhile: for a foreground thread that waits for work another
    thread does (a paused background pass, or a worker that waits for one), which would otherwise wait for it
    until ``MAX_PAUSE_S``."""
    mine = 0 if is_background() else getattr(_local, "foreground", 0)
    if mine:
        _add(-mine)
    try:
        yield
    finally:
        if mine:
            _add(mine)


@contextmanager
def holding(lock: threading.Lock) -> Iterator[None]:
    """``with lock``, for a lock a background pass may hold while it pauses (``EigenbasisQuery``'s: the grid pass
    runs under it): a foreground thread that has to wait for it leaves the foreground while it waits
    (``stepped_out``), so that the pass it waits for goes on instead of pausing for it."""
    if not lock.acquire(blocking=False):
        with stepped_out():
            lock.acquire()
    try:
        yield
    finally:
        lock.release()


def in_foreground(fn: F) -> F:
    """``fn`` runs inside ``foreground()`` (the session's ``query`` and ``rescore``)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with foreground():
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


@contextmanager
def background() -> Iterator[None]:
    """Deferred work in this thread: its ``pause_point()`` calls wait while foreground work runs, for at most
    ``MAX_PAUSE_S`` in all (counted from the outermost section)."""
    if not is_background():
        _local.paused = 0.0
    _local.background = getattr(_local, "background", 0) + 1
    try:
        yield
    finally:
        _local.background -= 1


def pause_point() -> float:
    """In a background thread, wait while foreground work runs (its section's pauses ``MAX_PAUSE_S`` in all at
    most); returns the seconds waited.  Free elsewhere: one attribute read."""
    if not _active or not is_background():
        return 0.0
    left = MAX_PAUSE_S - getattr(_local, "paused", 0.0)
    if left <= 0:
        return 0.0
    t0 = time.monotonic()
    with _cv:
        _cv.wait_for(lambda: _active == 0, timeout=left)
        waited = time.monotonic() - t0
    _local.paused = getattr(_local, "paused", 0.0) + waited
    return waited
