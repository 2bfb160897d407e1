"""LDS ablations (engine.evaluation.lds_ablation) on a tiny checkpoint: every variant is built and scored
with engine.evaluation.lds's statistics; defaults are read from a baseline cache; the run is only read."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL

from engine.config import AttributionConfig, DataConfig, Preset, TrainConfig
from engine.evaluation.lds import make_subsets, predicted_matrix, targets_digest
from engine.evaluation.lds_ablation import ABLATIONS, build_variants, run_ablation, variant_session
from engine.evaluation.lds_run import session_scores
from engine.evaluation.runs import MeasureSpec
from engine.evaluation.setup import RunSetup
from engine.evaluation.stats import lds_score, spearman
from engine.model.train import train


def _tiny_setup(tmp_path, ds, steps: int, **attribution) -> RunSetup:
    """A tiny model trained for ``steps`` on ``ds`` and the run setup the ablations take (M = 2 draws)."""
    preset = Preset(
        name="tiny",
        model=TINY_MODEL,
        data=DataConfig(name="digits"),
        train=TrainConfig(steps=steps, batch_size=8, log_every=100, checkpoint_every=1000),
        attribution=AttributionConfig(mc_samples=2, clip_pretrained=None, **attribution),
    )
    folder = train(preset, tmp_path / "ckpt", dataset=ds, progress=False)
    return RunSetup(preset, folder, ds, tmp_path / "out", tmp_path / "results", "cpu", False)


@pytest.mark.slow
def test_ablations_build_score_and_reuse_the_baseline(tmp_path, digits_small, capsys):
    torch.set_num_threads(1)
    ds = digits_small.subset(list(range(12)))
    setup = _tiny_setup(tmp_path, ds, steps=4)
    names = ["kfac_blocks"]
    build_variants(setup, names, tmp_path / "cache", None, log=lambda s: None)
    # each variant's build shows a bar on stderr (QA 25 #2: 159 s with nothing)
    assert "kfac_blocks/" in capsys.readouterr().err
    masks = make_subsets(len(ds), 6, 0.5, 0)
    rng = np.random.default_rng(0)
    per_seed = rng.normal(size=(1, 1, 6)) + 0.3 * rng.normal(size=(2, 3, 6))  # R = 2 synthetic seeds
    queries = ds.images[:3]
    spec = MeasureSpec(mc_samples=4)
    for name in names:
        rec = run_ablation(setup, name, masks, per_seed, queries, spec, "test", tmp_path / "cache", None,
                           log=lambda s: None)
        json.dumps(rec)  # serialisable
        assert rec["config"]["targets_digest"] == targets_digest(masks, per_seed)  # what it was scored against
        assert list(rec["variants"]) == [v.label for v in ABLATIONS[name]]
        assert rec["noise"]["seed_agreement"]["seeds"] == 2
        for v in rec["variants"].values():
            k = v["methods"]["kfac"]
            assert k["ci95"][0] <= k["lds"] <= k["ci95"][1]
            assert k["best"]["lds"] >= max(p["lds"] for p in k["sweep"] if p["lds"] is not None) - 1e-12
            assert all(len(p["per_query"]) == 3 for p in k["sweep"])  # every damping: lds-best can hold it out
    # the LDS of a variant is engine.evaluation.lds's statistic of its cached scores against the seed average
    session, _ = variant_session(setup, ABLATIONS["kfac_blocks"][1], tmp_path / "cache", None)
    rows, _ = session_scores(session, queries, "loss", ["kfac"], setup.out / "ablation" / "kfac_blocks" / "joint")
    pred = predicted_matrix(lambda q: {"kfac": rows[q]["kfac"]}, masks, 3)["kfac"]
    want = lds_score(pred, per_seed.mean(0)).to_dict()["lds"]
    assert rec["variants"]["joint"]["methods"]["kfac"]["lds"] == pytest.approx(want, rel=1e-12)
    # the paired difference against the first variant: per-query LDS differences on the same subsets
    sep = rec["variants"]["separate"]["methods"]["kfac"]
    joint = rec["variants"]["joint"]["methods"]["kfac"]
    assert "vs_first" not in sep and joint["vs_first"]["baseline"] == "separate"
    base_rows, _ = session_scores(variant_session(setup, ABLATIONS["kfac_blocks"][0], tmp_path / "cache", None)[0], queries,
                                  "loss", ["kfac"], setup.out / "ablation" / "kfac_blocks" / "separate")
    base_pred = predicted_matrix(lambda q: {"kfac": base_rows[q]["kfac"]}, masks, 3)["kfac"]
    # the option changes the scores themselves (their LDS over 6 subsets can tie, so compare the scores)
    for q in range(3):
        assert not np.allclose(rows[q]["kfac"], base_rows[q]["kfac"], rtol=1e-3, atol=0)
    per_q = [spearman(p, m) - spearman(b, m) for p, b, m in zip(pred, base_pred, per_seed.mean(0), strict=True)]
    assert joint["vs_first"]["difference"] == pytest.approx(np.mean(per_q), abs=1e-12)
    assert joint["vs_first"]["difference"] == pytest.approx(joint["lds"] - sep["lds"], abs=1e-12)
    lo, hi = joint["vs_first"]["ci95"]
    assert lo <= joint["vs_first"]["difference"] <= hi and joint["vs_first"]["queries"] == 3
    # defaults come from a baseline cache that has them; other settings from the variants' root
    _, base_root = variant_session(setup, ABLATIONS["kfac_blocks"][0], tmp_path / "other", tmp_path / "cache")
    assert base_root == tmp_path / "cache"
    _, own = variant_session(setup, ABLATIONS["kfac_blocks"][1], tmp_path / "other", tmp_path / "none")
    assert own == tmp_path / "other"


def test_a_variant_copies_the_factors_its_baseline_holds_under_the_same_key(tmp_path, digits_small, monkeypatch):
    """QA 25 #2: the bank-grid variant (the plain int8 grid) has the baseline's K-FAC factors (same key) but its own
    bank; it recomputed the factors.  Now they are copied from the baseline cache (checksums checked on reading),
    only the bank is computed over them.  (The key names everything the factors depend on, so the copy is what a
    factor pass of the variant would compute.)"""
    from engine.attribution.methods import kfac_influence
    from engine.attribution.session import AttributionSession

    torch.set_num_threads(1)
    ds = digits_small.subset(list(range(8)))
    setup = _tiny_setup(tmp_path, ds, steps=2)
    base = AttributionSession(preset=setup.preset, checkpoint=setup.checkpoint, device="cpu",
                              cache_root=tmp_path / "base", dataset=ds, auto_build=True)
    base.build(["kfac"])
    factor_passes = []
    real = kfac_influence.compute_kfac
    monkeypatch.setattr(kfac_influence, "compute_kfac", lambda *a, **k: factor_passes.append(1) or real(*a, **k))
    plain = ABLATIONS["bank_grid"][0]
    lines: list[str] = []
    build_variants(setup, ["bank_grid"], tmp_path / "variants", tmp_path / "base", log=lines.append)
    assert factor_passes == [], "the variant recomputed the baseline's factors"
    assert any("kfac-factors copied from the baseline cache" in line for line in lines), lines
    copied, root = variant_session(setup, plain, tmp_path / "variants", tmp_path / "base")
    assert root == tmp_path / "variants"
    key = copied.method("kfac").cache_keys(copied.ctx)[0]
    meta = copied.ctx.store.load_meta(*key)
    assert meta["copied_from"] == str(base.ctx.store.path(*key))
    for k, a in base.ctx.store.load_arrays(*key).items():
        assert np.array_equal(copied.ctx.store.load_arrays(*key)[k], a), k


@pytest.mark.slow
def test_a_multi_method_variant_is_built_with_one_shared_gradient_pass(tmp_path, digits_small, monkeypatch, capsys):
    """A variant that changes every gradient method (``mc_samples``) builds K-FAC, TRAK and D-TRAK through
    ``session.build`` (one training-gradient pass feeding all three), not method by method."""
    from engine.attribution.session import AttributionSession
    from engine.evaluation import lds_ablation

    torch.set_num_threads(1)
    ds = digits_small.subset(list(range(8)))
    setup = _tiny_setup(tmp_path, ds, steps=2, trak_dim=16)
    variant = lds_ablation.Variant("M=4", {"mc_samples": 4}, ("kfac", "trak", "dtrak"))
    monkeypatch.setitem(lds_ablation.ABLATIONS, "tiny_mc", (variant,))
    calls = []
    real_build = AttributionSession.build
    monkeypatch.setattr(AttributionSession, "build", lambda self, methods=None, **kw: calls.append(list(methods))
                        or real_build(self, methods, **kw))
    build_variants(setup, ["tiny_mc"], tmp_path / "cache", None, log=lambda s: None)
    assert calls == [["kfac", "trak", "dtrak"]]
    assert "tiny_mc/M=4:" in capsys.readouterr().err  # the shared pass's bar
    session, _ = variant_session(setup, variant, tmp_path / "cache", None)
    assert session.config.mc_samples == 4
    assert all(session.method(m).is_built(session.ctx) for m in variant.methods)


def test_the_cli_refuses_an_unknown_ablation_with_the_valid_names(tmp_path, capsys):
    from engine.cli import main

    assert main(["lds-ablation", "--run", str(tmp_path), "--ablations", "draws,nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown ablation(s) ['nope']" in err and "trak_dim" in err and "query_draws" in err


def test_a_folder_that_is_not_an_lds_run_is_refused_before_any_build(tmp_path, digits_small, monkeypatch):
    """``lds-ablation --run`` naming a wrong folder failed only after building every variant's caches (QA)."""
    import engine.evaluation.lds_ablation as abl
    from engine.evaluation.lds import LDSConfig

    setup = _tiny_setup(tmp_path, digits_small, steps=1)
    monkeypatch.setattr(abl, "build_variants", lambda *a, **k: pytest.fail("built caches for a folder that is no run"))
    job = abl.AblationJob(run=tmp_path / "not_a_run", checkpoint=setup.checkpoint, ablations=("draws",),
                          cache_root=tmp_path / "c", baseline_cache=None, out=tmp_path / "o",
                          results=tmp_path / "r", lds=LDSConfig(subsets=4, seeds=1))
    with pytest.raises(FileNotFoundError, match="not an LDS run folder"):
        abl.run_ablations(job)
    assert not (tmp_path / "o").exists()  # nor was the output folder made (QA round 22: an empty one stayed)


