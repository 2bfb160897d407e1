"""Interrupted builds resume and give the caches of an uninterrupted build, byte for byte.

Covers the three long passes of a cold build: the K-FAC factor pass (checkpointed running
sums + label generator, ``engine.attribution.pass_checkpoint``), the K-FAC bank pass and the TRAK pass
(chunked parts, ``Store.partial``).  Interruptions are injected exceptions at a chosen point,
and one real ``kill -9`` of a subprocess in the middle of the factor pass.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from engine.attribution.context import make_context
from engine.attribution.curvature import compute_kfac
from engine.attribution.gradients import influence_params
from engine.attribution.methods.kfac_influence import FACTORS, KFACInfluence
from engine.attribution.methods.trak import TRAK
from engine.attribution.pass_checkpoint import PassCheckpoint
from engine.attribution.store import Store
from engine.config import AttributionConfig
from engine.model.diffusion import make_draws

ROOT = Path(__file__).resolve().parent.parent


class _Stop(Exception):
    pass


def _stop_after(predicate):
    def progress(msg: str, frac: float) -> None:
        if predicate(msg, frac):
            raise _Stop(msg)

    return progress


def _arrays_bytes(store_root: Path) -> dict[str, bytes]:
    """Every published .npy under a cache root (settings.json holds timings, so it is left out)."""
    out = {}
    for p in sorted(store_root.rglob("*.npy")):
        rel = p.relative_to(store_root)
        if any(part.startswith(".") for part in rel.parts):
            continue  # partial or temporary folders
        out[str(rel)] = p.read_bytes()
    return out


def test_factor_pass_resumes_at_its_checkpoint_with_identical_factors(tmp_path, tiny_model, diffusion, digits_small):
    params = influence_params(tiny_model)
    x = digits_small.images[:12]
    draws = make_draws(4, (1, 8, 8), diffusion.T, seed=0)  # 48 rows, batches of 8, checkpoint every 16
    kw = dict(batch_size=8, seed=3)
    want = compute_kfac(tiny_model, diffusion, x, draws, params, **kw).to_arrays()

    ckpt = PassCheckpoint(tmp_path / "factors.pt")
    stop = _stop_after(lambda msg, f: "40/48" in msg)
    with pytest.raises(_Stop):
        compute_kfac(tiny_model, diffusion, x, draws, params, progress=stop, checkpoint=ckpt, checkpoint_rows=16, **kw)
    assert ckpt.path.is_file()
    seen: list[str] = []
    got = compute_kfac(
        tiny_model, diffusion, x, draws, params, progress=lambda m, f: seen.append(m),
        checkpoint=ckpt, checkpoint_rows=16, **kw,
    ).to_arrays()
    assert seen[0] == "K-FAC factors: resuming at row 32/48 saved by an earlier run"  # it says so (QA round 21)
    # rows 0-31 were not recomputed: the count starts at them (rows finished, QA 54 F6a) and moves on from them
    assert seen[1] == "K-FAC factors: 32/48 (example, draw) rows"
    assert seen[2].startswith("K-FAC factors: 40/48")
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].tobytes() == got[k].tobytes(), k


def test_a_factor_pass_is_saved_by_time_too_and_resumes_exactly(tmp_path, tiny_model, diffusion, digits_small):
    """QA 30c: a checkpoint every 8,192 rows alone meant minutes between saves on a busy machine, and a Ctrl-C
    before the first lost the whole pass (6,144 digits rows after 73 s).  A save also comes ``checkpoint_seconds``
    after the last one, at a batch's end: an exact resume point, so the factors are still the same bytes."""
    params = influence_params(tiny_model)
    x = digits_small.images[:12]
    draws = make_draws(4, (1, 8, 8), diffusion.T, seed=0)  # 48 rows, batches of 8
    kw = dict(batch_size=8, seed=3)
    want = compute_kfac(tiny_model, diffusion, x, draws, params, **kw).to_arrays()
    stop = _stop_after(lambda msg, f: "32/48" in msg)
    rows_only = PassCheckpoint(tmp_path / "rows.pt")
    with pytest.raises(_Stop):  # the rows rule alone: no save before row 10**6, so nothing to resume from
        compute_kfac(tiny_model, diffusion, x, draws, params, progress=stop, checkpoint=rows_only,
                     checkpoint_rows=10**6, **kw)
    assert not rows_only.path.exists()
    timed = PassCheckpoint(tmp_path / "timed.pt")
    with pytest.raises(_Stop):  # every batch end is due at 0 s
        compute_kfac(tiny_model, diffusion, x, draws, params, progress=stop, checkpoint=timed,
                     checkpoint_rows=10**6, checkpoint_seconds=0.0, **kw)
    seen: list[str] = []
    got = compute_kfac(tiny_model, diffusion, x, draws, params, progress=lambda m, f: seen.append(m),
                       checkpoint=timed, checkpoint_rows=10**6, checkpoint_seconds=3600.0, **kw).to_arrays()
    # saved at a batch end before the stop (at 0 s every batch is due, unless the last save's own cost says wait:
    # a timed save waits 20 times what the last one took)
    assert re.fullmatch(r"K-FAC factors: resuming at row (8|16|24)/48 saved by an earlier run", seen[0]), seen[:2]
    for k in want:
        assert want[k].tobytes() == got[k].tobytes(), k


