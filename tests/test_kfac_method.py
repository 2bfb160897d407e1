"""K-FAC Influence method (engine.attribution.methods.kfac_influence): API, caching, damping, self-influence."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engine.attribution.context import make_context
from engine.attribution.gradients import measurement_grad, train_loss_grads
from engine.attribution.methods.base import QueryInput
from engine.attribution.methods.kfac_influence import KFACInfluence
from engine.attribution.store import Store
from engine.config import AttributionConfig
from engine.model.checkpoint import load_checkpoint
from engine.model.diffusion import make_draws
from engine.model.measurements import parse_measurement
from engine.model.train import train

LOSS = parse_measurement("loss", 1000)


def _query(ctx, image, draws):
    q = QueryInput(image=image)
    return q, measurement_grad(
        ctx.model, ctx.diffusion, LOSS, q, draws, ctx.dataset.levels, params=ctx.params
    )


def test_api_cache_and_damping(tmp_path, tiny_preset, tiny_model, digits_small):
    cfg = AttributionConfig(mc_samples=4, seed=0)
    ds = digits_small.subset(list(range(16)))
    store = Store(tmp_path, "0" * 16, "digits16")
    ctx = make_context(tiny_preset, tiny_model, ds, "cpu", cfg, "0" * 16, store)
    # per-example draws by default: example i's are make_draws seeded by (seed, i) alone
    from engine.attribution.train_draws import example_seed

    assert len(ctx.train_draws) == 4 and ctx.train_draws.batched
    assert torch.equal(ctx.train_draws.example(3).t, make_draws(4, (1, 8, 8), 1000, example_seed(0, 3)).t)
    m = KFACInfluence(cfg)
    assert (m.name, m.title, m.kind, m.default_damping) == ("kfac", "K-FAC Influence", "influence", 1e-8)
    assert not m.is_built(ctx)
    msgs: list[tuple[str, float]] = []
    m.build(ctx, lambda msg, f: msgs.append((msg, f)))
    assert m.is_built(ctx) and msgs[-1][1] == 1.0
    assert all(b >= a for (_, a), (_, b) in zip(msgs, msgs[1:], strict=False))  # monotone progress

    q, g = _query(ctx, ds.images[5], make_draws(4, (1, 8, 8), 1000, seed=1))
    prep = m.prepare(ctx, q, g)
    s_default = m.score(prep)
    assert s_default.dtype == np.float32 and s_default.shape == (16,)
    np.testing.assert_array_equal(s_default, m.score(prep, 1e-8))
    s_damped = m.score(prep, 1.0)
    assert not np.allclose(s_default, s_damped)
    # scale and sign: tau = (1/N) g_q^T (G + lam)^-1 g_i, checked against the factors directly
    gi = torch.cat([gb for _, gb in train_loss_grads(ctx, ctx.diffusion, ds.images, ctx.train_draws)])
    ref = (gi @ m.factors.inverse_apply(g, 1.0)) / 16
    np.testing.assert_allclose(s_damped, ref.numpy(), rtol=0.05, atol=0.02 * ref.abs().max().item())

    # a fresh instance loads the cache: no gradient or factor work
    m2 = KFACInfluence(cfg)
    assert m2.is_built(ctx)
    msgs2: list[str] = []
    m2.build(ctx, lambda msg, f: msgs2.append(msg))
    assert not any("gradients" in s or "rows" in s for s in msgs2)
    np.testing.assert_allclose(m2.score(m2.prepare(ctx, q, g), 1.0), s_damped, rtol=1e-6)

    # other settings are other caches
    m3 = KFACInfluence(dataclasses.replace(cfg, fisher_type="empirical"))
    assert not m3.is_built(ctx)


@pytest.mark.parametrize(
    "change",
    [
        {"fisher_type": "empirical"},
        {"kfac_approx": "reduce"},
        {"ekfac": True},
        {"kfac_blocks": "joint"},
        {"draws": "shared"},
    ],
)
def test_options_build_and_score(tiny_preset, tiny_model, digits_small, change):
    cfg = dataclasses.replace(AttributionConfig(mc_samples=2), **change)
    ds = digits_small.subset(list(range(8)))
    ctx = make_context(tiny_preset, tiny_model, ds, "cpu", cfg, "h", None)  # its draws follow cfg.draws
    base_ctx = make_context(tiny_preset, tiny_model, ds, "cpu", AttributionConfig(mc_samples=2), "h", None)
    base = KFACInfluence(AttributionConfig(mc_samples=2), quantize=False)
    alt = KFACInfluence(cfg, quantize=False)
    base.build(base_ctx)
    alt.build(ctx)
    q, g = _query(ctx, ds.images[0], make_draws(2, (1, 8, 8), 1000, seed=1))
    s0, s1 = base.score(base.prepare(base_ctx, q, g), 1e-3), alt.score(alt.prepare(ctx, q, g), 1e-3)
    assert np.isfinite(s1).all() and not np.allclose(s0, s1)
    assert alt.factors.ekfac == bool(change.get("ekfac", False))
    # every option is part of the cache key; shared draws and separate blocks (the defaults when the
    # first caches were built) keep the keys of those older caches
    assert alt.bank_settings(ctx) != base.bank_settings(base_ctx)
    old_cfg = AttributionConfig(mc_samples=2, draws="shared")
    old_ctx = make_context(tiny_preset, tiny_model, ds, "cpu", old_cfg, "h", None)
    assert not {"kfac_blocks", "draws_mode", "augment"} & set(KFACInfluence(old_cfg).bank_settings(old_ctx))
    assert base.bank_settings(base_ctx)["draws_mode"] == "per-example"


def test_int8_grid_in_the_cache_key(tiny_preset, tiny_model, digits_small):
    """The whitened grid's floor keys the stored bank (a plain-grid cache is never read as whitened); the
    plain grid (``kfac_bank_whiten=None``) keeps the key of the banks built before it, and the compressed
    bank, which does not use it, keeps its key too."""
    from engine.attribution.methods.kfac_compressed_bank import compressed_settings

    ds = digits_small.subset(list(range(8)))
    white_cfg = AttributionConfig(mc_samples=2)
    plain_cfg = dataclasses.replace(white_cfg, kfac_bank_whiten=None)
    ctx = make_context(tiny_preset, tiny_model, ds, "cpu", white_cfg, "h", None)
    white, plain = KFACInfluence(white_cfg), KFACInfluence(plain_cfg)
    assert white.bank_settings(ctx)["whiten"] == white_cfg.kfac_bank_whiten
    assert "whiten" not in plain.bank_settings(ctx)
    assert {k: v for k, v in white.bank_settings(ctx).items() if k != "whiten"} == plain.bank_settings(ctx)
    assert "whiten" not in KFACInfluence(white_cfg, quantize=False).bank_settings(ctx)
    assert compressed_settings(white, ctx) == compressed_settings(plain, ctx)
    white.build(ctx)
    plain.build(make_context(tiny_preset, tiny_model, ds, "cpu", plain_cfg, "h", None))
    assert white.bank.weights is not None and plain.bank.weights is None


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """The tiny U-Net trained 300 steps on the first 64 digits (~10 s on one core)."""
    from conftest import TINY_MODEL

    from engine.config import DataConfig, Preset, TrainConfig
    from engine.model.data import load_digits

    torch.set_num_threads(1)
    ds = load_digits().subset(list(range(64)))
    preset = Preset(
        name="tiny",
        model=TINY_MODEL,
        data=DataConfig(name="digits"),
        train=TrainConfig(steps=300, batch_size=32, lr=2e-3, log_every=1000, checkpoint_every=10_000),
    )
    folder = train(preset, tmp_path_factory.mktemp("tiny300"), dataset=ds, progress=False)
    model, preset, _ = load_checkpoint(folder, "cpu")
    return preset, model, ds


@pytest.mark.slow
def test_self_influence(trained_tiny):
    """A training image queried with its own loss (independent draws) is a top proponent of itself.

    With shared training draws (common random numbers: the examples' gradients differ by the images,
    not by Monte Carlo noise).  Per-example draws add each example's own noise, which on this 300-step
    tiny model at M = 32 moves some images' self-rank to the middle of the 64; on the shipped digits
    model at M = 64 every one of 16 training images ranks itself in the top 4 of 1,797 with either
    mode (``scripts/self_rank.py``)."""
    preset, model, ds = trained_tiny
    cfg = AttributionConfig(mc_samples=32, seed=0, draws="shared")
    ctx = make_context(preset, model, ds, "cpu", cfg, "t", None)
    m = KFACInfluence(cfg)
    m.build(ctx)
    qdraws = make_draws(32, (1, 8, 8), 1000, seed=cfg.seed + 1)  # the session's query draws
    top = int(np.ceil(0.05 * len(ds)))  # top 5% = 4 of 64
    for i in range(0, 64, 8):
        prep = m.prepare(ctx, *_query(ctx, ds.images[i], qdraws))
        for lam in (m.default_damping, 1e-4):
            s = m.score(prep, lam)
            assert s[i] > 0
            assert int((s > s[i]).sum()) < top, (
                f"image {i}: self-influence rank {(s > s[i]).sum()} (damping {lam})"
            )


def test_factor_draws_subset(tiny_preset, tiny_model, digits_small):
    cfg = AttributionConfig(mc_samples=4, draws="per-example")
    ds = digits_small.subset(list(range(8)))
    ctx = make_context(tiny_preset, tiny_model, ds, "cpu", cfg, "h", None)
    full, sub = KFACInfluence(cfg), KFACInfluence(cfg, factor_draws=1)
    assert full.bank_settings(ctx) != sub.bank_settings(ctx)
    full.build(ctx)
    sub.build(ctx)
    assert not torch.allclose(full.factors.eigenvalues(), sub.factors.eigenvalues())
    q, g = _query(ctx, ds.images[0], make_draws(4, (1, 8, 8), 1000, seed=1))
    assert np.isfinite(sub.score(sub.prepare(ctx, q, g))).all()
    # the config field is the same knob (what the CLI's --kfac-factor-draws sets)
    via_config = KFACInfluence(dataclasses.replace(cfg, kfac_factor_draws=1))
    assert via_config.factor_settings(ctx) == sub.factor_settings(ctx)
    via_config.build(ctx)
    torch.testing.assert_close(via_config.factors.eigenvalues(), sub.factors.eigenvalues())


def test_factor_draws_with_shared_draws_is_refused():
    """Shared draws: factors from k of the bank's M timesteps leave the time-embedding layers' input factor
    rank <= k, and the rows' components in that null space would be divided by the damping alone."""
    with pytest.raises(ValueError, match="per-example"):
        KFACInfluence(AttributionConfig(mc_samples=4, kfac_factor_draws=2, draws="shared"))
    # k >= M draws is all of them: the default's factors and cache key
    assert KFACInfluence(AttributionConfig(mc_samples=4, kfac_factor_draws=4, draws="shared")).factor_draws is None
    assert KFACInfluence(AttributionConfig(mc_samples=4, kfac_factor_draws=2, draws="per-example")).factor_draws == 2
    # refused up front with the config's other ranges (sessions, presets), before any method is made
    from engine.validation import check_attribution_config

    with pytest.raises(ValueError, match="per-example"):
        check_attribution_config(AttributionConfig(mc_samples=4, kfac_factor_draws=2, draws="shared"))
    check_attribution_config(AttributionConfig(mc_samples=4, kfac_factor_draws=2, draws="per-example"))


