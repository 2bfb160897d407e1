"""A cache of decoded image folders: one ``.npz`` per folder and size, read instead of decoding every file again.

Why: ``data_files.load_folder`` opened, decoded and Lanczos-resized every image with PIL on every command
(train, query, build, the app's start, ...): minutes each time for a 50,000-image folder (QA 33 #8).  The
decoded uint8 array depends only on the files and the decoding settings, so it is kept under a key of
exactly those, and a second load of an unchanged folder reads one file.

* **key**: the sorted relative paths with each file's size, mtime_ns and ctime_ns (a ``stat``, no file bytes
  read), the channels, the image size, the decoding code's version (``data_files.FOLDER_DECODE_VERSION``) and
  Pillow's version (its resampling and decoders make the pixels).  Any touched, replaced, added or removed
  file gives another key, so a miss.  ctime too: ``cp -p`` or a restore can give a replaced file its old
  size and mtime, never its old ctime.
* **where**: ``$ATTRIBUTION_DATA_CACHE``, else ``$XDG_CACHE_HOME/diffusion-attribution/folders``, else
  ``~/.cache/diffusion-attribution/folders``; never the data folder, which may be read-only or shared.
  ``ATTRIBUTION_DATA_CACHE=off`` turns it off.  One file per (folder, channels, size): a changed folder
  overwrites its own entry instead of leaving old ones behind.
* **safety**: written through a temporary file and a rename (``engine.files.save_npz``), so a kill leaves
  the old entry or the new one; an entry that does not read back whole, with its own key and the expected
  shape and dtype, is a miss (decoded again and rewritten).  The cache never fails a load: an unwritable
  folder is said once, then the load goes on without it.
* **pruning**: an entry's mtime is its last use (a hit sets it to now).  After each write, entries not used
  for ``MAX_AGE_S`` (30 days: a renamed, moved or deleted folder's entry is never read again) are removed, then
  the least recently used ones while all of them together exceed ``$ATTRIBUTION_DATA_CACHE_MAX_GB`` GiB
  (default 4).  The entry just written is never removed, whatever its size, and only files named as entries
  (and writers' temporaries older than ``STALE_TMP_S``) are: the folder may be one the user chose and shares.
  Other processes may prune, write or read meanwhile: an entry that vanishes before it is read is a miss
  (decoded again), one removed while read is still read whole (an open file outlives its name on POSIX), and
  an entry rewritten or used after it was listed for removal is left.
* **racy files**: a file whose mtime or ctime lies within ``SETTLE_NS`` of the listing's time could still
  change inside the same timestamp tick (Linux stamps with a coarse clock, FAT in 2 s steps) with nothing
  in its ``stat`` to show it; such a folder is decoded but not cached this time (git's "racily clean"
  rule, made simpler).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..files import save_npz
from ..npy_read import load_npz

CACHE_ENV = "ATTRIBUTION_DATA_CACHE"
OFF_VALUES = ("off", "0", "no", "false", "none")
FORMAT = 2  # the layout of an entry (arrays "images", "sizes" and "key"); bump it if that changes (2: "sizes")
SETTLE_NS = 2_000_000_000  # a file stamped this close to the listing is "racy" (see the module docstring)
STALE_TMP_S = 600  # a writer's temporary file older than this was left by a killed process (a write takes seconds)
MAX_AGE_S = 30 * 86400  # an entry not used for this long is removed at the next write (see the module docstring)
MAX_GB_ENV = "ATTRIBUTION_DATA_CACHE_MAX_GB"
DEFAULT_MAX_GB = 4.0  # the entries' total size kept, least recently used removed first (a 50,000 x 3x32x32 entry: 150 MB)
# the names ``entry_path`` gives, and those of a writer's temporary file beside one (``files.atomic_write_bytes``):
# pruning removes nothing else
_ENTRY = r"[A-Za-z0-9_.-]+-c\d+-s(?:\d+|native)-[0-9a-f]{20}\.npz"
_ENTRY_NAME = re.compile(_ENTRY)
_TEMPORARY_NAME = re.compile(rf"\.{_ENTRY}\.[^/]+\.tmp")

_warned: set[str] = set()  # cache folders and settings already said to be unusable, so a process says it once


def cache_dir(environ: dict[str, str] | None = None) -> Path | None:
    """Where entries live (see the module docstring); None when ``ATTRIBUTION_DATA_CACHE`` turns the cache off."""
    env = os.environ if environ is None else environ
    chosen = env.get(CACHE_ENV, "").strip()
    if chosen.lower() in OFF_VALUES:
        return None
    if chosen:
        return Path(chosen).expanduser()
    xdg = env.get("XDG_CACHE_HOME", "").strip()
    if xdg and Path(xdg).is_absolute():  # the XDG spec ignores a relative one
        return Path(xdg) / "diffusion-attribution" / "folders"
    home = Path(os.path.expanduser("~"))
    if not home.is_absolute():  # no HOME and no passwd entry: "~" stays as it is, and would land in the work folder
        return None
    return home / ".cache" / "diffusion-attribution" / "folders"


def folder_key(files: list[Path], rel: list[str], channels: int, size: int | None, decoder_version: int,
               now_ns: int | None = None) -> tuple[str, bool]:
    """(SHA-256 of what the decoded array depends on, whether a file is too recent to trust its ``stat``).
    ``rel``: the files' relative paths (the data set's ids), given, as pathlib's ``relative_to`` is slow for
    50,000 files.  ``OSError`` if a file cannot be ``stat``-ed (gone since it was listed)."""
    import PIL

    now = time.time_ns() if now_ns is None else now_ns
    rows, racy = [], False
    for p, r in zip(files, rel, strict=True):
        st = os.stat(p)
        rows.append([r, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
        racy = racy or any(abs(now - t) < SETTLE_NS for t in (st.st_mtime_ns, st.st_ctime_ns))
    material = {"format": FORMAT, "decoder": decoder_version, "pillow": PIL.__version__, "channels": channels,
                "image_size": size, "files": rows}
    text = json.dumps(material, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest(), racy


def entry_path(folder: Path, root: Path, channels: int, size: int | None) -> Path:
    """The entry of this folder at these settings: its name (readable) and a hash of its absolute path."""
    slot = hashlib.sha256(f"{root.resolve()}\0{channels}\0{size}".encode()).hexdigest()[:20]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", root.resolve().name)[:40].strip("._") or "folder"
    return folder / f"{name}-c{channels}-s{size or 'native'}-{slot}.npz"


def read_entry(path: Path, key: str, n: int, channels: int,
               size: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached uint8 (n, channels, H, W) array and the files' own int32 (n, 2) sizes, or None for a miss: no
    entry, another key (the folder or the settings changed), or an entry that does not read back whole with the
    right shapes and dtypes."""
    try:
        with load_npz(path) as z:
            if str(z["key"][()]) != key:
                return None
            x, sizes = z["images"], z["sizes"]
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001 - a damaged entry of any kind (cut short, garbage, not a zip) is a miss
        return None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:2] != (n, channels):
        return None
    if size is not None and x.shape[2:] != (size, size):
        return None
    if sizes.dtype != np.int32 or sizes.shape != (n, 2):
        return None
    return x, sizes


