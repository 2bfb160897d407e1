"""A diffusers checkpoint's data and schedule (QA round 13): the UNet's config fixes the image shape, the
pipeline's scheduler the noise schedule, the caller's preset the data; a preset file that disagrees with
the weights is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from engine.attribution.session import AttributionSession
from engine.config import AttributionConfig, get_preset
from engine.model.checkpoint import CheckpointError, diffusers_data, load_checkpoint
from engine.validation import InvalidSettingError

diffusers = pytest.importorskip("diffusers")
SCHEDULE = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.03, "num_train_timesteps": 500}


def _pipeline(folder, size: int = 8, channels: int = 1, side: dict | None = None):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )
    unet.save_pretrained(folder / "unet")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULE))
    if side is not None:
        (folder / "attribution_preset.json").write_text(json.dumps(side))
    return folder


def _digits_side(**diffusion) -> dict:
    d = get_preset("digits").to_dict()
    d["diffusion"].update(diffusion)
    return d


def test_a_preset_file_cannot_replace_the_schedulers_schedule(tmp_path):
    """It did, silently: the 500-step pipeline was attributed (and sampled) with the preset's 1,000 steps."""
    pipe = _pipeline(tmp_path / "p", side=_digits_side())
    with pytest.raises(CheckpointError, match=r"T = 1000.*pipeline's .*T = 500.*trained with"):
        load_checkpoint(pipe)
    ok = _pipeline(tmp_path / "q", side=_digits_side(num_timesteps=500, beta_start=1e-4, beta_end=0.03))
    _, preset, extra = load_checkpoint(ok)
    assert preset.diffusion.num_timesteps == 500 and extra["preset_file"].endswith("attribution_preset.json")


def test_a_preset_file_for_another_image_shape_is_refused(tmp_path):
    """A 3-channel 16x16 UNet with a digits preset file loaded, and failed later inside a convolution (sample:
    a 59-line traceback)."""
    pipe = _pipeline(tmp_path / "p", size=16, channels=3, side=_digits_side(num_timesteps=500, beta_end=0.03))
    with pytest.raises(CheckpointError, match=r"1 channels at 8x8, but the UNet's config takes 3 at 16x16"):
        load_checkpoint(pipe)


def test_without_a_preset_file_the_data_come_from_the_callers_preset(tmp_path):
    """``--preset cifar10 --checkpoint <diffusers>`` read an image folder whatever the preset said."""
    _, ckpt, extra = load_checkpoint(_pipeline(tmp_path / "p"))
    cifar = diffusers_data(ckpt, get_preset("cifar10", "/data/cifar"), extra)
    assert (cifar.name, cifar.data.name, str(cifar.data.root)) == ("diffusers-cifar10", "cifar10", "/data/cifar")
    assert cifar.diffusion.num_timesteps == 500 and cifar.model.image_size == 8  # the weights' own
    folder = diffusers_data(ckpt, get_preset("digits", "/my/images"), extra)  # digits takes no data folder
    assert folder.data.name == "folder" and str(folder.data.root) == "/my/images" and folder.data.image_size == 8
    ours = get_preset("mnist")
    assert diffusers_data(ours, get_preset("cifar10"), {}) is ours  # our checkpoints name their data
    assert diffusers_data(ours, get_preset("cifar10"), None) is ours  # ("extra": null in an old config.json)


def test_a_session_on_a_diffusers_pipeline_uses_the_presets_data(tmp_path):
    """An 8x8x1 pipeline with ``--preset digits`` (no data folder) was refused ("the folder dataset needs a
    data folder"); now it attributes to the digits, with the scheduler's 500 steps."""
    cfg = AttributionConfig(mc_samples=2, trak_dim=16)
    s = AttributionSession("digits", checkpoint=_pipeline(tmp_path / "p"), device="cpu",
                           cache_root=tmp_path / "cache", config=cfg)
    assert len(s.dataset) == 1797 and s.diffusion.T == 500
    res = s.query(s.parse_query("train:3"), methods=["pixel"])
    assert res.methods["pixel"].status == "ok" and int(res.methods["pixel"].scores.argmax()) == 3
    with pytest.raises(InvalidSettingError, match=r"training images are \(1, 8, 8\).*model takes \(3, 16, 16\)"):
        AttributionSession("digits", checkpoint=_pipeline(tmp_path / "rgb", size=16, channels=3), device="cpu",
                           cache_root=tmp_path / "cache", config=cfg)


def test_a_named_checkpoint_folder_is_not_told_to_train(tmp_path):
    """The hint "Train one with `attribution-engine train ... --checkpoint X`" followed every error, though the
    user had passed --checkpoint (and training into a diffusers pipeline is not the fix)."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as info:
        AttributionSession("digits", checkpoint=tmp_path / "empty", device="cpu", cache_root=tmp_path / "c")
    assert "Train one" not in str(info.value) and "diffusers UNet2DModel" in str(info.value)


def test_assets_and_sample_read_a_diffusers_folder_as_query_does(tmp_path, capsys):
    """``assets`` loaded the checkpoint's own preset (an image folder) whatever --preset said, so an 8x8
    pipeline with --preset digits was refused ("the folder dataset needs a data folder") where ``query``
    worked; a UNet that does not take the data's shape is refused in one line."""
    from engine.cli.parser import main

    rgb = _pipeline(tmp_path / "rgb", size=16, channels=3)
    assert main(["assets", "--checkpoint", str(rgb), "--preset", "digits", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: training images are (1, 8, 8)") and err.count("\n") == 1, err
    out = tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", str(_pipeline(tmp_path / "p")), "--preset", "digits", "--n", "2",
                 "--seed", "0", "--out", str(out), "--device", "cpu"]) == 0
    import numpy as np

    with np.load(out) as f:
        assert f["images"].shape[0] == 2 and f["images"].shape[-2:] == (8, 8)


