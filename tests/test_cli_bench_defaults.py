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
