"""engine.attribution.build_worker: one background build per session, shared by every caller; failures wait for a retry."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from engine.attribution.build_worker import BuildWorker


class _Session:
    """Stands in for AttributionSession: methods "a" and "b" whose build waits for ``gate``."""

    def __init__(self, fail: str | None = None):
        self.built: set[str] = set()
        self.calls: list[str] = []
        self.gate = threading.Event()
        self.fail = fail

    def share_gradient_passes(self, names) -> dict:
        return {}

    status_gate: threading.Event | None = None  # when set, status() waits for it (a slow cache check)

    def status(self) -> dict:
        if self.status_gate is not None:
            assert self.status_gate.wait(30)
        return {n: {"available": True, "built": n in self.built} for n in ("a", "b")} | {
            "c": {"available": False, "built": False}
        }

    def build(self, names, progress):
        (name,) = names
        self.calls.append(name)
        progress(f"{name}: half", 0.5)
        assert self.gate.wait(30)
        if name == self.fail:
            raise RuntimeError(f"{name} broke")
        self.built.add(name)
        progress(f"{name}: done", 1.0)
        return {name: {"status": "ok", "seconds": 0.0, "size_mb": 0.0}}


def test_one_build_shared_by_every_caller_and_kept_going_without_them():
    s = _Session()
    w = BuildWorker(s, terminal=False)
    assert w.start() is True
    assert w.start() is False and w.start() is False  # more tabs: same job
    state = _when(w, lambda st: st.methods)
    assert state.status == "running" and state.methods == ("a", "b") and state.attempts == 1
    s.gate.set()
    done = w.wait(30)
    assert done.status == "done" and done.fraction == 1.0 and s.calls == ["a", "b"]
    assert done.unavailable == {"c": "unavailable"}  # what the check found, for the precomputed page
    assert set(done.summary) == {"a", "b"}
    assert w.start() is False and s.calls == ["a", "b"]  # nothing rebuilt


def test_the_servers_terminal_bar_keeps_its_clock_moving_through_a_quiet_step(monkeypatch, capsys):
    """QA 45 #9: the app's build bar in the server's terminal had no clock of its own (the CLI's bars have one), so
    it sat still through a pass that said nothing for a minute.  It is redrawn after ``maxinterval`` quiet seconds
    (``bar_redraw.QuietClock``), here 0.2 s, while the build waits at "a: half"."""
    import functools

    import tqdm.auto
    import tqdm.std

    # TQDM_MAXINTERVAL is read when tqdm is imported (the server sets it first: bar_redraw.match_log_intervals)
    monkeypatch.setattr(tqdm.auto, "tqdm", functools.partial(tqdm.std.tqdm, maxinterval=0.2))
    s = _Session()
    w = BuildWorker(s, terminal=True)
    assert w.start() is True
    _when(w, lambda st: st.message.endswith("half"))
    time.sleep(1.5)  # quiet: no message while the gate is shut
    s.gate.set()
    assert w.wait(30).status == "done"
    err = capsys.readouterr().err
    draws = [d for d in err.replace("\r", "\n").splitlines() if d.rstrip().endswith(" half")]  # "a: " is dropped
    assert len(draws) >= 4, err  # redrawn while quiet, not once


def test_the_servers_terminal_prints_a_long_resume_line_whole(capsys):
    """QA 46 #3: the server's bar cut every message at 70 characters, so its terminal (and a log) read "resuming:
    128/200 examples saved by an earlier " and never what the resumed pass computes again.  A resume line that does
    not fit is written whole on a line of its own; other long messages are only cut."""
    line = "b: B method: resuming: 128/200 examples saved by an earlier run (128 of them computed again for trak, dtrak)"
    s = _Session()
    s.preset = type("P", (), {"name": "tiny"})()
    real = s.build

    def build(names, progress):
        if names == ["b"]:
            progress(line, 0.4)
            progress("b: " + "x" * 100 + " and the end of a long message", 0.5)
        return real(names, progress)

    s.build = build
    s.gate.set()
    w = BuildWorker(s, terminal=True)
    w.start()
    assert w.wait(30).status == "done"
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert lines.count(line.removeprefix("b: ")) == 1, lines  # whole, on its own line, once (the key dropped)
    assert any(t.startswith("building tiny caches: ") for t in lines), lines  # the model's name (QA 47 #2)
    assert not any("and the end of a long message" in t for t in lines)  # cut, as before


def _when(w: BuildWorker, ok, timeout: float = 30.0):
    """The worker's state once ``ok(state)`` holds (the job sets it from its own thread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = w.state
        if ok(state):
            return state
        time.sleep(0.01)
    raise AssertionError(f"worker never reached the expected state: {w.state}")


