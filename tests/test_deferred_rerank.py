"""The compressed bank's exact re-rank deferred from the first answer (``RerankedQuery.defer_exact``,
``AttributionSession.query(defer_exact=True)``): the app answers from the compressed scan at once and the
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
    g = measurement_grad(model, ctx.diffusion, parse_measurement("loss", 1000), q,
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

    def session() -> AttributionSession:
        return AttributionSession(preset, checkpoint=folder, device="cpu", cache_root=tmp_path, config=config,
                                  dataset=digits_small, auto_build=True)

    cli, app = session(), session()  # two sessions: the CLI's answer does not share the app's re-rank
    q = cli.parse_query("train:2")
    exact = cli.query(q, "loss", methods=["kfac"]).methods["kfac"]
    assert exact.exact.any() and not exact.exact_pending and "re-ranked" in exact.bank_note()
    # the same session answers exactly unless the call defers (the app's retrain check does not)
    assert not app.query(q, "loss", methods=["kfac"]).methods["kfac"].exact_pending

    first = app.query(q, "loss", methods=["kfac"], defer_exact=True)
    k = first.methods["kfac"]
    assert k.exact_pending and not k.exact.any() and "exact ones are pending" in k.bank_note()
    assert first.prepared["kfac"].query.exact_pending
    assert "kfac" in app.fill_grids(first)  # the app's background worker
    assert not first.prepared["kfac"].query.exact_pending
    again = app.rescore(first, {"kfac": k.damping}).methods["kfac"]
    assert not again.exact_pending
    np.testing.assert_array_equal(again.exact, exact.exact)
    np.testing.assert_allclose(again.scores, exact.scores, rtol=1e-6, atol=1e-9)
    # each exact score's end reaches the answer (QA 61 F2: an end ranks only its own first), after a rescore too
    for r in (exact, again):
        assert r.exact_end is not None and np.array_equal(r.exact_end != 0, r.exact)


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


def test_a_stopped_rerank_stays_pending_and_a_later_ask_redoes_it():
    """The app's worker stops its re-rank when a newer query waits (its call's ``should_stop``): it stops
    at its next batch and stays pending, and the button's later ``apply``, with no ``should_stop`` of
    its own, computes it in full; a stop asked of an earlier call never reaches a later one."""
    from engine.attribution.rerank import RerankCancelled, Reranker

    started, stop, runs = threading.Event(), threading.Event(), []

    def score_fn(idx, lams, should_stop, progress):
        runs.append(1)
        for _ in range(50 if len(runs) == 1 else 1):  # batches, checked as rerank_scores checks them
            if should_stop is not None and should_stop():
                raise RerankCancelled("re-rank cancelled")
            started.set()
            time.sleep(0.02)
        return np.ones((len(idx), len(lams)))

    reranker = Reranker(score_fn, candidates=2, grid=())
    scores = np.arange(10, dtype=np.float32)
    worker = threading.Thread(target=reranker.apply, args=(scores, 1e-3), kwargs={"should_stop": stop.is_set})
    worker.start()
    started.wait(5)
    stop.set()
    worker.join(5)
    assert not worker.is_alive() and not reranker.ready
    out, mask = reranker.apply(scores, 1e-3)  # stop is still set, but it was the worker's call's
    assert reranker.ready and len(runs) == 2 and mask.sum() == 4 and (out[mask] == 1).all()


def _exact_of(idx, lams) -> np.ndarray:
    """A fake re-rank's exact scores: 100 * index + the damping's position."""
    return np.array([[100.0 * i + j for j in range(len(lams))] for i in idx])


def test_a_running_rerank_answers_with_its_most_extreme_candidates_exact_so_far():
    """While the re-rank runs, a deferred answer has the candidates done so far exact (the most extreme
    first) and says it is not final; an off-grid damping it cannot interpolate stays approximate."""
    from engine.attribution.rerank import Reranker

    two_done, release = threading.Event(), threading.Event()

    def score_fn(idx, lams, should_stop, progress):
        for d, i in enumerate(idx, 1):  # batches of one candidate
            progress(d, len(idx), _exact_of([i], lams))
            if d == 2:
                two_done.set()
                release.wait(5)
        return _exact_of(idx, lams)

    reranker = Reranker(score_fn, candidates=3, grid=())
    scores = np.array([0.5, 9.0, -4.0, 0.1, 3.0, -2.0, 0.0], dtype=np.float32)
    worker = threading.Thread(target=reranker.apply, args=(scores, 1e-3))
    worker.start()
    assert two_done.wait(5)
    out, mask, final = reranker.answer(scores, 1e-3, compute=False)
    assert not final and mask.tolist() == [i in (1, 2) for i in range(7)]  # the largest and the smallest
    assert out[1] == 100.0 and out[2] == 200.0 and out[4] == scores[4]
    out, mask, final = reranker.answer(scores, 5e-3, compute=False)  # not in the re-rank's dampings, no grid
    assert not final and not mask.any()
    release.set()
    worker.join(5)
    out, mask, final = reranker.answer(scores, 1e-3, compute=False)
    assert final and mask.sum() == 6 and out[4] == 400.0 and out[5] == 500.0


def test_a_stopped_rerank_resumes_after_the_candidates_it_had_done():
    """The app's worker stops a re-rank when its tab asks something newer; a return to that query (the
    button, or its tab's next fill) redoes only the candidates not done, with the same exact scores."""
    from engine.attribution.rerank import Reranker

    asked: list[list[int]] = []
    stop = threading.Event()

    def score_fn(idx, lams, should_stop, progress):
        from engine.attribution.rerank import RerankCancelled

        asked.append([int(i) for i in idx])
        for d, i in enumerate(idx, 1):
            if should_stop is not None and should_stop():
                raise RerankCancelled("re-rank cancelled")
            progress(d, len(idx), _exact_of([i], lams))
            if d == 3:
                stop.set()
        return _exact_of(idx, lams)

    scores = np.array([0.5, 9.0, -4.0, 0.1, 3.0, -2.0, 0.0], dtype=np.float32)
    reranker = Reranker(score_fn, candidates=3, grid=())
    out, mask, final = reranker.answer(scores, 1e-3, should_stop=stop.is_set)
    assert not final and not reranker.ready and mask.sum() == 3  # stopped after three: those stay exact
    assert asked == [[1, 2, 4, 5, 0, 6]]
    out, mask, final = reranker.answer(scores, 1e-3)
    assert final and asked[1] == [5, 0, 6]  # only the rest
    uninterrupted = Reranker(score_fn, candidates=3, grid=())
    np.testing.assert_array_equal(uninterrupted.apply(scores, 1e-3)[0], out)


