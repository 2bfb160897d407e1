"""A tqdm bar on stderr driven by a ``progress(message, fraction)`` callback.

Why: the library builds caches on its own (``auto_build`` before a query, the evaluations' sessions),
which takes minutes on an empty cache; without a bar such a run cannot be told from a hung one.  The
callback is the one every build takes (``methods.base.Progress``), so the same build drives the app's
panel, the CLI's bars or this one.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from ..bar_redraw import interval, move
from .methods.base import Progress


@contextlib.contextmanager
def terminal_progress(desc: str) -> Iterator[Progress]:
    """Yield the callback of a per-mille tqdm bar titled ``desc``, which shows each message as it comes
    (``"kfac: bank 300/1797"``); the bar is closed on leaving the block, whatever happened in it.  It is drawn
    at the first message, not before: a command that refuses its input first says so in one ``error:`` line,
    with no empty bar above it."""
    from tqdm.auto import tqdm

    bars: list = []

    def progress(message: str, fraction: float) -> None:
        if not bars:
            bars.append(tqdm(total=1000, desc=desc, unit="", file=sys.stderr,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} {unit}", **interval(0.5)))
        move(bars[0], fraction, message[:70])  # TQDM_MININTERVAL thins it (engine.bar_redraw)

    try:
        yield progress
    finally:
        for bar in bars:
            bar.close()
