"""engine.npy_read: the same arrays as np.load, without the ast race between threads."""

from __future__ import annotations

import ast
import gc
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from engine.files import save_npz
from engine.npy_read import load_npy, load_npz

ARRAYS = {
    "f4": np.arange(12, dtype=np.float32).reshape(3, 4),
    "i1": np.array([-128, 0, 5, 127], dtype=np.int8),
    "u8_3d": np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
    "fortran": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
    "empty": np.zeros((0, 4), dtype=np.float32),
    "scalar": np.array(3.5),
    "text": np.array('{"a": 1}'),
    "texts": np.array(["a", "bcd"]),
    "bool": np.array([True, False]),
    "big_endian": np.arange(3, dtype=">i4"),
    "structured": np.zeros(3, dtype=[("a", "<f4"), ("b", "<i8")]),  # numpy parses this header
}


def _same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.flags.f_contiguous == b.flags.f_contiguous and a.flags.c_contiguous == b.flags.c_contiguous
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", list(ARRAYS))
@pytest.mark.parametrize("mmap_mode", [None, "r"])
def test_npy_reads_as_numpy_does(tmp_path: Path, name: str, mmap_mode: str | None) -> None:
    path = tmp_path / f"{name}.npy"
    np.save(path, ARRAYS[name])
    ours, theirs = load_npy(path, mmap_mode=mmap_mode), np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    _same(ours, theirs)
    assert type(ours) is type(theirs)
    assert ours.flags.writeable == theirs.flags.writeable


def test_npz_reads_as_numpy_does(tmp_path: Path) -> None:
    path = tmp_path / "a.npz"
    save_npz(path, **ARRAYS)
    with load_npz(path) as ours, np.load(path, allow_pickle=False) as theirs:
        assert ours.files == theirs.files and "text" in ours and "absent" not in ours
        for k in theirs.files:
            _same(ours[k], theirs[k])
            assert ours[k].flags.writeable
        assert str(ours["text"]) == '{"a": 1}'
        with pytest.raises(KeyError):
            ours["absent"]
    compressed = tmp_path / "c.npz"
    np.savez_compressed(compressed, x=ARRAYS["f4"])
    _same(load_npz(compressed)["x"], ARRAYS["f4"])


def test_damaged_files_fail_as_numpy_fails(tmp_path: Path) -> None:
    whole = tmp_path / "whole.npy"
    np.save(whole, np.arange(100, dtype=np.float32))
    cut = tmp_path / "cut.npy"
    cut.write_bytes(whole.read_bytes()[:-40])
    for mode in (None, "r"):
        with pytest.raises((ValueError, EOFError)):
            load_npy(cut, mmap_mode=mode)
    (tmp_path / "junk.npy").write_bytes(b"not an array at all")
    with pytest.raises(ValueError):
        load_npy(tmp_path / "junk.npy")
    with pytest.raises(ValueError, match="not an .npz archive"):
        load_npz(whole)
    with pytest.raises(FileNotFoundError):
        load_npy(tmp_path / "missing.npy")
    with pytest.raises(FileNotFoundError):
        load_npz(tmp_path / "missing.npz")
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_npy(objects)
    archive = tmp_path / "a.npz"
    np.savez(archive, x=np.arange(1000, dtype=np.int64))
    data = bytearray(archive.read_bytes())
    data[200:260] = b"\x00" * 60  # inside x's data: the zip's CRC no longer matches
    archive.write_bytes(bytes(data))
    with pytest.raises(ValueError), load_npz(archive) as z:
        z["x"]


class _Cycle:
    """Cyclic garbage whose finalizer runs Python code: the collector may run it in the middle of a
    parse, and a thread switch may then come inside the ast conversion (how the race shows)."""

    def __init__(self) -> None:
        self.me = self

    def __del__(self) -> None:
        sum(range(50))


def _race(load, files: list[Path], seconds: float) -> tuple[int, int, int]:
    """Another thread parses Python while this one loads ``files``: (loads, errors here, errors there)."""
    stop, theirs = threading.Event(), [0]
    source = "[" + ",".join(f"({i}, [{i}, {{'a': {i}}}])" for i in range(200)) + "]"

    def parse() -> None:
        while not stop.is_set():
            for _ in range(20):
                _Cycle()
            try:
                ast.parse(source)
            except SystemError:
                theirs[0] += 1

    old_interval, old_threshold = sys.getswitchinterval(), gc.get_threshold()
    sys.setswitchinterval(1e-6)
    gc.set_threshold(50, 1, 1)
    other = threading.Thread(target=parse, daemon=True)
    other.start()
    loads = ours = 0
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for f in files:
                _Cycle()
                try:
                    load(f)
                    loads += 1
                except SystemError:
                    ours += 1
    finally:
        stop.set()
        other.join()
        sys.setswitchinterval(old_interval)
        gc.set_threshold(*old_threshold)
    return loads, ours, theirs[0]


def test_loads_beside_another_threads_parser_neither_fail_nor_make_it_fail(tmp_path: Path) -> None:
    """The CI failure of 2026-12-06 (test_app: 'AST constructor recursion depth mismatch' in a cache
    check while the build loaded arrays), reproduced with a parser in a second thread."""
    files = []
    for i in range(4):
        files.append(tmp_path / f"a{i}.npy")
        np.save(files[-1], np.full((3, 4), i, dtype=np.float32))
    np.savez(tmp_path / "z.npz", x=np.arange(5))
    loads, ours, theirs = _race(lambda f: np.load(f, allow_pickle=False), files, 2.0)
    if ours + theirs == 0:
        pytest.skip(f"this Python's ast shows no race in {loads} numpy loads: nothing to compare against")
    loads, ours, theirs = _race(load_npy, files, 2.0)
    assert loads > 0 and (ours, theirs) == (0, 0)
    _, ours, theirs = _race(lambda f: load_npz(tmp_path / "z.npz")["x"], files[:1], 1.0)
    assert (ours, theirs) == (0, 0)
