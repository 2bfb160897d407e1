"""K-FAC factors (engine.attribution.curvature): the scale is that of the Hessian of L = (1/N) sum_n l(theta, x_n)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.attribution.curvature import KFACFactors, compute_kfac, layout
from engine.attribution.gradients import influence_params
from engine.model.diffusion import Diffusion, make_draws

SHAPE = (1, 2, 2)
D = 4


class LinearEps(nn.Module):
    """eps_theta(x_t, t) = W vec(x_t) + b: K-FAC, GGN and Hessian of L coincide (weight/bias blocks)."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.lin = nn.Linear(D, D, bias=bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1)).reshape(x.shape)


def _setup(n: int, m: int, seed: int = 0):
    torch.manual_seed(seed)
    model = LinearEps().double().eval()
    x = torch.rand(n, *SHAPE, dtype=torch.float64) * 2 - 1
    draws = make_draws(m, SHAPE, 1000, seed=seed + 1).to("cpu", torch.float64)
    return model, Diffusion(), x, draws


def _loss_L(model, diffusion, x, draws):
    """L = (1/N) sum_n (1/M) sum_m (1/D) ||eps_m - eps_theta(x_t, t_m)||^2."""
    xs = x.repeat_interleave(len(draws), 0)
    t = draws.t.repeat(x.shape[0])
    eps = draws.eps.repeat(x.shape[0], 1, 1, 1)
    return (eps - model(diffusion.q_sample(xs, t, eps), t)).pow(2).flatten(1).mean(1).mean()


def _dense_blocks(f: KFACFactors) -> list[torch.Tensor]:
    """Each block's dense matrix in its rotated layout's order (joint: row-major [W | b])."""
    out = []
    for blk in f.blocks:
        lf = f.layers[blk.layer]
        B = lf.qb @ torch.diag(lf.b) @ lf.qb.T
        if blk.kind in ("weight", "joint"):
            A = lf.qa @ torch.diag(lf.a) @ lf.qa.T
            out.append(torch.kron(B, A))  # row-major vec(W): index o * d_in + i
        else:
            out.append(B)
    return out


def _L_of(v, diffusion, x, draws):
    """L as a function of the flat parameters (weight row-major, then bias) of LinearEps."""
    w, b = v[: D * D].reshape(D, D), v[D * D :]
    xs = x.repeat_interleave(len(draws), 0)
    t = draws.t.repeat(x.shape[0])
    eps = draws.eps.repeat(x.shape[0], 1, 1, 1)
    pred = diffusion.q_sample(xs, t, eps).flatten(1) @ w.T + b
    return (eps.flatten(1) - pred).pow(2).mean(1).mean()


