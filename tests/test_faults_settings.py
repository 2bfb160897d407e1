"""Fault injection: invalid settings, presets and paths give one ``error:`` line, never a traceback
or a silently wrong result (issue 14, findings 3, 6, 7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_MODEL

from engine.cli import main
from engine.config import PRESETS, DataConfig, Preset, TrainConfig, get_preset
from engine.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from engine.model.train import TrainingSettingsError, train
from engine.validation import InvalidSettingError, check_damping


def _cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, err


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# --- damping ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, 0.0, -1e-8, float("nan"), float("inf"), -float("inf"), "x", None, True])
def test_check_damping_refuses_non_positive_and_non_finite(bad):
    with pytest.raises(InvalidSettingError, match="kfac damping"):
        check_damping(bad, "kfac damping")


def test_check_damping_accepts_positive():
    assert check_damping("1e-8") == 1e-8 and check_damping(3) == 3.0


def test_check_damping_refuses_a_damping_too_large_for_float32_scores(tmp_path):
    """1e39 overflows float32 (every 1/(e + lambda) became 0, so every score was 0, exit 0): refused for the
    CLI and the session (check_damping) and for presets (check_attribution_config), the same limit."""
    from engine.attribution.damping_grid import DAMPING_GRID
    from engine.validation import MAX_DAMPING

    with pytest.raises(InvalidSettingError, match=r"kfac damping must be at most 1e\+30, got 1e\+39"):
        check_damping(1e39, "kfac damping")
    assert check_damping(MAX_DAMPING) == 1e30  # still ranks (QA)
    assert [check_damping(g) for g in DAMPING_GRID] == list(DAMPING_GRID)  # the app's grid, up to 1e3
    good = PRESETS["digits"].to_dict()
    for field in ("kfac_damping", "trak_damping"):
        path = _preset_file(tmp_path, {**good, "attribution": {**good["attribution"], field: 1e39}})
        with pytest.raises(InvalidSettingError, match=f"attribution.{field} must be at most"):
            get_preset(path)


# --- presets ----------------------------------------------------------------------------------


def _preset_file(tmp_path: Path, obj) -> str:
    path = tmp_path / f"p{len(list(tmp_path.glob('p*.json')))}.json"
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return str(path)


def test_preset_file_errors_name_the_file_and_key(tmp_path):
    good = PRESETS["digits"].to_dict()
    cases = [
        (str(tmp_path / "missing.json"), "does not exist"),
        (_preset_file(tmp_path, "[1, 2]"), "must be a JSON object"),
        (_preset_file(tmp_path, "{not json"), "not readable JSON"),
        (_preset_file(tmp_path, {**good, "modle": {}}), "modle"),
        (_preset_file(tmp_path, {**good, "attribution": {**good["attribution"], "mc_sample": 8}}), "attribution.mc_sample"),
        (_preset_file(tmp_path, {**good, "model": {**good["model"], "base_channels": "32"}}), "model.base_channels"),
        (_preset_file(tmp_path, {**good, "train": {**good["train"], "steps": 1.5}}), "train.steps"),
        (_preset_file(tmp_path, {**good, "train": {**good["train"], "lr": None}}), "train.lr"),
        (_preset_file(tmp_path, {**good, "model": {**good["model"], "channel_mults": 2}}), "model.channel_mults"),
        (_preset_file(tmp_path, {**good, "train": 5}), "'train' must be a JSON object"),
        (_preset_file(tmp_path, {**good, "attribution": {**good["attribution"], "kfac_damping": -1}}),
         "attribution.kfac_damping"),
        (_preset_file(tmp_path, {**good, "train": {**good["train"], "steps": 0}}), "train.steps"),
        # the name becomes runs/<name> and cache folders: it must stay inside them (QA11: "../../evil" was taken)
        (_preset_file(tmp_path, {**good, "name": "../../evil"}), "preset name"),
        (_preset_file(tmp_path, {**good, "name": "a/b"}), "preset name"),
        (_preset_file(tmp_path, {**good, "name": ""}), "preset name"),
        # QA 26 #6: these failed later, in the data loader or in torch, naming neither the setting nor the file
        (_preset_file(tmp_path, {**good, "data": {**good["data"], "name": "imagenet"}}), "data.name must be one of"),
        (_preset_file(tmp_path, {**good, "model": {**good["model"], "num_groups": 7}}),
         "model.num_groups must be a divisor of the model's channel widths [32]"),
        (_preset_file(tmp_path, {**good, "data": {**good["data"], "per_class": 0}}), "data.per_class"),
        # QA 31b #3: these passed every check; TRAK's build then failed naming neither the file nor the key
        (_preset_file(tmp_path, {**good, "attribution": {**good["attribution"], "trak_projection": "bogus"}}),
         "attribution.trak_projection must be srht, rademacher, gaussian or identity, got 'bogus'"),
        (_preset_file(tmp_path, {**good, "attribution": {**good["attribution"], "kfac_projection": "pca"}}),
         "attribution.kfac_projection (--kfac-projection) must be eigen or gaussian, got 'pca'"),
    ]
    for path, needle in cases:
        with pytest.raises(InvalidSettingError) as e:
            get_preset(path)
        assert needle in str(e.value) and Path(path).name in str(e.value), str(e.value)


def test_preset_round_trip_still_loads(tmp_path):
    path = _preset_file(tmp_path, PRESETS["cifar2"].to_dict())
    assert get_preset(path) == PRESETS["cifar2"]


def test_cli_bad_preset_is_one_error_line(tmp_path, capsys):
    path = _preset_file(tmp_path, {"name": "x", "modle": {}})
    rc, err = _cli(capsys, "train", "--preset", path, "--out", str(tmp_path / "run"))
    assert rc == 2 and "modle" in _one_error_line(err) and str(path) in err
    assert not (tmp_path / "run").exists()
    rc, err = _cli(capsys, "sample", "--preset", str(tmp_path / "nope.json"), "--out", str(tmp_path / "x.png"))
    assert rc == 2 and "nope.json" in _one_error_line(err)


def test_a_preset_files_bad_bank_kind_names_the_file(tmp_path, capsys):
    """Bank kinds are plugins, checked when the session opens, after the file's other checks: a misspelt
    ``kfac_bank`` was reported without the file's name (QA round 11).  A bad ``--kfac-bank`` flag is the
    flag's error, not the file's."""
    good = PRESETS["digits"].to_dict()
    path = _preset_file(tmp_path, {**good, "attribution": {**good["attribution"], "kfac_bank": "compresed"}})
    args = ("query", "--preset", path, "--query", "gallery:0", "--methods", "pixel", "--cache-root", str(tmp_path / "c"))
    rc, err = _cli(capsys, *args)
    line = _one_error_line(err)
    assert rc == 2 and line.startswith(f"error: preset file {path}: ") and "'compresed'" in line, line
    rc, err = _cli(capsys, *args, "--kfac-bank", "stored")  # the flag replaces the file's value
    assert rc == 0, err
    rc, err = _cli(capsys, "query", "--query", "gallery:0", "--methods", "pixel", "--cache-root", str(tmp_path / "c"),
                   "--kfac-bank", "nope")
    assert rc == 2 and "preset file" not in err


def test_train_refuses_a_preset_files_bad_bank_kind_before_training(tmp_path, capsys):
    """QA 26 #6: ``train`` does not use ``kfac_bank`` and accepted a typo, which ``build`` refused only after the
    training.  Every command that reads the file now refuses it, naming the file, before any work."""
    good = PRESETS["digits"].to_dict()
    path = _preset_file(tmp_path, {**good, "attribution": {**good["attribution"], "kfac_bank": "compresed"}})
    rc, err = _cli(capsys, "train", "--preset", path, "--steps", "1", "--out", str(tmp_path / "run"))
    line = _one_error_line(err)
    assert rc == 2 and line.startswith(f"error: preset file {path}: ") and "'compresed'" in line, line
    assert not (tmp_path / "run").exists()
    (tmp_path / "ok").mkdir()
    ok = _preset_file(tmp_path / "ok", {**good, "attribution": {**good["attribution"], "kfac_bank": "compressed"}})
    rc, err = _cli(capsys, "sample", "--preset", ok, "--checkpoint", str(tmp_path / "absent"), "--n", "1",
                   "--out", str(tmp_path / "x.png"))
    assert rc == 2 and "kfac_bank" not in err  # a valid kind passes the check (and fails later on the checkpoint)


# --- commands without a checkpoint --------------------------------------------------------------


def test_sample_refuses_an_out_it_cannot_create_before_sampling(tmp_path, capsys):
    """``--out file.png/x.png`` sampled first, then failed with a bare ``[Errno 17] File exists``: now refused
    before the checkpoint is even opened (the missing checkpoint below is never reached)."""
    blocker = tmp_path / "grid.png"
    blocker.write_bytes(b"not a folder")
    missing = str(tmp_path / "nonexistent")
    rc, err = _cli(capsys, "sample", "--checkpoint", missing, "--n", "2", "--out", str(blocker / "x.png"))
    assert rc == 2 and _one_error_line(err) == f"error: --out {blocker / 'x.png'}: {blocker} is a file, not a folder"
    (tmp_path / "dir.png").mkdir()
    rc, err = _cli(capsys, "sample", "--checkpoint", missing, "--out", str(tmp_path / "dir.png"))
    assert rc == 2 and "--out" in _one_error_line(err) and "is a folder" in err
    if Path("/proc/self").is_dir():  # a folder nobody can write files in, root included (os.access says yes to root)
        rc, err = _cli(capsys, "sample", "--checkpoint", missing, "--n", "2", "--out", "/proc/grid.png")
        assert rc == 2 and _one_error_line(err) == ("error: --out /proc/grid.png: no file can be written in /proc; "
                                                    "give another path")


def test_sample_and_assets_with_a_missing_checkpoint(tmp_path, capsys):
    for argv in (
        ["sample", "--checkpoint", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "x.png")],
        ["assets", "--checkpoint", str(tmp_path / "nonexistent")],
        ["query", "--checkpoint", str(tmp_path / "nonexistent"), "--query", "train:0"],
        ["build", "--checkpoint", str(tmp_path / "nonexistent"), "--methods", "pixel"],
    ):
        rc, err = _cli(capsys, *argv)
        assert rc == 2 and "nonexistent" in _one_error_line(err), (argv, err)


@pytest.mark.slow  # importing diffusers takes 5-20 s
def test_diffusers_folder_without_weights_is_a_checkpoint_error(tmp_path, capsys):
    pytest.importorskip("diffusers")
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 1}))
    with pytest.raises(CheckpointError, match="unet"):
        load_checkpoint(folder)
    rc, err = _cli(capsys, "sample", "--checkpoint", str(folder), "--out", str(tmp_path / "x.png"))
    assert rc == 2 and str(folder) in _one_error_line(err)


# --- training settings ----------------------------------------------------------------------------


def _tiny(steps: int = 2, seed: int = 0) -> Preset:
    return Preset(name="tiny", model=TINY_MODEL, data=DataConfig(name="digits"),
                  train=TrainConfig(steps=steps, batch_size=8, seed=seed, log_every=1, checkpoint_every=1000))


@pytest.mark.parametrize("steps", [-5, 0])
def test_train_refuses_bad_steps_before_creating_the_folder(tmp_path, capsys, steps):
    out = tmp_path / "run"
    rc, err = _cli(capsys, "train", "--steps", str(steps), "--out", str(out))
    assert rc == 2 and "--steps" in _one_error_line(err)
    assert not out.exists()
    with pytest.raises(InvalidSettingError):
        train(_tiny(), out, steps=steps, progress=False)
    assert not out.exists()


def test_rerun_into_a_finished_folder_with_other_settings_is_refused(tmp_path, digits_small, capsys):
    out = train(_tiny(), tmp_path / "run", dataset=digits_small, progress=False)
    weights = (out / "model.safetensors").read_bytes()
    assert train(_tiny(), out, dataset=digits_small, progress=False) == out  # same settings: nothing to do
    with pytest.raises(TrainingSettingsError, match="steps 2 there, 3 asked"):
        train(_tiny(steps=3), out, dataset=digits_small, progress=False)
    with pytest.raises(TrainingSettingsError, match="seed 0 there, 1 asked"):
        train(_tiny(seed=1), out, dataset=digits_small, progress=False)
    with pytest.raises(TrainingSettingsError, match="indices_sha"):
        train(_tiny(), out, dataset=digits_small, exclude=[0], progress=False)
    other = digits_small.subset(range(len(digits_small)))
    other.images[0] = -other.images[0]  # same name, size and settings; one image differs
    with pytest.raises(TrainingSettingsError, match="data_sha"):
        train(_tiny(), out, dataset=other, progress=False)
    assert (out / "model.safetensors").read_bytes() == weights


def test_a_run_from_before_the_data_digest_is_compared_by_its_data_folder(tmp_path, digits_small):
    """The shipped weights record no data digest: ``train --data-root DIR`` into their folder (the default
    --out) must not report them as a model trained on DIR's images (it did, exit 0)."""
    from engine.model.unet import build_model

    folder = tmp_path / "shipped"
    preset = _tiny()
    save_checkpoint(folder, build_model(preset.model), preset, {"steps": 2, "num_train": len(digits_small)})
    assert train(preset, folder, dataset=digits_small, progress=False) == folder  # same data folder and size
    user_data = preset.replace(data={"root": str(tmp_path / "idx")})
    with pytest.raises(TrainingSettingsError, match="data.root None there"):
        train(user_data, folder, dataset=digits_small, progress=False)
    with pytest.raises(TrainingSettingsError, match="num_train"):
        train(preset, folder, dataset=digits_small.subset(range(10)), progress=False)


