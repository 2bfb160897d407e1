"""A tqdm bar on stderr driven by a ``progress(message, fraction)`` callback.

Why: the library builds caches on its own (``auto_build`` before a query, the evaluations' sessions),
which takes minutes on an empty cache; without a bar such a run cannot be told from a hung one.  The
callback is the one every build takes (``methods.base.Progress``), so the same build drives the app's
panel, the CLI's bars or this one.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator

from ..bar_redraw import interval, move, short_duration
from .methods.base import Progress


def time_left(t0: float, f0: float, fraction: float, now: float | None = None, min_seconds: float = 10.0) -> str | None:
    """The time left at this run's mean speed since (``t0``, ``f0``), as a few characters ("3 min", "5.2 h",
    "27 d"); None for the first ``min_seconds`` or while nothing moved. From the fraction itself, not the bar's
    per mille: a cifar2 factor pass on a CPU stayed at 0 per mille for hours, with no estimate (QA 33)."""
    dt = (time.monotonic() if now is None else now) - t0
    done = fraction - f0
    if dt < min_seconds or done <= 0 or fraction >= 1:
        return None
    return short_duration(dt * (1.0 - fraction) / done)


@contextlib.contextmanager
def terminal_progress(desc: str, position: int = 0, message_chars: int = 70, after_first_colon: bool = False,
                      desc_width: int = 0, redraw_s: float = 0.5, quiet_redraw_s: float | None = None
                      ) -> Iterator[Progress]:
    """Yield the callback of a per-mille tqdm bar titled ``desc``, which shows each message as it comes
    (``"kfac: bank 300/1797"``); the bar is closed on leaving the block, whatever happened in it.  It is drawn
    at the first message, not before: a command that refuses its input first says so in one ``error:`` line,
    with no empty bar above it.

    ``position``: tqdm's line (a torchrun rank's); ``message_chars``: where a message is cut; ``after_first_colon``:
    show a message from its first ": " on (the CLI's ``build`` names the method in ``desc``, so the message's
    own "kfac: " is dropped); ``desc_width``: ``desc`` right-aligned in that many characters, so that one bar per
    method lines up; ``redraw_s``: tqdm's ``mininterval`` unless ``TQDM_MININTERVAL`` is set.

    ``quiet_redraw_s``: while no message comes for this long, the bar is redrawn anyway, so that its clock moves
    (default: the bar's ``maxinterval``, 10 s, or ``TQDM_MAXINTERVAL``, which ``bar_redraw.match_log_intervals``
    sets to thin a log).  Why: tqdm's own monitor redraws a quiet bar only while it counts several units per draw,
    never this per-mille bar moved by hand, so a cifar2 factor pass on a CPU, whose first 256-row batch takes
    over 4 min, showed "00:00" all that time and looked hung (QA 34 #2)."""
    from tqdm.auto import tqdm

    bars: list = []
    name = f"{{desc:>{desc_width}}}" if desc_width else "{desc}"
    bar_format = name + ": {percentage:3.0f}%|{bar}| {elapsed} {unit}"
    start: list[float] = []  # (time, fraction) of this run's first call: the time left counts this run's speed only
    last_call = [time.monotonic()]
    stop = threading.Event()
    ticker: list[threading.Thread] = []

    def keep_clock(bar, every: float) -> None:
        while not stop.wait(every):
            if time.monotonic() - last_call[0] >= every:
                bar.refresh()  # under tqdm's lock, as the callback's own draws

    def progress(message: str, fraction: float) -> None:
        last_call[0] = time.monotonic()
        if not bars:
            bars.append(tqdm(total=1000, desc=desc, unit="", file=sys.stderr, position=position,
                             bar_format=bar_format, **interval(redraw_s)))
            start.extend((time.monotonic(), float(fraction)))
            # a disabled bar (TQDM_DISABLE=1) has no maxinterval, and no clock to keep
            every = 0.0 if bars[0].disable else float(quiet_redraw_s if quiet_redraw_s is not None
                                                      else bars[0].maxinterval)
            if every > 0:
                ticker.append(threading.Thread(target=keep_clock, args=(bars[0], every), daemon=True,
                                               name=f"bar clock: {desc}"))
                ticker[0].start()
        text = message.split(": ", 1)[-1] if after_first_colon else message
        left = time_left(start[0], start[1], float(fraction))
        text = text[:message_chars] + (f" ({left} left)" if left else "")
        move(bars[0], fraction, text)  # TQDM_MININTERVAL thins it (engine.bar_redraw)

    try:
        yield progress
    finally:
        stop.set()
        for t in ticker:
            t.join()
        for bar in bars:
            bar.close()
