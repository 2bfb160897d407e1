"""The query-dependence diagnostic (issue 16): overlap, correlation and distinct top-k on constructed scores."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def qd(load_script):
    return load_script("query_dependence")


def test_query_independent_scores_share_one_top_set(qd):
    base = np.random.default_rng(0).normal(size=50)
    scores = np.stack([base * a for a in (1.0, 2.0, 0.5)])  # same ranking, different scale
    d = qd.dependence(scores, top=5)
    assert d["top_overlap"] == 1.0
    assert d["pearson"] == pytest.approx(1.0)
    assert d["distinct"] == 5


def test_disjoint_top_sets(qd):
    scores = np.zeros((3, 30))
    for q in range(3):
        scores[q, q * 10 : q * 10 + 5] = 1.0 + np.arange(5)  # query q's top-5 are its own five images
    d = qd.dependence(scores, top=5)
    assert d["top_overlap"] == 0.0
    assert d["distinct"] == 15
    assert d["pearson"] < 0


def test_needs_two_queries(qd):
    with pytest.raises(ValueError, match="two queries"):
        qd.dependence(np.ones((1, 4)), top=2)
