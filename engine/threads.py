"""How many torch intra-op threads to use: the cores this process may run on, minus the busy ones.

Why: torch's intra-op pool (OpenMP) spins while it waits for its slowest thread.  When one of
those threads shares a core with another busy process, every parallel region waits for a
thread that gets half a core, and the spinning threads burn the time the others need.  On the
2-core machine, the K-FAC factor pass beside one busy process ran 8-30x slower with torch's
default 2 threads than alone, and about 12x faster with 1 thread than with 2 (issue 12;
``scripts/bench_busy.py`` measures it).  Losing a thread costs at most its share; spinning
against a busy core costs far more, so the rule is conservative:

    threads = clamp(floor(cores - busy_elsewhere + 0.3), 1, cores)

``cores`` = ``len(os.sched_getaffinity(0))`` (the CPUs this process may use: containers,
``taskset``), ``busy_elsewhere`` = cores busy with *other* processes, measured over a short
window from /proc/stat minus this process's own CPU time (instantaneous, unlike the load
average, which lags a minute and counts our own threads); without /proc, the 1-minute load
average.  An explicit OMP_NUM_THREADS (or ATTRIBUTION_THREADS) wins.

One function, ``configure_threads``, is called by the CLI (through ``configure_threads_when_loaded``, at
torch's import), the app and the build worker.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import math
import os
import sys
import time
from typing import Any

log = logging.getLogger(__name__)
HEADROOM = 0.3  # of a core: another process using more than this of the spare capacity costs a thread


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _proc_stat_busy() -> tuple[float, float] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, None where there is no /proc."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    vals = [float(v) for v in fields[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0.0)  # idle + iowait
    return sum(vals[:8]) - idle, sum(vals[:8])


def busy_elsewhere(window_s: float = 0.4) -> float:
    """Cores kept busy by other processes right now (0 .. number of CPUs).

    Busy CPU time of the whole machine over ``window_s``, minus this process's own CPU time in
    the same window, in cores.  Falls back to the 1-minute load average (which includes us).
    """
    first = _proc_stat_busy()
    if first is None:
        try:
            return float(os.getloadavg()[0])
        except OSError:
            return 0.0
    own0, t0 = _own_cpu_seconds(), time.monotonic()
    time.sleep(window_s)
    second = _proc_stat_busy()
    own1, t1 = _own_cpu_seconds(), time.monotonic()
    if second is None or second[1] <= first[1]:
        return 0.0
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    machine_busy = (second[0] - first[0]) / hz / (t1 - t0)
    return max(0.0, machine_busy - (own1 - own0) / (t1 - t0))


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def choose_threads(cores: int | None = None, busy: float | None = None) -> int:
    """Intra-op threads for ``cores`` usable CPUs of which ``busy`` are taken by others (module docstring)."""
    cores = available_cores() if cores is None else int(cores)
    busy = busy_elsewhere() if busy is None else float(busy)
    return int(min(cores, max(1, math.floor(cores - busy + HEADROOM))))


def explicit_threads(env: dict[str, str] | None = None) -> int | None:
    """ATTRIBUTION_THREADS or OMP_NUM_THREADS when set to a positive integer."""
    env = dict(os.environ) if env is None else env
    for key in ("ATTRIBUTION_THREADS", "OMP_NUM_THREADS"):
        try:
            n = int(env.get(key, ""))
        except ValueError:
            continue
        if n > 0:
            return n
    return None


def configure_threads(why: str = "") -> int:
    """Set torch's intra-op threads by ``choose_threads`` (or the explicit setting); returns the number."""
    import torch

    n = explicit_threads()
    source = "set explicitly"
    if n is None:
        cores, busy = available_cores(), busy_elsewhere()
        n = choose_threads(cores, busy)
        source = f"{cores} usable cores, {busy:.1f} busy with other processes"
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    log.info("torch threads: %d (%s)%s", n, source, f" for {why}" if why else "")
    return n


class _AfterTorchImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: on a lookup of ``torch`` it takes torch's own spec from the other finders and
    wraps its loader's ``exec_module``, so that ``configure_threads`` runs right after torch is loaded.  It
    leaves ``sys.meta_path`` only once torch has been executed: a mere probe
    (``importlib.util.find_spec("torch")``, as libraries check what is installed) must not use it up."""

    def __init__(self, why: str):
        self.why = why
        self.looking = False  # our own find_spec below asks the finders again, this one included

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "torch" or self.looking:
            return None
        self.looking = True
        try:
            spec = importlib.util.find_spec("torch")
        finally:
            self.looking = False
        loader = getattr(spec, "loader", None)
        if spec is None or not hasattr(loader, "exec_module"):
            return spec
        load, finder = loader.exec_module, self

        def exec_module(module: Any) -> None:
            load(module)
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(finder)
            configure_threads(finder.why)

        loader.exec_module = exec_module  # this spec's own loader instance
        return spec


def configure_threads_when_loaded(why: str = "") -> None:
    """``configure_threads`` now when torch is loaded, else right after its first import.

    Why: importing torch takes 2-3 s here; the CLI configures the threads before every command, and did so
    by importing torch, so a command refusing a typo in its options (before it needs torch) took 3-5 s to
    say so.  Deferred to torch's import, the threads are set before any torch work, as before."""
    if "torch" in sys.modules:
        configure_threads(why)
    elif not any(isinstance(f, _AfterTorchImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTorchImport(why))