@pytest.mark.parametrize("n,m", [(1, 1), (3, 5)])
def test_kfac_equals_hessian_of_L_for_linear_model(n, m):
    """One data point (and several): type-2 K-FAC == exact GGN == Hessian of L, weight and bias blocks."""
    model, diffusion, x, draws = _setup(n, m)
    params = influence_params(model)
    f = compute_kfac(model, diffusion, x, draws, params, fisher_type="type-2", batch_size=4)
    flat = torch.cat([p.detach().reshape(-1) for _, p in params])
    # the closed form is the engine's L at the current parameters
    assert _L_of(flat, diffusion, x, draws).item() == pytest.approx(
        _loss_L(model, diffusion, x, draws).item(), rel=1e-12
    )
    H = torch.autograd.functional.hessian(lambda v: _L_of(v, diffusion, x, draws), flat)
    Kw, Kb = _dense_blocks(f)
    torch.testing.assert_close(Kw, H[: D * D, : D * D], rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(Kb, H[D * D :, D * D :], rtol=1e-5, atol=1e-12)
    assert Kb.diag().mean().item() == pytest.approx(2.0 / D, rel=1e-9)  # Hessian of (1/D)||.||^2


@pytest.mark.parametrize("n,m", [(1, 1), (3, 5)])
def test_joint_blocks_equal_hessian_of_L_for_one_row(n, m):
    """Joint [W | b] blocks (curvlinops separate_weight_and_bias=False): for one (example, draw) row,
    type-2 K-FAC is the full Hessian of L over weight and bias together, cross terms included;
    for several rows it matches the Hessian on the weight-weight and bias-bias diagonal blocks only
    where K-FAC is exact (bias-bias: B = 2/D I)."""
    model, diffusion, x, draws = _setup(n, m)
    params = influence_params(model)
    f = compute_kfac(model, diffusion, x, draws, params, fisher_type="type-2", batch_size=4, joint=True)
    assert [b.kind for b in f.blocks] == ["joint"] and f.blocks[0].shape == (D, D + 1)
    flat = torch.cat([p.detach().reshape(-1) for _, p in params])
    H = torch.autograd.functional.hessian(lambda v: _L_of(v, diffusion, x, draws), flat)
    # [W | b] row-major index o * (D + 1) + i  ->  flat index o * D + i (weight) or D * D + o (bias)
    perm = torch.tensor([o * D + i if i < D else D * D + o for o in range(D) for i in range(D + 1)])
    K = _dense_blocks(f)[0]
    H_joint = H[perm][:, perm]
    if n * m == 1:
        torch.testing.assert_close(K, H_joint, rtol=1e-5, atol=1e-12)
    bias_rows = perm >= D * D
    torch.testing.assert_close(K[bias_rows][:, bias_rows], H_joint[bias_rows][:, bias_rows], rtol=1e-5, atol=1e-12)
    # the rotation round-trips and the damped inverse inverts G + lambda I
    v = torch.randn(f.num_params, dtype=torch.float64)
    torch.testing.assert_close(f.unrotate(f.rotate(v)), v)
    w = f.inverse_apply(v, 1e-3)
    torch.testing.assert_close((K + 1e-3 * torch.eye(D * (D + 1), dtype=K.dtype)) @ w[perm], v[perm])


def test_mc_fisher_matches_within_sampling_error():
    model, diffusion, x, draws = _setup(40, 50)
    f = compute_kfac(
        model, diffusion, x, draws, influence_params(model), fisher_type="mc", seed=0, batch_size=500
    )
    Kb = _dense_blocks(f)[1]
    torch.testing.assert_close(Kb, torch.eye(D, dtype=Kb.dtype) * 2.0 / D, rtol=0, atol=0.15 * 2.0 / D)


def test_empirical_fisher_scale():
    """Empirical B = (1/(NM)) sum_rows D * g g^T with g = d l_r / d output = (2/D)(f - eps)."""
    model, diffusion, x, draws = _setup(3, 4)
    f = compute_kfac(model, diffusion, x, draws, influence_params(model), fisher_type="empirical")
    xs = x.repeat_interleave(4, 0)
    t = draws.t.repeat(3)
    eps = draws.eps.repeat(3, 1, 1, 1)
    with torch.no_grad():
        r = (model(diffusion.q_sample(xs, t, eps), t) - eps).flatten(1) * 2.0 / D
    torch.testing.assert_close(_dense_blocks(f)[1], D * r.T @ r / r.shape[0], rtol=1e-8, atol=1e-12)


def test_ekfac_eigenvalues_are_mean_squared_rotated_row_gradients():
    model, diffusion, x, draws = _setup(2, 3)
    params = influence_params(model)
    f = compute_kfac(model, diffusion, x, draws, params, fisher_type="empirical", ekfac=True)
    lf = f.layers[0]
    acc_w, acc_b = 0, 0
    for i in range(2):
        for j in range(3):
            one = type(draws)(draws.t[j : j + 1], draws.eps[j : j + 1])
            gw, gb = torch.autograd.grad(
                D**0.5 * _loss_L(model, diffusion, x[i : i + 1], one), [p for _, p in params]
            )
            acc_w = acc_w + (lf.qb.T @ gw @ lf.qa) ** 2
            acc_b = acc_b + (lf.qb.T @ gb) ** 2
    torch.testing.assert_close(lf.ekfac_weight, acc_w / 6, rtol=1e-7, atol=1e-14)
    torch.testing.assert_close(lf.ekfac_bias, acc_b / 6, rtol=1e-7, atol=1e-14)


def test_inverse_apply_is_damped_inverse(tiny_model, diffusion, digits_small):
    model = tiny_model.double()
    params = influence_params(model)
    x = digits_small.images[:3].double()
    draws = make_draws(2, (1, 8, 8), diffusion.T, seed=0).to("cpu", torch.float64)
    f = compute_kfac(model, diffusion, x, draws, params, kfac_approx="reduce", seed=1)
    v = torch.randn(f.num_params, dtype=torch.float64)
    torch.testing.assert_close(f.unrotate(f.rotate(v)), v)
    lam = 1e-3
    w = f.inverse_apply(v, lam)
    # (G + lam) w == v, with G applied blockwise from the dense factors
    back = []
    for blk, K in zip(f.blocks, _dense_blocks(f), strict=True):
        back.append(K @ w[blk.offset : blk.offset + blk.size] + lam * w[blk.offset : blk.offset + blk.size])
    torch.testing.assert_close(torch.cat(back), v, rtol=1e-6, atol=1e-9)


def test_factors_round_trip_and_no_norm_layers(tiny_model, diffusion, digits_small):
    params = influence_params(tiny_model)
    x = digits_small.images[:2]
    draws = make_draws(2, (1, 8, 8), diffusion.T, seed=0)
    f = compute_kfac(tiny_model, diffusion, x, draws, params, ekfac=True)
    assert f.num_params == sum(p.numel() for _, p in params)
    assert not any(isinstance(tiny_model.get_submodule(lf.name), nn.GroupNorm) for lf in f.layers)
    template, _ = layout(tiny_model, params)
    g = KFACFactors.from_arrays(f.to_arrays(), template)
    torch.testing.assert_close(g.eigenvalues(), f.eigenvalues())
    assert f.ekfac and g.ekfac
    with pytest.raises(ValueError):
        layout(tiny_model, [(n, p) for n, p in tiny_model.named_parameters() if "norm" in n])


def test_other_threads_forward_passes_do_not_enter_the_factors(tiny_model, diffusion, digits_small):
    """The app answers queries with the shared model while its build runs in another thread (QA round 19:
    it used to lock every query out for a whole build).  curvlinops hooks the modules it is given, so on the
    shared model a query's forward passes would enter the factors; the pass runs on a private copy."""
    import threading

    params = influence_params(tiny_model)
    x = digits_small.images[:24]
    draws = make_draws(2, (1, 8, 8), diffusion.T, seed=0)
    alone = compute_kfac(tiny_model, diffusion, x, draws, params, seed=0, batch_size=4)
    stop, passes = threading.Event(), []

    def query_thread() -> None:  # what the page's thread does meanwhile: forward passes of other images
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            while not stop.is_set():
                tiny_model(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, diffusion.T, (8,), generator=g))
                passes.append(1)

    t = threading.Thread(target=query_thread)
    t.start()
    try:
        busy = compute_kfac(tiny_model, diffusion, x, draws, params, seed=0, batch_size=4)
    finally:
        stop.set()
        t.join()
    assert len(passes) > 3  # the other thread really ran during the pass
    for a, b in zip(alone.layers, busy.layers, strict=True):
        for name in ("a", "qa", "b", "qb"):
            u, v = getattr(a, name), getattr(b, name)
            assert (u is None and v is None) or torch.equal(u, v), (a.name, name)
    assert all(p.grad is None for _, p in params)  # nor did the pass leave gradients on the shared model


