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


def _rank(rank: int, world: int, rendezvous: str, preset, state, dataset, root: str, log: str) -> None:
    import engine.attribution.store

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    done: list[list] = []
    original = engine.attribution.store.PartialBuild.save_part

    def record(self, i, arrays):
        done.append([self.name, int(i)])
        return original(self, i, arrays)

    engine.attribution.store.PartialBuild.save_part = record
    try:
        _build(preset, state, dataset, Path(root))
        Path(log, f"rank{rank}.json").write_text(json.dumps(done))
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
