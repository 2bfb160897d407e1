"""Training: the loss goes down, runs resume exactly, subsets and removals train on the right images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.model.checkpoint import load_checkpoint
from engine.model.diffusion import Diffusion, make_draws
from engine.model.measurements import diffusion_loss
from engine.model.train import LOG, STATE, lr_at, select_indices, train
from engine.model.unet import build_model


def test_lr_schedule():
    assert lr_at(0, 100, 1.0, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 0.1) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 0.1) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 0.1) == pytest.approx(0.5)
    assert lr_at(99, 100, 1.0, 0.1) < 0.001


def test_select_indices():
    assert select_indices(5).tolist() == [0, 1, 2, 3, 4]
    assert select_indices(5, indices=[3, 1, 3]).tolist() == [1, 3]
    assert select_indices(5, exclude=[0, 4]).tolist() == [1, 2, 3]
    assert select_indices(5, indices=[1, 2, 3], exclude=np.array([2])).tolist() == [1, 3]
    with pytest.raises(ValueError, match="no training examples"):
        select_indices(3, exclude=[0, 1, 2])
    with pytest.raises(ValueError, match="out of range"):
        select_indices(3, indices=[5])


def test_loss_decreases(tmp_path, tiny_preset, digits_small):
    preset = tiny_preset.replace(train={"steps": 50, "ema_decay": None})
    losses = []
    folder = train(preset, tmp_path / "run", dataset=digits_small, progress=lambda s, T, l: losses.append(l))
    assert len(losses) == 50
    trained, _, extra = load_checkpoint(folder)
    assert extra["steps"] == 50 and extra["num_train"] == 64
    torch.manual_seed(preset.train.seed)
    init = build_model(preset.model).eval()  # the same initial weights train() starts from
    diff = Diffusion(preset.diffusion)
    draws = make_draws(32, (1, 8, 8), diff.T, seed=11)
    x = digits_small.images[:16]
    with torch.no_grad():
        before = float(diffusion_loss(init, diff, x, draws))
        after = float(diffusion_loss(trained, diff, x, draws))
    assert after < 0.8 * before, (before, after)
    log = json.loads((folder / LOG).read_text())
    assert [r["step"] for r in log] == [10, 20, 30, 40, 50]


class _Stop(Exception):
    pass


def _interrupted_then_resumed(preset, folder: Path, dataset, stop_at: int) -> list[int]:
    """Train into ``folder``, stopped at step ``stop_at`` (an exception from the progress callback, as a
    kill would), then rerun; the steps the rerun trained."""

    def stop(step, total, loss):
        if step == stop_at:
            raise _Stop

    with pytest.raises(_Stop):
        train(preset, folder, dataset=dataset, progress=stop)
    assert not (folder / "model.safetensors").exists()
    seen: list[int] = []
    train(preset, folder, dataset=dataset, progress=lambda s, T, l: seen.append(s))
    return seen


def _assert_same_weights(a_folder: Path, b_folder: Path) -> None:
    a, _, _ = load_checkpoint(a_folder)
    b, _, _ = load_checkpoint(b_folder)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), k


def test_resume_equals_uninterrupted(tmp_path, tiny_preset, digits_small):
    # dropout and flips on, so every random stream (global RNG, data generator) must be restored
    preset = tiny_preset.replace(
        model={"dropout": 0.1},
        data={"flip": True},
        train={"steps": 30, "checkpoint_every": 10, "ema_decay": 0.9, "batch_size": 16},
    )
    full = train(preset, tmp_path / "full", dataset=digits_small, progress=False)
    seen = _interrupted_then_resumed(preset, tmp_path / "resumed", digits_small, stop_at=25)
    assert seen[0] == 21  # continued after the step-20 checkpoint
    assert not (tmp_path / "resumed" / STATE).exists()
    _assert_same_weights(full, tmp_path / "resumed")
    # the log goes on as one run: the smoothed loss and the elapsed time are part of the resumable state
    # (after a resume the loss curve restarted from the next batch's loss and the clock from zero)
    log_a = json.loads((full / "train_log.json").read_text())
    log_b = json.loads((tmp_path / "resumed" / "train_log.json").read_text())
    assert [(r["step"], r["loss"]) for r in log_a] == [(r["step"], r["loss"]) for r in log_b]
    elapsed = [r["elapsed_s"] for r in log_b]
    assert elapsed == sorted(elapsed)
    # a finished folder is skipped, not retrained
    mtime = (full / "model.safetensors").stat().st_mtime_ns
    train(preset, full, dataset=digits_small, progress=lambda *a: pytest.fail("retrained a finished run"))
    assert (full / "model.safetensors").stat().st_mtime_ns == mtime


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_a_run_shorter_than_checkpoint_every_resumes_from_its_timed_checkpoint(tmp_path, tiny_preset, digits_small):
    """QA: `train --steps` below checkpoint_every saved nothing, so a kill restarted it from step 0; the
    state is now also saved once checkpoint_seconds have passed (here: at every step), and the resumed
    weights equal an uninterrupted run's.  With checkpoint_seconds 0 (off) nothing is saved, as before."""
    preset = tiny_preset.replace(train={"steps": 8, "checkpoint_every": 1000, "batch_size": 16,
                                        "checkpoint_seconds": 1e-9})
    full = train(preset, tmp_path / "full", dataset=digits_small, progress=False)
    seen = _interrupted_then_resumed(preset, tmp_path / "resumed", digits_small, stop_at=6)
    assert seen[0] == 6  # continued after the step-5 save (the callback runs before each step's save)
    _assert_same_weights(full, tmp_path / "resumed")
    off = preset.replace(train={"checkpoint_seconds": 0.0})
    assert _interrupted_then_resumed(off, tmp_path / "off", digits_small, stop_at=6)[0] == 1  # nothing was saved


