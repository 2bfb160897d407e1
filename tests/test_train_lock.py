"""One training run per output folder: a second ``train`` into a folder another run is training is refused at once,
in one line, and touches nothing; a killed run leaves no lock behind; sequential runs (resume, finished) go on."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import folder_lock
from engine.cli import main
from engine.config import DataConfig, ModelConfig, Preset, TrainConfig
from engine.model.checkpoint import load_checkpoint, save_checkpoint
from engine.model.train import LOCK, STATE, TrainingBusyFolderError, check_not_training, train, training_lock
from engine.model.unet import build_model

REPO = Path(__file__).resolve().parent.parent
MODEL = dict(image_size=8, in_channels=1, base_channels=8, channel_mults=(1, 1), num_res_blocks=1,
             attn_resolutions=(4,), num_groups=4)  # conftest's TINY_MODEL, which the holder below builds too


def _preset() -> Preset:
    return Preset(name="tiny", model=ModelConfig(**MODEL), data=DataConfig(name="digits"),
                  train=TrainConfig(steps=4, batch_size=8, log_every=1, checkpoint_every=2))


# a real run in another process: it saves its state at step 2, then stops inside step 3 until it is killed
HOLDER = f"""
import time
import torch
from engine.config import DataConfig, ModelConfig, Preset, TrainConfig
from engine.model.data import load_digits
from engine.model.train import train

preset = Preset(name="tiny", model=ModelConfig(**{MODEL!r}), data=DataConfig(name="digits"),
                train=TrainConfig(steps=4, batch_size=8, log_every=1, checkpoint_every=2))

torch.set_num_threads(1)  # as this process (conftest): the same sums, so the same weights

def hold(step, total, loss):
    if step == 3:
        print("training", flush=True)
        time.sleep(600)

