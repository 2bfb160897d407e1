"""The cache build as a background job owned by a process, not by whoever asked for it.

Why: the app used to build the caches inside a browser tab's script run, so closing the tab
stopped the build and the next tab started over.  A ``BuildWorker`` is one thread per
(session, process): ``start()`` is idempotent (a second caller, another tab, gets the
running job), the thread does not belong to any tab, and every caller reads the same
``BuildState`` snapshot (message, fraction, per-method times, error).  A failure stops the
job and is kept with its reason until someone calls ``start()`` again (the app's Retry
button): it is never retried in a loop.  Progress also goes to the terminal through tqdm, so
a ``make run`` that builds is not silent.

Methods are built one at a time, and not under the caller's lock (the app's ``Handle.lock``): queries
of the methods already built run meanwhile, and leave the ones still to build (``BuildState.pending``)
alone.  The model is shared safely: the gradient passes' hooks act only in the thread that installs them
(``gradients.this_thread_only``) and the K-FAC factor pass hooks a private copy
(``curvature.private_copy``).  Before each method the torch thread count is chosen again
(``engine.threads.configure_threads``), since other processes come and go during a long build.
Every pass is resumable (``engine.attribution.pass_checkpoint``, ``Store.partial``), so a restarted server
continues where the last one stopped.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ..bar_redraw import QuietClock, interval, move
from ..threads import configure_threads
from . import exiting
from .terminal_progress import EARLIER_RUN, Pace, fit_line

log = logging.getLogger(__name__)

# One build at a time in a process: a second model's build (the app's model switch while the first builds) would
# share the cores with the first and bring neither sooner (QA 30c: the mnist build started beside the digits one,
# halving its CPU on a 2-core laptop, and nothing said so).  The second waits, and says for whom.
#
# Turns go in the order the builds were started (``start``), not in the order their cache checks end: after a
# restart the server starts its own model's build first (``explorer.runtime.serve``), but each build checks its
# caches before it asks for the turn, and a tab's digits, quicker to check, took it from mnist, 87% built, which
# then waited 3.5-5 min (QA 49 #1).  ``_QUEUE`` holds the started builds that may still build, oldest first; the
# first builds, the others wait; one leaves it when it has built, failed or found nothing to build.
_TURNS = threading.Condition()
_QUEUE: list[BuildWorker] = []
WAITING_TURN = "cache build in this server to finish"  # in the waiting build's message (the app shows it as it is)

_RUNNING: set[threading.Thread] = set()  # the build threads alive
STOPPED = "stopped: the server is shutting down (a restart resumes the build from what it saved)"


class BuildStopped(BaseException):
    """Raised in a build's progress callback once the process is exiting: a BaseException, so that a method's
    ``except Exception`` (the session's "one broken method does not stop the others") does not swallow it."""


def stop_builds(timeout: float = 5.0) -> None:
    """At the interpreter's exit (registered with atexit): ask every running build to stop at its next progress
    call (a batch's end) and wait up to ``timeout`` seconds for it.

    Why: a daemon build thread still inside torch when the interpreter finalises aborted the process
    ("terminate called without an active exception", SIGABRT: QA 30c, Ctrl-C or SIGTERM of ``make run`` during
    a build).  Stopped at a batch's end, the build leaves what it saved (finished parts, the factor pass's
    checkpoint of at most 30 s before) for the next start to resume from."""
    exiting.STOPPING.set()
    deadline = time.monotonic() + timeout
    for thread in list(_RUNNING):
        thread.join(max(0.0, deadline - time.monotonic()))


atexit.register(stop_builds)


@dataclass(frozen=True)
class BuildState:
    """What every tab shows: ``status``, the latest progress message and overall fraction."""

    status: Literal["idle", "running", "done", "failed"] = "idle"
    message: str = ""
    fraction: float = 0.0
    methods: tuple[str, ...] = ()  # what this job builds, in order
    # the methods of the same build found built when the job started (by an earlier run of it, killed after
    # they finished, or by the CLI): they count as done in ``fraction``, so that "whole build" keeps its meaning
    # across a restart (QA 30c: digits' bar fell from ~100% before a kill -9 to 39% after it, when only TRAK
    # and D-TRAK were left and the restarted job's share counted those two alone)
    built_before: tuple[str, ...] = ()
    current: str | None = None
    started: float | None = None  # time.time()
    finished: float | None = None
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0
    unavailable: dict[str, str] = field(default_factory=dict)  # methods that cannot run here, with the reason
    retry_helps: bool = True  # False: the failure is the cache root's (not writable), which a retry cannot mend
    # the passes that resumed work an earlier (killed) run saved, as they said it: elapsed_s counts this run
    # only, so the page says the build resumed rather than letting "built in 2.5 min" stand for the whole (QA 23 #3)
    resumed: tuple[str, ...] = ()
    # ``fraction`` at this job's first progress (the work found saved or built before it included)
    start_fraction: float | None = None
    # this run's speed over the work it computed, not over what it reloaded (``Pace``; time.time()): the time left
    pace: Pace = field(default_factory=Pace)

    @property
    def pending(self) -> tuple[str, ...]:
        """The methods this job has still to build (the current one included) while it runs: a query leaves
        them out, since their caches are being written (none once the job has stopped)."""
        if self.status != "running":
            return ()
        return tuple(m for m in self.methods if m not in self.summary)

    @property
    def checking(self) -> bool:
        """The job has started but not yet found out which caches are missing."""
        return self.status == "running" and not self.methods

    def time_left(self, now: float | None = None) -> str | None:
        """The build's time left at this run's pace over the work it computed ("4 min"), or None (too early to say,
        nothing computed yet, not running).  Why not from ``start_fraction``: the jumps of a resumed pass's reloaded
        work (the saved factors, the saved bank rows) came after the first progress, and counted as this run's
        speed (QA 40 #2: "about 2 min left" for 12 min).  A state that recorded no pace (made by hand) counts all
        its work since ``start_fraction`` as computed."""
        if self.status != "running":
            return None
        pace = self.pace
        if pace.at is None and self.started is not None and self.start_fraction is not None:
            pace = Pace.since(self.started, self.start_fraction)
        return pace.left(self.fraction, time.time() if now is None else now)

    @property
    def elapsed_s(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.time()) - self.started


class BuildWorker:
    """One background build of ``session``'s missing caches (``engine.attribution.session.AttributionSession``)."""

    def __init__(
        self,
        session: Any,
        lock: threading.RLock | None = None,
        methods: list[str] | None = None,
        terminal: bool = True,
        on_done: Callable[[BuildState], None] | None = None,
    ):
        self.session = session
        self.lock = lock or threading.RLock()
        self.wanted = methods
        self.terminal = terminal
        self.on_done = on_done
        self.nice = 10  # the build thread yields the CPU to the pages being served (Linux)
        self._state = BuildState()
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None
        self._checked = threading.Event()  # set once the running job knows what it builds

    # --- what callers see ----------------------------------------------------------------

    @property
    def state(self) -> BuildState:
        with self._guard:
            return self._state

    def _set(self, **changes: Any) -> None:
        with self._guard:
            self._state = replace(self._state, **changes)

    def missing(self) -> list[str]:
        """Available methods (of those wanted) whose caches are not built; records the unavailable
        ones (e.g. CLIP without weights) with their reason, and the built ones, in the state."""
        status = self.session.status()
        names = self.wanted or list(status)
        self._set(unavailable={n: str(v.get("reason") or "unavailable") for n, v in status.items()
                               if not v.get("available")},
                  # built work only: a method with no cache (pixel) is "built" on an empty cache too (QA 32: the first
                  # start's bar began at 25%)
                  built_before=tuple(n for n in names if status[n].get("available") and status[n].get("built")
                                     and status[n].get("cached", True)))
        return [n for n in names if status[n].get("available") and not status[n].get("built")]

    def start(self) -> bool:
        """Start the job unless one is running or it finished; True if this call started it.

        Returns at once: which caches are missing is found out by the job's thread, not by the
        caller, because that check walks the cache folders and asks every method whether it is
        available (CLIP's check imports open_clip: seconds).  A page that calls ``start()``
        therefore renders its precomputed results without waiting for it.  A job that finds
        every cache built ends as "done" without building anything.
        """
        with self._guard:
            if self._thread is not None and self._thread.is_alive():
                return False
            if self._state.status == "done":
                return False
            self._state = BuildState(
                status="running",
                message="checking which caches are missing",
                started=time.time(),
                attempts=self._state.attempts + 1,
            )
            self._checked.clear()
            with _TURNS:  # its place in the order of turns: when it was started
                if self not in _QUEUE:
                    _QUEUE.append(self)
            self._thread = threading.Thread(target=self._run, name="cache-build", daemon=True)
            _RUNNING.add(self._thread)
            self._thread.start()
            return True

    def wait_checked(self, timeout: float | None = None) -> BuildState:
        """The state once the job knows which caches are missing (or at ``timeout``): a page with
        nothing precomputed to show waits for this rather than calling a finished build unfinished."""
        if self._thread is not None:
            self._checked.wait(timeout)
        return self.state

    def wait(self, timeout: float | None = None) -> BuildState:
        t = self._thread
        if t is not None:
            t.join(timeout)
        return self.state

    # --- the job ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._run_job()
        finally:
            _leave_queue(self)
            _RUNNING.discard(threading.current_thread())

    def _run_job(self) -> None:
        # the check at full priority: it is short, and the page says "checking" until it ends (QA round 12:
        # at nice 10 on a loaded machine, CLIP's availability check, an open_clip import, took over a minute)
        todo = self._check()
        self._checked.set()
        if not todo:  # nothing to build (or a failed check): the next started build's turn
            _leave_queue(self)
        _lower_priority(self.nice)  # the build itself yields the CPU to the pages being served
        if todo:
            self._build(todo)
        if self.on_done is not None:
            try:
                self.on_done(self.state)
            except Exception:  # noqa: BLE001
                log.exception("on_done callback failed")

    def _check(self) -> list[str]:
        """What to build; the state says "starting", "done" (nothing to build) or "failed"."""
        try:
            todo = self.missing()
        except BaseException as e:  # noqa: BLE001 - reported to every tab with its reason
            log.error("checking the caches failed:\n%s", traceback.format_exc())
            self._set(status="failed", error=_user_message(e), retry_helps=_retry_helps(e), finished=time.time())
            return []
        if todo:
            self._set(methods=tuple(todo), message="starting")
        else:
            self._set(status="done", fraction=1.0, message="all caches built", finished=time.time())
        return todo

    def _what(self) -> str:
        preset = getattr(getattr(self.session, "preset", None), "name", None)
        return f"the {preset} model's" if preset else "another"

    def _take_turn(self) -> None:
        """Wait for the builds of this process started before this one (``_QUEUE``), saying so every few seconds."""
        t0 = time.monotonic()
        waited = False
        while True:
            with _TURNS:
                if self not in _QUEUE:  # left by a Retry's earlier run: back at the end
                    _QUEUE.append(self)
                if _QUEUE[0] is self:
                    break
                if waited:  # the first time round, say so before any wait (QA 50: "starting" for seconds)
                    _TURNS.wait(timeout=2.0)
                holder = _QUEUE[0] if _QUEUE and _QUEUE[0] is not self else None
            if holder is None:
                continue
            waited = True
            if exiting.exit_requested():
                raise BuildStopped("the process is exiting")
            whose = holder._what()
            # the other build's own estimate, so that this page can say how long the wait is (QA 40 #6)
            left = holder.state.time_left() if holder is not None else None
            left_words = f"it has about {left} left; " if left else ""
            self._set(message=f"waiting for {whose} {WAITING_TURN} ({left_words}one build at a time, so that each "
                              f"gets the whole CPU; {(time.monotonic() - t0) / 60:.1f} min so far)")
        if waited:  # the build's minutes count from its turn: "built in 29.6 min" held 3.4 min of waiting (QA 30c)
            self._set(started=time.time())

    def _stopped(self, summary: dict[str, Any] | None = None) -> None:
        """The state of a build the exiting process stopped: what was saved stays for the next start."""
        log.info("cache build stopped: the process is exiting (a restart resumes it)")
        self._set(status="failed", error=STOPPED, retry_helps=True, finished=time.time(), summary=dict(summary or {}))

    def _build(self, todo: list[str]) -> None:
        try:
            self._take_turn()
        except BuildStopped:
            self._stopped()
            return
        try:
            self._build_turn(todo)
        finally:
            _leave_queue(self)

    def _build_turn(self, todo: list[str]) -> None:
        bar = self._bar()
        # the terminal bar's clock moves while a step is quiet, as the CLI's bars' do (QA 45 #9: it sat still)
        clock = None if bar is None else QuietClock(bar, 0.0 if bar.disable else bar.maxinterval, "build bar clock")
        summary: dict[str, Any] = {}
        try:
            with self.lock:
                # {method making a gradient pass: methods it feeds} (K-FAC's bank pass feeds TRAK and D-TRAK)
                feeds = dict(self.session.share_gradient_passes(todo) or {})
            done = dict.fromkeys(todo, 0.0)  # each method's share of its own work done, never decreasing
            before = len(self.state.built_before)  # built when the job started: done, in the whole build's share

            def whole() -> float:
                return (before + sum(done.values())) / (before + len(todo))

            for name in todo:
                self._set(current=name, message=f"{name}: starting", fraction=whole())
                # the count for this method's passes (torch's count is per thread, and threads started later take
                # the latest one set: a page's query thread started during a gradient pass runs at 1, review 53)
                configure_threads(f"building {name}")

                def progress(msg: str, frac: float, name: str = name) -> None:
                    if exiting.exit_requested():
                        raise BuildStopped("the process is exiting")
                    frac = min(max(float(frac), 0.0), 1.0)
                    done[name] = max(done[name], frac)
                    for other in feeds.get(name, ()):  # its pass computes the fed methods' gradients too
                        shared = self.session.method(name).shared_pass_fraction(frac)
                        done[other] = max(done[other], shared)
                    overall = whole()
                    # a pass resuming saved work (the bank's, the factors', TRAK's) says so in these words
                    resumed = (*self.state.resumed, msg) if EARLIER_RUN in msg else self.state.resumed
                    first = overall if self.state.start_fraction is None else self.state.start_fraction
                    # the time left counts the work this run computes, not the jumps of what a pass reloaded (QA 40 #2)
                    pace = self.state.pace.step(msg, overall, time.time())
                    self._set(message=msg, fraction=overall, resumed=resumed, start_fraction=first, pace=pace)
                    if bar is not None:  # TQDM_MININTERVAL thins it (engine.bar_redraw)
                        clock.touch()
                        # without the method's key, which its title repeats, and 90 characters: the refeed's rows
                        # read "train gradients 16/1000 (saved; again for the p" (QA 47 #6)
                        shown = msg.removeprefix(f"{name}: ")
                        move(bar, overall, fit_line(bar, shown, 90), field="postfix")

                # not under the caller's lock: the methods already built answer queries meanwhile (QA round
                # 19: a new method's build turned a working server into a precomputed-only one).  A query
                # leaves the methods still to build alone (``pending``), the gradient passes' hooks act in
                # their own thread only, and the factor pass hooks a private copy of the model
                summary.update(self.session.build([name], progress))
                done[name] = 1.0
                self._set(summary=dict(summary))
            self._set(status="done", fraction=1.0, message="all caches built", current=None, finished=time.time())
        except BuildStopped:
            self._stopped(summary)
        except BaseException as e:  # noqa: BLE001 - reported to every tab with its reason
            log.error("cache build failed:\n%s", traceback.format_exc())
            self._set(status="failed", error=_user_message(e), retry_helps=_retry_helps(e), finished=time.time(),
                      summary=dict(summary))
        finally:
            if clock is not None:
                clock.stop()
            if bar is not None:
                bar.close()

    def _bar(self):
        if not self.terminal:
            return None
        from tqdm.auto import tqdm

        # the model's name: a server with the sidebar's switch builds digits' and mnist's caches in turn, and its
        # terminal said "building caches" for both (QA 47 #2)
        preset = getattr(getattr(self.session, "preset", None), "name", None)
        return tqdm(
            total=1000,
            desc=f"building {preset} caches" if preset else "building caches",
            unit="‰",
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}",
            file=sys.stderr,
            **interval(1.0),  # TQDM_MININTERVAL, when set
        )


def _leave_queue(worker: BuildWorker) -> None:
    """``worker`` gives up its place in the order of turns (built, failed, nothing to build, or its thread ended)."""
    with _TURNS:
        if worker in _QUEUE:
            _QUEUE.remove(worker)
            _TURNS.notify_all()


def _user_message(e: BaseException) -> str:
    """What every tab shows of a failure: a user error's own message (bad input, a file or folder problem:
    ValueError, OSError), which names what to fix; anything else with its type, which says it is a bug."""
    return str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"


def _retry_helps(e: BaseException) -> bool:
    """A cache root that cannot be written (read-only, a file) stays so: Retry would fail the same way."""
    from .store import CacheRootError

    return not isinstance(e, CacheRootError)


def _lower_priority(increment: int) -> None:
    """Raise this thread's nice value (Linux: per thread), so that rendering the pages and answering
    queries in the same process come first; the build's torch work runs in this thread (one
    intra-op thread on a busy machine, ``engine.threads``)."""
    if increment <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)
    except OSError:
        log.debug("could not lower the build thread's priority", exc_info=True)
