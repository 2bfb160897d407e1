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
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write_bytes
from ..jsonio import finite_or_none

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
