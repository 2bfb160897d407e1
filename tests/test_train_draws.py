"""Training draws (engine.attribution.train_draws): flips as part of each draw (paper G.8) and per-example
draws (paper G.3) for gradients, curvature rows and TRAK features."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.attribution.context import make_context
from engine.attribution.curvature import DrawRows
from engine.attribution.gradients import influence_params, per_example_grads, train_loss_grads
from engine.attribution.train_draws import PerExampleDraws, draw_settings, training_draws
from engine.config import AttributionConfig, DataConfig
from engine.model.diffusion import MCDraws, make_draws

SHAPE = (1, 8, 8)


def _direct_grad(model, diffusion, x, t, eps, params):
    """grad of (1/D)||eps - eps_theta(x_t, t)||^2 for one image and one draw, plain autograd."""
    with torch.enable_grad():
        pred = model(diffusion.q_sample(x[None], t.reshape(1), eps[None]), t.reshape(1))
        loss = (eps[None] - pred).pow(2).mean()
        grads = torch.autograd.grad(loss, [p for _, p in params])
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("backend", ["loop", "hooks", "func"])
def test_flip_draws_average_both_orientations(tiny_model, diffusion, digits_small, backend):
    """With draws (t, eps, no flip) and (t, eps, flip), an example's gradient is the mean of the
    gradients of the image and of its mirror image: l(theta, x) averages over the augmentation."""
    model = tiny_model.double()
    params = influence_params(model)
    x = digits_small.images[:3].double()
    assert not torch.equal(x, x.flip(-1))
    base = make_draws(2, SHAPE, diffusion.T, seed=4).to("cpu", torch.float64)
    t = base.t[[0, 0, 1, 1]]
    eps = base.eps[[0, 0, 1, 1]]
    draws = MCDraws(t, eps, torch.tensor([False, True, False, True]))
    got = per_example_grads(model, diffusion, x, draws, params=params, backend=backend)
    for i in range(3):
        want = sum(
            _direct_grad(model, diffusion, img, t[m], eps[m], params)
            for m, img in ((0, x[i]), (1, x[i].flip(-1)), (2, x[i]), (3, x[i].flip(-1)))
        ) / 4
        torch.testing.assert_close(got[i], want, rtol=1e-9, atol=1e-12)
    unflipped = per_example_grads(model, diffusion, x, MCDraws(t, eps), params=params, backend=backend)
    assert not torch.allclose(got, unflipped)


def test_flip_preset_draws_and_curvature_rows(tiny_preset, tiny_model, digits_small):
    """A preset trained with flips gets a seeded flip bit per draw (t and eps as without flips);
    digits (no flips) gets exactly the draws it had before; K-FAC's rows mirror the same images."""
    ds = digits_small.subset(list(range(4)))
    cfg = AttributionConfig(mc_samples=32, draws="shared")
    plain = make_context(tiny_preset, tiny_model, ds, "cpu", cfg)
    flipped = make_context(tiny_preset.replace(data=DataConfig(name="digits", flip=True)), tiny_model, ds, "cpu", cfg)
    old = make_draws(32, SHAPE, 1000, seed=cfg.seed)
    assert plain.train_draws.flip is None
    assert torch.equal(plain.train_draws.t, old.t) and torch.equal(plain.train_draws.eps, old.eps)
    fd = flipped.train_draws
    assert torch.equal(fd.t, old.t) and torch.equal(fd.eps, old.eps)
    assert 0 < int(fd.flip.sum()) < 32  # both orientations occur
    assert draw_settings(plain.train_draws) == {} and draw_settings(fd) == {"augment": "hflip"}
    rows = list(DrawRows(flipped.diffusion, ds.images, fd, batch_size=5))
    X = torch.cat([r[0] for r in rows])
    x_rows, t_rows, eps_rows = fd.rows(ds.images)
    want = torch.cat([flipped.diffusion.q_sample(x_rows, t_rows, eps_rows).flatten(1), t_rows[:, None].float()], 1)
    torch.testing.assert_close(X, want)
    # row j*M + m is example j mirrored exactly where draw m says so
    j, m = 2, int(torch.nonzero(fd.flip)[0])
    assert torch.equal(x_rows[j * 32 + m], ds.images[j].flip(-1))