def test_factor_draws_mode_per_example_with_shared_bank_draws(tiny_preset, tiny_model, digits_small):
    """kfac_factor_draws_mode="per-example": the bank keeps the shared draws, the factors get independent
    draws per example (so k < M is allowed); they equal the factors of the all-per-example config."""
    from engine.attribution.train_draws import PerExampleDraws
    from engine.validation import check_attribution_config

    ds = digits_small.subset(list(range(8)))
    shared = AttributionConfig(mc_samples=4, draws="shared")
    own = dataclasses.replace(shared, kfac_factor_draws_mode="per-example", kfac_factor_draws=2)
    check_attribution_config(own)  # k < M is fine once the factors have draws of their own
    with pytest.raises(ValueError, match="same or per-example"):
        check_attribution_config(dataclasses.replace(shared, kfac_factor_draws_mode="sometimes"))
    ctx = make_context(tiny_preset, tiny_model, ds, "cpu", own, "h", None)
    m = KFACInfluence(own)
    draws = m.factor_train_draws(ctx)
    assert isinstance(draws, PerExampleDraws) and len(draws) == 2
    assert not isinstance(ctx.train_draws, PerExampleDraws)  # the bank's stay shared
    assert m.factor_settings(ctx) != KFACInfluence(shared).factor_settings(ctx)
    m.build(ctx)
    # the same factors as with per-example draws everywhere (same seed, same first k draws per example)
    pe = dataclasses.replace(own, draws="per-example", kfac_factor_draws_mode="same")
    ref = KFACInfluence(pe)
    ref.build(make_context(tiny_preset, tiny_model, ds, "cpu", pe, "h", None))
    torch.testing.assert_close(m.factors.eigenvalues(), ref.factors.eigenvalues())
    # with per-example bank draws the mode changes nothing: same cache key
    ctx_pe = make_context(tiny_preset, tiny_model, ds, "cpu", pe, "h", None)
    both = dataclasses.replace(pe, kfac_factor_draws_mode="per-example")
    assert KFACInfluence(both).factor_settings(ctx_pe) == ref.factor_settings(ctx_pe)
    q, g = _query(ctx, ds.images[0], make_draws(4, (1, 8, 8), 1000, seed=1))
    assert np.isfinite(m.score(m.prepare(ctx, q, g))).all()


