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
def terminal_progress(desc: str, position: int = 0, message_chars: int = 70, after_first_colon: bool = False,
                      desc_width: int = 0, redraw_s: float = 0.5) -> Iterator[Progress]:
    """Yield the callback of a per-mille tqdm bar titled ``desc``, which shows each message as it comes
    (``"kfac: bank 300/1797"``); the bar is closed on leaving the block, whatever happened in it.  It is drawn
    at the first message, not before: a command that refuses its input first says so in one ``error:`` line,
    with no empty bar above it.

    ``position``: tqdm's line (a torchrun rank's); ``message_chars``: where a message is cut; ``after_first_colon``:
    show a message from its first ": " on (the CLI's ``build`` names the method in ``desc``, so the message's
    own "kfac: " is dropped); ``desc_width``: ``desc`` right-aligned in that many characters, so that one bar per
    method lines up; ``redraw_s``: tqdm's ``mininterval`` unless ``TQDM_MININTERVAL`` is set."""
    from tqdm.auto import tqdm

    bars: list = []
    name = f"{{desc:>{desc_width}}}" if desc_width else "{desc}"
    bar_format = name + ": {percentage:3.0f}%|{bar}| {elapsed} {unit}"

    def progress(message: str, fraction: float) -> None:
        if not bars:
            bars.append(tqdm(total=1000, desc=desc, unit="", file=sys.stderr, position=position,
                             bar_format=bar_format, **interval(redraw_s)))
        text = message.split(": ", 1)[-1] if after_first_colon else message
        move(bars[0], fraction, text[:message_chars])  # TQDM_MININTERVAL thins it (engine.bar_redraw)

    try:
        yield progress
    finally:
        for bar in bars:
            bar.close()
