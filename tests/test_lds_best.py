"""Every method at its best settings (engine.evaluation.lds_best) over a run's results and its ablations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.cli import main
from engine.evaluation.lds_best import IncomparableResultsError, best_settings
from engine.evaluation.stats import bootstrap_ci

CONFIG = {
    "preset": "digits",
    "num_train": 100,
    "subsets": 8,
    "subsets_with_models": 8,
    "seeds": 2,
    "queries": 6,
    "measurement": "loss",
    "true_measurement_mc_samples": 64,
    "true_measurement_seed": 1,
    "query_source": "gallery.npz images 0..5",
}


def _entry(per_query: list[float], damping: float | None = None) -> dict:
    v = np.array(per_query)
    return {"lds": float(v.mean()), "ci95": list(bootstrap_ci(v)), "per_query": per_query, "damping": damping}


def _records():
    rng = np.random.default_rng(0)
    kfac = list(0.45 + 0.02 * rng.normal(size=6))
    trak = list(0.25 + 0.02 * rng.normal(size=6))
    trak_big = list(0.40 + 0.02 * rng.normal(size=6))
    run = {
        "config": dict(CONFIG),
        "methods": {"kfac": _entry(kfac, 1e-8), "trak": _entry(trak, 5e-5)},
        "sweeps": {
            "trak": [
                {**_entry(list(np.array(trak) + 0.01), 1e-5)},
                {"damping": 1.0, "lds": 0.1, "ci95": [0.0, 0.2]},
            ]
        },
    }
    abl = {
        "ablation": "trak_dim",
        "config": {**CONFIG, "query_source": CONFIG["query_source"] + " (from q.pt)"},
        "variants": {
            "k=32768": {
                "changes": {"trak_dim": 32768},
                "methods": {"trak": {**_entry(trak), "best": _entry(trak_big, 1e-6)}},
            }
        },
    }
    return run, abl, kfac, trak_big


def test_best_setting_per_method_with_the_paired_difference_and_the_interval_check():
    run, abl, kfac, trak_big = _records()
    s = best_settings(run, [abl])
    t = s["methods"]["trak"]
    assert (
        t["source"] == "ablation trak_dim: k=32768"
        and t["damping"] == 1e-6
        and t["settings"] == {"trak_dim": 32768}
    )
    assert (
        t["lds"] == pytest.approx(np.mean(trak_big)) and t["candidates"] == 4
    )  # run default, run best, variant x2
    d = t["kfac_minus_this"]
    assert d["difference"] == pytest.approx(np.mean(kfac) - np.mean(trak_big)) and d["queries"] == 6
    assert t["kfac_interval_clear"] == (s["methods"]["kfac"]["ci95"][0] > t["ci95"][1])
    # without the ablation the run's best of the sweep (damping 1e-5) is TRAK's best
    alone = best_settings(run, [])["methods"]["trak"]
    assert alone["damping"] == 1e-5 and alone["source"] == "run" and alone["kfac_interval_clear"]


def test_best_settings_name_the_code_that_chose_them():
    """QA 31b #2: lds-best's summary (the shipped best settings) named no code."""
    from engine.code_version import code_version

    run, abl, _, _ = _records()
    assert best_settings(run, [abl])["code"] == code_version()


def test_an_ablation_on_other_seeds_or_queries_is_refused_and_the_script_skips_it(tmp_path, capsys):
    run, abl, _, _ = _records()
    other = {**abl, "config": {**abl["config"], "seeds": 1}}
    with pytest.raises(IncomparableResultsError, match="seeds"):
        best_settings(run, [other])
    (tmp_path / "lds_digits_loss.json").write_text(json.dumps(run))
    (tmp_path / "lds_digits_ablation_trak_dim.json").write_text(json.dumps(other))
    assert main(["lds-best", "--results", str(tmp_path)]) == 0
    assert "skipped lds_digits_ablation_trak_dim.json" in capsys.readouterr().out
    saved = json.loads((tmp_path / "lds_digits_loss.json").read_text())
    assert saved["best_settings"]["ablation_files"] == [] and saved["methods"] == run["methods"]


