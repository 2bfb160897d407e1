"""Compressed K-FAC bank (engine.attribution.layer_projection, engine.attribution.compressed_bank; issue 11): projected gradients
from hooks, full-rank equivalence with the stored bank, exact re-ranking, cache keys, sharded candidates."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.attribution.compressed_bank import (
    EVEN,
    CandidateSplit,
    compress_factors,
    local_candidates,
    merge_candidates,
)
from engine.attribution.context import make_context
from engine.attribution.curvature import compute_kfac
from engine.attribution.gradients import influence_params, measurement_grad, per_example_grads
from engine.attribution.layer_projection import (
    bank_bytes,
    choose_dims,
    make_projections,
    projected_blocks,
    projected_grads,
)
from engine.attribution.methods.kfac_compressed_bank import COMPRESSED, compressed_settings
from engine.attribution.methods.kfac_influence import KFACInfluence
from engine.attribution.query import QueryInput
from engine.attribution.rerank import score_moments, split_ends
from engine.attribution.results import MethodResult, QueryResult
from engine.attribution.store import Store
from engine.config import AttributionConfig
from engine.model.diffusion import Diffusion, make_draws
from engine.model.measurements import parse_measurement

LOSS = parse_measurement("loss", 1000)


def _setup(tiny_preset, tiny_model, digits_small, n: int = 12, store=None, **cfg):
    model = copy.deepcopy(tiny_model).double()  # float64: compare paths to 1e-6
    ds = digits_small.subset(list(range(n)))
    config = AttributionConfig(mc_samples=3, seed=0, **cfg)
    ctx = make_context(tiny_preset, model, ds, "cpu", config, "c" * 16, store)
    q = QueryInput(image=ds.images[3])
    g = measurement_grad(model, ctx.diffusion, LOSS, q, make_draws(3, (1, 8, 8), 1000, seed=1), 17, ctx.params)
    return ctx, q, g


def _stored_and_compressed(ctx, rerank: int):
    """(float stored K-FAC method, compressed one: gaussian 16x with ``rerank`` candidates per end, its
    config, its context), both built on ``ctx``'s examples."""
    stored = KFACInfluence(ctx.config, quantize=False)
    stored.build(ctx)
    cfg = dataclasses.replace(ctx.config, kfac_bank="compressed", kfac_projection="gaussian",
                              kfac_compression=16.0, kfac_rerank=rerank)
    ctx_c = dataclasses.replace(ctx, config=cfg)
    comp = KFACInfluence(cfg)
    comp.build(ctx_c)
    return stored, comp, cfg, ctx_c


@pytest.mark.parametrize("kind", ["eigen", "gaussian"])
def test_hook_projected_grads_equal_projection_of_autograd_grads(tiny_model, diffusion, digits_small, kind):
    model = copy.deepcopy(tiny_model).double()
    params = influence_params(model)
    x = digits_small.images[:5].double()
    draws = make_draws(3, (1, 8, 8), 1000, seed=0)
    full = compute_kfac(model, diffusion, x, draws, params)
    comp = compress_factors(full, kind, 6.0, seed=3)
    got = projected_grads(model, diffusion, x, draws, params, comp.projections, comp.blocks)
    ref = comp.project(per_example_grads(model, diffusion, x, draws, "loss", params))
    assert got.shape == (5, sum(b.size for b in comp.blocks)) and ref.abs().max() > 0
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_choose_dims_meets_the_ratio_and_ratio_one_keeps_everything(tiny_model, diffusion, digits_small):
    params = influence_params(tiny_model)
    full = compute_kfac(tiny_model, diffusion, digits_small.images[:4], make_draws(2, (1, 8, 8), 1000, 0), params)
    full_bytes = bank_bytes(full.blocks)
    for ratio in (4.0, 16.0):
        blocks = projected_blocks(full, make_projections(full, "gaussian", ratio))
        got = full_bytes / bank_bytes(blocks)
        assert ratio <= got < 1.1 * ratio, (ratio, got)
    assert [b.shape for b in projected_blocks(full, make_projections(full, "eigen", 1.0))] == [
        b.shape for b in full.blocks
    ]
    assert choose_dims(full, 1.0)[0][0] == full.blocks[0].shape[0]
    with pytest.raises(ValueError, match="ratio"):
        choose_dims(full, 0.5)


