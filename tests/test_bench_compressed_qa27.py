"""QA round 27's findings on bench-compressed: bad options refused while parsing or before any work, a foreign
LDS run or a missing file refused before the benchmark, the machine recorded, MiB named MiB, progress on
stderr before each timed part, one count for the damping grid."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import engine.attribution.session
from engine.cli.parser import build_parser, main
from engine.code_version import code_version
from engine.paths import REPO_ROOT as REPO

DIGITS_CKPT = REPO / "assets" / "digits"


@pytest.mark.parametrize(("argv", "says"), [
    (["bench-compressed", "--candidates", "0"], "--candidates: must be at least 1"),
    (["bench-compressed", "--candidates", "-5"], "--candidates: must be at least 1"),
    (["bench-compressed", "--build-examples", "0"], "--build-examples: must be at least 1"),
    (["bench-compressed", "--build-examples", "-3"], "--build-examples: must be at least 1"),
    (["bench-compressed", "--ratios", "abc"], "--ratios: expected a comma list of numbers"),
    (["bench-compressed", "--ratios", "8,0"], "--ratios: every compression ratio must be at least 1"),
])
def test_sizes_and_counts_are_refused_while_parsing(argv, says, capsys):
    """QA 27 #1, #10: --candidates 0/-5 and --build-examples -3 wrote wrong figures (negative times) with exit
    0, --build-examples 0 ended in a ZeroDivisionError traceback after the work, --ratios abc did not name the
    option."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


@pytest.fixture
def no_session(monkeypatch):
    """bench-compressed's session, the start of its work, fails the test if it is reached."""
    def refuse(*a, **kw):
        raise AssertionError("the benchmark's work started")

    monkeypatch.setattr(engine.attribution.session.AttributionSession, "__init__", refuse)


def _lds_file(path: Path, mc: int | None, lds: float | None = 0.4) -> Path:
    path.write_text(json.dumps({"config": {"attribution": {"mc_samples": mc}}, "methods": {"kfac": {"lds": lds}}}))
    return path


