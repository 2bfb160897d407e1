"""The two evaluations (paper section 4): LDS arithmetic, subsets, resumable retraining,
cached true measurements, the quick CLI pipeline and retraining without top influences."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from engine import folder_lock
from engine.evaluation.lds import (
    LDSConfig,
    SubsetMismatchError,
    lds_table,
    load_or_make_subsets,
    make_subsets,
    measured_matrix,
    model_folder,
    predicted_matrix,
    subset_steps,
    train_subsets,
)
from engine.evaluation.report import load_lds_results
from engine.evaluation.runs import MeasureSpec, cached_measurements, common_draws, measure_queries
from engine.evaluation.stats import bootstrap_ci, group_predictions, lds_score, spearman
from engine.model.measurements import measure
from engine.validation import InvalidSettingError

# --- arithmetic with known answers -------------------------------------------------------


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=40).astype(float)  # many ties
    b = a + rng.normal(size=40)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))


def test_lds_is_one_for_monotone_and_minus_one_for_reversed():
    rng = np.random.default_rng(1)
    pred = rng.normal(size=(6, 20))
    monotone = np.exp(3 * pred) + 7.0  # strictly increasing transform, different per value scale
    res = lds_score(pred, monotone)
    assert res.lds == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in res.per_query)
    assert lds_score(pred, -(pred**3)).lds == pytest.approx(-1.0)


def test_bootstrap_interval_contains_mean_and_shrinks_with_agreement():
    rng = np.random.default_rng(2)
    vals = rng.normal(0.3, 0.2, size=50)
    lo, hi = bootstrap_ci(vals)
    assert lo < vals.mean() < hi
    lo2, hi2 = bootstrap_ci(np.full(50, 0.3) + rng.normal(0, 0.01, size=50))
    assert hi2 - lo2 < (hi - lo) / 5


def test_group_prediction_sums_scores_of_removed_examples():
    scores = np.array([1.0, 2.0, 4.0, 8.0])
    masks = np.array([[True, False, True, False], [False, False, False, True]])
    np.testing.assert_allclose(group_predictions(scores, masks), [2.0 + 8.0, 1.0 + 2.0 + 4.0])


def test_lds_table_ranks_a_true_linear_datamodel_above_noise():
    """Measured values from an exact additive model of removal: its tau gets LDS ~ 1, random scores ~ 0."""
    rng = np.random.default_rng(3)
    n, k, q = 200, 40, 8
    masks = make_subsets(n, k, 0.5, seed=0)
    tau = rng.normal(size=(q, n))
    measured = np.stack([5.0 + group_predictions(tau[i], masks) for i in range(q)])
    fns = {"true": lambda i: tau[i], "random": lambda i: rng.normal(size=n), "negated": lambda i: -tau[i]}
    predicted = predicted_matrix(lambda i: {name: f(i) for name, f in fns.items()}, masks, q)
    table = lds_table(predicted, measured)
    assert table["true"]["lds"] == pytest.approx(1.0)
    assert table["negated"]["lds"] == pytest.approx(-1.0)
    assert abs(table["random"]["lds"]) < 0.3
    lo, hi = table["random"]["ci95"]
    assert lo <= table["random"]["lds"] <= hi


# --- subsets -----------------------------------------------------------------------------


def test_subsets_have_the_right_size_are_seeded_and_extend(digits_small, tmp_path):
    m = make_subsets(64, 5, 0.5, seed=3)
    assert m.shape == (5, 64) and (m.sum(1) == 32).all()
    assert len({row.tobytes() for row in m}) == 5
    np.testing.assert_array_equal(make_subsets(64, 8, 0.5, seed=3)[:5], m)
    assert not np.array_equal(make_subsets(64, 5, 0.5, seed=4), m)
    cfg = LDSConfig(subsets=3, fraction=0.5, subset_seed=3)
    saved = load_or_make_subsets(tmp_path, digits_small, cfg)
    np.testing.assert_array_equal(saved, m[:3])
    # more subsets later: the old ones are kept
    np.testing.assert_array_equal(load_or_make_subsets(tmp_path, digits_small, LDSConfig(5, 1, 0.5, 3)), m)
    with pytest.raises(SubsetMismatchError):
        load_or_make_subsets(tmp_path, digits_small, LDSConfig(5, 1, 0.25, 3))
    with pytest.raises(SubsetMismatchError):
        load_or_make_subsets(tmp_path, digits_small.subset(list(range(60))), cfg)
    assert subset_steps(32_000, 0.5) == 16_000


# --- resumable training and cached measurements ---------------------------------------


@pytest.mark.slow
def test_subset_training_resumes_and_skips_finished(tiny_preset, digits_small, tmp_path):
    from engine.model.train import train

    preset = tiny_preset.replace(train={"steps": 24, "checkpoint_every": 10})
    cfg = LDSConfig(subsets=2, seeds=1, fraction=0.5, subset_seed=0)
    masks = load_or_make_subsets(tmp_path, digits_small, cfg)
    # a "killed" run: model k001 stopped after its step-10 checkpoint
    f1 = model_folder(tmp_path, 1, 0)

    class Stop(Exception):
        pass

    def stop_at(step, total, loss):
        if step == 11:
            raise Stop

    with pytest.raises(Stop):
        train(preset, f1, dataset=digits_small, indices=np.flatnonzero(masks[1]), progress=stop_at, steps=12)
    assert (f1 / "train_state.pt").is_file() and not (f1 / "model.safetensors").is_file()

    logs: list[str] = []
    train_subsets(
        preset, tmp_path, cfg, digits_small, workers=1, pass_dataset=True, progress=False, log=logs.append
    )
    # QA 48 #8: the steps a resumed model kept, in words (they showed only as the bar's starting count)
    assert "2 models: 0 finished before, 1 resumed at step 10 of 12, 1 to train" in logs[0], logs[0]
    for k in range(2):
        f = model_folder(tmp_path, k, 0)
        assert (f / "model.safetensors").is_file() and not (f / "train_state.pt").is_file()
        assert json.loads((f / "config.json").read_text())["extra"]["steps"] == subset_steps(24, 0.5)
    stamp = os.stat(model_folder(tmp_path, 0, 0) / "model.safetensors").st_mtime_ns
    logs.clear()
    train_subsets(
        preset, tmp_path, cfg, digits_small, workers=1, pass_dataset=True, progress=False, log=logs.append
    )
    assert "2 finished before, 0 to train" in logs[0]
    assert os.stat(model_folder(tmp_path, 0, 0) / "model.safetensors").st_mtime_ns == stamp

    # true measurements: common draws, cached beside each model, NaN where no model
    queries = digits_small.images[:2]
    spec = MeasureSpec("loss", mc_samples=16, seed=7, batch=5)
    vals = measured_matrix(
        tmp_path, np.vstack([masks, masks[:1]]), 1, queries, spec, 17, progress=False, workers=1
    )
    assert vals.shape == (1, 2, 3) and np.isfinite(vals[0, :, :2]).all() and np.isnan(vals[0, :, 2]).all()
    from engine.model.checkpoint import load_checkpoint
    from engine.model.diffusion import Diffusion

    model, p, _ = load_checkpoint(model_folder(tmp_path, 0, 0))
    draws = common_draws(spec, (1, 8, 8), 1000)
    with torch.no_grad():
        direct = float(measure("loss", model, Diffusion(p.diffusion), queries[1:2], draws))
    assert vals[0, 1, 0] == pytest.approx(direct, rel=1e-5)
    # the cache is what a second call returns
    cache = next((model_folder(tmp_path, 0, 0) / "measurements").glob("*.json"))
    rec = json.loads(cache.read_text())
    rec["values"] = [123.0, 456.0]
    cache.write_text(json.dumps(rec))
    again = cached_measurements(model_folder(tmp_path, 0, 0), queries, spec, 17)
    np.testing.assert_allclose(again, [123.0, 456.0])


def test_measure_queries_chunks_give_the_mean_over_all_draws(tiny_preset, tiny_model, digits_small):
    q = digits_small.images[:2]
    a = measure_queries(tiny_model, tiny_preset, q, MeasureSpec("elbo", 12, seed=1, batch=5), 17)
    b = measure_queries(tiny_model, tiny_preset, q, MeasureSpec("elbo", 12, seed=1, batch=12), 17)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    c = measure_queries(tiny_model, tiny_preset, q, MeasureSpec("elbo", 12, seed=2, batch=12), 17)
    assert not np.allclose(a, c)


# --- the quick CLI end to end (methods replaced by a fake session) ---------------------


class FakeSession:
    """Stands in for AttributionSession: pixel-distance "influence" scores, no caches."""

    def __init__(self, preset, checkpoint, device, cache_root, config, dataset, auto_build):
        self.checkpoint_hash = "fake"
        self.config = config
        self.dataset = dataset

    def method_names(self):
        from engine.attribution.methods import method_names

        return method_names()

    def method(self, name):
        from engine.attribution.methods import METHODS

        return METHODS[name]  # the class: it describes itself (in_sweeps, lds_loss_variant, ...)

    def available(self, name):
        return (True, None) if name in ("kfac", "pixel", "trak") else (False, "not in the fake")

    def query(self, query, measurement, methods):
        from engine.attribution.results import MethodResult, QueryResult

        x = self.dataset.images.flatten(1)
        d = ((x - query.image.flatten()[None]) ** 2).mean(1).numpy()
        out = {}
        for name in methods:
            s = {"kfac": -d, "pixel": -d, "trak": d}.get(name)
            if s is None:
                out[name] = MethodResult(name, name, "influence", "", "unavailable", reason="not in the fake")
            else:
                kind = "similarity" if name == "pixel" else "influence"
                out[name] = MethodResult(
                    name, name, kind, "", "ok", damping=1e-8, scores=s.astype(np.float32)
                )
        return QueryResult(query={}, measurement=measurement, methods=out)

    def rescore(self, result, damping):
        import copy

        res = copy.deepcopy(result)
        for name, d in damping.items():
            res.methods[name].scores = res.methods[name].scores * (1.0 + d)  # same ranking
            res.methods[name].damping = d
        return res


@pytest.mark.slow
def test_quick_cli_end_to_end(tmp_path, monkeypatch, capsys):
    import engine.attribution.session
    from engine.cli.evaluate import main

    monkeypatch.setattr(engine.attribution.session, "AttributionSession", FakeSession)
    out = tmp_path / "run"
    argv = ["lds", "--quick", "--out", str(out), "--queries", "2", "--mc-samples", "8", "--device", "cpu"]
    assert main([*argv, "--train-only"]) == 0
    assert len(list((out / "models").glob("k*_r0/model.safetensors"))) == 4
    assert main([*argv, "--methods", "kfac,trak,pixel,dtrak"]) == 0
    rec = json.loads((out / "results" / "lds_quick_loss.json").read_text())
    assert set(rec["methods"]) == {"kfac", "trak", "pixel"}  # dtrak unavailable in the fake
    for name in ("kfac", "trak"):
        m = rec["methods"][name]
        assert -1.0 <= m["lds"] <= 1.0 and m["ci95"][0] <= m["lds"] <= m["ci95"][1]
    assert rec["methods"]["kfac"]["lds"] == pytest.approx(-rec["methods"]["trak"]["lds"])
    assert rec["methods"]["pixel"]["removal_prediction"] is False
    assert len(rec["sweeps"]["kfac"]) == 14
    # every sweep point keeps its per-query values, so lds-best can hold out the choice of damping too
    assert all(len(pt["per_query"]) == 2 for pts in rec["sweeps"].values() for pt in pts)
    assert rec["config"]["subsets_with_models"] == 4 and rec["config"]["subset_steps"] == 30
    assert (out / "results" / "lds_quick_loss.png").stat().st_size > 1000
    assert load_lds_results(out / "results")[0]["file"] == "lds_quick_loss.json"
    # a rerun reuses every model and every cached measurement / score
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if "results" not in p.parts}
    assert main([*argv, "--methods", "kfac,trak,pixel,dtrak"]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # a live trainer on the folder (its lock held here, as another job of this process would): training is
    # refused, evaluating finished models is not
    capsys.readouterr()
    with folder_lock.exclusive(out / folder_lock.RUN_LOCK):
        assert main([*argv, "--train-only"]) == 2  # TrainingBusyError as one "error:" line (issue 14)
        assert capsys.readouterr().err.startswith("error: another job of this process is training into ")
        assert main([*argv, "--methods", "kfac,trak,pixel", "--no-train"]) == 0
    # a variant with another attribution M writes its own file, never over the headline one
    headline = (out / "results" / "lds_quick_loss.json").read_bytes()
    assert main([*argv, "--methods", "kfac,trak,pixel", "--no-train", "--attribution-mc", "4"]) == 0
    assert (out / "results" / "lds_quick_loss.json").read_bytes() == headline
    variant = json.loads((out / "results" / "lds_quick_loss_attribution_m4.json").read_text())
    assert variant["config"]["attribution"]["mc_samples"] == 4
    # other settings in the same folder are refused
    capsys.readouterr()
    assert main([*argv, "--fraction", "0.25", "--train-only"]) == 2  # SubsetMismatchError, one line
    assert "subsets.npz" in capsys.readouterr().err


# --- retraining without top influences ----------------------------------------------------


@pytest.mark.slow
def test_retrain_job_removes_top_proponents_and_caches(tiny_preset, digits_small, tmp_path):
    from engine.attribution.methods.base import QueryInput
    from engine.evaluation.retrain_top import RetrainJob, random_control, removal_count, top_proponents
    from engine.model.train import train

    preset = tiny_preset.replace(train={"steps": 8, "checkpoint_every": 100})
    ckpt = train(preset, tmp_path / "full", dataset=digits_small, progress=False)
    fake = FakeSession(preset, ckpt, "cpu", None, None, digits_small, False)
    session = SimpleNamespace(
        preset=preset,
        dataset=digits_small,
        checkpoint=Path(ckpt),
        checkpoint_hash="h",
        device="cpu",
        query=fake.query,
        config=preset.attribution,
    )
    q = QueryInput(image=digits_small.images[5], description="train:5")
    job = RetrainJob.start(session, q, "loss", "kfac", 0.05, tmp_path / "rt", mc_samples=8)
    assert job.wait(120) and job.done()
    r = job.result()
    k = removal_count(64, 0.05)
    assert k == 3 and len(r["removed"]) == k
    scores = fake.query(q, "loss", ["kfac"]).methods["kfac"].scores
    assert r["removed"][0] == 5  # the query itself is its nearest (top) proponent in the fake
    np.testing.assert_array_equal(r["removed"], top_proponents(scores, k))
    assert r["predicted_change"] == pytest.approx(float(scores[r["removed"]].sum()), rel=1e-6)
    assert np.isfinite(r["measured_change"]) and np.isfinite(r["random_measured_change"])
    assert r["measured_change"] == pytest.approx(r["retrained_measurement"] - r["full_measurement"])
    assert job.progress()[1] == 1.0
    # the same request again: cached, no thread, no training
    again = RetrainJob.start(session, q, "loss", "kfac", 0.05, tmp_path / "rt", mc_samples=8)
    assert again.done() and again._thread is None and again.result() == r
    # the random control is shared by another method with the same fraction
    other = RetrainJob.start(
        session, q, "loss", "trak", 0.05, tmp_path / "rt", mc_samples=8, background=False
    )
    assert other.plan.control_folder == job.plan.control_folder
    assert other.result()["random_measured_change"] == pytest.approx(r["random_measured_change"])
    assert set(random_control(64, k)) != set(r["removed"])
    assert top_proponents(np.array([1.0, 3.0, 3.0, 0.0]), 2).tolist() == [1, 2]


def test_retrain_plan_is_keyed_by_the_attribution_settings_that_chose_the_removal(tiny_preset, digits_small, tmp_path):
    """A removal chosen with another damping or other query draws is another experiment: its folder (the
    cached removal, model and result) must differ, while the random control, which no method chose, is shared."""
    import dataclasses

    from engine.evaluation.retrain_top import plan

    def session(**changes):
        cfg = dataclasses.replace(tiny_preset.attribution, **changes)
        return SimpleNamespace(preset=tiny_preset, dataset=digits_small, checkpoint_hash="h", config=cfg)

    image = digits_small.images[3]
    base = plan(session(), image, "loss", "kfac", 0.05, tmp_path)
    assert plan(session(), image, "loss", "kfac", 0.05, tmp_path).folder == base.folder
    for changes in ({"kfac_damping": 1e-4}, {"draws": "shared", "query_draws": "bank"}, {"mc_samples": 3}):
        other = plan(session(**changes), image, "loss", "kfac", 0.05, tmp_path)
        assert other.folder != base.folder and other.control_folder == base.control_folder


def test_retrain_plan_measures_other_draws_on_the_same_models(tiny_preset, digits_small, tmp_path):
    """The true measurement's draws choose no removal and train no model: another --mc-samples keeps the
    job's folder (removal, models) and gets a result file of its own. It was part of the folder's key, so
    it retrained both models (QA 15). A folder of that older key is moved to the new one, its result with it."""
    from engine.evaluation.retrain_top import _key, attribution_settings, plan, query_digest

    s = SimpleNamespace(preset=tiny_preset, dataset=digits_small, checkpoint_hash="h", config=tiny_preset.attribution)
    image = digits_small.images[3]
    base = plan(s, image, "loss", "kfac", 0.05, tmp_path / "a", mc_samples=1024)
    more = plan(s, image, "loss", "kfac", 0.05, tmp_path / "a", mc_samples=4096)
    assert more.folder == base.folder and more.control_folder == base.control_folder
    assert more.result_file != base.result_file and more.result_file.parent == base.folder
    assert more.spec.mc_samples == 4096

    # a run folder written before the change: the key held (..., steps, mc_samples, seed, settings)
    steps = tiny_preset.train.steps
    removal = ("h", query_digest(image), "loss", "kfac", 0.05, steps)
    legacy = tmp_path / "b" / _key(*removal, 256, base.spec.seed, attribution_settings(s))
    (legacy / "model").mkdir(parents=True)
    (legacy / "removed.npz").write_bytes(b"removal")
    (legacy / "result.json").write_text('{"mc_samples": 256}')
    adopted = plan(s, image, "loss", "kfac", 0.05, tmp_path / "b", mc_samples=256)
    assert not legacy.exists() and (adopted.folder / "model").is_dir()
    assert (adopted.folder / "removed.npz").read_bytes() == b"removal"
    assert json.loads(adopted.result_file.read_text()) == {"mc_samples": 256}
    # other draws on the adopted folder: same models, no result yet
    other = plan(s, image, "loss", "kfac", 0.05, tmp_path / "b", mc_samples=1024)
    assert other.folder == adopted.folder and not other.result_file.exists()


@pytest.mark.slow
def test_measuring_in_spawned_workers_equals_in_process(tiny_preset, digits_small, tmp_path):
    """Two spawned measuring processes give the in-process values (each model measured once)."""
    preset = tiny_preset.replace(train={"steps": 24})
    cfg = LDSConfig(subsets=2, seeds=1, fraction=0.5, subset_seed=0)
    masks = train_subsets(preset, tmp_path, cfg, digits_small, workers=1, pass_dataset=True, progress=False)
    spec = MeasureSpec("loss", mc_samples=16, seed=7, batch=5)
    v2 = measured_matrix(tmp_path, masks, 1, digits_small.images[:2], spec, 17, progress=False, workers=2)
    cached = list(tmp_path.glob("models/*/measurements/*.json"))
    assert len(cached) == 2 and np.isfinite(v2).all()
    for f in cached:  # measure again, in this process
        f.unlink()
    v1 = measured_matrix(tmp_path, masks, 1, digits_small.images[:2], spec, 17, progress=False, workers=1)
    assert np.allclose(v1, v2)


def test_run_setup_takes_the_requested_presets_attribution_settings(tmp_path):
    """The shipped checkpoint's config.json was written before per-example draws and factor draws
    existed; an LDS or retraining run must still score with the preset's current attribution settings
    (what the app and the CLI use), and with the checkpoint's own model."""
    from engine.config import get_preset
    from engine.evaluation.setup import resolve_setup
    from engine.model.checkpoint import read_config
    from engine.paths import default_checkpoint

    ckpt = default_checkpoint("digits")
    saved, _ = read_config(ckpt)
    setup = resolve_setup(get_preset("digits"), ckpt, "cpu", "lds", out=tmp_path / "run", results=tmp_path / "res")
    assert setup.preset.attribution == get_preset("digits").attribution
    assert setup.preset.attribution.kfac_factor_draws == 8 and setup.preset.attribution.draws == "per-example"
    assert setup.preset.model == saved.model and setup.preset.train == saved.train