def test_a_resumed_factor_pass_runs_at_the_thread_count_of_its_saved_rows(tmp_path, tiny_model, diffusion,
                                                                          digits_small):
    """Reductions split across threads round differently, so a pass killed at 1 thread and resumed at 2 gave
    factors equal to neither uninterrupted pass (QA round 21, digits: relative L2 1.6e-5).  The checkpoint
    records the count; the rest of the pass runs at it, and torch's own count is given back afterwards."""
    import torch

    params = influence_params(tiny_model)
    x = digits_small.images[:12]
    draws = make_draws(4, (1, 8, 8), diffusion.T, seed=0)
    kw = dict(batch_size=8, seed=3)
    ckpt = PassCheckpoint(tmp_path / "factors.pt")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with pytest.raises(_Stop):
            compute_kfac(tiny_model, diffusion, x, draws, params, progress=_stop_after(lambda m, f: "40/48" in m),
                         checkpoint=ckpt, checkpoint_rows=16, **kw)
        torch.set_num_threads(2)
        during: list[tuple[str, int]] = []
        compute_kfac(tiny_model, diffusion, x, draws, params, checkpoint=ckpt, checkpoint_rows=16,
                     progress=lambda m, f: during.append((m, torch.get_num_threads())), **kw)
        assert during[0] == ("K-FAC factors: resuming at row 32/48 saved by an earlier run, at the 1 thread(s) it "
                             "ran with", 1)
        assert {n for _, n in during[:-1]} == {1}  # every batch after the resume, at the saved count
        assert torch.get_num_threads() == 2  # given back
    finally:
        torch.set_num_threads(before)


