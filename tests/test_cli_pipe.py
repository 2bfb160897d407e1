"""A command piped into ``head`` (or any reader that stops early) ends quietly, as shell tools do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_closed_pipe_ends_the_command_quietly():
    """It printed "error: [Errno 32] Broken pipe" and exit status 2, as if the input had been wrong."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered, as in a shell
    for unbuffered in ({}, {"PYTHONUNBUFFERED": "1"}):
        read, write = os.pipe()
        os.close(read)  # the reader is gone before the command writes anything: every write meets a closed pipe
        try:
            done = subprocess.run(
                [sys.executable, "-m", "engine", "query", "--query", "gallery:0", "--methods", "pixel"],
                cwd=ROOT, stdout=write, stderr=subprocess.PIPE, text=True, timeout=120, env={**env, **unbuffered},
            )
        finally:
            os.close(write)
        assert done.returncode == 141, (unbuffered, done.stderr)  # 128 + SIGPIPE
        assert "Broken pipe" not in done.stderr and "rror" not in done.stderr, (unbuffered, done.stderr)


def test_a_broken_pipe_with_stdout_not_a_file_is_still_quiet(monkeypatch, capsys):
    """A stdout without a file descriptor (redirected to a StringIO, as in a notebook) must not turn the
    quiet exit into a traceback from the handler."""
    import argparse
    import contextlib
    import io

    from engine.cli.common import run_handler

    def handler(args):
        raise BrokenPipeError(32, "Broken pipe")

    with contextlib.redirect_stdout(io.StringIO()):
        assert run_handler(argparse.Namespace(func=handler)) == 141
