"""The cold-build benchmark's record: the median of several runs, and earlier records kept (issue 12)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def script(monkeypatch, load_script):
    mod = load_script("time_cold_build")  # a fresh module per test: the monkeypatches below stay local
    walls = iter([210.0, 180.0, 195.0])
    roots: list[Path] = []

    def fake_build(preset: str, root: Path, extra: list[str]) -> dict:
        assert not any(root.iterdir()), "every run must start from an empty cache folder"
        roots.append(root)
        wall = next(walls)
        return {"wall_s": wall, "peak_rss_mb": int(wall * 10), "load_average_before": 0.5,
                "build_seconds": {"kfac-bank": wall - 50}}

    monkeypatch.setattr(mod, "timed_build", fake_build)
    mod.roots = roots
    return mod


def test_record_is_the_median_run_with_every_run_kept(script, tmp_path):
    out = tmp_path / "cold.json"
    script.main(["--runs", "3", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["wall_s"] == 195.0  # the median of 210, 180, 195
    assert record["build_seconds"] == {"kfac-bank": 145.0}  # the median run's own breakdown
    assert [r["wall_s"] for r in record["runs"]] == [210.0, 180.0, 195.0]
    assert record["peak_rss_mb"] == 2100  # the largest of the runs' own peaks
    assert len(set(script.roots)) == 3  # each run into its own folder


def test_an_existing_record_moves_to_earlier_runs(script, tmp_path):
    out = tmp_path / "cold.json"
    older = {"date": "2026-12-01", "command": "old", "wall_s": 322.0, "earlier_runs": {"first": {"wall_s": 814.0}}}
    out.write_text(json.dumps(older))
    script.main(["--out", str(out)])
    record = json.loads(out.read_text())
    assert record["wall_s"] == 210.0 and "runs" not in record
    earlier = record["earlier_runs"]
    assert [v["wall_s"] for v in earlier.values()] == [322.0, 814.0]  # newest first, nothing lost
    assert "earlier_runs" not in next(iter(earlier.values()))


def test_several_runs_cannot_share_one_kept_cache_folder(script, tmp_path):
    with pytest.raises(SystemExit, match="--runs 1"):
        script.main(["--runs", "2", "--cache-root", str(tmp_path / "c")])


def test_the_same_command_twice_on_one_day_keeps_both_earlier_records(script, tmp_path):
    out = tmp_path / "cold.json"
    script.main(["--out", str(out)])  # 210 s
    script.main(["--out", str(out)])  # 180 s, the 210 s record moves to earlier_runs
    script.main(["--out", str(out)])  # 195 s, the 180 s record too, under the same date and command
    record = json.loads(out.read_text())
    assert record["wall_s"] == 195.0
    assert sorted(v["wall_s"] for v in record["earlier_runs"].values()) == [180.0, 210.0]


def test_a_failed_build_stops_with_its_exit_code(tmp_path, load_script):
    mod = load_script("time_cold_build")
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(SystemExit, match="build failed with exit code [1-9]"):
        mod.timed_build("no-such-preset", root, [])


def test_the_record_says_which_caches_shared_one_gradient_pass(load_script, tmp_path):
    """A fed cache's build_seconds are its own work after K-FAC's pass, so the record must say so beside
    them (the figure was read as TRAK's whole cost in QA round 12)."""
    mod = load_script("time_cold_build")
    metas = {"kfac-bank-0a1b": {"meta": {"build_seconds": 300.0, "gradient_pass_fed": ["trak", "dtrak"]}},
             "trak-2c3d": {"meta": {"build_seconds": 4.7, "gradient_pass_shared_with": "kfac"}},
             "kfac-factors-4e5f": {"meta": {"build_seconds": 60.0}},
             ".partial-trak-9": {"meta": {"build_seconds": 1.0, "gradient_pass_shared_with": "kfac"}}}
    for folder, meta in metas.items():
        (tmp_path / "ck" / folder).mkdir(parents=True)
        (tmp_path / "ck" / folder / "settings.json").write_text(json.dumps(meta))
    assert mod.recorded_sharing(tmp_path) == {"kfac-bank": {"fed": ["trak", "dtrak"]},
                                              "trak": {"shared_with": "kfac"}}
    assert mod.recorded_seconds(tmp_path) == {"kfac-bank": 300.0, "trak": 4.7, "kfac-factors": 60.0}
