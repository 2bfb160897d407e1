"""A full disk during a cache build (QA round 12, D1), faked: no real mount.

QA filled a 20 MB tmpfs: ``build --methods kfac,trak`` ended, 20 minutes later, with
``error: kfac: [enforce fail at inline_container.cc:672] . unexpected pos ...`` and
``error: trak: 524288 requested and 31712 written``: neither said "no space", the table showed 0.0 s, and
trak was started on the full disk after kfac had failed.  Here the writers raise what they raise on a full
disk and ``shutil.disk_usage`` reports one.
"""

from __future__ import annotations

import errno
import shutil
from collections import namedtuple

import numpy as np
import pytest
from test_session import tiny_checkpoint

import engine.attribution.partial_build as partial_build
import engine.attribution.session
import engine.attribution.store as store_module
import engine.attribution.store_files as store_files
from engine.attribution.methods.trak import TRAK
from engine.attribution.store import Store
from engine.attribution.store_files import DiskFullError, disk_full_error
from engine.cli.parser import main

SMALL = ["--mc-samples", "4", "--trak-dim", "32"]
Usage = namedtuple("Usage", "total used free")
REAL_DISK_USAGE = shutil.disk_usage
TORCH_SHORT = "[enforce fail at inline_container.cc:672] . unexpected pos 8963968 vs 8963856"
NUMPY_SHORT = "524288 requested and 31712 written"


def _full_disk(monkeypatch, free: int = 112 << 10, total: int = 20 << 20) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(total, total - free, free))


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(NUMPY_SHORT),  # numpy's tofile: an OSError without errno
    RuntimeError(TORCH_SHORT),  # torch.save's stream writer
])
def test_write_errors_of_a_full_disk_become_one_line_naming_the_root(error, tmp_path, monkeypatch):
    _full_disk(monkeypatch)
    full = disk_full_error(error, tmp_path / "cache")
    assert isinstance(full, DiskFullError) and full.errno == errno.ENOSPC
    text = str(full)
    assert "\n" not in text and text.startswith(f"no space left on the disk holding cache root {tmp_path / 'cache'} ")
    assert "(112.0 KiB free of 20.0 MiB)" in text
    assert "finished parts are kept" in text and "rerun the same command to resume" in text
    assert str(error).split()[0] in text  # the writer's own words stay, in brackets


def test_only_a_full_disk_is_called_one(tmp_path, monkeypatch):
    """A writer's own wording (not in the known list) counts when the root's disk has almost nothing free;
    errors on a disk with space, and errors that are no write errors, are left as they are."""
    assert disk_full_error(OSError("stream writer failed"), tmp_path) is None  # tmp has space
    assert disk_full_error(OSError(errno.EACCES, "Permission denied"), tmp_path) is None
    _full_disk(monkeypatch, free=3 << 30)  # a short write with gigabytes free was something else
    assert disk_full_error(RuntimeError(TORCH_SHORT), tmp_path) is None
    _full_disk(monkeypatch, free=4096)
    assert isinstance(disk_full_error(OSError("stream writer failed"), tmp_path), DiskFullError)
    assert isinstance(disk_full_error(OSError(errno.EIO, "I/O error"), tmp_path), DiskFullError)
    # review: no other error is a full disk however little is free (a refused root, a missing file, CUDA, bugs)
    assert disk_full_error(ValueError("bad setting"), tmp_path) is None
    assert disk_full_error(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), tmp_path) is None
    assert disk_full_error(OSError(errno.EROFS, "Read-only file system"), tmp_path) is None
    assert disk_full_error(FileNotFoundError(errno.ENOENT, "No such file"), tmp_path) is None
    # a chained cause counts too (a wrapper that re-raises)
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("saving failed") from e
    except RuntimeError as wrapped:
        assert isinstance(disk_full_error(wrapped, tmp_path), DiskFullError)


SETTINGS = {"m": 1}


def test_failed_part_write_gives_its_space_back_and_the_rerun_resumes(tmp_path, monkeypatch):
    """A part cut short by the full disk leaves no half-written temporary file (it stayed until the next
    run); the parts written before stay, and the rerun publishes the same arrays as an uninterrupted build."""
    store = Store(tmp_path, "ckpt", "data")
    rows = np.arange(24, dtype=np.float32).reshape(6, 4)
    part = store.partial("bank", SETTINGS, part_size=2, num_items=6)
    part.save_part(0, {"phi": rows[0:2]})
    real = store_files.save_npy

    def short_write(path, array):
        with open(path, "wb") as f:
            f.write(b"\x93NUMPY partial")
        raise OSError(NUMPY_SHORT)

    monkeypatch.setattr(partial_build, "save_npy", short_write)
    with pytest.raises(OSError, match="requested and"):
        part.save_part(1, {"phi": rows[2:4]})
    assert not list(part.folder.glob(".*.tmp"))
    monkeypatch.setattr(partial_build, "save_npy", real)

    again = store.partial("bank", SETTINGS, part_size=2, num_items=6)
    assert again.todo() == [1, 2]
    for i in again.todo():
        again.save_part(i, {"phi": rows[2 * i: 2 * i + 2]})
    again.publish()
    np.testing.assert_array_equal(store.load_arrays("bank", SETTINGS)["phi"], rows)


