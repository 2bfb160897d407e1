"""Checkpoints: round trip, content hash, errors, and the diffusers UNet2DModel adapter."""

from __future__ import annotations

import json

import pytest
import torch

from engine.model.checkpoint import CheckpointError, checkpoint_hash, load_checkpoint, save_checkpoint
from engine.model.unet import build_model


def _inputs(preset, n=3):
    g = torch.Generator().manual_seed(0)
    m = preset.model
    return torch.randn(n, m.in_channels, m.image_size, m.image_size, generator=g), torch.tensor([0, 500, 999])


def test_round_trip_identical_outputs(tmp_path, tiny_preset, tiny_model):
    save_checkpoint(tmp_path / "a", tiny_model, tiny_preset, {"note": 1})
    model, preset, extra = load_checkpoint(tmp_path / "a")
    assert preset == tiny_preset and extra == {"note": 1}
    assert not model.training
    x, t = _inputs(tiny_preset)
    with torch.no_grad():
        assert torch.equal(model(x, t), tiny_model(x, t))


def test_hash_stable_and_sensitive(tmp_path, tiny_preset, tiny_model):
    save_checkpoint(tmp_path / "a", tiny_model, tiny_preset)
    save_checkpoint(tmp_path / "b", tiny_model, tiny_preset)
    h = checkpoint_hash(tmp_path / "a")
    assert len(h) == 16 and int(h, 16) >= 0
    assert h == checkpoint_hash(tmp_path / "b")
    # logs, galleries and resume state next to the weights do not change the key
    (tmp_path / "a" / "train_log.json").write_text(json.dumps([{"elapsed_s": 1.23}]))
    (tmp_path / "a" / "gallery.npz").write_bytes(b"x")
    assert checkpoint_hash(tmp_path / "a") == h
    other = build_model(tiny_preset.model)
    with torch.no_grad():
        other.load_state_dict(tiny_model.state_dict())
        next(other.parameters()).view(-1)[0] += 1e-3
    save_checkpoint(tmp_path / "c", other, tiny_preset)
    assert checkpoint_hash(tmp_path / "c") != h
    # a different config with the same weights is a different checkpoint
    save_checkpoint(tmp_path / "d", tiny_model, tiny_preset.replace(diffusion={"beta_end": 0.03}))
    assert checkpoint_hash(tmp_path / "d") != h


def test_missing_and_corrupt(tmp_path, tiny_preset, tiny_model):
    with pytest.raises(CheckpointError, match="nope"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="nope"):
        checkpoint_hash(tmp_path / "nope")
    folder = save_checkpoint(tmp_path / "a", tiny_model, tiny_preset)
    (folder / "model.safetensors").write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        checkpoint_hash(folder)
    folder = save_checkpoint(tmp_path / "b", tiny_model, tiny_preset)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(folder)
    (folder / "config.json").write_text("{}")  # said only "'preset'" (QA 26 #6)
    with pytest.raises(CheckpointError, match=r"config\.json: it has no \"preset\" entry"):
        load_checkpoint(folder)
    # weights that do not fit the config
    folder = save_checkpoint(tmp_path / "c", tiny_model, tiny_preset.replace(model={"base_channels": 16}))
    with pytest.raises(CheckpointError, match="do not match") as e:
        load_checkpoint(folder)
    # one line naming the config and the first difference, not torch's line per tensor (QA 26: 112 lines)
    said = str(e.value)
    assert "\n" not in said and str(folder / "config.json") in said, said
    assert "tensor(s) of another shape (first: " in said and " in the weights, " in said, said


def test_diffusers_adapter(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    ).eval()
    unet.save_pretrained(tmp_path / "unet_only")
    model, preset, extra = load_checkpoint(tmp_path / "unet_only")
    assert preset.model.image_size == 8 and preset.model.in_channels == 1
    assert preset.diffusion.num_timesteps == 1000
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 10, 999])
    with torch.no_grad():
        assert torch.equal(model(x, t), unet(x, t).sample)
        assert torch.equal(model(x, torch.tensor(7)), unet(x, torch.tensor([7, 7, 7])).sample)
    h = checkpoint_hash(tmp_path / "unet_only")
    assert len(h) == 16
    # a pipeline folder: unet/ + scheduler/ with a linear schedule of another length
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    (tmp_path / "pipe" / "scheduler").mkdir()
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"beta_schedule": "linear", "beta_start": 2e-4, "beta_end": 0.03, "num_train_timesteps": 500})
    )
    model2, preset2, _ = load_checkpoint(tmp_path / "pipe")
    assert (preset2.diffusion.num_timesteps, preset2.diffusion.beta_start) == (500, 2e-4)
    with torch.no_grad():
        assert torch.equal(model2(x, t), unet(x, t).sample)
    assert checkpoint_hash(tmp_path / "pipe") != checkpoint_hash(tmp_path / "pipe" / "unet")
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "cosine"}))
    with pytest.raises(CheckpointError, match="cosine"):
        load_checkpoint(tmp_path / "pipe")
    # a pipeline whose unet/config.json is missing: named (it said "no checkpoint config at pipe/config.json")
    (tmp_path / "pipe" / "unet" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"looks like a diffusers pipeline but .*unet/config\.json is missing"):
        load_checkpoint(tmp_path / "pipe")


def test_flipped_bytes_in_the_weights_data_are_refused(tmp_path, tiny_preset, tiny_model, capsys):
    """safetensors checks its header, not its data: 100 bytes XORed in the middle of the weights loaded as
    another model, and `sample` and `build` answered with it (QA 16). The file records its data's digest."""
    from engine.cli import main

    folder = save_checkpoint(tmp_path / "ok", tiny_model, tiny_preset)
    model, _, _ = load_checkpoint(folder)  # an intact file loads
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny_model.state_dict().values(),
                                                   strict=True))
    path = folder / "model.safetensors"
    blob = bytearray(path.read_bytes())
    mid = len(blob) // 2  # inside the data: the header is a few kB at the start
    blob[mid : mid + 100] = bytes(b ^ 0x5A for b in blob[mid : mid + 100])
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="are corrupt"):
        load_checkpoint(folder)
    out = tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", str(folder), "--n", "2", "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: weights {path} are corrupt") and not out.exists(), err
