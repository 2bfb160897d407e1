"""Retraining runs count training steps, not models (engine/evaluation/runs.py:run_training): a model of the
full recipe trains for minutes, and a bar that counted models sat at 0% that long."""

from __future__ import annotations

import re

import pytest

from engine.evaluation.runs import TrainTask, run_training


def _tasks(preset, tmp_path, steps=(40, 40)):
    return [TrainTask(f"m{i}", str(tmp_path / f"m{i}"), preset, s) for i, s in enumerate(steps)]


def _step_counts(messages):
    out = []
    for m, f in messages:
        hit = re.match(r"training: ([\d,]+)/([\d,]+) steps, (\d+)/(\d+) models$", m)
        if hit:
            out.append((int(hit[1].replace(",", "")), int(hit[2].replace(",", "")), f))
    return out


@pytest.mark.slow
def test_a_run_in_this_process_reports_its_steps_over_every_model(tiny_preset, digits_small, tmp_path):
    preset = tiny_preset.replace(train={"checkpoint_every": 1000})
    seen: list[tuple[str, float]] = []
    tasks = _tasks(preset, tmp_path, (40, 60))
    run_training(tasks, dataset=digits_small, progress=lambda m, f: seen.append((m, f)), log=lambda s: None)
    counts = _step_counts(seen)
    # every 20 steps of each model, counted on one scale of 100 steps
    assert [c for c, _, _ in counts] == [20, 40, 60, 80, 100]
    assert all(t == 100 for _, t, _ in counts)
    assert [f for _, _, f in counts] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert ("trained m0", 0.5) in seen and ("trained m1", 1.0) in seen
    # a second run: both finished, nothing trained, nothing reported
    seen.clear()
    assert run_training(tasks, dataset=digits_small, progress=lambda m, f: seen.append((m, f)),
                        log=lambda s: None) == []
    assert seen == []


@pytest.mark.slow
def test_a_finished_model_counts_its_steps_from_the_start(tiny_preset, digits_small, tmp_path):
    """One of two models is finished: the count starts at its 40 steps, and the other's are added."""
    preset = tiny_preset.replace(train={"checkpoint_every": 1000})
    tasks = _tasks(preset, tmp_path)
    run_training(tasks[:1], dataset=digits_small, progress=False, log=lambda s: None)
    seen: list[tuple[str, float]] = []
    assert run_training(tasks, dataset=digits_small, progress=lambda m, f: seen.append((m, f)),
                        log=lambda s: None) == ["m1"]
    assert [c for c, _, _ in _step_counts(seen)] == [60, 80]


@pytest.mark.slow
def test_pool_workers_add_their_steps_to_one_counter(tiny_preset, digits_small, tmp_path):
    """Two spawned workers: the parent reads their shared counter and reports every step of both models."""
    preset = tiny_preset.replace(train={"checkpoint_every": 1000})
    seen: list[tuple[str, float]] = []
    tasks = _tasks(preset, tmp_path)
    done = run_training(tasks, workers=2, dataset=digits_small, progress=lambda m, f: seen.append((m, f)),
                        log=lambda s: None)
    assert sorted(done) == ["m0", "m1"]
    counts = _step_counts(seen)
    assert counts and counts[-1][:2] == (80, 80)
    assert [c for c, _, _ in counts] == sorted(c for c, _, _ in counts)


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_a_resumed_model_counts_its_earlier_steps_once_and_not_as_this_runs_speed(
    tiny_preset, digits_small, tmp_path, capsys
):
    """A model interrupted after its state was saved at step 20: the rerun counts those 20 steps at its start
    (a callable hears them first; tqdm's bar takes them into its start, so its rate is this run's alone)."""
    from engine.model.train import train

    preset = tiny_preset.replace(train={"checkpoint_every": 20})
    tasks = _tasks(preset, tmp_path)

    def stop_at_30(step, total, loss):
        if step == 30:
            raise _Stop

    with pytest.raises(_Stop):
        train(preset, tasks[0].out, dataset=digits_small, progress=stop_at_30, steps=40)
    told: list[int] = []
    train(preset, tmp_path / "probe", dataset=digits_small, progress=False, steps=40, resumed=told.append)
    assert told == []  # a fresh run resumes nothing
    seen: list[tuple[str, float]] = []
    run_training(tasks, dataset=digits_small, progress=lambda m, f: seen.append((m, f)), log=lambda s: None)
    assert [c for c, _, _ in _step_counts(seen)] == [20, 40, 60, 80]
    # the bar: a third model, resumed the same way, and the bar's start holds its 20 earlier steps
    more = _tasks(preset, tmp_path / "more", (40,))
    with pytest.raises(_Stop):
        train(preset, more[0].out, dataset=digits_small, progress=stop_at_30, steps=40)
    bars = []
    import tqdm.auto

    real = tqdm.auto.tqdm

    def keep(*a, **kw):
        bars.append(real(*a, **kw))
        return bars[-1]

    tqdm.auto.tqdm = keep
    try:
        run_training(more, dataset=digits_small, progress=True, log=lambda s: None)
    finally:
        tqdm.auto.tqdm = real
    assert bars[0].initial == 20 and bars[0].n == 40


class _Interrupt(BaseException):  # stands for Ctrl-C / the CLI's SIGTERM exception
    pass


@pytest.mark.slow
def test_an_interrupted_pool_run_stops_its_workers_at_once_and_starts_no_queued_model(
    tiny_preset, digits_small, tmp_path
):
    """QA 24 #2: a SIGTERM to ``retrain-top --workers 2`` ended it 38 s later, after the pool had finished the
    running models and trained the queued third one. Now the workers are terminated and the queue dropped; the
    running models keep their saved state for the rerun."""
    import multiprocessing as mp
    import time

    preset = tiny_preset.replace(train={"checkpoint_every": 100})
    tasks = _tasks(preset, tmp_path, (5_000, 5_000, 5_000))

    def stop_on_first_steps(message, fraction):
        if message.startswith("training: "):
            raise _Interrupt

    before = set(mp.active_children())  # children of earlier tests in this process are not this run's workers
    t0 = time.monotonic()
    with pytest.raises(_Interrupt):
        run_training(tasks, workers=2, dataset=digits_small, progress=stop_on_first_steps, log=lambda s: None)
    assert time.monotonic() - t0 < 60
    assert set(mp.active_children()) <= before  # no worker goes on training
    assert not (tmp_path / "m2").exists()  # the queued model never started
    time.sleep(2)
    assert not any((tmp_path / f"m{i}" / "model.safetensors").exists() for i in range(3))


def test_work_done_before_joins_the_bars_start_not_its_speed():
    """``add_done_before``: tqdm computes the rate from ``n - initial`` and from each update's units; the
    earlier run's units go into both ``initial`` and ``n`` and into no update."""
    import io

    from tqdm import tqdm

    from engine.bar_redraw import add_done_before

    bar = tqdm(total=100, file=io.StringIO(), mininterval=0)
    add_done_before(bar, 40)
    bar.update(5)
    assert (bar.n, bar.initial, bar.format_dict["initial"]) == (45, 40, 40)
    assert bar.n - bar.last_print_n in (0, 5)  # the next update's units are this run's only
    add_done_before(bar, 0)
    assert bar.n == 45
    bar.close()
    off = tqdm(total=100, file=io.StringIO(), disable=True)  # TQDM_DISABLE=1: a resumed precompute or LDS run crashed
    add_done_before(off, 40)
    off.update(5)
    off.close()
