"""One writer per folder: an exclusive, non-blocking ``fcntl.flock`` on a hidden file in it, which names its holder.

The kernel drops a flock when the descriptor holding it closes, and so when its process ends, however it ends: a
``kill -9`` never leaves a folder locked (its file may stay: without a flock on it, it means nothing).  A flock belongs to one open
descriptor, so a second take in the same process (another thread) is refused as well; nothing here takes one twice.
Without ``fcntl`` (Windows, which the engine does not target) there is no lock and every take succeeds.

A holder may remove its lock file while it holds it (a finished training folder keeps none; the CLI removes a folder it
made only for the lock): a take checks, once it holds a flock, that the path still names the file it locked.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

RUN_LOCK = ".train-run.lock"  # the one lock file of a folder runs write: train's --out, an lds/retrain-top/group-retrain --out


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its file says (written once the lock is taken)."""

    pid: int
    started: float  # Unix time the lock was taken
    host: str

    def words(self) -> str:
        """``pid 1234, started 02:41 UTC`` (the date too when not today; the host when not this one)."""
        return f"pid {self.pid}{self.where()}, started {self.since()}"

    def since(self) -> str:
        """``02:41 UTC``, with the date when not today: when the lock was taken."""
        at = time.gmtime(self.started)
        fmt = "%H:%M UTC" if at[:3] == time.gmtime()[:3] else "%Y-%m-%d %H:%M UTC"
        return time.strftime(fmt, at)

    def where(self) -> str:
        """`` on otherhost`` when the holder runs on another host (a shared disk), else nothing."""
        return "" if self.host == socket.gethostname() else f" on {self.host}"

    def is_this_process(self) -> bool:
        return self.pid == os.getpid() and self.host == socket.gethostname()


class Held(Exception):
    """The lock is held by another descriptor; ``holder`` is who, or None when its file does not say (yet)."""

    def __init__(self, path: Path, holder: Holder | None) -> None:
        super().__init__(f"{path} is locked" + (f" by {holder.words()}" if holder else ""))
        self.path, self.holder = path, holder


def read_holder(path: Path) -> Holder | None:
    """The holder the file names; None when unreadable, or when it names a process of this host that is gone
    (a file left by a dead holder, read in the instant before a new holder rewrites it)."""
    try:
        d = json.loads(Path(path).read_text())
        holder = Holder(int(d["pid"]), float(d["started"]), str(d["host"]))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if holder.host == socket.gethostname():
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return None
        except OSError:  # PermissionError: alive, another user's
            pass
    return holder


def check_free(path: Path) -> None:
    """``Held`` when ``path`` is locked now; creates nothing (no file: not locked).  A probe, for a caller that
    would fail before slow work rather than at the take: the lock is tried shared and let go at once (a take in that
    instant is refused, as if the folder were busy; of two runs started together, one goes on)."""
    if fcntl is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no such file (or folder): nobody holds it; unreadable: the take will say why
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise Held(Path(path), read_holder(path)) from None
    finally:
        os.close(fd)  # lets go of the probe's shared lock


@contextlib.contextmanager
def exclusive(path: Path, busy: Callable[[Holder | None], BaseException] | None = None) -> Iterator[None]:
    """Hold ``path``'s lock (the file is created, its folder must exist) while the block runs; ``Held`` at once,
    without waiting, when another descriptor holds it, or ``busy(holder)`` when given: the caller's own error for
    a refused take, raised here so that a ``Held`` from inside the block (another folder's lock) is never taken
    for this one's."""
    if fcntl is None:
        yield
        return
    try:
        fd = _take(Path(path))
    except Held as e:
        if busy is None:
            raise
        raise busy(e.holder) from None
    try:
        me = {"pid": os.getpid(), "started": time.time(), "host": socket.gethostname()}
        with contextlib.suppress(OSError):  # the lock holds without its note
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(me).encode())
        yield
    finally:
        os.close(fd)  # releases the flock


def _take(path: Path) -> int:
    """A descriptor holding the flock of the file ``path`` names now; ``Held`` when another descriptor holds it.

    Why the check after the flock: a take that opened the file just before its holder removed it (and maybe its
    folder) would get the flock of a file nobody else can see once the holder lets go, and a third take would lock
    a new file at the path: two holders.  Such a take opens the path again (``FileNotFoundError`` when its folder
    is gone)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _names(path, fd):
                return fd
        except BlockingIOError:
            os.close(fd)
            raise Held(path, read_holder(path)) from None
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the file was removed (or replaced) under us: take the one there now


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` is (still) the file open on ``fd``."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