def test_full_rank_eigenvector_projection_equals_the_stored_bank(tiny_preset, tiny_model, digits_small):
    ctx, q, g = _setup(tiny_preset, tiny_model, digits_small)
    stored = KFACInfluence(ctx.config, quantize=False)
    stored.build(ctx)
    full_rank = dataclasses.replace(ctx.config, kfac_bank="compressed", kfac_projection="eigen",
                                    kfac_compression=1.0, kfac_rerank=0)
    ctx_c = dataclasses.replace(ctx, config=full_rank)
    comp = KFACInfluence(full_rank, quantize=False)
    comp.build(ctx_c)
    p_stored, p_comp = stored.prepare(ctx, q, g), comp.prepare(ctx_c, q, g)
    assert p_comp.bank == "compressed" and p_stored.bank == "stored"
    for lam in (1e-8, 1e-3, 1.0):
        ref = stored.score(p_stored, lam)
        np.testing.assert_allclose(comp.score(p_comp, lam), ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_reranked_candidates_equal_stored_bank_scores(tiny_preset, tiny_model, digits_small):
    ctx, q, g = _setup(tiny_preset, tiny_model, digits_small, n=16)
    stored, comp, cfg, ctx_c = _stored_and_compressed(ctx, rerank=3)  # int8 compressed: only candidates exact
    p_stored, p_comp = stored.prepare(ctx, q, g), comp.prepare(ctx_c, q, g)
    approx = KFACInfluence(dataclasses.replace(cfg, kfac_rerank=0))
    approx.build(ctx_c)
    s_approx = approx.score(approx.prepare(ctx_c, q, g), 1e-3)
    s = comp.score(p_comp, 1e-3)
    mask = p_comp.exact
    assert mask is not None and 3 <= mask.sum() <= 6
    cand = np.flatnonzero(mask)
    order = np.argsort(-s_approx, kind="stable")
    assert set(order[:3]) | set(order[-3:]) == set(cand)  # the compressed ends were picked
    ref = stored.score(p_stored, 1e-3)
    np.testing.assert_allclose(s[cand], ref[cand], rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    np.testing.assert_array_equal(s[~mask], s_approx[~mask])
    # a damping change re-ranks the same candidates without gradients: grid value, then interpolated
    calls: list[int] = []
    reranker = p_comp.query.reranker
    original = reranker.score_fn
    reranker.score_fn = lambda *a: (calls.append(1), original(*a))[1]
    for lam in (1e-2, 3e-3):
        ref = stored.score(p_stored, lam)
        np.testing.assert_allclose(comp.score(p_comp, lam)[cand], ref[cand], rtol=1e-3, atol=1e-4 * np.abs(ref).max())
    assert not calls
    # the result says which scores are exact and which bank; exact entries rank first
    res = MethodResult("kfac", "K-FAC", "influence", "", "ok", scores=s, bank=p_comp.bank, exact=mask)
    assert [it.exact for it in res.top(3)] == [True] * 3 and [it.exact for it in res.bottom(3)] == [True] * 3
    assert "re-ranked" in res.bank_note()
    top = res.top(16)
    assert all(top[i].exact >= top[i + 1].exact for i in range(15))
    js = QueryResult(query={}, measurement="loss", methods={"kfac": res}).to_json(3)["methods"]["kfac"]
    assert js["bank"] == "compressed" and all(e["exact"] is True for e in js["top"] + js["bottom"])
    assert [e["exact"] for e in QueryResult({}, "loss", {"kfac": res}).to_json(16)["methods"]["kfac"]["top"]].count(
        False) == 16 - mask.sum()


def test_an_end_shorter_than_the_list_does_not_borrow_the_other_ends_exact_scores(tiny_preset, tiny_model,
                                                                                  digits_small):
    """QA 61 F2: exact scores rank first, so with 3 candidates per end a top-5 listed its 3 candidates, then
    the two highest of the *bottom* end's exact scores, among the lowest of all.  The answer carries each
    candidate's end (``exact_end``, from the re-rank's split), and an end ranks only its own exact scores
    first, then the rest by score, estimates and the other end's exact scores alike."""
    from engine.attribution.results import BOTTOM_END, TOP_END

    ctx, q, g = _setup(tiny_preset, tiny_model, digits_small, n=16)
    _, comp, _, ctx_c = _stored_and_compressed(ctx, rerank=3)
    p = comp.prepare(ctx_c, q, g)
    s = comp.score(p, 1e-3)
    ends = p.exact_end
    assert ends is not None and ends.shape == (16,)
    top_c, low_c = np.flatnonzero(ends & TOP_END), np.flatnonzero(ends & BOTTOM_END)
    assert len(top_c) == len(low_c) == 3 and set(top_c) | set(low_c) == set(np.flatnonzero(p.exact))
    res = MethodResult("kfac", "K-FAC", "influence", "", "ok", scores=s, bank=p.bank, exact=p.exact, exact_end=ends)
    for listed, own, sign in ((res.top(5), top_c, -1.0), (res.bottom(5), low_c, 1.0)):
        first, rest = [x.index for x in listed[:3]], [x.index for x in listed[3:]]
        assert sorted(first) == sorted(own)
        others = np.setdiff1d(np.arange(16), own)
        assert rest == list(others[np.argsort(sign * s[others], kind="stable")][:2])  # by score, whatever their kind
    # without the ends (the old record), the other end's exact scores ranked right after this end's
    old = MethodResult("kfac", "K-FAC", "influence", "", "ok", scores=s, bank=p.bank, exact=p.exact)
    assert {x.index for x in old.top(5)[3:]} <= set(low_c)


def test_rerank_rotates_the_cheaper_side(tiny_model, diffusion, digits_small):
    """More candidates than dampings: the damped queries are rotated back instead of the gradients."""
    from engine.attribution.compressed_bank import rerank_scores

    model = copy.deepcopy(tiny_model).double()
    params = influence_params(model)
    x = digits_small.images[:6].double()
    draws = make_draws(2, (1, 8, 8), 1000, seed=0)
    full = compute_kfac(model, diffusion, x, draws, params)
    q = full.rotate(torch.randn(full.num_params, dtype=torch.float64))
    args = (model, diffusion, x, draws, full, params, q)
    back = rerank_scores(*args, [1e-3, 1.0], 6, grad_batch=4)  # 6 candidates > 2 dampings
    rotated = rerank_scores(*args, [1e-3, 1.0], 6, grad_batch=4, max_query_bytes=0)
    np.testing.assert_allclose(back, rotated, rtol=1e-9, atol=1e-12 * np.abs(rotated).max())


def test_compressed_cache_is_keyed_by_its_settings(tmp_path, tiny_preset, tiny_model, digits_small):
    store = Store(tmp_path, "c" * 16, "digits12")
    ctx, q, g = _setup(tiny_preset, tiny_model, digits_small, store=store, kfac_bank="compressed",
                       kfac_compression=8.0, kfac_rerank=0)
    m = KFACInfluence(ctx.config)
    m.build(ctx)
    assert m.is_built(ctx) and [n for n, _ in m.cache_keys(ctx)] == ["kfac-factors", COMPRESSED]
    s1 = m.score(m.prepare(ctx, q, g))
    again = KFACInfluence(ctx.config)
    msgs: list[str] = []
    again.build(ctx, lambda msg, f: msgs.append(msg))
    assert not any("gradients" in s or "rows" in s for s in msgs)  # loaded, nothing recomputed
    np.testing.assert_array_equal(again.score(again.prepare(ctx, q, g)), s1)
    for change in ({"kfac_compression": 16.0}, {"kfac_projection": "eigen"}, {"seed": 1}, {"mc_samples": 2}):
        other = dataclasses.replace(ctx.config, **change)
        ctx2 = make_context(tiny_preset, ctx.model, ctx.dataset, "cpu", other, "c" * 16, store)
        assert not KFACInfluence(other).is_built(ctx2), change
    # a folder whose recorded settings contradict its name is refused, not loaded
    folder = store.path(COMPRESSED, compressed_settings(m, ctx))
    manifest = json.loads((folder / "settings.json").read_text())
    manifest["settings"]["compression"] = 4.0
    (folder / "settings.json").write_text(json.dumps(manifest))
    from engine.attribution.store import StaleCacheError

    with pytest.raises(StaleCacheError):
        KFACInfluence(ctx.config).build(ctx)


SKEWED_SPLIT = CandidateSplit(boundary=5, width=0.5, floor=6)  # small enough for a 101-score test


def _skewed(n: int, seed: int) -> np.ndarray:
    """Influence-like scores: a few proponents far out of the bulk, the opponents at the bulk's edge."""
    scores = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    scores[:6] += 12.0
    return scores


def _merge_rank(rank: int, world: int, rendezvous: str, scores: np.ndarray, c: int, out: str) -> None:
    from engine.attribution.compressed_bank import gather_candidates, shard_rows

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        rows = shard_rows(scores.shape[0])
        merged = gather_candidates(scores[rows], rows.start, c)  # each rank sees only its slice
        np.save(f"{out}/rank{rank}.npy", merged)
        skewed = _skewed(scores.shape[0], 5)
        adaptive = gather_candidates(skewed[rows], rows.start, c, SKEWED_SPLIT)
        np.save(f"{out}/adaptive{rank}.npy", adaptive)
    finally:
        dist.destroy_process_group()


def test_two_ranks_merge_their_top_candidates_into_the_single_process_set(tmp_path):
    rng = np.random.default_rng(0)
    scores = rng.standard_normal(101).astype(np.float32)
    scores[[7, 80]] = scores[3]  # ties across the ranks' slices break by index, as in one process
    c = 9
    mp.spawn(_merge_rank, args=(2, str(tmp_path / "rdv"), scores, c, str(tmp_path)), nprocs=2, join=True)
    single = merge_candidates([local_candidates(scores, c)], c)
    order = np.argsort(-scores, kind="stable")
    assert set(single) == set(order[:c]) | set(np.argsort(scores, kind="stable")[:c])
    for r in (0, 1):
        np.testing.assert_array_equal(np.load(tmp_path / f"rank{r}.npy"), single)
    # the adaptive split too: each rank sends its 2C - floor most extreme and its scores' moments
    skewed = _skewed(101, 5)
    one = merge_candidates([local_candidates(skewed, SKEWED_SPLIT.depth(c))], c, SKEWED_SPLIT, score_moments(skewed))
    assert len(one) == 2 * c and len(set(one) & set(np.argsort(-skewed)[: 2 * c])) < c  # uneven
    for r in (0, 1):
        np.testing.assert_array_equal(np.load(tmp_path / f"adaptive{r}.npy"), one)


def _query_rank(rank: int, world: int, rendezvous: str, preset, state, dataset, g, root: str, out: str,
                late: int | None = None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        if rank == late:  # a rank descheduled under load: it finds what rank 0 saved meanwhile
            import time
            from pathlib import Path

            from engine.attribution.methods.kfac_compressed_bank import COMPRESSED_FACTORS

            t0 = time.monotonic()  # start once rank 0 has saved the K-FAC factors
            while not list(Path(root).glob("**/kfac-factors-*/settings.json")) and time.monotonic() - t0 < 120:
                time.sleep(0.05)
            load = Store.load_arrays

            def slow_load(self, name, *a, **k):  # and look for the projections a second late
                if name == COMPRESSED_FACTORS:
                    time.sleep(1.0)
                return load(self, name, *a, **k)

            Store.load_arrays = slow_load
        s, mask, nrows = _sharded_scores(preset, state, dataset, g, root)
        np.savez(f"{out}/rank{rank}.npz", scores=s, exact=mask, rows=nrows)
    finally:
        dist.destroy_process_group()


def _sharded_scores(preset, state, dataset, g, root):
    from engine.model.unet import build_model

    model = build_model(preset.model)
    model.load_state_dict(state)
    cfg = AttributionConfig(mc_samples=2, seed=0, kfac_bank="compressed", kfac_compression=8.0, kfac_rerank=3)
    ctx = make_context(preset, model, dataset, "cpu", cfg, "e" * 16, Store(root, "e" * 16, "digits20"))
    m = KFACInfluence(cfg)
    m.chunk_size = 8
    m.build(ctx)
    prep = m.prepare(ctx, QueryInput(image=dataset.images[0]), g)
    s = m.score(prep, 1e-3)
    bank = m.bank.bank  # CompressedRows -> the int8 rows (a ShardedBank under torchrun)
    nrows = getattr(bank, "local", bank).num_examples
    return s, prep.exact, nrows


@pytest.mark.slow
@pytest.mark.parametrize("late", [None, 1])
def test_two_ranks_hold_half_the_compressed_bank_and_answer_like_one_process(
    tmp_path, tiny_preset, tiny_model, digits_small, late
):
    """``late`` = 1: rank 1 starts after rank 0 has saved the factors (under load it did).  It used to load
    them and skip the barrier rank 0 waited at, so every later barrier met out of step and rank 1 read
    the compressed bank before rank 0 had published it (AttributeError on None)."""
    dataset = digits_small.subset(list(range(20)))
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    g = measurement_grad(tiny_model, Diffusion(), LOSS, QueryInput(image=dataset.images[0]),
                         make_draws(2, (1, 8, 8), 1000, seed=1), 17)
    mp.spawn(_query_rank, args=(2, str(tmp_path / "rdv"), tiny_preset, state, dataset, g, str(tmp_path / "shared"),
                                str(tmp_path), late), nprocs=2, join=True)
    single, mask, nrows = _sharded_scores(tiny_preset, state, dataset, g, tmp_path / "single")
    assert nrows == 20 and mask.sum() >= 3
    for r in (0, 1):
        got = np.load(tmp_path / f"rank{r}.npz")
        assert int(got["rows"]) == 10  # each rank holds half of the rows
        np.testing.assert_array_equal(got["exact"], mask)
        np.testing.assert_allclose(got["scores"], single, rtol=1e-5, atol=1e-7)


def test_compressed_bank_derived_from_the_stored_one_equals_the_built_one(tiny_model, diffusion, digits_small):
    from engine.attribution.bank_build import build_bank
    from engine.attribution.compressed_bank import build_compressed_bank, compress_stored_bank

    model = copy.deepcopy(tiny_model).double()
    params = influence_params(model)
    x = digits_small.images[:6].double()
    draws = make_draws(2, (1, 8, 8), 1000, seed=0)
    full = compute_kfac(model, diffusion, x, draws, params)
    stored = build_bank(model, diffusion, x, draws, full, params, quantize=False)
    for kind in ("eigen", "gaussian"):
        comp = compress_factors(full, kind, 5.0, seed=2)
        built = build_compressed_bank(model, diffusion, x, draws, comp, params, quantize=False)
        derived = compress_stored_bank(stored, comp)  # int8 of the derived rows only
        for i in range(6):
            ref = built.row(i)
            assert (derived.row(i).double() - ref).abs().max() <= 1.01 * ref.abs().max() / 254 * 1.0 + 1e-12
        # on the whitened grid (a measurement option) the rows are R~_i within half of each coordinate's own step
        white = compress_stored_bank(stored, comp, whiten=1e-10)
        assert white.weights is not None and derived.weights is None
        for i in range(6):
            step = torch.cat([white.scales[i, j].expand(b.size) for j, b in enumerate(white.blocks)]) * white.weights
            assert ((white.row(i).double() - built.row(i)).abs() <= step.double() / 2 * 1.01 + 1e-12).all()


def test_candidates_come_most_extreme_first():
    """The re-rank works through its candidates in this order (the largest, the smallest, the second
    largest, ...), so the shown ends are exact after its first batches: the same set as before."""
    rng = np.random.default_rng(1)
    scores = rng.standard_normal(50).astype(np.float32)
    c = 6
    merged = merge_candidates([local_candidates(scores, c)], c)
    down, up = np.argsort(-scores, kind="stable")[:c], np.argsort(scores, kind="stable")[:c]
    np.testing.assert_array_equal(merged, np.stack([down, up], axis=1).reshape(-1))
    small = np.array([3.0, 1.0, 2.0], dtype=np.float32)  # c > N/2: an index at both ends comes once, first time
    np.testing.assert_array_equal(merge_candidates([local_candidates(small, 2)], 2), [0, 1, 2])


def test_the_adaptive_split_gives_the_crowded_end_more_candidates():
    """Influence scores are skewed: the strongest proponents stand far out, the strongest opponents sit at
    the bulk's edge among near-ties.  The adaptive split gives the crowded end more of the 2C candidates
    (each end keeping its floor), takes each end's most extreme, and goes most extreme first."""
    scores = _skewed(400, 2)
    c = 30
    split = CandidateSplit(boundary=5, width=0.5, floor=8)
    merged = merge_candidates([local_candidates(scores, split.depth(c))], c, split, score_moments(scores))
    down, up = np.argsort(-scores, kind="stable"), np.argsort(scores, kind="stable")
    c_top, c_low = split_ends(scores[down[:52]], scores[up[:52]], score_moments(scores), c, split)
    assert c_top + c_low == 2 * c and split.floor <= c_top < c < c_low
    assert set(merged) == set(down[:c_top]) | set(up[:c_low])
    # most extreme first: alternating while the top end lasts, then the rest of the bottom end
    np.testing.assert_array_equal(merged[: 2 * c_top], np.stack([down[:c_top], up[:c_top]], axis=1).reshape(-1))
    np.testing.assert_array_equal(merged[2 * c_top :], up[c_top:c_low])
    # mirrored scores mirror the split; an even split keeps C per end
    mirror = merge_candidates([local_candidates(-scores, split.depth(c))], c, split, score_moments(-scores))
    assert len(set(mirror) & set(up[:c_low])) == c_low and len(set(mirror) & set(down[:c_top])) == c_top
    assert split_ends(scores[down[:52]], scores[up[:52]], score_moments(scores), c, EVEN) == (c, c)
    even = merge_candidates([local_candidates(scores, c)], c)
    assert set(even) == set(down[:c]) | set(up[:c])


def test_the_adaptive_split_keeps_each_ends_floor_and_needs_the_moments():
    scores = _skewed(400, 3)
    scores[:6] += 1e6  # one end as sparse as can be: it keeps its floor, the other gets the rest
    split = CandidateSplit(boundary=5, width=0.5, floor=8)
    d = split.depth(30)
    top, low = -np.sort(-scores)[:d], np.sort(scores)[:d]
    assert split_ends(top, low, score_moments(scores), 30, split) == (8, 52)
    # with C below the floor each end keeps C: the split is even
    assert split_ends(top[:4], low[:4], score_moments(scores), 4, split) == (4, 4)
    with pytest.raises(ValueError, match="moments"):
        merge_candidates([local_candidates(scores, d)], 30, split)


def test_candidate_split_script_compares_the_listed_ends_with_the_full_banks(load_script):
    """``scripts/candidate_split.py``'s measure: the candidates' exact ends against the full bank's."""
    cs = load_script("candidate_split")
    full = np.array([5.0, -3.0, 1.0, -1.0, 0.0, 4.0, -2.0], dtype=np.float32)
    # the candidates hold the top-2 (0, 5) but of the bottom-2 (1, 6) only 1: the listed bottom-2 is {1, 3}
    top, low, share = cs.ends_held(full, np.array([0, 5, 1, 3]), 2)
    assert (top, low) == (1.0, 0.5)
    assert share == pytest.approx((-3.0 - 1.0) / (-3.0 - 2.0))


def test_estimate_scale_fits_the_exact_scores_on_the_estimates():
    """``estimate_scale`` is the least-squares slope through the origin of exact on estimate; it declines
    to fit on too few candidates or when the slope is not positive and finite."""
    from engine.attribution.rerank import MIN_SCALE_FIT, estimate_scale, scale_estimates

    rng = np.random.default_rng(3)
    a = rng.standard_normal(40)
    t = 20.0 * a + 0.1 * rng.standard_normal(40)
    b = estimate_scale(a, t)
    assert b == pytest.approx(float(a @ t / (a @ a))) and abs(b - 20.0) < 0.1
    assert estimate_scale(a[: MIN_SCALE_FIT - 1], t[: MIN_SCALE_FIT - 1]) is None
    assert estimate_scale(a, -t) is None and estimate_scale(np.zeros(40), t) is None
    mask = np.zeros(40, dtype=bool)
    mask[:10] = True
    col = np.where(mask, t, a).astype(np.float32)
    out, got = scale_estimates(col, a.astype(np.float32), mask)
    assert got == pytest.approx(float(a[:10] @ t[:10] / (a[:10] @ a[:10])), rel=1e-6)
    np.testing.assert_array_equal(out[mask], col[mask])  # the exact entries untouched
    np.testing.assert_allclose(out[~mask], got * a[~mask], rtol=1e-6)
    np.testing.assert_array_equal(scale_estimates(col, a.astype(np.float32), np.zeros(40, bool))[0], col)
    # every entry exact (2C >= N): nothing was scaled, so no factor is reported (QA 31a: an all-exact answer named one)
    exact_all = scale_estimates(t.astype(np.float32), a.astype(np.float32), np.ones(40, bool))
    assert exact_all[1] is None and np.array_equal(exact_all[0], t.astype(np.float32))


def test_the_compressed_answer_puts_its_estimates_on_the_exact_scale(tiny_preset, tiny_model, digits_small):
    """A compressed bank's answer: the candidates exact, the other entries the compressed scan's estimates
    times the factor fitted on the candidates.  The scan's scale is smaller than eq. 6's, so the rescaled
    column is closer to the stored bank's exact scores than candidates-exact-plus-raw-estimates would be."""
    ctx, q, g = _setup(tiny_preset, tiny_model, digits_small, n=48)
    stored, comp, cfg, ctx_c = _stored_and_compressed(ctx, rerank=6)
    approx_m = KFACInfluence(dataclasses.replace(cfg, kfac_rerank=0))
    approx_m.build(ctx_c)
    lam = 1e-3
    approx = approx_m.score(approx_m.prepare(ctx_c, q, g), lam)
    p_comp = comp.prepare(ctx_c, q, g)
    s = comp.score(p_comp, lam)
    mask = p_comp.exact
    ref = stored.score(stored.prepare(ctx, q, g), lam)
    b = p_comp.estimate_scale
    assert mask is not None and mask.sum() == 12 and b is not None and b > 1.0  # the scan's scale is smaller
    a, t = approx[mask].astype(np.float64), s[mask].astype(np.float64)
    assert b == pytest.approx(float(a @ t / (a @ a)), rel=1e-6)
    np.testing.assert_allclose(s[~mask], b * approx[~mask], rtol=1e-5)
    raw = np.where(mask, s, approx)
    assert np.linalg.norm(s - ref) < 0.8 * np.linalg.norm(raw - ref)
    res = MethodResult("kfac", "K-FAC", "influence", "", "ok", scores=s, bank="compressed", exact=mask,
                       estimate_scale=b)
    assert f"x {b:.3g}" in res.bank_note()
    js = QueryResult(query={}, measurement="loss", methods={"kfac": res}).to_json(3)["methods"]["kfac"]
    assert js["estimate_scale"] == b


def test_estimate_scale_script_compares_the_column_raw_and_rescaled(load_script):
    """``scripts/estimate_scale.py``'s measure on a column whose estimates are the exact scores at 1/20 scale
    plus noise: the slopes, and the rescaled column closer to the exact one than the raw column."""
    es = load_script("estimate_scale")
    rng = np.random.default_rng(0)
    full = rng.standard_normal(200).astype(np.float32)
    approx = (full / 20.0 + 0.002 * rng.standard_normal(200)).astype(np.float32)
    cand = np.concatenate([np.argsort(-approx)[:20], np.argsort(approx)[:20]])
    f = es.column_figures(full, approx, cand)
    assert 18.0 < f["scale_candidates"] < 22.0 and 15.0 < f["scale_rest"] < 25.0
    assert f["rel_l2_scaled"] < 0.5 * f["rel_l2_raw"] and f["spearman_scaled"] >= f["spearman_raw"]
    assert f["rest_max_error_scaled"] < f["rest_max_error_raw"]


def _qa55_answers(tiny_preset, tiny_model, digits, reranks: tuple[int, ...], query: int):
    """QA 55 #3's setting: the float32 tiny U-Net on 48 digits, M = 4, a gaussian 8x compressed bank; the
    float stored bank's scores (the exact ones over all N) and, per ``kfac_rerank`` C, the compressed answer
    as the CLI and the app read it (``MethodResult``) for the held-out digit ``query``."""
    ds = digits.subset(list(range(48)))
    config = dataclasses.replace(tiny_preset.attribution, mc_samples=4)
    ctx = make_context(tiny_preset, tiny_model, ds, "cpu", config=config)
    stored = KFACInfluence(config, quantize=False)
    stored.build(ctx)
    draws = make_draws(4, tuple(ds.shape), ctx.diffusion.T, seed=config.seed + 1)
    g = measurement_grad(tiny_model, ctx.diffusion, LOSS, digits.images[query], draws, params=ctx.params)
    lam = config.kfac_damping
    ref = stored.score(stored.prepare(ctx, None, g), lam)
    answers = {}
    for c in reranks:
        cfg = dataclasses.replace(config, kfac_bank="compressed", kfac_projection="gaussian", kfac_compression=8.0,
                                  kfac_rerank=c)
        ctx_c = make_context(tiny_preset, tiny_model, ds, "cpu", config=cfg)
        comp = KFACInfluence(cfg)
        comp.build(ctx_c)
        p = comp.prepare(ctx_c, None, g)
        s = comp.score(p, lam)
        answers[c] = MethodResult("kfac", "K-FAC", "influence", "", "ok", scores=s, bank=p.bank, exact=p.exact,
                                  estimate_scale=p.estimate_scale)
    return ref, answers


def test_the_ranking_check_says_when_an_end_may_miss_an_image_outside_the_candidates(tiny_preset, tiny_model, digits):
    """QA 55 #3: the re-rank makes the candidates' scores exact, but a true top-k image that was not a
    candidate is absent, and every entry shown is exact.  With 2 x 8 candidates of 48 the shown top-10 and
    bottom-10 miss images of the float stored bank's; images outside the candidates have estimates beyond
    the 10th exact score, and the answer says so (the JSON's field, the CLI's and the page's line).  With
    2 x 16 the shown top-5 and bottom-5 are the stored bank's, no estimate passes the 5th, and nothing new
    is said."""
    ref, answers = _qa55_answers(tiny_preset, tiny_model, digits, (8, 16), query=101)
    small = answers[8]
    k = 8  # the app's default top-k
    shown_top, shown_low = [x.index for x in small.top(k)], [x.index for x in small.bottom(k)]
    assert set(np.argsort(-ref)[:k]) - set(shown_top) and set(np.argsort(ref)[:k]) - set(shown_low)  # some missing
    checks = small.ranking_check(k)
    assert set(checks) == {"top", "bottom"} and checks["top"].may_miss and checks["bottom"].may_miss
    out = ~small.exact
    for end, shown, sign in (("top", small.top(k), 1.0), ("bottom", small.bottom(k), -1.0)):
        weakest = min(sign * x.score for x in shown if x.exact)
        unlisted = out.copy()
        unlisted[[x.index for x in shown]] = False  # an estimate listed is marked "≈" there: not missed
        assert checks[end].beyond == int((sign * small.scores[unlisted] > weakest).sum())
    note = small.ranking_note(k)
    assert note == ("images outside the re-ranked candidates have estimates beyond the lists' exact scores "
                    f"({checks['top'].beyond} above the {checks['top'].rank}th highest exact score and "
                    f"{checks['bottom'].beyond} below the {checks['bottom'].rank}th lowest exact score): "
                    "both lists may miss some; more candidates: `--kfac-rerank`")
    # estimates are not bounds: the top-5 misses images of the stored bank's too, and no estimate says so (a
    # "may", never a proof of the whole ranking: the page's words claim exact scores for the candidates only)
    assert set(np.argsort(-ref)[:5]) - {x.index for x in small.top(5)} and not small.ranking_check(5)["top"].may_miss
    js = QueryResult({}, "loss", {"kfac": small}).to_json(k)["methods"]["kfac"]
    assert js["ranking_check"] == {end: {"may_miss": True, "estimates_beyond": checks[end].beyond,
                                         "rank": checks[end].rank} for end in ("top", "bottom")}

    large = answers[16]
    assert {x.index for x in large.top(5)} == set(np.argsort(-ref)[:5])
    assert {x.index for x in large.bottom(5)} == set(np.argsort(ref)[:5])
    checks = large.ranking_check(5)
    assert not checks["top"].may_miss and not checks["bottom"].may_miss and large.ranking_note(5) is None
    js = QueryResult({}, "loss", {"kfac": large}).to_json(5)["methods"]["kfac"]
    assert js["ranking_check"]["top"] == {"may_miss": False, "estimates_beyond": 0, "rank": 5}


def test_the_ranking_check_counts_estimates_beyond_the_weakest_exact_score_shown():
    """``end_check`` on a made-up answer: the estimates (not exact) beyond the weakest exact score listed, at
    each end; an estimate listed ("≈" on the page) is not missed; a pending answer, the stored bank and an end
    with no exact score listed have no check."""
    from engine.attribution.results import end_check

    scores = np.array([9.0, 8.0, 7.5, 7.0, 0.0, -1.0, -7.0, -8.0, -9.0, 8.5], np.float32)
    exact = np.array([1, 1, 0, 1, 0, 0, 1, 1, 1, 0], bool)  # 2 (7.5) and 9 (8.5) are estimates above 7.0
    r = MethodResult("kfac", "K-FAC", "influence", "", "ok", scores=scores, bank="compressed", exact=exact)
    checks = r.ranking_check(3)
    assert [x.index for x in r.top(3)] == [0, 1, 3]
    assert (checks["top"].beyond, checks["top"].rank, checks["bottom"].beyond) == (2, 3, 0)
    assert r.ranking_note(3) == ("2 images outside the re-ranked candidates have estimates above the 3rd highest "
                                 "exact score: the highest 3 may miss some; more candidates: `--kfac-rerank`")
    # the top 7: the 6 exact (down to -9.0, the 6th), then the estimate 8.5 (9, listed: not counted); 2, 4, 5 beyond
    top7 = end_check(scores, exact, [x.index for x in r.top(7)], True)
    assert (top7.beyond, top7.rank) == (3, 6)
    one = MethodResult("kfac", "K-FAC", "influence", "", "ok", scores=scores, bank="compressed",
                       exact=np.array([1, 1, 1, 1, 0, 0, 1, 1, 1, 0], bool))
    assert one.ranking_note(3) == ("1 image outside the re-ranked candidates has an estimate above the 3rd highest "
                                   "exact score: the highest 3 may miss it; more candidates: `--kfac-rerank`")
    assert end_check(scores, np.zeros(10, bool), [0, 1], True) is None  # nothing exact listed: each entry says "≈"
    for other in (dict(exact_pending=True), dict(bank="stored", exact=None), dict(exact=None)):
        kw = {"scores": scores, "bank": "compressed", "exact": exact, **other}
        res = MethodResult("kfac", "K-FAC", "influence", "", "ok", **kw)
        assert res.ranking_check(3) is None and res.ranking_note(3) is None