def test_start_returns_before_the_cache_check():
    """A page calls start() on every run; the check of what is missing (seconds: it walks the
    caches and imports open_clip) runs in the job's thread, so the page is never held up by it."""
    s = _Session()
    s.status_gate = threading.Event()
    w = BuildWorker(s, terminal=False)
    t0 = time.monotonic()
    assert w.start() is True
    assert time.monotonic() - t0 < 5.0  # status() is still blocked: start() did not wait for it
    assert w.state.status == "running" and w.state.methods == () and s.calls == []
    s.status_gate.set()
    assert _when(w, lambda st: st.methods).methods == ("a", "b")
    s.gate.set()
    assert w.wait(30).status == "done" and s.calls == ["a", "b"]


def test_the_cache_check_runs_at_full_priority_and_the_build_yields(monkeypatch):
    """QA round 12: the thread lowered its priority before the check, so on a loaded machine the page said
    "Checking which attribution caches are built ..." for over a minute (CLIP's check imports open_clip)."""
    import engine.attribution.build_worker as bw

    events: list[str] = []
    s = _Session()
    real_status = s.status
    s.status = lambda: events.append("check") or real_status()
    monkeypatch.setattr(bw, "_lower_priority", lambda inc: events.append(f"nice +{inc}"))
    w = BuildWorker(s, terminal=False)
    w.start()
    s.gate.set()
    assert w.wait(30).status == "done"
    assert events[:2] == ["check", "nice +10"], events


def test_nothing_missing_ends_done_without_building():
    s = _Session()
    s.built = {"a", "b"}
    w = BuildWorker(s, terminal=False)
    w.start()
    state = w.wait(30)
    assert state.status == "done" and state.fraction == 1.0 and s.calls == []
    assert w.start() is False


def test_failure_is_reported_and_not_retried_until_asked():
    s = _Session(fail="b")
    w = BuildWorker(s, terminal=False)
    w.start()
    s.gate.set()
    state = w.wait(30)
    assert state.status == "failed" and state.error == "RuntimeError: b broke"  # not a user error: its type shown
    assert "a" in state.summary and s.calls == ["a", "b"]
    s.fail = None
    assert w.start() is True  # the Retry button
    state = w.wait(30)
    assert state.status == "done" and s.calls == ["a", "b", "b"] and state.attempts == 2


def test_a_cache_root_that_cannot_be_written_is_reported_plainly_and_not_offered_a_retry():
    """QA round 12: on a read-only cache root every tab showed "CacheRootError: ..." with "Retry continues
    from them" and a Retry button that could only fail again."""
    from engine.attribution.store import CacheRootError

    s = _Session()

    def read_only(names, progress):
        raise CacheRootError("cache root /ro is not writable (Read-only file system); choose a writable folder")

    s.build = read_only
    w = BuildWorker(s, terminal=False)
    w.start()
    state = w.wait(30)
    assert state.status == "failed" and not state.retry_helps
    assert state.error.startswith("cache root /ro is not writable")  # the message, not the class name