def test_a_resumed_reranks_progress_counts_on_from_its_stopped_attempt():
    """The page's "Exact re-rank: N of 512 candidates (T s ...)" restarted T at 0 when a stopped re-rank
    resumed; it counts on from the time its stopped attempts ran."""
    import time

    from engine.attribution.rerank import RerankCancelled, Reranker

    seconds: list[list[float]] = []
    stop = threading.Event()

    def score_fn(idx, lams, should_stop, progress):
        seconds.append([])
        for d, i in enumerate(idx, 1):
            if should_stop is not None and should_stop():
                raise RerankCancelled("re-rank cancelled")
            time.sleep(0.2)
            progress(d, len(idx), _exact_of([i], lams))
            seconds[-1].append(reranker.progress.seconds)
            if d == 2:
                stop.set()
        return _exact_of(idx, lams)

    scores = np.array([0.5, 9.0, -4.0, 0.1, 3.0, -2.0, 0.0], dtype=np.float32)
    reranker = Reranker(score_fn, candidates=3, grid=())
    assert not reranker.answer(scores, 1e-3, should_stop=stop.is_set)[2]  # stopped after two batches
    assert reranker.answer(scores, 1e-3)[2]
    first, resumed = seconds
    assert len(first) == 2 and len(resumed) == 4
    assert resumed[0] >= first[-1] + 0.15  # on from the stopped attempt's 0.4 s, not from 0


