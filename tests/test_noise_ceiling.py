"""Noise ceiling of the LDS (engine.evaluation.noise_ceiling): agreement of two training seeds, on synthetic numbers."""

from __future__ import annotations

import numpy as np
import pytest

from engine.evaluation.lds import noise_report
from engine.evaluation.lds_report import format_table
from engine.evaluation.noise_ceiling import seed_agreement
from engine.evaluation.stats import spearman


def _synthetic(noise: float, seeds: int = 2, q: int = 30, k: int = 40, seed: int = 0) -> np.ndarray:
    """(R, Q, K): a per-(query, subset) signal shared by all seeds plus independent seed noise."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(q, k))
    return signal[None] + noise * rng.normal(size=(seeds, q, k))


def test_seed_agreement_is_the_mean_per_query_spearman_of_two_seeds():
    per_seed = _synthetic(0.5)
    got = seed_agreement(per_seed)
    want = np.mean([spearman(per_seed[0, i], per_seed[1, i]) for i in range(per_seed.shape[1])])
    assert got["spearman"] == pytest.approx(want, rel=1e-12)
    assert got["seeds"] == 2 and got["subsets"] == 40 and len(got["per_query"]) == 30
    assert got["ci95"][0] < want < got["ci95"][1]
    # Spearman-Brown: the 2-seed average is more reliable than one seed, and the ceiling is below 1
    rel2 = 2 * want / (1 + want)
    assert got["ceiling_seed_average"] == pytest.approx(np.sqrt(rel2), rel=1e-12)
    assert want < got["ceiling_seed_average"] < 1


def test_seed_agreement_tracks_the_noise_and_pairs_of_three_seeds():
    clean, noisy = seed_agreement(_synthetic(0.1)), seed_agreement(_synthetic(2.0))
    assert clean["spearman"] > 0.95 and noisy["spearman"] < 0.4
    three = _synthetic(0.5, seeds=3)
    got = seed_agreement(three)
    pairs = [(0, 1), (0, 2), (1, 2)]
    want = np.mean([np.mean([spearman(three[a, i], three[b, i]) for a, b in pairs]) for i in range(30)])
    assert got["seeds"] == 3 and got["spearman"] == pytest.approx(want, rel=1e-12)


def test_seed_agreement_needs_two_finished_seeds_and_skips_unfinished_subsets():
    per_seed = _synthetic(0.5)
    assert seed_agreement(per_seed[:1]) is None
    half = per_seed.copy()
    half[1] = np.nan  # seed 1 not trained yet
    assert seed_agreement(half) is None
    partial = per_seed.copy()
    partial[1, :, 30:] = np.nan  # seed 1 finished 30 of 40 subsets
    got = seed_agreement(partial)
    assert got["subsets"] == 30
    want = np.mean([spearman(per_seed[0, i, :30], per_seed[1, i, :30]) for i in range(30)])
    assert got["spearman"] == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="R, Q, K"):
        seed_agreement(per_seed[0])


def test_noise_report_and_table_show_the_ceiling_only_with_two_seeds():
    per_seed = _synthetic(0.5)
    assert "seed_agreement" not in noise_report(per_seed[:1])
    report = noise_report(per_seed)
    assert report["seed_agreement"]["spearman"] == pytest.approx(seed_agreement(per_seed)["spearman"])
    record = {
        "config": {
            "preset": "x", "measurement": "loss", "subsets_with_models": 40, "seeds": 2, "queries": 30,
            "true_measurement_mc_samples": 8,
        },
        "methods": {"kfac": {"lds": 0.3, "ci95": [0.2, 0.4], "damping": 1e-8, "removal_prediction": True}},
        "noise": report,
    }
    assert "noise ceiling" in format_table(record)
    record["noise"] = noise_report(per_seed[:1])
    assert "noise ceiling" not in format_table(record)