def test_lds_best_takes_a_preset_json_like_every_other_preset_option(tmp_path, capsys):
    """``lds-best --preset`` took only a name (QA): a preset .json now means its name, as get_preset reads it,
    and a missing one is one ``error:`` line, exit 2; a plain name is still the file names' as it is."""
    from engine.config import PRESETS

    run, _, _, _ = _records()
    (tmp_path / "lds_mine_loss.json").write_text(json.dumps({**run, "config": {**run["config"], "preset": "mine"}}))
    preset = tmp_path / "mine.json"
    preset.write_text(PRESETS["digits"].replace(name="mine").to_json())
    assert main(["lds-best", "--results", str(tmp_path), "--preset", str(preset)]) == 0
    assert "best_settings" in json.loads((tmp_path / "lds_mine_loss.json").read_text())
    assert main(["lds-best", "--results", str(tmp_path), "--preset", "mine"]) == 0
    capsys.readouterr()
    assert main(["lds-best", "--results", str(tmp_path), "--preset", str(tmp_path / "absent.json")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: preset file {tmp_path / 'absent.json'} does not exist", err
    # a name with no results: the error lists the runs the folder does hold (it said only "no results", QA 15)
    assert main(["lds-best", "--results", str(tmp_path), "--preset", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "lds_nosuch_loss.json" in err and "LDS results there: lds_mine_loss.json" in err, err


def test_held_out_choice_removes_the_optimism_of_picking_on_the_reported_queries():
    from engine.evaluation.lds_best import held_out_choice

    # two settings that each look best on half of the queries: picked in-sample, the best is 0.5;
    # picked on one half and scored on the other, each choice scores 0
    lucky = [{"per_query": [1.0, 0.0, 1.0, 0.0]}, {"per_query": [0.0, 1.0, 0.0, 1.0]}]
    assert max(np.mean(p["per_query"]) for p in lucky) == 0.5
    assert held_out_choice(lucky) == pytest.approx(0.0)
    # a setting better on every query is chosen both ways: its own mean comes back
    steady = [{"per_query": [0.9, 0.8, 0.9, 0.8]}, {"per_query": [0.1, 0.2, 0.1, 0.2]}]
    assert held_out_choice(steady) == pytest.approx(0.85)
    assert held_out_choice([]) is None


def test_interval_position_names_both_directions_and_settings_without_per_query_values_are_reported():
    from engine.evaluation.lds_best import interval_position

    assert interval_position([0.5, 0.6], [0.3, 0.4]) == "above"
    assert interval_position([0.3, 0.4], [0.5, 0.6]) == "below"
    assert interval_position([0.3, 0.55], [0.5, 0.6]) == "overlap"
    run, abl, _, _ = _records()
    # the run's own sweep keeps per-query values only at its best damping (by design): not reported
    assert best_settings(run, [abl])["skipped"] == []
    # an ablation variant with an LDS but no per-query values (an older file) is left out, and said so
    abl["variants"]["k=32768"]["methods"]["dtrak"] = {"lds": 0.9, "ci95": [0.8, 1.0], "damping": 1e-4}
    s = best_settings(run, [abl])
    assert "dtrak" not in s["methods"] and len(s["skipped"]) == 1
    assert s["skipped"][0].startswith("dtrak (ablation trak_dim: k=32768, LDS 0.900)")
    assert s["methods"]["trak"]["kfac_interval_vs_this"] in ("above", "overlap")
    assert s["methods"]["trak"]["held_out_choice"] is not None


def test_an_ablation_scored_against_other_models_with_the_same_counts_is_refused():
    from engine.evaluation.lds import targets_digest
    from engine.evaluation.lds_best import check_comparable

    rng = np.random.default_rng(1)
    masks = rng.random((8, 100)) < 0.5
    per_seed = rng.normal(size=(2, 6, 8))
    run = {**CONFIG, "targets_digest": targets_digest(masks, per_seed)}
    check_comparable(run, {**CONFIG, "targets_digest": targets_digest(masks.copy(), per_seed.copy())}, "same")
    # a second seed still training when the ablation was scored: same counts, other measured values
    partial = per_seed.copy()
    partial[1, :, 3] = np.nan
    with pytest.raises(IncomparableResultsError, match="targets_digest"):
        check_comparable(run, {**CONFIG, "targets_digest": targets_digest(masks, partial)}, "partial")
    # other subsets of the same size
    with pytest.raises(IncomparableResultsError, match="targets_digest"):
        check_comparable(run, {**CONFIG, "targets_digest": targets_digest(~masks, per_seed)}, "other")
    check_comparable(run, dict(CONFIG), "older file without a digest")  # records from before: counts only


def test_held_out_choice_holds_out_the_damping_when_every_sweep_point_keeps_per_query_values():
    """Audit 52: the held-out choice said "no selection optimism", but a best-of-sweep candidate's damping
    had been chosen on every query (older files keep per-query values only at the best damping). A sweep
    whose dampings each look best on half of the queries must score 0 held out once every point is kept;
    with the best point alone the split cannot choose the damping, and the summary says which of the two it is."""
    run, _, _, _ = _records()
    lucky = [[1.0, 0.0, 1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]]
    run["methods"]["trak"] = _entry([0.0] * 6, 5e-5)
    every = {**run, "sweeps": {"trak": [_entry(lucky[0], 1e-6), _entry(lucky[1], 1e-5)]}}
    s = best_settings(every, [])
    assert s["damping_held_out"] is True and s["methods"]["trak"]["lds"] == pytest.approx(0.5)
    assert s["methods"]["trak"]["held_out_choice"] == pytest.approx(0.0)
    assert "no selection optimism" in s["note"]
    best_only = {**run, "sweeps": {"trak": [_entry(lucky[0], 1e-6), {"damping": 1e-5, "lds": 0.5, "ci95": [0.0, 1.0]}]}}
    s = best_settings(best_only, [])
    assert s["damping_held_out"] is False and "damping was still chosen on every query" in s["note"]
    # an ablation variant's sweep counts the same way: every damping a candidate
    abl = {"ablation": "trak_dim", "config": dict(CONFIG), "variants": {"k=32768": {
        "changes": {"trak_dim": 32768},
        "methods": {"trak": {**_entry([0.0] * 6, 5e-5), "best": _entry(lucky[0], 1e-6),
                             "sweep": [_entry(lucky[0], 1e-6), _entry(lucky[1], 1e-5)]}}}}}
    s = best_settings({**run, "sweeps": {}}, [abl])
    assert s["damping_held_out"] is True and s["methods"]["trak"]["candidates"] == 4  # run default, variant x3
    assert s["methods"]["trak"]["held_out_choice"] == pytest.approx(0.0)


def test_dry_run_prints_the_table_and_leaves_the_file(tmp_path, capsys):
    """QA 27 #21: every run rewrote best_settings in the results file, by default the shipped one, also for a
    subset of the ablations; ``--dry-run`` prints the same table and writes nothing."""
    run, abl, _, _ = _records()
    (tmp_path / "lds_digits_loss.json").write_text(json.dumps(run))
    (tmp_path / "lds_digits_ablation_trak_dim.json").write_text(json.dumps(abl))
    before = (tmp_path / "lds_digits_loss.json").read_bytes()
    assert main(["lds-best", "--results", str(tmp_path), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert (tmp_path / "lds_digits_loss.json").read_bytes() == before and "left as it was" in dry
    assert main(["lds-best", "--results", str(tmp_path)]) == 0
    wrote = capsys.readouterr().out
    assert (tmp_path / "lds_digits_loss.json").read_bytes() != before and "wrote best_settings" in wrote
    assert dry.split("--dry-run:")[0] == wrote.split("wrote best_settings")[0]  # the same table


def test_one_rule_names_an_lds_results_file_for_the_run_and_for_lds_best():
    """QA 31b #4: the results file's name was built in three places (lds_run.results_stem, lds_best by hand,
    runs.measurement_file_name's copy of the replace chain); now results_stem and runs.measurement_tag."""
    from engine.evaluation.lds_ablation import ablation_file_name
    from engine.evaluation.lds_run import results_stem
    from engine.evaluation.runs import measurement_tag

    assert measurement_tag("loss@t=500") == "loss_t500" and measurement_tag("elbo") == "elbo"
    assert results_stem("digits", "loss") == "lds_digits_loss"
    assert results_stem("digits", "loss", 64, 64) == "lds_digits_loss"  # the preset's own M: the headline run
    assert results_stem("digits", "loss@t=500", 8, 64) == "lds_digits_loss_t500_attribution_m8"
    assert results_stem("digits", "loss", 8) == "lds_digits_loss_attribution_m8"  # a variant named by its M alone
    assert ablation_file_name("digits", "trak_dim") == "lds_digits_ablation_trak_dim.json"


def test_lds_best_addresses_an_attribution_mc_variant_run(tmp_path, capsys):
    """QA 31b #4: lds-best built the run's file name by hand, without results_stem's ``_attribution_m<M>``, so
    a ``lds --attribution-mc`` run (e.g. the shipped lds_digits_loss_attribution_m8.json) could not be given
    its best settings; ``--attribution-mc M`` now reads and writes that file, and leaves the headline run."""
    run, abl, _, _ = _records()
    (tmp_path / "lds_digits_loss.json").write_text(json.dumps(run))
    (tmp_path / "lds_digits_loss_attribution_m8.json").write_text(json.dumps(run))
    (tmp_path / "lds_digits_ablation_trak_dim.json").write_text(json.dumps(abl))
    headline = (tmp_path / "lds_digits_loss.json").read_bytes()
    assert main(["lds-best", "--results", str(tmp_path), "--attribution-mc", "8"]) == 0
    assert f"wrote best_settings into {tmp_path / 'lds_digits_loss_attribution_m8.json'}" in capsys.readouterr().out
    variant = json.loads((tmp_path / "lds_digits_loss_attribution_m8.json").read_text())
    assert variant["best_settings"]["ablation_files"] == ["lds_digits_ablation_trak_dim.json"]
    assert (tmp_path / "lds_digits_loss.json").read_bytes() == headline
    assert main(["lds-best", "--results", str(tmp_path), "--attribution-mc", "16"]) == 2
    err = capsys.readouterr().err
    assert "lds_digits_loss_attribution_m16.json" in err and "attribution-engine lds --attribution-mc 16" in err, err


def test_an_attribution_mc_run_compares_its_own_m_and_every_setting_says_how_it_differs_from_the_run(tmp_path, capsys):
    """QA 32: lds-best on the M = 8 run chose an ablation variant scored at M = 64 as K-FAC's best (LDS 0.439 against
    the run's 0.137) and named it by its changes alone, which do not mention M.  A variant's settings now name every
    attribution setting where it differs from the run, and an --attribution-mc run keeps the settings at its M."""
    from engine.evaluation.lds_best import variant_settings

    run, abl, _, _ = _records()
    run["config"]["attribution"] = {"mc_samples": 8, "trak_dim": 2048, "draws": "per-example", "kfac_damping": 1e-8}
    var = abl["variants"]["k=32768"]
    var["attribution"] = {"mc_samples": 64, "trak_dim": 32768, "draws": "per-example", "kfac_damping": 1e-6}
    assert variant_settings(run, var) == {"trak_dim": 32768, "mc_samples": 64}  # not the damping: chosen per point
    whole = best_settings(run, [abl])
    assert whole["methods"]["trak"]["settings"] == {"trak_dim": 32768, "mc_samples": 64}
    (tmp_path / "lds_digits_loss_attribution_m8.json").write_text(json.dumps(run))
    (tmp_path / "lds_digits_ablation_trak_dim.json").write_text(json.dumps(abl))
    assert main(["lds-best", "--results", str(tmp_path), "--attribution-mc", "8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "ablation trak_dim: k=32768: scored with M = 64 draws, not this run's 8" in out
    at_8 = best_settings(run, [abl], mc_samples=8)
    assert at_8["methods"]["trak"]["source"] == "run" and at_8["methods"]["trak"]["settings"] == {}
    from engine.evaluation.lds_best import table

    no_damping = {**at_8, "methods": {"pixel": {**at_8["methods"]["trak"], "damping": None}}}
    assert table(no_damping).splitlines()[-1].endswith(" run")  # not "run;" with nothing after it (QA 32)


def test_the_table_shows_each_method_the_settings_it_declares():
    """QA 70 F3: the table showed TRAK's k for every method but K-FAC; it now shows M, the draws and the fields a
    method declares (``config_fields``): K-FAC's factor draws, TRAK's k, nothing of either for the pixels."""
    from engine.evaluation.lds_best import table

    settings = {"mc_samples": 128, "trak_dim": 32768, "kfac_factor_draws": 8, "kfac_blocks": "joint"}
    entry = {"lds": 0.5, "ci95": [0.4, 0.6], "source": "ablation x: y", "settings": settings, "damping": None}
    rows = table({"reference": "kfac", "methods": {m: entry for m in ("kfac", "trak", "pixel")}}).splitlines()[1:]
    assert rows[0].endswith("; mc_samples=128, kfac_factor_draws=8, kfac_blocks=joint")
    assert rows[1].endswith("; mc_samples=128, trak_dim=32768") and rows[2].endswith("; mc_samples=128")
    from engine.evaluation.lds_best import own_fields

    assert own_fields("kfac[loss]") == own_fields("kfac") and "kfac_factor_draws" in own_fields("kfac")
    assert own_fields("no_such_method") == ()