def test_run_setup_says_when_the_presets_training_steps_are_not_used(tmp_path, capsys):
    """QA 24: ``lds --preset file.json`` with ``train.steps: 400`` trained 3,000-step models without a word: the
    runs train with the checkpoint's recipe. A notice says so (and, for retraining, how to train fewer steps)."""
    from engine.config import get_preset
    from engine.evaluation.setup import resolve_setup
    from engine.paths import default_checkpoint

    ckpt = default_checkpoint("digits")
    resolve_setup(get_preset("digits"), ckpt, "cpu", "lds", out=tmp_path / "run", results=tmp_path / "res")
    assert "notice" not in capsys.readouterr().err  # the shipped preset's own steps: nothing to say
    short = get_preset("digits").replace(train={"steps": 400})
    setup = resolve_setup(short, ckpt, "cpu", "lds", out=tmp_path / "run", results=tmp_path / "res")
    assert setup.preset.train.steps == 6000
    assert ("notice: lds trains with the checkpoint's recipe (6,000 steps, scaled by the subset fraction); the "
            "preset's train.steps = 400 is not used") in capsys.readouterr().err
    resolve_setup(short, ckpt, "cpu", "retrain_top", out=tmp_path / "run2", results=tmp_path / "res")
    assert "notice: retrain-top trains with the checkpoint's recipe (6,000 steps, pass --steps to train fewer)" in (
        capsys.readouterr().err)


