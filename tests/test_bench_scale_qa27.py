"""QA round 27's findings on bench-scale: sizes and batches refused while parsing, no options that do nothing,
progress on stderr before each timed part, no torch warnings, no "None s", one count for the damping grid."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from engine.cli.parser import build_parser
from engine.paths import REPO_ROOT as REPO


@pytest.mark.parametrize(("argv", "says"), [
    (["bench-scale", "--grad-batch", "0"], "--grad-batch: must be at least 1"),
    (["bench-scale", "--jvp-batch", "0"], "--jvp-batch: must be at least 1"),
    (["bench-scale", "--factor-rows", "-3"], "--factor-rows: must be at least 0"),
    (["bench-scale", "--ratio", "0.5"], "--ratio: a compression ratio must be at least 1"),
    (["bench-scale", "--ratio", "abc"], "--ratio: expected a number"),
    # bench-scale's --preset, --checkpoint and --data-root did nothing (QA 27 #11): no longer options
    (["bench-scale", "--preset", "mnist"], "unrecognized arguments: --preset"),
    (["bench-scale", "--checkpoint", "/nonexistent"], "unrecognized arguments: --checkpoint"),
    (["bench-scale", "--data-root", "/nonexistent"], "unrecognized arguments: --data-root"),
])
def test_sizes_and_batches_are_refused_while_parsing(argv, says, capsys):
    """QA 27 #5: --grad-batch 0 ended in a "stack expects a non-empty TensorList" traceback after 11 s, and
    --factor-rows -3 was taken as "not timed"."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_bench_scale_keeps_its_device_option():
    args = build_parser().parse_args(["bench-scale", "--device", "cpu", "--grad-batch", "3", "--factor-rows", "0"])
    assert (args.device, args.grad_batch, args.factor_rows, args.ratio) == ("cpu", 3, 0, 128.0)


SCALE_SCRIPT = textwrap.dedent("""
    import sys
    import engine.bench.scale as scale
    from engine.config import ModelConfig
    from engine.cli import main

    # the CIFAR preset's shapes (3x32x32) on a tiny U-Net, so that the run takes seconds
    tiny = ModelConfig(image_size=32, in_channels=3, base_channels=8, channel_mults=(1, 1), num_res_blocks=1,
                       attn_resolutions=(16,), num_groups=4)
    scale.PRESETS = {"cifar10": scale.PRESETS["cifar10"].replace(model=tiny)}
    sys.exit(main(["bench-scale", "--device", "cpu", "--sizes", "1", "--scan-sizes", "4", "--grad-batch", "1",
                   "--jvp-batch", "1", "--out", sys.argv[1]]))
""")


@pytest.mark.slow  # 8 s: a fresh process
def test_bench_scale_says_what_it_times_and_shows_no_torch_warnings(tmp_path):
    """QA 27 #9: bench-scale was silent on stderr for 25 s, then said what it had timed on stdout; #19: "None s per
    (example, draw) row", torch's raw torch.jit.script FutureWarning (from torch.func's first jvp) and its
    requires_grad-to-scalar warning in the product's "warning:" form (our float() of a tensor that required
    grad).  A fresh process: the jit notice comes only at the first jvp of a process."""
    r = subprocess.run([sys.executable, "-c", SCALE_SCRIPT, str(tmp_path / "s.json")], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr.lower() and "jit" not in r.stderr, r.stderr
    said = r.stderr.splitlines()
    assert said[0].startswith("building the CIFAR-preset U-Net on cpu")
    for part in ("timing per-example gradients", "timing forward-mode", "timing the compressed bank's build at N=1",
                 "timing the compressed scan of N=4", "timing the stored bank's scan", "timing one query's rotation"):
        assert any(line.startswith(part) for line in said), (part, said)
    assert "None" not in r.stdout and "factor pass not timed (--factor-rows 0)" in r.stdout
    assert "x 50 dampings, once per query: the 49 grid points and the chosen damping" in r.stdout
    assert not any(line.startswith("timing") for line in r.stdout.splitlines())  # stdout keeps the results
    assert json.loads((tmp_path / "s.json").read_text())["forward_mode_rerank"]["check_rel_err"] < 1e-3


def test_bench_scale_sizes_are_binary_and_its_peak_memory_is_the_benches_one(monkeypatch):
    """QA 31b #7: bench-scale had its own ru_maxrss reader without memory.peak_rss_mib's macOS branch (ru_maxrss is
    bytes there: 1024x too much), and one bank size in three conventions: printed in MB (1e6 bytes), recorded as
    bank_mb (2**20) and bank_gb (1e9).  Now every size is binary (MiB, GiB), the keys keep their shipped names and
    the record says their units."""
    import engine.bench.scale as scale
    from engine.code_version import code_version
    from engine.config import ModelConfig

    tiny = ModelConfig(image_size=32, in_channels=3, base_channels=8, channel_mults=(1, 1), num_res_blocks=1,
                       attn_resolutions=(16,), num_groups=4)
    monkeypatch.setattr(scale, "PRESETS", {"cifar10": scale.PRESETS["cifar10"].replace(model=tiny)})
    monkeypatch.setattr(scale, "peak_rss_mib", lambda: 42.0)  # the benches' one reader (memory.peak_rss_mib)
    lines: list[str] = []
    rec = scale.run_bench_scale(sizes=(1,), scan_sizes=(4,), grad_batch=1, jvp_batch=1, log=lines.append,
                                say=lambda _: None)
    assert {v for k, v in rec["peak_memory"].items() if k.endswith("rss_mb")} == {42.0}
    assert [b["peak_rss_mb"] for b in rec["compressed_builds"]] == [42.0]
    per_example = rec["bytes_per_example"]
    for projected in rec["projected"]:
        for kind in ("stored", "compressed"):
            assert projected["bank_gb"][kind] == pytest.approx(projected["num_examples"] * per_example[kind] / 2**30)
    assert rec["config"]["code"] == code_version()  # QA 31b #2: which code made the figures
    assert rec["config"]["units"]["_gb keys"].startswith("GiB") and rec["config"]["units"]["_mb keys"].startswith("MiB")
    text = "\n".join(lines)
    assert " MB" not in text and " KB" not in text and " GB" not in text
    sizes = next(line for line in lines if "bank bytes per example" in line)
    assert f"stored {per_example['stored'] / 2**20:.1f} MiB, compressed {per_example['compressed'] / 2**10:.1f} KiB" \
        in sizes