def _rerank_scores_of(tiny_model, diffusion, digits_small, n: int, **kw):
    """``rerank_scores`` of the first ``n`` digits in batches of 2 (factors from the same images)."""
    from engine.attribution.curvature import compute_kfac
    from engine.attribution.gradients import influence_params
    from engine.attribution.rerank import rerank_scores

    params = influence_params(tiny_model)
    x = digits_small.images[:n]
    draws = make_draws(2, (1, 8, 8), 1000, seed=0)
    full = compute_kfac(tiny_model, diffusion, x, draws, params)
    q = full.rotate(torch.randn(full.num_params))
    return rerank_scores(tiny_model, diffusion, x, draws, full, params, q, [1e-3], n, grad_batch=2, **kw)


def test_rerank_scores_stops_before_a_batch_when_asked(tiny_model, diffusion, digits_small):
    from engine.attribution.rerank import RerankCancelled

    batches = []
    with pytest.raises(RerankCancelled):
        _rerank_scores_of(tiny_model, diffusion, digits_small, 4,
                          should_stop=lambda: (batches.append(1), len(batches) > 1)[1])
    assert len(batches) == 2  # the first batch ran, the second was refused


def test_the_grid_filler_stops_the_running_rerank_of_a_superseded_query():
    from explorer.grid_filler import GridFiller

    release, running = threading.Event(), threading.Event()

    class FakeSession:
        def __init__(self):
            self.asked = {}

        def fill_grids(self, result, should_stop):
            running.set()
            self.asked[result] = [should_stop()]
            release.wait(5)
            self.asked[result].append(should_stop())

    session, filler = FakeSession(), GridFiller()
    first, second = "first", "second"
    filler.submit(session, first)
    assert running.wait(5)
    filler.submit(session, second)  # the user picked another sample while the first was being filled
    release.set()
    assert filler.wait_idle(10)
    # the first fill was told to stop once the second waited; the second, the latest, never was
    assert session.asked == {first: [False, True], second: [False, False]}


def test_rerank_scores_reports_its_progress_and_each_batchs_scores(tiny_model, diffusion, digits_small):
    """After each batch: the candidates done, and that batch's exact scores (the partial answer's rows)."""
    seen: list[tuple[int, int]] = []
    rows: list[np.ndarray] = []
    out = _rerank_scores_of(tiny_model, diffusion, digits_small, 5,
                            progress=lambda done, total, r: (seen.append((done, total)), rows.append(r)))
    assert seen == [(1, 5), (2, 5), (4, 5), (5, 5)]  # the first batch of 2 in parts of 1 (first_batch_size)
    assert [r.shape for r in rows] == [(1, 1), (1, 1), (2, 1), (1, 1)]
    np.testing.assert_array_equal(np.concatenate(rows), out)


def test_a_running_rerank_reports_its_progress_and_none_once_done(monkeypatch):
    """``Reranker.progress`` (the app's progress bar): candidates done, seconds, and the time left at the
    rate of the batches after the first (whose start-up would overstate it) while the exact scores are
    being computed; None before, after, and after a cancel."""
    from types import SimpleNamespace

    from engine.attribution import rerank
    from engine.attribution.rerank import Reranker, RerankProgress

    clock = [100.0]
    monkeypatch.setattr(rerank, "time", SimpleNamespace(monotonic=lambda: clock[0], perf_counter=time.perf_counter))
    first, halfway, release, release2 = (threading.Event() for _ in range(4))

    def score_fn(idx, lams, should_stop, progress):
        clock[0] = 130.0  # a slow first batch: 30 s of start-up
        progress(1, len(idx))
        first.set()
        release.wait(5)
        clock[0] = 140.0  # then 10 s per candidate
        progress(2, len(idx))
        halfway.set()
        release2.wait(5)
        progress(len(idx), len(idx))
        return np.ones((len(idx), len(lams)))

    reranker = Reranker(score_fn, candidates=2, grid=())
    assert reranker.progress is None
    worker = threading.Thread(target=reranker.apply, args=(np.arange(10, dtype=np.float32), 1e-3))
    worker.start()
    assert first.wait(5)
    assert reranker.progress == RerankProgress(1, 4, 30.0, None)  # one batch: no rate yet
    release.set()
    assert halfway.wait(5)
    assert reranker.progress == RerankProgress(2, 4, 40.0, 20.0)  # 2 left at 10 s each, not 40 s at 20 s each
    release2.set()
    worker.join(5)
    assert reranker.ready and reranker.progress is None


