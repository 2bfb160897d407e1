"""What a benchmark is about to time, said on stderr before it runs.

Why: a bar would cost time inside the timed region, and a silent benchmark cannot be told from a hung one
(QA 25 #11, QA 27 #9: 10-46 s with nothing on stderr); stdout keeps the figures.
"""

from __future__ import annotations

import sys


def say(text: str) -> None:
    """``text`` on stderr, flushed at once (a redirected stdout leaves the terminal this line)."""
    print(text, file=sys.stderr, flush=True)
