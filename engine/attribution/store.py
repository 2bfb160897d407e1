"""On-disk cache of attribution artefacts (banks, factors, projected features, embeddings).

Layout (docs/architecture.md §10: caches record the settings they were built with)::

    root/<checkpoint_hash>/<data_key>/<name>-<settings digest>/
        settings.json      name, settings, checkpoint hash, data key, array shapes; written last
        <array>.npy        one per array, memory-mappable

Why this shape:

* The folder name carries a digest of the settings, so a changed setting (M, seed,
  projection dim, fisher type, ...) can never load an artefact built with other settings.
* ``settings.json`` repeats everything, so a folder whose content contradicts its name
  (edited, copied between checkpoints, half-synced) is refused with ``StaleCacheError``
  instead of silently giving wrong scores.
* Publishing is atomic: arrays are written into a hidden ``.tmp-*`` folder that is renamed
  to its final name only when complete, so an interrupted build leaves nothing that loads.
* Long builds go through ``PartialBuild``: parts are saved one by one in a hidden
  ``.partial-*`` folder keyed by the same settings; a resumed build keeps the finished
  parts, and ``publish()`` concatenates them (streamed, via memory maps) and renames.
* Integrity (issue 14): every array's CRC-32 (of its ``.npy`` file) is recorded in
  ``settings.json`` when it is published and checked the first time a process loads it
  (``load_arrays``; ``verify`` checks on demand), so a flipped byte in a bank part or a
  factor is refused with a message naming the file and the rebuild command instead of
  giving silently wrong (or NaN) scores.  CRC-32 because it runs at ~1 GB/s (SHA-256:
  ~0.4 GB/s here): corruption, not forgery, is the threat (whoever can edit the arrays can
  edit settings.json too).  Caches published before this have no checksums and load as before.
* Concurrency: ``lock()`` is an ``fcntl.flock`` per cache entry, held by a build from
  "is it there?" to "published", so a second build of the same entry in another process
  waits and then finds it built.  Temporary folders carry the writer's pid; those of
  dead processes are removed (``clean_stale_temp``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..model.dataset import ImageDataset
from ..npy_read import load_npy
from .partial_build import BUILD_NOTE, PartialBuild, saved_parts
from .store_files import (
    SETTINGS,
    ArrayLike,
    canonical,
    check_key,
    file_crc32,
    fsync_dir,
    pid_alive,
    save_npy,
    settings_digest,
    to_numpy,
    write_json,
)

FORMAT = 1


class CacheRootError(OSError):
    """The cache root cannot hold caches (a file, /proc, a read-only mount, no permission)."""


class StaleCacheError(RuntimeError):
    """A cache folder exists but does not match what it claims to be; the message says which and what to do."""


# Files already verified by this process: (path, size, mtime_ns) -> True.  A published cache is
# never rewritten in place, so a changed file gets a new key and is checked again.
_VERIFIED: set[tuple[str, int, int]] = set()


def _file_identity(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns)


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def data_key(dataset: ImageDataset, digest: str | None = None) -> str:
    """Cache key of a training set: name, size and a hash of its images and labels.

    Two data sets with the same name but other content (a subset, other files) get
    different keys, so a cache can never be scored against the wrong images.  The name is kept to
    letters, digits and ``._-`` (an image folder's set is named ``folder:<its name>``, and a colon or a
    space has no place in a folder name on every file system).  Two names that become the same text
    share a key only when their images and labels are identical too (the content hash), which is
    harmless: caches depend on the content alone.  Caches built before 2026-12-05 for an image folder
    (``folder:<name>-n...``) are not found under the new key and are built again.  ``digest``: the set's
    ``content_digest()`` when the caller has it already (hashing CIFAR-10 takes about a second).
    """
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset.name).lstrip(".") or "data"
    return f"{name}-n{len(dataset)}-{(digest or dataset.content_digest())[:12]}"


class Store:
    """One folder per (checkpoint hash, data, artefact name, settings); atomic writes; refuses stale caches."""

    def __init__(self, root: str | Path, checkpoint_hash: str, data_key: str):
        for part, what in ((checkpoint_hash, "checkpoint_hash"), (data_key, "data_key")):
            if not part or "/" in part or part.startswith("."):
                raise ValueError(f"bad {what} {part!r}")
        self.root = Path(root)
        self.checkpoint_hash = checkpoint_hash
        self.data_key = data_key
        self.base = self.root / checkpoint_hash / data_key
        # The command that rebuilds a refused cache; the session sets it (it knows the preset).
        self.rebuild_hint: str | None = None
        # notes a build's partial folder is made with (``note_new_build``), by folder
        self._first_notes: dict[Path, dict[str, Any]] = {}
        try:  # what killed writers left behind (a listing of one folder: cheap); a read-only root keeps it
            self.clean_stale_temp()
        except OSError:
            pass

    def _fix(self, folder: Path) -> str:
        if self.rebuild_hint:
            return f"rebuild it with `{self.rebuild_hint}` (or delete {folder})"
        return f"delete {folder} (or call Store.remove) and build again"

    # --- naming -------------------------------------------------------------------------

    def path(self, name: str, settings: Mapping[str, Any]) -> Path:
        """Final folder of artefact ``name`` built with ``settings``."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad artefact name {name!r}")
        return self.base / f"{name}-{settings_digest(settings)}"

    def _manifest(self, name: str, settings: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": name,
            "settings": canonical(settings),
            "digest": settings_digest(settings),
            "checkpoint_hash": self.checkpoint_hash,
            "data_key": self.data_key,
        }

    # --- validation ---------------------------------------------------------------------

    def validate(self, name: str, settings: Mapping[str, Any]) -> dict[str, Any] | None:
        """The folder's manifest if it is a valid cache for these settings, None if absent.

        Raises ``StaleCacheError`` if the folder exists but contradicts its name: different
        settings, another checkpoint or data set, or missing/truncated arrays.
        """
        folder = self.path(name, settings)
        if not folder.exists():
            return None
        fix = self._fix(folder)
        mpath = folder / SETTINGS
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StaleCacheError(f"cache {folder} has no readable {SETTINGS} ({e}); {fix}") from e
        if not isinstance(manifest, dict):
            raise StaleCacheError(f"cache {folder}: {SETTINGS} is not a JSON object; {fix}")
        want = self._manifest(name, settings)
        for key in ("format", "name", "checkpoint_hash", "data_key", "settings"):
            if manifest.get(key) != want[key]:
                raise StaleCacheError(
                    f"cache {folder} is stale or mismatched: its {key} is {manifest.get(key)!r}, "
                    f"expected {want[key]!r}; {fix}"
                )
        arrays = manifest.get("arrays", {})
        if not isinstance(arrays, dict):
            raise StaleCacheError(f"cache {folder}: {SETTINGS} has no valid 'arrays' entry; {fix}")
        on_disk = {p.name[: -len(".npy")] for p in folder.glob("*.npy") if not p.name.startswith(".")}
        unlisted = sorted(on_disk - set(arrays))
        if unlisted:  # an entry removed from settings.json: its consumer would fail with a KeyError
            raise StaleCacheError(
                f"cache {folder}: {SETTINGS} does not list array(s) {', '.join(unlisted[:5])}; the file was "
                f"edited or is corrupt; {fix}"
            )
        for key, info in arrays.items():
            p = folder / f"{key}.npy"
            if not p.is_file():
                raise StaleCacheError(f"cache {folder} is missing array {key}.npy; {fix}")
            try:
                shape, dtype = list(info["shape"]), str(info["dtype"])
            except (KeyError, TypeError) as e:
                raise StaleCacheError(f"cache {folder}: {SETTINGS} entry for {key} is malformed ({e!r}); {fix}") from e
            try:
                a = load_npy(p, mmap_mode="r")
            except (OSError, ValueError, EOFError) as e:
                raise StaleCacheError(f"cache {folder}: array {key}.npy is unreadable ({e}); {fix}") from e
            if list(a.shape) != shape or str(a.dtype) != dtype:
                raise StaleCacheError(
                    f"cache {folder}: array {key} has shape {a.shape} {a.dtype}, "
                    f"settings.json says {tuple(shape)} {dtype}; {fix}"
                )
        return manifest

    def verify(self, name: str, settings: Mapping[str, Any], force: bool = False) -> dict[str, Any] | None:
        """``validate`` plus the recorded CRC-32 of every array (each file once per process unless ``force``).

        Raises ``StaleCacheError`` naming the corrupt file and the rebuild command.
        """
        manifest = self.validate(name, settings)
        if manifest is None:
            return None
        folder = self.path(name, settings)
        for key, info in manifest.get("arrays", {}).items():
            want = info.get("crc32") if isinstance(info, dict) else None
            if want is None:
                continue  # published before checksums were recorded
            p = folder / f"{key}.npy"
            ident = _file_identity(p)
            if not force and ident in _VERIFIED:
                continue
            got = file_crc32(p)
            if got != want:
                raise StaleCacheError(
                    f"cache file {p} is corrupt (CRC-32 {got}, settings.json recorded {want}); {self._fix(folder)}"
                )
            _VERIFIED.add(ident)
        return manifest

    def exists(self, name: str, settings: Mapping[str, Any]) -> bool:
        """True when a complete, matching cache is there (a stale folder counts as absent; ``validate`` says why)."""
        try:
            return self.validate(name, settings) is not None
        except StaleCacheError:
            return False

    # --- whole artefacts ----------------------------------------------------------------

    def save_arrays(
        self,
        name: str,
        settings: Mapping[str, Any],
        arrays: Mapping[str, ArrayLike],
        meta: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write all arrays and publish them atomically; returns the final folder.

        ``meta`` is free-form JSON (timings, notes) stored in settings.json but not part of the key.
        """
        final = self.path(name, settings)
        self.validate(name, settings)  # refuse to shadow a stale folder silently
        tmp = self._tmp_folder(name, settings)
        try:
            infos = {}
            for key, a in arrays.items():
                check_key(key)
                arr = to_numpy(a)
                save_npy(tmp / f"{key}.npy", arr)
                infos[key] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "crc32": file_crc32(tmp / f"{key}.npy")}
            self._finish(tmp, final, name, settings, infos, meta)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def copy_from(self, other: Store, name: str, settings: Mapping[str, Any]) -> bool:
        """Publish ``other``'s artefact ``(name, settings)`` here when this store lacks it; True when copied.

        For a cache root that starts beside another of the same model and data (``lds-ablation``'s variants
        beside their baseline: QA 25 #2, a variant recomputed the K-FAC factors the baseline held under the
        same key, about a minute on digits).  The arrays are read through ``load_arrays`` (their checksums are
        checked) and written by ``save_arrays`` (atomic); the meta keeps the original build's record and
        names the folder it came from.  Another model or data, or nothing to copy: False."""
        if (other.checkpoint_hash, other.data_key) != (self.checkpoint_hash, self.data_key) or self.exists(name, settings):
            return False
        arrays = other.load_arrays(name, settings)
        if arrays is None:
            return False
        meta = {**(other.load_meta(name, settings) or {}), "copied_from": str(other.path(name, settings))}
        self.save_arrays(name, settings, arrays, meta=meta)
        return True

    def _tmp_folder(self, name: str, settings: Mapping[str, Any]) -> Path:
        self.base.mkdir(parents=True, exist_ok=True)
        self.clean_stale_temp()
        tmp = self.base / f".tmp-{name}-{settings_digest(settings)}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        return tmp

    def _finish(
        self,
        tmp: Path,
        final: Path,
        name: str,
        settings: Mapping[str, Any],
        infos: dict[str, Any],
        meta: Mapping[str, Any] | None,
    ) -> None:
        manifest = self._manifest(name, settings)
        manifest["arrays"] = infos
        manifest["meta"] = dict(meta or {})
        torch = sys.modules.get("torch")  # loaded wherever arrays are computed; the store itself does not need it
        if torch is not None:
            # the last bits of a cache depend on torch's intra-op thread count (reductions split across threads;
            # QA round 21: factors at 1 and 2 threads differ by relative L2 1.6e-5, rankings not at all)
            manifest["meta"].setdefault("threads", int(torch.get_num_threads()))
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_json(tmp / SETTINGS, manifest)
        fsync_dir(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Someone else published first (same settings, so same content): keep theirs if valid.
            if self.validate(name, settings) is None:
                raise
        fsync_dir(final.parent)

    def load_arrays(
        self, name: str, settings: Mapping[str, Any], mmap: bool = True
    ) -> dict[str, np.ndarray] | None:
        """The arrays (memory-mapped read-only by default), or None when not built; StaleCacheError if stale."""
        manifest = self.verify(name, settings)
        if manifest is None:
            return None
        folder = self.path(name, settings)
        mode = "r" if mmap else None
        return {
            k: load_npy(folder / f"{k}.npy", mmap_mode=mode) for k in manifest["arrays"]
        }

    # --- concurrency --------------------------------------------------------------------

    def check_writable(self) -> None:
        """Create this store's folder and a probe file in it; CacheRootError naming the root otherwise.

        Called before a build takes its lock: an unwritable root (a file, /proc, a read-only mount)
        used to show "waiting for another build of this cache" and then mkdir's bare errno."""
        try:
            self.base.mkdir(parents=True, exist_ok=True)
            probe = self.base / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.close(fd)
            probe.unlink()
        except OSError as e:
            raise CacheRootError(
                f"cache root {self.root} is not writable ({e.strerror or e}"
                + (f": {e.filename}" if e.filename else "")
                + "); choose a writable folder (--cache-root or $ATTRIBUTION_CACHE)"
            ) from None

    @contextlib.contextmanager
    def lock(
        self, name: str, settings: Mapping[str, Any] | None = None, wait: bool = True,
        on_wait: Callable[[], None] | None = None,
        while_waiting: Callable[[float], None] | None = None, poll_seconds: float = 2.0,
    ) -> Iterator[bool]:
        """Exclusive cross-process lock of one cache entry (``fcntl.flock`` on a hidden lock file).

        Yields True when held; with ``wait=False`` yields False at once if another process holds
        it.  ``on_wait`` is called only when another process holds it and this one is about to wait
        (a progress message: "waiting" shown for every uncontended build was noise); then, with
        ``while_waiting``, the lock is tried every ``poll_seconds`` and ``while_waiting(seconds waited)``
        called between tries (QA round 14: a CLI waiting 17.7 min on the app's build showed one line and a
        0% bar, and looked hung).  The lock is released when the holder exits or is killed (the kernel
        drops flocks), so a ``kill -9`` never leaves a cache locked.
        """
        self.base.mkdir(parents=True, exist_ok=True)
        tag = name if settings is None else f"{name}-{settings_digest(settings)}"
        path = self.base / f".lock-{tag}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    yield False
                    return
                if on_wait is not None:
                    on_wait()
                if while_waiting is None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                else:
                    t0 = time.monotonic()
                    while True:
                        time.sleep(poll_seconds)
                        try:
                            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                            break
                        except BlockingIOError:
                            while_waiting(time.monotonic() - t0)
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError:
                pass
            yield True
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def clean_stale_temp(self) -> list[Path]:
        """Remove ``.tmp-*`` and ``.partial-*.init-*`` folders whose writer process is gone, and the
        ``.partial-*`` folder of a cache already published (a kill between ``PartialBuild.publish``'s
        rename and its clean-up left the parts, as large as the cache, beside it); returns them.

        Temporary names end in ``-<pid>-<8 hex>`` (``_tmp_folder``); a folder without a parsable pid is
        left alone.  Temporary files inside ``.partial-*`` folders are removed by ``PartialBuild``.
        """
        removed: list[Path] = []
        if not self.base.is_dir():
            return removed
        for folder in self.base.iterdir():
            is_init = folder.name.startswith(".partial-") and ".init-" in folder.name
            published = self.base / folder.name.removeprefix(".partial-")
            if folder.name.startswith(".partial-") and not is_init and (published / SETTINGS).is_file():
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
                continue
            if not (folder.name.startswith(".tmp-") or is_init) or not folder.is_dir():
                continue
            parts = folder.name.rsplit("-", 2)
            try:
                pid = int(parts[1])
            except (IndexError, ValueError):
                continue
            if pid != os.getpid() and not pid_alive(pid):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        return removed

    def size_mb(self, name: str, settings: Mapping[str, Any]) -> float:
        """Disk size of one published artefact in MiB (0 when not built)."""
        folder = self.path(name, settings)
        return _folder_size(folder) / 2**20 if folder.is_dir() else 0.0

    def load_meta(self, name: str, settings: Mapping[str, Any]) -> dict[str, Any] | None:
        manifest = self.validate(name, settings)
        return None if manifest is None else dict(manifest.get("meta", {}))

    def remove(self, name: str, settings: Mapping[str, Any]) -> None:
        """Delete a published artefact and any partial build of it."""
        for folder in (self.path(name, settings), self._partial_folder(name, settings)):
            if folder.exists():
                shutil.rmtree(folder)

    def build_progress(self, keys: list[tuple[str, Mapping[str, Any]]]) -> tuple[float, str]:
        """How far a build of these cache entries (another process's, perhaps) has got, read from the disk:
        (fraction, words), e.g. (0.4, "kfac-bank 12/30 parts").  A published entry counts as done, a
        resumable build by its saved parts, anything else (a factor pass) as not started."""
        fractions, words = [], []
        for name, settings in keys:
            if self.path(name, settings).is_dir():
                fractions.append(1.0)
                continue
            saved = saved_parts(self._partial_folder(name, settings))
            if saved is None:
                fractions.append(0.0)
                continue
            done, total = saved
            fractions.append(done / max(total, 1))
            words.append(f"{name} {done}/{total} parts")
        return (sum(fractions) / len(fractions) if fractions else 0.0), ", ".join(words)

    def _partial_folder(self, name: str, settings: Mapping[str, Any]) -> Path:
        return self.base / f".partial-{name}-{settings_digest(settings)}"

    def has_saved_parts(self, name: str, settings: Mapping[str, Any]) -> bool:
        """Whether an interrupted build of ``name`` left finished parts to resume from (cheap: one folder listing)."""
        folder = self._partial_folder(name, settings)
        return folder.is_dir() and any(folder.glob("part-*.done"))

    def build_started(self, name: str, settings: Mapping[str, Any]) -> bool:
        """Whether a build of ``name`` began and did not publish: its partial folder is made (with its manifest)
        when the build starts, before its first part, so a build killed before saving a part still shows here."""
        return self._partial_folder(name, settings).is_dir()

    def build_note(self, name: str, settings: Mapping[str, Any]) -> dict[str, Any]:
        """What a begun, unpublished build of ``name`` noted for its later attempts (``write_build_note``); {} when
        there is no such build or note, or the note does not read back."""
        try:
            note = json.loads((self._partial_folder(name, settings) / BUILD_NOTE).read_text())
        except (OSError, ValueError):
            return {}
        return note if isinstance(note, dict) else {}

    def note_new_build(self, name: str, settings: Mapping[str, Any], note: Mapping[str, Any]) -> None:
        """``note`` for a build of ``name`` about to begin in this process: its partial folder is made with it
        (``PartialBuild`` writes it beside the manifest before the folder appears), so no kill can leave the
        folder without it (QA 53 #1: written at the bank's first message, 1.2 s after the folder, a kill between
        the two left a build whose restart drew the wrong bar)."""
        self._first_notes[self._partial_folder(name, settings)] = dict(note)

    def _first_note(self, name: str, settings: Mapping[str, Any]) -> dict[str, Any] | None:
        return self._first_notes.get(self._partial_folder(name, settings))

    def write_build_note(self, name: str, settings: Mapping[str, Any], note: Mapping[str, Any]) -> bool:
        """Keep ``note`` beside a begun build's parts, for its later attempts (the note goes with the folder at
        publish); whether it was written: False while the build has not begun (no partial folder yet)."""
        folder = self._partial_folder(name, settings)
        if not folder.is_dir():
            return False
        try:
            write_json(folder / BUILD_NOTE, dict(note))
        except OSError:  # the folder went (published, or discarded) meanwhile: nothing to note for
            return False
        return True

    def partial(self, name: str, settings: Mapping[str, Any], part_size: int, num_items: int) -> PartialBuild:
        """A resumable build of arrays whose first axis (length ``num_items``) is produced in parts."""
        return PartialBuild(self, name, settings, part_size, num_items)

    # --- status for the app -------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        """What is built for this checkpoint and data: name, settings, size MB, state, folder.

        ``state`` is ``ok``, ``stale`` (refused at load; the reason is in ``reason``) or
        ``partial`` (a resumable build in progress, with ``parts_done``).
        """
        out: list[dict[str, Any]] = []
        if not self.base.is_dir():
            return out
        for folder in sorted(self.base.iterdir()):
            if not folder.is_dir():
                continue
            entry: dict[str, Any] = {"folder": str(folder), "size_mb": _folder_size(folder) / 2**20}
            if folder.name.startswith(".partial-") and ".init-" not in folder.name:
                try:
                    m = json.loads((folder / SETTINGS).read_text())
                except (OSError, json.JSONDecodeError):
                    continue
                done = len(list(folder.glob("part-*.done")))
                entry.update(name=m.get("name"), settings=m.get("settings", {}), state="partial")
                entry.update(parts_done=done, parts_total=m.get("num_parts"))
                out.append(entry)
                continue
            if folder.name.startswith("."):
                continue
            try:
                m = json.loads((folder / SETTINGS).read_text())
                name, settings = m["name"], m["settings"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                entry.update(
                    name=folder.name, settings={}, state="stale", reason=f"unreadable settings.json: {e}"
                )
                out.append(entry)
                continue
            entry.update(name=name, settings=settings, meta=m.get("meta", {}), created=m.get("created"))
            try:
                if self.path(name, settings) != folder:
                    raise StaleCacheError(f"folder name {folder.name} does not match its settings.json")
                self.validate(name, settings)
                entry["state"] = "ok"
            except StaleCacheError as e:
                entry.update(state="stale", reason=str(e))
            out.append(entry)
        return out



# PartialBuild and the file helpers live in their own modules; these names are the store's public face
__all__ = [
    "FORMAT", "SETTINGS", "CacheRootError", "PartialBuild", "StaleCacheError", "Store",
    "canonical", "data_key", "file_crc32", "settings_digest",
]