def test_bad_options_and_files_are_refused_before_any_work(tmp_path, capsys, no_session):
    """QA 27 #7, #10: an unknown projection was refused after the 32 query gradients; a missing --lds-json (or one
    scored at another M) was silently ignored, leaving the LDS null."""
    common = ["bench-compressed", "--cache-root", str(tmp_path), "--out", str(tmp_path / "o.json")]
    cases = [
        (["--projections", "gaussian,foo"], "error: --projections 'gaussian,foo': expected a comma list of eigen, "
                                            "gaussian (foo unknown)"),
        (["--lds-json", str(tmp_path / "missing.json")], f"error: --lds-json {tmp_path / 'missing.json'} does not exist"),
        (["--lds-json", str(_lds_file(tmp_path / "m16.json", 16))],
         f"error: --lds-json {tmp_path / 'm16.json'} scored K-FAC at M=16, but the stored bank has M=64"),
        (["--lds-json", str(_lds_file(tmp_path / "nolds.json", 64, None))], "holds no K-FAC LDS"),
        (["--lds-partial"], "error: --lds-partial needs --lds-run"),
    ]
    for extra, says in cases:
        assert main([*common, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and err.count("\n") == 1, err


def test_missing_bank_names_the_folder_searched(tmp_path, monkeypatch, capsys):
    """QA 27 #10: with no --cache-root the error said "under None"; it names $ATTRIBUTION_CACHE's folder."""
    monkeypatch.setenv("ATTRIBUTION_CACHE", str(tmp_path / "searched"))
    assert main(["bench-compressed", "--checkpoint", str(DIGITS_CKPT), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"no stored K-FAC bank for M=64 under {tmp_path / 'searched'}:" in err and "None" not in err, err


class _FakeSession:
    """Enough of a session for the LDS run's checks; any method (the benchmark's work) fails the test."""

    checkpoint = DIGITS_CKPT

    def __init__(self, n: int = 32):
        self.items = [type("Item", (), {"image": torch.full((1, 8, 8), i / 100)})() for i in range(n)]

    def gallery(self):
        return self.items

    def method(self, name):
        raise AssertionError("the benchmark's work started")


def _lds_run(folder: Path, images: torch.Tensor | None, k: int = 4) -> Path:
    folder.mkdir()
    np.savez(folder / "subsets.npz", masks=np.ones((k, 10), dtype=bool))
    if images is not None:
        torch.save({"images": images}, folder / "queries.pt")
    return folder


def test_an_lds_run_of_other_queries_is_refused_before_the_benchmark(tmp_path):
    """QA 27 #6: a run of 4 queries failed after the whole benchmark with "The size of tensor a (4) must match
    the size of tensor b (32)"; #7: a missing folder gave a stdout note and a null LDS."""
    from engine.bench.compressed import run_compressed_digits

    s = _FakeSession()
    gallery = torch.stack([it.image for it in s.items])
    few = _lds_run(tmp_path / "few", gallery[:4])
    with pytest.raises(ValueError, match=f"LDS run {few} measured 4 queries, not the 32 gallery images"):
        run_compressed_digits(s, lds_run=few)
    other = gallery.clone()
    other[5] += 1
    with pytest.raises(ValueError, match=r"its queries are not the 32 gallery images \(query 5 differs\)"):
        run_compressed_digits(s, lds_run=_lds_run(tmp_path / "other", other))
    with pytest.raises(ValueError, match="does not exist"):
        run_compressed_digits(s, lds_run=tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no subsets.npz"):
        (tmp_path / "empty").mkdir()
        run_compressed_digits(s, lds_run=tmp_path / "empty")
    # the gallery's own queries pass the checks (and the work starts)
    with pytest.raises(AssertionError, match="work started"):
        run_compressed_digits(s, lds_run=_lds_run(tmp_path / "same", gallery), say=lambda m: None)


@pytest.mark.slow  # 15 s: a tiny checkpoint trained and its K-FAC bank built
def test_bench_compressed_records_the_machine_and_says_what_it_times(tiny_bench_session, tmp_path):
    """QA 27 #8: the JSON said "shared 2-core CPU under heavy load" on any machine and called MiB "mb"; #9: stderr
    was silent for the whole run and each variant's line showed "lds": null although --lds-run was given; #20:
    the damping grid is 49 points plus the chosen damping."""
    from engine.bench.compressed import run_compressed_digits

    events: list[tuple[str, str]] = []
    gallery = torch.stack([torch.as_tensor(it.image) for it in tiny_bench_session.gallery()])
    run = _lds_run(tmp_path / "run", gallery, k=4)  # no subset model trained: the LDS stays null
    rec = run_compressed_digits(tiny_bench_session, ratios=(8.0,), kinds=("gaussian",), candidates=4,
                                build_examples=2, timed_queries=1, rerank_timed=4, lds_run=run,
                                log=lambda m: events.append(("out", m)), say=lambda m: events.append(("err", m)))
    machine = rec["config"]["machine"]
    assert machine["cpu"] and machine["torch_threads"] == torch.get_num_threads() and machine["device"] == "cpu"
    assert "heavy load" not in json.dumps(rec)
    assert rec["config"]["code"] == code_version()  # QA 31b #2: which code made the figures
    (v,) = rec["variants"]
    assert v["bank_mib"] > 0 and rec["full"]["bank_mib"] > v["bank_mib"] and "bank_mb" not in json.dumps(rec)
    assert "49 points and the chosen damping" in rec["config"]["query_ms"]
    assert "50 damped queries (49 grid points and the chosen damping)" in rec["config"]["rerank"]["how"]
    said = [m for kind, m in events if kind == "err"]
    # before the work, on stderr (it was a stdout note after the benchmark), and once
    assert said[0].startswith(f"warning: only 0 of 4 subset models in {run} are trained: the LDS will be left null")
    assert said[1] == "loading the stored K-FAC bank ..." and sum("subset models" in m for m in said) == 1
    assert rec["config"]["lds"] == f"null: only 0 of 4 subset models of {run} were trained"
    timing = next(i for i, (k, m) in enumerate(events) if k == "err" and m.startswith("gaussian 8x: deriving"))
    line = next(i for i, (k, m) in enumerate(events) if k == "out" and m.startswith('{"projection"'))
    assert timing < line  # said before it runs
    assert "lds" not in json.loads(events[line][1])  # not null in the line: the LDS comes after every variant
    assert all("LDS left null" not in m for k, m in events if k == "out")


@pytest.fixture(scope="module")
def tiny_bench_session(tmp_path_factory, digits_small):
    from test_session import TINY_ATTRIBUTION, tiny_checkpoint

    from engine.attribution.session import AttributionSession

    folder = tmp_path_factory.mktemp("qa27_ckpt")
    tiny_checkpoint(folder, digits_small)
    s = AttributionSession("digits", checkpoint=folder, device="cpu", cache_root=tmp_path_factory.mktemp("qa27_c"),
                           dataset=digits_small,
                           config=dataclasses.replace(TINY_ATTRIBUTION, kfac_bank="stored", draws="per-example"))
    s.build(["kfac"])
    return s


def test_readme_names_the_compressed_banks_sizes_in_mib():
    """QA 27 #8: the README's table called the JSON's MiB figures "MB" (the full bank's 486 is 510 MB)."""
    readme = (REPO / "README.md").read_text()
    shipped = json.loads((REPO / "assets" / "results" / "compressed_digits.json").read_text())
    header = next(line for line in readme.splitlines() if line.startswith("| projection | ratio |"))
    assert header.split("|")[3].strip() == "MiB", header
    for v in shipped["variants"]:  # bank_mb in the shipped file (written before the key was named bank_mib)
        row = f"| {v['projection']} | {round(v['ratio']):d}x | {v['bank_mb']:.1f} |"
        assert row in readme, row
    assert f"full stored bank of {shipped['full']['bank_mb']:.0f} MiB" in readme
    # QA 27 #20: bench-scale's paragraphs count the grid as the commands do (49 points and the chosen damping)
    scale = readme[readme.index("**Scale** (`attribution-engine bench-scale --sizes"):]
    scale = scale[:scale.index("**On a GPU**")]
    assert "50 dampings" not in scale and "49 points and the chosen damping" in scale