def test_a_preset_file_beside_the_weights_takes_the_base_form_and_a_folder_beside_it(tmp_path):
    """The ``{"base": ...}`` form ``--preset FILE.json`` takes was refused here as an unknown key (QA 26 #3);
    a relative data folder is read from the checkpoint's folder, which the file travels with."""
    side = {"base": "digits", "diffusion": {"num_timesteps": 500, "beta_start": 1e-4, "beta_end": 0.03},
            "data": {"name": "folder", "root": "images"}}
    _, preset, extra = load_checkpoint(_pipeline(tmp_path / "p", side=side))
    assert preset.diffusion.num_timesteps == 500 and preset.attribution == get_preset("digits").attribution
    assert preset.data.name == "folder" and preset.data.root == str(tmp_path / "p" / "images")
    bad = _pipeline(tmp_path / "q", side={"base": "digits", "colour": "red"})
    with pytest.raises(CheckpointError, match=r"attribution_preset\.json.*colour") as e:
        load_checkpoint(bad)
    assert "\n" not in str(e.value)


def test_a_folder_without_weights_is_one_line_naming_what_is_missing(tmp_path, capsys):
    """QA 26 #6: diffusers printed its own "Defaulting to unsafe serialization ... allow_pickle" line and then an
    error naming ``diffusion_pytorch_model.bin``, a file the user never had."""
    from engine.cli import main

    folder = _pipeline(tmp_path / "pipe")
    for f in (folder / "unet").glob("diffusion_pytorch_model*"):
        f.unlink()
    with pytest.raises(CheckpointError, match=r"no weights in .*unet: config\.json is there but not "
                                              r"diffusion_pytorch_model\.safetensors"):
        load_checkpoint(folder, "cpu")
    capsys.readouterr()
    rc = main(["sample", "--checkpoint", str(folder), "--n", "1", "--out", str(tmp_path / "s.png")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "allow_pickle" not in err, err


def test_the_attribution_settings_of_a_preset_file_beside_the_weights_apply_without_preset(tmp_path):
    """QA 33: README says an attribution_preset.json beside diffusers weights sets the data and the attribution
    settings; its attribution section was ignored (digits' M = 64 instead of its M = 2) unless --preset named it."""
    from engine.model.checkpoint import attribution_source, recorded_preset

    side = {"base": "digits", "name": "pets", "attribution": {"mc_samples": 2},
            "diffusion": {"num_timesteps": 500, "beta_start": 1e-4, "beta_end": 0.03}}
    pipe = _pipeline(tmp_path / "p", side=side)
    digits = get_preset("digits")
    assert recorded_preset(pipe).attribution.mc_samples == 2
    source, note = attribution_source(pipe, digits, named=False)
    assert source.attribution.mc_samples == 2 and note is None
    source, note = attribution_source(pipe, digits, named=True)  # the user's --preset still decides, and is told
    assert source.attribution.mc_samples == 64 and "attribution_preset.json names preset 'pets'" in note
    assert "trained as" not in note  # diffusers weights record no training preset (QA 34 #9)
    bare = _pipeline(tmp_path / "q")  # no preset file: nothing recorded, the caller's settings
    assert recorded_preset(bare) is None and attribution_source(bare, digits, named=False) == (digits, None)
    assert attribution_source(tmp_path / "nothing", digits, named=False) == (digits, None)


def test_a_pipeline_whose_scheduler_config_is_missing_says_which_schedule_it_uses(tmp_path):
    """QA 54 F7: a pipeline folder whose ``model_index.json`` names a scheduler but whose
    ``scheduler/scheduler_config.json`` is missing was attributed with the default linear 1e-4..0.02 schedule
    without a word; a warning line (the CLI's ``warning:``, the page's load warnings) now says so.  A complete
    pipeline, or a bare UNet folder, says nothing."""
    import warnings

    pipe = _pipeline(tmp_path / "p")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline",
                                                       "scheduler": ["diffusers", "DDPMScheduler"],
                                                       "unet": ["diffusers", "UNet2DModel"]}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_checkpoint(pipe)[1].diffusion.num_timesteps == 500
        load_checkpoint(pipe / "unet")
    (pipe / "scheduler" / "scheduler_config.json").unlink()
    with pytest.warns(UserWarning, match=r"p names a scheduler but .*scheduler_config\.json is missing: the noise "
                                         r"schedule is the default linear one, T = 1000, betas 0\.0001\.\.0\.02"):
        assert load_checkpoint(pipe)[1].diffusion.num_timesteps == 1000
    from engine import warning_lines

    with warning_lines.collected() as said:  # as the app's page collects a load's warnings: one line
        load_checkpoint(pipe)
    assert len(said) == 1 and "scheduler_config.json is missing" in said[0] and "\n" not in said[0], said
    (pipe / "scheduler").rmdir()  # the index alone still names it
    with pytest.warns(UserWarning, match=r"scheduler_config\.json is missing"):
        load_checkpoint(pipe)
    side = _pipeline(tmp_path / "q", side=_digits_side())
    (side / "scheduler" / "scheduler_config.json").unlink()
    with pytest.warns(UserWarning, match=r"the noise schedule is the one attribution_preset\.json sets, T = 1000"):
        load_checkpoint(side)
