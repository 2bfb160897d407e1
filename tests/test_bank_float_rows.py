"""Bank rows kept in a float type other than float32 (QA 30b #2) and the settings a bank is stored under
(QA 30b #1): ``bank.product_dtype``, ``build_bank(store_dtype=...)``, ``bank.artefact_settings``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.attribution.bank import RotatedBank, artefact_settings, product_dtype
from engine.attribution.bank_build import build_bank
from engine.attribution.curvature import compute_kfac
from engine.attribution.gradients import influence_params, per_example_grads
from engine.attribution.store import Store
from engine.model.diffusion import make_draws

FLOAT16_MAX = 65504.0


@pytest.fixture
def bank32(tiny_model, diffusion, digits_small):
    """A float32 bank of 12 examples, its factors, and one real query's rotated gradient."""
    params = influence_params(tiny_model)
    x = digits_small.images[:12]
    draws = make_draws(2, (1, 8, 8), diffusion.T, seed=0)
    f = compute_kfac(tiny_model, diffusion, x, draws, params, seed=1, batch_size=8)
    bank = build_bank(tiny_model, diffusion, x, draws, f, params, quantize=False, chunk_size=5)
    qgrad = per_example_grads(tiny_model, diffusion, digits_small.images[20:21], draws, params=params)[0]
    return bank, f, f.rotate(qgrad), (tiny_model, diffusion, x, draws, params)


def _float16_copy(bank: RotatedBank) -> RotatedBank:
    return RotatedBank(bank.blocks, [d.to(torch.float16) for d in bank.data], None)


def _rounding_bound(bank16: RotatedBank, q: torch.Tensor) -> np.ndarray:
    """What float16 rows may change in (1/N) <R_i, q>: a relative 2^-11 of each |R_ij q_j| (round to nearest),
    2^-25 |q_j| for subnormal entries, and float32 summation (1e-6 of the sum of |terms|)."""
    rows = torch.cat([d.float() for d in bank16.data], dim=1).abs()
    qa = q.abs().float()
    terms = rows @ qa
    return ((2.0**-11 + 1e-6) * terms + 2.0**-25 * qa.sum()).numpy() / bank16.num_examples


def test_product_dtype_widens_narrow_types_only():
    assert product_dtype(torch.int8) == torch.float32
    assert product_dtype(torch.float16) == torch.float32
    assert product_dtype(torch.bfloat16) == torch.float32
    assert product_dtype(torch.float32) == torch.float32
    assert product_dtype(torch.float64) == torch.float64


def test_float16_rows_at_damping_1e8_give_the_float32_scores(bank32):
    """A float16 bank multiplied in float16 overflowed: the damped query q / (e + 1e-8) is far beyond 65,504."""
    bank, f, rotated, _ = bank32
    bank16 = _float16_copy(bank)
    assert bank16.data[0].dtype == torch.float16 and bank16.product_dtype == torch.float32
    lams = (1e-8, 1e-4, 1.0)
    damped = torch.stack([rotated / (f.eigenvalues() + lam) for lam in lams])
    assert damped[0].abs().max() > FLOAT16_MAX  # the trap is there
    ref = bank.score_many(damped)
    for how, got in (
        ("score", np.stack([bank16.score(q) for q in damped])),
        ("score, small chunks", np.stack([bank16.score(q, chunk_bytes=4096) for q in damped])),
        ("score_many", bank16.score_many(damped)),
        ("score_many, small chunks", bank16.score_many(damped, chunk_bytes=4096)),
    ):
        assert got.dtype == np.float32 and np.isfinite(got).all(), how
        for i, q in enumerate(damped):
            err = np.abs(got[i] - ref[i])
            assert (err <= _rounding_bound(bank16, q)).all(), (how, lams[i], float(err.max()))
    row = bank16.row(3)
    assert row.dtype == torch.float32 and torch.isfinite(row).all()


def test_store_dtype_saves_float16_rows_under_their_own_key(bank32, tmp_path):
    bank, f, rotated, (model, diffusion, x, draws, params) = bank32
    store = Store(tmp_path, "0" * 16, "digits")
    own = {"test": 1}
    kw = dict(store=store, name="bank16", settings=own, quantize=False, chunk_size=5)
    b16 = build_bank(model, diffusion, x, draws, f, params, store_dtype=torch.float16, **kw)
    key = artefact_settings(own, quantize=False, chunk_size=5, store_dtype=torch.float16)
    assert key == {"test": 1, "quantize": False, "chunk_size": 5, "store_dtype": "float16"}
    assert store.exists("bank16", key) and not store.exists("bank16", artefact_settings(own, quantize=False, chunk_size=5))
    arrays = store.load_arrays("bank16", key)
    assert {a.dtype for a in arrays.values()} == {np.dtype(np.float16)}
    for d16, d32 in zip(b16.data, bank.data, strict=True):
        assert d16.dtype == torch.float16
        torch.testing.assert_close(d16, d32.to(torch.float16), rtol=0, atol=0)  # rounded once, from float32
    q = rotated / (f.eigenvalues() + 1e-8)
    got = b16.score(q)
    assert np.isfinite(got).all()
    assert (np.abs(got - bank.score(q)) <= _rounding_bound(b16, q)).all()
    # in memory, without a store: the same rows
    mem = build_bank(model, diffusion, x, draws, f, params, quantize=False, chunk_size=5, store_dtype=torch.float16)
    np.testing.assert_array_equal(mem.score(q), got)


def test_artefact_settings_is_what_build_bank_stores_under(bank32, tmp_path):
    """QA 30b #1: one function names the stored settings, for the builder and every kind's ``cache_key``."""
    _, f, _, (model, diffusion, x, draws, params) = bank32
    store = Store(tmp_path, "0" * 16, "digits")
    own = {"method": "kfac", "loss": "loss"}
    build_bank(model, diffusion, x[:4], draws, f, params, store=store, name="b", settings=own, chunk_size=3,
               whiten=1e-6)
    key = artefact_settings(own, quantize=True, chunk_size=3, whiten=1e-6)
    assert key == {**own, "quantize": True, "chunk_size": 3, "whiten": 1e-6}
    assert store.exists("b", key) and not store.exists("b", own)
    assert artefact_settings(key, quantize=True, chunk_size=3, whiten=1e-6) == key  # idempotent
    assert "whiten" not in artefact_settings(own, quantize=False, chunk_size=3, whiten=1e-6)  # int8 grid only
    # a key built for other arguments than the build's is refused, not stored under a third name
    with pytest.raises(ValueError, match="disagree"):
        build_bank(model, diffusion, x[:4], draws, f, params, settings={**own, "quantize": False}, chunk_size=3)
    with pytest.raises(ValueError, match="unquantised"):
        artefact_settings(own, quantize=True, store_dtype=torch.float16)
    with pytest.raises(ValueError, match="float type"):
        artefact_settings(own, quantize=False, store_dtype=torch.int16)
