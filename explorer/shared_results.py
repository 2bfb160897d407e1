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
# A server stays up for days and every visitor adds to what it keeps (QA round 18: generated samples and
# the Groups page's matrices were never evicted), so each per-server store is bounded:
GENERATED_KEPT = 64  # generated samples with their trajectories (0.25-0.3 MB each on digits / mnist)
GROUP_MATRICES_KEPT = 48  # the Groups page's (Q, N) matrices per query set, measurement, method and damping
GROUP_POOLS_KEPT = 4  # drawn pools of samples with trajectories (a pool of 256 holds ~64 MB on digits)
QUERY_GRADIENTS_KEPT = 2  # a query set's gradients per measurement (Q x P floats: 36 MB for digits' 32)


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

    # the mapping's own spelling, for the server's other bounded stores (generated samples, group matrices)
    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def __getitem__(self, key: Hashable) -> Any:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: Hashable, value: Any) -> None:
        self.put(key, value)

    def values(self) -> list[Any]:
        with self._lock:
            return list(self._items.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
