"""Data-parallel gradient threads (engine.attribution.row_threads): same numbers as one thread, in order."""

from __future__ import annotations

import threading

import pytest
import torch

from engine.attribution.gradients import (
    influence_params,
    measurement_grad,
    shared_forward_grads,
    train_loss_grads,
)
from engine.attribution.methods.base import QueryInput
from engine.attribution.row_threads import gradient_workers, map_ordered, single_op_threads
from engine.model.diffusion import make_draws
from engine.model.measurements import parse_measurement


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_map_ordered_keeps_order_bounds_work_and_restores_threads(two_threads):
    started: list[int] = []
    seen_threads: set[int] = set()
    lock = threading.Lock()

    def fn(i: int) -> int:
        with lock:
            started.append(i)
            seen_threads.add(torch.get_num_threads())
        return i * i

    gen = map_ordered(fn, range(7), workers=2)
    first = next(gen)
    assert first == 0 and max(started) <= 2  # at most `workers` items ahead of the consumer
    assert list(gen) == [i * i for i in range(1, 7)]
    assert seen_threads == {1}  # one intra-op thread per worker ...
    assert torch.get_num_threads() == 2  # ... restored afterwards
    assert list(map_ordered(fn, [3], workers=2)) == [9]
    assert gradient_workers("cpu") == 2 and gradient_workers("meta") == 1

    def boom(i: int) -> int:
        raise RuntimeError(f"item {i}")

    with pytest.raises(RuntimeError, match="item 0"):
        list(map_ordered(boom, range(3), workers=2))
    assert torch.get_num_threads() == 2

    # overlapping users (the app's build worker and a query): the count is restored when the last leaves
    with single_op_threads(2):
        with single_op_threads(2):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2

    # a worker that maps again runs its items itself (no nested pool waiting on its own tasks)
    def nested(i: int) -> list[int]:
        return list(map_ordered(lambda j: j + i, range(3), workers=2))

    assert list(map_ordered(nested, range(4), workers=2)) == [[j + i for j in range(3)] for i in range(4)]


def test_shared_forward_grads_split_between_threads_equal_one_pass(tiny_model, diffusion, digits_small, two_threads):
    model, x = tiny_model, digits_small.images[3]
    draws = make_draws(40, (1, 8, 8), diffusion.T, seed=2)  # 40 rows: two workers of 20
    threads: set[str] = set()
    hook = model.register_forward_pre_hook(lambda m, a: threads.add(threading.current_thread().name))
    try:
        specs = [parse_measurement("loss", 1000), parse_measurement("square-norm", 1000)]
        both = shared_forward_grads(model, diffusion, x, draws, specs)
    finally:
        hook.remove()
    assert len(threads) == 2 and all(n.startswith("grad-worker") for n in threads)
    for spec in specs:
        alone = measurement_grad(model, diffusion, spec, QueryInput(image=x), draws, levels=17)
        # the same sum in another order: float32 rounding only
        torch.testing.assert_close(both[spec], alone, rtol=1e-5, atol=1e-6 * float(alone.abs().max()))
    assert torch.get_num_threads() == 2


def test_train_loss_grads_with_two_workers_equal_one(tiny_model, diffusion, digits_small, two_threads):
    x = digits_small.images[:10]
    draws = make_draws(6, (1, 8, 8), diffusion.T, seed=1)
    params = influence_params(tiny_model)
    two = list(train_loss_grads(tiny_model, diffusion, x, draws, batch_size=3, params=params))
    torch.set_num_threads(1)
    one = list(train_loss_grads(tiny_model, diffusion, x, draws, batch_size=3, params=params))
    assert [r for r, _ in two] == [r for r, _ in one] == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 10)]
    for (_, a), (_, b) in zip(two, one, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_worker_passes_run_in_eval_mode_and_restore_train_mode(diffusion, digits_small, two_threads):
    """With dropout, a model left in train mode must still give eval-mode gradients from every worker
    (no worker may switch it back while another computes), and comes back in train mode."""
    import dataclasses

    from conftest import TINY_MODEL

    from engine.model.unet import build_model

    torch.manual_seed(0)
    model = build_model(dataclasses.replace(TINY_MODEL, dropout=0.5))
    x = digits_small.images[:8]
    draws = make_draws(4, (1, 8, 8), diffusion.T, seed=1)
    params = influence_params(model)
    ref = torch.cat([g for _, g in train_loss_grads(model.eval(), diffusion, x, draws, batch_size=2, params=params)])
    model.train()
    got = torch.cat([g for _, g in train_loss_grads(model, diffusion, x, draws, batch_size=2, params=params)])
    assert model.training
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
