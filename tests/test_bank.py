"""Rotated int8 bank (engine.attribution.bank): exact against curvlinops' inverse, int8 ~ float32, resumable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from curvlinops import KFACInverseLinearOperator, KFACLinearOperator
from scipy.stats import spearmanr
from torch import nn

from engine.attribution.bank import quantize_blocks
from engine.attribution.bank_build import build_bank
from engine.attribution.curvature import compute_kfac
from engine.attribution.gradients import influence_params, per_example_grads
from engine.attribution.store import Store
from engine.config import ComputeConfig
from engine.model.diffusion import make_draws


class _Rows(nn.Module):
    """Independent of engine.attribution.curvature: rows [x_t | t] -> flattened eps prediction."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, X):
        return self.net(X[:, :-1].reshape(-1, 1, 8, 8), X[:, -1].round().long()).flatten(1)


def _rows(diffusion, x, draws, batch):
    m = len(draws)
    xs = x.repeat_interleave(m, 0)
    t = draws.t.repeat(x.shape[0])
    eps = draws.eps.repeat(x.shape[0], 1, 1, 1)
    X = torch.cat([diffusion.q_sample(xs, t, eps).flatten(1), t.to(x.dtype)[:, None]], 1)
    y = eps.flatten(1)
    return [(X[s : s + batch], y[s : s + batch]) for s in range(0, len(X), batch)]


@pytest.mark.parametrize("joint", [False, True])
def test_bank_scores_equal_curvlinops_inverse(tiny_model, diffusion, digits_small, joint):
    """Separate weight/bias blocks (the default) and joint [W | b] blocks (the ablation) each equal
    curvlinops' exact-damped inverse with the same ``separate_weight_and_bias``."""
    model = tiny_model.double()
    params = influence_params(model)
    n, m = 6, 3
    x = digits_small.images[:n].double()
    draws = make_draws(m, (1, 8, 8), diffusion.T, seed=0).to("cpu", torch.float64)
    f = compute_kfac(model, diffusion, x, draws, params, fisher_type="mc", seed=5, batch_size=7, joint=joint)
    assert any(b.kind == "joint" for b in f.blocks) == joint
    bank = build_bank(model, diffusion, x, draws, f, params, quantize=False, chunk_size=4)
    assert bank.data[0].dtype == torch.float64
    op = KFACLinearOperator(
        _Rows(model),
        nn.MSELoss(),
        [p for _, p in params],
        _rows(diffusion, x, draws, 7),
        check_deterministic=False,
        seed=5,
        fisher_type="mc",
        num_per_example_loss_terms=1,
        num_data=n * m,
        separate_weight_and_bias=not joint,
    )
    G = per_example_grads(model, diffusion, x, draws, params=params)
    qgrad = per_example_grads(model, diffusion, digits_small.images[10:11].double(), draws, params=params)[0]
    for lam in (1e-2, 1e-6):
        inv = KFACInverseLinearOperator(op, damping=lam, use_exact_damping=True)
        ref = (qgrad @ (inv @ G.T)) / n
        got = bank.score(f.rotate(qgrad) / (f.eigenvalues() + lam))
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-6, atol=1e-6 * ref.abs().max().item())


def test_int8_matches_float32(tiny_model, diffusion, digits_small):
    params = influence_params(tiny_model)
    x = digits_small.images
    draws = make_draws(4, (1, 8, 8), diffusion.T, seed=0)
    f = compute_kfac(tiny_model, diffusion, x, draws, params, seed=0)
    b8 = build_bank(tiny_model, diffusion, x, draws, f, params, quantize=True, chunk_size=32)
    b32 = build_bank(tiny_model, diffusion, x, draws, f, params, quantize=False, chunk_size=32)
    assert b8.data[0].dtype == torch.int8 and b32.data[0].dtype == torch.float32
    qdraws = make_draws(4, (1, 8, 8), diffusion.T, seed=1)
    for qi in (3, 40):
        g = per_example_grads(tiny_model, diffusion, x[qi : qi + 1], qdraws, params=params)[0]
        for lam in (1e-8, 1e-3):
            q = f.rotate(g) / (f.eigenvalues() + lam)
            s8, s32 = b8.score(q), b32.score(q)
            assert spearmanr(s8, s32).statistic >= 0.99
            assert np.abs(s8 - s32).max() < 0.05 * np.abs(s32).max()