def test_the_variants_change_the_requested_presets_attribution_settings(tmp_path, digits_small, monkeypatch):
    """The checkpoint's config.json keeps the attribution settings of the day it was trained (the shipped
    digits: kfac_factor_draws None, the preset's 8 since); the ablations' baseline must be the requested
    preset's, as the LDS run's (engine.evaluation.setup), or a variant is built on settings nobody serves."""
    import dataclasses

    import engine.evaluation.lds_ablation as abl
    from engine.evaluation.lds import LDSConfig

    setup = _tiny_setup(tmp_path, digits_small, steps=1)  # saved with mc_samples 2
    seen = []
    monkeypatch.setattr(abl, "build_variants", lambda s, *a, **k: seen.append(s.preset.attribution))
    requested = dataclasses.replace(setup.preset.attribution, mc_samples=5, kfac_factor_draws=4)
    for attribution, want in ((requested, 5), (None, 2)):
        job = abl.AblationJob(run=tmp_path / "r", checkpoint=setup.checkpoint, ablations=("bank_grid",),
                              cache_root=tmp_path / "c", baseline_cache=None, out=tmp_path / "o",
                              results=tmp_path / "res", lds=LDSConfig(subsets=4, seeds=1), build_only=True,
                              attribution=attribution)
        assert abl.run_ablations(job) == []
        assert seen[-1].mc_samples == want
    assert seen[0] == requested


