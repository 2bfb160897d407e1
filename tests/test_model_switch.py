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


def test_thumbnails_are_whole_multiples_of_the_image():
    from explorer.images import display
    from explorer.layout import cell_size

    assert (cell_size(8), cell_size(28), cell_size(32), cell_size(100)) == (64, 56, 64, 100)
    import torch

    thumb = display(torch.zeros(1, 28, 28), cell_size(28), border=4)
    assert thumb.shape == (56 + 8, 56 + 8)


def test_a_remembered_result_belongs_to_its_model():
    """The sidebar switch keeps one browser session across models: a result remembered for digits' gallery:0
    must not be shown as mnist's gallery:0 (same query key, measurement and M), nor survive a retrained
    checkpoint of the same preset; the same model and query reuse it."""
    from types import SimpleNamespace as NS

    from explorer.results_view import result_base

    def handle(preset: str, ckpt: str):
        return NS(session=NS(preset=NS(name=preset), checkpoint_hash=ckpt))

    query, settings = NS(key="gallery:0"), NS(measurement="loss", mc_samples=16)
    digits, mnist = handle("digits", "aaaa"), handle("mnist", "bbbb")
    assert result_base(digits, query, settings) != result_base(mnist, query, settings)
    assert result_base(digits, query, settings) != result_base(handle("digits", "cccc"), query, settings)
    assert result_base(digits, query, settings) == result_base(handle("digits", "aaaa"), query, settings)
    assert result_base(digits, query, settings) != result_base(digits, NS(key="gallery:1"), settings)


def test_the_app_serves_the_data_root_it_is_given(tmp_path):
    """``--data-root`` (or ATTRIBUTION_DATA_ROOT), as on the CLI: the app's session reads that folder, its
    printed commands name it, and the sidebar offers no switch (the other shipped model has other data)."""
    import numpy as np
    import pytest
    from test_data_mnist import _write_pair
    from test_mnist_pipeline import TINY_28

    from engine.config import get_preset
    from engine.model.checkpoint import CheckpointError
    from engine.model.train import train
    from explorer.runtime import get_handle, parse_args

    rng = np.random.default_rng(0)
    _write_pair(tmp_path / "idx", rng.integers(0, 256, (20, 28, 28)), np.arange(20) % 10, gz=True)
    common = ["--preset", "mnist", "--data-root", str(tmp_path / "idx"), "--cache", str(tmp_path / "c"), "--device", "cpu"]
    # the shipped weights were not trained on these 20 images: refused, not attributed to them
    with pytest.raises(CheckpointError, match="not trained on this training set"):
        get_handle(parse_args(common, env={}))
    # a model trained on them (two steps of a tiny 28x28 U-Net)
    tiny = get_preset("mnist").replace(model=TINY_28, data={"root": str(tmp_path / "idx")},
                                       train={"steps": 2, "batch_size": 8})
    train(tiny, tmp_path / "ckpt", progress=False)
    args = parse_args([*common, "--checkpoint", str(tmp_path / "ckpt")], env={})
    assert args.data_root == str(tmp_path / "idx") and model_choices(args) == []
    assert parse_args([], env={"ATTRIBUTION_DATA_ROOT": "/d"}).data_root == "/d"
    session = get_handle(args).session
    assert len(session.dataset) == 20 and session.dataset.ids[0].startswith("idx")
    assert f"--data-root {tmp_path / 'idx'}" in session.build_command()


def test_an_upload_is_prepared_again_for_the_model_switched_to():
    """QA 47 #1: an upload prepared for mnist (28x28) was kept by its bytes alone; after the sidebar switched to
    digits the page said "query image is (1, 28, 28), the model takes (1, 8, 8)", and uploading the same file
    again found the same entry.  The tab's kept upload belongs to its model."""
    from types import SimpleNamespace as NS

    from explorer.query_view import prepared_upload

    def handle(preset: str, ckpt: str, size: int):
        calls: list[str] = []

        def query_from_upload(data: bytes, name: str):
            calls.append(name)
            return NS(shape=(1, size, size), notes=[f"resized to {size}x{size}"])

        return NS(session=NS(preset=NS(name=preset), checkpoint_hash=ckpt, query_from_upload=query_from_upload)), calls

    (mnist, mnist_calls), (digits, digits_calls) = handle("mnist", "bbbb", 28), handle("digits", "aaaa", 8)
    tab: dict = {}
    assert prepared_upload(mnist, b"seven", "7.png", tab).shape == (1, 28, 28)
    assert prepared_upload(mnist, b"seven", "7.png", tab).shape == (1, 28, 28) and mnist_calls == ["7.png"]  # kept
    assert prepared_upload(digits, b"seven", "7.png", tab).shape == (1, 8, 8) and digits_calls == ["7.png"]
    assert prepared_upload(mnist, b"seven", "7.png", tab).shape == (1, 28, 28)  # back: prepared for mnist again


def test_the_evaluation_tab_says_which_other_models_files_the_sidebar_switch_opens(monkeypatch):
    """QA 50: on digits the Evaluation tab said "start the app on that model" for mnist's result files, which the
    sidebar's switch opens in one click.  The shipped mnist weights' own records are told apart, by the
    checkpoint's hash, from those of the 8,000-step weights, which no switch opens."""
    from types import SimpleNamespace

    from engine.evaluation.report import ModelKey, ResultFiles, model_files, other_models_files
    from engine.model.checkpoint import checkpoint_hash
    from engine.paths import ASSETS, default_checkpoint
    from explorer import evaluation_view, runtime

    files = ResultFiles.read(ASSETS / "results")
    digits = ModelKey(checkpoint_hash(default_checkpoint("digits")), "digits")
    mnist = ModelKey(checkpoint_hash(default_checkpoint("mnist")), "mnist")
    others = other_models_files(files, digits)
    handle = SimpleNamespace(args=runtime.parse_args(["--preset", "digits"]),
                             session=SimpleNamespace(preset=SimpleNamespace(name="digits")))
    switch = evaluation_view.sidebar_models_files(handle, files, others)
    assert switch == {"mnist": model_files(files, mnist)} and switch["mnist"]
    assert "retrain_top_mnist.json" in switch["mnist"] and "retrain_top_mnist_8000steps.json" not in switch["mnist"]
    assert "retrain_top_mnist_8000steps.json" in others  # another model's, but not the switch's

    captions: list[str] = []
    monkeypatch.setattr(evaluation_view.st, "caption", lambda text, **k: captions.append(text))
    monkeypatch.setattr(evaluation_view.plain, "details", lambda lines, **k: None)
    handle.session.checkpoint_hash = digits.checkpoint_hash
    evaluation_view.other_models_note(handle, files)
    assert captions == [
        f"Not shown: {len(others)} result file(s) measured on other models: {len(switch['mnist'])} of the MNIST "
        f"(28x28) model, which the sidebar's Model switch opens; {len(others) - len(switch['mnist'])} on weights "
        "this server does not serve (start the app on them to see those)."]
