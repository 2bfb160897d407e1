"""File-level pieces of the attribution cache (``engine.attribution.store``): settings digests, array
names, durable writes, checksums and the temporary-file names that carry their writer's pid.

Kept apart from ``Store`` and ``PartialBuild`` so that both use one copy of them; see ``store`` for why
the cache is laid out and written the way it is.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write_bytes
from ..jsonio import finite_or_none
from ..validation import one_line

SETTINGS = "settings.json"
ArrayLike = Any  # np.ndarray | torch.Tensor


def canonical(settings: Mapping[str, Any]) -> dict[str, Any]:
    """JSON round trip with sorted keys: tuples become lists, numbers stay numbers."""
    return json.loads(json.dumps(dict(settings), sort_keys=True, default=json_default))


def json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return str(x)


def settings_digest(settings: Mapping[str, Any]) -> str:
    """12 hex of SHA-256 of the canonical JSON of the settings: the folder-name key."""
    text = json.dumps(canonical(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def to_numpy(a: ArrayLike) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(a))


def check_key(key: str) -> None:
    if not key or "/" in key or key.startswith(".") or key == SETTINGS.removesuffix(".json"):
        raise ValueError(f"bad array name {key!r}")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    text = json.dumps(finite_or_none(obj), indent=2, sort_keys=True, default=json_default, allow_nan=False)
    atomic_write_bytes(path, text.encode())


def save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def file_crc32(path: Path, chunk: int = 8 << 20) -> str:
    """CRC-32 of a file's bytes as 8 hex digits (streamed; ~1 GB/s)."""
    crc = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            crc = zlib.crc32(block, crc)
    return f"{crc & 0xFFFFFFFF:08x}"


PID_TMP = re.compile(r"\.(\d+)-[0-9a-f]{8}\.tmp$")  # PartialBuild.save_part's temporary files


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError as e:
        return e.errno != errno.ESRCH
    return True


# --- a full disk ------------------------------------------------------------------------------

# What a write into a full file system raises besides OSError(ENOSPC): numpy's short write (an OSError
# without errno: "524288 requested and 31712 written") and torch.save's stream writer (a RuntimeError:
# "[enforce fail at inline_container.cc:672] . unexpected pos 8963968 vs 8963856", or "file write failed").
SHORT_WRITE = re.compile(
    r"no space left|disk quota|\d+ requested and \d+ written|unexpected pos \d+|file write failed|failed writing file",
    re.IGNORECASE,
)
LOW_FREE_BYTES = 16 << 20  # an I/O error with less than this free on the cache's disk is taken for a full disk
SHORT_WRITE_FREE_BYTES = 1 << 30  # a short write with less than this free is taken for a full disk


class DiskFullError(OSError):
    """A build failed because the cache root's file system is full: the message names the root, its free
    space, and says that the finished parts are kept and a rerun with more space resumes.  An OSError with
    errno ENOSPC, so callers that report OSErrors report it, and ``isinstance`` tells it apart to stop
    building the other methods (they cannot succeed)."""

    def __init__(self, message: str | int, *rest: Any):
        if isinstance(message, int):  # unpickled (OSError pickles its args: errno, text)
            super().__init__(message, *rest)
        else:
            super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.strerror)


def disk_space(path: str | Path) -> tuple[int, int] | None:
    """(free bytes for this user, total bytes) of the file system holding ``path`` (its nearest existing
    folder), None when it cannot be read."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        usage = shutil.disk_usage(p)
    except OSError:
        return None
    return int(usage.free), int(usage.total)


def human_bytes(n: int) -> str:
    """Bytes for a message: KiB below 1 MiB, MiB below 10 GiB, else GiB (one decimal)."""
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    return f"{n / 2**20:.1f} MiB" if n < 10 * 2**30 else f"{n / 2**30:.1f} GiB"


def out_of_space_message(root: str | Path, detail: str = "") -> str:
    """One line: the cache root, its free space, what is kept and how to resume."""
    space = disk_space(root)
    free = "free space unknown" if space is None else f"{human_bytes(space[0])} free of {human_bytes(space[1])}"
    text = (
        f"no space left on the disk holding cache root {root} ({free}); any finished parts are kept: "
        "free some space (or enlarge the disk) and rerun the same command to resume"
    )
    return f"{text} ({detail})" if detail else text


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in out and len(out) < 16:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def disk_full_error(exc: BaseException, root: str | Path) -> DiskFullError | None:
    """The one-line ``DiskFullError`` when ``exc`` (raised by a build writing under ``root``) comes from a
    full disk, else None.

    Why three tests: a full disk surfaces as OSError(ENOSPC / EDQUOT) from plain writes; numpy's and
    torch's writers report short writes in their own words (``SHORT_WRITE``), taken for a full disk only
    with under ``SHORT_WRITE_FREE_BYTES`` free; and an I/O-level OSError in a writer's own wording (errno
    None or EIO) counts only when the root's file system has under ``LOW_FREE_BYTES`` free (a cache part
    is larger than that).  Anything else (a refused root, a missing file, CUDA, a bug) is left as it is."""
    if isinstance(exc, DiskFullError):
        return exc
    chain = _chain(exc)
    full = any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain)
    if not full:
        space = disk_space(root)
        free = None if space is None else space[0]
        if any(SHORT_WRITE.search(str(e)) for e in chain):
            # a short write with a gigabyte free was something else (the half-written file is removed by then,
            # so some space is back, but not that much)
            full = free is None or free < SHORT_WRITE_FREE_BYTES
        elif isinstance(exc, OSError) and exc.errno in (None, errno.EIO):
            # a writer's own wording: only an I/O-level error on an all but full disk (not a refused root,
            # a missing file, or a CUDA or programming error, which are not OSErrors of this kind)
            full = free is not None and free < LOW_FREE_BYTES
    if not full:
        return None
    detail = one_line(exc)[:160] or type(exc).__name__
    name = getattr(exc, "filename", None)
    if name and str(name) not in detail:
        detail += f": {name}"
    return DiskFullError(out_of_space_message(root, f"{type(exc).__name__}: {detail}"))


def reserve(path: Path, nbytes: int) -> None:
    """Allocate ``nbytes`` for the file at ``path`` now (``posix_fallocate``), so that a full disk is an
    OSError(ENOSPC) here and not a SIGBUS later, when a memory map of a sparse file is written (``publish``
    concatenates parts through ``open_memmap``).  A file system without it is left to the writes."""
    if nbytes <= 0 or not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
    finally:
        os.close(fd)