def _fractions(w: BuildWorker) -> list[float]:
    """Every overall fraction the worker sets, in order (a spy on its state changes)."""
    seen: list[float] = []
    orig = w._set

    def spy(**changes):
        orig(**changes)
        if "fraction" in changes:
            seen.append(changes["fraction"])

    w._set = spy  # type: ignore[method-assign]
    return seen


def test_progress_is_overall_and_monotone():
    s = _Session()
    w = BuildWorker(s, terminal=False)
    seen = _fractions(w)
    s.gate.set()
    w.start()
    w.wait(30)
    assert seen == sorted(seen) and seen[-1] == 1.0
    assert pytest.approx(0.25) in seen and pytest.approx(0.75) in seen  # half of a, half of b
    # the time left counts from the first progress this job reported (runtime.build_message)
    assert w.state.start_fraction == pytest.approx(0.25)  # a's first report: a half done, a quarter of the two methods' build


def test_a_build_that_resumes_saved_work_says_so():
    """QA 23 #3: after kill -9 and a restart the page's "min so far" and "built in 2.5 min" counted only the new
    run, and nothing said it had resumed; the state now keeps the passes' resume lines (the bank's, the factor
    pass's and TRAK's, pinned in test_bank, test_resume and test_trak, all end so)."""
    from explorer.runtime import build_message

    s = _Session()
    real = s.build

    def build(names, progress):
        if names == ["b"]:
            progress("b: resuming: 4/10 examples saved by an earlier run", 0.4)
        return real(names, progress)

    s.build = build
    w = BuildWorker(s, terminal=False)
    s.gate.set()
    w.start()
    state = w.wait(30)
    assert state.status == "done" and state.resumed == ("b: resuming: 4/10 examples saved by an earlier run",)
    handle = type("H", (), {"build": state, "session": type("S", (), {"method_info": lambda self: {}})()})()
    running = state.__class__(status="running", message="b: train gradients 5/10", started=time.time() - 60,
                              resumed=state.resumed)
    assert build_message(handle, running).endswith("min so far in this run, which resumed work saved by an earlier one)")
    fresh = BuildWorker(_Session(), terminal=False)
    fresh.session.gate.set()
    fresh.start()
    assert fresh.wait(30).resumed == ()
    assert build_message(handle, running.__class__(status="running", message="b: x")).endswith("min so far)")


def test_the_shared_gradient_pass_counts_for_the_methods_it_feeds():
    """K-FAC's build (its factor pass, then its bank pass) computes TRAK's gradients too: while it runs, the bar
    counts TRAK's share as done with K-FAC's, not as still to do after K-FAC, so the bar follows the build's time."""
    from engine.attribution.methods.kfac_influence import KFACInfluence

    factor_end = 0.25  # where a factor pass might end in K-FAC's own bar (KFACInfluence.factor_share)

    class Shared(_Session):
        def share_gradient_passes(self, names) -> dict:
            return {"kfac": ["trak"]} if "kfac" in names else {}

        def method(self, name):
            assert name == "kfac"  # only the method making the pass is asked how far it is
            return KFACInfluence

        def status(self) -> dict:
            return {n: {"available": True, "built": n in self.built} for n in ("kfac", "trak", "pixel")}

        def build(self, names, progress):
            (name,) = names
            self.calls.append(name)
            if name == "kfac":
                progress("kfac: factors", factor_end)  # the factor pass is over, the bank pass starts
                progress("kfac: bank half way", factor_end + (1 - factor_end) / 2)
                assert self.gate.wait(30)
            self.built.add(name)
            progress(f"{name}: done", 1.0)
            return {name: {"status": "ok", "seconds": 0.0, "size_mb": 0.0}}

    s = Shared()
    w = BuildWorker(s, terminal=False)
    w.start()
    state = _when(w, lambda st: "half way" in st.message)
    kfac = factor_end + (1 - factor_end) / 2
    assert state.fraction == pytest.approx((kfac + kfac) / 3)  # TRAK's share moves with K-FAC's build
    s.gate.set()
    assert w.wait(30).fraction == 1.0 and s.calls == ["kfac", "trak", "pixel"]