train(preset, OUT, dataset=load_digits().subset(list(range(64))), progress=hold)
"""


def _start_holder(out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.replace("OUT", repr(str(out)))], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    line = proc.stdout.readline()
    if line.strip() != "training":
        proc.kill()
        pytest.fail(f"the holder did not start: {line!r} {proc.stderr.read()}")
    return proc


def _files(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def test_a_second_run_into_a_folder_being_trained_is_refused_and_a_killed_run_resumes(
    tmp_path, digits_small, capsys, monkeypatch
):
    out = tmp_path / "run"
    holder = _start_holder(out)
    try:
        assert (out / STATE).is_file()  # the holder's step-2 state, which a second writer would overwrite
        before = _files(out)
        said = rf"{re.escape(str(out))} is being trained by another run \(pid {holder.pid}, started \d\d:\d\d UTC\); " \
               r"wait for it, or pass another --out"
        with pytest.raises(TrainingBusyFolderError, match=said):
            train(_preset(), out, dataset=digits_small, progress=False)

        import engine.model.data

        def no_data(*a, **k):
            raise AssertionError("the data were loaded before the refusal")

        monkeypatch.setattr(engine.model.data, "load_dataset", no_data)
        rc = main(["train", "--out", str(out), "--steps", "4", "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err and re.fullmatch(f"error: {said}\n", err), err
        monkeypatch.undo()
        assert _files(out) == before  # nothing written, nothing deleted
    finally:
        holder.kill()  # SIGKILL: no handler runs, only the kernel lets go of the lock
        holder.wait(30)
    assert holder.returncode == -signal.SIGKILL
    resumed_at = []
    train(_preset(), out, dataset=digits_small, progress=False, resumed=resumed_at.append)
    assert resumed_at == [2] and not (out / STATE).exists()  # went on from the killed run's state
    assert not (out / LOCK).exists()  # the killed run's lock file, taken over, is removed once the run is finished
    straight = train(_preset(), tmp_path / "straight", dataset=digits_small, progress=False)
    a, _, _ = load_checkpoint(out)
    b, _, _ = load_checkpoint(straight)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


class _Stop(Exception):
    pass


def test_sequential_runs_in_one_process_take_the_lock_in_turn(tmp_path, digits_small):
    """Interrupted, resumed, then finished: each call takes the folder's lock and lets go of it, also when it fails
    (a lock left held by this process would refuse its own resume, as an LDS or retrain job resumes its models)."""
    out = tmp_path / "run"

    def stop(step, total, loss):
        if step == 3:
            raise _Stop

    with pytest.raises(_Stop):
        train(_preset(), out, dataset=digits_small, progress=stop)
    assert (out / STATE).is_file() and (out / LOCK).is_file()
    check_not_training(out)  # let go, though the run failed
    seen = []
    train(_preset(), out, dataset=digits_small, progress=lambda s, T, l: seen.append(s))
    assert seen == [3, 4]
    assert not (out / LOCK).exists()  # a finished folder keeps no lock file
    assert train(_preset(), out, dataset=digits_small, progress=False) == out  # finished: nothing to do
    assert not (out / LOCK).exists()


def test_a_finished_folder_is_only_read(tmp_path, digits_small):
    """No lock file in a finished run's folder (the shipped weights' folder is in the repository)."""
    folder = tmp_path / "shipped"
    save_checkpoint(folder, build_model(_preset().model), _preset(), {"steps": 4, "num_train": 64})
    assert train(_preset(), folder, dataset=digits_small, progress=False) == folder
    assert not (folder / LOCK).exists()


def test_another_thread_of_this_process_is_refused(tmp_path, digits_small):
    out = tmp_path / "run"
    out.mkdir()
    with training_lock(out):
        with pytest.raises(TrainingBusyFolderError, match="by another training in this process"):
            train(_preset(), out, dataset=digits_small, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing trained


def test_without_fcntl_there_is_no_lock(tmp_path, digits_small, monkeypatch):
    """Windows has no fcntl: training goes on unlocked, as before."""
    monkeypatch.setattr(folder_lock, "fcntl", None)
    out = tmp_path / "run"
    out.mkdir()
    with training_lock(out):
        assert train(_preset(), out, dataset=digits_small, progress=False) == out
    assert not (out / LOCK).exists()


def test_an_out_folder_that_cannot_be_written_is_refused_before_the_data(tmp_path, monkeypatch):
    """QA 36 #5: ``train --out`` on a read-only disk decoded a whole image folder first, then ended in a bare
    "[Errno 30] Read-only file system"; a file on the path in "[Errno 20] Not a directory". Both are refused now,
    before the data load, in a line that names --out."""
    import engine.model.train as train_module
    from engine.model.train import TrainingSettingsError

    a_file = tmp_path / "afile"
    a_file.write_text("x")
    with pytest.raises(TrainingSettingsError, match=r"--out .*afile/run: .*afile is a file, not a folder"):
        check_not_training(a_file / "run")
    real = train_module.can_create_in
    monkeypatch.setattr(train_module, "can_create_in", lambda p: False if Path(p) == tmp_path / "ro" else real(p))
    (tmp_path / "ro").mkdir()
    with pytest.raises(TrainingSettingsError, match=r"ro is not writable \(it would be made in .*ro\); pass another"):
        check_not_training(tmp_path / "ro" / "deep" / "run")
    check_not_training(tmp_path / "fine" / "run")  # a folder that can be made: nothing said, nothing made
    assert not (tmp_path / "fine").exists()
    (tmp_path / "ro" / "done").mkdir()  # a finished run in a folder that cannot be written is only read: no refusal
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "ro" / "done" / name).write_text("{}")
    monkeypatch.setattr(train_module, "can_create_in", lambda p: False)
    check_not_training(tmp_path / "ro" / "done")
    assert sorted(p.name for p in (tmp_path / "fine").parent.iterdir()) == ["afile", "ro"]  # no probe file left


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_out_in_a_pseudo_file_system_is_refused_also_for_root(tmp_path):
    """QA 37: as root, ``train --out /proc/run`` passed the check (``os.access`` says yes to root), decoded the
    data, then ended in a bare "[Errno 2] No such file or directory: '/proc/run'". The check makes a file there."""
    from engine.model.train import TrainingSettingsError

    with pytest.raises(TrainingSettingsError,
                       match=r"^--out /proc/run: /proc is not writable \(it would be made in /proc\); pass another --out$"):
        check_not_training("/proc/run")