def test_streamed_bank_equals_stored_bank_and_scores_the_grid_in_one_pass(
    tmp_path, tiny_preset, tiny_model, digits_small
):
    """Without a stored bank (docs/architecture.md §8) the scores are those of the unquantised stored bank;
    streaming is chosen only when asked ("auto" compresses when the bank would exceed kfac_bank_max_gb);
    one pass serves the whole grid."""
    import copy

    from engine.attribution.damping_grid import DAMPING_GRID
    from engine.attribution.streamed_bank import StreamedBank

    model = copy.deepcopy(tiny_model).double()  # float64: the two paths round differently
    ds = digits_small.subset(list(range(12)))
    base = AttributionConfig(mc_samples=3, seed=0)
    draws = make_draws(3, (1, 8, 8), 1000, seed=1)
    stored_ctx = make_context(tiny_preset, model, ds, "cpu", base, "h" * 16, None)
    stored = KFACInfluence(base, quantize=False)
    stored.build(stored_ctx)
    q, g = _query(stored_ctx, ds.images[3], draws)
    prep_stored = stored.prepare(stored_ctx, q, g)

    cfg = dataclasses.replace(base, kfac_bank="streamed")
    store = Store(tmp_path, "h" * 16, "digits12")
    ctx = make_context(tiny_preset, model, ds, "cpu", cfg, "h" * 16, store)
    streamed = KFACInfluence(cfg, quantize=False)
    assert streamed.bank_mode(ctx) == "streamed" and KFACInfluence(base).bank_mode(ctx) == "stored"
    too_big = dataclasses.replace(base, kfac_bank="auto", kfac_bank_max_gb=1e-6)  # a few KB
    assert KFACInfluence(too_big).bank_mode(ctx) == "compressed"
    streamed.build(ctx)
    assert isinstance(streamed.bank, StreamedBank) and streamed.is_built(ctx)
    assert not any(p.name.startswith("kfac-bank") for p in tmp_path.rglob("*"))  # factors only on disk
    prep = streamed.prepare(ctx, q, g)
    for lam in (1e-8, 1e-2, 10.0):  # grid values: one streamed pass for all of them
        np.testing.assert_allclose(
            streamed.score(prep, lam), stored.score(prep_stored, lam), rtol=1e-6, atol=1e-12
        )
    assert 1e-2 in DAMPING_GRID and streamed.bank.passes == 1
    # not on the grid but inside damping_grid.SUPPORTED: interpolated from the grid, no pass
    assert 3e-3 not in DAMPING_GRID
    off_grid = streamed.score(prep, 3e-3)
    assert streamed.bank.passes == 1
    exact = prep_stored.query.exact(3e-3)
    np.testing.assert_allclose(off_grid, exact, rtol=1e-3, atol=1e-4 * np.abs(exact).max())
    assert not np.allclose(off_grid, streamed.score(prep, 1e-2), rtol=1e-3)
    # outside it: one exact pass
    np.testing.assert_allclose(streamed.score(prep, 5e3), stored.score(prep_stored, 5e3), rtol=1e-6, atol=1e-12)
    assert streamed.bank.passes == 2

    # a fresh instance finds the cached factors and builds nothing
    again = KFACInfluence(cfg, quantize=False)
    assert again.is_built(ctx)
    msgs: list[str] = []
    again.build(ctx, lambda m, f: msgs.append(m))
    assert not any("rows" in m for m in msgs)
    with pytest.raises(ValueError, match="kfac_bank"):
        KFACInfluence(dataclasses.replace(cfg, kfac_bank="disk")).bank_mode(ctx)


