"""A tqdm bar on stderr driven by a ``progress(message, fraction)`` callback.

Why: the library builds caches on its own (``auto_build`` before a query, the evaluations' sessions),
which takes minutes on an empty cache; without a bar such a run cannot be told from a hung one.  The
callback is the one every build takes (``methods.base.Progress``), so the same build drives the app's
panel, the CLI's bars or this one.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from ..bar_redraw import UNTIMED, QuietClock, interval, move, short_duration, step_words
from .methods.base import Progress

EARLIER_RUN = "saved by an earlier run"  # the words of every message that reports work reloaded, not computed


def fit_line(bar: Any, text: str, chars: int) -> str:
    """``text`` cut to ``chars`` for a bar's one line; a message that reports work an earlier run saved and does
    not fit is also written whole on a line of its own above the bar (tqdm's ``write``), since it says what a
    resumed run reused, once.  Why: the bars cut every message at 70-100 characters, so the server's terminal
    and a log read "resuming: 128/200 examples saved by an earlier " and never the "(128 of them computed again
    for trak, dtrak)" that followed (QA 46 #3).  A disabled bar (``TQDM_DISABLE=1``) writes nothing."""
    if len(text) <= chars:
        return text
    if EARLIER_RUN in text and not getattr(bar, "disable", False):
        bar.write(text, file=getattr(bar, "fp", None) or sys.stderr)
    return text[:chars]


def time_left(t0: float, f0: float, fraction: float, now: float | None = None, min_seconds: float = 10.0) -> str | None:
    """The time left at this run's mean speed since (``t0``, ``f0``), as a few characters ("3 min", "5.2 h",
    "27 d"); None for the first ``min_seconds`` or while nothing moved. From the fraction itself, not the bar's
    per mille: a cifar2 factor pass on a CPU stayed at 0 per mille for hours, with no estimate (QA 33)."""
    dt = (time.monotonic() if now is None else now) - t0
    return _left(dt, fraction - f0, fraction, min_seconds)


def _left(seconds: float, done: float, fraction: float, min_seconds: float) -> str | None:
    if seconds < min_seconds or done <= 0 or fraction >= 1:
        return None
    return short_duration(seconds * (1.0 - fraction) / done)


@dataclass(frozen=True)
class Pace:
    """This run's speed over the work it computed, for its time left: the seconds and the fraction of the steps that
    only counted on (a message with the words of the one before, ``words``), and the last message's time, fraction
    and words.  A message with new words starts a step, and its jump is left out, with the seconds before it: that is
    where a pass reports the work it found saved ("K-FAC factors loaded (saved by an earlier run)", "resuming:
    256/1797 examples saved by an earlier run"), reloaded in seconds, never computed at this run's pace.

    Why: the app's estimate counted from the first progress message, so those jumps counted as this run's speed,
    and a resumed digits build read "about 2 min left" 0.3 min in and finished 12 min later (QA 40 #2), while
    the terminal's bar, whose ``move`` keeps a new step's jump out of tqdm's rate, said "00:28<12:34".  The same
    rule serves the app's panel (``BuildState.pace``) and the terminal's bars (``terminal_progress``).

    ``step`` returns the next pace (frozen: a ``BuildState`` field); times are the caller's clock."""

    seconds: float = 0.0
    done: float = 0.0
    at: float | None = None
    fraction: float = 0.0
    words: str | None = None

    @classmethod
    def since(cls, t0: float, f0: float) -> Pace:
        """A pace that counts all the work from (``t0``, ``f0``) on as computed (a state that recorded no steps)."""
        return cls(at=t0, fraction=f0)

    def step(self, message: str, fraction: float, now: float) -> Pace:
        """The pace after a progress message."""
        w = step_words(message)
        if self.at is None or w != self.words:  # the run's first message or a new step's: its jump is not computed
            return replace(self, at=now, fraction=fraction, words=w)
        return Pace(self.seconds + max(0.0, now - self.at), self.done + max(0.0, fraction - self.fraction),
                    now, max(self.fraction, fraction), w)

    def left(self, fraction: float, now: float, min_seconds: float = 10.0) -> str | None:
        """The time left at ``fraction`` ("3 min"), the step under way counting since its last message (its work past
        that message's fraction too: none where ``fraction`` is the last message's); None until ``min_seconds`` of
        computed steps or while none moved, or while the step under way says it is ``UNTIMED``."""
        if self.at is None or (self.words is not None and UNTIMED in self.words):  # an uncounted step
            return None
        return _left(self.seconds + max(0.0, now - self.at), self.done + max(0.0, fraction - self.fraction), fraction,
                     min_seconds)


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
    pace = [Pace()]  # the time left counts the work this run computed only (Pace: not a resume's reload)
    clocks: list[QuietClock] = []

    def progress(message: str, fraction: float) -> None:
        if not bars:
            bars.append(tqdm(total=1000, desc=desc, unit="", file=sys.stderr, position=position,
                             bar_format=bar_format, **interval(redraw_s)))
            # a disabled bar (TQDM_DISABLE=1) has no maxinterval, and no clock to keep (QuietClock starts none)
            every = 0.0 if bars[0].disable else float(quiet_redraw_s if quiet_redraw_s is not None
                                                      else bars[0].maxinterval)
            clocks.append(QuietClock(bars[0], every, name=f"bar clock: {desc}"))
        clocks[0].touch()
        text = message.split(": ", 1)[-1] if after_first_colon else message
        now = time.monotonic()
        pace[0] = pace[0].step(message, float(fraction), now)
        left = pace[0].left(float(fraction), now)
        text = fit_line(bars[0], text, message_chars) + (f" ({left} left)" if left else "")
        move(bars[0], fraction, text)  # TQDM_MININTERVAL thins it (engine.bar_redraw)

    try:
        yield progress
    finally:
        for clock in clocks:
            clock.stop()
        for bar in bars:
            bar.close()
