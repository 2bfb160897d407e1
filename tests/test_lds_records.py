"""The two LDS records, an LDS run's (lds_report.build_record) and an ablation's (lds_ablation.run_ablation), state
what they were scored against with one function (lds_report.run_identity) and read a damping sweep with one
(lds.sweep_points, lds.best_sweep_point): lds_best.check_comparable compares the two (QA 31b #6)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine.config import PRESETS, AttributionConfig
from engine.evaluation import lds_ablation
from engine.evaluation.lds import LDSConfig, best_sweep_point, lds_table, predicted_matrix, sweep_points
from engine.evaluation.lds_best import check_comparable, update_best_settings
from engine.evaluation.lds_report import build_record
from engine.evaluation.lds_run import _rows_score_fn
from engine.evaluation.runs import MeasureSpec
from engine.evaluation.setup import RunSetup
from engine.paths import REPO_ROOT

RESULTS = REPO_ROOT / "assets" / "results"
N, K, Q = 40, 8, 4


def _entry(lds, damping=None):
    return {"lds": lds, "ci95": [lds - 0.1, lds + 0.1], "sem": 0.05, "per_query": [lds] * 3}


def test_a_sweep_is_read_by_damping_and_its_best_is_the_highest_finite_lds():
    table = {"kfac": _entry(0.3), "kfac@0.01": _entry(0.2), "kfac@1e-06": _entry(0.5), "kfac@0.0001": _entry(0.5),
             "kfac@1": _entry(float("nan")), "kfac[loss]@1e-06": _entry(0.9), "trak@1e-06": _entry(0.9)}
    pts = sweep_points(table, "kfac")
    assert [p["damping"] for p in pts] == [1e-6, 1e-4, 1e-2, 1.0]  # by damping; not kfac[loss]'s nor trak's
    assert set(pts[0]) == {"damping", "lds", "ci95", "sem", "per_query"}
    assert best_sweep_point(pts)["damping"] == 1e-6  # a tie: the smallest damping
    assert best_sweep_point([p for p in pts if p["damping"] == 1.0]) is None and best_sweep_point([]) is None
    assert sweep_points(table, "clip") == []


@pytest.fixture
def records(tmp_path, monkeypatch):
    """An LDS run's record and an ablation's, from the same scores, subsets and measurements (no model: the
    ablation's sessions and scores are stand-ins)."""
    rng = np.random.default_rng(0)
    masks = rng.random((K, N)) < 0.5
    per_seed = rng.normal(size=(2, Q, K))
    rows = [{name: rng.normal(size=N) for name in ("kfac", "kfac@1e-06", "kfac@0.0001", "kfac@0.01")}
            for _ in range(Q)]
    info = {"kfac": {"damping": 1e-4, "kind": "influence", "measurement": "loss", "status": "ok"}}
    setup = RunSetup(PRESETS["digits"], tmp_path / "ckpt", list(range(N)), tmp_path / "out", tmp_path / "results",
                     "cpu", False)
    session = SimpleNamespace(config=AttributionConfig(), checkpoint_hash="0123")
    spec = MeasureSpec(mc_samples=8)
    measured = np.nanmean(per_seed, axis=0)
    table = lds_table(predicted_matrix(_rows_score_fn(rows, sorted(rows[0])), masks, Q), measured)
    run = build_record(setup, LDSConfig(subsets=K, seeds=2), spec, "gallery.npz images 0..3", session, masks,
                       per_seed, table, info)
    monkeypatch.setattr(lds_ablation, "variant_session", lambda *a, **k: (session, tmp_path / "cache"))
    monkeypatch.setattr(lds_ablation, "session_scores", lambda *a, **k: (rows, info))
    ablation = lds_ablation.run_ablation(setup, "kfac_blocks", masks, per_seed, torch.zeros(Q, 1, 8, 8), spec,
                                         "gallery.npz images 0..3 (from q.pt)", tmp_path / "cache", None,
                                         log=lambda _: None)
    return json.loads(json.dumps(run)), json.loads(json.dumps(ablation))


def test_the_run_and_its_ablation_state_one_identity_and_read_sweeps_alike(records):
    run, ablation = records
    check_comparable(run["config"], ablation["config"], "kfac_blocks")  # what lds-best compares
    shared = {"preset", "checkpoint", "num_train", "subsets", "subsets_with_models", "seeds", "queries",
              "targets_digest", "measurement", "true_measurement_mc_samples", "true_measurement_seed"}
    assert {k: run["config"][k] for k in shared} == {k: ablation["config"][k] for k in shared}
    assert (run["config"]["seeds"], run["config"]["queries"]) == (2, Q)
    for variant in ablation["variants"].values():
        kfac = variant["methods"]["kfac"]
        # the same sweep, point for point, with the same fields (the ablation's lacked "sem")
        assert kfac["sweep"] == run["sweeps"]["kfac"]
        assert kfac["best"]["damping"] == run["methods"]["kfac"]["best_damping"]
        assert kfac["best"]["lds"] == run["methods"]["kfac"]["best_lds"]


def test_the_records_keep_every_key_of_the_shipped_ones(records):
    run, ablation = records
    for path in sorted(RESULTS.glob("lds_*.json")):
        shipped = json.loads(path.read_text())
        mine = ablation if "ablation" in shipped else run
        assert set(shipped["config"]) <= set(mine["config"]), (path.name, set(shipped["config"]) - set(mine["config"]))
        if "ablation" not in shipped:
            assert set(shipped["methods"]["kfac"]) <= set(mine["methods"]["kfac"]), path.name


def test_the_run_and_its_ablation_name_the_code_that_made_them(records):
    """QA 31b #2: the ablation records (which lds-best turns into the shipped best settings) named no code."""
    from engine.code_version import code_version

    run, ablation = records
    assert run["config"]["code"] == ablation["config"]["code"] == code_version()


def test_lds_best_still_accepts_the_shipped_records():
    """The shipped best settings were chosen over these ablations; check_comparable must accept the same ones
    (and skip the others, scored on other seeds or queries) from the files as shipped."""
    run = json.loads((RESULTS / "lds_digits_loss.json").read_text())
    _, summary, notes = update_best_settings(RESULTS, "digits", "loss", write=False)
    assert summary["ablation_files"] == run["best_settings"]["ablation_files"]
    for rec in summary["ablation_files"]:
        check_comparable(run["config"], json.loads((RESULTS / rec).read_text())["config"], rec)
    assert all(n.startswith("skipped lds_digits_ablation_") for n in notes)
    assert "code" not in json.loads((RESULTS / "lds_digits_ablation_trak_dim.json").read_text())["config"]  # older