def test_quantize_error_bound():
    gen = torch.Generator().manual_seed(0)
    from engine.attribution.curvature import Block

    blocks = [Block("w", 0, "weight", 0, (3, 4)), Block("b", 0, "bias", 12, (3,))]
    r = torch.randn(5, 15, generator=gen) * torch.logspace(-6, 2, 5)[:, None]
    r[2, 12:] = 0.0
    data, scales = quantize_blocks(r, blocks)
    for j, blk in enumerate(blocks):
        deq = data[j].float() * scales[:, j : j + 1]
        err = (deq - r[:, blk.offset : blk.offset + blk.size]).abs()
        assert (err <= scales[:, j : j + 1] / 2 * (1 + 1e-5)).all()
        assert data[j].abs().max() == 127
    assert torch.all(data[1][2] == 0)


class _Stop(Exception):
    pass


def test_resumable_build(tmp_path, tiny_model, diffusion, digits_small):
    params = influence_params(tiny_model)
    x = digits_small.images[:10]
    draws = make_draws(2, (1, 8, 8), diffusion.T, seed=0)
    f = compute_kfac(tiny_model, diffusion, x, draws, params)
    store = Store(tmp_path, "0" * 16, "digits")
    settings = {"test": 1}
    seen: list[str] = []

    def interrupt(msg, frac):
        seen.append(msg)
        if frac > 0.4:  # the first chunk (4 of 10) is saved before the next gradient batch reports
            raise _Stop

    # the whitened grid: the resumed parts must be rounded with the same weights as the first ones
    kw = dict(store=store, name="bank", settings=settings, chunk_size=4, grad_batch=2, whiten=1e-10)
    key = {**settings, "quantize": True, "chunk_size": 4, "whiten": 1e-10}
    with pytest.raises(_Stop):
        build_bank(tiny_model, diffusion, x, draws, f, params, progress=interrupt, **kw)
    assert not store.exists("bank", key)
    resumed: list[str] = []
    b1 = build_bank(tiny_model, diffusion, x, draws, f, params, progress=lambda m, _: resumed.append(m), **kw)
    assert resumed[0] == "resuming: 4/10 examples saved by an earlier run"  # said, on the build's progress
    assert resumed[1] == "train gradients 6/10"  # examples 0-3 were not recomputed
    assert store.exists("bank", key)
    assert not store.exists("bank", {**settings, "quantize": True, "chunk_size": 4})  # the plain grid's key
    b2 = build_bank(
        tiny_model, diffusion, x, draws, f, params, quantize=True, chunk_size=4, whiten=1e-10
    )  # uninterrupted, in memory
    for d1, d2 in zip(b1.data, b2.data, strict=True):
        assert torch.equal(d1, d2)
    assert torch.equal(b1.scales, b2.scales)
    assert torch.equal(b1.weights, b2.weights)
    loaded = build_bank(tiny_model, diffusion, x, draws, f, params, **kw)  # from the store: the same weights
    q = torch.randn(b1.weights.shape[0], generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(loaded.score(q), b2.score(q))
    again: list[str] = []
    b3 = build_bank(tiny_model, diffusion, x, draws, f, params, progress=lambda m, _: again.append(m), **kw)
    assert again == [] and torch.equal(b3.data[0], b1.data[0])  # loaded, not rebuilt


@pytest.mark.parametrize("quantize", [True, False])
def test_score_many_equals_score_per_query(tiny_model, diffusion, digits_small, quantize):
    """The multi-damping pass (used to pre-score the app's damping grid) equals one pass per query."""
    params = influence_params(tiny_model)
    x = digits_small.images[:10]
    draws = make_draws(2, (1, 8, 8), diffusion.T, seed=0)
    f = compute_kfac(tiny_model, diffusion, x, draws, params, seed=1, batch_size=8)
    bank = build_bank(tiny_model, diffusion, x, draws, f, params, quantize=quantize, chunk_size=4)
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(3, bank.blocks[-1].offset + bank.blocks[-1].size, generator=g)
    many = bank.score_many(queries, chunk_bytes=4096)  # small chunks: several row chunks per block
    assert many.shape == (3, 10)
    for i in range(3):
        one = bank.score(queries[i])
        np.testing.assert_allclose(many[i], one, rtol=1e-4, atol=1e-6 * np.abs(one).max())


def test_fused_int8_scan_equals_torch_chunks(monkeypatch):
    """The numba kernel (one read of each int8, no float copy) gives the torch chunked scan's inner
    products to float32 rounding, on blocks of very different sizes; switched off, the torch path runs."""
    from engine.attribution import int8_scan
    from engine.attribution.bank import RotatedBank
    from engine.attribution.curvature import Block

    gen = torch.Generator().manual_seed(0)
    sizes, n = [3000, 7, 640, 1], 37
    blocks, data, off = [], [], 0
    for j, size in enumerate(sizes):
        blocks.append(Block(f"b{j}", j, "weight", off, (size,)))
        data.append(torch.randint(-127, 128, (n, size), generator=gen, dtype=torch.int8))
        off += size
    scales = torch.rand(n, len(sizes), generator=gen) * 1e-3
    bank = RotatedBank(blocks, data, scales)
    q = torch.randn(off, generator=gen)
    ref = bank.inner(q, chunk_bytes=1 << 12)  # explicit chunks: always the torch path
    exact = sum((data[j].double() @ q[b.offset : b.offset + b.size].double()) * scales[:, j].double()
                for j, b in enumerate(blocks))
    torch.testing.assert_close(ref.double(), exact, rtol=1e-5, atol=1e-6)
    if int8_scan.available():
        assert bank._fused_ok() and bank._packed is not None  # packed into one (n, P) array on load
        torch.testing.assert_close(bank.inner(q).double(), exact, rtol=1e-5, atol=1e-6)
        for j in range(len(sizes)):  # the blocks are views of the packed array, same values
            assert torch.equal(bank.data[j], data[j])
        torch.testing.assert_close(bank.row(5).double(), torch.cat(
            [data[j][5].double() * scales[5, j].double() for j in range(len(sizes))]))  # rows read the views
        monkeypatch.setattr("engine.attribution.bank._available_memory_bytes", lambda: 4 * bank.nbytes - 4)
        assert RotatedBank(blocks, data, scales)._packed is None  # over a quarter of the free memory: not packed
        assert RotatedBank(blocks, data, scales, pack=False)._packed is None  # or when asked not to
        monkeypatch.setattr("engine.attribution.bank._available_memory_bytes", lambda: None)
        per_block = RotatedBank(blocks, data, scales, compute=ComputeConfig(pack_max_bytes=0))  # one loop per block
        assert per_block._packed is None and per_block._fused_ok()
        torch.testing.assert_close(per_block.inner(q).double(), exact, rtol=1e-5, atol=1e-6)
        assert int8_scan.warm_up()
    monkeypatch.setenv("ATTRIBUTION_INT8_KERNEL", "torch")
    assert not int8_scan.available() and not bank._fused_ok()
    torch.testing.assert_close(bank.inner(q).double(), exact, rtol=1e-5, atol=1e-6)


def test_packed_scan_refuses_inconsistent_shapes():
    """The packed kernel checks its offsets against the scales and the array before it reads memory."""
    from engine.attribution import int8_scan

    if not int8_scan.available():
        pytest.skip("numba is not installed")
    packed, out = np.ones((3, 8), np.int8), np.zeros(3, np.float32)
    q, scales = np.ones(8, np.float32), np.ones((3, 2), np.float32)
    int8_scan.packed_row_dots_into(packed, np.array([0, 3, 8], np.int64), q, scales, out)
    np.testing.assert_array_equal(out, [8.0, 8.0, 8.0])
    for bad in (np.array([0, 3, 7], np.int64), np.array([0, 8], np.int64), np.array([0, 3, 8], np.int32)):
        with pytest.raises(ValueError):
            int8_scan.packed_row_dots_into(packed, bad, q, scales, out)
    with pytest.raises(ValueError):
        int8_scan.packed_row_dots_into(packed, np.array([0, 3, 8], np.int64), np.ones(7, np.float32), scales, out)


def _slope_and_error(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of int8 scores on float ones (1: no shrink) and the largest error / largest score."""
    return float(got @ ref / (ref @ ref)), float(np.abs(got - ref).max() / np.abs(ref).max())


def test_whitened_grid_is_closer_to_float_rows(tiny_model, diffusion, digits_small):
    """The damped query weighs most the eigen-directions where the training rows are smallest, which the
    plain per-row grid rounds coarsely (on trained models: to zero, shrinking every score;
    scripts/bank_rounding.py).  On the whitened grid (rows divided by sqrt(e + f max e) before rounding,
    the query multiplied back) the error against float rows is several times smaller, the slope stays 1,
    and the dequantised rows are R_i within half a step of each coordinate's own grid.  (Dampings far
    below the factors' float32 noise, 1e-12 on this rank-deficient tiny model, are noise on both.)"""
    params = influence_params(tiny_model)
    x = digits_small.images
    draws = make_draws(4, (1, 8, 8), diffusion.T, seed=0)
    f = compute_kfac(tiny_model, diffusion, x, draws, params, seed=0)
    kw = dict(quantize=True, chunk_size=32)
    plain = build_bank(tiny_model, diffusion, x, draws, f, params, **kw)
    white = build_bank(tiny_model, diffusion, x, draws, f, params, whiten=1e-10, **kw)
    exact = build_bank(tiny_model, diffusion, x, draws, f, params, quantize=False, chunk_size=32)
    assert plain.weights is None and white.weights is not None
    qdraws = make_draws(4, (1, 8, 8), diffusion.T, seed=1)
    for qi in (3, 40):
        g = per_example_grads(tiny_model, diffusion, x[qi : qi + 1], qdraws, params=params)[0]
        for lam in (1e-8, 1e-4):
            q = f.rotate(g) / (f.eigenvalues() + lam)
            ref = exact.score(q).astype(np.float64)
            _, e_plain = _slope_and_error(plain.score(q), ref)
            s_white, e_white = _slope_and_error(white.score(q), ref)
            assert e_white < e_plain / 4, (qi, lam, e_white, e_plain)
            assert abs(s_white - 1) < 1e-3
            # the grid pass (torch path) takes the same weights as the fused single-damping scan
            np.testing.assert_allclose(white.score_many(torch.stack([q, 2 * q]))[0], white.score(q), rtol=1e-4,
                                       atol=1e-5 * np.abs(ref).max())
    w = white.weights
    for i in (0, 17):
        err = (white.row(i) - exact.row(i)).abs()
        step = torch.cat([white.scales[i, j].expand(b.size) for j, b in enumerate(white.blocks)]) * w
        assert (err <= step / 2 * (1 + 1e-4) + 1e-12).all()


def test_plain_grid_shrinks_scores_that_weigh_small_eigen_directions():
    """The mechanism behind the whitened grid, on synthetic rows whose spread per coordinate is sqrt(e)
    (as rotated gradients' is) with eigenvalues over eight decades: the query q / (e + lambda) weighs the
    small-e coordinates most, the plain grid rounds them to zero and the scores shrink (slope well
    below 1); on the whitened grid the slope is 1 and the error far smaller."""
    from engine.attribution.bank import RotatedBank, whitening
    from engine.attribution.curvature import Block

    gen = torch.Generator().manual_seed(0)
    n, p = 200, 4000
    blocks = [Block("w", 0, "weight", 0, (40, 50)), Block("b", 0, "bias", 2000, (2000,))]
    e = torch.logspace(0, -8, p)[torch.randperm(p, generator=gen)]
    shared = torch.randn(p, generator=gen)  # a direction every row and the query share (positive scores)
    rows = (0.5 * shared + torch.randn(n, p, generator=gen)) * e.sqrt()
    q = (shared * e.sqrt()) / (e + 1e-8)
    ref = (rows.double() @ q.double()).numpy()
    slopes = {}
    for name, weights in (("plain", None), ("whitened", whitening(e, blocks, 1e-10))):
        data, scales = quantize_blocks(rows, blocks, weights)
        got = RotatedBank(blocks, data, scales, weights=weights).inner(q).double().numpy()
        slopes[name] = _slope_and_error(got, ref)
    assert slopes["plain"][0] < 0.9  # most of the score sits below the plain grid's step
    assert abs(slopes["whitened"][0] - 1) < 2e-3
    assert slopes["whitened"][1] < slopes["plain"][1] / 10
