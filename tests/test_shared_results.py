"""explorer.shared_results: the results the tabs of one server share."""

from __future__ import annotations

import pytest

from explorer.shared_results import RecentResults


def test_recent_results_keep_the_last_few_used():
    r = RecentResults(capacity=2)
    r.put("a", 1)
    r.put("b", 2)
    assert r.get("a") == 1  # a is now the most recently used
    r.put("c", 3)
    assert (r.get("a"), r.get("b"), r.get("c")) == (1, None, 3)


def test_the_servers_per_visitor_stores_are_bounded():
    """QA round 18: a long-lived server kept every generated sample (0.25-0.3 MB each with its trajectory) and
    every Groups matrix and pool any visitor asked for. Each store is now a bounded LRU map, used as a mapping."""
    import dataclasses

    from explorer.runtime import Handle
    from explorer.shared_results import GENERATED_KEPT

    (field,) = [f for f in dataclasses.fields(Handle) if f.name == "generated"]
    generated = field.default_factory()
    for seed in range(GENERATED_KEPT + 5):
        generated[seed] = f"sample {seed}"
    assert len(generated) == GENERATED_KEPT
    assert 0 not in generated and generated[GENERATED_KEPT + 4] == f"sample {GENERATED_KEPT + 4}"
    with pytest.raises(KeyError):
        generated[0]  # evicted
    assert generated.values()[-1] == f"sample {GENERATED_KEPT + 4}"
