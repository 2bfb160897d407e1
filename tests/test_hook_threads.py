"""Gradient hooks on a model shared between threads (``gradients.this_thread_only``).

The app re-ranks in a background thread while the page's thread samples or queries with the same
model; module hooks fire on every thread's forward pass, so unguarded they recorded (hooks back-end,
the GPU's default) or changed (the compressed bank's projections) the other thread's activations:
shape errors in both threads, or silently wrong gradients when the shapes happened to match."""

from __future__ import annotations

import copy
import threading

import torch

from engine.attribution.compressed_bank import compress_factors
from engine.attribution.curvature import compute_kfac
from engine.attribution.gradients import influence_params, per_example_grads
from engine.attribution.layer_projection import projected_grads
from engine.model.diffusion import make_draws


def _beside_other_forwards(model, work, rounds: int = 6) -> tuple[list, list[str], list[str]]:
    """``work()`` ``rounds`` times in one thread while another thread runs forward passes of ``model``
    on other shapes; (results, errors in the worker, errors in the other thread)."""
    results, worker_errors, other_errors = [], [], []
    stop = threading.Event()

    def worker():
        try:
            for _ in range(rounds):
                try:
                    results.append(work())
                except Exception as e:  # noqa: BLE001 - counted
                    worker_errors.append(repr(e))
        finally:
            stop.set()

    def other():
        gen = torch.Generator().manual_seed(0)
        while not stop.is_set():
            try:
                with torch.no_grad():
                    x = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)
                    model(x, torch.tensor([5, 7, 9]))
            except Exception as e:  # noqa: BLE001 - counted
                other_errors.append(repr(e))

    threads = [threading.Thread(target=worker), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results, worker_errors, other_errors


def _check_beside_other_forwards(model, work) -> None:
    """``work()`` gives, beside another thread's forward passes, what it gives alone, and neither errs."""
    ref = work()
    results, worker_errors, other_errors = _beside_other_forwards(model, work)
    assert not worker_errors and not other_errors, (worker_errors[:1], other_errors[:1])
    assert len(results) == 6
    for g in results:
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)


def _setup(tiny_model, digits_small):
    model = copy.deepcopy(tiny_model).double().eval()
    return model, influence_params(model), digits_small.images[:4].double(), make_draws(2, (1, 8, 8), 1000, seed=0)


def test_hooks_back_end_gradients_are_exact_while_another_thread_runs_the_model(tiny_model, diffusion,
                                                                                 digits_small):
    model, params, x, draws = _setup(tiny_model, digits_small)
    _check_beside_other_forwards(
        model, lambda: per_example_grads(model, diffusion, x, draws, "loss", params, backend="hooks"))


def test_compressed_projections_are_exact_while_another_thread_runs_the_model(tiny_model, diffusion,
                                                                              digits_small):
    model, params, x, draws = _setup(tiny_model, digits_small)
    comp = compress_factors(compute_kfac(model, diffusion, x, draws, params), "gaussian", 6.0, seed=3)
    _check_beside_other_forwards(
        model, lambda: projected_grads(model, diffusion, x, draws, params, comp.projections, comp.blocks))
