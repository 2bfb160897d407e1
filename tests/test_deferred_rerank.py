"""The compressed bank's exact re-rank deferred from the first answer (``RerankedQuery.defer_exact``,
``AttributionSession(defer_exact=True)``): the app answers from the compressed scan at once and the
2C x M fresh gradient rows run afterwards, the same exact scores as answering at once."""

from __future__ import annotations

import copy
import dataclasses
import threading
import time

import numpy as np
import pytest
import torch
from test_session import TINY_ATTRIBUTION, tiny_checkpoint

from engine.attribution.context import make_context
from engine.attribution.gradients import measurement_grad
from engine.attribution.methods.kfac_influence import KFACInfluence
from engine.attribution.query import QueryInput
from engine.attribution.session import AttributionSession
from engine.config import AttributionConfig
from engine.model.diffusion import make_draws
from engine.model.measurements import parse_measurement

COMPRESSED = dict(kfac_bank="compressed", kfac_projection="gaussian", kfac_compression=16.0, kfac_rerank=3)


def _method_and_query(tiny_preset, tiny_model, digits_small, rerank: int = 3):
    model = copy.deepcopy(tiny_model).double()
    ds = digits_small.subset(list(range(16)))
    config = AttributionConfig(mc_samples=3, seed=0, **{**COMPRESSED, "kfac_rerank": rerank})
    ctx = make_context(tiny_preset, model, ds, "cpu", config, "c" * 16, None)
    q = QueryInput(image=ds.images[3])
    g = measurement_grad(model, ctx.diffusion, parse_measurement("loss"), q,
                         make_draws(3, (1, 8, 8), 1000, seed=1), 17, ctx.params)
    m = KFACInfluence(config)
    m.build(ctx)
    return m, ctx, q, g


def _count_reranks(prepared, delay: float = 0.0) -> list[int]:
    calls: list[int] = []
    reranker = prepared.query.reranker
    original = reranker.score_fn

    def counted(*a):
        calls.append(1)
        time.sleep(delay)
        return original(*a)

    reranker.score_fn = counted
    return calls


def test_deferred_first_answer_is_the_scan_and_fill_exact_gives_the_exact_answer(tiny_preset, tiny_model,
                                                                                  digits_small):
    m, ctx, q, g = _method_and_query(tiny_preset, tiny_model, digits_small)
    at_once = m.prepare(ctx, q, g)
    exact_now = m.score(at_once, 1e-3)
    assert at_once.exact.sum() >= 3 and not at_once.exact_pending

    no_rerank, _, _, _ = _method_and_query(tiny_preset, tiny_model, digits_small, rerank=0)
    scan_only = no_rerank.score(no_rerank.prepare(ctx, q, g), 1e-3)

    later = m.prepare(ctx, q, g)
    later.query.defer_exact = True
    calls = _count_reranks(later)
    first = m.score(later, 1e-3)
    assert not calls and later.exact_pending and not later.exact.any()
    np.testing.assert_array_equal(first, scan_only)  # the first answer is the compressed scan alone
    m.score(later, 1e-2)  # another damping before the fill is still the scan, and still no gradients
    assert not calls and later.exact_pending

    assert later.query.fill_exact() is True
    assert later.query.fill_exact() is False  # done once
    after = m.score(later, 1e-3)
    assert calls == [1] and not later.exact_pending
    np.testing.assert_array_equal(after, exact_now)
    np.testing.assert_array_equal(later.exact, at_once.exact)


def test_two_fills_at_once_run_one_rerank(tiny_preset, tiny_model, digits_small):
    """The app's background worker and a user's click may both ask: the second waits for the first."""
    m, ctx, q, g = _method_and_query(tiny_preset, tiny_model, digits_small)
    prepared = m.prepare(ctx, q, g)
    prepared.query.defer_exact = True
    m.score(prepared, 1e-3)
    calls = _count_reranks(prepared, delay=0.3)
    threads = [threading.Thread(target=prepared.query.fill_exact) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1] and not prepared.query.exact_pending


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, digits_small):
    folder = tmp_path_factory.mktemp("tiny_ckpt_deferred")
    return folder, tiny_checkpoint(folder, digits_small, gallery=1)


