"""On-page progress while the app's first load decodes an image folder (``engine.model.decode_progress``).

Why: ``runtime.get_handle`` loads the training set inside ``st.cache_resource``, and the page showed only its
spinner ("Loading the model and the training set ...") for the minutes a large folder's first decode takes; the
bar that counted the images went to the server's terminal.  ``shown`` draws the counts into a placeholder that
``app.main`` makes before ``get_handle``.  ``get_handle`` runs in ``runtime.serve``'s thread, which the script run
waits for (QA 45 #6), in a copy of the run's context: the decode's reports reach the listener set here, and its
draws go to the run's page.  Three of Streamlit's rules shape it:

* An element drawn inside a cached function is recorded and replayed at every later cache hit, and replaying one
  drawn into a block made outside the function fails (``CacheReplayClosureError``, on every later page load).  The
  listener draws in a copy of the script's context taken before ``get_handle``, in which Streamlit's "inside a
  cached function" variable is unset, so nothing is recorded.
* Every element drawn is a point where Streamlit stops the script for a rerun or a closed tab.  Raised inside the
  decode, that would throw away minutes of work, and the refresh a user tries on a page that looks stuck would
  start the decode again from nothing.  The listener keeps the request, draws no more, and raises it once the load
  is over (its result cached for the next run).  Drawn from ``serve``'s thread, not the script's, an element
  raises no stop at all; the rule is kept for a load in the script's own thread.
* Another tab, or the same one after a refresh, waits for that load on the cache's lock with the spinner only:
  ``wait_for_other_load`` shows it the loading run's latest counts (``_latest``) until the load is over.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from typing import Any

from streamlit.runtime.scriptrunner import RerunException, StopException

from engine.attribution.terminal_progress import time_left
from engine.bar_redraw import short_duration
from engine.model.decode_progress import DecodeProgress, listening

log = logging.getLogger(__name__)

SHOW_AFTER_S = 0.5  # a decode shorter than this draws nothing: a small folder's would only flash
EVERY_S = 0.25  # at most this often a redraw (the decoder reports every image)
LEFT_AFTER_S = 3.0  # the time left is said once the decode has run this long (its speed is known by then)

_lock = threading.Lock()
_latest: dict[Hashable, DecodeProgress] = {}  # the latest counts of each load under way, by its get_handle key


def progress_text(p: DecodeProgress) -> str:
    """The line above the bar: "Decoding 3,000 images in `FOLDER`: 1,234/3,000 (about 2 min left)"."""
    if p.finished:
        return (f"Decoded {p.total:,} images in `{p.folder}` in {short_duration(p.elapsed_s)}; loading the rest of "
                "the model ...")
    left = time_left(0.0, 0.0, p.done / p.total, now=p.elapsed_s, min_seconds=LEFT_AFTER_S)
    return f"Decoding {p.total:,} images in `{p.folder}`: {p.done:,}/{p.total:,}" + (
        f" (about {left} left)" if left else "")


def _draw(placeholder: Any, p: DecodeProgress) -> None:
    placeholder.progress(min(p.done / max(p.total, 1), 1.0), text=progress_text(p))


class PageProgress:
    """The decode listener of one script run: records the counts for other tabs, and draws them into
    ``placeholder`` (after ``SHOW_AFTER_S``, at most every ``EVERY_S``, and the last count at once), in the
    script's context as it was before the cached function (see the module docstring)."""

    def __init__(self, placeholder: Any, key: Hashable, clock: Callable[[], float] = time.monotonic) -> None:
        self.placeholder, self.key, self.clock = placeholder, key, clock
        self.context = contextvars.copy_context()
        self.control: RerunException | StopException | None = None  # a rerun or stop asked for while drawing
        self.drawn_at: float | None = None
        self.quiet = False  # drawing failed or was stopped: no more tries

    def __call__(self, p: DecodeProgress) -> None:
        with _lock:
            _latest[self.key] = p
        if self.quiet or p.elapsed_s < SHOW_AFTER_S:
            return
        now = self.clock()
        if not p.finished and self.drawn_at is not None and now - self.drawn_at < EVERY_S:
            return
        self.drawn_at = now
        try:
            self.context.run(_draw, self.placeholder, p)
        except (RerunException, StopException) as e:
            self.control, self.quiet = e, True  # raised by ``shown`` after the load
        except Exception as e:  # noqa: BLE001 - the page's progress must never fail the load
            log.warning("decode progress not shown on the page: %s", e)
            self.quiet = True


@contextlib.contextmanager
def shown(placeholder: Any, key: Hashable) -> Iterator[None]:
    """Show the progress of a folder decode in the block (``get_handle``) in ``placeholder``, emptied at the end.
    A rerun or stop the page asked for meanwhile is raised here, after the load, not inside it."""
    listener = PageProgress(placeholder, key)
    try:
        with listening(listener):
            yield
    finally:
        with _lock:
            _latest.pop(key, None)
        if listener.drawn_at is not None:
            placeholder.empty()
        if listener.control is not None:
            raise listener.control


def wait_for_other_load(placeholder: Any, key: Hashable, sleep: Callable[[float], None] = time.sleep) -> None:
    """While another script run's load of ``key`` decodes a folder, show its counts in ``placeholder``; return when
    that load is over (``get_handle`` then gives its result from the cache, or loads again if it failed).  Each
    draw is this run's own yield point: a refresh or a closed tab ends the wait, not the other run's load."""
    drawn = False
    while True:
        with _lock:
            p = _latest.get(key)
        if p is None:
            break
        _draw(placeholder, p)
        drawn = True
        sleep(EVERY_S)
    if drawn:
        placeholder.empty()