def test_size_and_build_time_count_only_the_current_settings(tmp_path, tiny_preset, tiny_model, digits_small):
    """Caches of another M kept in the same store are not added to this method's size or build time."""
    ds = digits_small.subset(list(range(12)))
    store = Store(tmp_path, "s" * 16, "digits12")
    built = {}
    for m_samples in (2, 3):
        cfg = AttributionConfig(mc_samples=m_samples, seed=0)
        ctx = make_context(tiny_preset, tiny_model, ds, "cpu", cfg, "s" * 16, store)
        m = KFACInfluence(cfg)
        m.build(ctx)
        built[m_samples] = (m, ctx)
    entries = [e for e in store.describe() if e["state"] == "ok"]
    assert len(entries) == 4  # factors + bank for each M
    m, ctx = built[3]
    own = [e for e in entries if e["settings"].get("mc_samples") == 3]
    assert len(own) == 2
    assert m.size_mb(ctx) == pytest.approx(sum(e["size_mb"] for e in own))
    assert m.size_mb(ctx) < sum(e["size_mb"] for e in entries)
    assert m.recorded_build_seconds(ctx) == pytest.approx(sum(e["meta"]["build_seconds"] for e in own))


def test_the_build_bar_splits_at_the_factor_passs_estimated_share_of_the_time(tmp_path, tiny_preset, tiny_model,
                                                                               digits_small):
    """QA 25 #6: the factor pass had a fixed 75% of the bar, which a digits build reached after 18% of its time (its
    8 factor draws per example against the bank's 64).  The split is now r F / (r F + M) (``FACTOR_ROW_COST``); the
    bank's messages take the rest; factors already built give the bank the whole bar, a streamed bank (no pass at
    build time) the factors."""
    from engine.attribution.methods.kfac_influence import FACTOR_ROW_COST

    ds = digits_small.subset(list(range(32)))
    cfg = AttributionConfig(mc_samples=8, seed=0, kfac_factor_draws=2, kfac_factor_draws_mode="per-example")
    store = Store(tmp_path, "0" * 16, "digits32")
    ctx = make_context(tiny_preset, tiny_model, ds, "cpu", cfg, "0" * 16, store)
    m = KFACInfluence(cfg)
    share = FACTOR_ROW_COST * 2 / (FACTOR_ROW_COST * 2 + 8)
    assert m.factor_share(ctx) == pytest.approx(share) and share < 0.5
    msgs: list[tuple[str, float]] = []
    m.build(ctx, lambda msg, f: msgs.append((msg, f)))
    factor = [f for msg, f in msgs if "factors" in msg]
    bank = [f for msg, f in msgs if "train gradients" in msg]
    assert factor and bank and max(factor) == pytest.approx(share) and min(bank) > share and max(bank) == 1.0
    # another bank over the same factors (the plain int8 grid): the bank's pass is the whole bar
    m2 = KFACInfluence(dataclasses.replace(cfg, kfac_bank_whiten=None))
    assert m2.factor_share(ctx, factors_built=True) == 0.0
    msgs.clear()
    m2.build(ctx, lambda msg, f: msgs.append((msg, f)))
    bank = [f for msg, f in msgs if "train gradients" in msg]
    assert not any("factors:" in msg for msg, _ in msgs) and bank[0] == pytest.approx(16 / 32)  # 16 of 32 rows
    streamed = KFACInfluence(dataclasses.replace(cfg, kfac_bank="streamed"))
    assert streamed.factor_share(ctx) == 1.0
    ekfac = KFACInfluence(dataclasses.replace(cfg, ekfac=True))  # its eigenvalue pass goes over the rows again
    assert ekfac.factor_share(ctx) == pytest.approx(2 * FACTOR_ROW_COST * 2 / (2 * FACTOR_ROW_COST * 2 + 8))


