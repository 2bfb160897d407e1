"""One lock for every run folder: the lds / retrain-top / group-retrain run lock (``evaluation.setup.train_lock``) is
the flock ``train`` takes on its --out (``folder_lock``), not a pid file: a killed run's pid that comes back as
another process's refuses nothing, the kernel lets go at ``kill -9``, and the holder is named."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine import folder_lock
from engine.evaluation.setup import TrainingBusyError, train_lock
from engine.model.train import LOCK, TrainingBusyFolderError, check_not_training, training_lock

REPO = Path(__file__).resolve().parent.parent

HOLD = """
import sys, time
from engine import folder_lock
with folder_lock.exclusive(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _hold_in_another_process(path: Path) -> subprocess.Popen:
    """A process that holds ``path``'s flock until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_an_old_pid_file_refuses_nothing(tmp_path):
    """The old lock, ``.train.lock`` holding a pid, left by a killed run whose pid now is another live process's
    (here: our parent), refused the folder; it means nothing now."""
    (tmp_path / ".train.lock").write_text(str(os.getppid()))
    with train_lock(tmp_path):
        holder = folder_lock.read_holder(tmp_path / LOCK)
        assert holder is not None and holder.is_this_process()


def test_a_run_folder_held_by_another_process_is_refused_naming_it_and_free_after_kill_9(tmp_path):
    holder = _hold_in_another_process(tmp_path / folder_lock.RUN_LOCK)
    try:
        said = (rf"process {holder.pid} \(started [\d: -]+UTC\) is training into {re.escape(str(tmp_path))}; "
                r"evaluate the finished models with --no-train, or wait for it")
        with pytest.raises(TrainingBusyError, match=f"^{said}$"), train_lock(tmp_path):
            pytest.fail("the block ran while another process held the folder")
    finally:
        holder.kill()  # SIGKILL: only the kernel lets go of the flock
        holder.wait(30)
    assert holder.returncode == -signal.SIGKILL
    with train_lock(tmp_path):  # a rerun goes on
        pass


def test_training_and_an_evaluation_run_take_the_same_lock(tmp_path, digits_small, tiny_preset):
    """One lock for one folder: ``train`` into a folder an lds run trains into is refused, and the other way round;
    within one process (an app's jobs) the message says so."""
    from engine.model.train import train

    with train_lock(tmp_path), pytest.raises(TrainingBusyFolderError, match="another training in this process"):
        train(tiny_preset, tmp_path, dataset=digits_small, progress=False)
    with training_lock(tmp_path), pytest.raises(TrainingBusyError, match="^another job of this process is training"):
        with train_lock(tmp_path):
            pass
    with train_lock(tmp_path), pytest.raises(TrainingBusyFolderError):
        check_not_training(tmp_path)  # the CLI's probe before the data sees an lds run's lock too


def test_a_held_from_inside_the_block_is_not_taken_for_the_run_folders(tmp_path):
    """Only the take's refusal becomes "is training into": a lock of another folder refused inside the block is
    that folder's, and goes up as it is."""
    inner = tmp_path / "inner.lock"
    with folder_lock.exclusive(inner):
        with pytest.raises(folder_lock.Held), train_lock(tmp_path):
            with folder_lock.exclusive(inner):
                pass


def test_a_take_that_opened_a_file_its_holder_then_removed_locks_the_file_there_now(tmp_path, monkeypatch):
    """A holder may remove its lock file while it holds it (a finished training folder; a folder the CLI made only
    for its lock). A take that opened the file just before would hold a flock nobody else sees; it takes the new
    file at the path instead."""
    path = tmp_path / folder_lock.RUN_LOCK
    real = folder_lock.fcntl
    removed = []

    class RemovedBeforeTheFlock:
        LOCK_EX, LOCK_SH, LOCK_NB = real.LOCK_EX, real.LOCK_SH, real.LOCK_NB

        @staticmethod
        def flock(fd: int, op: int) -> None:
            if not removed:  # the first take's file goes between its open and its flock
                removed.append(True)
                path.unlink()
            real.flock(fd, op)

    monkeypatch.setattr(folder_lock, "fcntl", RemovedBeforeTheFlock)
    with folder_lock.exclusive(path):
        assert removed and path.is_file()
        monkeypatch.setattr(folder_lock, "fcntl", real)
        with pytest.raises(folder_lock.Held):  # another take sees this one's lock on the file at the path
            folder_lock.check_free(path)
