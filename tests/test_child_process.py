"""Pool workers end when the process that started them is killed (engine.child_process).

Before: killing the benchmark (or an LDS/retraining run) left its spawn-pool worker computing
for half an hour, holding a build lock that made the next build wait.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PARENT = textwrap.dedent(
    """
    import multiprocessing as mp, os, sys, time
    from concurrent.futures import ProcessPoolExecutor
    from engine.child_process import init_worker

    def work(path):
        open(path, "w").write(str(os.getpid()))
        time.sleep(120)

    if __name__ == "__main__":
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=init_worker) as ex:
            ex.submit(work, sys.argv[1])
            time.sleep(120)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for init to reap it counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_worker_exits_when_its_parent_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    pid_file = tmp_path / "worker.pid"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.monotonic() < deadline, "the worker never started"
            assert parent.poll() is None, "the parent died on its own"
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        assert _alive(worker)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 15
        while _alive(worker):
            assert time.monotonic() < deadline, "the worker outlived its killed parent"
            time.sleep(0.1)
    finally:
        if parent.poll() is None:
            parent.kill()


def _ignore_sigterm_and_wait(ready_path: str) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(ready_path).write_text("ready")
    time.sleep(120)


def test_stop_pool_kills_a_worker_that_ignores_sigterm(tmp_path, monkeypatch):
    """A worker that survives SIGTERM is killed, and ``stop_pool`` returns only once every worker is gone (the old
    code joined for 10 s and returned with the worker still running)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from engine import child_process

    ready = tmp_path / "ready"
    pool = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("fork"))
    pool.submit(_ignore_sigterm_and_wait, str(ready))
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists()
    workers = list(pool._processes.values())
    monkeypatch.setattr(child_process, "TERM_GRACE_S", 0.5, raising=False)
    try:
        t0 = time.monotonic()
        child_process.stop_pool(pool)
        assert not any(p.is_alive() for p in workers)
        assert [p.exitcode for p in workers] == [-signal.SIGKILL]
        assert time.monotonic() - t0 < 30
    finally:
        for p in workers:
            p.kill()
