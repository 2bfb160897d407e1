"""Random projection and the TRAK / D-TRAK baselines (docs/architecture.md §5)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine.attribution.methods import make_method
from engine.attribution.methods.base import QueryInput
from engine.attribution.methods.trak import DTRAK, TRAK
from engine.attribution.projection import TILE_ROWS, RandomProjection
from engine.attribution.store import Store
from engine.config import COMPUTE, AttributionConfig
from engine.model.diffusion import make_draws
from engine.model.measurements import Measurement, diffusion_loss, parse_measurement, square_norm

# --- projection ---------------------------------------------------------------------------


def test_projection_deterministic_by_seed():
    a = RandomProjection(300, 16, seed=3).dense()
    b = RandomProjection(300, 16, seed=3).dense()
    c = RandomProjection(300, 16, seed=4).dense()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert set(torch.unique(a * 4.0).tolist()) == {-1.0, 1.0}  # Rademacher, scaled by 1/sqrt(16)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "srht"])
def test_projection_isotropic(kind):
    """E[P P^T] = I: diagonal ~1, off-diagonal ~N(0, 1/k); so inner products are preserved on average."""
    p, k = 48, 4096
    if kind == "srht":
        k = 64  # SRHT keeps at most the padded size (64): then S keeps every row and P P^T = I exactly
    P = RandomProjection(p, k, seed=0, kind=kind).dense().double()
    ppt = P @ P.T
    diag, off = ppt.diagonal(), ppt - torch.diag(ppt.diagonal())
    tol = 6.0 / np.sqrt(k)
    assert (diag - 1).abs().max() < (1e-6 if kind in ("rademacher", "srht") else 6 * np.sqrt(2.0 / k))
    assert off.abs().max() < tol
    assert abs(off.sum().item() / (p * (p - 1))) < 6.0 / np.sqrt(k * p * (p - 1) / 2)
    # averaged over seeds, a fixed inner product is reproduced
    g, h = torch.randn(p, dtype=torch.float64), torch.randn(p, dtype=torch.float64)
    est = []
    for s in range(200):
        proj = RandomProjection(p, 32, seed=s, kind=kind)
        est.append(float(proj.project(g.float()).double() @ proj.project(h.float()).double()))
    se = np.std(est) / np.sqrt(len(est))
    assert abs(np.mean(est) - float(g @ h)) < 5 * se


def test_srht_matches_its_dense_matrix_and_is_seeded():
    """The fast transform equals multiplication by the matrix that ``block`` spells out."""
    p, k = 1000, 100
    proj = RandomProjection(p, k, seed=5, kind="srht")
    dense = proj.dense().double()
    assert set(torch.unique(dense.abs() * np.sqrt(k)).round(decimals=6).tolist()) == {1.0}
    g = torch.randn(70, p)  # more than one internal batch of 64
    torch.testing.assert_close(proj.project(g).double(), g.double() @ dense, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(proj.block(300, 420).double(), dense[300:420])
    assert torch.equal(RandomProjection(p, k, seed=5, kind="srht").dense(), proj.dense())
    assert not torch.equal(RandomProjection(p, k, seed=6, kind="srht").dense(), proj.dense())


def test_compiled_walsh_hadamard_equals_the_torch_transform():
    """The numba butterflies (what SRHT uses on a CPU) and the matmul-based torch passes are the same
    x H_n to float32 rounding; bad input is refused."""
    from engine.attribution import hadamard_kernel
    from engine.attribution.projection import _hadamard, fwht

    if not hadamard_kernel.available():
        pytest.skip("numba is not installed: the torch transform is the only one")
    x = torch.randn(3, 1 << 12, generator=torch.Generator().manual_seed(0))
    y = x.numpy().copy()
    hadamard_kernel.fwht_rows_inplace(y)
    torch.testing.assert_close(torch.from_numpy(y), fwht(x.clone()), rtol=1e-5, atol=1e-3)
    small = torch.randn(2, 8)
    z = small.numpy().copy()
    hadamard_kernel.fwht_rows_inplace(z)
    torch.testing.assert_close(torch.from_numpy(z), small @ _hadamard(8, torch.device("cpu")))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_kernel.fwht_rows_inplace(np.zeros((1, 6), np.float32))
    with pytest.raises(TypeError):
        hadamard_kernel.fwht_rows_inplace(np.zeros((1, 8), np.float64))


def test_projection_independent_of_block_and_batch_size():
    p, k = 2 * TILE_ROWS + 123, 8  # crosses tile boundaries
    streamed = RandomProjection(p, k, seed=7, max_dense_bytes=0)  # tiles generated on the fly
    cached = RandomProjection(p, k, seed=7)  # dense copy held in memory
    dense = cached.dense()
    assert torch.equal(streamed.dense(), dense)
    for start, stop in [(0, 5), (TILE_ROWS - 3, TILE_ROWS + 4), (100, 2 * TILE_ROWS + 50), (p - 2, p)]:
        assert torch.equal(streamed.block(start, stop), dense[start:stop])
    g = torch.randn(5, p)
    ref = (g.double() @ dense.double()).float()
    batch = streamed.project(g)
    torch.testing.assert_close(batch, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached.project(g), ref, rtol=1e-4, atol=1e-4)
    rows = torch.stack([streamed.project(g[i]) for i in range(5)])
    torch.testing.assert_close(rows, batch, rtol=1e-4, atol=1e-4)


def test_identity_projection():
    g = torch.randn(3, 10)
    proj = RandomProjection(10, 10, kind="identity")
    assert torch.equal(proj.project(g), g)
    with pytest.raises(ValueError):
        RandomProjection(10, 5, kind="identity")


# --- TRAK on the tiny model ---------------------------------------------------------------

N, M = 10, 3


def _last_layers(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The output conv and the last ResNet conv: few enough parameters for dense P x P algebra."""
    from engine.attribution.gradients import influence_params

    params = influence_params(model)
    return params[-4:]