@pytest.mark.parametrize("device", [*DEVICES, "cpu:0"])  # "cpu:0": a device named apart from "cpu"
def test_a_resumed_run_keeps_adamw_step_counts_on_the_cpu(tmp_path, tiny_preset, digits_small, device, monkeypatch):
    """The resume state was loaded with map_location=device: on a GPU AdamW's "step" counts (which
    load_state_dict leaves where they are loaded) came back as CUDA tensors, and each step then read every
    one with .item(), a device sync per parameter; an uninterrupted run keeps them on the CPU.  The step
    counts' device tells only on a GPU; the recorded map_location tells with any device not named "cpu"."""
    import engine.model.train as train_module

    made = []

    class Recording(torch.optim.AdamW):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(train_module.torch.optim, "AdamW", Recording)
    preset = tiny_preset.replace(train={"steps": 4, "checkpoint_every": 2, "batch_size": 16})

    def stop_at_3(step, total, loss):
        if step == 3:
            raise _Stop

    with pytest.raises(_Stop):
        train(preset, tmp_path / "run", dataset=digits_small, device=device, progress=stop_at_3)
    steps = []

    def record_steps(step, total, loss):
        steps.extend(st["step"].device.type for st in made[-1].state.values())

    loads = []
    original = train_module.load_plain_state

    def recording_load(*a, **kw):
        loads.append(kw.get("map_location"))
        return original(*a, **kw)

    monkeypatch.setattr(train_module, "load_plain_state", recording_load)
    train(preset, tmp_path / "run", dataset=digits_small, device=device, progress=record_steps)
    assert len(made) == 2 and steps and set(steps) == {"cpu"}
    # the resume state is read onto the CPU, not onto the device (the old line fails here with "cpu:0")
    assert loads == ["cpu"]


@pytest.mark.parametrize("mode", ["indices", "exclude"])
def test_subset_and_exclude_use_only_selected_images(tmp_path, tiny_preset, digits_small, mode):
    """Images outside the selection are NaN: touching any of them would make the weights NaN."""
    keep = [3, 7, 20, 41]
    images = torch.full_like(digits_small.images, float("nan"))
    images[keep] = digits_small.images[keep]
    ds = type(digits_small)(**{**digits_small.__dict__, "images": images})
    preset = tiny_preset.replace(train={"steps": 4, "batch_size": 3})
    kw = {"indices": keep} if mode == "indices" else {"exclude": sorted(set(range(64)) - set(keep))}
    folder = train(preset, tmp_path / mode, dataset=ds, progress=False, **kw)
    model, _, extra = load_checkpoint(folder)
    assert extra["num_train"] == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # and the control: training on everything does touch the NaN images
    bad = train(preset, tmp_path / "all", dataset=ds, progress=False)
    model, _, _ = load_checkpoint(bad)
    assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_a_kill_between_the_checkpoint_files_leaves_a_run_that_trains_again(tmp_path, tiny_preset, digits_small,
                                                                            monkeypatch):
    """A short run saves no resumable state, so its folder counts as finished once its weights exist:
    the config is written first and the weights last, and weights without a config do not count
    (QA: a kill between the two writes left weights only, and every rerun failed on the missing config)."""
    import engine.model.checkpoint as ckpt_mod
    from engine.model.train import is_finished

    preset = tiny_preset.replace(train={"steps": 3, "checkpoint_every": 1000})
    written, real = [], ckpt_mod.atomic_write_bytes

    def killed_after_first(path, data):
        written.append(Path(path).name)
        real(path, data)
        raise _Stop  # the process dies right after its first checkpoint file

    monkeypatch.setattr(ckpt_mod, "atomic_write_bytes", killed_after_first)
    with pytest.raises(_Stop):
        train(preset, tmp_path / "run", dataset=digits_small, progress=False)
    monkeypatch.undo()
    assert written == ["config.json"] and not is_finished(tmp_path / "run")
    train(preset, tmp_path / "run", dataset=digits_small, progress=False)  # trains again and finishes
    assert is_finished(tmp_path / "run")
    (tmp_path / "run" / "config.json").unlink()  # the state the old order could leave: weights only
    assert not is_finished(tmp_path / "run")
    train(preset, tmp_path / "run", dataset=digits_small, progress=False)
    assert load_checkpoint(tmp_path / "run")[2]["steps"] == 3


