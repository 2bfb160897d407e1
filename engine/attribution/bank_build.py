"""The resumable build of a bank of rows (docs/architecture.md §4): ``build_bank``, the stored K-FAC bank's one
gradient pass (rotated with the factors, quantised to ``engine.attribution.bank``'s int8 format, scored by its
``RotatedBank``), and ``build_in_parts``, which every bank kind that stores rows uses (the compressed bank too).

The build runs in chunks of examples, each saved as soon as it is done (``Store.partial``: an interrupted build
resumes at the first missing chunk; under torchrun every rank builds its own), published atomically at the end
under ``(name, bank.artefact_settings(...))`` and memory-mapped on load.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..config import ComputeConfig
from ..model.diffusion import Diffusion
from .bank import (
    BUILD_SETTINGS,
    SCALES,
    RotatedBank,
    artefact_settings,
    block_key,
    quantize_blocks,
    whitening,
)
from .curvature import Block, KFACFactors
from .gradients import Params, eval_mode, per_example_grads_by_loss
from .row_threads import gradient_workers, map_ordered
from .train_draws import TrainDraws


def _chunk_arrays(
    rotated: torch.Tensor,
    blocks: list[Block],
    quantize: bool,
    weights: torch.Tensor | None = None,
    store_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """One chunk of rotated rows (n, P) as the arrays a part saves: per-block int8 and the scales, or per-block
    floats in the rows' dtype or ``store_dtype``."""
    if quantize:
        data, scales = quantize_blocks(rotated, blocks, weights)
        arrays = {block_key(j): d for j, d in enumerate(data)}
        arrays[SCALES] = scales
        return arrays
    dtype = rotated.dtype if store_dtype is None else store_dtype
    return {block_key(j): rotated[:, b.offset : b.offset + b.size].to(dtype).contiguous() for j, b in enumerate(blocks)}


def build_bank(
    model: nn.Module,
    diffusion: Diffusion,
    images: torch.Tensor,
    draws: TrainDraws,
    factors: KFACFactors,
    params: Params,
    store: Any | None = None,
    name: str = "kfac-bank",
    settings: dict[str, Any] | None = None,
    loss: str = "loss",
    quantize: bool = True,
    chunk_size: int = 128,
    grad_batch: int = 16,
    device: torch.device | str | None = None,
    progress: Callable[[str, float], None] | None = None,
    consumers: list[Any] | None = None,
    whiten: float | None = None,
    store_dtype: torch.dtype | None = None,
    compute: ComputeConfig | None = None,
) -> RotatedBank:
    """Compute (or load) the bank of rotated per-example training gradients.

    With a ``store``, chunks of ``chunk_size`` examples are saved as they finish (an
    interrupted build resumes at the first missing chunk), the result is published
    atomically under ``(name, artefact_settings(settings, quantize, chunk_size, whiten, store_dtype))``
    and loaded memory-mapped.  Without a store the bank stays in memory.  ``settings`` must name
    everything the bank depends on besides this call's arguments; a bank kind's ``cache_key`` is
    ``(name, artefact_settings(...))`` of the same arguments (ValueError when ``settings`` already hold one
    of ``BUILD_SETTINGS`` with another value than the argument's: the key and the build would disagree).

    ``consumers``: objects with ``consume(rows, grads)`` that get every batch of training
    gradients this pass computes (TRAK's and D-TRAK's ``FeatureSink``: one gradient pass feeds all
    three caches); a consumer's ``loss`` attribute ("loss" | "square-norm", default the bank's) says
    which per-example function's gradients it gets, from the same forward pass.

    ``whiten``: the int8 grid's relative eigenvalue floor f (``whitening``; module docstring), None for the
    plain grid; quantised banks only, and part of the cache key (``settings["whiten"]``).

    ``store_dtype``: with ``quantize=False``, the float type the rows are saved (and held) in, say
    ``torch.float16`` for half the bytes of float32; each chunk is converted before it is saved, products
    still accumulate in float32 (``product_dtype``), and the type is part of the cache key
    (``settings["store_dtype"]``).  None: the gradients' dtype.

    ``compute``: the speed and memory settings the returned bank scans with (``RotatedBank``; the context's
    ``compute``, None: the defaults); no part of the cache key, since no score depends on them.
    """
    device = torch.device(device) if device is not None else params[0][1].device
    settings = _checked_artefact_settings(settings, quantize, chunk_size, whiten, store_dtype)
    blocks = factors.blocks
    n = images.shape[0]
    weights = None
    if quantize and whiten is not None:
        weights = whitening(factors.eigenvalues(), blocks, float(whiten))
    if store is not None:
        arrays = store.load_arrays(name, settings)
        if arrays is not None:
            return RotatedBank.from_arrays(arrays, blocks, device, weights, compute)

    # every per-example function this pass differentiates: the bank's, then its consumers' (D-TRAK's
    # square norm shares the forward pass with the loss: ``per_example_grads_by_loss``)
    losses = tuple(dict.fromkeys([loss, *(getattr(c, "loss", loss) for c in consumers or ())]))

    workers = gradient_workers(params[0][1].device)

    def grads_of(sub: slice) -> dict[str, torch.Tensor]:
        return per_example_grads_by_loss(model, diffusion, images[sub], draws.for_rows(sub), losses, params)

    def chunk_rows(rows: slice) -> dict[str, torch.Tensor]:
        parts = []
        subs = [slice(s, min(rows.stop, s + grad_batch)) for s in range(rows.start, rows.stop, grad_batch)]
        # sub-batches computed by one single-threaded worker per free core (engine.attribution.row_threads);
        # eval mode set once here, not by each worker (switching it back and forth would race)
        with eval_mode(model):
            for sub, grads in zip(subs, map_ordered(grads_of, subs, workers), strict=True):
                for c in consumers or ():
                    c.consume(sub, grads[getattr(c, "loss", loss)].detach())
                parts.append(grads[loss].detach())
                if progress is not None:
                    progress(f"train gradients {sub.stop}/{n}", sub.stop / n)
        for c in consumers or ():
            if hasattr(c, "flush"):
                c.flush()  # what it buffered of this chunk, before the chunk is saved
        rotated = factors.rotate(torch.cat(parts))
        return _chunk_arrays(rotated, blocks, quantize, weights, store_dtype)

    # the pass's seconds include the consumers' share (projections); they cannot be split, so the bank's
    # record names the methods it fed (their own records say ``gradient_pass_shared_with``)
    fed = [str(c.method) for c in consumers or () if getattr(c, "method", None)]
    arrays = build_in_parts(store, name, settings, n, chunk_size, chunk_rows, progress,
                            meta={"gradient_pass_fed": fed} if fed else None,
                            group=_rank_group(chunk_size, consumers), disk_siblings=_consumer_parts(consumers))
    if store is None:
        merged = {k: v.to(device) for k, v in arrays.items()}
        return RotatedBank(blocks, [merged[block_key(j)] for j in range(len(blocks))], merged.get(SCALES),
                           weights=weights, compute=compute)
    return RotatedBank.from_arrays(arrays, blocks, device, weights, compute)


