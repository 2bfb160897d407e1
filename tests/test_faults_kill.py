"""Fault injection: builds killed with SIGKILL at each stage, and two builds at once (issue 14, finding 5).

Each build runs in a subprocess (``tests/fault_worker.py``) on a tiny untrained U-Net and 32 random
images.  After a kill the same build is run again: it must exit 0, leave no temporary folder
behind, and give the same scores as an uninterrupted build.  Two builds started together on a
fresh cache root must both exit 0 (the second waits on the per-entry lock, then loads).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fault_worker
import numpy as np
import pytest
from conftest import TINY_MODEL

from engine.config import DataConfig, Preset
from engine.model.checkpoint import save_checkpoint

WORKER = Path(__file__).with_name("fault_worker.py")
METHODS = "kfac,trak"


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _start(ckpt: Path, cache: Path, stage: str, methods: str = METHODS) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(ckpt), str(cache), methods, stage],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=Path(__file__).resolve().parents[1],
    )


def _run(ckpt: Path, cache: Path, stage: str, methods: str = METHODS) -> subprocess.CompletedProcess:
    p = _start(ckpt, cache, stage, methods)
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _scores(ckpt: Path, cache: Path) -> dict[str, np.ndarray]:
    s = fault_worker.session(str(ckpt), str(cache))
    res = s.query(s.parse_query("train:1"), methods=METHODS.split(","))
    assert all(r.status == "ok" for r in res.methods.values()), {n: r.reason for n, r in res.methods.items()}
    return {n: r.scores for n, r in res.methods.items()}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Everything here at one intra-op thread, as in the workers (``_env``): another thread count
    sums in another order, which moves float32 scores by ~1e-5 relative and would hide what these
    tests check (that a resumed or concurrent build adds exactly what an uninterrupted one does)."""
    import torch

    saved, threads = os.environ.get("ATTRIBUTION_THREADS"), torch.get_num_threads()
    os.environ["ATTRIBUTION_THREADS"] = "1"
    torch.set_num_threads(1)
    yield
    if saved is None:
        os.environ.pop("ATTRIBUTION_THREADS", None)
    else:
        os.environ["ATTRIBUTION_THREADS"] = saved
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny untrained checkpoint and the scores of an uninterrupted in-process build."""
    import torch

    from engine.model.unet import build_model

    ckpt = tmp_path_factory.mktemp("kill_ckpt")
    preset = Preset(name="tiny", model=TINY_MODEL, data=DataConfig(name="digits"), attribution=fault_worker.config())
    torch.manual_seed(0)
    save_checkpoint(ckpt, build_model(preset.model), preset)
    cache = tmp_path_factory.mktemp("kill_ref")
    fault_worker.session(str(ckpt), str(cache)).build(METHODS.split(","))
    return ckpt, _scores(ckpt, cache)


def _leftovers(cache: Path) -> list[str]:
    return [p.name for p in cache.rglob(".tmp-*")] + [p.name for p in cache.rglob(".*.tmp")]


@pytest.mark.parametrize(
    "stage",
    [
        "factor",
        pytest.param("bank", marks=pytest.mark.slow),
        pytest.param("trak", marks=pytest.mark.slow),
        "publish",
    ],
)
def test_build_killed_at_a_stage_resumes_to_the_same_scores(reference, tmp_path, stage):
    ckpt, ref = reference
    cache = tmp_path / "cache"
    killed = _run(ckpt, cache, stage)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    if stage == "publish":
        assert any(".tmp-kfac-bank" in name for name in _leftovers(cache))  # what the kill left behind
    again = _run(ckpt, cache, "none")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1]) == {"kfac": "ok", "trak": "ok"}
    assert _leftovers(cache) == []  # the dead process's temporary folders and files were removed
    got = _scores(ckpt, cache)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-7)


def test_two_builds_at_once_both_succeed(reference, tmp_path):
    ckpt, ref = reference
    cache = tmp_path / "cache"
    procs = [_start(ckpt, cache, "none"), _start(ckpt, cache, "none")]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1]) == {"kfac": "ok", "trak": "ok"}
    assert _leftovers(cache) == []
    got = _scores(ckpt, cache)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-7)


def test_lock_is_exclusive_across_processes_and_released_by_a_kill(tmp_path):
    from engine.attribution.store import Store

    store = Store(tmp_path, "ckpt", "data")
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from engine.attribution.store import Store; "
        "s = Store(sys.argv[2], 'ckpt', 'data'); cm = s.lock('x', {'a': 1}); cm.__enter__(); "
        "print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(Path(__file__).resolve().parents[1]), str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env=_env(),
    )
    import threading

    waited: list[str] = []
    waiter_got: list[bool] = []

    def waiter() -> None:  # waits for the holder; says so once, before blocking
        with store.lock("x", {"a": 1}, on_wait=lambda: waited.append("x")) as got:
            waiter_got.append(got)

    try:
        assert holder.stdout.readline().strip() == "held"
        with store.lock("x", {"a": 1}, wait=False) as got:
            assert got is False  # held by the other process
        with store.lock("y", {"a": 1}, on_wait=lambda: waited.append("y")) as got:
            assert got is True and waited == []  # another entry is independent: no "waiting" for it
        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not waited and time.monotonic() < deadline:
            time.sleep(0.05)
        assert waited == ["x"] and waiter_got == []  # told it is waiting, and still waiting
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    thread.join(30)
    assert waiter_got == [True]  # the kill released it to the waiter
    with store.lock("x", {"a": 1}, wait=False) as got:
        assert got is True  # the kernel released the dead holder's lock


def test_temp_folders_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    from engine.attribution.store import Store

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store = Store(tmp_path, "ckpt", "data")
    store.base.mkdir(parents=True)
    gone = store.base / f".tmp-kfac-bank-abc-{dead.pid}-0123abcd"
    init = store.base / f".partial-trak-abc.init-{dead.pid}-0123abcd"
    mine = store.base / f".tmp-trak-abc-{os.getpid()}-0123abcd"
    odd = store.base / ".tmp-no-pid-here"
    for f in (gone, init, mine, odd):
        f.mkdir()
    assert sorted(store.clean_stale_temp()) == sorted([gone, init])
    assert mine.is_dir() and odd.is_dir()


def test_parts_of_a_cache_published_before_the_kill_are_removed(tmp_path):
    """A kill between ``PartialBuild.publish``'s rename and its clean-up left the parts (as large as the
    cache) beside the published cache forever; the next Store over that root removes them, and keeps
    the parts of a build that has not published yet."""
    import shutil

    import numpy as np

    from engine.attribution.store import Store

    store = Store(tmp_path, "ckpt", "data")
    done = store.partial("bank", {"a": 1}, part_size=2, num_items=2)
    done.save_part(0, {"x": np.ones((2, 3), np.float32)})
    leftover = done.folder.with_name(done.folder.name + "-copy")
    shutil.copytree(done.folder, leftover)
    done.publish()
    leftover.rename(done.folder)  # the parts as the kill left them, beside the published cache
    pending = store.partial("other", {"a": 1}, part_size=2, num_items=4)
    pending.save_part(0, {"x": np.ones((2, 3), np.float32)})
    assert done.folder.is_dir() and store.exists("bank", {"a": 1})
    Store(tmp_path, "ckpt", "data")  # what the next command opens
    assert not done.folder.exists() and store.exists("bank", {"a": 1})
    assert pending.folder.is_dir() and pending.is_done(0)
