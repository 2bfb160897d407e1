"""The project's own ``warnings.warn`` as one-line sentences: the CLI and the app's terminal print them as
``warning: ...`` lines, and the app collects those a model's load raises, for its page.

Why one hook for both: the CLI's hook and the app's collector each decided by path which warnings were "ours",
and the app's collector was ``warnings.catch_warnings(record=True)``, which swaps process-wide state.  A server
runs loads, builds and queries in threads; two such blocks that overlap restore each other's state in the
wrong order, and after "A enters, B enters, A leaves, B leaves" every later warning of the process went into
A's finished list, silently (or a filter one block set stayed for good).  Here the hook is installed once and
never swapped; a load collects through a sink of its own thread (``collected``), so another thread's warning
meanwhile is said in the terminal, not on this load's page.

Whose: a warning whose code (the frame ``warnings.warn`` names, after its ``stacklevel``) is a file under one
of the roots given to ``install`` (the engine's package; the app adds its own).  Other packages' warnings keep
Python's form and its filters.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from .validation import one_line

ENGINE_ROOT = Path(__file__).resolve().parent

_lock = threading.Lock()
_roots: tuple[str, ...] = ()  # replaced whole under _lock, read without it
_local = threading.local()  # .said: the list the current thread's ``collected`` block fills


def is_ours(filename: str) -> bool:
    """Whether a warning attributed to ``filename`` is one of the project's (under a root ``install`` was given)."""
    try:
        path = str(Path(filename).resolve())
    except (OSError, ValueError):
        return False
    return any(path.startswith(root) for root in _roots)


def _show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202 - warnings' hook
    if not is_ours(filename):
        return _show.previous(message, category, filename, lineno, file, line)
    text = one_line(message)
    said = getattr(_local, "said", None)
    if said is not None:  # a load's own warning: its caller says it (page and terminal), once
        if text not in said:
            said.append(text)
        return None
    print(f"warning: {text}", file=file or sys.stderr, flush=True)
    return None


_show.previous = warnings.showwarning


def install(roots: Sequence[Path] = (ENGINE_ROOT,)) -> None:
    """Make the project's warnings one ``warning: ...`` line each (``roots``: the folders whose code is the
    project's).  Idempotent; installed again if something replaced ``warnings.showwarning`` since (a test's
    ``catch_warnings`` restores the one it found)."""
    global _roots
    with _lock:
        _roots = tuple(sorted({*_roots, *(str(Path(r).resolve()) + os.sep for r in roots)}))
        if warnings.showwarning is not _show:
            _show.previous = warnings.showwarning
            warnings.showwarning = _show


@contextlib.contextmanager
def collected(roots: Sequence[Path] = (ENGINE_ROOT,)) -> Iterator[list[str]]:
    """Collect the project's warnings this thread raises in the block, each distinct one once, as one line each,
    instead of printing them: the caller says them (the app: on the page and as ``warning:`` lines).

    A message Python showed before in this process (an earlier, failed load of the same folder) is collected
    again: the once-per-location registries of the project's modules are cleared first, as
    ``catch_warnings``' "always" did.  Nested blocks in one thread share the outer list."""
    install(roots)
    for module in list(sys.modules.values()):
        registry = getattr(module, "__warningregistry__", None)
        if registry and is_ours(getattr(module, "__file__", None) or ""):
            registry.clear()
    outer = getattr(_local, "said", None)
    said: list[str] = [] if outer is None else outer
    _local.said = said
    try:
        yield said
    finally:
        _local.said = outer