def _checked_artefact_settings(
    settings: dict[str, Any] | None, quantize: bool, chunk_size: int, whiten: float | None,
    store_dtype: torch.dtype | None,
) -> dict[str, Any]:
    """``artefact_settings`` of a build's arguments; ValueError when ``settings`` already name one of
    ``BUILD_SETTINGS`` with another value (a key made for other arguments than the build's)."""
    out = artefact_settings(settings, quantize, chunk_size, whiten, store_dtype)
    clash = {k: v for k, v in (settings or {}).items() if k in BUILD_SETTINGS and out.get(k) != v}
    if clash:
        raise ValueError(f"settings {clash} disagree with the build's arguments ({ {k: out.get(k) for k in clash} }): "
                         "pass the bank's own settings and let artefact_settings add these")
    return out


def _consumer_parts(consumers: list[Any] | None) -> list[Any]:
    """The consumers' own resumable builds (a TRAK ``FeatureSink``'s ``part``), which this pass fills."""
    return [c.part for c in consumers or () if hasattr(getattr(c, "part", None), "part_size")]


def _rank_group(chunk_size: int, consumers: list[Any] | None) -> int:
    """How many consecutive bank chunks one torchrun rank takes (``Shard.mine``'s ``group``), so that every
    part of a consumer's own resumable build (``part_size`` rows, aligned at multiples of it) gets all its
    rows on one rank and can be saved there: the chunks spanning the least common multiple of the part
    sizes, in chunks."""
    sizes = [int(p.part_size) for p in _consumer_parts(consumers)]
    return math.lcm(int(chunk_size), *sizes) // int(chunk_size) if sizes else 1


def build_in_parts(
    store: Any | None,
    name: str,
    settings: dict[str, Any],
    n: int,
    chunk_size: int,
    compute: Callable[[slice], dict[str, torch.Tensor]],
    progress: Callable[[str, float], None] | None = None,
    meta: dict[str, Any] | None = None,
    group: int = 1,
    disk_siblings: list[Any] | None = None,
) -> dict[str, Any]:
    """Rows 0..n-1 computed ``chunk_size`` at a time by ``compute(rows) -> {array name: (rows, ...)}``.

    Without a store: the concatenated tensors.  With one: each part is saved as soon as it is
    done (an interrupted build resumes at the first missing part, and says so through ``progress``;
    under torchrun every rank builds its own parts, ``group`` consecutive ones at a time: ``Shard.mine``), rank 0 publishes them
    atomically under ``(name, settings)``, and the published arrays are returned (memory-mapped).
    Shared by every bank kind that stores rows.  ``disk_siblings``: the resumable builds of the caches
    this pass also fills (its consumers' ``part``), whose remaining bytes the early disk check adds to
    this build's (``PartialBuild.share_disk_with``).
    """
    t0 = time.perf_counter()
    if store is None:
        chunks = [compute(slice(s, min(n, s + chunk_size))) for s in range(0, n, chunk_size)]
        return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
    shard = distributed.current()
    partial = store.partial(name, settings, part_size=chunk_size, num_items=n)
    partial.share_disk_with(disk_siblings or [])
    todo = partial.todo()
    saved = n - sum(r.stop - r.start for r in map(partial.part_range, todo))
    if saved and todo and progress is not None:
        progress(f"resuming: {saved}/{n} examples saved by an earlier run", saved / n)
    for i in shard.mine(todo, group):
        partial.save_part(i, compute(partial.part_range(i)))
    shard.barrier()
    if shard.is_main:
        # a resumed build counts its earlier attempts too (PartialBuild.seconds_before)
        partial.publish(meta={"build_seconds": round(time.perf_counter() - t0 + partial.seconds_before, 3),
                              "num_examples": n, **(meta or {})})
    shard.barrier()
    return store.load_arrays(name, settings)