def test_a_deferring_session_answers_approximately_then_exactly_after_fill_grids(ckpt, digits_small, tmp_path):
    folder, preset = ckpt
    config = dataclasses.replace(TINY_ATTRIBUTION, **COMPRESSED)

    def session(defer: bool) -> AttributionSession:
        return AttributionSession(preset, checkpoint=folder, device="cpu", cache_root=tmp_path, config=config,
                                  dataset=digits_small, auto_build=True, defer_exact=defer)

    cli, app = session(False), session(True)
    q = cli.parse_query("train:2")
    exact = cli.query(q, "loss", methods=["kfac"]).methods["kfac"]
    assert exact.exact.any() and not exact.exact_pending and "re-ranked" in exact.bank_note()

    first = app.query(q, "loss", methods=["kfac"])
    k = first.methods["kfac"]
    assert k.exact_pending and not k.exact.any() and "being computed" in k.bank_note()
    assert first.prepared["kfac"].query.exact_pending
    assert "kfac" in app.fill_grids(first)  # the app's background worker
    assert not first.prepared["kfac"].query.exact_pending
    again = app.rescore(first, {"kfac": k.damping}).methods["kfac"]
    assert not again.exact_pending
    np.testing.assert_array_equal(again.exact, exact.exact)
    np.testing.assert_allclose(again.scores, exact.scores, rtol=1e-6, atol=1e-9)


def test_a_damping_change_during_the_background_rerank_answers_at_once(tiny_preset, tiny_model, digits_small):
    """While the re-rank runs in the app's worker, re-scoring (the damping slider) shows the scan's
    scores without waiting for it; afterwards the same call is exact."""
    m, ctx, q, g = _method_and_query(tiny_preset, tiny_model, digits_small)
    prepared = m.prepare(ctx, q, g)
    prepared.query.defer_exact = True
    m.score(prepared, 1e-3)
    calls = _count_reranks(prepared, delay=2.0)
    worker = threading.Thread(target=prepared.query.fill_exact)
    worker.start()
    while not calls:
        time.sleep(0.01)
    t0 = time.perf_counter()
    m.score(prepared, 1e-2)
    assert time.perf_counter() - t0 < 1.0 and not prepared.exact.any()
    worker.join()
    m.score(prepared, 1e-2)
    assert prepared.exact.sum() >= 3 and calls == [1]


def test_a_cancelled_rerank_stays_pending_and_a_later_ask_redoes_it():
    """The app's worker cancels a superseded query's running re-rank (``Reranker.cancel``): it stops at
    its next batch, stays pending, and the button's later ``apply`` computes it in full."""
    from engine.attribution.rerank import RerankCancelled, Reranker

    started, runs = threading.Event(), []

    def score_fn(idx, lams):
        runs.append(1)
        if len(runs) == 1:  # the first run waits to be cancelled, as rerank_scores checks between batches
            started.set()
            for _ in range(500):
                if reranker.stopped():
                    raise RerankCancelled("re-rank cancelled")
                time.sleep(0.01)
        return np.ones((len(idx), len(lams)))

    reranker = Reranker(score_fn, candidates=2, grid=())
    scores = np.arange(10, dtype=np.float32)
    worker = threading.Thread(target=reranker.apply, args=(scores, 1e-3))
    worker.start()
    started.wait(5)
    reranker.cancel()
    worker.join(5)
    assert not worker.is_alive() and not reranker.ready
    out, mask = reranker.apply(scores, 1e-3)
    assert reranker.ready and len(runs) == 2 and mask.sum() == 4 and (out[mask] == 1).all()


def test_rerank_scores_stops_before_a_batch_when_asked(tiny_model, diffusion, digits_small):
    from engine.attribution.curvature import compute_kfac
    from engine.attribution.gradients import influence_params
    from engine.attribution.rerank import RerankCancelled, rerank_scores

    params = influence_params(tiny_model)
    x = digits_small.images[:4]
    draws = make_draws(2, (1, 8, 8), 1000, seed=0)
    full = compute_kfac(tiny_model, diffusion, x, draws, params)
    q = full.rotate(torch.randn(full.num_params))
    batches = []
    with pytest.raises(RerankCancelled):
        rerank_scores(tiny_model, diffusion, x, draws, full, params, q, [1e-3], 4, grad_batch=2,
                      should_stop=lambda: (batches.append(1), len(batches) > 1)[1])
    assert len(batches) == 2  # the first batch ran, the second was refused


def test_the_grid_filler_cancels_the_running_rerank_of_a_superseded_query():
    from explorer.grid_filler import GridFiller

    release, running = threading.Event(), threading.Event()

    class FakeSession:
        def __init__(self):
            self.cancelled = []

        def fill_grids(self, result):
            running.set()
            release.wait(5)

        def cancel_exact(self, result):
            self.cancelled.append(result)

    session, filler = FakeSession(), GridFiller()
    first, second = object(), object()
    filler.submit(session, first)
    assert running.wait(5)
    filler.submit(session, second)  # the user picked another sample while the first was being filled
    assert session.cancelled == [first]
    release.set()
    assert filler.wait_idle(10) and session.cancelled == [first]
