"""The mnist held-out check: real held-out digits pass it, noise and one-class samples fail it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import get_preset
from engine.model.data_mnist import read_shipped
from engine.model.label_classifier import classifier_for, heldout_quality, split_halves


def test_split_halves_partition_and_seed():
    a, b = split_halves(11, seed=3)
    assert len(a) == 5 and len(b) == 6
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(11))
    assert np.array_equal(split_halves(11, seed=3)[0], a) and not np.array_equal(split_halves(11, seed=4)[0], a)


def test_classifier_for_unlabelled_or_custom_data_is_none():
    preset = get_preset("mnist").replace(data={"root": "/somewhere/idx"})
    assert classifier_for(preset, None) is None
    assert classifier_for(get_preset("cifar2"), None) is None


@pytest.mark.slow
def test_heldout_check_passes_real_digits_and_fails_noise():
    clf = classifier_for(get_preset("mnist"), None)
    images, labels = read_shipped()
    _, held = split_halves(len(labels))
    held = np.random.default_rng(1).choice(held, 256, replace=False)  # the file is class-major: mix classes
    real = torch.from_numpy(images[held].astype(np.float32) / 127.5 - 1.0)[:, None]
    ok = heldout_quality(clf, real)
    assert ok["passes"] and ok["classes_among_confident_samples"] == 10
    assert 0.8 < ok["heldout_accuracy"] < 1.0 and abs(ok["ratio"] - 1.0) < 0.15
    noise = torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert not heldout_quality(clf, noise)["passes"]
    ones = real[torch.from_numpy(labels[held] == 1)]
    one_class = heldout_quality(clf, ones)
    assert one_class["classes_among_confident_samples"] < 9 and not one_class["passes"]