def test_cli_rerun_with_other_seed_says_so(tmp_path, capsys):
    folder = tmp_path / "run"
    preset = PRESETS["digits"].replace(train={"steps": 7})
    from engine.model.unet import build_model

    save_checkpoint(folder, build_model(preset.model), preset, {"steps": 7})
    rc, err = _cli(capsys, "train", "--out", str(folder), "--steps", "7", "--seed", "3")
    line = _one_error_line(err)
    assert rc == 2 and "seed 0 there, 3 asked" in line and str(folder) in line


@pytest.mark.parametrize(
    "change",
    [{"mc_samples": 0}, {"trak_dim": -1}, {"kfac_damping": 0.0}, {"kfac_bank": "disk"},
     {"kfac_compression": float("nan")}, {"kfac_compression": 0.5}, {"kfac_rerank": -1},
     {"kfac_rerank_split": "uneven"}, {"kfac_bank_whiten": -1e-10}, {"kfac_bank_whiten": float("nan")},
     {"kfac_factor_dtype": "float16"}],
)
def test_session_refuses_invalid_attribution_settings(tmp_path, digits_small, change):
    import dataclasses

    from engine.attribution.session import AttributionSession
    from engine.config import AttributionConfig
    from engine.model.unet import build_model

    preset = _tiny()
    save_checkpoint(tmp_path / "ckpt", build_model(preset.model), preset)
    with pytest.raises(InvalidSettingError, match=f"attribution.{next(iter(change))}"):
        AttributionSession(preset, checkpoint=tmp_path / "ckpt", device="cpu", cache_root=tmp_path / "cache",
                           config=dataclasses.replace(AttributionConfig(), **change), dataset=digits_small)