GRADIENT_FILE = '''
from . import register
from .base import AttributionMethod


@register
class ZzGradient(AttributionMethod):
    name = "zz_grad"
    order = 1000
    title = "A gradient method from a file"
    kind = "influence"


@register
class ZzNoGradient(AttributionMethod):
    name = "zz_nograd"
    order = 1001
    title = "An influence method without gradients"
    kind = "influence"
    needs_gradient = False
'''


def test_every_gradient_method_ablation_takes_a_dropped_in_method_file(methods_package_file, tmp_path, monkeypatch):
    """QA 70 F3: ``mc_samples`` and ``query_draws`` vary a setting of every gradient method, but listed K-FAC, TRAK
    and D-TRAK by hand, so a method added as one file was never built or scored there.  They now take the
    registry's gradient methods (the shipped ones first, in their order): a dropped-in gradient method is built,
    a method without gradients is not."""
    from types import SimpleNamespace

    from engine.evaluation import lds_ablation

    methods_package_file("zz_test_gradient", GRADIENT_FILE)
    built: list[tuple[str, tuple[str, ...]]] = []

    def fake_session(setup, variant, cache_root, baseline, log=None):
        done: set[str] = set()

        def build(methods, progress=None):
            built.append((variant.label, tuple(methods)))
            done.update(methods)

        method = lambda m: SimpleNamespace(is_built=lambda ctx: m in done, build=lambda ctx, p: build([m]))  # noqa: E731
        return SimpleNamespace(method=method, build=build, ctx=None), cache_root

    monkeypatch.setattr(lds_ablation, "variant_session", fake_session)
    build_variants(None, ["mc_samples", "query_draws"], tmp_path, None, log=lambda s: None)
    every = built[0][1]  # the shipped three first, the dropped-in one last (and any other gradient method between)
    assert every[:3] == ("kfac", "trak", "dtrak") and "zz_grad" in every[3:] and "zz_nograd" not in every
    assert built == [("M=64", every), ("M=32", every), ("M=128", every), ("own", every), ("bank", every)]
