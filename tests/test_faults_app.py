"""The app as a shared server (issue 14, finding 8): retraining jobs are capped per server and queued
with their position shown; ``--no-retrain`` turns retraining off."""

from __future__ import annotations

import threading
import time

import pytest

from explorer.job_queue import JobQueue, QueueFullError
from explorer.runtime import parse_args


class FakeJob:
    """Stands in for engine.evaluation.retrain_top.RetrainJob: finishes when its event is set."""

    running = 0
    peak = 0
    lock = threading.Lock()

    def __init__(self, name: str):
        self.name = name
        self.finished = threading.Event()
        with FakeJob.lock:
            FakeJob.running += 1
            FakeJob.peak = max(FakeJob.peak, FakeJob.running)

    def finish(self) -> None:
        with FakeJob.lock:
            FakeJob.running -= 1
        self.finished.set()

    def progress(self):
        return f"training {self.name}", 0.5

    def done(self) -> bool:
        return self.finished.is_set()

    def result(self):
        return {"name": self.name}


def _wait(cond, timeout: float = 5.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.01)


def test_queue_caps_running_jobs_and_shows_positions():
    FakeJob.running = FakeJob.peak = 0
    q = JobQueue(max_running=2, poll_s=0.01)
    started: list[FakeJob] = []

    def starter(name):
        def start():
            job = FakeJob(name)
            started.append(job)
            return job

        return start

    jobs = [q.submit(starter(f"j{i}")) for i in range(5)]
    assert [j.job is not None for j in jobs] == [True, True, False, False, False]
    assert jobs[4].wait(timeout=0.05) is False  # still queued
    assert [j.position() for j in jobs] == [None, None, 1, 2, 3]
    msg, frac = jobs[3].progress()
    assert msg.startswith("queued: 2 of 3 waiting") and "at most 2" in msg and frac == 0.0
    assert jobs[0].progress() == ("training j0", 0.5)
    started[0].finish()  # the background thread promotes the next one without anyone polling
    _wait(lambda: jobs[2].job is not None)
    assert jobs[3].position() == 1 and not jobs[3].done()
    while started and not all(j.done() for j in jobs):
        for job in list(started):
            if not job.done():
                job.finish()
        time.sleep(0.02)
    assert all(j.wait(timeout=5) for j in jobs)
    assert FakeJob.peak == 2
    assert [j.result()["name"] for j in jobs] == [f"j{i}" for i in range(5)]


def test_queue_is_bounded_and_start_errors_are_reported():
    q = JobQueue(max_running=1, max_waiting=1, poll_s=0.01)
    blocker = FakeJob("b")
    q.submit(lambda: blocker)
    q.submit(lambda: FakeJob("w"))
    with pytest.raises(QueueFullError, match="already waiting"):
        q.submit(lambda: FakeJob("x"))
    blocker.finish()

    def fails():
        raise ValueError("no query image")

    q2 = JobQueue(max_running=1)
    job = q2.submit(fails)
    assert job.done() and "no query image" in job.progress()[0]
    with pytest.raises(RuntimeError, match="could not start"):
        job.result()


def test_app_flags_for_a_shared_server():
    a = parse_args(["--max-retrain-jobs", "3"], env={})
    assert a.max_retrain_jobs == 3 and not a.no_retrain
    assert parse_args([], env={}).max_retrain_jobs == 1
    assert parse_args([], env={"ATTRIBUTION_MAX_RETRAIN_JOBS": "2"}).max_retrain_jobs == 2
    assert parse_args(["--no-retrain"], env={}).no_retrain
    assert parse_args([], env={"ATTRIBUTION_NO_RETRAIN": "1"}).no_retrain
    with pytest.raises(SystemExit, match="at least 1"):
        parse_args(["--max-retrain-jobs", "0"], env={})
    # QA 33: without a --preset, a --checkpoint's own attribution settings apply (the CLI's rule), so the app
    # must know whether the preset was named or defaulted
    assert not parse_args(["--checkpoint", "x"], env={}).preset_named
    assert parse_args(["--checkpoint", "x", "--preset", "digits"], env={}).preset_named
    assert parse_args([], env={"ATTRIBUTION_PRESET": "mnist"}).preset_named


def test_no_retrain_server_shows_no_retrain_button(monkeypatch):
    """The Evaluation tab's retraining section on a --no-retrain server: a notice, no button, no job."""
    from streamlit.testing.v1 import AppTest

    def page():
        from types import SimpleNamespace

        from explorer import evaluation_view

        handle = SimpleNamespace(args=SimpleNamespace(no_retrain=True), retrain_jobs={})
        evaluation_view.retrain_section(handle, object(), None)

    at = AppTest.from_function(page).run(timeout=60)
    assert not at.exception
    assert any("turned off on this server" in i.value for i in at.info)
    assert len(at.button) == 0
