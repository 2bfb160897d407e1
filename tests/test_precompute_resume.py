"""``precompute`` resumes: a run cut short keeps the gallery samples it scored, and the rerun scores
only the rest, to the same file as an uninterrupted run."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_app import tiny_app  # noqa: F401 - fixture

from engine.attribution.precomputed import write_precomputed


class Stop(Exception):
    pass


def _session(tiny_app, **config):  # noqa: F811
    from engine.attribution.session import AttributionSession

    s = AttributionSession(tiny_app["ATTRIBUTION_PRESET"], tiny_app["ATTRIBUTION_CHECKPOINT"], "cpu",
                           tiny_app["ATTRIBUTION_CACHE"])
    if config:
        s = AttributionSession(tiny_app["ATTRIBUTION_PRESET"], tiny_app["ATTRIBUTION_CHECKPOINT"], "cpu",
                               tiny_app["ATTRIBUTION_CACHE"], config=dataclasses.replace(s.config, **config))
    return s


def _count_queries(session, monkeypatch) -> list[str]:
    asked = []
    real = session.query

    def query(q, *a, **k):
        asked.append(q.spec if hasattr(q, "spec") else str(q))
        return real(q, *a, **k)

    monkeypatch.setattr(session, "query", query)
    return asked


def test_an_interrupted_precompute_resumes_where_it_stopped(tiny_app, tmp_path, monkeypatch):  # noqa: F811
    whole = write_precomputed(_session(tiny_app), tmp_path / "whole.npz")
    session = _session(tiny_app)
    n = len(session.gallery())
    assert n >= 3
    asked = _count_queries(session, monkeypatch)

    def stop_after_two(done, total):
        if done == 2:
            raise Stop

    out = tmp_path / "pre.npz"
    with pytest.raises(Stop):
        write_precomputed(session, out, progress=stop_after_two)
    assert not out.exists() and len(asked) == 2
    seen, said = [], []
    write_precomputed(session, out, progress=lambda done, total: seen.append(done), notice=said.append)
    assert len(said) == 1 and said[0].startswith(f"resuming: 2/{n} gallery samples scored by an earlier run")
    assert len(asked) == n  # the two scored before the stop were not scored again
    assert seen == list(range(1, n + 1))  # the progress still counts every sample
    assert out.read_bytes() == whole.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the row folder is gone
    # with ``resumed`` (the CLI's bar): told once of the samples scored before, and progress counts this run's
    other = tmp_path / "pre2.npz"
    with pytest.raises(Stop):
        write_precomputed(session, other, progress=stop_after_two)
    told, seen = [], []
    write_precomputed(session, other, progress=lambda done, total: seen.append(done), resumed=told.append)
    assert told == [2] and seen == list(range(3, n + 1))
    assert other.read_bytes() == whole.read_bytes()


def test_rows_scored_under_other_settings_are_not_reused(tiny_app, tmp_path, monkeypatch):  # noqa: F811
    """Only the settings key differs (pixel needs no cache: the same method list, no K-FAC grid). Two killed
    runs on one file, at M = 3 and at the preset's M, keep their rows apart; a rerun at M = 3 takes its own two
    rows, not the other run's, and scores the rest."""
    out = tmp_path / "pre.npz"

    def stop_after_two(done, total):
        if done == 2:
            raise Stop

    for config in ({"mc_samples": 3}, {}):
        with pytest.raises(Stop):
            write_precomputed(_session(tiny_app, **config), out, methods=["pixel"], progress=stop_after_two)
    assert len(list(tmp_path.glob(".pre.npz.partial-*"))) == 2  # one row folder per settings key
    again = _session(tiny_app, mc_samples=3)
    asked = _count_queries(again, monkeypatch)
    write_precomputed(again, out, methods=["pixel"])
    assert len(asked) == len(again.gallery()) - 2
    with np.load(out) as z:
        assert '"mc_samples": 3' in str(z["key"])
    assert list(tmp_path.glob(".pre.npz.partial-*")) == []  # the finished file's run removes every row folder


def test_precompute_without_a_built_cache_names_the_whole_build_command(tiny_app, tmp_path):  # noqa: F811
    """It said "run `attribution-engine build` first", without the preset, checkpoint or cache root of the
    session that could not find the caches (review of docs/architecture.md §10): pasted, it built elsewhere."""
    from engine.attribution.session import AttributionSession

    empty = tmp_path / "empty cache"
    s = AttributionSession(tiny_app["ATTRIBUTION_PRESET"], tiny_app["ATTRIBUTION_CHECKPOINT"], "cpu", str(empty))
    with pytest.raises(RuntimeError) as e:
        write_precomputed(s, tmp_path / "out.npz", methods=["kfac", "trak"])
    assert f"run `{s.build_command(['kfac', 'trak'])}` first" in str(e.value)
    assert "--cache-root" in str(e.value) and "--checkpoint" in str(e.value)


