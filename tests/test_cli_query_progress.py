"""``query --auto-build --json`` on an empty cache (QA round 12, C1): it printed nothing for 6 minutes, and a
process waiting for another process's build did not say so.  Progress and the waiting line go to stderr;
stdout stays one JSON object."""

from __future__ import annotations

import fcntl
import json
import os
import threading

import pytest
from test_session import tiny_checkpoint

import engine.attribution.session
from engine.attribution.store import Store
from engine.attribution.store_files import settings_digest
from engine.cli.parser import main

SMALL = ["--mc-samples", "4", "--trak-dim", "32"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, digits_small):
    folder = tmp_path_factory.mktemp("progress_ckpt")
    tiny_checkpoint(folder, digits_small)
    return folder


@pytest.fixture
def query(checkpoint, tmp_path, digits_small, monkeypatch, capsys):
    folder = checkpoint
    monkeypatch.setattr(engine.attribution.session, "load_dataset", lambda cfg: digits_small)

    def run(*argv: str) -> tuple[int, str, str]:
        rc = main(["query", *argv, "--checkpoint", str(folder), "--device", "cpu",
                   "--cache-root", str(tmp_path / "cache"), *SMALL])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def test_auto_build_with_json_shows_progress_on_stderr(query):
    rc, out, err = query("--query", "train:1", "--methods", "trak", "--auto-build", "--json")
    assert rc == 0, err
    assert json.loads(out)["methods"]["trak"]["status"] == "ok"  # stdout: the JSON alone
    assert "projected gradients" in err and "100%" in err, err


def test_a_query_waiting_for_another_build_says_so(query, monkeypatch):
    """Another holder of the cache's build lock (as another process: its own open file, released after a
    moment): the query says it waits, then builds and answers."""
    real_lock = Store.lock
    held = []

    def lock(self, name, settings=None, wait=True, on_wait=None, **kw):
        if not held:  # the first build lock asked for: someone else holds it for a moment
            self.base.mkdir(parents=True, exist_ok=True)
            tag = name if settings is None else f"{name}-{settings_digest(settings)}"
            fd = os.open(self.base / f".lock-{tag}", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            held.append(fd)
            # the other build has saved 1 of its 4 parts so far (what the waiting query reads from the disk)
            folder = self._partial_folder(name.removeprefix("build-"), settings)  # one lock per artefact
            folder.mkdir(parents=True)
            (folder / "settings.json").write_text(json.dumps({"num_parts": 4}))
            (folder / "part-00000.done").write_text("{}")
            threading.Timer(1.0, os.close, (fd,)).start()
        return real_lock(self, name, settings, wait=wait, on_wait=on_wait, **{**kw, "poll_seconds": 0.05})

    monkeypatch.setattr(Store, "lock", lock)
    rc, out, err = query("--query", "train:1", "--methods", "trak", "--auto-build", "--json")
    assert rc == 0, err
    assert held
    assert json.loads(out)["methods"]["trak"]["status"] == "ok"
    assert "waiting for another build of this cache" in err, err
    # while it waits, the bar shows how far the other build has got (QA round 14: 17.7 min on one 0% line)
    assert "waiting for another build: trak 1/4 parts" in err, err
    assert "25%" in err, err


def test_group_commands_auto_build_with_progress_too(checkpoint, tmp_path, digits_small, monkeypatch, capsys):
    """``reverse`` (and ``group``, ``copy-check``, which share its setup) built silently as well."""
    monkeypatch.setattr(engine.attribution.session, "load_dataset", lambda cfg: digits_small)
    rc = main(["reverse", "--train", "3", "--methods", "trak", "--auto-build", "--json", "--checkpoint",
               str(checkpoint), "--device", "cpu", "--cache-root", str(tmp_path / "cache"), *SMALL])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out)["methods"]["trak"]["top"]  # stdout: the JSON alone
    assert "projected gradients" in err and "100%" in err, err


def test_auto_build_refuses_a_bad_query_before_building(query, monkeypatch):
    """Review: ``--auto-build`` built every cache (minutes) before a bad measurement was refused."""
    built = []
    real = engine.attribution.session.AttributionSession.build
    monkeypatch.setattr(engine.attribution.session.AttributionSession, "build",
                        lambda self, names=None, *a, **k: built.append(names) or real(self, names, *a, **k))
    rc, out, err = query("--query", "train:1", "--methods", "trak", "--measurement", "trajectory", "--auto-build")
    assert rc == 2 and "trajectory" in err and built == [], (err, built)
    rc, out, err = query("--query", "train:1", "--methods", "trak", "--measurement", "bogus", "--auto-build")
    assert rc == 2 and built == [], (err, built)