def test_rerank_scores_draws_a_terminal_bar_on_the_main_thread_only(tiny_model, diffusion, digits_small,
                                                                   monkeypatch):
    """The CLI (main thread) gets tqdm's bar; the app's worker thread, whose terminal is the server's log,
    does not (the page shows ``progress``).  The CLI's bar passes no ``disable``: tqdm's default draws into a
    log file too, and ``TQDM_DISABLE=1`` (which an explicit argument would override) still silences it."""
    import tqdm.auto

    made: list = []
    real = tqdm.auto.tqdm

    def recording(*args, **kw):
        made.append((threading.current_thread() is threading.main_thread(), kw))
        return real(*args, **kw)

    monkeypatch.setattr(tqdm.auto, "tqdm", recording)
    _rerank_scores_of(tiny_model, diffusion, digits_small, 4)
    worker = threading.Thread(target=_rerank_scores_of, args=(tiny_model, diffusion, digits_small, 4))
    worker.start()
    worker.join(60)
    assert [main for main, _ in made] == [True]  # the worker made none
    kw = made[0][1]
    assert "disable" not in kw and kw["total"] == 4 and kw["unit"] == "candidate" and kw["delay"] > 0


def test_the_cli_rerank_bar_is_written_to_a_log_file_when_it_lasts(tiny_model, diffusion, digits_small, monkeypatch,
                                                                   capsys):
    """QA 54 F6b: ``query --json 2> log`` on a compressed bank re-ranked 64 CIFAR candidates for 317 s and wrote
    nothing (the bar was tqdm's ``disable=None``: a terminal only).  Under pytest stderr is no terminal: a re-rank
    that lasts (here: any, with the delay at 0) draws its bar there, counting candidates; one done within the
    delay draws nothing, not even at its close."""
    import engine.attribution.rerank as rerank

    _rerank_scores_of(tiny_model, diffusion, digits_small, 4)  # the default delay: done long before it
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(rerank, "BAR_DELAY_S", 0.0, raising=False)
    _rerank_scores_of(tiny_model, diffusion, digits_small, 4)
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines, "no bar on stderr"
    last = lines[-1]
    assert last.startswith("K-FAC re-rank: candidates' exact scores: 100%") and "4/4" in last, err
    assert "candidate/s" in last or "s/candidate" in last, err


def test_a_rerank_does_its_first_candidates_in_a_smaller_batch_with_the_same_scores(tiny_model, diffusion,
                                                                                    digits_small):
    """QA 54 F6c: the app's re-rank bar moved in steps of 16 candidates, nothing exact for the first 87 s of a
    5-min CIFAR re-rank on a CPU.  The first batch is a quarter of ``grad_batch`` (the most extreme candidates,
    ``merge_candidates``'s order), on the CPU; the scores are the bytes of the old equal batches (each gradient is
    its own, and each part is combined in its place in the whole first batch's product: products round by their
    shape and a row's place, and a row alone or among 2 differed from the same row in the batch's product)."""
    done: list[int] = []
    torch.manual_seed(5)  # the helper's query
    got = _rerank_scores_of(tiny_model, diffusion, digits_small, 5, progress=lambda d, t, r: done.append(d))
    assert done == [1, 2, 4, 5]  # batches of 2: the first in parts of 1

    from engine.attribution.rerank import batches, first_batch_size

    assert first_batch_size(16) == 4 and first_batch_size(2) == 1 and first_batch_size(1) == 1
    parts = [(b.start, b.stop, p.start, p.stop) for b, p in batches(10, 4, 1)]
    assert parts == [(0, 4, 0, 1), (0, 4, 1, 2), (0, 4, 2, 3), (0, 4, 3, 4), (4, 8, 4, 8), (8, 10, 8, 10)]
    assert [p for _, p in batches(6, 4, 2)] == [slice(0, 2), slice(2, 4), slice(4, 6)]
    assert [p for _, p in batches(5, 4)] == [slice(0, 4), slice(4, 5)]
    assert [p for _, p in batches(1, 16, 4)] == [slice(0, 1)] and batches(0, 16, 4) == []
    import engine.attribution.rerank as rerank

    real = rerank._per_batch
    try:  # the same re-rank in equal batches of 2 (the old schedule)
        rerank._per_batch = lambda *a, **kw: real(*a, **{**kw, "first_batch": None})
        torch.manual_seed(5)
        even = _rerank_scores_of(tiny_model, diffusion, digits_small, 5)
    finally:
        rerank._per_batch = real
    assert got.tobytes() == even.tobytes()


