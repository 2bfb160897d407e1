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


# two `train` CLI runs: the data load says so and takes 3 s; both wait for one start time (argv[2]) first
TWO_AT_ONCE = """
import sys, time
import engine.model.data as data
import engine.model.train  # imported before the start, as the CLI's handler imports it
from engine.cli import main

real = data.load_dataset

def slow(cfg):
    print("loading data", flush=True)
    time.sleep(3)
    return real(cfg)

data.load_dataset = slow
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
sys.exit(main(["train", "--preset", sys.argv[1], "--out", sys.argv[3], "--device", "cpu"]))
"""


def test_two_cli_runs_started_together_one_trains_and_the_other_is_refused_before_its_data(tmp_path):
    """Each of two runs started at the same moment passed the probe before its data load, loaded the data, and only
    then was one refused, by the lock ``train`` takes after it: the CLI holds the lock from before the data load."""
    import time

    (tmp_path / "tiny.json").write_text(_preset().to_json())
    out = tmp_path / "new" / "run"
    start = time.time() + 6  # both have imported torch by then
    env = dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    procs = [subprocess.Popen([sys.executable, "-c", TWO_AT_ONCE, str(tmp_path / "tiny.json"), str(start), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
             for _ in range(2)]
    ends = [(p.pid, *p.communicate(timeout=300), p.returncode) for p in procs]
    (w_pid, w_out, w_err, w_rc), (_, l_out, l_err, l_rc) = sorted(ends, key=lambda e: e[3])
    assert (w_rc, l_rc) == (0, 2), ends
    assert "loading data" in w_out and f"checkpoint: {out}" in w_out
    assert "loading data" not in l_out, l_out  # refused before its data load
    said = rf"error: {re.escape(str(out))} is being trained by another run( \(pid {w_pid}, started [^)]*\))?; " \
           r"wait for it, or pass another --out\n"
    assert re.fullmatch(said, l_err), l_err
    assert not (out / LOCK).exists() and not (out / STATE).exists()  # a finished folder keeps no lock file


def test_the_cli_leaves_no_folder_it_made_for_the_lock_when_the_data_do_not_load(tmp_path, monkeypatch, capsys):
    import engine.model.data

    locked = []

    def broken(cfg):
        locked.extend(p.parent.name for p in tmp_path.rglob(LOCK))  # the lock is held during the data load
        raise ValueError("the data do not load")

    (tmp_path / "tiny.json").write_text(_preset().to_json())
    monkeypatch.setattr(engine.model.data, "load_dataset", broken)
    argv = ["train", "--preset", str(tmp_path / "tiny.json"), "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "a" / "b")]) == 2
    assert capsys.readouterr().err == "error: the data do not load\n" and locked == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.json"]
    (tmp_path / "kept").mkdir()  # a folder that was there before stays, without the lock file
    assert main([*argv, "--out", str(tmp_path / "kept" / "run")]) == 2
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == []


def test_the_cli_reads_a_finished_folder_without_a_lock(tmp_path, capsys):
    """A finished run's folder is only read (the shipped weights may lie on a read-only install): no lock file."""
    from engine.model.data import load_digits

    folder = tmp_path / "done"
    save_checkpoint(folder, build_model(_preset().model), _preset(), {"steps": 4, "num_train": len(load_digits())})
    before = _files(folder)
    (tmp_path / "tiny.json").write_text(_preset().to_json())
    assert main(["train", "--preset", str(tmp_path / "tiny.json"), "--out", str(folder), "--device", "cpu"]) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert _files(folder) == before


def test_train_runs_under_a_lock_its_caller_holds_and_no_other(tmp_path, digits_small):
    """``train(held=...)`` does not take the lock a second time (a flock refuses its own process too); a token of
    another folder, or of a lock let go, is a bug and says so."""
    from engine.model.train import training_folder

    with training_folder(tmp_path / "other") as other:
        with pytest.raises(RuntimeError, match="was given the lock of"):
            train(_preset(), tmp_path / "run", dataset=digits_small, progress=False, held=other)
    with pytest.raises(RuntimeError, match=r"\(let go\)"):
        train(_preset(), tmp_path / "other", dataset=digits_small, progress=False, held=other)
    with training_folder(tmp_path / "run") as held:
        assert train(_preset(), tmp_path / "run", dataset=digits_small, progress=False, held=held) == tmp_path / "run"
    assert not (tmp_path / "run" / LOCK).exists()  # finished: no lock file
