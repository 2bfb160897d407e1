"""QA 54 F3: the app takes the CLI's attribution-setting flags (``--mc-samples``, ``--kfac-bank``, ...), so a server
started with a build's flags reads the caches that build made instead of building again at the preset's M."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import SETTING_FLAGS
from explorer.app_flags import parse_args

ROOT = Path(__file__).resolve().parents[1]


def _run_launcher(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTRIBUTION_")}
    return subprocess.run([sys.executable, "-m", "explorer", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_help_lists_every_attribution_setting_flag_with_the_clis_help():
    done = _run_launcher("--help")
    assert done.returncode == 0, done.stderr
    for flag in SETTING_FLAGS.values():
        assert flag in done.stdout, flag
    text = " ".join(done.stdout.split())
    assert "Monte Carlo draws M of (t, eps) per example" in text  # build's own help text
    assert "they apply to the served model" in text


def test_parse_args_gives_the_settings_in_the_sessions_config():
    from engine.attribution.setting_flags import apply_settings
    from engine.config import get_preset

    args = parse_args(["--preset", "digits", "--mc-samples", "1", "--kfac-bank", "compressed", "--draws", "shared",
                       "--kfac-rerank", "0", "--attribution-seed", "3"], env={})
    assert args.setting_changes() == {"mc_samples": 1, "kfac_bank": "compressed", "draws": "shared",
                                      "kfac_rerank": 0, "seed": 3}
    config = apply_settings(get_preset("digits").attribution, args.setting_changes())
    assert (config.mc_samples, config.kfac_bank, config.draws, config.kfac_rerank, config.seed) == (
        1, "compressed", "shared", 0, 3)
    assert config.kfac_factor_draws is None  # the CLI's rule: shared draws take the factors from all M
    assert parse_args([], env={}).settings == ()  # `make run`: the preset's own settings, as before
    hash(args)  # the server's cached-session key


@pytest.mark.parametrize(("args", "words"), [
    (["--mc-samples", "0"], "error: attribution.mc_samples (--mc-samples) must be at least 1, got 0"),
    # the shipped kinds first, then any a contributor's file adds (QA 70 F2: the whole list was pinned)
    (["--kfac-bank", "bogus"], ("error: attribution.kfac_bank must be one of auto, stored, streamed, compressed",
                                "got 'bogus'")),
    (["--kfac-compression", "0.5"], "error: attribution.kfac_compression (--kfac-compression) must be finite and "
                                    ">= 1, got 0.5"),
    (["--mc-samples", "x"], "error: argument --mc-samples: invalid int value: 'x'"),
    (["--draws", "bogus"], "error: argument --draws: invalid choice: 'bogus'"),
])
def test_an_invalid_value_gives_the_clis_message(args, words):
    parts = (words,) if isinstance(words, str) else words
    cli = subprocess.run([sys.executable, "-m", "engine", "query", "--query", "gallery:0", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and all(w in cli.stderr for w in parts), cli.stderr  # the CLI's own words, here too
    done = _run_launcher(*args)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m explorer: ") and all(w in lines[0] for w in parts), \
        done.stderr


def test_the_flags_turn_the_sidebars_model_switch_off():
    from explorer import runtime

    with_flag = parse_args(["--mc-samples", "8"], env={})
    assert runtime.model_choices(with_flag) == []
    assert runtime.model_choices(parse_args([], env={})) == runtime.model_choices(parse_args(["--preset", "digits"],
                                                                                             env={}))


@pytest.mark.slow
def test_a_server_with_a_builds_flags_finds_that_builds_caches(tmp_path_factory, tmp_path):
    """``build --mc-samples 1 --kfac-bank compressed``, then the app with the same flags: every cache is there (no
    build to start), the gallery's precomputed scores (of the preset's settings) are not taken for these, and the
    commands the app prints name the settings."""
    import torch
    from test_app import shared_tiny_app

    from engine.cli.parser import main
    from explorer import runtime

    torch.set_num_threads(1)
    env = shared_tiny_app(tmp_path_factory)
    preset, ckpt, cache = env["ATTRIBUTION_PRESET"], env["ATTRIBUTION_CHECKPOINT"], str(tmp_path / "cache")
    flags = ["--mc-samples", "1", "--kfac-bank", "compressed"]
    assert main(["build", "--preset", preset, "--checkpoint", ckpt, "--cache-root", cache, "--device", "cpu",
                 *flags]) == 0

    plain = runtime._make_handle(parse_args(["--preset", preset, "--checkpoint", ckpt, "--cache", cache,
                                             "--device", "cpu"], env={}))
    assert not plain.session.status(["kfac"])["kfac"]["built"]  # the preset's M: these caches are not its own

    handle = runtime._make_handle(parse_args(["--preset", preset, "--checkpoint", ckpt, "--cache", cache,
                                              "--device", "cpu", *flags], env={}))
    config = handle.session.config
    assert (config.mc_samples, config.kfac_bank) == (1, "compressed")
    status = handle.session.status()
    assert all(s["built"] for s in status.values() if s["available"]), status
    runtime.start_build(handle)
    handle.worker._thread.join(timeout=120)
    assert handle.build.status == "done" and not handle.build.summary, handle.build
    command = handle.session.build_command(["kfac"])
    assert "--mc-samples 1 --kfac-bank compressed" in command, command
    if handle.precomputed is not None:  # scores precomputed at the preset's settings are not these settings'
        assert "kfac" not in handle.precomputed.methods_for(handle.session)


def test_the_shipped_gallerys_precomputed_scores_are_not_shown_as_other_settings(tmp_path):
    """`make run` (no flags) keeps the shipped precomputed gallery scores; a server with other settings does not take
    the influence methods' scores (computed at the preset's) as its own, and says why (``mismatch``)."""
    import torch

    from explorer import runtime

    torch.set_num_threads(1)
    shipped = runtime._make_handle(parse_args(["--cache", str(tmp_path), "--device", "cpu"], env={}))
    assert {"kfac", "trak", "dtrak", "pixel"} <= set(shipped.precomputed.methods_for(shipped.session))
    other = runtime._make_handle(parse_args(["--cache", str(tmp_path), "--device", "cpu", "--mc-samples", "1",
                                             "--kfac-bank", "compressed"], env={}))
    matching = other.precomputed.methods_for(other.session)
    assert not {"kfac", "trak", "dtrak"} & set(matching), matching
    for name in ("kfac", "trak", "dtrak"):  # the page's words for the left-out figure: the draws, not the model
        assert "other query-gradient draws" in other.precomputed.mismatch(other.session, name), name
    # pixel similarity takes no gradient: its precomputed scores hold at any M
    assert "pixel" in matching and other.precomputed.mismatch(other.session, "pixel") is None