def test_the_private_copy_neither_reads_nor_carries_another_threads_hooks():
    """Review 53: deepcopy walked the shared model's hook tables while another thread (a re-rank, a GPU gradient
    pass) added and removed its thread-guarded hooks: 3 of 300 copies failed with "OrderedDict mutated during
    iteration", failing the K-FAC build, and 296 carried the other thread's hooks into the copy."""
    import threading

    from engine.attribution.curvature import private_copy
    from engine.attribution.gradients import this_thread_only

    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(30)])
    params = list(model.named_parameters())
    stop = threading.Event()

    def hooking() -> None:
        while not stop.is_set():
            for h in [m.register_forward_hook(this_thread_only(lambda *a: None)) for m in model]:
                h.remove()

    t = threading.Thread(target=hooking)
    t.start()
    try:
        # 40 copies: the old code carried the other thread's hooks into 296 of 300 (each copy takes about 0.2 s here
        # while that thread holds the GIL; 200 took 46 s of CI)
        for _ in range(40):
            twin, twin_params = private_copy(model, params)
            assert not any(m._forward_hooks for m in twin.modules())
            assert [n for n, _ in twin_params] == [n for n, _ in params]
            assert all(a is not b and torch.equal(a, b) for (_, a), (_, b) in zip(params, twin_params, strict=True))
    finally:
        stop.set()
        t.join()