def test_ekfac_correction_pass_resumes_at_its_checkpoint(tmp_path, tiny_model, diffusion, digits_small):
    """A kill in EK-FAC's second pass (the eigenvalue correction) keeps the finished factor pass and
    the correction rows already done: the rerun starts at the correction's checkpoint, with the
    same corrected eigenvalues as an uninterrupted build."""
    params = influence_params(tiny_model)
    x = digits_small.images[:12]
    draws = make_draws(4, (1, 8, 8), diffusion.T, seed=0)  # 48 rows per pass
    kw = dict(batch_size=8, seed=3, ekfac=True)
    want = compute_kfac(tiny_model, diffusion, x, draws, params, **kw).to_arrays()
    assert any(k.endswith("ekfac_weight") for k in want)

    ckpt = PassCheckpoint(tmp_path / "factors.pt")
    with pytest.raises(_Stop):
        compute_kfac(
            tiny_model, diffusion, x, draws, params, checkpoint=ckpt, checkpoint_rows=16,
            progress=_stop_after(lambda m, f: m.startswith("EK-FAC eigenvalues: 40/48")), **kw,
        )
    assert ckpt.path.is_file() and ckpt.part("ekfac").path.is_file()
    seen: list[str] = []
    got = compute_kfac(
        tiny_model, diffusion, x, draws, params, progress=lambda m, f: seen.append(m),
        checkpoint=ckpt, checkpoint_rows=16, **kw,
    ).to_arrays()
    assert not any(m.startswith("K-FAC factors: 8/48") for m in seen)  # the factor pass was not redone
    ekfac_lines = [m for m in seen if m.startswith("EK-FAC")]
    assert ekfac_lines[0] == "EK-FAC eigenvalues: resuming at row 32/48 saved by an earlier run"
    assert ekfac_lines[1] == "EK-FAC eigenvalues: 32/48 (example, draw) rows"  # rows finished (QA 54 F6a)
    assert ekfac_lines[2].startswith("EK-FAC eigenvalues: 40/48")
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].tobytes() == got[k].tobytes(), k
    ckpt.clear()
    assert not ckpt.path.exists() and not ckpt.part("ekfac").path.exists()


def test_factor_checkpoint_of_other_settings_is_ignored(tmp_path, tiny_model, diffusion, digits_small):
    params = influence_params(tiny_model)
    x = digits_small.images[:8]
    draws = make_draws(2, (1, 8, 8), diffusion.T, seed=0)
    ckpt = PassCheckpoint(tmp_path / "factors.pt")
    with pytest.raises(_Stop):
        compute_kfac(
            tiny_model, diffusion, x, draws, params, batch_size=4, seed=1,
            progress=_stop_after(lambda m, f: "12/16" in m), checkpoint=ckpt, checkpoint_rows=4,
        )
    seen: list[str] = []
    other = compute_kfac(
        tiny_model, diffusion, x, draws, params, batch_size=4, seed=2,
        progress=lambda m, f: seen.append(m), checkpoint=ckpt, checkpoint_rows=4,
    )
    assert seen[0] == "K-FAC factors: 0/16 (example, draw) rows"  # another seed: started from scratch
    fresh = compute_kfac(tiny_model, diffusion, x, draws, params, batch_size=4, seed=2)
    for k, v in fresh.to_arrays().items():
        np.testing.assert_array_equal(v, other.to_arrays()[k])


def _kfac_ctx(root: Path, preset, model, data, config):
    store = Store(root, "0" * 16, "digits16")
    return make_context(preset, model, data, "cpu", config, "0" * 16, store)


def _trak(config) -> TRAK:
    m = TRAK(config)
    m.part_size = 4  # parts of 4 examples: a 10-example build has three to resume from
    return m


def _kfac(config) -> KFACInfluence:
    m = KFACInfluence(config)
    m.factor_batch, m.checkpoint_rows, m.chunk_size = 8, 16, 4
    return m


@pytest.mark.parametrize("where", ["factors", "bank"])
def test_kfac_build_interrupted_gives_the_same_cache(tmp_path, tiny_preset, tiny_model, digits_small, where):
    cfg = AttributionConfig(mc_samples=3, seed=0)
    data = digits_small.subset(list(range(10)))
    ref_ctx = _kfac_ctx(tmp_path / "ref", tiny_preset, tiny_model, data, cfg)
    _kfac(cfg).build(ref_ctx)

    ctx = _kfac_ctx(tmp_path / "cut", tiny_preset, tiny_model, data, cfg)
    if where == "factors":  # 30 rows: stop after the checkpoint at row 16
        stop = _stop_after(lambda m, f: "24/30" in m)
    else:  # bank chunks of 4 examples: stop after the first chunk was saved
        stop = _stop_after(lambda m, f: "train gradients 8/10" in m)
    with pytest.raises(_Stop):
        _kfac(cfg).build(ctx, stop)
    method = _kfac(cfg)
    assert not method.is_built(ctx)
    seen: list[str] = []
    method.build(ctx, lambda m, f: seen.append(m))
    if where == "factors":
        assert any("24/30" in m for m in seen) and not any("8/30" in m for m in seen)
    else:
        assert not any("rows" in m for m in seen)  # factors were published before the cut
        assert not any("train gradients 4/10" in m for m in seen)  # chunk 0 was kept
        assert any("resuming: 4/10 examples saved" in m for m in seen)  # and the build says so
    assert not PassCheckpoint.for_store(ctx.store, FACTORS, method.factor_settings(ctx)).path.exists()
    ref, got = _arrays_bytes(tmp_path / "ref"), _arrays_bytes(tmp_path / "cut")
    assert ref.keys() == got.keys() and len(ref) > 3
    for k in ref:
        assert ref[k] == got[k], k


