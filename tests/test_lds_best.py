"""Every method at its best settings (engine.evaluation.lds_best) over a run's results and its ablations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.evaluation.lds_best import IncomparableResultsError, best_settings, main
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


def test_an_ablation_on_other_seeds_or_queries_is_refused_and_the_script_skips_it(tmp_path, capsys):
    run, abl, _, _ = _records()
    other = {**abl, "config": {**abl["config"], "seeds": 1}}
    with pytest.raises(IncomparableResultsError, match="seeds"):
        best_settings(run, [other])
    (tmp_path / "lds_digits_loss.json").write_text(json.dumps(run))
    (tmp_path / "lds_digits_ablation_trak_dim.json").write_text(json.dumps(other))
    assert main(["--results", str(tmp_path)]) == 0
    assert "skipped lds_digits_ablation_trak_dim.json" in capsys.readouterr().out
    saved = json.loads((tmp_path / "lds_digits_loss.json").read_text())
    assert saved["best_settings"]["ablation_files"] == [] and saved["methods"] == run["methods"]
