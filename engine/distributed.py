"""Data-parallel cache builds with torch.distributed (docs/architecture.md §8).

Launched as ``torchrun --nproc_per_node R -m engine build ...`` (gloo on CPU, NCCL on CUDA),
every rank opens the same store (a shared file system), computes the parts ``i`` of a
resumable build (``Store.partial``) with ``(i // g) % R == rank`` (runs of g parts: g = 1, or for K-FAC's
bank the chunks spanning whole TRAK/D-TRAK parts, which its pass fills; ``Shard.mine``) and writes them as it goes; after
a barrier rank 0 does what needs all parts (TRAK's eigendecomposition, publishing) and the
others wait and load the result.  Why parts by index, not by position in the to-do list:
ranks look at the list at slightly different times (a fast rank may already have finished
a part), and the assignment must not depend on that.

Outside torchrun (no ``WORLD_SIZE`` > 1 in the environment) everything here is a no-op
and a build runs as one process.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    """This process's place in the group: rank ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, parts: Iterable[int], group: int = 1) -> list[int]:
        """The parts this rank builds: runs of ``group`` consecutive indices dealt out in turn, the run of part i
        being i // group (= rank mod world).  ``group`` > 1 keeps rows that another build's larger parts
        hold together on one rank (K-FAC's 128-row bank chunks feeding TRAK's 256-row parts: dealt one by
        one, every TRAK part got half its rows on each rank, none was ever complete, and TRAK redid the pass)."""
        group = max(1, int(group))
        return [i for i in parts if (i // group) % self.world == self.rank]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def current() -> Shard:
    """The initialised process group's shard, or a single-process one."""
    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return Shard()


def init_from_env(device: str) -> tuple[Shard, str]:
    """Join the torchrun group if the environment asks for one; returns (shard, this rank's device).

    Backend: NCCL for CUDA tensors when the device is CUDA (with gloo beside it for CPU tensors: the
    compressed bank's ``ShardedBank`` all-gathers its scores on the CPU, which NCCL alone refuses), gloo
    otherwise.  On CUDA each rank takes the GPU ``LOCAL_RANK``, so ``--device cuda`` means "one GPU per rank".
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return Shard(), device
    cuda = str(device).startswith("cuda")
    if cuda and str(device) == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo")
    return current(), device


__all__ = ["Shard", "current", "init_from_env"]
