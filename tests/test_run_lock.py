"""A lock file removed by its holder while held is not a place a second take can hide in (``engine.folder_lock``)."""

from __future__ import annotations

import pytest

from engine import folder_lock


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
