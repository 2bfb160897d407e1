"""The query gradient's draws (``AttributionConfig.query_draws``): its own, or the bank's shared draws
(common random numbers between the query and every training example)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_session import TINY_ATTRIBUTION, tiny_checkpoint

from engine.attribution.gradients import train_loss_grads
from engine.attribution.precomputed import session_key
from engine.attribution.session import AttributionSession
from engine.model.measurements import parse_measurement
from engine.validation import InvalidSettingError

SHARED = dataclasses.replace(TINY_ATTRIBUTION, draws="shared")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, digits_small):
    folder = tmp_path_factory.mktemp("tiny_ckpt_qd")
    return folder, tiny_checkpoint(folder, digits_small, gallery=1)


def session(ckpt, digits_small, tmp_path, **changes) -> AttributionSession:
    folder, preset = ckpt
    return AttributionSession(preset, checkpoint=folder, device="cpu", cache_root=tmp_path,
                              config=dataclasses.replace(SHARED, **changes), dataset=digits_small)


def test_bank_draws_make_the_query_gradient_of_a_training_image_its_bank_gradient(ckpt, digits_small, tmp_path):
    """With query_draws "bank", attributing training image i computes exactly the gradient that the bank
    holds for i (same (t, eps) pairs); with its own draws the two are different estimates of one gradient."""
    bank = session(ckpt, digits_small, tmp_path, query_draws="bank")
    own = session(ckpt, digits_small, tmp_path, query_draws="own")
    d = bank.query_draws()
    assert torch.equal(d.t, bank.ctx.train_draws.t) and torch.equal(d.eps, bank.ctx.train_draws.eps)
    assert not torch.equal(own.query_draws().eps, d.eps)
    i = 5
    meas = parse_measurement("loss", bank.diffusion.T)
    rows = [g for _, g in train_loss_grads(bank.model, bank.diffusion, digits_small.images[i : i + 1],
                                           bank.ctx.train_draws, batch_size=1, params=list(bank.ctx.params))]
    stored = torch.cat(rows)[0]
    q = bank.parse_query(f"train:{i}")
    with_bank = bank.query_gradient(meas, q, d)
    with_own = own.query_gradient(meas, q, own.query_draws())
    torch.testing.assert_close(with_bank, stored, rtol=1e-4, atol=1e-6)
    assert torch.linalg.vector_norm(with_own - stored) > 0.05 * torch.linalg.vector_norm(stored)
    # fewer draws than the bank's: its first ones
    assert torch.equal(bank.query_draws(2).t, d.t[:2])


def test_bank_draws_need_shared_training_draws_and_at_most_m(ckpt, digits_small, tmp_path):
    with pytest.raises(InvalidSettingError, match="--draws shared"):
        session(ckpt, digits_small, tmp_path, draws="per-example", query_draws="bank")
    with pytest.raises(InvalidSettingError, match="own or bank"):
        session(ckpt, digits_small, tmp_path, query_draws="mine")
    s = session(ckpt, digits_small, tmp_path, query_draws="bank")
    with pytest.raises(ValueError, match="at most the bank's M = 4"):
        s.query_draws(8)
    # stratified timesteps are shared draws too: the query takes them as they are
    st = session(ckpt, digits_small, tmp_path, draws="stratified", query_draws="bank")
    assert st.ctx.train_draws.stratified
    assert torch.equal(st.query_draws().t, st.ctx.train_draws.t) and not torch.equal(st.query_draws().t, s.query_draws().t)
    assert torch.equal(st.query_draws().eps, s.query_draws().eps)


def test_precomputed_key_tells_the_query_draws_apart_and_keeps_the_default_key(ckpt, digits_small, tmp_path):
    """Shipped precomputed gallery scores are keyed without the field (own draws): the default key keeps
    that form, and scores made on the bank's draws are never served for a session on its own draws."""
    own = session_key(session(ckpt, digits_small, tmp_path, query_draws="own"), ["pixel"])
    bank = session_key(session(ckpt, digits_small, tmp_path, query_draws="bank"), ["pixel"])
    assert "query_draws" not in own and own["query_seed"] == SHARED.seed + 1
    assert bank["query_draws"] == "bank" and bank != own