def _ctx(tmp_path, model, diffusion, dataset, config, params=None):
    from engine.attribution.gradients import influence_params

    params = influence_params(model) if params is None else params
    draws = make_draws(M, tuple(dataset.images.shape[1:]), diffusion.T, seed=config.seed)
    return SimpleNamespace(
        model=model,
        diffusion=diffusion,
        dataset=dataset,
        device=torch.device("cpu"),
        config=config,
        checkpoint_hash="feedfacecafebeef",
        store=Store(tmp_path / "cache", "feedfacecafebeef", "digits-test"),
        params=params,
        train_draws=draws,
        compute=COMPUTE,  # EngineContext.compute: the preset's speed and memory settings
    )


def _reference_grads(ctx, images, fn) -> torch.Tensor:
    """(n, P) per-example gradients by plain autograd, one example at a time, float64."""
    plist = [p for _, p in ctx.params]
    rows = []
    for x in images:
        with torch.enable_grad():
            value = fn(ctx.model, ctx.diffusion, x, ctx.train_draws)
            grads = torch.autograd.grad(value, plist)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    return torch.stack(rows)


def _query_grad(ctx, image, kind="loss") -> torch.Tensor:
    draws = make_draws(M, tuple(image.shape), ctx.diffusion.T, seed=123)
    fn = diffusion_loss if kind == "loss" else square_norm
    plist = [p for _, p in ctx.params]
    with torch.enable_grad():
        grads = torch.autograd.grad(fn(ctx.model, ctx.diffusion, image, draws), plist)
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.fixture
def small_data(digits_small):
    return digits_small.subset(list(range(N)))


def test_trak_identity_projection_equals_dense_empirical_fisher(tmp_path, tiny_model, diffusion, small_data):
    """k = P (identity P): tau_i = (1/N) g_q^T (F + lambda I)^{-1} g_i with F = (1/N) sum g_i g_i^T, exactly."""
    ctx = _ctx(
        tmp_path,
        tiny_model,
        diffusion,
        small_data,
        AttributionConfig(mc_samples=M),
        params=_last_layers(tiny_model),
    )
    method = TRAK(ctx.config, projection="identity")
    method.part_size = 4  # several parts, as in a real build
    assert not method.is_built(ctx)
    method.build(ctx)
    assert method.is_built(ctx)
    G = _reference_grads(ctx, small_data.images, diffusion_loss)
    gq = _query_grad(ctx, small_data.images[0] * 0.9)
    prepared = method.prepare(ctx, QueryInput(image=small_data.images[0]), gq)
    F = G.T @ G / N
    mean_eig = float(torch.trace(F)) / F.shape[0]
    for lam in (1e-2 * mean_eig, 1.0 * mean_eig):
        ref = (G @ torch.linalg.solve(F + lam * torch.eye(F.shape[0], dtype=F.dtype), gq.double())) / N
        got = method.score(prepared, damping=lam)
        assert got.dtype == np.float32 and got.shape == (N,)
        np.testing.assert_allclose(got, ref.numpy(), rtol=2e-3, atol=2e-3 * float(ref.abs().max()))
    # the stored features are the gradients themselves
    np.testing.assert_allclose(
        method.train_features(ctx), G.numpy(), rtol=1e-4, atol=1e-6 * float(G.abs().max())
    )
    # a second instance loads the cache instead of recomputing (its first pass scores this damping
    # exactly; ``prepared`` interpolates it from its damping grid, to a relative 1e-4 per coordinate)
    again = TRAK(ctx.config, projection="identity")
    assert again.is_built(ctx)
    fresh = again.score(again.prepare(ctx, QueryInput(image=None), gq), 1.0 * mean_eig)
    np.testing.assert_allclose(
        fresh, method.score(prepared, 1.0 * mean_eig), rtol=1e-3, atol=1e-4 * float(np.abs(fresh).max())
    )


