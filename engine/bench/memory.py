"""Resident memory of this process and sizes in bytes, for the benchmarks' figures.

One unit convention for every size the benches print or record: binary, MiB = 2**20 bytes and GiB = 2**30
bytes, named so in printed text.  Record keys that shipped ending in ``_mb`` / ``_gb`` keep their names (the
files in assets/results are read by them); their values are MiB / GiB (bench-scale's ``bank_gb`` was
decimal, 1e9 bytes, in its records without a ``units`` entry)."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

KIB, MIB, GIB = 2**10, 2**20, 2**30


def peak_rss_mib() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / MIB if sys.platform == "darwin" else rss / KIB


def memory_mb() -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory of this process in MiB (Linux; the keys, ``rss_mb`` and
    ``peak_rss_mb``, are the shipped records' names for MiB)."""
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024.0
    except OSError:
        out["VmHWM"] = peak_rss_mib()
    return {"rss_mb": out.get("VmRSS", float("nan")), "peak_rss_mb": out.get("VmHWM", float("nan"))}
