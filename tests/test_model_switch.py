"""The app's sidebar model switch offers only shipped presets whose checkpoints exist."""

from __future__ import annotations

from pathlib import Path

import engine.paths
from explorer.runtime import AppArgs, model_choices


def _fake_assets(tmp_path: Path, present: tuple[str, ...], monkeypatch) -> None:
    for name in present:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(engine.paths, "default_checkpoint", lambda p: tmp_path / p)


def test_switch_offers_shipped_models_with_checkpoints(tmp_path, monkeypatch):
    _fake_assets(tmp_path, ("digits", "mnist"), monkeypatch)
    assert model_choices(AppArgs(preset="digits")) == ["digits", "mnist"]
    assert model_choices(AppArgs(preset="mnist")) == ["digits", "mnist"]


def test_no_switch_for_other_models_or_explicit_checkpoints(tmp_path, monkeypatch):
    _fake_assets(tmp_path, ("digits",), monkeypatch)
    assert model_choices(AppArgs(preset="digits")) == ["digits"]  # mnist not trained: nothing to switch to
    assert model_choices(AppArgs(preset="digits", checkpoint="/some/run")) == []
    assert model_choices(AppArgs(preset="cifar2")) == []
    assert model_choices(AppArgs(preset="my_preset.json")) == []


def test_shipped_checkpoints_live_in_assets():
    assert engine.paths.default_checkpoint("mnist") == engine.paths.ASSETS / "mnist"
    assert engine.paths.default_checkpoint("cifar2").parts[-2:] == ("runs", "cifar2")
