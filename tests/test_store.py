"""engine.attribution.store: keyed folders, atomic publish, resumable parts, refusal of stale caches."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from engine.attribution import store as store_mod
from engine.attribution.store import CacheRootError, StaleCacheError, Store, file_crc32, settings_digest

SETTINGS = {"method": "trak", "mc_samples": 4, "seed": 0, "projection": {"dim": 8, "kind": "rademacher"}}


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "cache", "0123456789abcdef", "digits-64")


def _visible(store: Store) -> list[str]:
    return [p.name for p in store.base.iterdir() if not p.name.startswith(".")] if store.base.exists() else []


def test_roundtrip_keyed_by_settings(store):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = torch.tensor([1, 2, 3], dtype=torch.int64)
    folder = store.save_arrays("trak", SETTINGS, {"phi": a, "idx": b}, meta={"build_seconds": 1.5})
    assert folder == store.base / f"trak-{settings_digest(SETTINGS)}"
    assert folder.parent == store.root / "0123456789abcdef" / "digits-64"
    out = store.load_arrays("trak", SETTINGS)
    assert isinstance(out["phi"], np.memmap)  # memory-mapped, not read into memory
    np.testing.assert_array_equal(out["phi"], a)
    np.testing.assert_array_equal(out["idx"], b.numpy())
    manifest = json.loads((folder / "settings.json").read_text())
    assert manifest["settings"] == SETTINGS and manifest["checkpoint_hash"] == "0123456789abcdef"
    phi = manifest["arrays"]["phi"]
    assert {k: phi[k] for k in ("shape", "dtype")} == {"shape": [3, 4], "dtype": "float32"}
    assert phi["crc32"] == file_crc32(folder / "phi.npy")
    # the thread count it was published at rides along (the last bits depend on it: QA round 21)
    assert store.load_meta("trak", SETTINGS) == {"build_seconds": 1.5, "threads": torch.get_num_threads()}
    assert 0 < store.size_mb("trak", SETTINGS) < 0.01 and store.size_mb("trak", {"x": 1}) == 0.0
    # any changed setting is another artefact
    other = {**SETTINGS, "mc_samples": 8}
    assert store.exists("trak", SETTINGS) and not store.exists("trak", other)
    assert store.load_arrays("trak", other) is None
    assert store.path("trak", other) != folder
    # key order does not matter
    assert store.path("trak", dict(reversed(list(SETTINGS.items())))) == folder


def test_describe_lists_built_and_partial(store):
    store.save_arrays("clip", {"model": "x"}, {"embeddings": np.zeros((100, 16), np.float32)})
    part = store.partial("trak", SETTINGS, part_size=2, num_items=5)
    part.save_part(0, {"phi": np.zeros((2, 3), np.float32)})
    rows = {r["name"]: r for r in store.describe()}
    assert rows["clip"]["state"] == "ok" and rows["clip"]["settings"] == {"model": "x"}
    assert 100 * 16 * 4 / 2**20 <= rows["clip"]["size_mb"] < 0.1
    assert rows["trak"]["state"] == "partial" and rows["trak"]["parts_done"] == 1
    assert rows["trak"]["parts_total"] == 3


def test_interrupted_save_leaves_nothing_loadable(store, monkeypatch):
    calls = {"n": 0}
    real = store_mod.save_npy

    def dying_save(path, array):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed between the first and second array
        real(path, array)

    monkeypatch.setattr(store_mod, "save_npy", dying_save)
    with pytest.raises(KeyboardInterrupt):
        store.save_arrays("trak", SETTINGS, {"a": np.ones(3), "b": np.ones(4)})
    assert not store.exists("trak", SETTINGS)
    assert store.load_arrays("trak", SETTINGS) is None
    assert _visible(store) == []


def test_hard_kill_before_rename_leaves_nothing_loadable(store, monkeypatch):
    """A process killed outright gets no cleanup: the hidden temp folder stays but never loads."""

    def killed(*args, **kwargs):
        raise SystemExit("killed")

    monkeypatch.setattr(store_mod.os, "rename", killed)
    monkeypatch.setattr(store_mod.shutil, "rmtree", lambda *a, **k: None)  # no cleanup after a kill
    with pytest.raises(SystemExit):
        store.save_arrays("trak", SETTINGS, {"a": np.ones(3)})
    monkeypatch.undo()
    leftovers = [p.name for p in store.base.iterdir()]
    assert leftovers and all(n.startswith(".tmp-") for n in leftovers)
    assert store.load_arrays("trak", SETTINGS) is None
    assert [r for r in store.describe() if r.get("state") == "ok"] == []
    # the next build publishes normally
    store.save_arrays("trak", SETTINGS, {"a": np.full(3, 2.0)})
    np.testing.assert_array_equal(store.load_arrays("trak", SETTINGS)["a"], [2.0, 2.0, 2.0])


def test_partial_build_resumes_and_publishes(store):
    full = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    computed: list[int] = []

    def run(stop_after: int | None):
        part = store.partial("bank", SETTINGS, part_size=2, num_items=7)
        for count, i in enumerate(part.todo()):
            if stop_after is not None and count == stop_after:
                raise KeyboardInterrupt
            computed.append(i)
            rows = part.part_range(i)
            part.save_part(i, {"phi": full[rows], "norm": full[rows].sum(1)})
        return part

    with pytest.raises(KeyboardInterrupt):
        run(stop_after=2)
    assert computed == [0, 1]
    assert not store.exists("bank", SETTINGS)  # nothing published while parts are missing
    done_file = store._partial_folder("bank", SETTINGS) / "phi.part-00001.npy"
    mtime = done_file.stat().st_mtime_ns
    # a part cut short (array written, no done marker) is redone
    np.save(store._partial_folder("bank", SETTINGS) / "phi.part-00002.npy", np.zeros((2, 3), np.float32))
    part = run(stop_after=None)
    assert computed == [0, 1, 2, 3]  # finished parts were kept, not recomputed
    assert done_file.stat().st_mtime_ns == mtime
    assert store.partial("bank", SETTINGS, part_size=2, num_items=7).todo() == []
    part.publish(extra={"eigvals": np.array([3.0, 1.0])}, meta={"k": 1})
    out = store.load_arrays("bank", SETTINGS)
    np.testing.assert_array_equal(out["phi"], full)
    np.testing.assert_array_equal(out["norm"], full.sum(1))
    np.testing.assert_array_equal(out["eigvals"], [3.0, 1.0])
    assert not store._partial_folder("bank", SETTINGS).exists()


def test_partial_with_other_chunking_restarts(store):
    p = store.partial("bank", SETTINGS, part_size=2, num_items=6)
    p.save_part(0, {"phi": np.ones((2, 1))})
    assert store.partial("bank", SETTINGS, part_size=2, num_items=6).todo() == [1, 2]
    assert store.partial("bank", SETTINGS, part_size=3, num_items=6).todo() == [0, 1]
    with pytest.raises(RuntimeError, match="not built"):
        store.partial("bank", SETTINGS, part_size=3, num_items=6).publish()


def test_mismatched_settings_refused(store):
    folder = store.save_arrays("trak", SETTINGS, {"a": np.ones(3)})
    manifest = json.loads((folder / "settings.json").read_text())
    manifest["settings"]["mc_samples"] = 64  # content no longer matches the folder's name
    (folder / "settings.json").write_text(json.dumps(manifest))
    with pytest.raises(StaleCacheError, match="settings") as e:
        store.load_arrays("trak", SETTINGS)
    assert str(folder) in str(e.value) and "delete" in str(e.value)
    assert not store.exists("trak", SETTINGS)
    assert [r["state"] for r in store.describe()] == ["stale"]
    with pytest.raises(StaleCacheError):  # a build refuses to shadow it silently
        store.save_arrays("trak", SETTINGS, {"a": np.ones(3)})
    store.remove("trak", SETTINGS)
    store.save_arrays("trak", SETTINGS, {"a": np.ones(3)})
    assert store.exists("trak", SETTINGS)


def test_other_checkpoint_refused(store):
    folder = store.save_arrays("trak", SETTINGS, {"a": np.ones(3)})
    other = Store(store.root, "fedcba9876543210", "digits-64")
    other.base.mkdir(parents=True)
    shutil.copytree(folder, other.path("trak", SETTINGS))  # a cache copied under another checkpoint
    with pytest.raises(StaleCacheError, match="checkpoint_hash"):
        other.load_arrays("trak", SETTINGS)
    other_data = Store(store.root, "0123456789abcdef", "cifar2-5000")
    other_data.base.mkdir(parents=True)
    shutil.copytree(folder, other_data.path("trak", SETTINGS))
    with pytest.raises(StaleCacheError, match="data_key"):
        other_data.load_arrays("trak", SETTINGS)


def test_truncated_array_refused(store):
    folder = store.save_arrays("trak", SETTINGS, {"a": np.ones((4, 2), np.float32)})
    np.save(folder / "a.npy", np.ones((3, 2), np.float32))
    with pytest.raises(StaleCacheError, match="shape"):
        store.load_arrays("trak", SETTINGS)
    (folder / "a.npy").unlink()
    with pytest.raises(StaleCacheError, match="missing"):
        store.load_arrays("trak", SETTINGS)


def test_check_writable_names_an_unusable_cache_root(tmp_path):
    """A root that is a file, or under /proc, cannot be written (as root, chmod would not show it): the
    error names the root; a usable root gets its folder and keeps no probe file."""
    (tmp_path / "file").write_text("")
    for root in (tmp_path / "file", tmp_path / "file" / "below", "/proc/no-cache-here"):
        with pytest.raises(CacheRootError, match=f"cache root {root} is not writable"):
            Store(root, "0123456789abcdef", "digits-64").check_writable()
    ok = Store(tmp_path / "cache", "0123456789abcdef", "digits-64")
    ok.check_writable()
    assert ok.base.is_dir() and list(ok.base.iterdir()) == []