@pytest.mark.parametrize("where", ["factors", "bank"])
def test_a_resumed_build_records_the_seconds_of_its_earlier_attempts(tmp_path, tiny_preset, tiny_model, digits_small,
                                                                    where):
    """``build_seconds`` of a resumed build counted only its last attempt; it counts the earlier ones up to
    their last checkpoint (factor pass) or saved part (bank) as well."""
    import time

    cfg = AttributionConfig(mc_samples=3, seed=0)
    data = digits_small.subset(list(range(10)))
    ctx = _kfac_ctx(tmp_path / "cut", tiny_preset, tiny_model, data, cfg)
    slow, cut = ("8/30", "24/30") if where == "factors" else ("train gradients 4/10", "train gradients 8/10")

    def first_attempt(msg: str, frac: float) -> None:
        if slow in msg:
            time.sleep(1.5)  # before the checkpoint at row 16 / the first saved part
        if cut in msg:
            raise _Stop(msg)

    with pytest.raises(_Stop):
        _kfac(cfg).build(ctx, first_attempt)
    method = _kfac(cfg)
    method.build(ctx)
    key = (FACTORS, method.factor_settings(ctx)) if where == "factors" else method._bank_key(ctx)
    assert ctx.store.load_meta(*key)["build_seconds"] >= 1.5


def test_trak_build_interrupted_gives_the_same_cache(tmp_path, tiny_preset, tiny_model, digits_small):
    cfg = AttributionConfig(mc_samples=2, seed=0, trak_dim=16)
    data = digits_small.subset(list(range(10)))
    ref_ctx = _kfac_ctx(tmp_path / "ref", tiny_preset, tiny_model, data, cfg)
    ref = _trak(cfg)
    ref.build(ref_ctx)
    ctx = _kfac_ctx(tmp_path / "cut", tiny_preset, tiny_model, data, cfg)
    cut = _trak(cfg)
    with pytest.raises(_Stop):
        cut.build(ctx, _stop_after(lambda m, f: "8/10" in m))
    seen: list[str] = []
    again = _trak(cfg)
    again.build(ctx, lambda m, f: seen.append(m))
    assert seen[0].endswith("resuming: 8/10 examples saved by an earlier run")  # parts 0 and 1 kept
    assert seen[1].endswith("projected gradients 10/10")  # part 2 alone computed
    a, b = _arrays_bytes(tmp_path / "ref"), _arrays_bytes(tmp_path / "cut")
    assert a.keys() == b.keys() and len(a) >= 4
    for k in a:
        assert a[k] == b[k], k