def test_a_blank_gallery_sample_is_written_as_unavailable_for_pixel_not_a_failed_file(tiny_app, tmp_path, capsys):  # noqa: F811
    """Pixel similarity cannot score a blank image; a live query says so and the other methods answer.
    ``precompute`` stopped the whole file instead (QA 26: a short training run's blank gallery sample), so a
    model with one such sample had no precomputed first page at all."""
    import shutil

    from engine.attribution.precomputed import PrecomputedGallery, precomputed_result
    from engine.attribution.session import AttributionSession

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_app["ATTRIBUTION_CHECKPOINT"], folder)
    with np.load(folder / "gallery.npz") as z:
        gallery = {k: z[k] for k in z.files}
    gallery["images"][1] = -1.0  # every pixel black
    np.savez(folder / "gallery.npz", **gallery)
    session = AttributionSession(tiny_app["ATTRIBUTION_PRESET"], folder, "cpu", tiny_app["ATTRIBUTION_CACHE"])
    live = session.query(session.parse_query("gallery:1"), "loss")
    assert live.methods["pixel"].status == "unavailable" and "blank" in live.methods["pixel"].reason
    out = write_precomputed(session, tmp_path / "pre.npz")
    pre = PrecomputedGallery(out)
    assert pre.scores(1, "pixel") is None and pre.unavailable(1, "pixel") == live.methods["pixel"].reason
    assert pre.scores(0, "pixel") is not None and pre.unavailable(0, "pixel") is None
    shown = precomputed_result(session, pre, "gallery:1", "loss", None)
    assert shown.methods["pixel"].status == "unavailable"
    assert shown.methods["pixel"].reason == live.methods["pixel"].reason
    assert shown.methods["pixel"].reason_about == "query"
    assert set(pre.methods_for(session)) > {"pixel"}
    for name in pre.methods_for(session):  # every other method keeps its precomputed scores of that sample
        if name != "pixel":
            assert shown.methods[name].status == "ok"
            np.testing.assert_allclose(shown.methods[name].scores, live.methods[name].scores,
                                       rtol=2e-3, atol=2e-3 * np.abs(live.methods[name].scores).max())
    # the command says which samples a method could not score
    from engine.cli.parser import main

    assert main(["precompute", "--preset", tiny_app["ATTRIBUTION_PRESET"], "--checkpoint", str(folder),
                 "--cache-root", tiny_app["ATTRIBUTION_CACHE"], "--out", str(tmp_path / "cli.npz")]) == 0
    said = capsys.readouterr().out
    assert f"gallery:1: pixel unavailable for this sample: {live.methods['pixel'].reason}" in said
    assert "gallery:0:" not in said


def test_a_precomputed_answer_below_kfacs_floor_warns_as_a_live_one(tiny_app, tmp_path):  # noqa: F811
    """QA 36 #2: the first page's damping slider reaches 1e-12 through the precomputed file, under the shipped
    digits factors' resolution floor (2.5e-10), and those answers carried no warning and no damping_floor: the
    file was read before the factors were loaded. The file records the floor now, the answers use it, and they
    agree with the live answer's warning."""
    from engine.attribution.precomputed import PrecomputedGallery, precomputed_result

    session = _session(tiny_app)
    out = write_precomputed(session, tmp_path / "pre.npz", indices=[0])
    floor = session.method("kfac").damping_floor()
    pre = PrecomputedGallery(out)
    assert floor is not None and pre.damping_floor("kfac") == floor and pre.damping_floor("trak") is None
    fresh = _session(tiny_app)
    assert fresh.method("kfac").damping_floor() is None  # not loaded: the floor can only come from the file
    steps = fresh.method_info()["kfac"]["damping_steps"]
    low, high = min(steps), min(v for v in steps if v > floor)
    assert low < floor
    got = precomputed_result(fresh, pre, "gallery:0", "loss", None, {"kfac": low}).methods["kfac"]
    live = session.query(session.parse_query("gallery:0"), methods=["kfac"], damping={"kfac": low}).methods["kfac"]
    assert got.reason == "precomputed" and got.damping_floor == floor and got.warning == live.warning is not None
    fine = precomputed_result(fresh, pre, "gallery:0", "loss", None, {"kfac": high}).methods["kfac"]
    assert fine.reason == "precomputed" and fine.warning is None and fine.damping_floor == floor


def test_precompute_killed_with_sigkill_resumes_to_the_same_file(tiny_app, tmp_path):  # noqa: F811
    """A real ``kill -9`` of the ``precompute`` command part-way: no handler runs, so only what was written
    atomically before the kill survives.  The rerun reports the rows it found, scores the rest, and writes the
    file an uninterrupted run writes, byte for byte; no row folder or temporary is left beside it."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    base = ["precompute", "--preset", tiny_app["ATTRIBUTION_PRESET"], "--checkpoint", tiny_app["ATTRIBUTION_CHECKPOINT"],
            "--cache-root", tiny_app["ATTRIBUTION_CACHE"]]
    whole = write_precomputed(_session(tiny_app), tmp_path / "whole.npz")
    n = len(_session(tiny_app).gallery())
    out = tmp_path / "killed" / "pre.npz"
    proc = subprocess.Popen([sys.executable, "-m", "engine", *base, "--out", str(out)], env=env, cwd=repo,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    rows: list[Path] = []
    while proc.poll() is None and time.monotonic() < deadline:
        rows = list(out.parent.glob(".pre.npz.partial-*/row-*.npz"))
        if rows:
            proc.send_signal(signal.SIGKILL)  # at the first saved row: the run is part-way, whatever the machine's speed
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    assert not out.exists() and 1 <= len(rows) < n
    again = subprocess.run([sys.executable, "-m", "engine", *base, "--out", str(out)], env=env, cwd=repo,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    said = re.search(rf"resuming: (\d+)/{n} gallery samples scored by an earlier run", again.stdout + again.stderr)
    assert said and len(rows) <= int(said.group(1)) < n  # a row may have been saved between the look and the kill
    assert out.read_bytes() == whole.read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["pre.npz"]  # no row folder, no temporary
