"""The app's build panel and its method columns say what is true (QA 40 #2, #5, #6, #7).

No real build: fake sessions drive ``BuildWorker`` with a fake clock and the progress messages a resumed digits
build sends (engine/attribution/methods/kfac_influence.py, bank_build.py).
"""

from __future__ import annotations

import threading
import time
import types

import pytest

from engine.attribution import build_worker
from engine.attribution.build_worker import WAITING_TURN, BuildState, BuildWorker

KFAC = "kfac: K-FAC Influence: "
N = 1797  # digits' training set


class _ResumedDigits:
    """K-FAC (whose bank pass feeds TRAK and D-TRAK) resuming a digits build killed at 256/1797 bank rows: the saved
    factors and rows load at once, then 16 rows take 10 s.  ``probe(t, rows)`` is called after each computed chunk."""

    def __init__(self, clock: list[float], probe):
        self.clock, self.probe = clock, probe

    def share_gradient_passes(self, names):
        return {"kfac": ("trak", "dtrak")}

    def method(self, name):
        return types.SimpleNamespace(shared_pass_fraction=lambda f: f)

    def build(self, names, progress):
        (name,) = names
        if name == "kfac":
            share = 0.25  # the factor pass's share of K-FAC's build
            self.clock[0] = 1.0
            progress(KFAC + "K-FAC factors loaded (saved by an earlier run)", share)
            self.clock[0] = 2.0
            progress(KFAC + f"resuming: 256/{N} examples saved by an earlier run", share + (1 - share) * 256 / N)
            for rows in range(272, N, 16):
                self.clock[0] += 10.0
                progress(KFAC + f"train gradients {rows}/{N}", share + (1 - share) * rows / N)
                self.probe(self.clock[0], rows)
        progress(f"{name}: built", 1.0)
        return {name: {"status": "ok", "seconds": 0.0, "size_mb": 0.0}}


def _handle(state_of):
    info = {"kfac": {"title": "K-FAC Influence"}, "trak": {"title": "TRAK"}, "dtrak": {"title": "D-TRAK"}}
    return types.SimpleNamespace(session=types.SimpleNamespace(method_info=lambda: info), build=None,
                                 state_of=state_of)


def test_a_resumed_builds_time_left_counts_only_the_work_this_run_computed(monkeypatch):
    """QA 40 #2: after a kill -9 and a restart the page said "about 2 min left" 0.3 min in, and the build took
    12.7 min: the jumps of the reloaded factors (0 -> 25%) and bank rows (-> 35%) counted as this run's speed.  At
    16 rows per 10 s, 1,445 rows (15 min) are left at row 352; the page now says so, as the terminal's bar did."""
    from explorer.runtime import build_message

    clock = [0.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])  # the worker's and the page's clock
    seen: dict[int, str] = {}
    worker: list[BuildWorker] = []
    handle = _handle(None)

    def probe(t: float, rows: int) -> None:
        if rows in (352, 1024):
            seen[rows] = build_message(handle, worker[0].state)

    w = BuildWorker(_ResumedDigits(clock, probe), terminal=False)
    worker.append(w)
    w._set(status="running", started=0.0, methods=("kfac", "trak", "dtrak"))
    w._build_turn(["kfac", "trak", "dtrak"])
    assert w.state.status == "done"
    assert "about 15 min left" in seen[352], seen[352]  # (1797 - 352) / 16 * 10 s = 903 s
    assert "about 8 min left" in seen[1024], seen[1024]  # 773 rows: 483 s


