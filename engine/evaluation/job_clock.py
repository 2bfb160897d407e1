"""How long a job that trains models one after the other has been running, and has left.

Why: a retraining job started from the app trains two models with the full recipe (20-30 min on two
shared cores); a step counter alone left the user guessing how long to wait (QA 23b #8, stop 54's
open items). The rate is the one this run measures, not the checkpoint's training log, because the
job shares the machine with the server's queries and builds, and a resumed model starts part-way:

    rate = (left(t_0) - left(t)) / (t - t_0),      time left = left(t) / rate,

where left(t) counts the training steps still to run at time t, over every model the job has yet to
finish, and t_0 is the first observation. No estimate is given before ``min_seconds`` of observation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


def minutes(seconds: float) -> str:
    """'0.4 min', '12.0 min': the unit the build panel uses."""
    return f"{max(seconds, 0.0) / 60:.1f} min"


@dataclass
class JobClock:
    """Elapsed time since the job started, and the estimate of the time its training has left."""

    min_seconds: float = 10.0
    clock: Callable[[], float] = time.monotonic
    started: float = field(default=-1.0)
    _first: tuple[float, int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.started < 0:
            self.started = self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def seconds_left(self, steps_left: int) -> float | None:
        """The time ``steps_left`` steps take at the rate measured so far; None until it is measured."""
        now = self.clock()
        if self._first is None:
            self._first = (now, int(steps_left))
            return None
        t0, left0 = self._first
        done, seconds = left0 - int(steps_left), now - t0
        if seconds < self.min_seconds or done <= 0:
            return None
        return int(steps_left) * seconds / done

    def words(self, steps_left: int) -> str:
        """'3.1 min so far, about 17.5 min of training left' (or only the first part, before a rate exists)."""
        left = self.seconds_left(steps_left)
        so_far = f"{minutes(self.elapsed())} so far"
        return so_far if left is None else f"{so_far}, about {minutes(left)} of training left"


__all__ = ["JobClock", "minutes"]
