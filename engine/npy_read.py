"""Reading ``.npy`` and ``.npz`` files without Python's parser, so that two threads can read at once.

Why this exists: ``np.load`` reads an array's header (``{'descr': '<f4', 'fortran_order': False,
'shape': (3, 4), }``) with ``ast.literal_eval``.  In CPython 3.11 the ``ast`` module keeps the depth
of the tree it is converting in one variable shared by all threads (python/cpython#106905 is one
face of it), so when two threads parse at once, one of them may fail with ``SystemError: AST
constructor recursion depth mismatch``.  The app does exactly that: a page's query validates cache
arrays while the background build loads others (docs/architecture.md §10), and a CI run failed
this way once.  Here the header is read with a strict regular expression that matches what
``numpy.lib.format`` writes for plain dtypes; only a header it does not match (a structured or
object dtype, another writer's layout) goes to numpy, under one lock and retried if the race
still hits it from a parser outside the engine.

The arrays returned are what ``np.load(..., allow_pickle=False)`` returns: same dtype, shape, order
and values, writable in memory, or a read-only ``np.memmap`` for ``mmap_mode="r"``.  Errors are
numpy's kinds: ``OSError`` for a missing file, ``ValueError``/``EOFError`` for a damaged one.
"""

from __future__ import annotations

import math
import re
import struct
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np

T = TypeVar("T")

# what numpy.lib.format._write_array_header writes for a dtype whose descr is a plain string
_HEADER = re.compile(
    r"\{'descr': '(?P<descr>[^'\\]+)', 'fortran_order': (?P<fortran>True|False), "
    r"'shape': \((?P<shape>(?:\d+, )*\d*,?)\), \}[ \n]*"
)
_AST_RACE = "AST constructor recursion depth mismatch"
_NUMPY_PARSER = threading.Lock()  # the fallback's ast parses never overlap each other
_RETRIES = 5


def _numpy_parsed(read: Callable[[], T]) -> T:
    """``read()`` (which lets numpy parse a header), one at a time and retried on the ast race.

    The lock keeps the engine's own threads from racing each other; the retry covers a parser
    outside the engine (the failure is transient: the next parse starts from a fresh depth).
    """
    with _NUMPY_PARSER:
        for attempt in range(_RETRIES):
            try:
                return read()
            except SystemError as e:
                if _AST_RACE not in str(e) or attempt == _RETRIES - 1:
                    raise
    raise AssertionError("unreachable")


def _header(f: IO[bytes], name: str) -> tuple[np.dtype, bool, tuple[int, ...]] | None:
    """The dtype, Fortran order and shape of the array whose file ``f`` starts here; None if numpy
    must parse the header itself.  ``f`` is left at the first data byte."""
    version = np.lib.format.read_magic(f)  # ValueError on a file that is not .npy
    if version not in ((1, 0), (2, 0), (3, 0)):
        return None
    size_format = "<H" if version == (1, 0) else "<I"
    raw = f.read(struct.calcsize(size_format))
    if len(raw) != struct.calcsize(size_format):
        raise EOFError(f"{name}: the array header is cut short")
    (length,) = struct.unpack(size_format, raw)
    header = f.read(length)
    if len(header) != length:
        raise EOFError(f"{name}: the array header is cut short")
    m = _HEADER.fullmatch(header.decode("utf8" if version == (3, 0) else "latin1"))
    if m is None:
        return None
    dtype = np.dtype(m["descr"])
    if dtype.hasobject:
        return None  # numpy refuses it (allow_pickle=False) with its own message
    shape = tuple(int(s) for s in m["shape"].split(",") if s.strip())
    return dtype, m["fortran"] == "True", shape


def _shaped(flat: np.ndarray, shape: tuple[int, ...], fortran: bool) -> np.ndarray:
    """A flat array given its shape, in the file's order (as numpy.lib.format.read_array does)."""
    if fortran:
        return flat.reshape(shape[::-1]).transpose()
    return flat.reshape(shape)


def load_npy(path: str | Path, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load(path, mmap_mode=mmap_mode, allow_pickle=False)`` for a ``.npy`` file, without ``ast``."""
    path = Path(path)
    with open(path, "rb") as f:
        parsed = _header(f, str(path))
        if parsed is not None:
            dtype, fortran, shape = parsed
            count = math.prod(shape)
            if mmap_mode is not None:
                return np.memmap(path, dtype=dtype, mode=mmap_mode, offset=f.tell(), shape=shape,
                                 order="F" if fortran else "C")
            flat = np.fromfile(f, dtype=dtype, count=count)
            if flat.size != count:
                raise EOFError(f"{path}: {flat.size} of the {count} values are in the file (cut short)")
            return _shaped(flat, shape, fortran)
    return _numpy_parsed(lambda: np.load(path, mmap_mode=mmap_mode, allow_pickle=False))


class NpzArrays(Mapping[str, np.ndarray]):
    """The arrays of an ``.npz`` archive, each read when asked for (like ``np.load``'s ``NpzFile``):
    ``files`` names them, ``"k" in z`` and ``z["k"]`` work, and ``with`` closes the archive."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile as e:
            raise ValueError(f"{self.path} is not an .npz archive ({e})") from e
        self._members = {n[:-4] if n.endswith(".npy") else n: n for n in self._zip.namelist()}
        self.files = list(self._members)

    def __getitem__(self, key: str) -> np.ndarray:
        member = self._members[key]  # KeyError, as numpy's
        name = f"{self.path}:{member}"
        try:
            with self._zip.open(member) as f:
                parsed = _header(f, name)
                if parsed is not None:
                    dtype, fortran, shape = parsed
                    count = math.prod(shape)
                    buf = bytearray(count * dtype.itemsize)  # writable, as np.load's arrays are
                    view, got = memoryview(buf), 0
                    while got < len(buf):
                        n = f.readinto(view[got:])
                        if not n:
                            raise EOFError(f"{name}: {got} of the {len(buf)} data bytes are in the archive")
                        got += n
                    return _shaped(np.frombuffer(buf, dtype=dtype, count=count), shape, fortran)
        except zipfile.BadZipFile as e:
            raise ValueError(f"{name} is damaged ({e})") from e

        def by_numpy() -> np.ndarray:
            with self._zip.open(member) as g:
                return np.lib.format.read_array(g, allow_pickle=False)

        return _numpy_parsed(by_numpy)

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __contains__(self, key: object) -> bool:
        return key in self._members

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> NpzArrays:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def load_npz(path: str | Path) -> NpzArrays:
    """``np.load(path, allow_pickle=False)`` for an ``.npz`` archive, without ``ast``; use it with ``with``."""
    return NpzArrays(path)
