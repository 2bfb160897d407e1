"""Files that survive ``kill -9``: every write goes to a temporary file in the same folder,
is flushed to disk, then renamed over the target (a rename is atomic on POSIX), so a reader
sees the old file or the new one, never half of one.

One place for the helpers that the model, attribution, evaluation and bench layers all
need: raw bytes, JSON (numpy scalars and arrays, dataclasses allowed), ``.npz`` archives
and ``torch.save`` objects.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .jsonio import finite_or_none


def _written_beside(path: Path, data: bytes) -> str:
    """``data`` in a new temporary file beside ``path``, fsynced and readable by all: its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: never a half file."""
    tmp = _written_beside(Path(path), data)
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def create_bytes_once(path: str | Path, data: bytes) -> bool:
    """Write ``path`` whole only if it does not exist yet; False (and nothing written) if it does.

    Why: a record that binds a folder to one owner (``evaluation.lds.bind_run_to_checkpoint``) must
    not be overwritten by a second process that checked for it at the same moment.  The bytes go to a
    temporary file first and are linked into place (``os.link`` fails on an existing name), so a reader
    never sees a half file and of two racing writers exactly one wins.
    """
    tmp = _written_beside(Path(path), data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def nearest_existing_folder(path: str | Path, what: str, error: type[ValueError] = ValueError) -> Path:
    """``path`` when it exists, else its nearest existing parent: the folder a missing ``path`` would be made in.
    ``error`` (``what``: the words naming the argument, e.g. ``--out runs/x``) when that is a file, not a folder.

    Why one walk: an output below a file (``x.png/y.png``) failed after minutes of work in a bare ``[Errno 20] Not
    a directory``; the CLI's output files and ``train``'s --out are both checked before the work, here."""
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise error(f"{what}: {where} is a file, not a folder")
    return where


def can_create_in(folder: str | Path) -> bool:
    """Whether a file can be made in ``folder``, tried for real (a hidden temporary file, removed at once).

    Why not ``os.access``: it says yes to root everywhere, also on a read-only mount or a pseudo file system
    (``/proc``), where the first write then fails in a bare errno after the slow work."""
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".write-check.", suffix=".tmp")
    except OSError:
        return False
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)
    return True


def jsonable(o: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars and arrays, paths and dataclasses."""
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if is_dataclass(o) and not isinstance(o, type):
        return asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def save_json(path: str | Path, obj: Any, indent: int | None = 2, sort_keys: bool = False) -> None:
    """``obj`` as strict JSON at ``path``, atomically (see ``jsonable``; NaN/inf become null, ``engine.jsonio``).

    The text ends with a newline, as a text file should: committed results files rewritten by a command
    then differ only where their numbers do.
    """
    text = json.dumps(finite_or_none(obj), indent=indent, sort_keys=sort_keys, default=jsonable, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def save_npz(path: str | Path, **arrays: Any) -> None:
    """``np.savez`` into ``path``, atomically (uncompressed: these are caches read often)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a temporary file."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(Path(path), buf.getvalue())
