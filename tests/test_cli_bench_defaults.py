"""`attribution-engine bench` measures the preset's own settings unless told otherwise.

It used to default to M = 64 draws for every preset, so `bench --preset mnist --reuse-cache`
ignored the shipped mnist caches (built at the preset's M = 16) and started a 4x larger build.
"""

from __future__ import annotations

import pytest

import engine.bench.attribution as bench_attribution
from engine.cli.parser import main


class _Captured(Exception):
    pass


@pytest.mark.parametrize(("argv", "want"), [(["--preset", "mnist"], 16), (["--preset", "digits"], 64),
                                            (["--preset", "mnist", "--mc-samples", "3"], 3)])
def test_bench_uses_the_presets_draws(monkeypatch, tmp_path, argv, want):
    seen = {}

    def fake_run_bench(preset, ckpt, device, config, **kw):
        seen["mc_samples"] = config.mc_samples
        raise _Captured

    monkeypatch.setattr(bench_attribution, "run_bench", fake_run_bench)
    with pytest.raises(_Captured):
        main(["bench", *argv, "--out", str(tmp_path / "b.json")])
    assert seen["mc_samples"] == want


def test_benchmark_results_are_written_atomically(tmp_path, monkeypatch):
    """``bench-compressed`` wrote its results with ``write_text``: a kill during the write left a truncated
    file where the README's figures come from (QA round 13).  Now the file is written beside and renamed
    into place: a write that dies before the rename (simulated here) leaves the earlier file as it was."""
    import json
    import os

    import pytest

    from engine.bench.compressed import save

    out = tmp_path / "compressed_digits.json"
    out.write_text('{"earlier": 1}\n')
    real = os.replace

    def killed(src, dst):
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(OSError, match="killed"):
        save({"ratio": 32}, out)
    assert json.loads(out.read_text()) == {"earlier": 1}
    monkeypatch.setattr(os, "replace", real)
    save({"ratio": 32}, out)
    assert json.loads(out.read_text()) == {"ratio": 32}
    assert [p.name for p in tmp_path.iterdir()] == ["compressed_digits.json"]  # no temporary file left
