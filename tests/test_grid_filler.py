"""explorer.grid_filler: one worker fills the latest result of each tab, tabs in turn."""

from __future__ import annotations

import threading
import time

from explorer.grid_filler import GridFiller


class SlowSession:
    """Records which results were filled; the first fill blocks until released."""

    def __init__(self) -> None:
        self.filled: list[str] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.stopped: list[str] = []  # fills whose should_stop said stop by the time they ended

    def fill_grids(self, result: str, should_stop) -> list[str]:
        self.started.set()
        self.release.wait(10)
        self.filled.append(result)
        if should_stop():
            self.stopped.append(result)
        if result == "bad":
            raise RuntimeError("boom")
        return ["kfac"]


def test_only_the_latest_waiting_result_is_filled_and_failures_do_not_stop_the_worker():
    s, f = SlowSession(), GridFiller()
    f.submit(s, "first")
    assert s.started.wait(10)  # the worker is busy with "first"
    for r in ("second", "third", "latest"):  # these wait; only the last one is kept
        f.submit(s, r)
    s.release.set()
    assert f.wait_idle(10)
    assert s.filled == ["first", "latest"] and f.skipped == 2 and f.filled == 2
    assert s.stopped == ["first"]  # the running fill was told to stop (a newer one waited), not the latest
    f.submit(s, "bad")  # an exception is logged, the worker lives on
    assert f.wait_idle(10)
    f.submit(s, "after")
    assert f.wait_idle(10)
    assert s.filled[-2:] == ["bad", "after"]


class GatedSession:
    """Each fill blocks until its own result's gate opens; records what each fill's should_stop said."""

    def __init__(self) -> None:
        self.started = {r: threading.Event() for r in ("a1", "a2", "b1", "b2", "c1")}
        self.gate = {r: threading.Event() for r in self.started}
        self.order: list[str] = []
        self.stopped: dict[str, bool] = {}
        self.stops: list[bool] = []

    def fill_grids(self, result: str, should_stop) -> None:
        self.order.append(result)
        self.started[result].set()
        self.gate[result].wait(10)
        self.stopped[result] = should_stop()
        self.stops.append(self.stopped[result])  # in fill order (a result may be filled twice)


def test_tabs_take_turns_and_only_a_newer_query_of_the_same_tab_stops_a_running_fill():
    """Another tab's query waits for the running fill instead of stopping it (each tab gets its exact
    ranking); a tab's own newer query stops its running fill; a tab that asks again goes to the back."""
    s, f = GatedSession(), GridFiller()
    f.submit(s, "a1", "A")
    assert s.started["a1"].wait(10)
    f.submit(s, "b1", "B")
    f.submit(s, "c1", "C")
    assert (f.ahead("A"), f.ahead("B"), f.ahead("C"), f.ahead("D")) == (0, 1, 2, None)
    f.submit(s, "b2", "B")  # B clicks on while waiting: its b1 is dropped, b2 waits behind C
    assert (f.ahead("B"), f.ahead("C"), f.skipped) == (2, 1, 1)
    s.gate["a1"].set()
    assert s.started["c1"].wait(10)
    assert s.stopped["a1"] is False  # other tabs' queries did not stop A's fill
    f.submit(s, "a2", "A")  # A asks again while C runs: it waits behind B
    assert (f.ahead("C"), f.ahead("B"), f.ahead("A")) == (0, 1, 2)
    for r in ("c1", "b2", "a2"):
        s.gate[r].set()
    assert f.wait_idle(10)
    assert s.order == ["a1", "c1", "b2", "a2"] and not any(s.stopped.values())
    assert f.ahead("A") is None and f.filled == 4


def test_a_newer_query_of_the_same_tab_stops_its_running_fill():
    s, f = GatedSession(), GridFiller()
    f.submit(s, "a1", "A")
    assert s.started["a1"].wait(10)
    f.submit(s, "b1", "B")
    f.submit(s, "a2", "A")
    assert (f.ahead("B"), f.ahead("A")) == (1, 1)  # A's own stopping fill is not counted against a2
    s.gate["a1"].set()
    assert s.started["b1"].wait(10)
    assert s.stopped["a1"] is True  # a2 waited: a1's re-rank stops at its next batch
    s.gate["b1"].set()
    s.gate["a2"].set()
    assert f.wait_idle(10)
    assert s.order == ["a1", "b1", "a2"] and s.stopped["a2"] is False


