"""Data-parallel builds (engine.distributed): two gloo ranks split the parts of the K-FAC bank
and of TRAK's features and publish exactly what one process builds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.attribution.context import make_context
from engine.attribution.methods.kfac_influence import BANK, KFACInfluence
from engine.attribution.methods.trak import TRAK
from engine.attribution.store import Store
from engine.config import AttributionConfig
from engine.model.unet import build_model

CFG = AttributionConfig(mc_samples=2, seed=0, trak_dim=16)
HASH = "d" * 16


def _build(preset, state, dataset, root: Path) -> tuple[KFACInfluence, TRAK, object]:
    model = build_model(preset.model)
    model.load_state_dict(state)
    store = Store(root, HASH, "digits40")
    ctx = make_context(preset, model, dataset, "cpu", CFG, HASH, store)
    kfac, trak = KFACInfluence(CFG), TRAK(CFG)
    kfac.chunk_size, trak.part_size = 8, 8  # 40 examples: 5 parts, split 3 / 2
    kfac.build(ctx)
    trak.build(ctx)
    return kfac, trak, ctx


def _rank(rank: int, world: int, rendezvous: str, preset, state, dataset, root: str, log: str,
          shared: bool = False) -> None:
    """One rank's build, recording the parts it saves in ``<log>/rank<r>.json`` (``shared``: K-FAC's pass
    feeds TRAK, whose own gradient pass must then never run: ``shared<r>.json``)."""
    import engine.attribution.gradients
    import engine.attribution.store

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    done: list[list] = []
    original = engine.attribution.store.PartialBuild.save_part

    def record(self, i, arrays):
        done.append([self.name, int(i)])
        return original(self, i, arrays)

    def no_second_pass(*args, **kwargs):
        raise AssertionError("TRAK computed training gradients of its own: the shared pass left parts undone")

    engine.attribution.store.PartialBuild.save_part = record
    if shared:
        engine.attribution.gradients.train_loss_grads = no_second_pass
    try:
        (_build_shared if shared else _build)(preset, state, dataset, Path(root))
        Path(log, f"{'shared' if shared else 'rank'}{rank}.json").write_text(json.dumps(done))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_split_the_parts_and_publish_what_one_process_builds(
    tmp_path, tiny_preset, tiny_model, digits_small
):
    dataset = digits_small.subset(list(range(40)))
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    mp.spawn(
        _rank,
        args=(2, str(tmp_path / "rendezvous"), tiny_preset, state, dataset, str(tmp_path / "shared"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    parts = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}
    for name in (BANK, "trak"):
        mine = {r: sorted(i for n, i in parts[r] if n == name) for r in (0, 1)}
        assert mine == {0: [0, 2, 4], 1: [1, 3]}, (name, mine)

    kfac1, trak1, ctx1 = _build(tiny_preset, state, dataset, tmp_path / "single")
    kfac2, trak2, ctx2 = _build(tiny_preset, state, dataset, tmp_path / "shared")  # loads, builds nothing
    assert not list((tmp_path / "shared").rglob(".partial-*"))
    for d1, d2 in zip(kfac1.bank.data, kfac2.bank.data, strict=True):
        assert torch.equal(d1, d2)
    assert torch.equal(kfac1.bank.scales, kfac2.bank.scales)
    np.testing.assert_array_equal(trak1.train_features(ctx1), trak2.train_features(ctx2))


def _build_shared(preset, state, dataset, root: Path) -> tuple[KFACInfluence, TRAK, object]:
    """K-FAC's bank pass feeding TRAK's sink, as ``build`` shares it: bank chunks of 8 rows, TRAK parts of 16."""
    model = build_model(preset.model)
    model.load_state_dict(state)
    ctx = make_context(preset, model, dataset, "cpu", CFG, HASH, Store(root, HASH, "digits40"))
    kfac, trak = KFACInfluence(CFG), TRAK(CFG)
    kfac.chunk_size, trak.part_size = 8, 16
    sink = trak.feature_sink(ctx)
    if sink is not None:
        sink.fed_by(kfac.name)
        kfac.feed_gradient_pass([sink])
    kfac.build(ctx)
    trak.build(ctx)
    return kfac, trak, ctx


@pytest.mark.slow
def test_two_ranks_feed_trak_from_the_bank_pass_without_a_second_pass(tmp_path, tiny_preset, tiny_model, digits_small):
    """QA round 13: under torchrun the bank's 128-row chunks were dealt to the ranks one by one, so each of
    TRAK's 256-row parts got half its rows on each rank, none was complete, TRAK redid the whole pass, and
    the cache still said it had shared K-FAC's.  Now a rank takes runs of chunks that cover whole TRAK parts."""
    dataset = digits_small.subset(list(range(40)))
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    mp.spawn(
        _rank,
        args=(2, str(tmp_path / "rendezvous"), tiny_preset, state, dataset, str(tmp_path / "shared"), str(tmp_path),
              True),
        nprocs=2,
        join=True,
    )
    parts = {r: json.loads((tmp_path / f"shared{r}.json").read_text()) for r in (0, 1)}
    bank = {r: sorted(i for n, i in parts[r] if n == BANK) for r in (0, 1)}
    trak = {r: sorted(i for n, i in parts[r] if n == "trak") for r in (0, 1)}
    assert bank == {0: [0, 1, 4], 1: [2, 3]}  # chunks of 8 rows, two at a time: rows 0-15 and 32-39 / 16-31
    assert trak == {0: [0, 2], 1: [1]}  # each TRAK part saved by the rank that computed its rows
    kfac1, trak1, ctx1 = _build(tiny_preset, state, dataset, tmp_path / "single")
    kfac2, trak2, ctx2 = _build_shared(tiny_preset, state, dataset, tmp_path / "shared")  # loads
    assert not list((tmp_path / "shared").rglob(".partial-*"))
    for d1, d2 in zip(kfac1.bank.data, kfac2.bank.data, strict=True):
        assert torch.equal(d1, d2)
    np.testing.assert_allclose(trak1.train_features(ctx1), trak2.train_features(ctx2), rtol=1e-5, atol=1e-6)
    assert trak2.recorded_build_sharing(ctx2) == {"shared_with": "kfac"}


