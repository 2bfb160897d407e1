"""Resolution stages of the U-Net's layers (engine.attribution.stages), used by the by-stage diagnostics:
the stages partition the flat gradient, and a query gradient kept on one stage is that stage's term of
the K-FAC score, because the eigenbasis rotation keeps every layer's entries among its own coordinates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.attribution.curvature import compute_kfac
from engine.attribution.gradients import influence_params, per_example_grads
from engine.attribution.stages import keep_only, layer_stages, stage_indices
from engine.model.diffusion import make_draws


def _stages(model: nn.Module) -> dict[str, str]:
    return layer_stages(model, torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long))


def test_every_layer_gets_the_grid_it_works_at(tiny_model):
    stages = _stages(tiny_model)
    layers = {n for n, m in tiny_model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(stages) == layers
    # the tiny U-Net works at 8 and 4 pixels, its attention (at 4) on 16 tokens, its time MLP on vectors
    assert set(stages.values()) == {"8 px", "4 px", "vector"}
    assert stages["conv_in"] == stages["conv_out"] == "8 px"
    assert stages["temb_dense0"] == "vector"
    attn = [n for n in stages if n.endswith(".q")]
    assert attn and all(stages[n] == "4 px" for n in attn)


def test_stage_indices_partition_the_flat_gradient_in_params_order(tiny_model):
    params = influence_params(tiny_model)
    idx = stage_indices(params, _stages(tiny_model))
    assert list(idx) == ["8 px", "4 px", "vector"]  # finest grid first
    total = sum(p.numel() for _, p in params)
    allidx = torch.cat(list(idx.values()))
    assert len(allidx) == total and torch.equal(allidx.sort().values, torch.arange(total))
    # conv_in's weight is the first 8 px parameter after the time MLP's
    offset = 0
    for name, p in params:
        if name == "conv_in.weight":
            break
        offset += p.numel()
    assert offset in set(idx["8 px"].tolist()) and offset not in set(idx["vector"].tolist())


def test_a_stage_kept_query_scores_exactly_its_stage_term(tiny_model, diffusion, digits_small):
    """tau restricted to a stage (keep_only before the rotation) == the stage's coordinates of the
    rotated query times the metric times the rotated training gradients, and the stages sum to tau."""
    params = influence_params(tiny_model)
    x = digits_small.images[:6].float()
    draws = make_draws(2, (1, 8, 8), diffusion.T, seed=3)
    factors = compute_kfac(tiny_model, diffusion, x, draws, params, batch_size=16)
    g = per_example_grads(tiny_model, diffusion, x, draws).double()
    f64 = factors  # in float64, for a comparison at 1e-10
    for lf in f64.layers:
        lf.qb, lf.b = lf.qb.double(), lf.b.double()
        if lf.qa is not None:
            lf.qa, lf.a = lf.qa.double(), lf.a.double()
    metric = 1.0 / (f64.eigenvalues() + 1e-3)
    rg = f64.rotate(g)  # (6, P): the bank's coordinates
    q = g[0] + 0.3 * g[1]
    whole = (f64.rotate(q) * metric) @ rg.T
    idx = stage_indices(params, _stages(tiny_model))
    parts = []
    for stage, i in idx.items():
        rq = f64.rotate(keep_only(q, i))
        outside = torch.ones(len(q), dtype=torch.bool)
        outside[i] = False
        assert torch.count_nonzero(rq[outside]) == 0, stage  # the rotation stays inside the stage
        got = (rq * metric) @ rg.T
        want = (f64.rotate(q)[i] * metric[i]) @ rg[:, i].T
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        parts.append(got)
    torch.testing.assert_close(sum(parts), whole, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(parts[0], whole)  # a single stage is not the whole score


def test_unknown_parameter_is_refused(tiny_model):
    with pytest.raises(ValueError, match="not a Conv2d/Linear layer"):
        stage_indices([("nowhere.weight", torch.zeros(3))], _stages(tiny_model))