@pytest.mark.parametrize("where", ["between", "drawn"])
def test_an_interruption_saves_the_state_and_the_rerun_equals_an_uninterrupted_run(
        tmp_path, tiny_preset, digits_small, monkeypatch, where):
    """QA 33: a Ctrl-C before the first timed checkpoint (one cifar2 step on a CPU takes a minute, the first save
    comes at 120 s) lost every step, while the command said to rerun it to resume. An interruption (not an error)
    now saves the state: between two steps as it is, inside a step whose draws were made but whose weights were
    not yet changed with the draws the step started from. Either way the rerun trains to the same weights."""
    from engine.model.diffusion import Diffusion

    preset = tiny_preset.replace(
        model={"dropout": 0.1}, data={"flip": True},
        train={"steps": 12, "checkpoint_every": 1000, "checkpoint_seconds": 0.0, "ema_decay": 0.9, "batch_size": 16},
    )
    full = train(preset, tmp_path / "full", dataset=digits_small, progress=False)
    folder = tmp_path / "run"
    if where == "between":
        def stop(step, total, loss):
            if step == 7:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            train(preset, folder, dataset=digits_small, progress=stop)
        expected_next = 8
    else:
        calls = [0]
        original = Diffusion.per_sample_loss

        def loss_then_interrupt(self, *a, **k):
            calls[0] += 1
            if calls[0] == 8:  # inside step 8, after its batch, timesteps and noise were drawn
                raise KeyboardInterrupt
            return original(self, *a, **k)

        monkeypatch.setattr(Diffusion, "per_sample_loss", loss_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            train(preset, folder, dataset=digits_small, progress=False)
        monkeypatch.setattr(Diffusion, "per_sample_loss", original)
        expected_next = 8
    assert (folder / STATE).is_file() and not (folder / "model.safetensors").exists()
    seen: list[int] = []
    train(preset, folder, dataset=digits_small, progress=lambda s, T, l: seen.append(s))
    assert seen[0] == expected_next  # no step lost, none trained twice
    _assert_same_weights(full, folder)


def test_an_error_saves_nothing_and_an_interruption_before_the_first_step_has_nothing_to_save(
        tmp_path, tiny_preset, digits_small):
    preset = tiny_preset.replace(train={"steps": 6, "checkpoint_every": 1000, "checkpoint_seconds": 0.0,
                                        "batch_size": 16})

    def fail(step, total, loss):
        if step == 3:
            raise _Stop  # an error, as the tests' simulated kills: the state of a failing run is not saved

    with pytest.raises(_Stop):
        train(preset, tmp_path / "a", dataset=digits_small, progress=fail)
    assert not (tmp_path / "a" / STATE).exists()
    from engine.model.diffusion import Diffusion

    def interrupt(self, *a, **k):
        raise KeyboardInterrupt  # inside the first step: no step finished, so no state to write

    original, Diffusion.per_sample_loss = Diffusion.per_sample_loss, interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            train(preset, tmp_path / "b", dataset=digits_small, progress=False)
    finally:
        Diffusion.per_sample_loss = original
    assert not (tmp_path / "b" / STATE).exists()


def test_a_run_of_days_is_said_after_its_first_step(tmp_path, tiny_preset, digits_small, monkeypatch):
    """QA 33: `train --preset cifar2` on a CPU (72 s per step, 32,000 steps) said nothing until its bar's ETA read
    636 h. After the first step a run projected past 12 h gets a warning with what shortens it."""
    from engine.model import train as train_module
    from engine.model.train import long_run_note

    note = long_run_note(72.0, 31_999, "cpu")
    assert note.startswith("at 72.0 s per step on cpu, the 31,999 steps left take about 27 d")
    assert "--steps" in note and "model.base_channels" in note
    assert long_run_note(0.1, 30_000, "cpu") is None  # 50 min: no warning
    preset = tiny_preset.replace(train={"steps": 3, "checkpoint_every": 1000, "batch_size": 16})
    monkeypatch.setattr(train_module, "LONG_RUN_S", 0.0)  # every run is "long": the warning comes once
    with pytest.warns(UserWarning, match=r"the 2 steps left take about") as caught:
        train(preset, tmp_path / "r", dataset=digits_small, progress=False)
    assert sum("steps left take about" in str(w.message) for w in caught) == 1
