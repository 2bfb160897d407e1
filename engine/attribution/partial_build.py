"""Resumable chunked cache builds (``Store.partial``): parts saved one by one, published at once.

Why: a bank or a feature pass takes minutes to hours; saving each part as it finishes (with a marker
written last) lets a killed build resume where it stopped, and publishing concatenates the parts into
one memory-mappable array per key and renames the folder into place atomically (``store``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..npy_read import load_npy
from .store_files import (
    PID_TMP,
    SETTINGS,
    ArrayLike,
    canonical,
    check_key,
    disk_space,
    file_crc32,
    human_bytes,
    pid_alive,
    reserve,
    save_npy,
    to_numpy,
    write_json,
)

ELAPSED = "elapsed.json"  # the seconds the build has run up to its last saved part, over its attempts
SHARED = "shared.json"  # {"with": method}: parts were filled by that method's gradient pass (its time, not ours)
BUILD_NOTE = "note.json"  # what a build keeps for its later attempts (``Store.write_build_note``)


class StoreFolders(Protocol):
    """What a partial build needs of the ``Store`` that made it (``Store.partial``): where its folders
    go, the manifest it checks, and the atomic publish step.  A protocol, not an import of ``store``,
    which imports this module."""

    def path(self, name: str, settings: Mapping[str, Any]) -> Path: ...
    def validate(self, name: str, settings: Mapping[str, Any]) -> dict[str, Any] | None: ...
    def _partial_folder(self, name: str, settings: Mapping[str, Any]) -> Path: ...
    def _first_note(self, name: str, settings: Mapping[str, Any]) -> dict[str, Any] | None: ...
    def _manifest(self, name: str, settings: Mapping[str, Any]) -> dict[str, Any]: ...
    def _tmp_folder(self, name: str, settings: Mapping[str, Any]) -> Path: ...
    def _finish(self, tmp: Path, final: Path, name: str, settings: Mapping[str, Any],
                infos: dict[str, Any], meta: Mapping[str, Any] | None) -> None: ...


class PartialBuild:
    """Resumable chunked build: part ``i`` holds items ``[i*part_size, (i+1)*part_size)`` of every array.

    Parts live in ``.partial-<name>-<digest>/`` as ``<array>.part-00000.npy`` plus a
    ``part-00000.done`` marker written last (so a part cut short is redone, never loaded).
    ``publish()`` streams the parts into one ``<array>.npy`` each (plus any extra arrays,
    e.g. an eigendecomposition), publishes atomically and removes the partial folder.

    ``seconds_before``: how long the earlier, interrupted attempts of this build ran up to their last
    saved part (``elapsed.json``, rewritten after each part), so that a resumed build records the
    time of the whole build, not of its last attempt (``build_seconds`` in the published meta).

    ``mark_shared(provider)``: this object's parts come from another method's gradient pass (a TRAK
    ``FeatureSink`` fed by K-FAC's bank pass).  That pass cannot be split between the methods, so its
    seconds are the provider's (in the provider's ``build_seconds``) and are not added here; the published
    meta says ``gradient_pass_shared_with: provider`` so that no reader presents this cache's figure as
    the whole cost of building it (QA round 12: TRAK recorded 409.7 s, K-FAC's whole build, against 4.7 s
    of its own).
    """

    def __init__(self, store: StoreFolders, name: str, settings: Mapping[str, Any], part_size: int, num_items: int):
        if part_size < 1 or num_items < 1:
            raise ValueError("part_size and num_items must be positive")
        self.store = store
        self.name = name
        self.settings = canonical(settings)
        self.part_size = int(part_size)
        self.num_items = int(num_items)
        self.num_parts = -(-self.num_items // self.part_size)
        self.folder = store._partial_folder(name, settings)
        manifest = store._manifest(name, settings)
        manifest.update(part_size=self.part_size, num_items=self.num_items, num_parts=self.num_parts)
        if self.folder.exists():
            try:
                old = json.loads((self.folder / SETTINGS).read_text())
            except (OSError, json.JSONDecodeError):
                old = None
            if old != manifest:  # other chunking or corrupted: finished parts would not line up
                shutil.rmtree(self.folder)
        if not self.folder.exists():
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.folder.with_name(self.folder.name + f".init-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            tmp.mkdir()
            write_json(tmp / SETTINGS, manifest)
            note = store._first_note(name, settings)
            if note:  # with the manifest, before the folder appears (``Store.note_new_build``)
                write_json(tmp / BUILD_NOTE, note)
            try:
                os.rename(tmp, self.folder)
            except OSError:  # another process (a torchrun rank) created it first: same manifest
                shutil.rmtree(tmp, ignore_errors=True)
                if not self.folder.is_dir():
                    raise
        self._clean_dead_temp_files()
        self.opened = time.monotonic()
        self.seconds_before = self._read_elapsed()
        self.count_time = True  # False once mark_shared: the time of a shared pass is its provider's
        self.space_checked = False  # the disk is checked once per run, after its first saved part
        self.row_bytes: int | None = None  # one row over every array, known once a part is saved
        self.disk_group: list[PartialBuild] = [self]  # builds filled by one pass (``share_disk_with``)

    def share_disk_with(self, others: Sequence[PartialBuild]) -> None:
        """Declare that ``others`` are filled by the same gradient pass as this build (TRAK's and D-TRAK's
        parts from K-FAC's bank pass), so each one's check after its first part counts what all of them
        still need on the same disk, not its own cache alone (an early check that passed each cache on its
        own could still meet a full disk hours later, when the last of them publishes)."""
        group = list(dict.fromkeys([*self.disk_group, *(b for o in others for b in o.disk_group)]))
        for b in group:
            b.disk_group = group

    def _rows_left(self) -> int:
        """Rows of the parts still to compute."""
        return self.rows_in(self.todo())

    def rows_in(self, parts: Iterable[int]) -> int:
        """The rows the parts ``parts`` hold (the last part may be short)."""
        return sum(r.stop - r.start for r in map(self.part_range, parts))

    def _need_ahead(self) -> int:
        """Bytes this build still writes: the rows still to compute plus the published copy; 0 once it is
        published or discarded (its folder is gone), and while no part has told the row size (a part saved
        by this run, or one an earlier run left)."""
        if not self.folder.is_dir():
            return 0
        if self.row_bytes is None:
            done = next((i for i in range(self.num_parts) if self.is_done(i)), None)
            if done is None:
                return 0
            try:
                self.row_bytes = _row_bytes(json.loads((self.folder / f"part-{done:05d}.done").read_text()))
            except (OSError, ValueError, KeyError, TypeError):
                return 0
        return self.row_bytes * (self._rows_left() + self.num_items)

    def mark_shared(self, provider: str) -> None:
        """Record that parts of this build come from ``provider``'s gradient pass (see the class notes);
        kept in the partial folder, so a build resumed after a kill still says so when it publishes."""
        self.count_time = False
        if self.shared_with() != provider:
            write_json(self.folder / SHARED, {"with": str(provider)})

    def shared_with(self) -> str | None:
        """The method whose gradient pass filled parts of this build, or None."""
        try:
            return str(json.loads((self.folder / SHARED).read_text())["with"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _read_elapsed(self) -> float:
        try:
            seconds = float(json.loads((self.folder / ELAPSED).read_text())["seconds"])
        except (OSError, ValueError, KeyError, TypeError):  # none yet, or damaged: count from here
            return 0.0
        return seconds if seconds >= 0 else 0.0

    def _clean_dead_temp_files(self) -> None:
        """Half-written part files (``.<key>.part-<i>.<pid>-<hex>.tmp``) of processes that died."""
        for p in self.folder.glob(".*.tmp"):
            m = PID_TMP.search(p.name)
            if m is None:
                continue
            pid = int(m.group(1))
            if pid != os.getpid() and not pid_alive(pid):
                with contextlib.suppress(OSError):
                    p.unlink()

    def part_range(self, i: int) -> slice:
        return slice(i * self.part_size, min((i + 1) * self.part_size, self.num_items))

    def is_done(self, i: int) -> bool:
        return (self.folder / f"part-{i:05d}.done").is_file()

    def todo(self) -> list[int]:
        """Indices of parts still to compute, in order."""
        return [i for i in range(self.num_parts) if not self.is_done(i)]

    def save_part(self, i: int, arrays: Mapping[str, ArrayLike]) -> None:
        rows = self.part_range(i)
        n = rows.stop - rows.start
        infos = {}
        for key, a in arrays.items():
            check_key(key)
            arr = to_numpy(a)
            if arr.shape[0] != n:
                raise ValueError(f"part {i} of {key} has {arr.shape[0]} rows, expected {n}")
            tmp = self.folder / f".{key}.part-{i:05d}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
            try:
                save_npy(tmp, arr)
                os.replace(tmp, self.folder / f"{key}.part-{i:05d}.npy")
            except BaseException:  # a full disk: give its space back now, not at the next run
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            infos[key] = {"shape": list(arr.shape), "dtype": str(arr.dtype)}
        write_json(self.folder / f"part-{i:05d}.done", infos)
        if self.row_bytes is None:
            self.row_bytes = _row_bytes(infos)
        if self.count_time:
            write_json(self.folder / ELAPSED, {"seconds": self.seconds_before + time.monotonic() - self.opened})
        if not self.space_checked:
            self.space_checked = True
            self._check_space_ahead()

    def load_part(self, i: int) -> dict[str, np.ndarray]:
        infos = json.loads((self.folder / f"part-{i:05d}.done").read_text())
        return {k: load_npy(self.folder / f"{k}.part-{i:05d}.npy") for k in infos}

    def publish(
        self, extra: Mapping[str, ArrayLike] | None = None, meta: Mapping[str, Any] | None = None
    ) -> Path:
        """Concatenate the parts (all must be done) and ``extra`` arrays into the final folder atomically."""
        missing = self.todo()
        if missing:
            raise RuntimeError(f"cannot publish {self.name}: parts {missing[:5]}... not built")
        store = self.store
        final = store.path(self.name, self.settings)
        store.validate(self.name, self.settings)
        first = json.loads((self.folder / "part-00000.done").read_text())
        self._check_space(first, extra)
        tmp = store._tmp_folder(self.name, self.settings)
        try:
            infos = {}
            for key, info in first.items():
                shape = (self.num_items, *info["shape"][1:])
                out = np.lib.format.open_memmap(
                    tmp / f"{key}.npy", mode="w+", dtype=info["dtype"], shape=shape
                )
                reserve(tmp / f"{key}.npy", (tmp / f"{key}.npy").stat().st_size)  # ENOSPC now, not SIGBUS in the copy
                for i in range(self.num_parts):
                    out[self.part_range(i)] = load_npy(self.folder / f"{key}.part-{i:05d}.npy", mmap_mode="r")
                out.flush()
                del out
                infos[key] = {"shape": list(shape), "dtype": info["dtype"], "crc32": file_crc32(tmp / f"{key}.npy")}
            for key, a in (extra or {}).items():
                check_key(key)
                if key in infos:
                    raise ValueError(f"extra array {key} clashes with a part array")
                arr = to_numpy(a)
                save_npy(tmp / f"{key}.npy", arr)
                infos[key] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "crc32": file_crc32(tmp / f"{key}.npy")}
            shared = self.shared_with()
            meta = dict(meta or {}, **({"gradient_pass_shared_with": shared} if shared else {}))
            store._finish(tmp, final, self.name, self.settings, infos, meta)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(self.folder, ignore_errors=True)
        return final

    def _check_space(self, first: Mapping[str, Any], extra: Mapping[str, ArrayLike] | None) -> None:
        """OSError(ENOSPC) before publishing when the disk cannot hold the concatenated arrays: their sizes
        are known exactly here (the parts stay until the copy is complete, so it needs all of it again)."""
        need = _row_bytes(first) * self.num_items + sum(int(to_numpy(a).nbytes) for a in (extra or {}).values())
        self._refuse_unless_free(need, f"publishing {self.name} needs {{need}}, {{free}} free")

    def _check_space_ahead(self) -> None:
        """OSError(ENOSPC) after the first part a run saves, when the disk cannot hold the rest of the build:
        the parts still to compute plus the published copy (``publish`` needs the whole cache again while
        the parts stay), and the same for every other build filled by the same pass whose row size is known
        by now (``share_disk_with``).  Why now: a part's size gives every row's exact size, and a build that
        would only fail at ``publish`` (hours later on a large bank) fails at its start instead, its first
        part kept.  The extra arrays ``publish`` adds (an eigendecomposition) are unknown here and left to
        its own check."""
        left = self._rows_left()
        others = {b: need for b in self.disk_group if b.folder != self.folder and (need := b._need_ahead())}
        rows = f"{left} of {self.num_items} rows still to compute, then the published copy of all of them"
        if others:
            names = " and ".join([self.name, *(b.name for b in others)])
            what = f"building {names} (one gradient pass fills them) needs about {{need}} more ({self.name}: {rows})"
        else:
            what = f"building {self.name} needs about {{need}} more ({rows})"
        self._refuse_unless_free(self._need_ahead() + sum(others.values()), what + ", {free} free")

    def _refuse_unless_free(self, need: int, message: str) -> None:
        """OSError(ENOSPC) with ``message`` (its ``{need}`` and ``{free}`` filled in) when the disk holding
        this build has less than ``need`` bytes free; nothing when it has them or cannot tell."""
        space = disk_space(self.folder)
        if space is not None and space[0] < need:
            raise OSError(errno.ENOSPC, message.format(need=human_bytes(need), free=human_bytes(space[0])),
                          str(self.folder.parent))

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def saved_parts(folder: Path) -> tuple[int, int] | None:
    """(parts saved, parts in all) of the resumable build in ``folder``, read from its files only (another
    process's build, say); None when there is no such build there."""
    try:
        total = int(json.loads((folder / SETTINGS).read_text())["num_parts"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return sum(1 for _ in folder.glob("part-*.done")), total


def _row_bytes(infos: Mapping[str, Any]) -> int:
    """Bytes of one item (row) over every array of a part, from its ``{key: {"shape", "dtype"}}`` record."""
    return sum(int(np.dtype(v["dtype"]).itemsize * int(np.prod(v["shape"][1:], dtype=np.int64)))
               for v in infos.values())
