"""QA round 27 #11 on bench-foundation: one preset is trained and sampled, and a --checkpoint asked for by name
must load (before any timing)."""

from __future__ import annotations

import pytest

from engine.cli.parser import main
from engine.paths import REPO_ROOT as REPO


@pytest.fixture
def fake_foundation(monkeypatch):
    """bench-foundation with its training and sampling recorded instead of run."""
    import engine.bench.memory as memory
    import engine.model.sampling
    import engine.model.train

    seen: dict[str, str] = {}

    def train(preset, out, device=None, steps=0, progress=None, **kw):
        seen["trained"] = preset.name
        for s in range(steps):
            progress(s, steps, 0.0)

    def generate(model, preset, n, seed=0, device=None, **kw):
        seen["sampled"] = preset.name

    monkeypatch.setattr(engine.model.train, "train", train)
    monkeypatch.setattr(engine.model.sampling, "generate", generate)
    monkeypatch.setattr(memory, "peak_rss_mib", lambda: 1.0)
    return seen


def test_bench_foundation_trains_and_samples_one_preset(fake_foundation, capsys):
    """QA 27 #11: --preset mnist timed digits training but sampled the mnist checkpoint."""
    assert main(["bench-foundation", "--preset", "mnist", "--steps", "2", "--warmup", "1", "--samples", "1",
                 "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert fake_foundation == {"trained": "mnist", "sampled": "mnist"}
    assert "timing 3 training steps of the mnist model" in err and "training mnist:" in out
    assert "1 mnist samples" in out and "assets/mnist" in out


def test_bench_foundation_refuses_a_checkpoint_asked_for_that_does_not_load(fake_foundation, tmp_path, capsys):
    """QA 27 #11: a mistyped --checkpoint silently timed random weights; now an error before any timing (the
    default checkpoint, when absent, still means random weights)."""
    argv = ["bench-foundation", "--steps", "2", "--warmup", "1", "--samples", "1", "--device", "cpu"]
    assert main([*argv, "--checkpoint", str(tmp_path / "nonexistent")]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == f"error: checkpoint folder {tmp_path / 'nonexistent'} does not exist"
    assert out == ""  # QA 29 #6: the parameter table came before the error; now the error stands alone
    assert main([*argv, "--checkpoint", str(REPO / "assets" / "mnist")]) == 2  # another preset's model
    out, err = capsys.readouterr()
    assert "is a mnist model, not digits: give --preset mnist" in err and out == ""
    assert fake_foundation == {}  # nothing was timed