def _killed_build(tmp_path, tiny_preset, tiny_model, digits_small, stop_at: str):
    """A K-FAC build of 32 digits (bank parts of 8 examples) stopped at its first message containing ``stop_at``,
    as a kill would stop it: (config, store, context, the factor pass's share of the bar)."""
    from engine.attribution.methods.kfac_influence import FACTOR_ROW_COST

    class Stop(BaseException):
        pass

    ds = digits_small.subset(list(range(32)))
    cfg = AttributionConfig(mc_samples=8, seed=0, kfac_factor_draws=2, kfac_factor_draws_mode="per-example")
    store = Store(tmp_path, "0" * 16, "digits32")
    ctx = make_context(tiny_preset, tiny_model, ds, "cpu", cfg, "0" * 16, store)
    m = KFACInfluence(cfg)
    m.chunk_size = 8  # parts of 8 examples: the bank pass saves some before it is stopped

    def stop(msg: str, f: float) -> None:
        if stop_at in msg:
            raise Stop

    with pytest.raises(Stop):
        m.build(ctx, stop)
    return cfg, store, ctx, FACTOR_ROW_COST * 2 / (FACTOR_ROW_COST * 2 + 8)


def test_a_resumed_build_keeps_the_factor_passs_share_of_the_bar(tmp_path, tiny_preset, tiny_model, digits_small):
    """QA 30c: a server killed in the bank pass (80% of the bar) restarted at 26%: the restarted build found the
    factors built and gave the bank the whole bar, so three quarters of the progress seemed lost though 95% of the
    work was kept.  Factors built by an earlier attempt of this build (the bank has saved parts) keep their
    share; factors built for another bank still give that bank the whole bar."""
    cfg, store, ctx, share = _killed_build(tmp_path, tiny_preset, tiny_model, digits_small, "train gradients 24/32")
    msgs: list[tuple[str, float]] = []
    resumed = KFACInfluence(cfg)
    resumed.chunk_size = 8
    resumed.build(ctx, lambda msg, f: msgs.append((msg, f)))
    assert msgs[0] == ("K-FAC Influence: K-FAC factors loaded (saved by an earlier run)", pytest.approx(share))
    assert min(f for _, f in msgs) == pytest.approx(share) and msgs[-1][1] == 1.0


