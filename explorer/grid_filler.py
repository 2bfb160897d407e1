"""One background worker per server that scores the damping grid of the latest query only.

Why: the first answer of K-FAC on a stored bank is one pass at the chosen damping; the grid that
makes later damping changes free is scored afterwards (``AttributionSession.fill_grids``), and so
is a compressed bank's exact re-rank (seconds to minutes of fresh gradients).  A thread per query
would pile up that work when a user clicks through the gallery and slow the very answers this is
for, so queries are handed to one worker and only the latest waiting one is filled: a superseded
query is skipped (its damping changes, if any, score exactly), and a running re-rank stops at its
next batch once a newer query is waiting (the worker's ``should_stop``; it stays pending and
"Show the exact ranking" redoes it).  The stop belongs to the worker's call: a user's own click on
that button, in another thread, is never stopped by it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)


class GridFiller:
    """``submit(session, result)``: fill ``result``'s damping grids soon, unless a newer result comes first."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._latest: tuple[Any, Any] | None = None
        self._thread: threading.Thread | None = None
        self._busy = False
        self.filled = 0  # results whose grids were filled (tests)
        self.skipped = 0  # results superseded before their turn

    def submit(self, session: Any, result: Any) -> None:
        with self._cv:
            if self._latest is not None:
                self.skipped += 1
            self._latest = (session, result)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True, name="grid-filler")
                self._thread.start()
            self._cv.notify()

    @property
    def idle(self) -> bool:
        """Nothing waiting and nothing running: a result still pending now was cancelled or failed."""
        with self._cv:
            return self._latest is None and not self._busy

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is waiting or running (tests, shutdown)."""
        with self._cv:
            return self._cv.wait_for(lambda: self._latest is None and not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._cv:
                if not self._cv.wait_for(lambda: self._latest is not None, timeout=60.0):
                    self._thread = None  # idle for a minute: end; the next submit starts another
                    return
                session, result = self._latest
                self._latest, self._busy = None, True
            try:
                session.fill_grids(result, should_stop=self._superseded)
                self.filled += 1
            except Exception:  # noqa: BLE001 - a failed fill only costs the next damping change an exact pass
                log.exception("filling the damping grid failed")
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _superseded(self) -> bool:
        """The running fill's ``should_stop``: a newer result is waiting (its re-rank would compete)."""
        return self._latest is not None
