"""Bank rows kept in a float type other than float32 (QA 30b #2): ``bank.product_dtype``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.attribution.bank import RotatedBank, build_bank, product_dtype
from engine.attribution.curvature import compute_kfac
from engine.attribution.gradients import influence_params, per_example_grads
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