def test_retrain_tops_notice_names_the_steps_given_by_steps(tmp_path, capsys, monkeypatch):
    """QA 37: ``retrain-top --steps 600`` said it trained with the recipe's steps (and how to train fewer), while
    it trained 600; the notice names the --steps it trains, and says nothing when the preset's are those."""
    import engine.evaluation.retrain_top_run as run_module
    from engine.cli import main
    from engine.config import get_preset

    steps_run = []
    monkeypatch.setattr(run_module, "run_retrain_top", lambda setup, cfg: steps_run.append(cfg.steps) or 0)
    preset_file = tmp_path / "short.json"
    preset_file.write_text(get_preset("digits").replace(train={"steps": 400}).to_json())
    argv = ["retrain-top", "--preset", str(preset_file), "--query", "gallery:0", "--out", str(tmp_path / "run"),
            "--results", str(tmp_path / "res"), "--device", "cpu", "--steps"]
    capsys.readouterr()
    assert main([*argv, "600"]) == 0
    err = capsys.readouterr().err
    assert ("notice: retrain-top trains 600 steps (--steps) with the checkpoint's recipe; the preset's train.steps "
            "= 400 is not used\n") in err and "6,000" not in err
    assert main([*argv, "400"]) == 0  # the preset's own steps: nothing to say
    assert "notice" not in capsys.readouterr().err
    assert steps_run == [600, 400]