def test_per_example_draws_are_seeded_by_index():
    d = PerExampleDraws(8, SHAPE, 1000, seed=3)
    whole = d.for_rows(slice(0, 6))
    part = d.for_rows(slice(2, 5))
    assert whole.t.shape == (6, 8) and whole.eps.shape == (6, 8, *SHAPE)
    assert torch.equal(part.t, whole.t[2:5]) and torch.equal(part.eps, whole.eps[2:5])
    assert not torch.equal(whole.eps[0], whole.eps[1])  # independent per example
    assert not torch.equal(PerExampleDraws(8, SHAPE, 1000, seed=4).for_rows(slice(0, 1)).eps, whole.eps[:1])
    picked = d.for_indices([4, 1])  # any order, as the compressed bank's re-ranking asks
    assert torch.equal(picked.t, whole.t[[4, 1]]) and torch.equal(picked.eps, whole.eps[[4, 1]])
    assert torch.equal(whole.for_indices([4, 1]).t, whole.t[[4, 1]])
    shared = make_draws(8, SHAPE, 1000, seed=3)
    assert shared.for_indices([4, 1]) is shared
    head = d.head(3).for_rows(slice(1, 4))
    assert len(d.head(3)) == 3 and torch.equal(head.t, whole.t[1:4, :3])
    assert d.digest() != d.head(3).digest() != PerExampleDraws(8, SHAPE, 1000, seed=3, flip=True).digest()
    with pytest.raises(ValueError, match="draws mode"):
        training_draws("every", 8, SHAPE, 1000, 0)


def test_per_example_gradients_independent_of_batching(tiny_model, diffusion, digits_small):
    """Example i's gradient uses its own draws whatever the batch it is computed in, on every back-end."""
    model = tiny_model.double()
    params = influence_params(model)
    x = digits_small.images[:5].double()
    draws = PerExampleDraws(3, SHAPE, diffusion.T, seed=0, flip=True)
    ref = torch.stack(
        [
            per_example_grads(model, diffusion, x[i : i + 1], draws.for_rows(slice(i, i + 1)).to("cpu", torch.float64),
                              params=params, backend="loop")[0]
            for i in range(5)
        ]
    )
    for batch in (2, 5):
        got = torch.cat([g for _, g in train_loss_grads(model, diffusion, x, draws, batch_size=batch, params=params)])
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    for backend in ("hooks", "func"):
        got = per_example_grads(model, diffusion, x, draws.for_rows(slice(0, 5)), params=params, backend=backend)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    # each equals the plain gradient with that example's own draws
    own = draws.example(3)
    want = sum(
        _direct_grad(model, diffusion, x[3].flip(-1) if own.flip[m] else x[3], own.t[m], own.eps[m].double(), params)
        for m in range(3)
    ) / 3
    torch.testing.assert_close(ref[3], want, rtol=1e-9, atol=1e-12)


def test_per_example_curvature_rows_independent_of_batching(tiny_preset, tiny_model, digits_small):
    ds = digits_small.subset(list(range(5)))
    cfg = dataclasses.replace(AttributionConfig(mc_samples=4), draws="per-example")
    ctx = make_context(tiny_preset, tiny_model, ds, "cpu", cfg)
    assert isinstance(ctx.train_draws, PerExampleDraws)
    assert draw_settings(ctx.train_draws) == {"draws_mode": "per-example"}
    a = torch.cat([X for X, _ in DrawRows(ctx.diffusion, ds.images, ctx.train_draws, batch_size=3)])
    b = torch.cat([X for X, _ in DrawRows(ctx.diffusion, ds.images, ctx.train_draws, batch_size=20)])
    torch.testing.assert_close(a, b)
    t_rows = a[:, -1].long().reshape(5, 4)
    assert torch.equal(t_rows, ctx.train_draws.for_rows(slice(0, 5)).t)


