"""The compressed bank's LDS per variant (engine.bench.compressed.variant_lds): all subset models, or
a preliminary figure on the ones trained so far, with engine.evaluation.lds's statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import engine.evaluation.lds as lds_mod
import engine.evaluation.runs as runs_mod
from engine.bench.compressed import variant_lds
from engine.evaluation.lds import make_subsets, predicted_matrix
from engine.evaluation.stats import lds_score


def _run(tmp_path, monkeypatch, finished: int, k: int = 8, q: int = 3, n: int = 20):
    masks = make_subsets(n, k, 0.5, 0)
    np.savez(tmp_path / "subsets.npz", masks=masks)
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(1, q, k))
    done = set(range(finished))
    monkeypatch.setattr(runs_mod, "is_finished", lambda folder: int(folder.name[1:4]) in done)

    def measured(out, masks_, seeds, queries, spec, levels, **kw):
        vals = truth.copy()
        vals[:, :, finished:] = np.nan  # what measured_matrix gives for models not trained yet
        return vals

    monkeypatch.setattr(lds_mod, "measured_matrix", measured)
    scores = {"full": [rng.normal(size=n) for _ in range(q)], "gaussian@32": [rng.normal(size=n) for _ in range(q)]}
    queries = [torch.zeros(1, 4, 4) for _ in range(q)]

    class DS:
        levels = 17

    return masks, truth, scores, queries, DS()


def test_all_models_needed_unless_partial(tmp_path, monkeypatch):
    masks, truth, scores, queries, ds = _run(tmp_path, monkeypatch, finished=5)
    assert variant_lds(scores, tmp_path, queries, ds, log=lambda s: None) is None
    per_query: dict = {}
    got = variant_lds(scores, tmp_path, queries, ds, log=lambda s: None, partial=True, per_query=per_query)
    assert got["subsets"] == 5
    pred = predicted_matrix(lambda i: {k: v[i] for k, v in scores.items()}, masks, len(queries))
    for name in scores:  # the statistic on the finished subsets only
        want = lds_score(pred[name][:, :5], truth[0][:, :5]).to_dict()
        assert got[name] == pytest.approx(want["lds"], rel=1e-12)
        assert per_query[name] == pytest.approx(want["per_query"])  # for paired differences between entries


def test_partial_needs_three_models_and_full_runs_use_every_subset(tmp_path, monkeypatch):
    _, _, scores, queries, ds = _run(tmp_path, monkeypatch, finished=2)
    assert variant_lds(scores, tmp_path, queries, ds, log=lambda s: None, partial=True) is None
    every = tmp_path / "every"
    every.mkdir()
    masks, truth, scores, queries, ds = _run(every, monkeypatch, finished=8)
    got = variant_lds(scores, every, queries, ds, log=lambda s: None)
    pred = predicted_matrix(lambda i: {k: v[i] for k, v in scores.items()}, masks, len(queries))
    assert got["subsets"] == 8
    assert got["full"] == pytest.approx(lds_score(pred["full"], truth[0]).to_dict()["lds"], rel=1e-12)
