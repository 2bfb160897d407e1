"""The retraining job's elapsed time and estimate of the time left (engine/evaluation/job_clock.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.evaluation.job_clock import JobClock, minutes


class FakeTime:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_no_estimate_before_a_rate_is_measured_then_steps_left_over_the_measured_rate():
    now = FakeTime()
    c = JobClock(clock=now)
    assert c.seconds_left(1000) is None  # the first observation only starts the measurement
    now.t += 5
    assert c.seconds_left(950) is None  # 5 s < min_seconds: too short to trust
    now.t += 15
    # 200 steps in 20 s: 10 steps/s, so 800 steps take 80 s
    assert c.seconds_left(800) == pytest.approx(80.0)
    now.t += 10
    assert c.seconds_left(800) == pytest.approx(800 * 30 / 200)  # no progress for 10 s: the rate falls
    assert c.elapsed() == pytest.approx(30.0)


def test_no_estimate_while_nothing_has_moved():
    now = FakeTime()
    c = JobClock(clock=now)
    c.seconds_left(500)
    now.t += 60
    assert c.seconds_left(500) is None
    assert c.words(500) == "1.0 min so far"


def test_words_name_the_elapsed_time_and_the_training_left():
    now = FakeTime()
    c = JobClock(clock=now)
    now.t += 30
    assert c.words(600) == "0.5 min so far"
    now.t += 60
    assert c.words(300) == "1.5 min so far, about 1.0 min of training left"
    assert minutes(-3) == "0.0 min"


@pytest.mark.slow
def test_a_retraining_job_says_how_long_it_has_run_and_how_long_its_training_has_left(
    tiny_preset, digits_small, tmp_path, monkeypatch
):
    """Two models of 40 steps, one step a second on a fake clock: the job's messages count the steps of both
    models in what is left (60 at the first report, then 40, 20), and the estimate follows the measured rate."""
    from test_evaluate import FakeSession

    import engine.evaluation.retrain_top as rtr
    import engine.model.train as train_module
    from engine.attribution.methods.base import QueryInput
    from engine.model.train import train as real_train

    preset = tiny_preset.replace(train={"steps": 8, "checkpoint_every": 100})
    ckpt = real_train(preset, tmp_path / "full", dataset=digits_small, progress=False)
    fake = FakeSession(preset, ckpt, "cpu", None, None, digits_small, False)
    session = SimpleNamespace(preset=preset, dataset=digits_small, checkpoint=Path(ckpt), checkpoint_hash="h",
                              device="cpu", query=fake.query, config=preset.attribution)
    now = FakeTime()
    monkeypatch.setattr(rtr, "_monotonic", now)
    seen: list[str] = []
    jobs: list = []

    def slow_train(*args, progress, **kw):
        last = [0]

        def tick(step, total, loss):
            now.t += step - last[0]
            last[0] = step
            progress(step, total, loss)
            message = jobs[0].progress()[0]
            if not seen or seen[-1] != message:
                seen.append(message)

        return real_train(*args, progress=tick, **kw)

    monkeypatch.setattr(train_module, "train", slow_train)
    q = QueryInput(image=digits_small.images[5], description="train:5")
    job = rtr.RetrainJob(session, q, "loss", "kfac", 0.05, rtr.plan(session, q.image, "loss", "kfac", 0.05,
                                                                    tmp_path / "rt", 8, 40))
    jobs.append(job)
    job._run()
    steps = [m for m in seen if "step 20/40" in m or "step 40/40" in m]
    assert steps[0].startswith("training without-top-kfac model (1 of 2): step 20/40; ")
    assert steps[0].endswith("0.3 min so far")  # the clock started with the job: 20 s, no rate yet
    assert steps[1].endswith("step 40/40; 0.7 min so far, about 0.7 min of training left")  # 40 of 80 steps left
    assert steps[2].startswith("training random-removal model (2 of 2): step 20/40; ")
    assert steps[2].endswith("about 0.3 min of training left")  # 20 steps at 1 step/s
    assert job.progress()[0] == "done" and job.done()


def test_the_page_learns_what_an_interrupted_job_left_before_it_is_pressed_again(
    tiny_preset, digits_small, tmp_path, monkeypatch
):
    """After a server restart the page offered a fresh start, silent about a job that had finished one model and
    saved steps of the other (QA 25 #12). ``earlier_work`` says what is kept; after the job ends, that its result
    is stored."""
    from test_evaluate import FakeSession

    import engine.evaluation.retrain_top as rtr
    import engine.model.train as train_module
    from engine.attribution.methods.base import QueryInput
    from engine.model.train import train as real_train

    preset = tiny_preset.replace(train={"steps": 40, "checkpoint_every": 10})
    ckpt = real_train(preset, tmp_path / "full", dataset=digits_small, progress=False)
    fake = FakeSession(preset, ckpt, "cpu", None, None, digits_small, False)
    session = SimpleNamespace(preset=preset, dataset=digits_small, checkpoint=Path(ckpt), checkpoint_hash="h",
                              device="cpu", query=fake.query, config=preset.attribution)
    q = QueryInput(image=digits_small.images[5], description="train:5")

    def kept():
        return rtr.earlier_work(session, q.image, "loss", "kfac", 0.05, tmp_path / "rt", mc_samples=8)

    assert kept() is None  # nothing yet
    assert not rtr.has_stored_result(session, q.image, "loss", "kfac", 0.05, tmp_path / "rt", mc_samples=8)
    calls = []

    class ServerStopped(Exception):
        pass

    def stopping_train(*args, progress, **kw):  # the second model stops after its step 20 is saved
        calls.append(1)

        def tick(step, total, loss):
            progress(step, total, loss)
            if len(calls) == 2 and step == 25:
                raise ServerStopped

        return real_train(*args, progress=tick, **kw)

    monkeypatch.setattr(train_module, "train", stopping_train)
    job = rtr.RetrainJob(session, q, "loss", "kfac", 0.05, rtr.plan(session, q.image, "loss", "kfac", 0.05,
                                                                    tmp_path / "rt", 8))
    with pytest.raises(ServerStopped):
        job._run()
    assert kept() == ("An earlier job for this choice did not finish (the server stopped?); its work is kept: the "
                      "without-top-kfac model is finished and the random-removal model has saved steps. The button "
                      "continues from there.")
    monkeypatch.setattr(train_module, "train", real_train)
    job._run()
    assert job.done() and kept() == "This retraining has a stored result, shown without training."
    assert rtr.has_stored_result(session, q.image, "loss", "kfac", 0.05, tmp_path / "rt", mc_samples=8)
    assert not rtr.has_stored_result(session, q.image, "loss", "kfac", 0.1, tmp_path / "rt", mc_samples=8)
    # another query at the same share: nothing of its own, but the shared control model is trained
    other = digits_small.images[6]
    assert rtr.earlier_work(session, other, "loss", "kfac", 0.05, tmp_path / "rt", mc_samples=8) == (
        "The random-removal model for this share is trained already (it serves every query): the job trains one "
        "model.")
    assert rtr.earlier_work(session, other, "loss", "kfac", 0.1, tmp_path / "rt", mc_samples=8) is None
