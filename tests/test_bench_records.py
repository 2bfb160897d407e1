"""Every bench record names the code that made it (``engine.code_version``), as the export and evaluation records
do (QA 31b #2: the attribution, compressed, scale and foundation benches' records and group-bench's had none)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from test_bench_foundation_qa27 import fake_foundation  # noqa: F401 - the fixture
from test_session import TINY_ATTRIBUTION, tiny_checkpoint

from engine.code_version import code_version
from engine.config import PRESETS


class _Stop(Exception):
    pass


def test_the_attribution_bench_record_names_its_code(monkeypatch, tmp_path):
    """Its first phase's record (written before the warm session opens) already says which code made it."""
    import engine.attribution.session as session_module
    import engine.bench.attribution as bench

    monkeypatch.setattr(bench, "run_cold_build", lambda *a, **k: {"methods": {}})

    def stop(*a, **k):
        raise _Stop

    monkeypatch.setattr(session_module, "AttributionSession", stop)
    out = tmp_path / "bench.json"
    with pytest.raises(_Stop):
        bench.run_bench(PRESETS["digits"], tmp_path / "ckpt", "cpu", PRESETS["digits"].attribution, ["kfac"],
                        reuse_cache=True, cache_root=str(tmp_path / "cache"), out=out)
    assert json.loads(out.read_text())["code"] == code_version()


def test_the_foundation_bench_record_names_its_code(fake_foundation, tmp_path, capsys):  # noqa: F811
    from engine.bench.foundation import bench_foundation

    out = tmp_path / "foundation.json"
    bench_foundation(tmp_path / "no-checkpoint", "cpu", steps=2, warmup=1, samples=1, json_out=out)
    assert json.loads(out.read_text())["code"] == code_version()


@pytest.fixture(scope="module")
def kfac_session(tmp_path_factory, digits_small):
    from engine.attribution.session import AttributionSession

    folder = tmp_path_factory.mktemp("records_ckpt")
    preset = tiny_checkpoint(folder, digits_small, gallery=3)
    s = AttributionSession(preset, checkpoint=folder, device="cpu", cache_root=tmp_path_factory.mktemp("c"),
                           config=dataclasses.replace(TINY_ATTRIBUTION), dataset=digits_small)
    s.build(["kfac"])
    return s


@pytest.mark.slow  # 20 s: a tiny checkpoint, its K-FAC cache and a pool
def test_group_bench_records_name_their_code(kfac_session, tmp_path, capsys):
    """groups_<preset>.json and groups_<preset>_class_check_kfac.json (cli/groups.py writes them as returned)."""
    from engine.bench.groups import class_check_from_factors, run_group_bench

    out = run_group_bench(kfac_session, ["kfac"], pool_size=2, pool_seed=3, work_dir=tmp_path / "w",
                          single_queries=1, log=lambda _: None)
    assert json.loads(json.dumps(out))["config"]["code"] == code_version()
    assert class_check_from_factors(kfac_session)["code"] == code_version()