def test_a_tab_whose_own_previous_fill_is_stopping_is_told_so():
    """After a click on another sample, the tab's superseded re-rank runs to the end of its batch; the page
    said nothing then (``ahead`` is 0, nothing of the new query runs).  ``stopping`` says why it waits,
    and not when that fill is shared with another tab, which then finishes it (and counts ahead)."""
    s, f = GatedSession(), GridFiller()
    f.submit(s, "a1", "A")
    assert s.started["a1"].wait(10)
    assert not f.stopping("A")  # its only query runs
    f.submit(s, "a2", "A")
    assert (f.ahead("A"), f.stopping("A"), f.stopping("B")) == (0, True, False)
    f.submit(s, "a1", "B")  # B opens A's old query: the running fill is now finished for B
    assert (f.ahead("A"), f.stopping("A")) == (1, False)
    s.gate["a1"].set()
    assert s.started["a2"].wait(10)
    assert not f.stopping("A") and f.ahead("A") == 0
    s.gate["a2"].set()
    assert f.wait_idle(10)
    assert s.order == ["a1", "a2"] and s.stops == [False, False]  # B was served by the shared fill


def test_a_closed_tabs_query_is_dropped_and_its_running_fill_stopped(monkeypatch):
    """A closed or reloaded tab kept the worker busy for nobody and made new visitors wait behind it; once
    it has been gone for GONE_AFTER_S its waiting query is dropped and its running fill told to stop."""
    from explorer import grid_filler

    monkeypatch.setattr(grid_filler, "GONE_AFTER_S", 0.2)
    connected = {"A", "B", "C"}
    s, f = GatedSession(), GridFiller(alive=lambda tab: tab in connected)
    f.submit(s, "a1", "A")
    assert s.started["a1"].wait(10)
    f.submit(s, "b1", "B")
    f.submit(s, "c1", "C")
    connected.discard("B")  # B's tab closes while its query waits
    assert f.ahead("C") == 2  # within the grace (a websocket may reconnect), B still counts
    time.sleep(0.3)
    assert (f.ahead("B"), f.ahead("C"), f.skipped) == (None, 1, 1)
    connected.discard("A")  # A's tab closes while its fill runs
    assert f.ahead("C") == 1  # C's poll notes that A is gone
    time.sleep(0.3)
    s.gate["a1"].set()
    assert s.started["c1"].wait(10)
    assert s.stopped["a1"] is True
    s.gate["c1"].set()
    assert f.wait_idle(10)
    assert s.order == ["a1", "c1"] and s.stopped["c1"] is False



def test_a_fill_another_tab_waits_for_is_not_stopped_by_its_own_tab_moving_on():
    """Two tabs share one result (explorer.shared_results): when the tab whose fill runs asks something
    else, the fill goes on for the other tab instead of restarting from scratch behind the new query."""
    s, f = GatedSession(), GridFiller()
    f.submit(s, "a1", "A")
    assert s.started["a1"].wait(10)
    f.submit(s, "a1", "B")  # B opened the same query: it shares A's result
    f.submit(s, "a2", "A")  # A moves on
    assert (f.ahead("B"), f.ahead("A")) == (0, 1)  # B's is the running fill; A waits for that one only
    for r in ("a1", "a2"):
        s.gate[r].set()
    assert f.wait_idle(10)
    # the shared fill was not stopped, and served B: it is not filled a second time
    assert s.order == ["a1", "a2"] and s.stops == [False, False] and f.filled == 2


def test_a_tab_that_is_away_is_passed_over_then_dropped(monkeypatch):
    """A closed tab's waiting query is never started (before, the worker started it as soon as its turn
    came, because the grace began only when the absence was first noticed)."""
    from explorer import grid_filler

    monkeypatch.setattr(grid_filler, "GONE_AFTER_S", 1.5)
    connected = {"A", "C"}
    s, f = GatedSession(), GridFiller(alive=lambda tab: tab in connected)
    f.submit(s, "a1", "A")
    assert s.started["a1"].wait(10)
    f.submit(s, "b1", "B")  # B is already gone when its turn comes
    s.gate["a1"].set()
    time.sleep(0.3)
    f.submit(s, "c1", "C")
    s.gate["c1"].set()
    assert s.started["c1"].wait(10)
    assert f.wait_idle(10)
    assert s.order == ["a1", "c1"] and f.ahead("B") is None


def test_a_closed_waiting_tab_is_dropped_while_a_fill_runs_with_nobody_asking(monkeypatch):
    """The grace of a closed tab that waits is counted from about its close even while no page asks
    ``ahead`` (a page that shows a progress bar does not): the running fill's should_stop, asked
    before each batch, notes it.  Before, it was dropped only after the running fill had ended."""
    from explorer import grid_filler

    monkeypatch.setattr(grid_filler, "GONE_AFTER_S", 0.3)
    connected = {"A", "B"}
    release = threading.Event()

    class Polling:  # asks should_stop every 0.02 s, as rerank_scores asks before each batch
        def fill_grids(self, result, should_stop):
            while not release.wait(0.02):
                should_stop()

    f = GridFiller(alive=lambda tab: tab in connected)
    f.submit(Polling(), "a1", "A")
    f.submit(Polling(), "b1", "B")
    connected.discard("B")
    deadline = time.monotonic() + 5
    while f.skipped == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert f.skipped == 1 and not f.idle  # dropped while A's fill still runs
    release.set()
    assert f.wait_idle(10) and f.filled == 1