def test_a_build_that_must_wait_says_so_before_its_first_wait(monkeypatch):
    """QA 50: after a restart the waiting model's page said "Building ... starting" for seconds before "waiting for
    the mnist model's cache build": the job waited its first 2 s for the turn before it said why."""
    from types import SimpleNamespace

    from engine.attribution import build_worker

    first, second = _Session(), _Session()
    first.preset, second.preset = SimpleNamespace(name="mnist"), SimpleNamespace(name="digits")
    w1, w2 = BuildWorker(first, terminal=False), BuildWorker(second, terminal=False)
    said_at_wait: list[str] = []
    real_wait = build_worker._TURNS.wait

    def wait(timeout=None):
        if threading.current_thread() is w2._thread:
            said_at_wait.append(w2.state.message)
        return real_wait(timeout)

    monkeypatch.setattr(build_worker._TURNS, "wait", wait)
    w1.start()
    _when(w1, lambda st: first.calls == ["a"])  # the first holds the turn, blocked in its build
    w2.start()
    _when(w2, lambda st: st.message.startswith("waiting for"), timeout=10)
    _when(w2, lambda st: bool(said_at_wait), timeout=10)
    assert said_at_wait[0].startswith("waiting for the mnist model's cache build")
    first.gate.set()
    second.gate.set()
    assert w1.wait(30).status == "done" and w2.wait(30).status == "done"


def test_a_second_models_build_waits_for_the_first_and_says_so():
    """QA 30c: switching models during the first start's build started the second model's build beside the
    first, each with half of a 2-core laptop, and nothing said so.  One build at a time in a process: the
    second waits, saying whose build it waits for, then runs."""
    from types import SimpleNamespace

    first, second = _Session(), _Session()
    first.preset, second.preset = SimpleNamespace(name="digits"), SimpleNamespace(name="mnist")
    w1, w2 = BuildWorker(first, terminal=False), BuildWorker(second, terminal=False)
    w1.start()
    _when(w1, lambda st: first.calls == ["a"])  # the first holds the turn, blocked in its build
    w2.start()
    waiting = _when(w2, lambda st: st.message.startswith("waiting for"), timeout=10)
    assert "waiting for the digits model's cache build in this server to finish" in waiting.message
    assert second.calls == [] and waiting.status == "running"
    second.gate.set()  # the second could finish at once, but waits for its turn
    time.sleep(0.3)
    assert second.calls == []
    time.sleep(0.5)  # waited at least this long before its turn
    first.gate.set()
    assert w1.wait(30).status == "done"
    done = w2.wait(30)
    assert done.status == "done" and second.calls == ["a", "b"]
    assert done.elapsed_s < 0.5  # its minutes are its build's, not the wait's (QA 30c: 29.6 min held 3.4 of waiting)
    # and a failed build gives the turn back
    broken, after = _Session(fail="a"), _Session()
    broken.gate.set()
    after.gate.set()
    wb, wa = BuildWorker(broken, terminal=False), BuildWorker(after, terminal=False)
    wb.start()
    assert wb.wait(30).status == "failed"
    wa.start()
    assert wa.wait(30).status == "done"