def test_a_rank_takes_runs_of_consecutive_parts_when_asked():
    from engine.attribution.bank_build import _rank_group
    from engine.distributed import Shard

    assert Shard(0, 2).mine(range(7)) == [0, 2, 4, 6] and Shard(1, 2).mine(range(7)) == [1, 3, 5]
    assert Shard(0, 2).mine(range(7), group=2) == [0, 1, 4, 5] and Shard(1, 2).mine(range(7), group=2) == [2, 3, 6]
    assert Shard(1, 3).mine([1, 2, 3, 5, 8], group=2) == [2, 3, 8]  # resumed: the same runs, whatever is left

    class Sink:
        def __init__(self, size):
            self.part = type("Part", (), {"part_size": size})()

    assert _rank_group(128, [Sink(256), Sink(256)]) == 2
    assert _rank_group(128, [Sink(96)]) == 3  # 384 rows: the chunks spanning whole parts of both
    assert _rank_group(128, None) == 1 and _rank_group(128, [object()]) == 1


@pytest.mark.parametrize("device, backends", [
    ("cuda", {"cpu": "gloo", "cuda": "nccl"}),
    ("cpu", {"cpu": "gloo", "cuda": "gloo"}),
])
def test_torchrun_group_has_a_backend_for_cpu_tensors_on_cuda_too(monkeypatch, device, backends):
    """On CUDA the group was NCCL alone, which refuses CPU tensors: the compressed bank's ShardedBank
    all-gathers its (G, n_local) scores on the CPU, so every query through it failed under torchrun on
    GPUs (gloo on the CPU never saw it).  Now CPU tensors go through gloo, CUDA ones through NCCL."""
    from torch.distributed.distributed_c10d import Backend, BackendConfig

    from engine import distributed

    calls: dict = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: calls.setdefault("backend", backend))
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda i: calls.setdefault("gpu", i))
    _, rank_device = distributed.init_from_env(device)
    assert BackendConfig(Backend(calls["backend"])).get_device_backend_map() == backends
    cuda = device == "cuda"
    assert rank_device == ("cuda:1" if cuda else "cpu") and calls.get("gpu") == (1 if cuda else None)