def test_the_pace_leaves_out_a_new_steps_jump_and_waits_for_computed_work():
    """The rule the page and the terminal's bars share (``terminal_progress.Pace``): a message with new words starts
    a step whose jump is not this run's speed; no estimate until 10 s of steps that only counted on."""
    from engine.attribution.terminal_progress import Pace

    p = Pace().step("factors loaded (saved by an earlier run)", 0.25, 1.0)
    p = p.step("resuming: 256/1797 examples saved by an earlier run", 0.36, 2.0)
    p = p.step("train gradients 272/1797", 0.363, 12.0)
    assert p.left(0.363, 12.0) is None  # nothing computed yet that can be timed
    p = p.step("train gradients 288/1797", 0.370, 22.0)
    assert p.seconds == pytest.approx(10.0) and p.done == pytest.approx(0.007)
    assert p.left(0.370, 22.0) == "15 min"  # 0.63 left at 0.007 per 10 s: 900 s
    assert p.left(0.370, 32.0) == "30 min"  # 10 s more with no new row: the estimate grows


def test_the_terminal_bar_of_a_resumed_pass_uses_the_same_pace(monkeypatch):
    """The CLI's per-method bars (``terminal_progress``) counted from their first message: a pass that reported
    its loaded factors, then its saved rows, counted the second jump as its speed."""
    from engine.attribution import terminal_progress

    clock = [0.0]
    monkeypatch.setattr(terminal_progress.time, "monotonic", lambda: clock[0])
    texts: list[str] = []
    monkeypatch.setattr(terminal_progress, "move", lambda bar, fraction, text: texts.append(text))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    with terminal_progress.terminal_progress("building kfac", quiet_redraw_s=0) as progress:
        progress("K-FAC factors loaded (saved by an earlier run)", 0.25)
        clock[0] = 1.0
        progress(f"resuming: 256/{N} examples saved by an earlier run", 0.25 + 0.75 * 256 / N)
        for rows in range(272, 353, 16):
            clock[0] += 10.0
            progress(f"train gradients {rows}/{N}", 0.25 + 0.75 * rows / N)
    assert texts[-1].endswith("(15 min left)"), texts[-1]


def test_a_running_build_never_reads_100_percent_and_a_built_columns_words_match_the_panels_button():
    """QA 40 #5: "D-TRAK: eigendecomposing the projected Fisher (k = 2048) (whole build 100%, ...)" while D-TRAK was
    still building, and "Show K-FAC Influence and TRAK live" in the panel above a K-FAC column that said it answers
    when the whole build finishes."""
    from explorer import plain
    from explorer.runtime import build_message, whole_percent

    handle = _handle(None)
    state = BuildState(status="running", message="dtrak: eigendecomposing the projected Fisher (k = 2048)",
                       fraction=0.996, started=time.time() - 60)
    assert "(whole build 99%, 1.0 min so far" in build_message(handle, state)
    assert whole_percent(BuildState(status="done", fraction=1.0)) == 100
    assert whole_percent(BuildState(status="running", fraction=0.29)) == 29
    line = plain.unavailable_line("unavailable", "K-FAC Influence", f"{plain.BUILDING}; {plain.PENDING}")
    assert line.startswith("**Being built:** K-FAC Influence answers when the cache build finishes")
    # the panel's button is "Show K-FAC Influence and TRAK live" (build_view._built_since_drawn)
    assert "or as soon as it is built: the panel there then offers a button, **Show ... live**" in line


class _Gated:
    """One method, "a", whose build reports twice on the fake clock (0.1 at 0 s, 0.2 at 20 s), then waits for
    ``gate``; ``status`` waits ``check_s`` (CLIP's check: an open_clip import) and finds CLIP unavailable."""

    def __init__(self, clock: list[float] | None = None, check_s: float = 0.0, name: str = "digits"):
        self.clock, self.check_s = clock, check_s
        self.gate = threading.Event()
        self.preset = types.SimpleNamespace(name=name)

    def share_gradient_passes(self, names):
        return {}

    def status(self):
        time.sleep(self.check_s)
        return {"a": {"available": True, "built": False},
                "clip": {"available": False, "built": False, "reason": "CLIP weights are not on this machine"}}

    def method_info(self):
        return {"a": {"title": "A"}, "clip": {"title": "CLIP similarity"}}

    def build(self, names, progress):
        if self.clock is not None:
            self.clock[0] = 0.0
            progress("a: rows 10/100", 0.1)
            self.clock[0] = 20.0
            progress("a: rows 20/100", 0.2)
        assert self.gate.wait(30)
        progress("a: built", 1.0)
        return {"a": {"status": "ok", "seconds": 0.0, "size_mb": 0.0}}


