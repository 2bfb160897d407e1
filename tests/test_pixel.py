"""Pixel similarity: centred cosine (Pearson correlation) of pixel values."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from engine.attribution.methods import make_method
from engine.attribution.methods.base import QueryInput


def _ctx(dataset):
    return SimpleNamespace(dataset=dataset, device=torch.device("cpu"))


def test_exact_copy_ranks_first(digits_small):
    method = make_method("pixel")
    assert (method.name, method.title, method.kind) == ("pixel", "Pixel similarity", "similarity")
    ctx = _ctx(digits_small)
    assert method.is_built(ctx) and method.availability(ctx) == (True, None)
    method.build(ctx)
    for i in (0, 17, 63):
        assert method.query_measurement(None) is None
        scores = method.score(method.prepare(ctx, QueryInput(image=digits_small.images[i].clone()), None))
        assert scores.dtype == np.float32 and scores.shape == (len(digits_small),)
        assert int(np.argmax(scores)) == i
        np.testing.assert_allclose(scores[i], 1.0, atol=1e-5)


def test_scores_are_pearson_correlations(digits_small):
    method = make_method("pixel")
    ctx = _ctx(digits_small)
    q = torch.rand(1, 8, 8) * 2 - 1
    scores = method.score(method.prepare(ctx, QueryInput(image=q), None))
    flat = digits_small.images.reshape(len(digits_small), -1).double().numpy()
    ref = [np.corrcoef(q.reshape(-1).double().numpy(), row)[0, 1] for row in flat]
    np.testing.assert_allclose(scores, ref, rtol=1e-4, atol=1e-5)
    # centring makes the score blind to a brightness shift and contrast scale of the query
    shifted = digits_small.images[5] * 0.5 + 0.3
    s2 = method.score(method.prepare(ctx, QueryInput(image=shifted), None))
    assert int(np.argmax(s2)) == 5 and abs(s2[5] - 1.0) < 1e-5


def test_constant_image_scores_zero(digits_small):
    method = make_method("pixel")
    scores = method.score(
        method.prepare(_ctx(digits_small), QueryInput(image=torch.full((1, 8, 8), -1.0)), None)
    )
    assert np.all(scores == 0.0)
