"""scripts/lds_paired.py: paired LDS differences between entries of result files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def lds_paired(load_script):
    return load_script("lds_paired")


def _record(path: Path, methods: dict[str, list[float]], **config) -> Path:
    path.write_text(json.dumps({"config": {"preset": "digits", **config},
                                "methods": {m: {"per_query": v} for m, v in methods.items()}}))
    return path


def test_a_method_ahead_on_every_query_is_separated_and_noise_is_not(lds_paired, tmp_path, capsys):
    rng = np.random.default_rng(3)
    base = rng.uniform(0.1, 0.6, 40)
    f = _record(tmp_path / "run.json", {"a": list(base + 0.05), "b": list(base), "c": list(base + rng.normal(0, 0.1, 40))})
    assert lds_paired.main(["--pair", f"{f}:a", f"{f}:b", "--pair", f"{f}:c", f"{f}:b"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("run.json:a - run.json:b: +0.050 [+0.050, +0.050] over 40 queries")
    assert lines[0].endswith("A > B")
    diff = np.mean(np.asarray(lds_paired.resolve(f"{f}:c")[1]["per_query"]) - base)
    assert f"{diff:+.3f}" in lines[1]


def test_first_n_pairs_a_longer_run_with_a_shorter_one_and_says_where_settings_differ(lds_paired, tmp_path, capsys):
    long = _record(tmp_path / "long.json", {"kfac": [0.5, 0.4, 0.3, 0.9, 0.9]}, seeds=2, subsets=32)
    short = _record(tmp_path / "short.json", {"kfac": [0.4, 0.3, 0.2]}, seeds=1, subsets=16)
    assert lds_paired.main(["--pair", f"{long}:kfac", f"{short}:kfac"]) == 1  # 5 against 3: refused
    assert "pass --first N" in capsys.readouterr().err
    assert lds_paired.main(["--first", "3", "--pair", f"{long}:kfac", f"{short}:kfac"]) == 0
    out = capsys.readouterr().out
    assert "subsets: 32 vs 16" in out and "+0.100" in out


def test_a_slash_path_reaches_an_ablation_variant_and_bad_operands_are_clear(lds_paired, tmp_path):
    f = tmp_path / "abl.json"
    f.write_text(json.dumps({"variants": {"plain": {"methods": {"kfac": {"per_query": [0.1, 0.2]}}},
                                          "old": {"methods": {"kfac": {"lds": 0.3}}}}}))
    assert lds_paired.resolve(f"{f}:variants/plain/methods/kfac")[1]["per_query"] == [0.1, 0.2]
    with pytest.raises(SystemExit, match="no per-query LDS values"):
        lds_paired.resolve(f"{f}:variants/old/methods/kfac")
    with pytest.raises(SystemExit, match="no 'trak' on the path"):
        lds_paired.resolve(f"{f}:variants/plain/methods/trak")
    with pytest.raises(SystemExit, match="expected FILE.json:KEY"):
        lds_paired.resolve(str(f))
    with pytest.raises(SystemExit, match="no such file"):
        lds_paired.resolve(f"{tmp_path}/missing.json:kfac")