def _when(get, ok, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = get()
        if ok(value):
            return value
        time.sleep(0.02)
    raise AssertionError(f"never reached: {get()}")


def test_a_model_waiting_for_another_models_build_says_it_waits_and_how_long(monkeypatch):
    """QA 40 #6: the mnist page, whose build only waited for digits' in the same server, was headed "Building the
    attribution caches" and gave no time left (digits' estimate was on the digits page only)."""
    from streamlit.testing.v1 import AppTest

    clock = [0.0]
    real_time = time.time
    monkeypatch.setattr(build_worker.time, "time", lambda: clock[0])
    first, second = _Gated(clock, name="digits"), _Gated(name="mnist")
    a, b = BuildWorker(first, terminal=False), BuildWorker(second, terminal=False)
    try:
        a.start()
        _when(lambda: a.state, lambda s: s.fraction >= 0.2)
        assert a.state.time_left() == "3 min"  # 0.8 left at 0.1 per 20 s: 160 s
        b.start()
        waiting = _when(lambda: b.state, lambda s: WAITING_TURN in s.message).message
        assert waiting.startswith("waiting for the digits model's cache build in this server to finish (it has "
                                  "about 3 min left; one build at a time"), waiting
    finally:
        first.gate.set()
        second.gate.set()
        a.wait(30)
        b.wait(30)
        monkeypatch.setattr(build_worker.time, "time", real_time)
    monkeypatch.setitem(__import__("sys").modules, "_fake_waiting", types.SimpleNamespace(handle=types.SimpleNamespace(
        build=BuildState(status="running", message=waiting, methods=("a",), started=time.time()),
        session=second, cache_root="/c", precomputed=None)))

    def page():
        import _fake_waiting

        from explorer import build_view

        build_view.build_panel(_fake_waiting.handle)

    at = AppTest.from_function(page).run(timeout=60)
    assert not at.exception
    assert at.markdown[0].value.startswith("**Waiting to build the attribution caches** for A")


class _WorkerHandle:
    def __init__(self, session):
        self.session, self.cache_root, self.precomputed = session, "/c", None
        self.worker = BuildWorker(session, terminal=False)

    @property
    def build(self) -> BuildState:
        return self.worker.state


def test_the_first_page_is_drawn_once_the_server_knows_which_methods_can_run(monkeypatch):
    """QA 40 #7: the first page's CLIP column said "Whether CLIP similarity can run on this server is known seconds
    after it starts ...: choose a sample or setting to see", and kept saying it for over 30 s, until a click.  The
    check (2.3-2.8 s on digits, nearly all of it CLIP's) now ends before the page below the panel is drawn."""
    import sys

    from streamlit.testing.v1 import AppTest

    handle = _WorkerHandle(_Gated(check_s=1.0))
    monkeypatch.setitem(sys.modules, "_fake_first", types.SimpleNamespace(handle=handle))

    def page():
        import _fake_first
        import streamlit as st

        from explorer import build_view, runtime

        runtime.start_build(_fake_first.handle)
        build_view.build_panel(_fake_first.handle)
        # what the columns below the panel are drawn from (results_view._precomputed)
        st.session_state["checking"] = _fake_first.handle.build.checking
        st.session_state["unavailable"] = dict(_fake_first.handle.build.unavailable)

    try:
        at = AppTest.from_function(page).run(timeout=60)
        assert not at.exception
        assert at.session_state["checking"] is False
        assert at.session_state["unavailable"] == {"clip": "CLIP weights are not on this machine"}
        assert "Building the attribution caches" in at.markdown[0].value
    finally:
        handle.session.gate.set()
        handle.worker.wait(30)