def test_stratified_draws_put_one_timestep_in_each_stratum_and_keep_eps():
    """``draws="stratified"``: with M = T every timestep appears exactly once; otherwise the k-th smallest
    t lies in stratum k.  eps (and flips) are the shared draws' of the same seed, so the two differ in t only."""
    whole = make_draws(16, SHAPE, 16, seed=7, stratify_t=True)
    assert torch.equal(torch.sort(whole.t).values, torch.arange(16))
    d = make_draws(16, SHAPE, 100, seed=3, stratify_t=True, flip=True)
    plain = make_draws(16, SHAPE, 100, seed=3, flip=True)
    assert torch.equal(d.eps, plain.eps) and torch.equal(d.flip, plain.flip)
    ts = torch.sort(d.t).values
    for k in range(16):
        assert 100 * k // 16 <= int(ts[k]) <= 100 * (k + 1) // 16
    assert not torch.equal(torch.sort(plain.t).values, ts)
    assert d.stratified and not plain.stratified
    # the first k draws (factor_draws, a query with fewer draws) are a spread-out subset, not the k earliest strata
    assert int(d.t[:4].max()) > 100 * 4 // 16


def test_stratified_timesteps_are_uniform_and_lower_the_variance_of_a_timestep_average(diffusion):
    """Each t_m is still U{0..T-1} (so averages over the draws stay unbiased for E_t), and the mean over the
    M draws of a function of t, here 1 - abar_t, varies less from seed to seed than with iid timesteps."""
    T, M, seeds = diffusion.T, 16, 1500
    strat = torch.stack([make_draws(M, (1, 1, 1), T, seed=s, stratify_t=True).t for s in range(seeds)])
    iid = torch.stack([make_draws(M, (1, 1, 1), T, seed=s).t for s in range(seeds)])
    share = torch.bincount(strat.reshape(-1) * 10 // T, minlength=10).double() / strat.numel()
    assert torch.allclose(share, torch.full((10,), 0.1, dtype=torch.float64), atol=0.01)  # 24,000 draws
    assert torch.bincount(strat[:, 0] * 10 // T, minlength=10).min() > 100  # draw 0 alone is spread too
    f = 1.0 - diffusion.alpha_bars
    var_strat, var_iid = f[strat].mean(1).var(), f[iid].mean(1).var()
    assert abs(float(f[strat].mean() - f.mean())) < 0.01
    assert var_strat < 0.2 * var_iid


def test_stratified_draws_are_shared_with_their_own_cache_key(tiny_preset, tiny_model, digits_small):
    """Stratified draws are shared by every example (so the query may use them, ``query_draws="bank"``), and
    the K-FAC factors' and bank's settings tell them from plain shared draws: no cache is reused across them."""
    from engine.attribution.methods.kfac_influence import KFACInfluence

    ds = digits_small.subset(list(range(4)))
    contexts = {}
    for mode in ("shared", "stratified"):
        cfg = AttributionConfig(mc_samples=8, draws=mode)
        contexts[mode] = make_context(tiny_preset, tiny_model, ds, "cpu", cfg)
    st = contexts["stratified"].train_draws
    assert isinstance(st, MCDraws) and not st.batched and st.stratified
    assert draw_settings(st) == {"draws_mode": "stratified"} and draw_settings(contexts["shared"].train_draws) == {}
    keys = {m: KFACInfluence(c.config).bank_settings(c) for m, c in contexts.items()}
    assert keys["shared"] != keys["stratified"]
    assert training_draws("stratified", 8, SHAPE, 1000, 0).stratified
