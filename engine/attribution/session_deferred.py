"""The work a query's first answer defers: the compressed bank's exact re-rank and the damping grids.

``SessionDeferredWork`` is a mixin that ``AttributionSession`` inherits, not a helper object it delegates
to: the app's grid filler calls ``session.fill_grids`` / ``session.fill_exact`` as the session's own
methods, and ``query`` marks what each prepared method may defer through ``self._defer_exact_work``.

Why it is deferred: the first answer is what a user waits for.  On a compressed bank the exact re-rank
costs 2C x M fresh gradient rows, seconds to minutes, while the compressed scan takes milliseconds; on a
stored bank the damping grid costs a second pass over the rows.  An interactive caller (the app) shows the
first answer and runs this work in a background thread; every other caller gets the exact answer at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import distributed

if TYPE_CHECKING:
    from .methods.base import Prepared
    from .results import QueryResult

# the session's logger, as before these methods moved here: a filter or handler set on it still sees their failures
log = logging.getLogger("engine.attribution.session")


class SessionDeferredWork:
    """The deferred exact re-ranks and damping grids of ``AttributionSession`` (see the module)."""

    def fill_grids(self, result: QueryResult, should_stop: Callable[[], bool] | None = None) -> list[str]:
        """The work deferred from the first answer: each method's deferred exact scores (``fill_exact``),
        then the damping grid of every method whose first answer was one exact pass (K-FAC on a
        stored bank: ``EigenbasisQuery.grid_first=False``), so that later damping changes are lookups.

        Run it in a background thread while the answer is on screen (the app does; a ``rescore`` meanwhile
        waits for a grid pass).  Returns the methods whose work ran; one failure is logged, the rest run."""
        try:
            done = self.fill_exact(result, should_stop)
        except Exception:  # noqa: BLE001 - it stays pending (the app says the re-rank stopped); grids still fill
            log.exception("the exact re-rank failed")
            done = []
        for name, prep in (result.prepared or {}).items():
            query = getattr(prep, "query", None)
            res = result.methods.get(name)
            if query is None or getattr(query, "grid_first", True) or res is None or res.status != "ok":
                continue  # grid-first rows (streamed: a gradient pass) already have theirs, or never will
            try:
                if query.fill_grid() and name not in done:
                    done.append(name)
            except Exception:  # noqa: BLE001 - the next damping change scores exactly instead
                log.exception("filling the damping grid of %s failed", name)
        return done

    def fill_exact(self, result: QueryResult, should_stop: Callable[[], bool] | None = None) -> list[str]:
        """Run the exact work deferred from ``result``'s first answer (the compressed bank's re-rank, when
        the query deferred it: ``query(defer_exact=True)``); returns the methods whose work ran.  A call
        while another thread runs the same work waits for it.  ``should_stop`` is asked between batches
        of this call's own work; True stops it (it stays pending; the app's worker stops when a newer
        query is waiting)."""
        done = []
        for name, prep in (result.prepared or {}).items():
            fill = getattr(getattr(prep, "query", None), "fill_exact", None)
            res = result.methods.get(name)
            if fill is not None and res is not None and res.status == "ok" and fill(should_stop):
                done.append(name)
        return done

    def _defer_exact_work(self, prep: Prepared, defer: bool) -> None:
        """Let a prepared query defer the work that makes its scores exact, when the call asks for it.

        Why: on a compressed bank the exact re-rank costs 2C x M fresh gradient rows, seconds to minutes,
        while the compressed scan takes milliseconds; an interactive caller (the app) shows the scan's
        answer first and runs ``fill_exact`` in the background.  Never under torchrun (the re-rank's
        candidate merge is a collective every rank must enter from its own query).
        """
        query = getattr(prep, "query", None)
        if hasattr(query, "defer_exact"):
            query.defer_exact = bool(defer) and distributed.current().world == 1


__all__ = ["SessionDeferredWork"]