def test_a_build_stops_at_a_batch_end_when_the_process_exits(monkeypatch):
    """QA 30c: Ctrl-C or SIGTERM of a server during a build aborted it ("terminate called without an active
    exception", SIGABRT): the daemon build thread was still inside torch when the interpreter finalised.  At exit
    (atexit) the build is asked to stop at its next progress call and waited for; its state says why it stopped
    and that a restart resumes it."""
    import engine.attribution.build_worker as bw
    from engine.attribution import exiting

    monkeypatch.setattr(exiting, "STOPPING", threading.Event())  # the process's own flag is left alone

    class Looping(_Session):
        def build(self, names, progress):
            self.calls.append(names[0])
            for k in range(100_000):  # a pass: one progress call per batch
                progress(f"{names[0]}: {k} rows", 0.1)
                time.sleep(0.005)
            raise AssertionError("never asked to stop")

    s = Looping()
    w = BuildWorker(s, terminal=False)
    w.start()
    _when(w, lambda st: s.calls == ["a"])
    thread = w._thread
    assert thread in bw._RUNNING
    t0 = time.monotonic()
    bw.stop_builds(timeout=10)
    assert not thread.is_alive() and time.monotonic() - t0 < 5
    state = w.state
    assert state.status == "failed" and state.error == bw.STOPPED and state.retry_helps
    assert "a restart resumes the build" in state.error and s.calls == ["a"]  # "b" never started
    assert thread not in bw._RUNNING


def test_methods_built_before_a_restart_count_in_the_whole_builds_share():
    """QA 30c: after a kill -9 in the last seconds of the digits build, K-FAC was built and TRAK and D-TRAK were
    left; the restarted job's bar counted those two alone and fell from ~100% to 39%.  The methods found built
    when the job starts count as done, so the share is the whole build's across the restart."""
    s = _Session()
    s.built.add("a")  # built by the run that was killed
    w = BuildWorker(s, terminal=False)
    seen = _fractions(w)
    w.start()
    state = _when(w, lambda st: st.message == "b: half")
    assert state.methods == ("b",) and state.built_before == ("a",)
    assert state.fraction == pytest.approx(0.75)  # a done, b half way: (1 + 0.5) / 2, not b's 0.5 alone
    s.gate.set()
    assert w.wait(30).fraction == 1.0 and s.calls == ["b"]
    assert min(seen) == pytest.approx(0.5) and seen == sorted(seen)


def test_a_method_with_nothing_to_build_does_not_count_as_built_before():
    """QA 32: pixel cosine keeps no cache, so its status is "built" on an empty cache too; counted in
    ``built_before``, the first start's bar began at 25% with nothing done."""
    s = _Session()
    real = s.status
    s.status = lambda: {**real(), "pixel": {"available": True, "built": True, "cached": False}}  # type: ignore[method-assign]
    w = BuildWorker(s, methods=["a", "b", "pixel"], terminal=False)
    w.start()
    state = _when(w, lambda st: st.message == "a: half")
    assert state.built_before == () and state.methods == ("a", "b")
    assert state.fraction == pytest.approx(0.25)  # half of a, of a and b: pixel is not a finished share
    s.gate.set()
    assert w.wait(30).fraction == 1.0


def test_the_finished_line_names_what_an_earlier_run_built():
    """QA 32: after a kill -9 in the last seconds and a restart, the page said "Attribution caches built in 0.3 min"
    for about 11 minutes of work, K-FAC and TRAK built by the killed run; the line now says whose minutes they are."""
    from engine.attribution.build_worker import BuildState
    from explorer.runtime import finished_message

    t = time.time()
    fresh = BuildState(status="done", started=t - 60, finished=t)
    assert finished_message(fresh) == "Attribution caches built in 1.0 min; results below are live."
    resumed = BuildState(status="done", started=t - 60, finished=t, resumed=("trak: resuming: 4/10 saved by an earlier run",))
    assert "1.0 min in this run, which resumed work saved by an earlier one" in finished_message(resumed)
    after = BuildState(status="done", started=t - 18, finished=t, built_before=("kfac", "trak"), resumed=resumed.resumed)
    line = finished_message(after, {"kfac": "K-FAC Influence", "trak": "TRAK"})
    assert line == ("Attribution caches built: 0.3 min in this run, which resumed saved work; K-FAC Influence and TRAK "
                    "were built by an earlier run; results below are live.")
    # QA 34: without a resume it read "0.3 min in this run, which K-FAC Influence and TRAK were built by ..."
    plain = BuildState(status="done", started=t - 18, finished=t, built_before=("kfac", "trak"))
    assert finished_message(plain, {"kfac": "K-FAC Influence", "trak": "TRAK"}) == (
        "Attribution caches built: 0.3 min in this run; K-FAC Influence and TRAK were built by an earlier run; "
        "results below are live.")
    one = finished_message(BuildState(status="done", started=t - 18, finished=t, built_before=("kfac",)))
    assert "K-FAC was built by an earlier run" in finished_message(
        BuildState(status="done", started=t, finished=t, built_before=("kfac",)), {"kfac": "K-FAC"}) and "kfac was" in one


