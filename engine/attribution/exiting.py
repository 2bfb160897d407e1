"""Whether this process is exiting: one flag that long passes read at each batch's end.

Why a module of its own: the app's build worker sets it at the interpreter's exit (``build_worker.stop_builds``)
and the passes it runs must see it, but a pass (``curvature``'s factor pass) must not import the app's worker.
A pass that sees it saves its resume point at once (the factor pass's checkpoint: QA 30c, a Ctrl-C 24 s into a
build left nothing to resume, the first timed checkpoint being at 30 s), then the worker stops it.
"""

from __future__ import annotations

import threading

STOPPING = threading.Event()


def exit_requested() -> bool:
    """True once the process has asked its builds to stop."""
    return STOPPING.is_set()