_CHILD = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from conftest import TINY_MODEL
    from engine.config import AttributionConfig, Preset, DataConfig
    from engine.attribution.context import make_context
    from engine.model.data import load_digits
    from engine.attribution.methods.kfac_influence import KFACInfluence
    from engine.attribution.store import Store
    from engine.model.unet import build_model
    torch.manual_seed(0)
    model = build_model(TINY_MODEL).eval()
    data = load_digits().subset(list(range(16)))
    cfg = AttributionConfig(mc_samples=8, seed=0)
    preset = Preset(name="tiny", model=TINY_MODEL, data=DataConfig(name="digits"))
    ctx = make_context(preset, model, data, "cpu", cfg, "0" * 16, Store(sys.argv[1], "0" * 16, "d16"))
    m = KFACInfluence(cfg)
    m.factor_batch, m.checkpoint_rows, m.chunk_size = 8, 16, 8
    m.build(ctx, lambda msg, f: print(msg, flush=True))
    print("BUILT", flush=True)
    """
)


@pytest.mark.slow
def test_kill_9_during_the_factor_pass_then_rerun(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(root=str(ROOT), tests=str(ROOT / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    ref = subprocess.run([sys.executable, str(script), str(tmp_path / "ref")], env=env, capture_output=True, text=True)
    assert "BUILT" in ref.stdout, ref.stderr[-2000:]

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, str(script), str(cut)], env=env, stdout=subprocess.PIPE, text=True)
    killed_at = None
    assert proc.stdout is not None
    for line in proc.stdout:  # 128 rows; kill after a checkpoint exists, in the middle of the pass
        if "rows" in line and list(cut.rglob(".resume-*.pt")) and int(line.split("/")[0].split()[-1]) >= 64:
            killed_at = line.strip()
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL
    again = subprocess.run([sys.executable, str(script), str(cut)], env=env, capture_output=True, text=True)
    assert "BUILT" in again.stdout, again.stderr[-2000:]
    first = next(line for line in again.stdout.splitlines() if "rows" in line)
    assert not first.startswith("K-FAC Influence: K-FAC factors: 8/"), first  # resumed, not restarted
    a, b = _arrays_bytes(tmp_path / "ref"), _arrays_bytes(cut)
    assert a.keys() == b.keys() and len(a) > 3
    for k in a:
        assert a[k] == b[k], k


def test_kfac_bank_pass_feeds_trak(tmp_path, tiny_preset, tiny_model, digits_small, monkeypatch):
    """One training-gradient pass for both caches: TRAK's build then computes no gradient at all."""
    import engine.attribution.gradients as gradients

    cfg = AttributionConfig(mc_samples=2, seed=0, trak_dim=16)
    data = digits_small.subset(list(range(10)))
    alone_ctx = _kfac_ctx(tmp_path / "alone", tiny_preset, tiny_model, data, cfg)
    alone = _trak(cfg)
    alone.build(alone_ctx)

    ctx = _kfac_ctx(tmp_path / "shared", tiny_preset, tiny_model, data, cfg)
    trak = _trak(cfg)
    kfac = _kfac(cfg)
    sink = trak.feature_sink(ctx)
    kfac.gradient_consumers = [sink]
    kfac.build(ctx)
    assert sink.saved == [0, 1, 2] and kfac.gradient_consumers == []

    def no_gradients(*a, **k):
        raise AssertionError("TRAK recomputed training gradients")

    monkeypatch.setattr(gradients, "train_loss_grads", no_gradients)
    trak.build(ctx)
    np.testing.assert_allclose(trak.train_features(ctx), alone.train_features(alone_ctx), rtol=1e-5, atol=1e-6)
    assert trak.feature_sink(ctx) is None  # built: nothing to feed


