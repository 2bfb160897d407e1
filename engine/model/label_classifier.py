"""Which classifier gives a generated image its label, per preset, and the held-out quality check.

Labels of generated images (gallery, new samples, uploads) come from a pixel logistic
regression, never from the diffusion model, so they are an independent witness:

- digits: trained on the 1,797 real digits (the training set itself, as before);
- mnist: trained on half of the shipped 10,000 real MNIST digits (``split_halves``), so
  the other half is a held-out reference that measures the classifier on real data.

``heldout_quality`` is mnist's answer to "do the samples look like digits?": the fraction
of n samples the classifier labels with probability >= 0.8 against the same fraction on
the held-out real half; the check passes when the samples reach >= 90% of the real rate
with >= 9 classes among the confident samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..config import Preset
from .dataset import ImageDataset, to_unit_range

if TYPE_CHECKING:  # scikit-learn is imported where a classifier is fitted
    from sklearn.linear_model import LogisticRegression

CONFIDENT = 0.8
REQUIRED_RATIO = 0.9
REQUIRED_CLASSES = 9


def fit_pixel_classifier(x01: np.ndarray, labels: np.ndarray, max_iter: int = 300,
                         cache: Path | None = None) -> LogisticRegression:
    """Multinomial logistic regression on [0, 1] pixel vectors (n, D).  With ``cache`` (a folder), the fitted
    coefficients are kept there and read back by a later call on the same data and settings (``_cached_fit``)."""
    return _fit(x01, labels, max_iter) if cache is None else _cached_fit(x01, labels, max_iter, cache)


def _fit(x01: np.ndarray, labels: np.ndarray, max_iter: int) -> LogisticRegression:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=max_iter, C=1.0)
    clf.fit(x01, labels)
    return clf


def _cached_fit(x01: np.ndarray, labels: np.ndarray, max_iter: int, cache: Path) -> LogisticRegression:
    """``_fit``'s classifier, its coefficients kept in ``cache/label-classifier-<key>.npz``.

    Why: the app's first new sample or upload of a server waited for this fit, about 7 s of a 10.3 s click at load
    4.4 and 13-18 s beside a test run (mnist: 5,000 x 784 pixels, about 100 L-BFGS steps).  The key is a hash of
    the pixels, the labels, the settings and scikit-learn's version, so other data or another fit is a miss; a
    file that does not read back whole and consistent is a miss, fitted again and rewritten (atomically).  The
    read-back classifier has the fitted one's exact float64 coefficients, so its labels and probabilities are the
    same."""
    import hashlib

    import sklearn
    from sklearn.linear_model import LogisticRegression

    from ..files import save_npz
    from ..npy_read import load_npz

    h = hashlib.sha256()
    for part in (np.ascontiguousarray(x01), np.ascontiguousarray(labels)):
        h.update(f"{part.dtype.str}{part.shape}".encode())
        h.update(memoryview(part).cast("B"))
    h.update(f"C=1.0 max_iter={max_iter} sklearn={sklearn.__version__}".encode())  # _fit's settings
    path = Path(cache) / f"label-classifier-{h.hexdigest()[:20]}.npz"
    try:
        with load_npz(path) as z:
            coef, intercept, classes = z["coef"], z["intercept"], z["classes"]
        if coef.shape == (len(classes) if len(classes) > 2 else 1, x01.shape[1]) and \
                intercept.shape == coef.shape[:1] and np.array_equal(classes, np.unique(labels)):
            clf = LogisticRegression(max_iter=max_iter, C=1.0)
            clf.coef_, clf.intercept_, clf.classes_ = coef, intercept, classes
            clf.n_features_in_ = int(x01.shape[1])
            return clf
    except Exception:  # noqa: BLE001 - no file, or a damaged one of any kind: fitted again
        pass
    clf = _fit(x01, labels, max_iter)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_npz(path, coef=clf.coef_, intercept=clf.intercept_, classes=clf.classes_)
    except OSError:  # a read-only cache: fitted each time, as without one
        pass
    return clf


def classify(clf: LogisticRegression, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(predicted label, max probability) for images in [-1, 1]."""
    proba = clf.predict_proba(to_unit_range(images).flatten(1).numpy())
    return proba.argmax(1), proba.max(1)


def split_halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of 0..n-1 into (classifier half, held-out half), each sorted."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])


def _shipped_halves(seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    from .data_mnist import read_shipped

    images, labels = read_shipped()
    x01 = images.reshape(len(images), -1).astype(np.float32) / 255.0
    fit, held = split_halves(len(labels), seed)
    return (x01[fit], labels[fit]), (x01[held], labels[held])


def digits_classifier(dataset: ImageDataset, cache: Path | None = None) -> LogisticRegression:
    """Logistic regression on the real digits, inputs as [0, 1] pixel vectors (``cache``: as
    ``fit_pixel_classifier``'s)."""
    x = to_unit_range(dataset.images).flatten(1).numpy()
    return fit_pixel_classifier(x, dataset.labels.numpy(), max_iter=2000, cache=cache)


def has_classifier(preset: Preset, dataset: ImageDataset | None) -> bool:
    """Whether ``classifier_for`` gives one, without fitting it (a caller says "labelling ..." first: 2-10 s)."""
    if preset.data.name == "mnist" and preset.data.root is None:
        return True
    return preset.data.name == "digits" and dataset is not None and dataset.labels is not None


def classifier_for(preset: Preset, dataset: ImageDataset | None,
                   cache: Path | None = None) -> LogisticRegression | None:
    """The labelling classifier of ``preset`` or None when the preset has no labelled reference (``cache``: a
    folder where the fitted coefficients are kept, ``fit_pixel_classifier``)."""
    if not has_classifier(preset, dataset):
        return None
    if preset.data.name == "mnist":
        (x, y), _ = _shipped_halves()
        return fit_pixel_classifier(x, y, cache=cache)
    return digits_classifier(dataset, cache=cache)


def heldout_quality(clf: LogisticRegression, samples: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    """Confident fraction of ``samples`` (in [-1, 1]) vs the held-out real half; pass/fail as documented."""
    _, (x_held, y_held) = _shipped_halves(seed)
    lab_s, p_s = classify(clf, samples)
    p_r = clf.predict_proba(x_held)
    confident = p_s >= CONFIDENT
    rate_s, rate_r = float(confident.mean()), float((p_r.max(1) >= CONFIDENT).mean())
    classes = int(len(np.unique(lab_s[confident])))
    return {
        "n": int(len(samples)),
        "samples_confident_fraction": rate_s,
        "heldout_real_confident_fraction": rate_r,
        "ratio": rate_s / rate_r if rate_r else float("nan"),
        "classes_among_confident_samples": classes,
        "samples_class_histogram": np.bincount(lab_s, minlength=10).tolist(),
        "heldout_accuracy": float((p_r.argmax(1) == y_held).mean()),
        "passes": bool(rate_s >= REQUIRED_RATIO * rate_r and classes >= REQUIRED_CLASSES),
        "rule": f"samples' confident (p >= {CONFIDENT}) fraction >= {REQUIRED_RATIO} x the held-out "
        f"real half's, with >= {REQUIRED_CLASSES} classes among the confident samples",
        "classifier": "sklearn LogisticRegression on [0,1] pixels of half (seed 0) of the shipped "
        f"10,000 MNIST digits; held out: the other {len(y_held)}",
    }