def test_exact_columns_are_each_querys_rerank_scores(tiny_model, diffusion, digits_small):
    """``exact_columns`` (the group views' exact member scores for a compressed bank): for Q queries at one
    damping, each image's gradient once, the same as ``rerank_scores`` of each query; queries that do not
    fit ``max_query_bytes`` together go in passes of their own, with the same result."""
    from engine.attribution.curvature import compute_kfac
    from engine.attribution.gradients import influence_params
    from engine.attribution.rerank import exact_columns, rerank_scores

    params = influence_params(tiny_model)
    x = digits_small.images[:5]
    draws = make_draws(2, (1, 8, 8), 1000, seed=0)
    full = compute_kfac(tiny_model, diffusion, x, draws, params)
    grads = torch.randn(3, full.num_params, generator=torch.Generator().manual_seed(4))
    got = exact_columns(tiny_model, diffusion, x, draws, full, params, grads, 1e-3, 5, grad_batch=2)
    assert got.shape == (5, 3)
    for q in range(3):
        want = rerank_scores(tiny_model, diffusion, x, draws, full, params, full.rotate(grads[q]), [1e-3], 5,
                             grad_batch=2)[:, 0]
        np.testing.assert_allclose(got[:, q], want, rtol=1e-4, atol=2e-5 * np.abs(want).max())  # float32 rotations
    one_by_one = exact_columns(tiny_model, diffusion, x, draws, full, params, grads, 1e-3, 5, grad_batch=2,
                               max_query_bytes=1)
    np.testing.assert_allclose(one_by_one, got, rtol=1e-4, atol=2e-5 * np.abs(got).max())


def test_a_compressed_banks_note_when_every_score_is_exact_has_no_other_0():
    """QA 54 F8: with every training image a candidate (64 of 64 at CIFAR size, 2C >= N) the note read "64
    candidates at both ends re-ranked to exact K-FAC scores, the other 0 estimated"; it says all are exact.
    A partly estimated answer keeps its words."""
    from engine.attribution.results import MethodResult

    every = MethodResult(name="kfac", title="K-FAC", kind="influence", caption="", status="ok", bank="compressed",
                         scores=np.arange(64, dtype=np.float32), exact=np.ones(64, dtype=bool))
    assert every.bank_note() == "compressed bank: all 64 training images re-ranked to exact K-FAC scores, none estimated"
    some = np.zeros(64, dtype=bool)
    some[:8] = True
    note = dataclasses.replace(every, exact=some, estimate_scale=2.0).bank_note()
    assert note.startswith("compressed bank: 8 candidates at both ends re-ranked to exact K-FAC scores, the other "
                           "56 estimated (the compressed scan x 2"), note


def test_a_stored_banks_note_does_not_call_its_rounded_scores_exact():
    """Review 2026-12-06: the stored bank's note said "every score exact", but its int8 rows are rounded (about
    1e-3 relative to float32 scores): every image is scored, none estimated, which is what it now says; the
    compressed bank's "exact" keeps its meaning (re-scored from fresh gradients)."""
    from engine.attribution.results import MethodResult

    stored = MethodResult(name="kfac", title="K-FAC", kind="influence", caption="", status="ok", bank="stored")
    assert "exact" not in stored.bank_note() and "int8" in stored.bank_note() and "none estimated" in stored.bank_note()
    streamed = dataclasses.replace(stored, bank="streamed")
    assert "none estimated" in streamed.bank_note() and "exact" not in streamed.bank_note()