def _fake_retrain_top(tiny_preset, digits_small, monkeypatch, run_training) -> tuple[Any, list[str]]:
    """retrain_top_run with a stand-in session, job and plan (no model, no gradients), and ``run_training``
    replaced: returns the module and the methods whose removal was measured."""
    import engine.attribution.session as session_module
    import engine.evaluation.retrain_top_run as rtr
    from engine.evaluation.runs import TrainTask

    measured: list[str] = []

    class Session:
        checkpoint_hash = "h"
        config = tiny_preset.attribution
        dataset = digits_small

        def __init__(self, **kwargs):
            pass

        def parse_query(self, spec):
            return SimpleNamespace(image=None, description=spec)

        def method(self, name):
            return name

        def available(self, name):
            return (False, "CLIP weights are not on this machine") if name == "clip" else (True, None)

    class Job:
        def __init__(self, session, q, measurement, method, fraction, p):
            self.plan, self.method = p, method

        def training_tasks(self):
            return [TrainTask(name=self.method, out=str(self.plan.folder / "model"), preset=tiny_preset, steps=1)]

        def removal(self):
            return np.array([1, 2]), np.zeros(64), "influence"

        def measure(self, removed, scores, kind):
            measured.append(self.method)
            return {"method": self.method, "measured_change": 0.1, "random_measured_change": 0.0,
                    "predicted_change": 0.2}

    def plan(session, image, measurement, method, fraction, out, mc, steps, same_steps_reference=False):
        return SimpleNamespace(folder=Path(out) / method, result_file=Path(out) / method / "result.json")

    monkeypatch.setattr(session_module, "AttributionSession", Session)
    monkeypatch.setattr(rtr, "RetrainJob", Job)
    monkeypatch.setattr(rtr, "plan", plan)
    monkeypatch.setattr(rtr, "run_training", run_training)
    return rtr, measured


def test_retrain_top_no_train_measures_finished_models_and_refuses_to_train_missing_ones(
    tiny_preset, digits_small, tmp_path, monkeypatch
):
    """``retrain-top --no-train``: the queries whose models another (running) process has finished are
    measured; a query with a model still missing stops the run before anything is trained."""
    from engine.evaluation.setup import RunSetup
    from engine.model.checkpoint import CONFIG, WEIGHTS

    trained = []
    rtr, measured = _fake_retrain_top(tiny_preset, digits_small, monkeypatch, lambda tasks, **kw: trained.extend(tasks))
    setup = RunSetup(tiny_preset, tmp_path / "ckpt", digits_small, tmp_path / "out", tmp_path / "results", "cpu", False)
    done = tmp_path / "out" / "kfac" / "model"
    done.mkdir(parents=True)
    (done / CONFIG).write_text("{}")
    (done / WEIGHTS).write_bytes(b"w")  # finished: config, weights and no train_state.pt
    cfg = rtr.RetrainTopConfig(queries=("gallery:0",), methods=("kfac", "trak"), train=False)
    with pytest.raises(ValueError, match="1 model"):  # trak's model is missing
        rtr.run_retrain_top(setup, cfg)
    assert trained == [] and measured == []
    rtr.run_retrain_top(setup, rtr.RetrainTopConfig(queries=("gallery:0",), methods=("kfac",), train=False))
    assert trained == [] and measured == ["kfac"]
    record = json.loads((tmp_path / "results" / f"retrain_top_{tiny_preset.name}.json").read_text())
    assert [r["method"] for r in record["results"]] == ["kfac"]
    # without --no-train the same call trains what is missing (another method set: it replaces the kfac-only
    # record only when told, QA 48 #1)
    rtr.run_retrain_top(setup, rtr.RetrainTopConfig(queries=("gallery:0",), methods=("kfac", "trak"),
                                                    replace_results=True))
    assert [t.name for t in trained] == ["kfac", "trak"]


def test_retrain_top_trains_its_models_on_the_runs_device(tiny_preset, digits_small, tmp_path, monkeypatch):
    """``retrain-top --device cuda`` trained the removal models on the CPU: ``run_training`` was called
    without ``device`` (its default is "cpu"), while the session and the app's RetrainJob used the GPU."""
    from engine.evaluation.setup import RunSetup

    devices = []
    rtr, _ = _fake_retrain_top(tiny_preset, digits_small, monkeypatch,
                               lambda tasks, **kw: devices.append(kw.get("device", "cpu")))
    setup = RunSetup(tiny_preset, tmp_path / "ckpt", digits_small, tmp_path / "out", tmp_path / "results",
                     "cuda:0", False)
    rtr.run_retrain_top(setup, rtr.RetrainTopConfig(queries=("gallery:0",), methods=("kfac",)))
    assert devices == ["cuda:0"]