def test_a_float64_factor_pass_removes_the_float32_rounding_a_tiny_damping_scores(tiny_model, diffusion, digits_small):
    """QA 31a: the factors summed in float32 know each eigenvalue to about 1e-7 of the largest, and a damping far
    below that turns the rounding into the scores (a 128-image model: 10x off a float64 eq. 6 at 1e-12).
    ``factor_dtype=float64`` runs the pass in float64 on the private copy and stores the eigenbasis in the model's
    dtype: its (G + lambda I)^{-1} g matches a pass on a float64 model, where the float32 pass does not."""
    import copy

    x = digits_small.images[:12]
    draws = make_draws(2, x.shape[1:], diffusion.T, seed=3)
    params = influence_params(tiny_model)
    wide = copy.deepcopy(tiny_model).double()
    reference = compute_kfac(wide, diffusion, x.double(), draws.to("cpu", torch.float64), influence_params(wide),
                             fisher_type="type-2", batch_size=8)
    f64 = compute_kfac(tiny_model, diffusion, x, draws, params, fisher_type="type-2", batch_size=8,
                       factor_dtype=torch.float64)
    f32 = compute_kfac(tiny_model, diffusion, x, draws, params, fisher_type="type-2", batch_size=8)
    assert all(p.dtype == torch.float32 for _, p in params)  # the caller's model is not converted
    assert f64.layers[0].qb.dtype == torch.float32 and f64.layers[0].b.dtype == torch.float32  # stored as the model

    g = torch.randn(f32.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def inverse(f: KFACFactors, lam: float) -> torch.Tensor:
        wide_f = copy.deepcopy(f)
        for lf in wide_f.layers:  # apply in float64: only the factors' own rounding differs
            for key in ("qa", "a", "qb", "b"):
                if getattr(lf, key) is not None:
                    setattr(lf, key, getattr(lf, key).double())
        return wide_f.inverse_apply(g, lam)

    for lam, bound in ((1e-4, 1e-4), (1e-12, 1e-3)):
        want = inverse(reference, lam)
        err64 = float((inverse(f64, lam) - want).norm() / want.norm())
        err32 = float((inverse(f32, lam) - want).norm() / want.norm())
        assert err64 < bound, (lam, err64)
        if lam == 1e-12:
            assert err32 > 10 * err64, (err32, err64)  # the float32 pass's rounding, 1/lambda-amplified
    with pytest.raises(ValueError, match="model's own parameters"):
        compute_kfac(tiny_model, diffusion, x, draws, [(n, p.detach().clone()) for n, p in params],
                     fisher_type="type-2", factor_dtype=torch.float64)


def test_the_resolution_floor_separates_the_dampings_the_float32_factors_resolve(tiny_model, diffusion, digits_small):
    """``resolution_floor`` (eps x the median block's largest eigenvalue) is where a float32 factor pass stops
    matching a float64 one: well above it (G + lambda I)^{-1} g agrees to float32-ish accuracy, well below it the
    rounding dominates. The floor is also the median of the per-block maxima of ``eigenvalues()`` times eps."""
    import copy

    x = digits_small.images[:12]
    draws = make_draws(2, x.shape[1:], diffusion.T, seed=3)
    wide = copy.deepcopy(tiny_model).double()
    reference = compute_kfac(wide, diffusion, x.double(), draws.to("cpu", torch.float64), influence_params(wide),
                             fisher_type="type-2", batch_size=8)
    f32 = compute_kfac(tiny_model, diffusion, x, draws, influence_params(tiny_model), fisher_type="type-2",
                       batch_size=8)
    floor = f32.resolution_floor(torch.float32)
    ev, maxima, at = f32.eigenvalues(), [], 0
    for blk in f32.blocks:
        maxima.append(float(ev[at:at + blk.size].max()))
        at += blk.size
    assert at == ev.numel()
    assert floor == pytest.approx(float(torch.finfo(torch.float32).eps) * float(torch.tensor(maxima).median()),
                                  rel=1e-5)
    assert f32.resolution_floor(torch.float64) < floor * 1e-8

    g = torch.randn(f32.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def err(lam: float) -> float:
        f = copy.deepcopy(f32)
        for lf in f.layers:
            for key in ("qa", "a", "qb", "b"):
                if getattr(lf, key) is not None:
                    setattr(lf, key, getattr(lf, key).double())
        want = reference.inverse_apply(g, lam)
        return float((f.inverse_apply(g, lam) - want).norm() / want.norm())

    above, below = err(100 * floor), err(floor / 100)
    assert above < 1e-2, above
    assert below > 10 * above, (above, below)


class _CountingEps(LinearEps):
    """LinearEps that counts its forward passes (class-wide: the factor pass runs on a private copy)."""

    forwards = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        type(self).forwards += 1
        return super().forward(x, t)


@pytest.mark.parametrize("batch_size, counts", [(16, [0, 6]), (4, [0, 4, 6])])
def test_the_factor_pass_counts_rows_finished_not_rows_handed_over(batch_size, counts):
    """QA 54 F6a: with one batch larger than N x M the bar read "64/64 (example, draw) rows" at 0:00 and stayed so
    for the 7-10 min that batch took; the count is the rows whose batch is done, 0 until the first one is."""
    _, diffusion, x, draws = _setup(3, 2)
    torch.manual_seed(0)
    model = _CountingEps().double().eval()
    params = influence_params(model)
    seen: list[tuple[str, float, int]] = []
    compute_kfac(model, diffusion, x, draws, params, batch_size=batch_size,
                 progress=lambda msg, f: seen.append((msg, f, _CountingEps.forwards)))
    rows = [(m, f, n) for m, f, n in seen if "rows" in m]
    assert [m for m, _, _ in rows] == [f"K-FAC factors: {c}/6 (example, draw) rows" for c in counts]
    assert [f for _, f, _ in rows] == [c / 6 for c in counts]
    for (_, _, before), (_, _, after) in zip(rows, rows[1:], strict=False):
        assert after > before  # a count moves only once the model has computed that batch
    assert seen[-1][0] == "K-FAC factors done"
