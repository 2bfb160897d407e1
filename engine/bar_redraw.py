"""How a progress callback moves a tqdm bar: at most every ``mininterval``, but at once when the message changes.

Why: ``refresh()`` on every call drew a build's bar hundreds of times, so ``TQDM_MININTERVAL`` could not thin
it in a log file (QA round 22: 61 redraws in 45 s with it at 30); ``update()`` alone, which tqdm rate-limits,
skipped one-off messages ("waiting for another build", "resuming: ...") that came between two draws.  A
message whose words differ from the last one drawn (its numbers aside) is drawn at once; a message that
only counts on is left to tqdm's interval.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import MutableMapping
from typing import Any

_NUMBERS = re.compile(r"[\d.,/%]+")


# in a progress message: a step whose length nothing counts (the factors' eigendecomposition), for which the bars
# show no time left (``terminal_progress.Pace.left``).  QA 62 F4: the last rows' "(59 s left)" stayed on the bar
# through minutes of eigendecomposition and the compressed bank's hooks pass
UNTIMED = "no time estimate"


def step_words(text: str) -> str:
    """A progress message with its numbers blanked: whether two messages belong to one step (``move`` draws a new
    step at once and keeps its jump out of tqdm's rate; ``terminal_progress.Pace`` keeps it out of the time left)."""
    return _NUMBERS.sub("#", text)


def match_log_intervals(environ: MutableMapping[str, str] | None = None) -> None:
    """Make ``TQDM_MININTERVAL`` thin a log file as asked: when only it is set, set ``TQDM_MAXINTERVAL`` to
    twice its value.  Why: tqdm's monitor thread redraws a bar that has gone ``maxinterval`` seconds (10 by
    default) without a redraw, whatever ``mininterval`` says, so ``TQDM_MININTERVAL=30`` alone wrote a line
    every 10-20 s, about 4 a minute (QA 24 #5).  Twice, not equal: at 30 and 30 the monitor and the bar's own
    redraw sometimes both fired at the same second.  tqdm reads its ``TQDM_*`` variables once, when it is
    imported, so the CLI and the app call this first; a value the user set is kept."""
    env = os.environ if environ is None else environ
    low = env.get("TQDM_MININTERVAL")
    if low is None or "TQDM_MAXINTERVAL" in env:
        return
    try:
        seconds = float(low)
    except ValueError:  # not a number: left to tqdm, which refuses it
        return
    if seconds > 5.0:  # twice it is past tqdm's default 10 s; a shorter mininterval needs nothing
        env["TQDM_MAXINTERVAL"] = f"{2 * seconds:g}"


def interval(default: float) -> dict[str, float]:
    """tqdm's ``mininterval`` argument: ``default``, unless ``TQDM_MININTERVAL`` is set, which tqdm then applies
    as its own default (an explicit argument would override it)."""
    return {} if "TQDM_MININTERVAL" in os.environ else {"mininterval": default}


def move(bar: Any, fraction: float, text: str, field: str = "unit") -> None:
    """Set ``bar`` to ``fraction`` of its total (1000) with ``text`` in ``field`` ("unit", or "postfix" for a
    bar that shows it there); redraw now if the text's words changed, else when tqdm's interval allows."""
    n = int(round(1000 * min(max(float(fraction), 0.0), 1.0)))
    words = step_words(text)
    if field == "postfix":
        bar.set_postfix_str(text, refresh=False)
    else:
        bar.unit = text
    if words != getattr(bar, "_last_words", None):
        bar._last_words = words
        bar.n = n
        bar.refresh()
        # tqdm's dynamic ``miniters`` grows with the units counted since its last draw; a jump drawn here (a resumed
        # pass starting at 43%) counted into it, and the next 300 rows came without a draw (QA 25 #7: 15 s)
        bar.last_print_n = n
    else:
        bar.update(n - bar.n)


def add_done_before(bar: Any, k: int) -> None:
    """Count ``k`` units an earlier, interrupted run did (a resumed model's steps, the gallery samples already
    scored) into ``bar``'s start, not into this run's speed: tqdm's rate and time left come from ``n - initial``
    and from the units each update adds, so counting them as an update showed a resumed run 10x too fast
    (QA 24: 52 step/s for a run at 5, and precompute's saved samples 'done in 0 s').  A disabled bar
    (``TQDM_DISABLE=1``, which the README offers for logs) has no start to move: it is left alone (a resumed
    ``precompute`` or LDS run raised AttributeError there)."""
    if k and not getattr(bar, "disable", False):
        bar.initial += k
        bar.n += k
        bar.last_print_n += k
        bar.refresh()


def short_duration(seconds: float) -> str:
    """A duration in a few characters for a bar or a warning: "50 s", "13 min", "5.2 h", "27 d"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} d"


class QuietClock:
    """Redraws a bar that no message has moved for ``every`` seconds, so that its clock keeps moving.

    Why: tqdm's own monitor redraws a quiet bar only while it counts several units per draw, never a per-mille bar
    moved by hand, so a cifar2 factor pass on a CPU, whose first 256-row batch takes over 4 min, showed "00:00" and
    looked hung (QA 34 #2); the app's build bar in the server's terminal had no clock at all, and sat still through a
    minute-long pass (QA 45 #9).  ``touch()`` at every message; ``stop()`` (or leaving the ``with`` block) ends the
    thread.  A disabled bar (``TQDM_DISABLE=1``) or ``every <= 0`` starts none."""

    def __init__(self, bar: Any, every: float, name: str = "bar clock") -> None:
        self.bar, self.every = bar, float(every)
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.every > 0 and not getattr(bar, "disable", False):
            self._thread = threading.Thread(target=self._run, daemon=True, name=name)
            self._thread.start()

    def touch(self) -> None:
        """A message moved the bar now."""
        self.last = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            if time.monotonic() - self.last >= self.every:
                self.bar.refresh()  # under tqdm's lock, as the callers' own draws

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> QuietClock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
