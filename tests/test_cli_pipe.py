"""A command piped into ``head`` (or any reader that stops early) ends quietly, as shell tools do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_closed_pipe_ends_the_command_quietly():
    """It printed "error: [Errno 32] Broken pipe" and exit status 2, as if the input had been wrong."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command writes anything: every write meets a closed pipe
    try:
        done = subprocess.run(
            [sys.executable, "-m", "engine", "query", "--query", "gallery:0", "--methods", "pixel"],
            cwd=ROOT, stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
        )
    finally:
        os.close(write)
    assert done.returncode == 141, done.stderr  # 128 + SIGPIPE
    assert "Broken pipe" not in done.stderr and "error" not in done.stderr, done.stderr
