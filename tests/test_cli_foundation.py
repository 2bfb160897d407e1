"""CLI: ``sample`` writes the right files; every subcommand documents every option; bench-foundation runs."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.cli.parser import build_parser, main
from engine.model.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parent.parent
T = 50


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_preset, tiny_model) -> Path:
    preset = tiny_preset.replace(diffusion={"num_timesteps": T})
    return save_checkpoint(tmp_path / "ckpt", tiny_model, preset)


@pytest.mark.slow
def test_sample_png_and_npz(tmp_path, tiny_ckpt):
    png, npz = tmp_path / "x.png", tmp_path / "x.npz"
    r = _run("sample", "--checkpoint", str(tiny_ckpt), "--n", "4", "--seed", "0", "--out", str(png), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    with Image.open(png) as img:
        assert img.mode == "L" and img.width > 8 * 2 and img.height > 8 * 2
    r = _run("sample", "--checkpoint", str(tiny_ckpt), "--n", "4", "--seed", "0", "--out", str(npz),
             "--trajectory", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    with np.load(npz) as z:
        images, traj, seed = z["images"], z["trajectory"], int(z["seed"])
        from engine.model.checkpoint import checkpoint_hash

        assert str(z["checkpoint"]) == checkpoint_hash(tiny_ckpt)  # which model drew them (QA 26 #9)
    assert images.shape == (4, 1, 8, 8) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1
    assert traj.shape == (4, T + 1, 1, 8, 8) and seed == 0
    # images are the last trajectory state mapped from [-1, 1] to [0, 1]
    assert np.allclose(images, np.clip((traj[:, -1] + 1) / 2, 0, 1), atol=1e-6)
    assert not np.allclose(images[0], images[1])


def test_sample_rejects_bad_output(tmp_path, tiny_ckpt, capsys):
    """Bad --out or --n: one ``error:`` line naming the option and exit status 2, before any sampling."""
    cases = [
        (["--n", "1", "--out", str(tmp_path / "x.jpg")], r"error: --out must end in \.png or \.npz"),
        (["--n", "1", "--out", str(tmp_path / "x.png"), "--trajectory"], "error: --trajectory needs an .npz output"),
        (["--n", "0", "--out", str(tmp_path / "x.png")], "error: --n must be at least 1, got 0"),
        (["--n", "-3", "--out", str(tmp_path / "x.npz")], "error: --n must be at least 1, got -3"),
        # torch seeds are unsigned 64-bit and sample i draws from seed * 1_000_003 + i: no "Overflow" from torch
        (["--n", "2", "--seed", str(10**20), "--out", str(tmp_path / "x.npz")],
         "error: sampling seed must be an integer from 0 to 18446688733643, got 100000000000000000000"),
        (["--n", "1", "--seed", "-1", "--out", str(tmp_path / "x.npz")], "error: sampling seed must be an integer"),
    ]
    for extra, message in cases:
        assert main(["sample", "--checkpoint", str(tiny_ckpt), *extra]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and "%|" not in err, err  # no sampling bar started
    assert not any(tmp_path.glob("x.*"))


def test_largest_sampling_seed_is_usable():
    """The bound is torch's, not an arbitrary one: every generator seed of the largest valid seed is
    accepted by torch, and one more is refused by the check (and would overflow in torch)."""
    import torch

    from engine.model.diffusion import SAMPLE_SEED_STRIDE
    from engine.validation import InvalidSettingError, check_seed

    n = 3
    largest = check_seed((2**64 - n) // SAMPLE_SEED_STRIDE, stride=SAMPLE_SEED_STRIDE, count=n)
    for i in range(n):
        torch.Generator().manual_seed(largest * SAMPLE_SEED_STRIDE + i)
    with pytest.raises(InvalidSettingError, match="from 0 to"):
        check_seed(largest + 1, stride=SAMPLE_SEED_STRIDE, count=n)
    with pytest.raises(ValueError, match="Overflow"):
        torch.Generator().manual_seed((largest + 1) * SAMPLE_SEED_STRIDE + n - 1)


def test_train_index_lists_are_checked(tmp_path, tiny_ckpt, capsys):
    assert main(["train", "--checkpoint", str(tiny_ckpt), "--indices", "1,x", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --indices must be a .npy file or a comma list") and "'1,x'" in err
    np.save(tmp_path / "f.npy", np.array([0.5, 1.0]))
    assert main(["train", "--checkpoint", str(tiny_ckpt), "--exclude", str(tmp_path / "f.npy"),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--exclude" in err and "must hold integers" in err, err
    # a missing or unreadable file: one line naming the flag and the file, not the OS's or numpy's message
    (tmp_path / "text.npy").write_text("0,1,2")
    for name, says in (("absent.npy", "no such file"), ("text.npy", "not a readable .npy array")):
        path = tmp_path / name
        assert main(["train", "--checkpoint", str(tiny_ckpt), "--indices", str(path), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --indices {path}: {says}") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


# options a command parses only to refuse them in words, kept out of its help (QA 27 #12: copy-check listed group's
# --methods, which it refuses: it takes one --method)
REFUSED_IN_WORDS = {("copy-check", ("--methods",))}


def test_every_subcommand_documents_every_option():
    subs = _subparsers(build_parser())
    assert {"train", "sample", "bench-foundation"} <= set(subs)
    for name, p in subs.items():
        text = p.format_help()
        assert p.description or p.format_usage(), name
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if (name, tuple(action.option_strings)) in REFUSED_IN_WORDS:
                assert action.help == argparse.SUPPRESS, name
                continue
            assert action.help and action.help != argparse.SUPPRESS, f"{name}: {action.option_strings or action.dest} has no help"
            for opt in action.option_strings:
                assert opt in text, f"{name} --help does not list {opt}"


def test_help_from_the_command_line():
    r = _run("sample", "--help")
    assert r.returncode == 0, r.stderr
    for opt in ("--checkpoint", "--n", "--seed", "--out", "--trajectory", "--preset", "--device", "--data-root"):
        assert opt in r.stdout


@pytest.mark.slow
def test_bench_foundation_prints_figures(tmp_path, capsys, monkeypatch):
    import json

    import engine.bench.memory as memory
    import engine.cli.common
    import engine.config

    # keep CI fast: the bench code path runs with a few steps, one sample and a 20-step schedule
    monkeypatch.setattr(memory, "peak_rss_mib", lambda: 123.0)
    digits = engine.config.PRESETS["digits"]
    monkeypatch.setitem(engine.config.PRESETS, "digits", digits.replace(diffusion={"num_timesteps": 20}))
    # random weights: the default checkpoint absent (a --checkpoint given by name must exist: QA 27 #11)
    monkeypatch.setattr(engine.cli.common, "default_checkpoint", lambda name: tmp_path / "none")
    rc = main(["bench-foundation", "--steps", "3", "--warmup", "1", "--samples", "1", "--threads", "1",
               "--out", str(tmp_path / "b.json")])
    assert rc == 0
    out, err = capsys.readouterr()
    # what is being timed, said before it runs (QA 25 #11), on stderr
    assert "timing 4 training steps of the digits model (1 warm-up)" in err and "timing the sampling of 1" in err
    for needle in ("parameters digits", "parameters cifar2", "parameters cifar10", "steps/s", "random weights",
                   "with 20 steps", "peak RSS: 123 MiB"):
        assert needle in out, out
    figures = json.loads((tmp_path / "b.json").read_text())
    assert figures["params"]["cifar10"] > 30_000_000 and figures["train_steps_per_s"] > 0
    assert "over 3 steps" in out  # --steps timed steps, not one fewer


def test_bench_foundation_refuses_what_would_fail_after_the_work(tmp_path, capsys):
    """QA round 20: --warmup 0 --steps 1 failed after the run ("no median for empty data") and --json DIR failed
    after it too, naming a temporary file; both are refused before any work."""
    with pytest.raises(SystemExit) as exit_:
        main(["bench-foundation", "--warmup", "0"])
    assert exit_.value.code == 2 and "--warmup: must be at least 1" in capsys.readouterr().err
    assert main(["bench-foundation", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {tmp_path} is a folder; give a file name"
    # --json, the option's first name, is the same option (it took a file name, unlike the query commands' --json)
    assert main(["bench-foundation", "--json", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {tmp_path} is a folder; give a file name"


def test_assets_on_a_model_without_a_quality_check_says_what_it_wrote(tmp_path, tiny_preset, capsys):
    """``assets`` on an image-folder model printed "{}" alone (QA 16): it names the files it wrote, and says
    why there is no sample-quality report."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(tmp_path / "data" / label / f"{i}.png")
    preset = tiny_preset.replace(
        name="mine", data={"name": "folder", "root": str(tmp_path / "data"), "levels": 256},
        diffusion={"num_timesteps": 20}, train={"steps": 2, "batch_size": 4},
    )
    (tmp_path / "mine.json").write_text(preset.to_json())
    ckpt = tmp_path / "ckpt"
    assert main(["train", "--preset", str(tmp_path / "mine.json"), "--out", str(ckpt), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "s this run)" in out
    # what it trains on, before it trains (QA 33: a skipped file went unseen)
    assert f"data: 12 images of 1x8x8, 2 classes (folder:data from {tmp_path / 'data'})" in out.splitlines()[0]
    # 2 steps: the saved average is nearly the random start, and the command says so (QA 26 #10)
    assert "warning: the saved weights are an exponential moving average (train.ema_decay 0.999) that still " \
           "holds 100% of the random initial weights after 2 steps" in err
    # again: the finished run is kept, and the output says so (QA round 22: it looked like a 3 s training)
    assert main(["train", "--preset", str(tmp_path / "mine.json"), "--out", str(ckpt), "--device", "cpu"]) == 0
    assert "a finished run with these settings and data: nothing to train" in capsys.readouterr().out
    assert main(["assets", "--preset", str(tmp_path / "mine.json"), "--checkpoint", str(ckpt), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "sample grid (64)" in err and "gallery (32 with trajectories)" in err  # each bar says what it draws
    for name in ("gallery.npz", "samples_grid.png", "train_loss.png"):
        assert f"wrote {ckpt / name}\n" in out and (ckpt / name).is_file(), out
    assert "no sample-quality report" in out and "{}" not in out and not (ckpt / "sample_quality.json").exists()


def test_the_ema_note_names_the_steps_that_leave_a_twentieth_of_the_start():
    from engine.cli.model import ema_start_share_note

    assert "holds 74% of the random initial weights after 300 steps" in ema_start_share_note(300, 0.999)
    assert "train for 2,995 steps or more" in ema_start_share_note(300, 0.999)  # 0.999 ** 2995 < 0.05
    assert ema_start_share_note(2995, 0.999) is None and ema_start_share_note(6000, 0.999) is None
    assert ema_start_share_note(10, 0.0) is None and ema_start_share_note(10, None) is None  # no average


def test_the_data_line_counts_classes_in_words():
    """One class is "1 class" (QA 41: a folder with one class folder said "1 classes"); no labels, "unlabelled"."""
    import torch

    from engine.cli.model import data_summary
    from engine.model.dataset import ImageDataset

    def dataset(labels):
        return ImageDataset("folder_x", torch.zeros(3, 1, 4, 4), labels, None, ["a", "b", "c"], 256)

    assert "3 images of 1x4x4, 1 class (folder_x from /d)" in data_summary(dataset(torch.tensor([2, 2, 2])), "/d")
    assert ", 2 classes (" in data_summary(dataset(torch.tensor([0, 1, 1])), None)
    assert ", unlabelled (" in data_summary(dataset(None), None)
