"""Interactive work first (engine.attribution.foreground): background passes pause between chunks while a
foreground query runs, never in a foreground or unmarked thread, and never deadlock on a lock a paused pass holds."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from engine.attribution import foreground as fg


def _background_loop(steps: list[float], stop: threading.Event, started: threading.Event) -> None:
    with fg.background():
        started.set()
        while not stop.is_set():
            fg.pause_point()
            steps.append(time.monotonic())
            time.sleep(0.005)


def test_a_background_loop_pauses_while_foreground_work_runs_and_goes_on_after():
    steps: list[float] = []
    stop, started = threading.Event(), threading.Event()
    t = threading.Thread(target=_background_loop, args=(steps, stop, started), daemon=True)
    t.start()
    assert started.wait(5)
    time.sleep(0.1)
    with fg.foreground():
        time.sleep(0.05)  # the loop reaches its next pause point
        inside = len(steps)
        time.sleep(0.4)
        assert len(steps) == inside  # no step while the foreground runs
        assert fg.pause_point() == 0.0  # a foreground thread's own pause points never wait
    time.sleep(0.2)
    stop.set()
    t.join(5)
    assert len(steps) > inside + 5  # it went on after


def test_unmarked_threads_never_pause_and_foreground_inside_background_changes_nothing():
    waited: list[float] = []

    def unmarked() -> None:
        waited.append(fg.pause_point())

    with fg.foreground():
        t = threading.Thread(target=unmarked)
        t.start()
        t.join(5)
    assert waited == [0.0]
    with fg.background():  # a background thread's own "query" neither counts nor waits for itself
        with fg.foreground():
            assert fg._active == 0 and fg.pause_point() == 0.0


def test_a_foreground_thread_waiting_for_a_lock_held_by_a_paused_pass_lets_the_pass_finish(monkeypatch):
    """The grid pass runs under its query's lock and pauses for foreground work; a foreground re-score of the same
    query waits for that lock.  Without ``holding`` each waited for the other until ``MAX_PAUSE_S``."""
    monkeypatch.setattr(fg, "MAX_PAUSE_S", 20.0)
    lock = threading.Lock()
    holding_lock, chunks = threading.Event(), []

    def grid_pass() -> None:
        with fg.background(), lock:
            holding_lock.set()
            for _ in range(20):
                fg.pause_point()
                chunks.append(1)
                time.sleep(0.01)

    with fg.foreground():
        t = threading.Thread(target=grid_pass, daemon=True)
        t.start()
        assert holding_lock.wait(5)
        t0 = time.monotonic()
        with fg.holding(lock):
            took = time.monotonic() - t0
        assert fg._active == 1  # back in the foreground once it holds the lock
    t.join(5)
    assert len(chunks) == 20 and took < 5.0, took


def test_a_rescore_during_a_paused_grid_pass_of_the_same_query_answers_at_once(monkeypatch):
    """The real pair: ``EigenbasisQuery.fill_grid`` over a stored int8 bank in a background thread (its chunks
    pause for the foreground) and ``score`` at another damping in the foreground, on the same query."""
    from engine.attribution.bank import RotatedBank
    from engine.attribution.curvature import Block
    from engine.attribution.scoring import EigenbasisQuery

    monkeypatch.setattr(fg, "MAX_PAUSE_S", 20.0)
    gen = torch.Generator().manual_seed(0)
    n, sizes = 64, [300, 200]
    blocks, data, off = [], [], 0
    for j, size in enumerate(sizes):
        blocks.append(Block(f"b{j}", j, "weight", off, (size,)))
        data.append(torch.randint(-127, 128, (n, size), generator=gen, dtype=torch.int8))
        off += size
    bank = RotatedBank(blocks, data, torch.rand(n, len(sizes), generator=gen) * 1e-3)
    q = EigenbasisQuery(rotated=torch.randn(off, generator=gen), eigenvalues=torch.rand(off, generator=gen),
                        rows=bank, grid_first=False)
    inner_many = bank.inner_many
    in_pass = threading.Event()

    def small_chunks(queries: torch.Tensor) -> torch.Tensor:  # many chunks, so the pass meets pause points
        in_pass.set()
        return inner_many(queries, chunk_bytes=4 * 300 * 4)

    monkeypatch.setattr(bank, "inner_many", small_chunks)
    expected = q.exact(1e-3)

    def grid_filler() -> None:
        with fg.background():
            q.fill_grid()

    with fg.foreground():  # the page's run: the pass pauses at its first chunk
        t = threading.Thread(target=grid_filler, daemon=True)
        t.start()
        assert in_pass.wait(5)
        t0 = time.monotonic()
        got = q.score(1e-3)
        took = time.monotonic() - t0
    t.join(10)
    assert took < 5.0, took
    assert q.grid is not None  # the pass finished
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-9)


def test_a_foreground_thread_that_steps_out_lets_background_work_go_on_and_comes_back():
    """The app's "Exact ranking" click waits, in its page run, for a worker that may wait for the grid
    filler's re-rank: stepped out, that re-rank does not pause for the page meanwhile."""
    steps: list[float] = []
    stop, started = threading.Event(), threading.Event()
    t = threading.Thread(target=_background_loop, args=(steps, stop, started), daemon=True)
    t.start()
    assert started.wait(5)
    with fg.foreground(), fg.foreground():  # nested (the page run, then its query): both counts step out
        time.sleep(0.05)
        before = len(steps)
        with fg.stepped_out():
            assert fg._active == 0
            time.sleep(0.3)
            assert len(steps) > before + 5
        assert fg._active == 2
        time.sleep(0.05)
        held = len(steps)
        time.sleep(0.2)
        assert len(steps) <= held + 1
    stop.set()
    t.join(5)


def test_a_cycle_the_rule_does_not_foresee_costs_at_most_max_pause_s_in_all(monkeypatch):
    """QA 52 #1: page runs waiting for the handle's lock counted as foreground; the run holding that lock waited for
    the query's lock, held by the grid pass, which paused for those waiting runs: a cycle, held for minutes because
    the cap was per pause point and renewed at every chunk.  The cap is now for a background section's pauses in
    all: here a foreground thread blocked on a plain lock (the handle's) keeps the pass paused, and the chain still
    ends after about MAX_PAUSE_S."""
    monkeypatch.setattr(fg, "MAX_PAUSE_S", 1.0)
    query_lock, handle_lock = threading.Lock(), threading.Lock()
    in_pass, chunks = threading.Event(), []

    def grid_pass() -> None:
        with fg.background(), query_lock:
            in_pass.set()
            for _ in range(50):  # 50 chunks: with a per-chunk cap this would be 50 s
                fg.pause_point()
                chunks.append(1)

    def waiting_run() -> None:  # counted as foreground while it waits for the handle's lock (the old page-level mark)
        with fg.foreground(), handle_lock:
            pass

    t0 = time.monotonic()
    with handle_lock:  # the run that holds the handle's lock ...
        with fg.foreground():
            waiter = threading.Thread(target=waiting_run, daemon=True)
            waiter.start()
            time.sleep(0.05)
            t = threading.Thread(target=grid_pass, daemon=True)
            t.start()
            assert in_pass.wait(5)
            with fg.holding(query_lock):  # ... waits for the query's lock, held by the pass paused for the waiter
                took = time.monotonic() - t0
    waiter.join(5)
    t.join(5)
    assert len(chunks) == 50 and 0.9 < took < 6.0, took