def test_tqdm_mininterval_thins_the_build_bars(monkeypatch, capsys):
    """QA round 22: with TQDM_MININTERVAL=30 a build's bar still redrew 61 times in 45 s, since every progress
    call forced a refresh; the README says the variable thins the bars in a log file."""
    from engine.attribution.terminal_progress import terminal_progress
    from engine.cli.common import build_progress

    monkeypatch.setenv("TQDM_MININTERVAL", "30")
    for bar in (build_progress("kfac"), terminal_progress("building")):
        with bar as progress:
            for i in range(200):
                progress(f"kfac: train gradients {i}/200", i / 200)
        err = capsys.readouterr().err
        assert err.count("\r") <= 4, err.count("\r")  # the first draw and the close, not one per call


def test_a_build_bar_says_the_time_left_from_this_runs_speed():
    """QA 33: a cifar2 factor pass on a CPU sat at 0 per mille (256 of 1,250,000 rows) with no estimate; the bar
    now gives the time left at this run's mean speed, from the fraction itself, after its first 10 s."""
    from engine.attribution.terminal_progress import time_left

    assert time_left(0.0, 0.1, 0.2, now=100.0) == "13 min"  # 0.8 left at 0.1 per 100 s
    assert time_left(0.0, 0.0, 256 / 1_250_000, now=54.0) == "3 d"  # 54 s for 256 rows: 263,617 s left
    assert time_left(0.0, 0.0, 0.5, now=50.0) == "50 s"
    assert time_left(0.0, 0.0, 0.9, now=3600.0 * 18) == "2.0 h"
    assert time_left(0.0, 0.3, 0.3, now=100.0) is None  # nothing moved in this run (resumed at 30%)
    assert time_left(0.0, 0.0, 0.5, now=5.0) is None  # too early to say
    assert time_left(0.0, 0.0, 1.0, now=100.0) is None  # done


def test_a_quiet_build_bar_keeps_its_clock_moving(capsys):
    """QA 34 #2: a cifar2 factor pass on a CPU sends its second message after its first 256-row batch, over 4 min
    in; tqdm does not redraw a bar moved by hand in between, so it showed "00:00" all that time and looked hung.
    A bar with no message for ``quiet_redraw_s`` is redrawn, so its elapsed time moves; a busy one is not."""
    import re
    import time

    from engine.attribution.terminal_progress import terminal_progress

    with terminal_progress("building", quiet_redraw_s=0.4) as progress:
        progress("kfac: K-FAC factors: 0/1250000 (example, draw) rows", 0.0)
        time.sleep(2.3)
    err = capsys.readouterr().err
    clocks = re.findall(r"\| (\d\d:\d\d) ", err)
    assert "00:02" in clocks and len(clocks) >= 4, (clocks, err)  # redrawn while quiet: the clock reached 2 s
    with terminal_progress("building", redraw_s=100.0, quiet_redraw_s=1.0) as progress:
        for i in range(30):
            progress(f"kfac: K-FAC factors: {i}/30 (example, draw) rows", i / 30)
            time.sleep(0.05)  # a message every 50 ms: never quiet for 1 s
    err = capsys.readouterr().err
    assert err.count("\r") <= 3, err.count("\r")  # the first draw and the close (tqdm's interval is 100 s here)


def test_a_cli_bar_prints_a_long_resume_line_whole(capsys, monkeypatch):
    """QA 46 #3: a resume line longer than the bar's width lost its end ("(128 of them computed again for trak,
    dtrak)"); it is written whole on a line of its own, once; other messages are still cut, and a disabled bar
    (TQDM_DISABLE=1) writes nothing."""
    import functools

    import tqdm.auto
    import tqdm.std

    from engine.cli.common import build_progress

    line = "K-FAC Influence: resuming: 128/200 examples saved by an earlier run (128 of them computed again for trak, dtrak)"
    with build_progress("kfac") as progress:
        progress("kfac: " + line, 0.4)
        progress("kfac: K-FAC Influence: train gradients 16/200 (saved; again for the projections) " + "y" * 40 + "END", 0.5)
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert lines.count(line) == 1, lines
    assert not any("END" in t for t in lines)
    monkeypatch.setattr(tqdm.auto, "tqdm", functools.partial(tqdm.std.tqdm, disable=True))
    with build_progress("kfac") as progress:
        progress("kfac: " + line, 0.4)
    assert capsys.readouterr().err == ""