def test_publish_is_refused_up_front_when_the_disk_cannot_hold_it(tmp_path, monkeypatch):
    """Publishing copies every part into one file, so it needs the cache's size again; that size is known
    exactly, so a disk without it is refused before anything is written (on a tmpfs the memory-mapped copy
    would otherwise die of SIGBUS).  The parts stay and publish once there is room."""
    store = Store(tmp_path, "ckpt", "data")
    rows = np.ones((6, 1000), np.float32)  # 24,000 bytes to publish
    part = store.partial("bank", SETTINGS, part_size=3, num_items=6)
    for i in part.todo():
        part.save_part(i, {"phi": rows[3 * i: 3 * i + 3]})
    _full_disk(monkeypatch, free=10_000)
    with pytest.raises(OSError) as info:
        part.publish(extra={"eig": np.zeros(8, np.float32)})
    assert info.value.errno == errno.ENOSPC and "publishing bank needs 23.5 KiB, 9.8 KiB free" in str(info.value)
    assert not store.exists("bank", SETTINGS) and part.todo() == [] and part.folder.is_dir()
    assert not [p for p in store.base.iterdir() if p.name.startswith(".tmp-")]
    monkeypatch.setattr(shutil, "disk_usage", REAL_DISK_USAGE)
    part.publish(extra={"eig": np.zeros(8, np.float32)})
    np.testing.assert_array_equal(store.load_arrays("bank", SETTINGS)["phi"], rows)


def test_a_build_the_disk_cannot_hold_stops_after_its_first_part(tmp_path, monkeypatch):
    """The first part a run saves gives each row's exact size, so a build whose remaining parts and
    published copy cannot fit stops there (not at publish, hours later on a large bank), naming what it
    needs; the part is kept, and with room the rerun resumes and publishes the uninterrupted arrays."""
    store = Store(tmp_path, "ckpt", "data")
    rows = np.arange(6000, dtype=np.float32).reshape(6, 1000)  # 4,000 bytes a row
    part = store.partial("bank", SETTINGS, part_size=2, num_items=6)
    _full_disk(monkeypatch, free=30_000)  # 4 rows to compute + 6 to publish = 40,000 bytes
    with pytest.raises(OSError) as info:
        part.save_part(0, {"phi": rows[0:2]})
    assert info.value.errno == errno.ENOSPC
    assert "building bank needs about 39.1 KiB more (4 of 6 rows still to compute" in str(info.value)
    full = disk_full_error(info.value, tmp_path)
    assert full is not None and "any finished parts are kept" in str(full)
    monkeypatch.setattr(shutil, "disk_usage", REAL_DISK_USAGE)
    again = store.partial("bank", SETTINGS, part_size=2, num_items=6)
    assert again.todo() == [1, 2]
    _full_disk(monkeypatch, free=40_000)  # exactly enough: the run goes on
    for i in again.todo():
        again.save_part(i, {"phi": rows[2 * i: 2 * i + 2]})
    monkeypatch.setattr(shutil, "disk_usage", REAL_DISK_USAGE)
    again.publish()
    np.testing.assert_array_equal(store.load_arrays("bank", SETTINGS)["phi"], rows)


def test_the_early_check_counts_every_cache_one_gradient_pass_fills(tmp_path, monkeypatch):
    """K-FAC's bank pass also fills TRAK's cache: each fits the disk alone, not both, so the check after
    TRAK's first part (when both row sizes are known) stops the pass, naming both; a published sibling no
    longer counts."""
    store = Store(tmp_path, "ckpt", "data")
    bank_rows = np.ones((6, 1000), np.float32)  # 4,000 bytes a row
    trak_rows = np.ones((6, 500), np.float32)  # 2,000 bytes a row
    bank = store.partial("bank", SETTINGS, part_size=2, num_items=6)
    trak = store.partial("trak", SETTINGS, part_size=3, num_items=6)
    bank.share_disk_with([trak])
    # after the first parts: bank 4 + 6 rows ahead (40,000 bytes), trak 3 + 6 (18,000 bytes)
    _full_disk(monkeypatch, free=50_000)
    bank.save_part(0, {"phi": bank_rows[0:2]})  # its own 40,000 fit; trak's size is not known yet
    with pytest.raises(OSError) as info:
        trak.save_part(0, {"phi": trak_rows[0:3]})
    assert info.value.errno == errno.ENOSPC
    assert "building trak and bank (one gradient pass fills them) needs about 56.6 KiB more" in str(info.value)
    # the same two builds, not declared as one pass: each fits on its own and nothing is refused
    other = Store(tmp_path / "other", "ckpt", "data")
    b2, t2 = (other.partial(n, SETTINGS, part_size=p, num_items=6) for n, p in (("bank", 2), ("trak", 3)))
    b2.save_part(0, {"phi": bank_rows[0:2]})
    t2.save_part(0, {"phi": trak_rows[0:3]})
    # a sibling that has published needs nothing more
    monkeypatch.setattr(shutil, "disk_usage", REAL_DISK_USAGE)
    for i in bank.todo():
        bank.save_part(i, {"phi": bank_rows[2 * i: 2 * i + 2]})
    bank.publish()
    again = store.partial("trak", SETTINGS, part_size=3, num_items=6)
    again.share_disk_with([bank])
    _full_disk(monkeypatch, free=20_000)
    again.save_part(1, {"phi": trak_rows[3:6]})  # 6 rows to publish: 12,000 bytes


