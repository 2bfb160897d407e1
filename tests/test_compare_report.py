"""The engine's comparisons of methods on one query, and the typed loaders of result files."""

from __future__ import annotations

import json

import numpy as np
from scipy.stats import spearmanr

from engine.attribution.results import MethodResult, QueryResult
from engine.evaluation.compare import spearman_matrix, topk_label_counts, topk_overlap
from engine.evaluation.report import lds_records, retrain_records


def _result(**scores) -> QueryResult:
    methods = {
        n: MethodResult(n, n, "influence", "", "ok", scores=np.asarray(s, dtype=np.float32)) for n, s in scores.items()
    }
    methods["off"] = MethodResult("off", "off", "influence", "", "unavailable", reason="not built")
    return QueryResult({}, "loss", methods)


def test_comparisons_agree_with_scipy_and_skip_methods_without_scores():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    res = _result(a=a, b=b)
    names, m = spearman_matrix(res, ["a", "off", "b"])
    assert names == ["a", "b"] and m[0, 0] == 1.0
    assert np.isclose(m[0, 1], spearmanr(a.astype(np.float32), b.astype(np.float32)).statistic)
    names, ov = topk_overlap(_result(a=[4, 3, 2, 1], c=[1, 2, 3, 4]), ["a", "c"], 2)
    assert ov.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    rows = topk_label_counts(_result(c=[1, 2, 3, 4]), ["c"], 2, np.array([0, 1, 1, 2]), ["zero", "one", "two"])
    assert {r["label"]: r["count"] for r in rows} == {"zero": 0, "one": 1, "two": 1}


def test_typed_loaders_put_the_headline_first_and_skip_unreadable_files(tmp_path):
    def lds(stem: str, measurement: str, **attribution) -> None:
        cfg = {"measurement": measurement, **({"attribution": attribution} if attribution else {})}
        rec = {"config": cfg, "methods": {"kfac": {"lds": 0.4}}, "sweeps": {}}
        (tmp_path / f"{stem}.json").write_text(json.dumps(rec))

    lds("lds_digits_elbo", "elbo", mc_samples=16, query_draws="bank")
    lds("lds_digits_loss_attribution_m8", "loss")
    lds("lds_digits_loss", "loss")
    (tmp_path / "lds_digits_loss.png").write_bytes(b"png")
    (tmp_path / "lds_broken.json").write_text("{not json")
    ablation = {"ablation": "trak_dim", "config": {"measurement": "loss"}, "variants": {"k=2048": {"methods": {}}}}
    (tmp_path / "lds_digits_ablation_trak_dim.json").write_text(json.dumps(ablation))  # not a run: not listed
    recs = lds_records(tmp_path)
    assert [r.file for r in recs] == ["lds_digits_loss.json", "lds_digits_elbo.json", "lds_digits_loss_attribution_m8.json"]
    assert recs[0].figure == tmp_path / "lds_digits_loss.png" and recs[1].figure is None
    assert recs[2].variant and not recs[0].variant and recs[1].measurement == "elbo"
    # whose draws the query had: files from before the option say nothing and were the paper's "own"
    assert [r.query_draws for r in recs] == ["own", "bank", "own"]
    # a model served with the bank's draws sees its own setting's file first, then the headline order
    assert [r.file for r in lds_records(tmp_path, query_draws="bank")] == [
        "lds_digits_elbo.json", "lds_digits_loss.json", "lds_digits_loss_attribution_m8.json"]
    (tmp_path / "retrain_top_digits.json").write_text(json.dumps({"config": {"fraction": 0.02}, "results": [{"x": 1}]}))
    (rt,) = retrain_records(tmp_path)
    assert rt.config["fraction"] == 0.02 and rt.results == [{"x": 1}] and rt.summary == {}
    assert rt.query_draws == "own"  # written before retrain-top recorded its attribution settings
    rec = {"config": {"attribution": {"query_draws": "bank"}}, "results": [{"x": 1}]}
    (tmp_path / "retrain_top_digits.json").write_text(json.dumps(rec))
    assert retrain_records(tmp_path)[0].query_draws == "bank"
    assert lds_records(tmp_path / "missing") == []