def test_builds_take_their_turns_in_the_order_they_were_started_not_by_whose_check_ends_first():
    """QA 49 #1: after a restart the server started its own model's build first (mnist, 87% built), but each build
    checks its caches before it asks for the turn, and a tab's digits, quicker to check, took the turn: mnist
    waited 3.5-5 min.  The turn follows ``start``: the first started builds first, even when its check ends last."""
    from types import SimpleNamespace

    order: list[str] = []
    own, tab = _Session(), _Session()
    own.preset, tab.preset = SimpleNamespace(name="mnist"), SimpleNamespace(name="digits")
    own.status_gate = threading.Event()  # its cache check is the slow one
    for s, name in ((own, "mnist"), (tab, "digits")):
        real = s.build
        s.build = lambda names, progress, real=real, name=name: order.append(name) or real(names, progress)
        s.gate.set()
    w_own, w_tab = BuildWorker(own, terminal=False), BuildWorker(tab, terminal=False)
    w_own.start()
    w_tab.start()
    waiting = _when(w_tab, lambda st: st.message.startswith("waiting for"), timeout=10)
    assert "the mnist model's" in waiting.message and order == []  # the tab's check is done: it waits all the same
    own.status_gate.set()
    assert w_own.wait(30).status == "done" and w_tab.wait(30).status == "done"
    assert order == ["mnist", "mnist", "digits", "digits"]  # each builds a and b; mnist's first
    # a build with nothing to build gives its place up at once
    done, after = _Session(), _Session()
    done.built = {"a", "b"}
    after.gate.set()
    w_done, w_after = BuildWorker(done, terminal=False), BuildWorker(after, terminal=False)
    w_done.start()
    w_after.start()
    assert w_done.wait(30).status == "done" and w_after.wait(30).status == "done"


def test_a_resumed_build_shows_no_share_before_its_first_step_reads_what_was_saved():
    """QA 50 #2, QA 53: after a restart the page read "starting (whole build 0%)" for a second or more, then jumped
    to 76% when the first step found the saved work.  Before that step the line says it is reading what earlier
    runs saved, with no share; from the first step on, the share is the build's."""
    from explorer.runtime import build_message

    s = _Session()
    entered, release = threading.Event(), threading.Event()
    real = s.build

    def build(names, progress):
        if names == ["a"]:
            entered.set()  # the method's build has begun, its saved work not yet read
            assert release.wait(30)
            progress("a: resuming: 76/100 rows saved by an earlier run", 0.76)
        return real(names, progress)

    s.build = build
    w = BuildWorker(s, terminal=False)
    w.start()
    assert entered.wait(30)
    handle = SimpleNamespace(session=SimpleNamespace(method_info=lambda: {"a": {"title": "Method A"}}))
    line = build_message(handle, w.state)
    assert line.startswith("Method A: starting (reading what earlier runs saved, if anything; ")
    assert "whole build" not in line
    release.set()
    state = _when(w, lambda st: st.message.startswith("a: half"))
    assert "(whole build 38%" in build_message(handle, state)  # (0.76 of a, none of b) / 2, rounded down
    s.gate.set()
    assert w.wait(30).status == "done"
