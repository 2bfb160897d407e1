"""TQDM_MININTERVAL thins a log file as the README says: tqdm's monitor thread would otherwise redraw a bar every
10 s (its default maxinterval), whatever mininterval asks (QA 24 #5: about 4 lines a minute at 30 s, not 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.bar_redraw import match_log_intervals
from engine.cli.parser import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TQDM_MININTERVAL": "30"}, "60"),  # the case that wrote a line every 10-20 s
        ({"TQDM_MININTERVAL": "30", "TQDM_MAXINTERVAL": "60"}, "60"),  # the user's own value is kept
        ({"TQDM_MININTERVAL": "5"}, None),  # at most tqdm's own 10 s: nothing to change
        ({"TQDM_MININTERVAL": "7.5"}, "15"),
        ({"TQDM_MININTERVAL": "soon"}, None),  # not a number: left to tqdm
        ({}, None),
    ],
)
def test_the_monitor_interval_follows_a_long_mininterval(env: dict[str, str], expected: str | None) -> None:
    env = dict(env)
    match_log_intervals(env)
    assert env.get("TQDM_MAXINTERVAL") == expected


def test_a_bar_made_after_the_cli_starts_redraws_no_more_often_than_asked() -> None:
    """In a fresh process, as a user's shell would run it: the bar tqdm makes after the CLI's start carries the
    longer maxinterval, so its monitor thread stays quiet between the mininterval's redraws (a one-off loop of
    3 minutes here: lines at 0, 30, 50, 60, 80, 90 s ... with TQDM_MININTERVAL=30 alone; every 30 s with 60)."""
    code = (
        "import sys\n"
        "from engine.cli.parser import main\n"
        "main(['methods', '--json'])\n"
        "import tqdm\n"
        "bar = tqdm.tqdm(total=10, file=sys.stderr)\n"
        "print(bar.mininterval, bar.maxinterval)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    env.update(TQDM_MININTERVAL="30", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].split() == ["30.0", "60.0"]


def test_the_cli_sets_it_before_any_command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("TQDM_MININTERVAL", "45")
    monkeypatch.delenv("TQDM_MAXINTERVAL", raising=False)
    assert main(["methods", "--json"]) == 0
    assert os.environ["TQDM_MAXINTERVAL"] == "90"


def test_training_draws_its_bar_only_when_tqdm_allows(
    tiny_preset, digits_small, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
) -> None:
    """The loss shown beside the training bar waits for the bar's next due redraw.  Before, ``set_postfix``
    redrew every 20 steps: a log file of ``train`` got a line every 6-8 s here with TQDM_MININTERVAL=30."""
    import functools

    import tqdm.auto
    import tqdm.std

    from engine.model.train import train

    # as TQDM_MININTERVAL=1000 would make it, read by tqdm at its import
    monkeypatch.setattr(tqdm.auto, "tqdm", functools.partial(tqdm.std.tqdm, mininterval=1000, maxinterval=2000))
    train(tiny_preset, tmp_path / "ckpt", dataset=digits_small, progress=True, steps=60)
    drawn = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "step" in line]
    assert len(drawn) == 2, drawn  # the bar's start and its close, nothing between
    assert "60/60" in drawn[-1] and "loss=" in drawn[-1]


def test_a_resumed_pass_keeps_drawing_after_its_jump() -> None:
    """QA 25 #7: a build resumed at 768/1797 rows drew its bar at 784 and 800, then not for 15 s. tqdm's dynamic
    ``miniters`` followed the units counted since its last draw, and the resume line's jump (drawn at once by
    ``move``) counted in: the next ~300 rows had to come before a draw.  On a fake clock, a row batch every 0.5 s
    at a 0.1 s interval must draw every time."""
    import io

    from tqdm import tqdm

    from engine.bar_redraw import move

    clock = [1000.0]
    out = io.StringIO()
    bar = tqdm(total=1000, file=out, mininterval=0.1, unit="")
    bar._time = lambda: clock[0]
    bar.start_t = bar.last_print_t = clock[0]
    move(bar, 0.0, "train gradients 0/1797")
    move(bar, 768 / 1797, "resuming: 768/1797 examples saved by an earlier run")
    missed = []
    for k in range(784, 1797, 16):
        clock[0] += 0.5
        before = out.getvalue().count("\r")
        move(bar, k / 1797, f"train gradients {k}/1797")
        if out.getvalue().count("\r") == before:
            missed.append(k)
    bar.close()
    assert missed == [], f"no redraw at rows {missed[:5]}... ({len(missed)} of {len(range(784, 1797, 16))})"