def _warn_once(folder: Path, message: str) -> None:
    """``message`` as a warning, the first time ``folder`` is found unusable in this process: a run loading several
    folders, or the app reloading one, says it once.  Both callers are two calls below ``load_folder``, which the
    warning names as its place."""
    if str(folder) in _warned:
        return
    _warned.add(str(folder))
    warnings.warn(f"{message}. Set {CACHE_ENV} to a writable folder, or to 'off' to not try", stacklevel=4)


def _file_in_the_way(folder: Path) -> Path | None:
    """``folder``, or the nearest of its parents that exists, when that is a file and not a folder: the cache cannot
    be made there.  Why: ``ATTRIBUTION_DATA_CACHE=/some/file`` said only "[Errno 17] File exists", after the whole
    decode, in words that did not say the cache was off."""
    for p in (folder, *folder.parents):
        if os.path.isdir(p):
            return None
        if os.path.lexists(p):
            return p
    return None


def _warn_not_a_folder(folder: Path, blocker: Path) -> None:
    where = (f"the decoded-image cache {folder} is a file, not a folder" if blocker == folder else
             f"cannot make the decoded-image cache folder {folder}: {blocker} is a file, not a folder")
    _warn_once(folder, f"{where}; the cache is off for this run (image folders are decoded each time)")


def _listed(folder: Path, name: re.Pattern[str]) -> list[tuple[Path, float, int]]:
    """(path, mtime, size) of the plain files in ``folder`` whose name ``name`` matches; a file that vanishes while
    listed (another process removed it) is left out, and an unreadable folder lists nothing."""
    found = []
    try:
        with os.scandir(folder) as entries:
            for e in entries:
                if not name.fullmatch(e.name):
                    continue
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    found.append((Path(e.path), st.st_mtime, st.st_size))
    except OSError:
        return []
    return found