def test_a_build_killed_before_its_banks_first_part_says_it_reloads_the_factors(tmp_path, tiny_preset, tiny_model,
                                                                               digits_small):
    """QA 43: a server killed after the factor pass and before the bank's first saved part restarted silently at
    0%: the bank had no saved parts, so the reloaded factors were taken for another bank's and no line said they
    were reused.  The bank's build began (its folder is made before its first part), so the restart keeps the
    factor pass's share and says so, in the words of a resumed pass (which the app's build worker records); factors
    found for a bank not yet begun are said too, with the bank's whole bar."""
    from engine.attribution.build_worker import EARLIER_RUN

    # the bank pass's first message, before its first part is saved
    cfg, store, ctx, share = _killed_build(tmp_path, tiny_preset, tiny_model, digits_small, "train gradients")
    again = KFACInfluence(cfg)
    again.chunk_size = 8  # in the bank's settings, as the killed build's
    bank_key = again._bank_key(ctx)
    assert not store.has_saved_parts(*bank_key) and store.build_started(*bank_key)
    msgs: list[tuple[str, float]] = []
    again.build(ctx, lambda msg, f: msgs.append((msg, f)))
    assert msgs[0] == ("K-FAC Influence: K-FAC factors loaded (saved by an earlier run)", pytest.approx(share))
    assert EARLIER_RUN in msgs[0][0]
    assert min(f for _, f in msgs) == pytest.approx(share) and msgs[-1][1] == 1.0
    assert not store.build_started(*bank_key)  # published: the partial folder is gone

    other = KFACInfluence(dataclasses.replace(cfg, kfac_bank_whiten=None))  # another bank over the same factors
    other.chunk_size = 8
    msgs.clear()
    other.build(ctx, lambda msg, f: msgs.append((msg, f)))
    assert msgs[0] == ("K-FAC Influence: K-FAC factors loaded (saved by an earlier run)", 0.0)
    msgs.clear()
    built = KFACInfluence(cfg)
    built.chunk_size = 8  # in the bank's settings
    built.build(ctx, lambda msg, f: msgs.append((msg, f)))  # all built: loading says nothing of the factors
    assert not any("factors loaded" in msg for msg, _ in msgs), msgs


def test_a_bank_begun_over_earlier_factors_resumes_its_bar_where_it_stood(tmp_path, tiny_preset, tiny_model,
                                                                           digits_small):
    """QA 50 #3: a bank begun over factors built earlier (for another bank, or a bank deleted since) has the whole bar;
    killed at 24%, its restart found the bank begun and counted the factors as this build's, so the page jumped to 71%
    and its time left from 5 to 15 minutes.  The share the bank's first attempt drew with is noted in its partial
    folder and kept by every later attempt; a build that computed its factors keeps theirs (the tests above)."""

    class Stop(BaseException):
        pass

    cfg, store, ctx, share = _killed_build(tmp_path, tiny_preset, tiny_model, digits_small, "train gradients 24/32")
    KFACInfluence(cfg).build(ctx)  # the factors' own bank, finished
    other_cfg = dataclasses.replace(cfg, kfac_bank_whiten=None)  # another bank over the same, earlier factors
    first = KFACInfluence(other_cfg)
    first.chunk_size = 8
    msgs: list[tuple[str, float]] = []

    def until_24(msg: str, f: float) -> None:
        msgs.append((msg, f))
        if "train gradients 24/32" in msg:
            raise Stop

    with pytest.raises(Stop):
        first.build(ctx, until_24)
    assert msgs[0] == ("K-FAC Influence: K-FAC factors loaded (saved by an earlier run)", 0.0)
    stood = msgs[-1][1]
    assert stood == pytest.approx(24 / 32)
    assert store.build_note(*first._bank_key(ctx)) == {"factor_share": 0.0}
    msgs.clear()
    again = KFACInfluence(other_cfg)
    again.chunk_size = 8
    again.build(ctx, lambda msg, f: msgs.append((msg, f)))
    assert msgs[0] == ("K-FAC Influence: K-FAC factors loaded (saved by an earlier run)", 0.0)
    bank = [f for msg, f in msgs if "train gradients" in msg]
    # where it stood (the old code: share + (1 - share) * 24 / 32, 0.85, and its factors "loaded" at share)
    assert bank and bank[0] == pytest.approx(stood) and max(bank) == 1.0
    assert not store.build_started(*again._bank_key(ctx))  # published, its note with it


