"""explorer.grid_filler: one worker fills the damping grid of the latest result only."""

from __future__ import annotations

import threading

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
