"""The last few query results of this server, shared by its browser tabs.

Why: a result's expensive parts (the query gradients, and on a compressed bank the exact re-rank of
its candidates, minutes on a CPU) depend on the model, the query, the measurement and the Monte
Carlo samples, not on the tab that asked.  Each tab kept its own, so every new visitor, whose page
opens on gallery sample 0, re-ranked that sample again, and a second tab waited behind a re-rank the
server had already done (browser QA: 6 min of CPU).  A few results are enough for that case; each
holds its prepared queries (the rotated query gradients: P floats per method on K-FAC), so the
number is small.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

RECENT_RESULTS = 4  # results kept for the other tabs (each holds a few query-sized vectors)


class RecentResults:
    """A thread-safe least-recently-used map: result key (``results_view.result_base``) -> raw result."""

    def __init__(self, capacity: int = RECENT_RESULTS) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