def test_a_bank_killed_as_its_folder_appears_keeps_its_bar_share(tmp_path, tiny_preset, tiny_model, digits_small,
                                                                   monkeypatch):
    """QA 53 #1: the share was noted at the bank's first message, 1.2 s after its partial folder appeared; a kill in
    between left a begun bank without a note, whose restart counted the earlier factors as its own (24% at once).
    The folder is made with its note now, so a kill at any moment after it appears leaves the note."""
    from engine.attribution import partial_build

    class Stop(BaseException):
        pass

    cfg, store, ctx, share = _killed_build(tmp_path, tiny_preset, tiny_model, digits_small, "train gradients 24/32")
    KFACInfluence(cfg).build(ctx)  # the factors' own bank, finished: the factors are now "earlier" for any other
    other_cfg = dataclasses.replace(cfg, kfac_bank_whiten=None)
    real_init = partial_build.PartialBuild.__init__

    def made_then_killed(self, *a, **k):
        real_init(self, *a, **k)
        raise Stop  # the kill: the folder exists, no part and no message yet

    monkeypatch.setattr(partial_build.PartialBuild, "__init__", made_then_killed)
    first = KFACInfluence(other_cfg)
    first.chunk_size = 8
    with pytest.raises(Stop):
        first.build(ctx)
    monkeypatch.setattr(partial_build.PartialBuild, "__init__", real_init)
    bank_key = first._bank_key(ctx)
    assert store.build_started(*bank_key) and store.build_note(*bank_key) == {"factor_share": 0.0}
    again = KFACInfluence(other_cfg)
    again.chunk_size = 8
    msgs: list[tuple[str, float]] = []
    again.build(ctx, lambda msg, f: msgs.append((msg, f)))
    assert msgs[0] == ("K-FAC Influence: K-FAC factors loaded (saved by an earlier run)", 0.0)
    assert min(f for _, f in msgs) == 0.0 and msgs[-1][1] == 1.0  # the old code: from 0.38, the factors' share


def test_a_float64_factor_pass_is_a_setting_with_its_own_cache_key(tiny_preset, tiny_model, digits_small):
    """``kfac_factor_dtype="float64"`` (QA 31a: below a damping of about 1e-9 float32 factors score their own
    rounding on a small data set) builds other factors under another key; float32, the default, keeps the key
    every shipped cache was built under."""
    from engine.config import attribution_key
    from engine.validation import check_attribution_config

    cfg = AttributionConfig(mc_samples=2, draws="per-example")
    wide = dataclasses.replace(cfg, kfac_factor_dtype="float64")
    ds = digits_small.subset(list(range(8)))
    ctx = make_context(tiny_preset, tiny_model, ds, "cpu", cfg, "h", None)
    narrow_m, wide_m = KFACInfluence(cfg), KFACInfluence(wide)
    assert "factor_dtype" not in narrow_m.factor_settings(ctx)
    assert wide_m.factor_settings(ctx) == {**narrow_m.factor_settings(ctx), "factor_dtype": "float64"}
    assert "kfac_factor_dtype" not in attribution_key(cfg, 8) and attribution_key(wide, 8)["kfac_factor_dtype"] == "float64"
    with pytest.raises(ValueError, match="float32 or float64"):
        check_attribution_config(dataclasses.replace(cfg, kfac_factor_dtype="float16"))
    narrow_m.build(ctx)
    wide_m.build(make_context(tiny_preset, tiny_model, ds, "cpu", wide, "h", None))
    assert wide_m.factors.layers[0].b.dtype == torch.float32  # stored in the model's dtype
    assert not torch.equal(wide_m.factors.eigenvalues(), narrow_m.factors.eigenvalues())
    # the input factors A do not depend on the MC-Fisher's sampled labels (whose stream differs between float32 and
    # float64): the same rows' covariances, up to the float32 pass's rounding
    for lw, ln in zip(wide_m.factors.layers, narrow_m.factors.layers, strict=True):
        if lw.a is not None:
            torch.testing.assert_close(lw.a, ln.a, rtol=1e-3, atol=1e-5 * float(lw.a.max()))
    q, g = _query(ctx, ds.images[0], make_draws(2, (1, 8, 8), 1000, seed=1))
    assert np.isfinite(wide_m.score(wide_m.prepare(ctx, q, g), 1e-12)).all()


def test_the_build_plan_says_which_bank_auto_chose_and_how_many_rows_each_pass_has(tiny_preset, tiny_model, digits_small):
    """QA 33: a cifar2 build on a CPU never said that ``auto`` had picked the compressed bank (a stored one would
    hold 178 GB) nor how long its passes are. ``build_plan`` says both before the build starts."""
    from engine.attribution.context import make_context
    from engine.attribution.gradients import num_params

    ds = digits_small.subset(list(range(20)))
    fits = AttributionConfig(mc_samples=4, kfac_factor_draws=2, kfac_factor_draws_mode="per-example")
    ctx = make_context(tiny_preset, tiny_model, ds, "cpu", fits, "h", None)
    p = num_params(ctx.params)
    plan = KFACInfluence(fits).build_plan(ctx)
    assert plan.startswith(f"stored bank (auto: a stored int8 bank of N x P = 20 x {p:,} bytes")
    assert "fits kfac_bank_max_gb 8" in plan
    assert "factor pass over 40 (example, draw) rows, then a gradient pass over 20 images x 4 draws for the bank" in plan
    small = dataclasses.replace(fits, kfac_bank_max_gb=20 * p / 2 / (1 << 30))  # half the stored bank's size
    assert KFACInfluence(small).build_plan(make_context(tiny_preset, tiny_model, ds, "cpu", small, "h", None)) \
        .startswith("compressed bank (auto: a stored int8 bank of N x P")
    asked = dataclasses.replace(fits, kfac_bank="streamed")
    plan = KFACInfluence(asked).build_plan(make_context(tiny_preset, tiny_model, ds, "cpu", asked, "h", None))
    assert plan == "streamed bank; factor pass over 40 (example, draw) rows"  # no bank pass at build time


