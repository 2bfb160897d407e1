"""Pixel similarity: centred cosine (Pearson correlation) of pixel values."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine.attribution.methods import make_method
from engine.attribution.methods.base import QueryInput, Unavailable
from engine.config import COMPUTE, ComputeConfig


def _ctx(dataset, compute: ComputeConfig = COMPUTE):
    return SimpleNamespace(dataset=dataset, device=torch.device("cpu"), compute=compute)


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


@pytest.mark.parametrize("value", [-1.0, 0.0, 0.37])
def test_blank_query_is_unavailable_not_a_ranking_of_zeros(digits_small, value):
    """A constant query has no variation to correlate: every score would be 0 and the "ranking" the
    training set in index order, so the method says why it cannot answer instead."""
    method = make_method("pixel")
    with pytest.raises(Unavailable, match="query image is blank") as raised:
        method.prepare(_ctx(digits_small), QueryInput(image=torch.full((1, 8, 8), value)), None)
    assert raised.value.about == "query"  # the query's problem: the app says it as it is, not "cannot run here"
    # one differing pixel is enough to be correlated
    q = torch.full((1, 8, 8), value)
    q[0, 3, 4] = 1.0 if value < 1.0 else -1.0
    scores = method.score(method.prepare(_ctx(digits_small), QueryInput(image=q), None))
    assert np.all(np.isfinite(scores)) and np.ptp(scores) > 0


def test_scores_are_float64_sums_rounded_whatever_the_chunking():
    """The shipped first-page scores are stored at float32 and must equal the live ones on any CPU; float32
    reductions, whose order follows the CPU's vector width, gave values a few ULPs apart on another machine
    (2026-12-05). The sums are now float64: the scores equal, element for element, numpy's float64 computation
    of the same steps (unit vectors rounded to float32, their dot products summed in float64 and rounded), and
    do not depend on the row chunking (the context's ``compute.pixel_chunk_rows``)."""
    gen = torch.Generator().manual_seed(0)
    train = torch.rand(3000, 1, 28, 28, generator=gen) * 2 - 1
    query = torch.rand(1, 28, 28, generator=gen) * 2 - 1

    def scores(compute: ComputeConfig = COMPUTE) -> np.ndarray:
        ctx = _ctx(SimpleNamespace(images=train), compute)
        method = make_method("pixel")
        return method.score(method.prepare(ctx, QueryInput(image=query), None))

    def unit64(x: np.ndarray) -> np.ndarray:  # numpy's float64 centring and norm, rounded to float32
        x = x - x.mean(axis=1, keepdims=True)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    rows = unit64(train.reshape(3000, -1).double().numpy()).astype(np.float64)
    q = unit64(query.reshape(1, -1).double().numpy())[0].astype(np.float64)
    reference = np.einsum("nd,d->n", rows, q).astype(np.float32)  # products exact in float64
    got = scores()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, reference)
    np.testing.assert_array_equal(scores(ComputeConfig(pixel_chunk_rows=7)), got)


def test_unavailable_says_whose_problem_it_is_and_refuses_other_words():
    """``Unavailable.about``: the server's by default (what a method's availability reports), the query's
    when said; any other word is a programming error, refused where it is made."""
    assert Unavailable("no weights").about == "server"
    assert Unavailable("blank", about="query").about == "query"
    with pytest.raises(ValueError, match="'server' or 'query'"):
        Unavailable("x", about="client")