def test_a_resumed_pass_counts_a_sibling_whose_parts_an_earlier_run_saved(tmp_path, monkeypatch):
    """After a kill, TRAK's parts may all be saved while K-FAC's bank is not: the rerun saves no TRAK part,
    but TRAK's published copy is still ahead, and the bank's first part must count it."""
    store = Store(tmp_path, "ckpt", "data")
    trak = store.partial("trak", SETTINGS, part_size=3, num_items=6)
    for i in trak.todo():
        trak.save_part(i, {"phi": np.ones((3, 500), np.float32)})  # 6 rows of 2,000 bytes, not published
    bank = store.partial("bank", SETTINGS, part_size=2, num_items=6)  # the rerun's objects
    trak = store.partial("trak", SETTINGS, part_size=3, num_items=6)
    assert trak.todo() == []
    bank.share_disk_with([trak])
    _full_disk(monkeypatch, free=50_000)  # the bank's 40,000 bytes fit alone, not with trak's 12,000
    with pytest.raises(OSError, match="building bank and trak .one gradient pass fills them. needs about 50.8 KiB"):
        bank.save_part(0, {"phi": np.ones((2, 1000), np.float32)})


@pytest.fixture
def cli(tmp_path_factory, digits_small, monkeypatch, capsys):
    folder = tmp_path_factory.mktemp("disk_full_ckpt")
    tiny_checkpoint(folder, digits_small)
    cache = tmp_path_factory.mktemp("disk_full_cache")
    monkeypatch.setattr(engine.attribution.session, "load_dataset", lambda cfg: digits_small)

    def run(*argv: str) -> tuple[int, str, str]:
        rc = main([*argv, "--checkpoint", str(folder), "--device", "cpu", "--cache-root", str(cache), *SMALL])
        out, err = capsys.readouterr()
        return rc, out, err

    return run, cache


def test_cli_build_on_a_full_disk_says_so_once_and_stops(cli, monkeypatch):
    """kfac's factors hit the full disk (numpy's short write): one error line naming the cache root and its
    free space, trak is not started on the same disk, the table shows the seconds spent; with room again the
    same command builds both."""
    run, cache = cli
    real_save = store_module.save_npy
    trak_builds = []
    real_trak_build = TRAK.build

    def full(path, array):
        raise OSError(NUMPY_SHORT)

    monkeypatch.setattr(store_module, "save_npy", full)
    monkeypatch.setattr(TRAK, "build", lambda self, ctx, progress=None: trak_builds.append(1))
    _full_disk(monkeypatch)
    rc, out, err = run("build", "--methods", "kfac,trak")
    assert rc == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"error: kfac: no space left on the disk holding cache root {cache} "
                                "(112.0 KiB free of 20.0 MiB); any finished parts are kept"), errors[0]
    assert NUMPY_SHORT in errors[0]
    assert trak_builds == []  # not started on the full disk
    table = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (["kfac"], ["trak"])}
    assert table["kfac"].split()[1] == "error" and float(table["kfac"].split()[2]) > 0.0
    assert "skipped: the cache's disk is full" in table["trak"]

    monkeypatch.setattr(store_module, "save_npy", real_save)
    monkeypatch.setattr(TRAK, "build", real_trak_build)
    monkeypatch.setattr(shutil, "disk_usage", REAL_DISK_USAGE)
    rc, out, err = run("build", "--methods", "kfac,trak")
    assert rc == 0, err


def test_a_cache_root_that_cannot_be_written_stays_that_error_on_an_empty_disk(tmp_path, monkeypatch):
    """Review: with the free-space fallback, a root under /proc (0 bytes free) became "no space left ...
    rerun to resume", and the app offered a Retry that could only fail again."""
    from engine.attribution.session import AttributionSession
    from engine.attribution.store import CacheRootError

    session = AttributionSession("digits", device="cpu", cache_root="/proc/nocache")
    _full_disk(monkeypatch, free=0)
    with pytest.raises(CacheRootError) as e:
        session.build(["trak"])
    assert not isinstance(e.value, DiskFullError) and "not writable" in str(e.value)
