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


def test_a_fitted_classifier_is_kept_in_the_cache_folder_and_read_back_exactly(tmp_path, monkeypatch):
    """The app's first new sample of a server waited 5-18 s for mnist's fit; a cache folder keeps the fitted
    coefficients, a later call on the same data reads them back with the same probabilities and fits nothing,
    other data or settings miss, and a damaged file is fitted again."""
    from sklearn.linear_model import LogisticRegression

    from engine.model.label_classifier import fit_pixel_classifier

    rng = np.random.default_rng(0)
    x = rng.random((120, 16)).astype(np.float32)
    y = (x[:, :3].argmax(1)).astype(np.int64)  # 3 classes a linear model can learn
    first = fit_pixel_classifier(x, y, cache=tmp_path)
    (kept,) = tmp_path.glob("label-classifier-*.npz")
    test = rng.random((50, 16)).astype(np.float32)
    fits = []
    real_fit = LogisticRegression.fit
    monkeypatch.setattr(LogisticRegression, "fit", lambda self, *a, **k: fits.append(1) or real_fit(self, *a, **k))
    again = fit_pixel_classifier(x, y, cache=tmp_path)
    assert fits == [] and np.array_equal(again.predict_proba(test), first.predict_proba(test))
    assert np.array_equal(again.predict(test), first.predict(test))
    fit_pixel_classifier(x, y, max_iter=50, cache=tmp_path)  # other settings: another file
    fit_pixel_classifier(x[:100], y[:100], cache=tmp_path)  # other data: another file
    assert len(fits) == 2 and len(list(tmp_path.glob("label-classifier-*.npz"))) == 3
    kept.write_bytes(kept.read_bytes()[:100])  # cut short, as a full disk would leave it without the atomic write
    mended = fit_pixel_classifier(x, y, cache=tmp_path)
    assert len(fits) == 3 and np.array_equal(mended.predict_proba(test), first.predict_proba(test))
    assert fit_pixel_classifier(x, y, cache=tmp_path) is not None and len(fits) == 3  # rewritten whole
