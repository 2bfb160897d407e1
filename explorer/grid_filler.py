"""One background worker per server that fills, for each browser tab, the latest query of that tab.

Why: the first answer of K-FAC on a stored bank is one pass at the chosen damping; the grid that
makes later damping changes free is scored afterwards (``AttributionSession.fill_grids``), and so
is a compressed bank's exact re-rank (seconds to minutes of fresh gradients).  A thread per query
would pile up that work when a user clicks through the gallery and slow the very answers this is
for, so queries are handed to one worker, and of each tab only its latest waiting query is kept: a
tab's superseded query is skipped (its damping changes, if any, score exactly), and its running
re-rank stops at its next batch once a newer query *of the same tab* waits (the worker's
``should_stop``; it stays pending and the "Exact ranking" button redoes it).  Tabs take turns, oldest
waiting first: a query from another tab waits for the running one instead of stopping it, so two
people on one server each get their exact ranking (before, the latest query of any tab stopped the
others' re-rank, which then stayed approximate until a click).  The stop belongs to the worker's
call: a user's own click on that button, in another thread, is never stopped by it.  A closed or
reloaded tab's query is dropped, and its running fill stopped, once the tab has been gone for
``GONE_AFTER_S`` (``alive``: Streamlit's own session registry; the grace covers a websocket's
reconnect): it kept the worker busy for nobody and made new visitors wait behind it; a tab that is
away is never started.  Neither a newer query nor a closed tab stops a fill that another tab waits
for too (the same result, ``explorer.shared_results``): it restarted from scratch for that tab.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

from engine.attribution.foreground import background

log = logging.getLogger(__name__)
GONE_AFTER_S = 10.0  # a tab absent from the server's sessions this long is closed, not reconnecting
IDLE_EXIT_S = 60.0  # the worker thread ends after this long with nothing to do (the next submit starts one)


class GridFiller:
    """``submit(session, result, tab)``: fill ``result``'s damping grids soon, unless ``tab`` submits a newer one first."""

    def __init__(self, alive: Callable[[Hashable], bool] | None = None) -> None:
        self._alive = alive or (lambda tab: True)  # tab -> its browser session is still connected
        self._absent_since: dict[Hashable, float] = {}
        self._cv = threading.Condition()
        self._waiting: dict[Hashable, tuple[Any, Any]] = {}  # tab -> (session, result), oldest submission first
        self._running: Hashable | None = None  # the tab whose result is being filled
        self._running_result: Any = None
        self._thread: threading.Thread | None = None
        self._busy = False
        self._told_to_stop = False  # the running fill's should_stop said stop (it may have ended unfinished)
        self.filled = 0  # results whose grids were filled (tests)
        self.skipped = 0  # results superseded by a newer one of their tab before their turn

    def submit(self, session: Any, result: Any, tab: Hashable = None) -> None:
        """Queue ``result`` for ``tab`` (a browser tab's id), replacing the tab's waiting one; it goes to
        the end of the queue, so a tab that clicks on does not keep the others waiting."""
        with self._cv:
            if self._waiting.pop(tab, None) is not None:
                self.skipped += 1
            self._waiting[tab] = (session, result)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True, name="grid-filler")
                self._thread.start()
            self._cv.notify()

    @property
    def idle(self) -> bool:
        """Nothing waiting and nothing running."""
        with self._cv:
            return not self._waiting and not self._busy

    def ahead(self, tab: Hashable = None) -> int | None:
        """How many fills of other tabs run or wait before ``tab``'s latest result: 0 while it is being
        filled (or only the tab's own superseded fill, stopping at its next batch, is before it), None
        when the worker holds none of the tab's results (done, stopped or failed)."""
        with self._cv:
            self._drop_gone()
            if tab in self._waiting:
                mine = self._waiting[tab][1]
                if self._busy and mine is self._running_result:
                    return 0  # the running fill is this tab's result too (a shared one)
                # a waiting tab whose result is the running one is served by it: not a fill of its own
                queue = [t for t, (_, r) in self._waiting.items() if t == tab or not (self._busy and r is self._running_result)]
                before = self._busy and (self._running != tab or self._shared_running())
                return queue.index(tab) + int(before)
            return 0 if self._busy and self._running == tab else None

    def stopping(self, tab: Hashable = None) -> bool:
        """True while the running fill is ``tab``'s own superseded one, which stops at its next batch for
        the tab's newer result (waiting first in line); the page says so instead of nothing."""
        with self._cv:
            return (self._busy and self._running == tab and tab in self._waiting
                    and not self._shared_running())

    def _shared_running(self) -> bool:
        """Another tab waits for the very result being filled (under ``_cv``): it is finished, not stopped."""
        return any(r is self._running_result for t, (_, r) in self._waiting.items() if t != self._running)

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is waiting or running (tests, shutdown)."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._waiting and not self._busy, timeout)

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self._cv:
                picked = self._next()
                while picked is None:  # nothing, or only tabs that are away (closing, or reconnecting)
                    if not self._waiting and time.monotonic() - idle_since >= IDLE_EXIT_S:
                        self._thread = None  # idle for a minute: end; the next submit starts another
                        return
                    self._cv.wait(timeout=1.0)
                    picked = self._next()
                (tab,) = picked
                session, result = self._waiting.pop(tab)
                self._running, self._running_result, self._busy = tab, result, True
                self._told_to_stop = False
            finished = False
            try:
                with background():  # paused while a page's query runs: a click's answer first (engine.attribution.foreground)
                    session.fill_grids(result, should_stop=functools.partial(self._superseded, tab))
                self.filled += 1
                finished = True
            except Exception:  # noqa: BLE001 - a failed fill only costs the next damping change an exact pass
                log.exception("filling the damping grid failed")
            finally:
                with self._cv:
                    if finished and not self._told_to_stop:  # other tabs waiting for this very result: served
                        for t in [t for t, (_, r) in self._waiting.items() if r is result]:
                            del self._waiting[t]
                    self._running, self._running_result, self._busy = None, None, False
                    self._absent_since.pop(tab, None)
                    self._cv.notify_all()
                idle_since = time.monotonic()

    def _next(self) -> tuple[Hashable] | None:
        """(the oldest waiting tab that is connected,), or None (under ``_cv``; a tab may be None).  A tab that is away is passed over,
        not started: closed, it is dropped once its grace is over; reconnected, it gets its turn."""
        for tab in self._drop_gone():
            if self._alive(tab):
                return (tab,)
        return None

    def _superseded(self, tab: Hashable) -> bool:
        """The running fill's ``should_stop``: a newer result of the same tab is waiting, or the tab is gone.
        Asked before each batch, it also notes which waiting tabs are away and drops closed ones (the
        pages of waiting tabs note it too, but a page that shows a progress bar does not ask)."""
        with self._cv:
            self._drop_gone()
            if self._shared_running():
                return False  # another tab waits for this very result (shared_results): finish it for them
            if tab in self._waiting or self._gone(tab):
                if tab not in self._waiting:
                    log.info("stopped the exact re-rank of a closed tab's query")
                self._told_to_stop = True
                return True
            return False

    def _gone(self, tab: Hashable) -> bool:
        """True once ``tab`` has been absent from the server's sessions for ``GONE_AFTER_S`` (under ``_cv``)."""
        if self._alive(tab):
            self._absent_since.pop(tab, None)
            return False
        return time.monotonic() - self._absent_since.setdefault(tab, time.monotonic()) >= GONE_AFTER_S

    def _drop_gone(self) -> dict[Hashable, tuple[Any, Any]]:
        """Drop the waiting results of closed tabs (under ``_cv``); the rest.  Also notes when the running
        tab went away, so that its fill's next ``should_stop`` counts the grace from then (the worker
        looks every second while it waits, each tab's poller every second while it polls)."""
        if self._busy:
            self._gone(self._running)
        for tab in [t for t in self._waiting if self._gone(t)]:
            del self._waiting[tab]
            self._absent_since.pop(tab, None)
            self.skipped += 1
            self._cv.notify_all()  # wait_idle
            log.info("dropped a closed tab's query from the background worker's queue")
        return self._waiting
