"""engine.precision: attribution on a GPU is exact float32 unless ATTRIBUTION_TF32 asks otherwise."""

import pytest
import torch

from engine.precision import TF32_ENV, configure_float32


@pytest.fixture
def restore_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_cuda_turns_tf32_off_by_default(monkeypatch, restore_tf32):
    monkeypatch.delenv(TF32_ENV, raising=False)
    torch.backends.cudnn.allow_tf32 = True  # torch's own default for convolutions
    torch.backends.cuda.matmul.allow_tf32 = True
    assert configure_float32("cuda:0") is False
    assert torch.backends.cudnn.allow_tf32 is False
    assert torch.backends.cuda.matmul.allow_tf32 is False


@pytest.mark.parametrize("value,allowed", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_env_opts_in(monkeypatch, restore_tf32, value, allowed):
    monkeypatch.setenv(TF32_ENV, value)
    assert configure_float32(torch.device("cuda")) is allowed
    assert torch.backends.cudnn.allow_tf32 is allowed


def test_cpu_leaves_switches_alone(monkeypatch, restore_tf32):
    monkeypatch.setenv(TF32_ENV, "1")
    torch.backends.cudnn.allow_tf32 = True
    assert configure_float32("cpu") is False
    assert torch.backends.cudnn.allow_tf32 is True


def test_bench_scale_identity_factors_follow_the_models_device():
    """bench-scale's timing factors (and so the compressed projections drawn from them) live on the
    model's device: on CUDA, CPU identity factors made the hooks multiply CUDA activations by CPU
    projections (found on the GPU check, 2026-12-04). The meta device stands in for a GPU here."""
    from engine.attribution.gradients import influence_params
    from engine.bench.scale import identity_factors
    from engine.config import PRESETS
    from engine.model.unet import build_model

    model = build_model(PRESETS["digits"].model).to("meta")
    factors = identity_factors(model, influence_params(model))
    devices = {t.device.type for lf in factors.layers for t in (lf.qb, lf.b, lf.qa, lf.a) if t is not None}
    assert devices == {"meta"}
