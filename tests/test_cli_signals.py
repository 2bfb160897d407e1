"""How a command ends on a signal or an error, as a script or a job scheduler sees it (QA round 20)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.cli.parser import main

REPO = Path(__file__).resolve().parents[1]


def test_attribution_debug_shows_the_traceback_of_an_error_a_handler_caught_itself(monkeypatch, capsys):
    """The README promises the traceback with ATTRIBUTION_DEBUG; handlers that catch their own errors printed
    only the one line even then."""
    monkeypatch.delenv("ATTRIBUTION_DEBUG", raising=False)
    assert main(["reverse", "--train", "3", "--top-k", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("error: --top-k must be at least 1") and "Traceback" not in err
    monkeypatch.setenv("ATTRIBUTION_DEBUG", "1")
    assert main(["reverse", "--train", "3", "--top-k", "0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().endswith("error: --top-k must be at least 1")


@pytest.mark.slow
def test_sigterm_ends_a_command_with_one_line_and_exit_143(tmp_path):
    """SIGTERM (timeout, SLURM, docker stop) ended a command silently with 143 and its progress bar mid-line;
    now it says so on a line of its own, as Ctrl-C does, and writes no partial output file."""
    out = tmp_path / "s.npz"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "engine", "sample", "--preset", "digits", "--n", "256",
                             "--seed", "0", "--out", str(out)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    err = ""
    while time.time() < deadline:  # wait until sampling has started (its bar is on stderr), then terminate
        time.sleep(1.0)
        if proc.poll() is not None:
            break
        if "sampling" in (err := err + os.read(proc.stderr.fileno(), 65536).decode(errors="replace")):
            break
    assert proc.poll() is None, f"sampling ended before the signal: {err}"
    proc.send_signal(signal.SIGTERM)
    rest, tail = proc.communicate(timeout=60)
    err += tail
    assert proc.returncode == 143, err
    assert "\nterminated" in err and "Traceback" not in err
    assert not out.exists()


def test_engine_warnings_go_to_the_stderr_of_the_moment(monkeypatch):
    """The CLI's handler for the engine's warnings writes to ``sys.stderr`` as it is when a line is logged: a
    handler holding the stream of the first ``main()`` wrote later lines (another test's, a notebook's
    redirect) to a stream long closed."""
    import io
    import logging

    from engine.cli.parser import engine_warnings_on_stderr

    engine_warnings_on_stderr()
    log = logging.getLogger("engine.attribution.session")
    for text in ("one", "two"):
        stream = io.StringIO()
        monkeypatch.setattr("sys.stderr", stream)
        log.warning("method %s failed", text)
        assert stream.getvalue() == f"warning: method {text} failed\n"


def test_a_sigterm_inside_a_handlers_except_exception_still_ends_the_command_with_143(capsys):
    """A real SIGTERM reaching a command while it runs code that reports ordinary failures and goes on
    (``except Exception``, as a session does for each method) must still end it with 143 (QA 24: an LDS went
    on with one query's scores missing K-FAC, then failed on every rerun)."""
    import argparse

    from engine.cli.common import run_handler

    went_on = []

    def handler(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        except Exception:  # noqa: BLE001 - the pattern under test
            went_on.append(True)
        return 0

    previous = signal.getsignal(signal.SIGTERM)
    try:
        code = run_handler(argparse.Namespace(func=handler, command="lds"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143 and went_on == []
    assert "terminated; rerun the same command to resume" in capsys.readouterr().err


def test_a_command_gives_the_callers_sigterm_handler_back():
    """QA 30a: after a test had called ``main``, the CLI's SIGTERM handler stayed installed in the pytest process,
    so a SIGTERM (a CI timeout) raised inside whichever test ran next instead of stopping the run."""
    import argparse

    from engine.cli.common import run_handler

    def mine(signum, frame):  # the caller's own handler
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        assert run_handler(argparse.Namespace(func=lambda args: 0, command="query")) == 0
        assert signal.getsignal(signal.SIGTERM) is mine
        assert run_handler(argparse.Namespace(func=lambda args: 2, command="query")) == 2
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_an_interrupted_command_ends_on_its_interruption_line_not_on_a_bar(capsys):
    """A bar still open when Ctrl-C arrives is closed before the line that says what was kept: closed later
    (by the interpreter's exit, or a ``with`` around the handler) it drew itself again below that line, so the
    terminal ended on the bar (QA 24 #8, QA 25 #9: sample, group, assets)."""
    import argparse

    from tqdm import tqdm

    from engine.cli.common import run_handler

    bars = []

    def handler(args):
        bar = tqdm(total=1000, desc="sampling", file=sys.stderr)
        bar.update(165)
        bars.append(bar)  # kept alive, as a bar a caller holds
        raise KeyboardInterrupt

    assert run_handler(argparse.Namespace(func=handler, command="lds-ablation")) == 130
    bars[0].close()  # what the holder does afterwards draws nothing more
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1] == "interrupted; rerun the same command to resume (built caches and finished variants are kept)"
    assert any("165/1000" in line for line in lines[:-1])


@pytest.mark.parametrize("command", ["group", "reverse", "copy-check", "group-bench"])
def test_the_pool_commands_say_a_rerun_continues(command, capsys):
    """QA 27 #16: after Ctrl-C they said only "interrupted", though a drawn pool (and finished matrices) is kept
    and a rerun uses it."""
    import argparse

    from engine.cli.common import run_handler

    def handler(args):
        raise KeyboardInterrupt

    assert run_handler(argparse.Namespace(func=handler, command=command)) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("interrupted; rerun the same command to continue (a pool whose draw finished"), last