def test_the_build_plan_announces_no_factor_pass_when_the_factors_are_saved(tmp_path, tiny_preset, tiny_model,
                                                                            digits_small):
    """QA 62 F5: with the factors in the cache (a stored bank built before a compressed one, or a killed build),
    the plan said "factor pass over 64 (example, draw) rows" and the next line "K-FAC factors loaded"."""
    from engine.attribution.context import make_context
    from engine.attribution.store import Store

    ds = digits_small.subset(list(range(12)))
    cfg = AttributionConfig(mc_samples=2, seed=0, kfac_bank="streamed")
    ctx = make_context(tiny_preset, tiny_model, ds, "cpu", cfg, "h" * 16, Store(tmp_path, "h" * 16, "digits12"))
    assert KFACInfluence(cfg).build_plan(ctx) == "streamed bank; factor pass over 24 (example, draw) rows"
    KFACInfluence(cfg).build(ctx)  # the factors only (the streamed bank has no bank pass)
    stored = dataclasses.replace(cfg, kfac_bank="stored")
    ctx = make_context(tiny_preset, tiny_model, ds, "cpu", stored, "h" * 16, Store(tmp_path, "h" * 16, "digits12"))
    assert KFACInfluence(stored).build_plan(ctx) == ("stored bank; factors saved by an earlier build, then a gradient "
                                                     "pass over 12 images x 2 draws for the bank")


@pytest.mark.parametrize("bank", ["compressed", "auto"])
@pytest.mark.parametrize("setting, words", [({"kfac_blocks": "joint"}, "needs separate weight and bias blocks"),
                                            ({"ekfac": True}, "supports K-FAC, not EK-FAC")])
def test_the_compressed_bank_refuses_joint_blocks_and_ekfac_before_the_factor_pass(
    tmp_path, tiny_preset, tiny_model, digits_small, bank, setting, words
):
    """QA 55 #1: joint [W | b] blocks with the compressed bank crashed in its projection (an AttributeError,
    after the factor pass: minutes to hours at CIFAR scale), and ``auto`` picks that bank for any model whose
    stored bank would not fit.  EK-FAC was refused only after the factor pass too.  Both fail at once now, with
    what to change, and say when ``auto`` made the choice."""
    ds = digits_small.subset(list(range(12)))
    cfg = AttributionConfig(mc_samples=3, seed=0, kfac_bank=bank, kfac_bank_max_gb=1e-6, **setting)
    ctx = make_context(tiny_preset, tiny_model, ds, "cpu", cfg, "h" * 16, Store(tmp_path, "h" * 16, "digits12"))
    said: list[str] = []
    with pytest.raises(ValueError, match=words) as err:
        KFACInfluence(cfg).build(ctx, lambda msg, f: said.append(msg))
    assert ("'auto' chose the compressed bank" in str(err.value)) == (bank == "auto")
    assert said == [] and not any(tmp_path.rglob("*.npy"))  # nothing computed
    stored = dataclasses.replace(cfg, kfac_bank="stored")  # the stored bank serves both
    KFACInfluence(stored).build(make_context(tiny_preset, tiny_model, ds, "cpu", stored, "h" * 16, None))


def test_a_float64_models_damping_floor_is_its_factors_float64_one(tiny_preset, tiny_model, digits_small):
    """QA 55 #8: with ``kfac_factor_dtype="float32"`` (the default) the factor pass sums in the model's own dtype,
    but the resolution floor was reckoned with float32's eps whatever that dtype, so a float64 model's float64
    factors warned of float32 rounding at dampings 1e9 times above their floor."""
    import copy

    ds = digits_small.subset(list(range(12)))
    cfg = AttributionConfig(mc_samples=3, seed=0)
    floors = {}
    for dtype in (torch.float32, torch.float64):
        model = copy.deepcopy(tiny_model).to(dtype)
        method = KFACInfluence(cfg, quantize=False)
        method.build(make_context(tiny_preset, model, ds, "cpu", cfg, "h" * 16, None))
        largest = float(method.factors.block_largest_eigenvalues(method._eigenvalues).double().median())
        assert method.damping_floor() == pytest.approx(float(torch.finfo(dtype).eps) * largest, rel=1e-6)
        floors[dtype] = method.damping_floor()
        lam = floors[dtype] / 10
        name = str(dtype).removeprefix("torch.")
        assert f"below the {name} factors' resolution" in method.damping_warning(lam)
        assert method.damping_warning(floors[dtype] * 10) is None
    assert floors[torch.float64] < 1e-8 * floors[torch.float32]