def _remove(path: Path, listed_mtime: float) -> bool:
    """Remove ``path`` unless another process rewrote or used it since it was listed (its mtime moved); whether it
    is gone.  One already gone (another process pruned it) counts as removed."""
    try:
        if os.stat(path).st_mtime != listed_mtime:
            return False
        os.unlink(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _remove_stale_temporaries(folder: Path) -> None:
    """Temporary files that killed writers left in the cache (``files.atomic_write_bytes`` names them
    ``.<entry>.*.tmp``): a 50,000-image entry is 150 MB or more, too much to leave lying about.  The whole folder's,
    not only this entry's: a killed writer's folder may never be loaded again (renamed, deleted)."""
    cutoff = time.time() - STALE_TMP_S
    for tmp, mtime, _ in _listed(folder, _TEMPORARY_NAME):
        if mtime < cutoff:
            _remove(tmp, mtime)


def max_bytes(environ: dict[str, str] | None = None) -> int:
    """The cap on the entries' total size: ``$ATTRIBUTION_DATA_CACHE_MAX_GB`` GiB (a number, 0.5 for 512 MiB), else
    ``DEFAULT_MAX_GB``.  A value that is not a number is said once and the default kept: a typo must not empty
    the cache, nor stop a run."""
    env = os.environ if environ is None else environ
    text = env.get(MAX_GB_ENV, "").strip()
    try:
        gb = float(text) if text else DEFAULT_MAX_GB
    except ValueError:
        gb = math.nan
    if not math.isfinite(gb) or gb < 0:
        if f"{MAX_GB_ENV}={text}" not in _warned:
            _warned.add(f"{MAX_GB_ENV}={text}")
            warnings.warn(f"{MAX_GB_ENV}={text!r} is not a size in GiB (a number such as 4 or 0.5); the decoded-image "
                          f"cache keeps its default cap of {DEFAULT_MAX_GB:g} GiB", stacklevel=2)
        gb = DEFAULT_MAX_GB
    return int(gb * 2**30)


def prune(folder: Path, keep: Path, now: float | None = None) -> list[Path]:
    """Remove the entries in ``folder`` not used for ``MAX_AGE_S``, then the least recently used while the entries'
    total exceeds ``max_bytes()``; never ``keep`` (the entry just written).  The removed paths."""
    now = time.time() if now is None else now
    cap = max_bytes()
    listed = _listed(folder, _ENTRY_NAME)
    others = sorted((e for e in listed if e[0].name != keep.name), key=lambda e: e[1])  # least recently used first
    total = sum(size for _, _, size in listed)
    removed = []
    for path, used, size in others:
        if used >= now - MAX_AGE_S and total <= cap:
            break  # the rest were used later, and all fit
        if _remove(path, used):
            removed.append(path)
            total -= size
    return removed


def _mark_used(path: Path) -> None:
    """Set a read entry's mtime to now, its last use, which pruning goes by.  A read-only cache (nothing is pruned
    there) or an entry another process has just removed is left as it is."""
    try:
        os.utime(path)
    except OSError:
        pass


def write_entry(path: Path, key: str, x: np.ndarray, sizes: np.ndarray) -> bool:
    """Store ``x`` and the files' own ``sizes`` under ``key`` atomically, then prune the cache; an unwritable
    folder (or a full disk) is said once, not raised.  Whether it was stored."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_npz(path, images=x, sizes=np.asarray(sizes, dtype=np.int32), key=np.array(key))
    except OSError as e:
        _warn_once(path.parent, f"cannot write the decoded-image cache in {path.parent} ({e}); image folders will be "
                                "decoded again next time")
        return False
    prune(path.parent, keep=path)
    return True


def load_or_decode(root: Path, files: list[Path], rel: list[str], channels: int, size: int | None,
                   decoder_version: int,
                   decode: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 (N, C, H, W) array of ``files`` (listed under ``root``, ``rel`` their relative paths) and the
    files' own int32 (N, 2) (width, height): from the cache when an entry of this exact folder state exists, else
    ``decode()``'s, which is then stored (unless the cache is off or a file is racy).  Byte-identical either way,
    so the data set's ``content_digest`` does not depend on the cache."""
    folder = cache_dir()
    if folder is None:
        return decode()
    blocker = _file_in_the_way(folder)
    if blocker is not None:
        _warn_not_a_folder(folder, blocker)
        return decode()
    try:
        key, racy = folder_key(files, rel, channels, size, decoder_version)
    except OSError:  # a file went away since the listing: decode() names it
        return decode()
    path = entry_path(folder, root, channels, size)
    # on every load, not only at a write: after a kill mid-write, the rerun's entry is read by every later load, and
    # none of them writes again (QA 36 #4: a 100 MB temporary left for good)
    _remove_stale_temporaries(folder)
    hit = read_entry(path, key, len(files), channels, size)
    if hit is not None:
        _mark_used(path)
        return hit
    x, sizes = decode()
    if not racy:
        write_entry(path, key, x, sizes)
    return x, sizes
