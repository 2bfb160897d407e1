"""explorer.shared_results: the results the tabs of one server share."""

from __future__ import annotations

from explorer.shared_results import RecentResults


def test_recent_results_keep_the_last_few_used():
    r = RecentResults(capacity=2)
    r.put("a", 1)
    r.put("b", 2)
    assert r.get("a") == 1  # a is now the most recently used
    r.put("c", 3)
    assert (r.get("a"), r.get("b"), r.get("c")) == (1, None, 3)
