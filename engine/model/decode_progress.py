"""Who hears how far an image folder's decode is, besides the terminal's bar (``data_files._DecodeBar``).

Why: the app loads its training set inside ``st.cache_resource``, whose page showed only a spinner for the minutes
a large folder's first decode takes, while the bar that counted the images went to the server's terminal.  The
engine knows nothing of Streamlit: a caller that wants the counts wraps its load in ``listening(callback)``, and
the decoder ``report``s each image to the callbacks of that caller's context (a ``ContextVar``: each thread, so
each browser tab's script run, hears only its own load; a load elsewhere, a CLI command, calls nothing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DecodeProgress:
    """``done`` of ``total`` images of ``folder`` decoded, ``elapsed_s`` seconds after the decode started."""

    folder: Path
    done: int
    total: int
    elapsed_s: float

    @property
    def finished(self) -> bool:
        return self.done >= self.total


Listener = Callable[[DecodeProgress], None]

_listeners: ContextVar[tuple[Listener, ...]] = ContextVar("decode_progress_listeners", default=())


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Call ``listener`` with every ``report`` made in this context until the block ends (nested blocks add up)."""
    token = _listeners.set((*_listeners.get(), listener))
    try:
        yield
    finally:
        _listeners.reset(token)


def report(folder: Path, done: int, total: int, elapsed_s: float) -> None:
    """Tell this context's listeners; nearly free when there are none (it runs once per decoded image).  A
    listener's exception stops the decode, as the caller's own code would: a listener that must not, catches."""
    listeners = _listeners.get()
    if listeners:
        progress = DecodeProgress(folder, done, total, elapsed_s)
        for listener in listeners:
            listener(progress)