def test_result_files_are_shown_only_beside_the_model_they_were_measured_on(tmp_path):
    """digits and mnist share assets/results; gallery:0 is another image on another model, so the loaders
    keep a model's own files: same checkpoint hash, or (files without one) the same preset name."""
    from engine.evaluation.report import (
        ModelKey,
        load_group_retrain_results,
        other_models_files,
        split_by_model,
    )

    mine = ModelKey(checkpoint_hash="a" * 16, preset="digits")

    def write(name: str, config: dict, **rest) -> None:
        (tmp_path / name).write_text(json.dumps({"config": {"measurement": "loss", **config}, **rest}))

    write("lds_digits_loss.json", {"checkpoint_hash": "a" * 16, "preset": "digits"}, methods={"kfac": {"lds": 0.5}})
    write("lds_mnist_loss.json", {"checkpoint_hash": "b" * 16, "preset": "mnist"}, methods={"kfac": {"lds": 0.1}})
    write("lds_digits_elbo.json", {"preset": "digits"}, methods={})  # older file: no hash, the preset decides
    write("lds_retrained_loss.json", {"checkpoint_hash": "c" * 16, "preset": "digits"})  # digits, other weights
    write("retrain_top_mnist.json", {"checkpoint_hash": "b" * 16, "preset": "mnist"}, results=[{"query": "gallery:0"}])
    write("retrain_top_digits.json", {"checkpoint_hash": "a" * 16}, results=[{"query": "gallery:0"}])
    write("group_retrain_mnist.json", {"preset": "mnist"}, groups=[])
    (tmp_path / "lds_broken.json").write_text("[1, 2")  # unreadable: skipped, never an error

    assert {r.file for r in lds_records(tmp_path, mine)} == {"lds_digits_loss.json", "lds_digits_elbo.json"}
    assert len(lds_records(tmp_path)) == 4  # no model given: every readable file
    assert [r.file for r in retrain_records(tmp_path, mine)] == ["retrain_top_digits.json"]
    assert split_by_model(load_group_retrain_results(tmp_path), mine)[0] == []
    assert other_models_files(tmp_path, mine) == [
        "group_retrain_mnist.json", "lds_mnist_loss.json", "lds_retrained_loss.json", "retrain_top_mnist.json"]
    mnist = ModelKey(checkpoint_hash="b" * 16, preset="mnist")
    assert [r.file for r in retrain_records(tmp_path, mnist)] == ["retrain_top_mnist.json"]

    # one read of the folder serves every loader the same records, whatever happens to the files after it
    from engine.evaluation.report import ResultFiles

    files = ResultFiles.read(tmp_path)
    for p in tmp_path.glob("*.json"):
        p.unlink()
    assert {r.file for r in lds_records(files, mine)} == {"lds_digits_loss.json", "lds_digits_elbo.json"}
    assert [r.file for r in retrain_records(files, mnist)] == ["retrain_top_mnist.json"]
    assert other_models_files(files, mine) == [
        "group_retrain_mnist.json", "lds_mnist_loss.json", "lds_retrained_loss.json", "retrain_top_mnist.json"]
    assert lds_records(tmp_path) == [] and lds_records(files, mine)[0].path.parent == tmp_path


def test_result_files_say_how_their_attribution_settings_differ_from_the_served_ones():
    """QA round 14 (C1): the shipped digits retrain-top file removed its methods' top-36 under the settings
    of its day (15-27 of 36 images in common with today's), and the app showed it beside today's settings
    without a word."""
    import dataclasses
    from pathlib import Path

    from engine.config import AttributionConfig
    from engine.evaluation.report import LDSRecord, RetrainRecord, settings_differences
    from explorer.evaluation_view import settings_note

    served = dataclasses.asdict(AttributionConfig(draws="per-example", mc_samples=64, kfac_bank_whiten=1e-10))
    assert settings_differences({}, served) is None  # nothing recorded
    same = dict(served)
    assert settings_differences({"attribution": same}, served) == []
    # a cache key leaves out draws at "shared" (KEY_NEUTRAL); a file before the whitened grid has no whiten
    old = {k: v for k, v in served.items() if k not in ("draws", "kfac_bank_whiten", "kfac_factor_draws_mode")}
    assert settings_differences({"attribution": old}, served) == [
        "draws: shared (now per-example)",  # kfac_factor_draws_mode: "same" before the option, as now
        "kfac_bank_whiten: None (now 1e-10)",
    ]
    assert settings_differences({"attribution": {k: v for k, v in served.items() if k != "trak_dim"}}, served) == [
        f"trak_dim: not recorded (now {served['trak_dim']})"  # no known value before: said so, not guessed
    ]
    # a compressed bank's own settings count where either side used it
    compressed = {**served, "kfac_bank": "compressed", "kfac_rerank": 64}
    assert settings_differences({"attribution": compressed}, served) == [
        "kfac_bank: compressed (now auto)", f"kfac_rerank: 64 (now {served['kfac_rerank']})"]
    assert settings_differences({"attribution": {**served, "kfac_rerank": 64}}, served) == []
    # the dampings decide which images a retrain-top run removed, not an LDS figure (it sweeps them)
    damped = {"attribution": {**served, "kfac_damping": 1e-6}}
    retrain = RetrainRecord(path=Path("r.json"), config=damped, results=[], summary={})
    lds = LDSRecord(path=Path("l.json"), measurement="loss", config=damped, methods={}, sweeps={}, noise={},
                    figure=None, variant=False)
    assert retrain.settings_differences(served) == [f"kfac_damping: 1e-06 (now {served['kfac_damping']})"]
    assert lds.settings_differences(served) == []
    assert "the file does not record" in settings_note(None, "removals chosen")
    assert settings_note([], "measured") == ""
    assert settings_note(["mc_samples: 8 (now 64)"], "measured").endswith(":** mc_samples: 8 (now 64)")
