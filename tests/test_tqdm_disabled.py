"""``TQDM_DISABLE=1``, which the README offers to keep bars out of a log, through the commands a user runs.

Why a test of its own: a disabled tqdm bar lacks most of a live bar's attributes (``initial``, ``start_t``,
``maxinterval``), and code that adjusts a bar by hand raised AttributeError only in that mode, three times so far
(the folder decode's clock, QA 37 #1; a resumed precompute's start; every build's quiet-bar clock).  The tests'
own runs keep bars on, so nothing else runs these paths with bars off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_app import shared_tiny_app  # noqa: F401 - the tiny checkpoint, trained once per test session

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_long_command_runs_with_bars_disabled(tmp_path_factory, tmp_path):
    env_app = shared_tiny_app(tmp_path_factory)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    preset, ckpt, cache = env_app["ATTRIBUTION_PRESET"], env_app["ATTRIBUTION_CHECKPOINT"], str(tmp_path / "cache")
    where = ["--preset", preset, "--checkpoint", ckpt]
    commands = [
        ["train", "--preset", preset, "--steps", "20", "--out", str(tmp_path / "run")],
        ["sample", *where, "--n", "2", "--seed", "1", "--out", str(tmp_path / "s.npz")],
        ["build", *where, "--cache-root", cache, "--methods", "kfac,trak,dtrak,pixel"],
        ["query", *where, "--cache-root", cache, "--query", "gallery:0", "--methods", "kfac,trak,dtrak,pixel",
         "--json"],
        ["precompute", *where, "--cache-root", cache, "--out", str(tmp_path / "pre.npz")],
        ["reverse", *where, "--cache-root", cache, "--train", "0", "--methods", "kfac,trak", "--json"],
        ["group", *where, "--cache-root", cache, "--remove", "train:0,1,2", "--methods", "kfac,trak", "--json"],
    ]
    for argv in commands:
        run = subprocess.run([sys.executable, "-m", "engine", *argv], env=env, cwd=REPO, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0 and "Traceback" not in run.stderr, (argv[0], run.stderr[-3000:])
