"""Fault injection on the attribution caches (issue 14, finding 4): corrupt, truncate, delete, edit.

A tiny checkpoint's caches (K-FAC factors and int8 bank, TRAK) are built once per module; each
test damages a private copy and checks what the user sees: the query never returns wrong or
non-finite scores as "ok", the message names the file and the command that rebuilds it, the
status does not call a corrupt cache "not built", and ``build --rebuild`` restores the scores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MODEL
from test_session import TINY_ATTRIBUTION

import engine.attribution.session
from engine.attribution.session import AttributionSession
from engine.attribution.store import StaleCacheError, Store
from engine.cli import main
from engine.config import DataConfig, Preset
from engine.model.checkpoint import save_checkpoint

METHODS = ["kfac", "trak"]
SMALL = ["--mc-samples", str(TINY_ATTRIBUTION.mc_samples), "--trak-dim", str(TINY_ATTRIBUTION.trak_dim)]


@pytest.fixture(scope="module")
def built(tmp_path_factory, digits_small):
    """(checkpoint folder, preset, cache root with kfac+trak built, reference scores of train:3)."""
    folder = tmp_path_factory.mktemp("fault_ckpt")
    preset = untrained_checkpoint(folder)
    cache = tmp_path_factory.mktemp("fault_cache")
    s = _session(folder, preset, cache, digits_small)
    s.build(METHODS)
    res = s.query(s.parse_query("train:3"), methods=METHODS)
    ref = {n: res.methods[n].scores.copy() for n in METHODS}
    return folder, preset, cache, ref


def untrained_checkpoint(folder: Path) -> Preset:
    """A tiny U-Net with its initial weights saved as a checkpoint: caches build in seconds, no training."""
    import torch

    from engine.model.unet import build_model

    preset = Preset(name="tiny", model=TINY_MODEL, data=DataConfig(name="digits"), attribution=TINY_ATTRIBUTION)
    torch.manual_seed(0)
    save_checkpoint(folder, build_model(preset.model), preset)
    return preset


def _session(folder, preset, cache, dataset) -> AttributionSession:
    return AttributionSession(
        preset, checkpoint=folder, device="cpu", cache_root=cache, config=TINY_ATTRIBUTION, dataset=dataset
    )


@pytest.fixture
def damaged(built, digits_small, tmp_path):
    """A fresh copy of the built caches and a function returning a new session over it."""
    folder, preset, cache, ref = built
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)

    def new_session() -> AttributionSession:
        return _session(folder, preset, copy, digits_small)

    return new_session, ref


def _folder(s: AttributionSession, prefix: str) -> Path:
    (hit,) = [p for p in s.store.base.iterdir() if p.name.startswith(prefix + "-")]
    return hit


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _query(s: AttributionSession, methods=METHODS):
    return s.query(s.parse_query("train:3"), methods=methods).methods


def _assert_refused(r, needle: str) -> None:
    assert r.status == "error" and r.scores is None, (r.status, r.reason)
    assert needle in r.reason and "--rebuild" in r.reason, r.reason


def test_flipped_bytes_in_a_bank_part_are_refused_then_rebuilt(damaged):
    new_session, ref = damaged
    s = new_session()
    bank = _folder(s, "kfac-bank")
    target = max(bank.glob("*.npy"), key=lambda p: p.stat().st_size)
    _overwrite(target, target.stat().st_size // 2, bytes(range(256)) * 16)  # 4 KiB inside the int8 data
    r = _query(s)
    _assert_refused(r["kfac"], str(target))
    assert r["trak"].status == "ok"
    # the rebuild command in the message works and restores the exact scores
    s2 = new_session()
    assert str(bank) in s2.repair(["kfac"])[0]
    summary = s2.build(["kfac"])
    assert summary["kfac"]["status"] == "ok"
    np.testing.assert_allclose(_query(s2, ["kfac"])["kfac"].scores, ref["kfac"], rtol=1e-6, atol=1e-7)


def test_corrupt_factor_or_eigenvalues_never_give_ok_scores(damaged):
    new_session, _ = damaged
    s = new_session()
    factors = _folder(s, "kfac-factors")
    target = sorted(factors.glob("*.npy"))[0]
    _overwrite(target, 128, np.full(8, np.nan, np.float32).tobytes())
    _assert_refused(_query(s, ["kfac"])["kfac"], str(target))


def test_non_finite_scores_are_an_error_even_without_checksums(damaged):
    """A cache published before checksums existed (no crc32 recorded) with NaN inside: still not "ok"."""
    new_session, _ = damaged
    s = new_session()
    factors = _folder(s, "kfac-factors")
    manifest = json.loads((factors / "settings.json").read_text())
    for info in manifest["arrays"].values():
        info.pop("crc32")
    (factors / "settings.json").write_text(json.dumps(manifest))
    for p in factors.glob("*.npy"):
        a = np.load(p)
        if a.dtype.kind == "f" and a.size:
            a.flat[0] = np.nan
            np.save(p, a)
    r = _query(new_session(), ["kfac"])["kfac"]
    assert r.status == "error" and "not finite" in r.reason and "--rebuild" in r.reason, r.reason


def test_removed_settings_entry_is_corrupt_not_a_keyerror(damaged):
    new_session, _ = damaged
    s = new_session()
    bank = _folder(s, "kfac-bank")
    manifest = json.loads((bank / "settings.json").read_text())
    dropped = sorted(manifest["arrays"])[1]
    del manifest["arrays"][dropped]
    (bank / "settings.json").write_text(json.dumps(manifest))
    s = new_session()
    st = s.status()["kfac"]
    assert not st["built"] and st["corrupt"] and "not built" not in st["reason"]
    assert dropped in st["reason"] and "--rebuild" in st["reason"]
    _assert_refused(_query(s, ["kfac"])["kfac"], dropped)


@pytest.mark.parametrize("damage", ["truncate", "delete", "settings_garbage", "settings_deleted"])
def test_truncated_or_deleted_files_are_named(damaged, damage):
    new_session, _ = damaged
    s = new_session()
    trak = _folder(s, "trak")
    target = max(trak.glob("*.npy"), key=lambda p: p.stat().st_size)
    if damage == "truncate":
        with open(target, "r+b") as f:
            f.truncate(target.stat().st_size // 2)
        needle = target.name
    elif damage == "delete":
        target.unlink()
        needle = target.name
    elif damage == "settings_garbage":
        (trak / "settings.json").write_bytes(b"\x00\xff not json")
        needle = "settings.json"
    else:
        (trak / "settings.json").unlink()
        needle = "settings.json"
    s = new_session()
    st = s.status()["trak"]
    assert st["corrupt"] and needle in st["reason"], st
    _assert_refused(_query(s, ["trak"])["trak"], needle)


def test_cli_build_reports_corrupt_cache_and_rebuild_repairs_it(built, damaged, monkeypatch, capsys, digits_small):
    folder, _, _, ref = built
    new_session, _ = damaged
    s = new_session()
    monkeypatch.setattr(engine.attribution.session, "load_dataset", lambda cfg: digits_small)
    bank = _folder(s, "kfac-bank")
    manifest = json.loads((bank / "settings.json").read_text())
    del manifest["arrays"][sorted(manifest["arrays"])[0]]
    (bank / "settings.json").write_text(json.dumps(manifest))
    argv = ["build", "--methods", "kfac", "--checkpoint", str(folder), "--device", "cpu",
            "--cache-root", str(s.cache_root), *SMALL]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 1 and "error: kfac:" in err and "--rebuild" in err and "Traceback" not in err
    assert main([*argv, "--rebuild"]) == 0
    capsys.readouterr()
    np.testing.assert_allclose(_query(new_session(), ["kfac"])["kfac"].scores, ref["kfac"], rtol=1e-6, atol=1e-7)


def test_store_verify_is_lazy_and_once_per_process(tmp_path, monkeypatch):
    import engine.attribution.store as store_mod

    store = Store(tmp_path, "ckpt", "data")
    store.save_arrays("x", {"a": 1}, {"v": np.arange(10, dtype=np.float32)})
    calls = []
    real = store_mod.file_crc32
    monkeypatch.setattr(store_mod, "file_crc32", lambda p: calls.append(p) or real(p))
    assert store.validate("x", {"a": 1}) is not None and calls == []  # validate: no checksum pass
    store.load_arrays("x", {"a": 1})
    store.load_arrays("x", {"a": 1})
    assert len(calls) == 1
    path = store.path("x", {"a": 1}) / "v.npy"
    _overwrite(path, path.stat().st_size - 4, b"\x00\x00\xc0\x7f")  # last value -> NaN, same size
    with pytest.raises(StaleCacheError, match="v.npy is corrupt"):
        store.load_arrays("x", {"a": 1})


# --- damping (finding 3): validated in the engine, for the API, the CLI and the app alike ------------


@pytest.mark.parametrize("bad", [0.0, -1e-8, float("nan"), float("inf")])
def test_invalid_damping_is_refused_by_query_and_rescore(damaged, bad):
    from engine.validation import InvalidSettingError

    new_session, ref = damaged
    s = new_session()
    with pytest.raises(InvalidSettingError, match="kfac damping must be finite and > 0"):
        s.query(s.parse_query("train:3"), methods=METHODS, damping={"kfac": bad})
    res = s.query(s.parse_query("train:3"), methods=METHODS)
    with pytest.raises(InvalidSettingError, match="trak damping"):
        s.rescore(res, {"trak": bad})
    np.testing.assert_allclose(s.rescore(res, {"kfac": 1e-8}).methods["kfac"].scores, ref["kfac"], rtol=1e-5)


def test_cli_damping_nan_is_an_error_and_json_is_strict(built, damaged, monkeypatch, capsys, digits_small):
    folder = built[0]
    new_session, _ = damaged
    monkeypatch.setattr(engine.attribution.session, "load_dataset", lambda cfg: digits_small)
    base = ["query", "--query", "train:3", "--methods", "kfac,trak", "--checkpoint", str(folder), "--device", "cpu",
            "--cache-root", str(new_session().cache_root), *SMALL]
    for bad in ("nan", "0", "-1e-8", "inf"):
        rc = main([*base, f"--damping={bad}", "--json"])
        out, err = capsys.readouterr()
        assert rc == 2 and out == "" and err.startswith("error: kfac damping"), (bad, err)
    assert main([*base, "--json"]) == 0
    out = capsys.readouterr().out
    record = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert record["methods"]["kfac"]["status"] == "ok"