def test_dtrak_is_trak_with_square_norm(tmp_path, tiny_model, diffusion, small_data):
    """Same code path; D-TRAK's features are projected square-norm gradients, TRAK's projected loss gradients."""
    config = AttributionConfig(mc_samples=M, trak_dim=24)
    ctx = _ctx(tmp_path, tiny_model, diffusion, small_data, config, params=_last_layers(tiny_model))
    trak, dtrak = make_method("trak", config), make_method("dtrak", config)
    assert isinstance(dtrak, DTRAK) and isinstance(trak, TRAK)
    assert (dtrak.name, dtrak.title, dtrak.kind) == ("dtrak", "D-TRAK", "influence")
    assert trak.default_damping == config.trak_damping and dtrak.default_damping == config.dtrak_damping
    asked = parse_measurement("elbo", 1000)
    assert trak.query_measurement(asked) == asked
    assert dtrak.query_measurement(asked) == Measurement("square-norm")
    assert trak.settings(ctx) != dtrak.settings(ctx)
    trak.build(ctx)
    dtrak.build(ctx)
    proj = trak.projection(ctx)
    assert proj.dim == 24
    want_d = proj.project(_reference_grads(ctx, small_data.images, square_norm).float())
    want_t = proj.project(_reference_grads(ctx, small_data.images, diffusion_loss).float())
    got_d, got_t = torch.from_numpy(dtrak.train_features(ctx)), torch.from_numpy(trak.train_features(ctx))
    scale = float(want_d.abs().max())
    torch.testing.assert_close(got_d, want_d, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(got_t, want_t, rtol=1e-4, atol=1e-5 * float(want_t.abs().max()))
    assert not torch.allclose(got_d, got_t, rtol=0.1)
    # scoring: the same formula on each bank, with the query gradient projected
    gq = _query_grad(ctx, small_data.images[3], kind="square-norm")
    scores = dtrak.score(dtrak.prepare(ctx, QueryInput(image=None), gq), damping=1e-3)
    phi = want_d.double()
    F = phi.T @ phi / N
    ref = phi @ torch.linalg.solve(F + 1e-3 * torch.eye(24, dtype=F.dtype), proj.project(gq).double()) / N
    np.testing.assert_allclose(scores, ref.numpy(), rtol=2e-3, atol=2e-3 * float(ref.abs().max()))


def test_trak_build_resumes_after_interruption(tmp_path, tiny_model, diffusion, small_data, monkeypatch):
    config = AttributionConfig(mc_samples=M, trak_dim=16)
    ctx = _ctx(tmp_path, tiny_model, diffusion, small_data, config, params=_last_layers(tiny_model))
    method = TRAK(config)
    method.part_size = 4
    import engine.attribution.gradients as gradients

    real = gradients.train_loss_grads
    seen: list[int] = []

    def counting(ctx_, diffusion_, images, *args, **kwargs):
        seen.append(images.shape[0])
        if len(seen) == 2:
            raise KeyboardInterrupt
        yield from real(ctx_, diffusion_, images, *args, **kwargs)

    monkeypatch.setattr(gradients, "train_loss_grads", counting)
    with pytest.raises(KeyboardInterrupt):
        method.build(ctx)
    assert not method.is_built(ctx)
    seen.clear()

    def recording(ctx_, diffusion_, images, *args, **kwargs):
        seen.append(images.shape[0])
        return real(ctx_, diffusion_, images, *args, **kwargs)

    monkeypatch.setattr(gradients, "train_loss_grads", recording)
    lines: list[tuple[str, float]] = []
    method.build(ctx, progress=lambda text, frac: lines.append((text, frac)))
    assert seen == [4, 2]  # part 0 kept; parts 1 and 2 (of 4, 4, 2 images) computed
    # the resumed build says so (as K-FAC's bank pass does), and its bar starts where the saved parts end
    n = len(small_data.images)
    assert lines[0] == (f"TRAK: resuming: 4/{n} examples saved by an earlier run", pytest.approx(0.9 * 4 / n))
    fractions = [f for _, f in lines]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    fresh = TRAK(config)
    fresh.part_size = 10
    ctx2 = _ctx(
        tmp_path / "other", tiny_model, diffusion, small_data, config, params=_last_layers(tiny_model)
    )
    fresh.build(ctx2)
    np.testing.assert_allclose(method.train_features(ctx), fresh.train_features(ctx2), rtol=1e-5, atol=1e-6)


def test_trak_with_engine_context_and_measurement_grad(
    tmp_path, tiny_preset, tiny_model, diffusion, small_data
):
    """End to end with the real EngineContext (all influence params, random projection)."""
    from engine.attribution.context import make_context
    from engine.attribution.gradients import measurement_grad

    config = AttributionConfig(mc_samples=2, trak_dim=32)
    store = Store(tmp_path / "cache", "0badc0de0badc0de", "digits-10")
    ctx = make_context(
        tiny_preset, tiny_model, small_data, "cpu", config, "0badc0de0badc0de", store, diffusion
    )
    method = make_method("trak", config)
    method.build(ctx)
    assert method.size_mb(ctx) > 0
    entry = [r for r in store.describe() if r["name"] == "trak"][0]
    assert entry["state"] == "ok" and entry["settings"]["mc_samples"] == 2
    assert entry["settings"]["projection"]["dim"] == 32
    q = QueryInput(image=small_data.images[2])
    meas = method.query_measurement(parse_measurement("loss", 1000))
    draws = make_draws(2, (1, 8, 8), diffusion.T, seed=9)
    gq = measurement_grad(ctx.model, diffusion, meas, q, draws, params=ctx.params)
    scores = method.score(method.prepare(ctx, q, gq))
    assert scores.shape == (N,) and np.all(np.isfinite(scores))
    # the same query and damping give the same scores (pure function of the cache)
    np.testing.assert_array_equal(scores, method.score(method.prepare(ctx, q, gq)))


@pytest.mark.parametrize("n_train", [6, 10])
def test_default_dampings_follow_the_training_set_size(tmp_path, tiny_model, diffusion, small_data, n_train):
    """With no damping configured, TRAK uses 0.1/N and D-TRAK 1/N for the actual N (docs/architecture.md §4)."""
    from engine.config import PRESETS, trak_default_damping

    data = small_data.subset(list(range(n_train)))
    config = AttributionConfig(mc_samples=M, trak_dim=8)
    assert config.trak_damping is None and config.dtrak_damping is None
    assert trak_default_damping(config, "trak", n_train) == pytest.approx(0.1 / n_train)
    assert trak_default_damping(config, "dtrak", n_train) == pytest.approx(1.0 / n_train)
    explicit = AttributionConfig(trak_damping=3e-4, dtrak_damping=2e-3)
    assert trak_default_damping(explicit, "trak", n_train) == 3e-4
    assert trak_default_damping(explicit, "dtrak", n_train) == 2e-3
    # presets carry no hard-coded N
    assert all(p.attribution.trak_damping is None for p in PRESETS.values())
    ctx = _ctx(tmp_path, tiny_model, diffusion, data, config, params=_last_layers(tiny_model))
    for method, want in ((TRAK(config), 0.1 / n_train), (DTRAK(config), 1.0 / n_train)):
        method.build(ctx)
        gq = _query_grad(ctx, data.images[0], kind=method.loss)
        prepared = method.prepare(ctx, QueryInput(image=None), gq)
        assert method.default_damping == pytest.approx(want)
        np.testing.assert_array_equal(method.score(prepared), method.score(prepared, want))
        assert not np.array_equal(method.score(prepared), method.score(prepared, 10 * want))


@pytest.mark.parametrize("n_rows,k", [(40, 12), (12, 40)])
def test_fisher_eigenbasis_scores_equal_a_dense_solve(n_rows, k):
    """k <= N (k x k Fisher) and k > N (N x N Gram matrix) give tau = (1/N) Phi (F + lambda I)^{-1} phi_q."""
    from engine.attribution.methods.trak import fisher_eigenbasis

    g = torch.Generator().manual_seed(0)
    phi = torch.randn(n_rows, k, generator=g) * torch.logspace(0, -2, k)
    phi_q = torch.randn(k, generator=g)
    s, v, z = fisher_eigenbasis([phi[:7], phi[7:]])
    assert v.shape == (k, min(k, n_rows)) and z.shape == (n_rows, min(k, n_rows))
    F = phi.double().T @ phi.double() / n_rows
    for lam in (1e-3, 1e-1):
        ref = phi.double() @ torch.linalg.solve(F + lam * torch.eye(k, dtype=F.dtype), phi_q.double()) / n_rows
        got = z.double() @ ((v.double().T @ phi_q.double()) / (s.double() + lam)) / n_rows
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_trak_per_example_draws_independent_of_parts(tmp_path, tiny_model, diffusion, small_data):
    """Per-example draws (paper G.3): features do not depend on how the build is cut into parts,
    equal the projection of each example's own-draw gradient, and have their own cache key."""
    from engine.attribution.gradients import per_example_grads
    from engine.attribution.train_draws import PerExampleDraws

    config = AttributionConfig(mc_samples=M, trak_dim=16)
    draws = PerExampleDraws(M, tuple(small_data.images.shape[1:]), diffusion.T, seed=config.seed)
    feats = []
    for part_size in (4, 10):
        ctx = _ctx(tmp_path / f"p{part_size}", tiny_model, diffusion, small_data, config, params=_last_layers(tiny_model))
        shared_key = TRAK(config).settings(ctx)
        ctx.train_draws = draws
        method = TRAK(config)
        method.part_size = part_size
        assert method.settings(ctx) != shared_key and method.settings(ctx)["draws_mode"] == "per-example"
        method.build(ctx)
        feats.append(torch.from_numpy(method.train_features(ctx)))
    torch.testing.assert_close(feats[0], feats[1], rtol=1e-5, atol=1e-6)
    g7 = per_example_grads(tiny_model, diffusion, small_data.images[7:8], draws.for_rows(slice(7, 8)),
                           params=ctx.params)
    torch.testing.assert_close(feats[0][7], method.projection(ctx).project(g7)[0].float(), rtol=1e-4, atol=1e-6)


def test_build_dims_one_gradient_pass_for_a_k_sweep(tmp_path, tiny_model, diffusion, small_data, monkeypatch):
    """Several k share one gradient pass; each cache equals the one a plain build of that k makes."""
    import engine.attribution.gradients as gradients

    config = AttributionConfig(mc_samples=M, trak_dim=8)
    ctx = _ctx(tmp_path, tiny_model, diffusion, small_data, config, params=_last_layers(tiny_model))
    real = gradients.train_loss_grads
    calls: list[int] = []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gradients, "train_loss_grads", counting)
    import engine.attribution.partial_build as partial_build

    joined = []
    real_share = partial_build.PartialBuild.share_disk_with
    monkeypatch.setattr(partial_build.PartialBuild, "share_disk_with",
                        lambda self, others: joined.append(len(others)) or real_share(self, others))
    method = TRAK(config)
    method.part_size = 6
    method.build_dims(ctx, [8, 16, 8])
    assert len(calls) == 2  # two parts (6 + 4 images), not two per k
    assert joined == [1]  # the early disk check counts both k's caches together (review 47)
    for k in (8, 16):
        assert ctx.store.exists("trak", method.settings(ctx, k))
        other = _ctx(
            tmp_path / f"k{k}", tiny_model, diffusion, small_data,
            AttributionConfig(mc_samples=M, trak_dim=k), params=_last_layers(tiny_model),
        )
        single = TRAK(other.config)
        single.build(other)
        assert single.settings(other) == method.settings(ctx, k)
        np.testing.assert_allclose(
            np.array(ctx.store.load_arrays("trak", method.settings(ctx, k))["phi"]),
            single.train_features(other), rtol=1e-5, atol=1e-6,
        )
    calls.clear()
    method.build_dims(ctx, [8, 16])  # built: nothing recomputed
    assert calls == []
