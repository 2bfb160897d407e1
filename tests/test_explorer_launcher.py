"""``python -m explorer``: the app's flags are checked, and ``--help`` printed, before a server starts (QA 46 #1:
under ``streamlit run ... -- --help`` nothing was printed until a browser opened the page, and the server kept
running)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import explorer.__main__ as launcher
from explorer.app_flags import APP_SCRIPT

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTRIBUTION_")}
    return subprocess.run([sys.executable, "-m", "explorer", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_help_prints_the_flags_and_stops_without_a_server():
    done = _run("--server.port", "1", "--help")  # port 1: a server could not even start there
    assert done.returncode == 0, done.stderr
    for flag in ("--preset", "--checkpoint", "--cache", "--data-root", "--no-retrain", "ATTRIBUTION_CACHE"):
        assert flag in done.stdout
    assert done.stdout.startswith("usage: python -m explorer ")  # the program it was run as (QA 49 #2)
    assert "Streamlit" not in done.stderr


@pytest.mark.parametrize(("args", "words"), [
    (["--prset", "mnist"], "unrecognized arguments: --prset mnist"),
    (["--preset", "mnsit"], "unknown preset 'mnsit'"),
    (["--max-retrain-jobs", "0"], "--max-retrain-jobs must be at least 1"),
    (["--server.port"], "--server.port needs a value"),
    # argparse's own error names the program whole (QA 61 F5: "(the app takes: -m explorer [-h] ...")
    (["--mc-samples", "x"], "invalid int value: 'x' (the app takes: python -m explorer [-h] [--preset PRESET]"),
    # a bank kind's own refusal (QA 61 F4: the server started, and its build refused at once)
    (["--kfac-bank", "compressed", "--kfac-blocks", "joint"], "needs separate weight and bias blocks"),
])
def test_a_bad_flag_is_one_error_line_and_no_server(args, words):
    done = _run(*args)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m explorer: error: ") and words in lines[0], done.stderr


def test_streamlits_dotted_options_go_to_streamlit_and_the_rest_to_the_app(monkeypatch):
    assert launcher.split_argv(["--preset", "mnist", "--server.port", "8502", "--server.headless=true",
                                "--cache=/tmp/a.b", "--data-root", "x.y"]) == (
        ["--preset", "mnist", "--cache=/tmp/a.b", "--data-root", "x.y"], ["--server.port", "8502",
                                                                          "--server.headless=true"])
    ran = []
    monkeypatch.setattr(launcher.os, "execv", lambda path, argv: ran.append((path, argv)))
    assert launcher.main(["--preset", "mnist", "--server.port", "8502"]) == 0
    assert ran == [(sys.executable, [sys.executable, "-m", "streamlit", "run", str(APP_SCRIPT), "--server.port",
                                     "8502", "--", "--preset", "mnist"])]


@pytest.mark.slow
def test_good_flags_start_the_server():
    from explorer.headless import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTRIBUTION_")}
    proc = subprocess.Popen([sys.executable, "-m", "explorer", "--preset", "digits", "--server.port", str(port),
                             "--server.headless", "true", "--server.address", "127.0.0.1"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    assert r.read() == b"ok"
                    break
            except OSError:
                assert proc.poll() is None, "the server exited"
                assert time.monotonic() < deadline, "no server within 90 s"
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(30)
