"""The K-FAC factor pass's and the compressed hooks pass's batches within ``ComputeConfig.factor_batch_bytes``
(QA 62 F1, F2: at CIFAR size 256 factor rows passed 13 GB, 64 hook rows 10.3 GB), and their progress messages
through the untimed eigendecomposition and the hooks pass (QA 62 F4)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from engine.attribution.compressed_bank import build_compressed_bank, compress_factors
from engine.attribution.context import make_context
from engine.attribution.curvature import EIGH_MESSAGE, budget_rows, compute_kfac, pass_row_bytes
from engine.attribution.gradients import influence_params
from engine.attribution.methods.kfac_compressed_bank import hook_batch
from engine.attribution.terminal_progress import Pace
from engine.bar_redraw import UNTIMED
from engine.config import COMPUTE, PRESETS, AttributionConfig, ComputeConfig, ModelConfig
from engine.model.diffusion import make_draws
from engine.model.unet import build_model


def _shape(cfg: ModelConfig) -> tuple[int, int, int]:
    return (cfg.in_channels, cfg.image_size, cfg.image_size)


def _row_bytes(cfg: ModelConfig) -> int:
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    return pass_row_bytes(model, _shape(cfg), influence_params(model))


def test_a_model_with_larger_activations_costs_more_per_row_and_gets_fewer_rows(tiny_preset):
    small = _row_bytes(tiny_preset.model)
    large = _row_bytes(dataclasses.replace(tiny_preset.model, image_size=16))  # 4x the activations, same weights
    assert 3.0 * small < large < 5.0 * small
    budget = 40 * small
    assert budget_rows(256, small, budget) == 40
    assert budget_rows(256, large, budget) < 14
    assert budget_rows(256, large, 1) == 1  # at least one row
    assert budget_rows(256, large, None) == 256  # no budget: the cap


@pytest.mark.parametrize("name", ["digits", "mnist"])
def test_the_shipped_models_keep_their_256_row_factor_batches_and_hook_rows(name):
    """Their factors stay the same bytes (the shipped caches' figures): the default budget leaves their batches."""
    row = _row_bytes(PRESETS[name].model)
    assert budget_rows(256, row, COMPUTE.factor_batch_bytes) == 256
    assert budget_rows(COMPUTE.hook_rows, row, COMPUTE.factor_batch_bytes) == COMPUTE.hook_rows
    # with room: a model 3x mnist's per-row cost still keeps 256 rows
    assert 3 * 256 * row < COMPUTE.factor_batch_bytes or name == "mnist"


def test_cifar_size_gets_a_small_factor_batch():
    row = _row_bytes(PRESETS["cifar2"].model)  # 35.7M parameters, 32x32x3
    assert 80e6 < row < 200e6
    assert 8 <= budget_rows(256, row, COMPUTE.factor_batch_bytes) <= 32


def _factors(model, diffusion, x, draws, params, progress=None, **kw):
    return compute_kfac(model, diffusion, x, draws, params, progress=progress, **kw)


def test_the_budget_splits_the_factor_pass_and_the_factors_do_not_change(tiny_model, diffusion, digits_small):
    model = copy.deepcopy(tiny_model).double()  # float64: the batch's rounding well under 1e-6
    params = influence_params(model)
    x = digits_small.images[:10].double()
    draws = make_draws(2, (1, 8, 8), 1000, seed=0)  # 20 rows
    row = pass_row_bytes(model, (1, 8, 8), params)  # in float64, as the pass
    whole = _factors(model, diffusion, x, draws, params)
    seen: list[str] = []
    split = _factors(model, diffusion, x, draws, params, progress=lambda m, f: seen.append(m),
                     batch_bytes=3 * row + row // 2)  # 3 rows a batch
    starts = [m for m in seen if m.startswith("K-FAC factors: ") and "rows" in m]
    assert starts[:3] == ["K-FAC factors: 0/20 (example, draw) rows", "K-FAC factors: 3/20 (example, draw) rows",
                          "K-FAC factors: 6/20 (example, draw) rows"]
    for a, b in zip(whole.layers, split.layers, strict=True):
        for key in ("a", "b"):
            u, v = getattr(a, key), getattr(b, key)
            if u is None:
                assert v is None
                continue
            assert (u - v).abs().max() <= 1e-6 * u.abs().max()
        for q, e in (("qa", "a"), ("qb", "b")):  # the factors themselves (eigenvectors are defined up to sign)
            if getattr(a, q) is None:
                continue
            fa = getattr(a, q) @ torch.diag(getattr(a, e)) @ getattr(a, q).T
            fb = getattr(b, q) @ torch.diag(getattr(b, e)) @ getattr(b, q).T
            assert (fa - fb).abs().max() <= 1e-6 * fa.abs().max()


def test_the_eigendecomposition_says_so_and_shows_no_time_left(tiny_model, diffusion, digits_small):
    model = copy.deepcopy(tiny_model)
    params = influence_params(model)
    seen: list[tuple[str, float]] = []
    _factors(model, diffusion, digits_small.images[:4], make_draws(2, (1, 8, 8), 1000, seed=0), params,
             progress=lambda m, f: seen.append((m, f)))
    words = [m for m, _ in seen]
    assert words.index(EIGH_MESSAGE) == words.index("K-FAC factors done") - 1
    assert "K-FAC factors: 8/8 (example, draw) rows" in words[: words.index(EIGH_MESSAGE)]
    assert UNTIMED in EIGH_MESSAGE
    # the bar's pace: 60 s of rows to 50%, then the eigendecomposition: no time left while it runs
    pace = Pace().step("K-FAC factors: 0/8 (example, draw) rows", 0.0, 0.0)
    pace = pace.step("K-FAC factors: 4/8 (example, draw) rows", 0.5, 60.0)
    assert pace.left(0.5, 60.0) is not None
    pace = pace.step(EIGH_MESSAGE, 0.5, 61.0)
    assert pace.left(0.5, 61.0) is None and pace.left(0.5, 400.0) is None


def test_the_hooks_pass_says_its_start_and_each_batch(tiny_model, diffusion, digits_small):
    model = copy.deepcopy(tiny_model).double()
    params = influence_params(model)
    x = digits_small.images[:6].double()
    draws = make_draws(2, (1, 8, 8), 1000, seed=0)
    comp = compress_factors(compute_kfac(model, diffusion, x, draws, params), "gaussian", 5.0, seed=2)
    seen: list[str] = []
    build_compressed_bank(model, diffusion, x, draws, comp, params, quantize=False, grad_batch=2,
                          progress=lambda m, f: seen.append(m))
    assert [m for m in seen if m.startswith("compressed train gradients")] == [
        "compressed train gradients 0/6", "compressed train gradients 2/6", "compressed train gradients 4/6",
        "compressed train gradients 6/6"]


def _with_compute(ctx, compute: ComputeConfig):
    return dataclasses.replace(ctx, preset=dataclasses.replace(ctx.preset, compute=compute))


def test_the_budget_lowers_the_hooks_pass_batch(tiny_preset, tiny_model, digits_small):
    model = copy.deepcopy(tiny_model)
    ds = digits_small.subset(list(range(8)))
    config = AttributionConfig(mc_samples=4, seed=0, kfac_bank="compressed")
    ctx = make_context(tiny_preset, model, ds, "cpu", config, "c" * 16, None)
    assert hook_batch(ctx) == COMPUTE.hook_rows // 4  # the default budget leaves the user's hook_rows
    row = pass_row_bytes(model, (1, 8, 8), ctx.params)
    tight = _with_compute(ctx, ComputeConfig(factor_batch_bytes=8 * row + 1))
    assert hook_batch(tight) == 2  # 8 rows over M = 4 draws
    assert hook_batch(_with_compute(ctx, ComputeConfig(factor_batch_bytes=1))) == 1


class _Stop(Exception):
    pass


def test_a_factor_pass_killed_with_a_derived_batch_resumes_to_the_same_factors(tmp_path, tiny_preset, tiny_model,
                                                                               digits_small):
    """The budget, not ``factor_batch``, sets the batch (8 rows of 30); a pass stopped after its checkpoint at row 16
    resumes there (the derived batch is the same, so is the checkpoint's signature) and stores the factors of an
    uninterrupted pass with an 8-row ``factor_batch``, byte for byte."""
    from engine.attribution.methods.kfac_influence import FACTORS, KFACInfluence
    from engine.attribution.pass_checkpoint import PassCheckpoint
    from engine.attribution.store import Store

    cfg = AttributionConfig(mc_samples=3, seed=0)
    data = digits_small.subset(list(range(10)))
    row = pass_row_bytes(tiny_model, (1, 8, 8), influence_params(tiny_model))
    budget = tiny_preset.replace(compute=ComputeConfig(factor_batch_bytes=8 * row + row // 2))

    def ctx(root, preset):
        return make_context(preset, tiny_model, data, "cpu", cfg, "0" * 16, Store(root, "0" * 16, "digits16"))

    def method(batch):
        m = KFACInfluence(cfg)
        m.factor_batch, m.checkpoint_rows, m.chunk_size = batch, 16, 4
        return m

    ref = ctx(tmp_path / "ref", tiny_preset)
    method(8).build(ref)

    cut = ctx(tmp_path / "cut", budget)

    def stop(msg: str, frac: float) -> None:
        if "24/30" in msg:
            raise _Stop(msg)

    with pytest.raises(_Stop):
        method(256).build(cut, stop)
    seen: list[str] = []
    resumed = method(256)
    resumed.build(cut, lambda m, f: seen.append(m))
    assert any("resuming at row 16/30" in m for m in seen) and not any("8/30" in m for m in seen)
    assert not PassCheckpoint.for_store(cut.store, FACTORS, resumed.factor_settings(cut)).path.exists()
    want = ref.store.load_arrays(FACTORS, method(8).factor_settings(ref), mmap=False)
    got = cut.store.load_arrays(FACTORS, resumed.factor_settings(cut), mmap=False)
    assert want.keys() == got.keys() and len(want) > 3
    for k in want:
        assert want[k].tobytes() == got[k].tobytes(), k
