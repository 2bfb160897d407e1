"""A killed ``bench`` leaves its fresh temporary cache behind (kill -9 skips the clean-up); the next bench
removes it, and never a live bench's (QA 25 #4)."""

from __future__ import annotations

import os
import subprocess
import sys

from engine.bench.attribution import sweep_dead_bench_caches


def test_the_next_bench_removes_a_killed_benchs_cache_and_keeps_a_live_ones(tmp_path, capsys):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # a process that has exited
    dead = tmp_path / f"bench-cache-{dead_pid}-abc123"
    (dead / "digits").mkdir(parents=True)
    (dead / "digits" / "bank.npy").write_bytes(b"\0" * 1000)
    live = tmp_path / f"bench-cache-{os.getppid()}-def456"  # pytest's parent: alive
    mine = tmp_path / f"bench-cache-{os.getpid()}-ghi789"
    legacy = tmp_path / "bench-cache-jkl012"  # named before the pid was part of the name: whose, nobody knows
    other = tmp_path / f"kronfluence-{dead_pid}-x"
    for folder in (live, mine, legacy, other):
        folder.mkdir()
    assert sweep_dead_bench_caches(tmp_path) == [dead]
    assert not dead.exists() and live.is_dir() and mine.is_dir() and legacy.is_dir() and other.is_dir()
    assert f"removed {dead}, the temporary cache of a bench that was killed" in capsys.readouterr().err