@pytest.mark.parametrize("change", [{"in_channels": 3}, {"image_size": 16}])
def test_train_and_session_refuse_a_model_that_does_not_take_the_data(tmp_path, digits_small, change):
    """8x8 one-channel digits with a 3-channel or 16-pixel model: one line naming both shapes, before
    any folder is written (training used to fail inside a convolution, or train a 16-pixel model whose
    samples no training image could be compared with)."""
    from engine.attribution.session import AttributionSession
    from engine.model.unet import build_model

    preset = _tiny().replace(model=change)
    with pytest.raises(InvalidSettingError, match=r"training images are \(1, 8, 8\).*but the model takes"):
        train(preset, tmp_path / "run", dataset=digits_small, progress=False)
    assert not (tmp_path / "run").exists()
    save_checkpoint(tmp_path / "ckpt", build_model(preset.model), preset)
    with pytest.raises(InvalidSettingError, match="but the model takes"):
        AttributionSession(preset, checkpoint=tmp_path / "ckpt", device="cpu", cache_root=tmp_path / "cache",
                           dataset=digits_small)


def test_a_preset_file_on_a_base_changes_only_what_it_names(tmp_path):
    """QA round 21: ``{"name": "digits", "attribution": {"seed": 1}}`` got the dataclasses' defaults for every
    other setting (K-FAC factors from all M draws where digits takes 8), so it was not "digits with seed 1".
    ``"base": "digits"`` starts from the shipped preset; the file's values go over it section by section."""
    digits = PRESETS["digits"]
    p = get_preset(_preset_file(tmp_path, {"base": "digits", "attribution": {"seed": 1, "mc_samples": 8}}))
    assert p.name == "digits" and p.attribution.seed == 1 and p.attribution.mc_samples == 8
    assert p.attribution.kfac_factor_draws == digits.attribution.kfac_factor_draws  # kept, not the default
    assert (p.model, p.train, p.data, p.diffusion) == (digits.model, digits.train, digits.data, digits.diffusion)
    assert get_preset(_preset_file(tmp_path, {"base": "mnist", "name": "m2"})).name == "m2"
    with pytest.raises(InvalidSettingError, match="base 'digit' is not a shipped preset"):
        get_preset(_preset_file(tmp_path, {"base": "digit"}))
    with pytest.raises(InvalidSettingError, match="unknown key"):  # still strict about misspelt keys
        get_preset(_preset_file(tmp_path, {"base": "digits", "attribution": {"sed": 1}}))


def test_a_device_torch_cannot_use_is_one_error_line_before_any_work(tmp_path, capsys):
    """QA 27 #4: ``--device cuda`` without a GPU, or a typo, ended ``sample``, ``train`` and the benches in a
    traceback, and ``train`` left an empty output folder."""
    import torch

    rc, err = _cli(capsys, "train", "--steps", "1", "--out", str(tmp_path / "run"), "--device", "foo")
    assert rc == 2 and _one_error_line(err) == "error: --device 'foo' is not a torch device; use cpu, cuda or cuda:N"
    assert not (tmp_path / "run").exists()
    if not torch.cuda.is_available():
        rc, err = _cli(capsys, "sample", "--n", "1", "--out", str(tmp_path / "x.png"), "--device", "cuda")
        assert rc == 2 and "no CUDA GPU" in _one_error_line(err)
    rc, err = _cli(capsys, "sample", "--n", "1", "--out", str(tmp_path / "x.png"), "--device", "cpu",
                   "--checkpoint", str(tmp_path / "absent"))
    assert rc == 2 and "--device" not in _one_error_line(err)  # cpu passes (and the missing checkpoint is the error)