def test_kfac_bank_pass_feeds_trak_and_dtrak(tmp_path, tiny_preset, tiny_model, digits_small, monkeypatch):
    """``share_gradient_passes``: the bank's pass feeds TRAK (loss gradients) and D-TRAK (square-norm
    gradients from the same forward); neither computes a gradient afterwards, both equal their own
    builds, and the bank equals one built alone."""
    import engine.attribution.gradients as gradients
    from engine.attribution.caches import MethodCaches
    from engine.attribution.methods.trak import DTRAK

    cfg = AttributionConfig(mc_samples=2, seed=0, trak_dim=16, draws="per-example")
    data = digits_small.subset(list(range(10)))

    def dtrak() -> DTRAK:
        m = DTRAK(cfg)
        m.part_size = 4
        return m

    alone_ctx = _kfac_ctx(tmp_path / "alone", tiny_preset, tiny_model, data, cfg)
    alone = {"kfac": _kfac(cfg), "trak": _trak(cfg), "dtrak": dtrak()}
    for m in alone.values():
        m.build(alone_ctx)

    ctx = _kfac_ctx(tmp_path / "shared", tiny_preset, tiny_model, data, cfg)
    shared = {"kfac": _kfac(cfg), "trak": _trak(cfg), "dtrak": dtrak()}
    caches = MethodCaches(shared, ctx, lambda names: "build " + ",".join(names))
    assert caches.share_gradient_passes(["kfac", "trak", "dtrak"]) == {"kfac": ["trak", "dtrak"]}
    assert [s.loss for s in shared["kfac"].gradient_consumers] == ["loss", "square-norm"]
    assert caches.share_gradient_passes(["kfac"]) == {}  # what the session's build of one method calls
    assert len(shared["kfac"].gradient_consumers) == 2  # ... keeps the sinks set up for all of them
    shared["kfac"].build(ctx)

    def no_gradients(*a, **k):
        raise AssertionError("a fed method recomputed training gradients")

    monkeypatch.setattr(gradients, "train_loss_grads", no_gradients)
    for name in ("trak", "dtrak"):
        shared[name].build(ctx)
        np.testing.assert_allclose(
            shared[name].train_features(ctx), alone[name].train_features(alone_ctx), rtol=1e-5, atol=1e-6
        )
    a, b = _arrays_bytes(tmp_path / "alone"), _arrays_bytes(tmp_path / "shared")
    bank_keys = [k for k in a if "kfac-bank" in k]
    assert bank_keys and all(a[k] == b[k] for k in bank_keys)
    assert caches.share_gradient_passes(["kfac", "trak", "dtrak"]) == {}  # built: nothing to share


def test_any_method_can_make_the_shared_gradient_pass():
    """The pass is offered by whichever method says so (``opens_gradient_pass``), not by K-FAC's name:
    a drop-in method that makes such a pass feeds the sinks of the others asked for, in their order,
    skipping methods without a sink and unavailable ones, and the build worker's progress reads its
    ``shared_pass_fraction``."""
    from engine.attribution.caches import MethodCaches
    from engine.attribution.methods.base import AttributionMethod, Unavailable

    class Fake(AttributionMethod):
        opens, sink, unavailable = False, None, False

        def __init__(self, name):
            super().__init__()
            self.name, self.fed = name, None

        def availability(self, ctx):
            if self.unavailable:
                raise Unavailable("no weights")
            return True, None

        def opens_gradient_pass(self, ctx):
            return self.opens

        def feed_gradient_pass(self, sinks):
            self.fed = sinks

        def feature_sink(self, ctx):
            return self.sink

        def build(self, ctx, progress=None): ...
        def is_built(self, ctx): return False
        def prepare(self, ctx, query, query_grad): ...
        def score(self, prepared, damping=None): ...

    m = {n: Fake(n) for n in ("plain", "maker", "a", "off", "b")}
    m["maker"].opens = True
    m["a"].sink, m["off"].sink, m["b"].sink = "sink-a", "sink-off", "sink-b"
    m["off"].unavailable = True
    caches = MethodCaches(m, None, lambda names: "build")
    assert caches.share_gradient_passes(["b", "plain", "maker", "off", "a"]) == {"maker": ["b", "a"]}
    assert m["maker"].fed == ["sink-b", "sink-a"]
    assert caches.share_gradient_passes(["plain", "a"]) == {}  # nobody makes a pass
    m["maker"].unavailable = True
    assert caches.share_gradient_passes(["maker", "a"]) == {}
    assert KFACInfluence.shared_pass_fraction(1.0) == 1.0 and KFACInfluence.shared_pass_fraction(0.1) == 0.1