def test_a_second_retrain_top_into_one_out_is_refused_before_it_trains(tiny_preset, digits_small, tmp_path,
                                                                      monkeypatch):
    """QA 36 #7: a second ``retrain-top`` into the --out another one was training printed its plan and a bar, then
    stopped on a model folder's own lock, naming an internal sub-folder; it is refused at the run's lock now, as
    ``lds`` is, before it trains anything, and the finished models can still be measured (--no-train)."""
    from engine.evaluation.setup import RunSetup, TrainingBusyError

    trained = []
    rtr, _ = _fake_retrain_top(tiny_preset, digits_small, monkeypatch, lambda tasks, **kw: trained.extend(tasks))
    setup = RunSetup(tiny_preset, tmp_path / "ckpt", digits_small, tmp_path / "out", tmp_path / "results", "cpu", False)
    (tmp_path / "out").mkdir()
    lock = tmp_path / "out" / folder_lock.RUN_LOCK
    holder = subprocess.Popen(  # a live process training into it, holding the folder's flock
        [sys.executable, "-c", "import sys, time\nfrom engine import folder_lock\n"
         "with folder_lock.exclusive(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)", str(lock)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TrainingBusyError, match=rf"^process {holder.pid} \(started .*\) is training into .*out; "
                           "evaluate the finished models with --no-train, or wait for it$"):
            rtr.run_retrain_top(setup, rtr.RetrainTopConfig(queries=("gallery:0",), methods=("kfac",)))
        assert trained == []
    finally:
        holder.kill()  # kill -9: the kernel lets go of the lock
        holder.wait(30)
    rtr.run_retrain_top(setup, rtr.RetrainTopConfig(queries=("gallery:0",), methods=("kfac",)))
    assert [t.name for t in trained] == ["kfac"]


@pytest.mark.parametrize("argv, message", [
    (["--fraction", "0"], "--fraction must lie strictly between 0 and 1"),
    (["--fraction", "1.5"], "--fraction must lie strictly between 0 and 1"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--subsets", "2"], "--subsets must be at least 3 to score an LDS"),
    # a typo was reported only after every subset model was trained (QA 15)
    (["--methods", "kfac,bogus"], "unknown method(s) bogus"),
    (["--measurement", "lossy"], "unknown measurement 'lossy'"),
    (["--measurement", "trajectory"], "needs a recorded sampling trajectory"),
])
def test_lds_refuses_bad_run_settings_before_writing_or_training(tmp_path, capsys, argv, message):
    """A fraction of 0 wrote the run's files before failing; 2 subsets trained both models and only then
    failed (QA). Each is one error line now, with nothing written."""
    from engine.cli import main

    out = tmp_path / "run"
    rc = main(["lds", "--out", str(out), "--results", str(tmp_path / "res"), "--queries", "4", "--subsets", "4", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "res").exists()


def test_shared_full_measurements_are_kept_apart_per_model(tiny_preset, tiny_model, digits_small, tmp_path):
    """A run's ``full_measurements`` folder is shared by every checkpoint run into it: a second model's
    retrain-top was compared against the first model's loss of the same training image (QA 15: measured
    change +0.741 instead of -0.002)."""
    from engine.model.checkpoint import save_checkpoint
    from engine.model.unet import build_model

    first = save_checkpoint(tmp_path / "a", tiny_model, tiny_preset)
    torch.manual_seed(1)
    second = save_checkpoint(tmp_path / "b", build_model(tiny_preset.model).eval(), tiny_preset)
    queries = digits_small.images[:2]
    spec = MeasureSpec("loss", mc_samples=8, seed=3, batch=8)
    shared = tmp_path / "run" / "full_measurements"
    a = cached_measurements(first, queries, spec, 17, cache_dir=shared)
    b = cached_measurements(second, queries, spec, 17, cache_dir=shared)
    assert not np.allclose(a, b)  # the second model measured, not the first one's file
    np.testing.assert_array_equal(b, cached_measurements(second, queries, spec, 17))  # = its own measurement
    np.testing.assert_array_equal(a, cached_measurements(first, queries, spec, 17, cache_dir=shared))
    assert len(list(shared.glob("*.json"))) == 2


def test_an_lds_run_folder_belongs_to_one_checkpoint(tiny_preset, tiny_model, tmp_path):
    """``subsets.npz`` records the data, fraction and seed but not the model: a run with another
    --checkpoint into the same --out reused the first model's subset models and queries (QA 15)."""
    from engine.evaluation.lds import bind_run_to_checkpoint
    from engine.model.checkpoint import checkpoint_hash, save_checkpoint
    from engine.model.unet import build_model

    first = save_checkpoint(tmp_path / "a", tiny_model, tiny_preset)
    torch.manual_seed(1)
    second = save_checkpoint(tmp_path / "b", build_model(tiny_preset.model).eval(), tiny_preset)
    run = tmp_path / "run"
    assert bind_run_to_checkpoint(run, second, record=False) == checkpoint_hash(second)  # a reader binds nothing
    assert not run.exists()
    assert bind_run_to_checkpoint(run, first) == checkpoint_hash(first)
    assert bind_run_to_checkpoint(run, first) == checkpoint_hash(first)  # the same model again: fine
    for record, advice in ((True, "use another --out"), (False, "pass that run's --checkpoint or another --run")):
        with pytest.raises(SubsetMismatchError, match=advice):
            bind_run_to_checkpoint(run, second, record=record)


@pytest.mark.parametrize("argv", [
    ["lds", "--workers", "0"],
    ["retrain-top", "--query", "gallery:0", "--workers", "0"],
    ["retrain-top", "--query", "gallery:0", "--steps", "0"],
    ["group-retrain", "--remove", "label:1", "--steps", "0"],
    ["group-bench", "--pool-size", "0"],
    ["bench-scale", "--mc", "0"],
    ["bench", "--threads", "0"],
    ["bench-foundation", "--steps", "-1"],
    ["lds", "--mc-samples", "0"],
    ["lds", "--queries", "0"],
    ["lds", "--attribution-mc", "0"],
])
def test_counts_below_one_are_refused_while_parsing(argv, capsys):
    """0 workers, steps, draws or pool samples were accepted and failed late, or silently meant 1 (QA 15)."""
    from engine.cli.parser import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_bench_scale_sizes_are_checked_before_any_work(capsys):
    """``--sizes 0`` ended in an IndexError traceback deep in the bank build (QA 15)."""
    from engine.cli import main

    assert main(["bench-scale", "--sizes", "0", "--out", "unused.json"]) == 2
    err = capsys.readouterr().err
    assert "--sizes '0': every value must be at least 1" in err and "Traceback" not in err


def test_lds_checks_method_names_in_the_form_the_scoring_takes():
    """``--methods KFAC`` and ``--methods all`` passed the early check and then failed at the scoring, after
    every training: the check and the scoring now read the same normalised names (review 48b)."""
    from engine.evaluation.lds_run import _checked_methods

    assert _checked_methods(("KFAC", " trak")) == ("kfac", "trak")
    assert _checked_methods(("all",)) is None and _checked_methods(None) is None
    with pytest.raises(ValueError, match="unknown method"):
        _checked_methods(("kfac", "bogus"))


def test_run_lds_refuses_another_models_run_folder_before_training(tiny_preset, tiny_model, digits_small, tmp_path,
                                                                   monkeypatch):
    """The binding is used where it matters: ``run_lds`` on a folder of checkpoint A with checkpoint B stops
    before any training; ``--train-only`` without a finished full model (it may still be training) does not
    need its weights."""
    import engine.evaluation.lds_run as lds_run
    from engine.evaluation.lds import LDSConfig, bind_run_to_checkpoint
    from engine.evaluation.setup import RunSetup
    from engine.model.checkpoint import save_checkpoint
    from engine.model.unet import build_model

    first = save_checkpoint(tmp_path / "a", tiny_model, tiny_preset)
    torch.manual_seed(1)
    second = save_checkpoint(tmp_path / "b", build_model(tiny_preset.model).eval(), tiny_preset)
    out = tmp_path / "run"
    bind_run_to_checkpoint(out, first)
    trained = []
    monkeypatch.setattr(lds_run, "train_subsets", lambda *a, **k: trained.append(a) or np.ones((3, 64), bool))
    setup = RunSetup(tiny_preset, second, digits_small, out, tmp_path / "res", "cpu", False)
    with pytest.raises(SubsetMismatchError, match="use another --out"):
        lds_run.run_lds(setup, LDSConfig(subsets=3), lds_run.LDSRun(methods=("pixel",), queries=2))
    assert not trained
    pending = RunSetup(tiny_preset, tmp_path / "still training", digits_small, tmp_path / "run2", tmp_path / "res",
                       "cpu", False)
    assert lds_run.run_lds(pending, LDSConfig(subsets=3), lds_run.LDSRun(evaluate=False)) == 0
    assert trained and not (tmp_path / "run2" / "checkpoint.json").exists()


def test_a_binding_record_is_created_once(tmp_path):
    """Two first runs with different checkpoints could both find no ``checkpoint.json`` and both write it,
    the later one silently winning: the record is now created only if absent (review 48b)."""
    from engine.files import create_bytes_once

    path = tmp_path / "run" / "checkpoint.json"
    assert create_bytes_once(path, b"first\n") and path.read_bytes() == b"first\n"
    assert not create_bytes_once(path, b"second\n") and path.read_bytes() == b"first\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.json"]  # no temporary file left


@pytest.mark.parametrize("field", ["workers", "queries", "mc_samples", "attribution_mc"])
def test_an_lds_run_refuses_counts_below_one_when_built(field):
    """A run built in a script (not through the CLI's parser) is refused before anything is trained."""
    from engine.evaluation.lds_run import LDSRun

    with pytest.raises(InvalidSettingError, match="must be at least 1, got 0"):
        LDSRun(**{field: 0})


def test_lds_scoring_saves_no_row_a_method_failed_on_and_rescores_a_row_saved_without_one(
    tiny_preset, digits_small, tmp_path
):
    """QA 24: a method that failed on one query (there: a SIGTERM taken for an error) left that query's saved
    scores without it, and every rerun then stopped on unequal matrices. Now a failure stops the scoring with
    its reason and saves nothing for that query; a row saved without a method that scored the others is scored
    again."""
    import torch

    from engine.attribution.results import MethodResult
    from engine.evaluation.lds_run import ScoringFailedError, session_scores
    from engine.files import save_npz

    queries = torch.stack([digits_small.images[i] for i in (1, 2, 3)])
    calls = []

    class Failing(FakeSession):
        def query(self, query, measurement, methods):
            calls.append(query.description)
            res = super().query(query, measurement, methods)
            if query.description == "lds query 1":
                res.methods["kfac"] = MethodResult("kfac", "kfac", "influence", "", "error", reason="OSError: bad cache")
            return res

    failing = Failing(tiny_preset, None, "cpu", None, tiny_preset.attribution, digits_small, False)
    with pytest.raises(ScoringFailedError, match="kfac failed on LDS query 1: OSError: bad cache"):
        session_scores(failing, queries, "loss", ["kfac", "pixel"], tmp_path, sweep=False)
    folder = next((tmp_path / "scores").iterdir())
    assert (folder / "q000.npz").is_file() and not (folder / "q001.npz").exists()
    # an older version's row without K-FAC: scored again, the others read back
    healthy = FakeSession(tiny_preset, None, "cpu", None, tiny_preset.attribution, digits_small, False)
    rows, _ = session_scores(healthy, queries, "loss", ["kfac", "pixel"], tmp_path, sweep=False)
    save_npz(folder / "q002.npz", pixel=rows[2]["pixel"])
    calls.clear()
    healthy.query = lambda q, m, n: (calls.append(q.description), FakeSession.query(healthy, q, m, n))[1]
    again, _ = session_scores(healthy, queries, "loss", ["kfac", "pixel"], tmp_path, sweep=False)
    assert calls == ["lds query 2"]
    for a, b in zip(again, rows, strict=True):
        assert set(a) == {"kfac", "pixel"}
        np.testing.assert_array_equal(a["kfac"], b["kfac"])


# --- QA 48 -----------------------------------------------------------------------------------


def _lds_setup(tiny_preset, digits_small, tmp_path, monkeypatch, record: dict | None = None):
    """run_lds with a stand-in session and training: (lds_run, setup, trained calls)."""
    import engine.evaluation.lds_run as lds_run
    from engine.evaluation.setup import RunSetup

    trained: list = []
    monkeypatch.setattr(lds_run, "train_subsets", lambda *a, **k: trained.append(a) or np.ones((3, 64), bool))
    monkeypatch.setattr(lds_run, "evaluate_run", lambda *a, **k: 0)
    monkeypatch.setattr(lds_run, "bind_run_to_checkpoint", lambda *a, **k: "fake")
    session = FakeSession(None, None, "cpu", None, tiny_preset.attribution, digits_small, True)
    monkeypatch.setattr(lds_run, "_open_session", lambda setup, run: (session, tiny_preset.attribution,
                                                                      tiny_preset.attribution.mc_samples))
    results = tmp_path / "res"
    if record is not None:
        results.mkdir()
        (results / f"lds_{tiny_preset.name}_loss.json").write_text(json.dumps(record))
    setup = RunSetup(tiny_preset, tmp_path / "ckpt", digits_small, tmp_path / "run", results, "cpu", False)
    return lds_run, setup, trained


def test_lds_refuses_to_replace_a_record_of_other_settings_before_training(tiny_preset, digits_small, tmp_path,
                                                                         monkeypatch):
    """QA 48 #1: a K = 5, Q = 4 trial run silently replaced the shipped K = 32 record (the file name holds neither).
    Refused now before anything is trained or written, naming the file, the settings and both ways out; the
    same settings (a resume) and --replace-results go on."""
    from engine.evaluation.lds import LDSConfig
    from engine.evaluation.setup import ResultsSettingsError

    record = {"config": {"subsets": 32, "seeds": 1, "queries": 32, "fraction": 0.5, "true_measurement_mc_samples": 1024,
                         "checkpoint_hash": "fake"}, "methods": {"kfac": {}, "pixel": {}}}
    lds_run, setup, trained = _lds_setup(tiny_preset, digits_small, tmp_path, monkeypatch, record)
    run = lds_run.LDSRun(methods=("kfac", "pixel"), queries=4)
    with pytest.raises(ResultsSettingsError) as e:
        lds_run.run_lds(setup, LDSConfig(subsets=5), run)
    msg = str(e.value)
    assert "lds_tiny_loss.json" in msg and "subsets 32 there, 5 here" in msg and "queries 32 there, 4 here" in msg
    assert "--results DIR" in msg and "--replace-results" in msg
    assert not trained and not setup.out.exists()
    with pytest.raises(ResultsSettingsError, match="methods kfac,pixel there, kfac here"):
        lds_run.run_lds(setup, LDSConfig(subsets=32), lds_run.LDSRun(methods=("kfac",), queries=32))
    # the record's settings (an unavailable method asked for is not a difference: it is left out either way)
    assert lds_run.run_lds(setup, LDSConfig(subsets=32), lds_run.LDSRun(methods=("kfac", "pixel", "dtrak"),
                                                                        queries=32)) == 0
    assert lds_run.run_lds(setup, LDSConfig(subsets=5), lds_run.LDSRun(methods=("kfac", "pixel"), queries=4,
                                                                       replace_results=True)) == 0
    assert len(trained) == 2


def test_the_lds_cli_has_replace_results(tmp_path, capsys):
    from engine.cli.parser import build_parser

    for cmd in (["lds"], ["retrain-top", "--query", "gallery:0"], ["group-retrain", "--remove", "label:3"]):
        assert build_parser().parse_args([*cmd, "--replace-results"]).replace_results is True


def test_retrain_top_refuses_to_replace_a_record_of_other_queries(tiny_preset, digits_small, tmp_path, monkeypatch):
    """QA 48 #1: a run for --query gallery:5 replaced the shipped gallery:0-2 record (one file per preset)."""
    from engine.evaluation.setup import ResultsSettingsError, RunSetup

    trained = []
    rtr, _ = _fake_retrain_top(tiny_preset, digits_small, monkeypatch, lambda tasks, **kw: trained.extend(tasks))
    setup = RunSetup(tiny_preset, tmp_path / "ckpt", digits_small, tmp_path / "out", tmp_path / "results", "cpu", False)
    rtr.run_retrain_top(setup, rtr.RetrainTopConfig(queries=("gallery:0", "gallery:1"), methods=("kfac",)))
    path = tmp_path / "results" / f"retrain_top_{tiny_preset.name}.json"
    before = path.read_bytes()
    trained.clear()
    with pytest.raises(ResultsSettingsError, match=r"queries gallery:0,gallery:1 there, gallery:5 here.*--results DIR"):
        rtr.run_retrain_top(setup, rtr.RetrainTopConfig(queries=("gallery:5",), methods=("kfac",)))
    with pytest.raises(ResultsSettingsError, match="fraction 0.02 there, 0.05 here"):
        rtr.run_retrain_top(setup, rtr.RetrainTopConfig(queries=("gallery:0", "gallery:1"), methods=("kfac",),
                                                        fraction=0.05))
    assert trained == [] and path.read_bytes() == before
    # the same settings (a repeat, another order) write as before
    rtr.run_retrain_top(setup, rtr.RetrainTopConfig(queries=("gallery:1", "gallery:0"), methods=("kfac",)))
    # an old record without queries or methods in its config: read from its results
    old = json.loads(before)
    del old["config"]["queries"], old["config"]["methods"]
    path.write_text(json.dumps(old))
    with pytest.raises(ResultsSettingsError, match="queries gallery:0,gallery:1 there, gallery:5 here"):
        rtr.run_retrain_top(setup, rtr.RetrainTopConfig(queries=("gallery:5",), methods=("kfac",)))


@pytest.mark.parametrize("query", ["", ",", " , "])
def test_retrain_top_refuses_an_empty_query_list(tmp_path, capsys, query):
    """QA 48 #2: ``--query ""`` exited 0 and wrote an empty record over the results."""
    from engine.cli import main

    res = tmp_path / "res"
    rc = main(["retrain-top", "--query", query, "--out", str(tmp_path / "out"), "--results", str(res)])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == "error: --query names no query", err
    assert not res.exists() and not (tmp_path / "out").exists()


def test_retrain_top_refuses_trajectory_and_empty_queries_before_training(tiny_preset, digits_small, tmp_path,
                                                                          monkeypatch):
    """QA 48 #3: ``--measurement trajectory`` trained every model, then failed; #2 in the run itself too."""
    from engine.evaluation.setup import RunSetup

    trained = []
    rtr, _ = _fake_retrain_top(tiny_preset, digits_small, monkeypatch, lambda tasks, **kw: trained.extend(tasks))
    setup = RunSetup(tiny_preset, tmp_path / "ckpt", digits_small, tmp_path / "out", tmp_path / "results", "cpu", False)
    with pytest.raises(ValueError, match="^--measurement trajectory: needs a recorded sampling trajectory, which "
                       "retrain-top's queries"):
        rtr.run_retrain_top(setup, rtr.RetrainTopConfig(queries=("gallery:0",), methods=("kfac",),
                                                        measurement="trajectory"))
    with pytest.raises(ValueError, match="^--query names no query$"):
        rtr.run_retrain_top(setup, rtr.RetrainTopConfig(queries=(), methods=("kfac",)))
    assert trained == [] and not (tmp_path / "results").exists()


def test_retrain_top_leaves_out_an_unavailable_method_in_one_line(tiny_preset, digits_small, tmp_path, monkeypatch,
                                                                  capsys):
    """QA 48 #6: ``--methods clip`` without CLIP's weights ended in a traceback; a method that cannot score here is
    left out with one warning, and a run with none left is one error."""
    from engine.evaluation.setup import RunSetup

    trained = []
    rtr, measured = _fake_retrain_top(tiny_preset, digits_small, monkeypatch, lambda tasks, **kw: trained.extend(tasks))
    setup = RunSetup(tiny_preset, tmp_path / "ckpt", digits_small, tmp_path / "out", tmp_path / "results", "cpu", False)
    with pytest.raises(ValueError, match="^--methods clip: no method can score here"):
        rtr.run_retrain_top(setup, rtr.RetrainTopConfig(queries=("gallery:0",), methods=("clip",)))
    assert trained == []
    capsys.readouterr()
    rtr.run_retrain_top(setup, rtr.RetrainTopConfig(queries=("gallery:0",), methods=("kfac", "clip")))
    err = capsys.readouterr().err
    assert err.startswith("warning: clip: unavailable: CLIP weights") and err.count("\n") == 1, err
    assert measured == ["kfac"]


@pytest.mark.parametrize("flag", ["--out", "--results"])
def test_unwritable_out_and_results_are_refused_first_naming_the_option(tmp_path, capsys, flag):
    """QA 48 #7: ``--out /proc/x`` was a bare ``[Errno 2]``, and ``--results`` failed only after the training."""
    from engine.cli import main

    afile = tmp_path / "a-file"
    afile.write_text("x")
    bad = str(afile / "sub")
    good = {"--out": str(tmp_path / "out"), "--results": str(tmp_path / "res")}
    for cmd in (["lds", "--queries", "4", "--subsets", "4"], ["retrain-top", "--query", "gallery:0"],
                ["group-retrain", "--remove", "label:3"]):
        rc = main([*cmd, *[x for k, v in good.items() for x in (k, bad if k == flag else v)]])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"error: {flag} {bad}") and len(err.strip().splitlines()) == 1, (cmd, err)
        assert not (tmp_path / "out").exists() and not (tmp_path / "res").exists()


@pytest.mark.parametrize("fraction", ["0.0001", "0.9999"])
def test_lds_refuses_a_fraction_that_keeps_no_image_or_every_image(tmp_path, capsys, fraction):
    """QA 48 #5: round(0.0001 x 1,797) = 0 failed after writing subsets.npz and checkpoint.json, which then blocked
    the corrected command; 0.9999 kept every image (every prediction 0, hours of training)."""
    from engine.cli import main

    out = tmp_path / "run"
    rc = main(["lds", "--preset", "digits", "--fraction", fraction, "--subsets", "3", "--out", str(out),
               "--results", str(tmp_path / "res")])
    cap = capsys.readouterr()
    assert rc == 2 and cap.err.startswith(f"error: --fraction {fraction}: a subset keeps round("), cap.err
    assert len(cap.err.strip().splitlines()) == 1 and "LDS run in" not in cap.out
    assert not out.exists() and not (tmp_path / "res").exists()


def test_lds_header_is_not_printed_before_a_subsets_refusal(tiny_preset, digits_small, tmp_path, monkeypatch, capsys):
    """QA 48 #8: another --fraction into a run folder printed "LDS run in ...: alpha=..." before its error."""
    from engine.evaluation.lds import LDSConfig, SubsetMismatchError, load_or_make_subsets

    lds_run, setup, trained = _lds_setup(tiny_preset, digits_small, tmp_path, monkeypatch)
    setup.out.mkdir()
    load_or_make_subsets(setup.out, digits_small, LDSConfig(subsets=3, fraction=0.5))
    capsys.readouterr()
    with pytest.raises(SubsetMismatchError, match="use another --out"):
        lds_run.run_lds(setup, LDSConfig(subsets=3, fraction=0.25), lds_run.LDSRun(methods=("kfac",), queries=2))
    assert capsys.readouterr().out == "" and not trained


def test_retrain_top_with_other_steps_measures_against_a_same_steps_reference(tiny_preset, digits_small, tmp_path,
                                                                               monkeypatch):
    """QA 48 #4: with --steps 600 the change was measured against the 6,000-step full model (+0.147 for every
    method, the training-length gap). A model of the full training set, trained for the same steps and seed, is
    trained with the job's models and is the baseline; the full model's steps (default) behave as before."""
    import engine.evaluation.retrain_top as rt
    from engine.files import save_npz

    session = SimpleNamespace(preset=tiny_preset, dataset=digits_small, checkpoint_hash="h",
                              config=tiny_preset.attribution, checkpoint=tmp_path / "full", device="cpu")
    image = digits_small.images[3]
    full_steps = tiny_preset.train.steps
    assert rt.plan(session, image, "loss", "kfac", 0.05, tmp_path, same_steps_reference=True).reference is None
    assert rt.plan(session, image, "loss", "kfac", 0.05, tmp_path, steps=full_steps,
                   same_steps_reference=True).reference is None
    p = rt.plan(session, image, "loss", "kfac", 0.05, tmp_path, steps=full_steps // 2, same_steps_reference=True)
    assert p.reference is not None and p.result_file.name.endswith("_reference.json")
    p.folder.mkdir(parents=True)
    save_npz(p.folder / "removed.npz", removed=np.array([1, 2]), scores=np.zeros(64), kind=np.array("influence"))
    query = SimpleNamespace(image=image, description="q")
    job = rt.RetrainJob(session, query, "loss", "kfac", 0.05, p)
    tasks = job.training_tasks()
    assert [t.name for t in tasks] == ["without-top-kfac", "random-removal", "full-set-reference"]
    assert tasks[2].exclude is None and tasks[2].indices is None and tasks[2].steps == full_steps // 2
    losses = {str(session.checkpoint): 5.0, str(p.reference): 1.0, str(p.folder / "model"): 1.5,
              str(p.control_folder): 1.1}
    monkeypatch.setattr(rt, "cached_measurements", lambda folder, *a, **k: np.array([losses[str(folder)]]))
    r = job.measure(*job.removal())
    assert r["full_measurement"] == 1.0 and r["measured_change"] == pytest.approx(0.5)
    assert r["random_measured_change"] == pytest.approx(0.1)
    assert r["reference_steps"] == full_steps // 2 and r["full_steps"] == full_steps
    # default steps: the full model, as before
    p0 = rt.plan(session, image, "loss", "kfac", 0.05, tmp_path / "d")
    p0.folder.mkdir(parents=True)
    save_npz(p0.folder / "removed.npz", removed=np.array([1, 2]), scores=np.zeros(64), kind=np.array("influence"))
    losses.update({str(p0.folder / "model"): 5.5, str(p0.control_folder): 5.1})
    job0 = rt.RetrainJob(session, query, "loss", "kfac", 0.05, p0)
    assert len(job0.training_tasks()) == 2
    r0 = job0.measure(*job0.removal())
    assert r0["full_measurement"] == 5.0 and "reference_steps" not in r0


def test_retrain_top_says_and_records_a_same_steps_reference(tiny_preset, digits_small, tmp_path, monkeypatch, capsys):
    """QA 48 #4: the run says so on stderr, and its record and table hold the reference's and the full model's steps;
    at the full model's steps nothing is said."""
    from engine.evaluation.setup import RunSetup

    rtr, _ = _fake_retrain_top(tiny_preset, digits_small, monkeypatch, lambda tasks, **kw: None)
    setup = RunSetup(tiny_preset, tmp_path / "ckpt", digits_small, tmp_path / "out", tmp_path / "results", "cpu", False)
    steps = tiny_preset.train.steps + 7
    capsys.readouterr()
    rtr.run_retrain_top(setup, rtr.RetrainTopConfig(queries=("gallery:0",), methods=("kfac",), steps=steps))
    cap = capsys.readouterr()
    assert f"notice: --steps {steps} differs from the full model's" in cap.err and "changes against a reference" in cap.out
    c = json.loads((tmp_path / "results" / f"retrain_top_{tiny_preset.name}.json").read_text())["config"]
    assert c["reference_steps"] == steps and c["full_steps"] == tiny_preset.train.steps
    rtr.run_retrain_top(setup, rtr.RetrainTopConfig(queries=("gallery:0",), methods=("kfac",),
                                                    replace_results=True))
    cap = capsys.readouterr()
    assert "notice" not in cap.err and "reference" not in cap.out


def test_retrain_tops_header_gives_a_tiny_share_its_digits_and_one_image_its_singular():
    """QA 48 #8: ``--fraction 0.0001`` read "top 0.0% (1 images)"."""
    from engine.evaluation.retrain_top_run import format_retrain_table, share_words

    assert [share_words(f) for f in (0.02, 0.0001, 0.025, 1 / 3)] == ["2%", "0.01%", "2.5%", "33.3%"]
    record = {"config": {"fraction": 0.0001, "removed": 1, "measurement": "loss"}, "results": []}
    assert format_retrain_table(record).splitlines()[0] == "retraining without top 0.01% (1 image), measurement=loss"


def test_a_resumed_models_kept_steps_are_said_in_words(tiny_preset, digits_small, tmp_path):
    """QA 48 #8: "3 models: 1 finished before, 2 to train" hid that one had kept 500 of its 600 steps."""
    from engine.evaluation.runs import TrainTask, plan_words
    from engine.model.train import STATE

    folders = [tmp_path / n for n in ("done", "half", "new")]
    for f in folders[:2]:
        f.mkdir()
    torch.save({"step": 500}, folders[1] / STATE)
    tasks = [TrainTask(f.name, str(f), tiny_preset, 600) for f in folders]
    line = plan_words(tasks, tasks[1:], 2)
    assert line == "3 models: 1 finished before, 1 resumed at step 500 of 600, 1 to train with 2 worker(s)"
