"""The gradient class-structure diagnostic (issue 16): its summaries of a similarity matrix and its
K-FAC-metric cosine, on matrices whose answers are known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def gcs(load_script):
    return load_script("gradient_class_structure")


def test_structure_of_class_blocks(gcs):
    # two classes of three; within a class 0.5, across -0.1, an image with its own second estimate 0.9
    labels = np.array([0, 0, 0, 1, 1, 1])
    sim = np.where(labels[:, None] == labels[None], 0.5, -0.1)
    np.fill_diagonal(sim, 0.9)
    r = gcs.structure(sim, labels)
    assert r["self"] == pytest.approx(0.9)
    assert r["same_class"] == pytest.approx(0.5)
    assert r["other_class"] == pytest.approx(-0.1)
    assert r["nn_label_agreement"] == 1.0
    assert r["self_is_nearest"] == 1.0


def test_nearest_neighbour_ignores_the_image_itself(gcs):
    # each image's own entry is the largest, but its nearest *other* image is of the other class
    labels = np.array([0, 0, 1, 1])
    sim = np.array([[1.0, 0.0, 0.6, 0.0],
                    [0.0, 1.0, 0.0, 0.6],
                    [0.6, 0.0, 1.0, 0.0],
                    [0.0, 0.6, 0.0, 1.0]])
    r = gcs.structure(sim, labels)
    assert r["nn_label_agreement"] == 0.0
    assert r["self_is_nearest"] == 1.0


def test_metric_cosine_matches_explicit_weighting(gcs):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 7, generator=g).double(), torch.randn(5, 7, generator=g).double()
    w = torch.rand(7, generator=g).double() + 0.1
    got = gcs.cosine(a, b, w)
    sa, sb = a * w.sqrt(), b * w.sqrt()  # <u, v>_W = (W^1/2 u) . (W^1/2 v)
    want = torch.nn.functional.cosine_similarity(sa[:, None], sb[None], dim=2).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gcs.cosine(a, b), torch.nn.functional.cosine_similarity(
        a[:, None], b[None], dim=2).numpy(), rtol=1e-6, atol=1e-6)


def test_probe_indices_draws_per_class_and_refuses_small_classes(gcs):
    labels = np.array([0] * 5 + [1] * 3)
    idx = gcs.probe_indices(labels, 3, seed=0)
    assert np.bincount(labels[idx]).tolist() == [3, 3]
    assert len(set(idx.tolist())) == 6
    np.testing.assert_array_equal(idx, gcs.probe_indices(labels, 3, seed=0))  # seeded
    with pytest.raises(SystemExit, match="fewer than --per-class"):
        gcs.probe_indices(labels, 4)


def test_by_stage_separates_a_class_carrying_stage_from_a_noisy_one(gcs):
    # coordinates 0..3 hold a class code (two classes), 4..11 independent noise 3x larger
    g = torch.Generator().manual_seed(1)
    labels = np.array([0] * 6 + [1] * 6)
    code = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)[labels]

    def estimate():
        return torch.cat([code + 0.05 * torch.randn(12, 4, generator=g, dtype=torch.float64),
                          3.0 * torch.randn(12, 8, generator=g, dtype=torch.float64)], dim=1)

    ra, rb = estimate(), estimate()
    metric = torch.ones(12, dtype=torch.float64)
    rows = gcs.by_stage(ra, rb, metric, labels, {"class": torch.arange(4), "noise": torch.arange(4, 12)})
    assert rows["class"]["params"] == 4 and rows["noise"]["params"] == 8
    assert rows["class"]["energy_share"] + rows["noise"]["energy_share"] == pytest.approx(1.0)
    assert rows["noise"]["energy_share"] > 0.8  # the noise holds most of the energy ...
    assert rows["class"]["nn_label_agreement_unnormalised"] == 1.0  # ... the class stage alone finds the class
    whole = gcs.structure(((ra * metric) @ rb.T).numpy(), labels)["nn_label_agreement"]
    assert whole < 1.0  # and the sum, dominated by the noise, does not
