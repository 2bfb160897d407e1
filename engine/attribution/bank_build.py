"""The resumable build of a bank of rows (docs/architecture.md §4): ``build_bank``, the stored K-FAC bank's one
gradient pass (rotated with the factors, quantised to ``engine.attribution.bank``'s int8 format, scored by its
``RotatedBank``), and ``build_in_parts``, which every bank kind that stores rows uses (the compressed bank too).

The build runs in chunks of examples, each saved as soon as it is done (``Store.partial``: an interrupted build
resumes at the first missing chunk; under torchrun every rank builds its own), published atomically at the end
under ``(name, bank.artefact_settings(...))`` and memory-mapped on load.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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


def _part_array(scratch: Path | None, key: str, shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """An array of one part of the bank: memory-mapped in ``scratch`` (on the CPU; file-backed pages the OS can
    write out, not anonymous memory), or without a scratch folder, or in a type NumPy lacks, in memory."""
    if scratch is not None:
        try:
            np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        except TypeError:  # bfloat16
            np_dtype = None
        if np_dtype is not None:
            mm = np.lib.format.open_memmap(scratch / f"{key}.npy", mode="w+", dtype=np_dtype, shape=shape)
            return torch.from_numpy(mm)
    return torch.empty(shape, dtype=dtype, device=device)


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
    which per-example function's gradients it gets, from the same forward pass.  A consumer with
    ``needs(rows)`` gets the rows it still lacks even where this bank's parts are saved: a resumed pass
    starts at the first row any of its builds needs (``Refeed``, QA 45 #2).

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
    scratch: Path | None = None  # where a part's arrays are memory-mapped (a store's folder), set below

    def grads_of(sub: slice) -> dict[str, torch.Tensor]:
        return per_example_grads_by_loss(model, diffusion, images[sub], draws.for_rows(sub), losses, params)

    def pass_rows(rows: slice, again: bool = False) -> dict[str, torch.Tensor]:
        """The stored arrays of ``rows``, each sub-batch rotated and quantised (``_chunk_arrays``) as soon as it is
        computed and written into the part's arrays, every consumer fed with its gradients on the way.  ``again``:
        rows whose bank part is saved, computed for the consumers only (``Refeed``; nothing kept), which the
        progress says (QA 46 #4: "train gradients 16/200" right after "resuming: 128/200 saved" read as if the
        saved rows were lost).

        Why per sub-batch (QA 54 F2): the chunk's float rows were kept, concatenated and rotated whole, three
        float32 copies of ``chunk_size`` x P (9 GB each for 64 CIFAR-size rows) for a 2.3 GB int8 part; now one
        sub-batch of ``grad_batch`` rows is held in float and the part's arrays are allocated once (no
        concatenated copy).  Every row's int8 values and scale are its own (per-row scales; ``rotate(batch=True)``
        rotates a row alike in any sub-batch), so the part's bytes are the same."""
        words = " (saved; again for the projections)" if again else ""
        arrays: dict[str, torch.Tensor] = {}
        if scratch is not None and not again:
            for old in scratch.iterdir():  # the previous part's rows, saved by now
                old.unlink()
        subs = [slice(s, min(rows.stop, s + grad_batch)) for s in range(rows.start, rows.stop, grad_batch)]
        # sub-batches computed by one single-threaded worker per free core (engine.attribution.row_threads);
        # eval mode set once here, not by each worker (switching it back and forth would race)
        with eval_mode(model):
            for sub, grads in zip(subs, map_ordered(grads_of, subs, workers), strict=True):
                for c in consumers or ():
                    c.consume(sub, grads[getattr(c, "loss", loss)].detach())
                if not again:
                    got = _chunk_arrays(factors.rotate(grads[loss].detach(), batch=True), blocks, quantize, weights,
                                        store_dtype)
                    for key, value in got.items():
                        if key not in arrays:
                            arrays[key] = _part_array(scratch, key, (rows.stop - rows.start, *value.shape[1:]),
                                                      value.dtype, value.device)
                        arrays[key][sub.start - rows.start : sub.stop - rows.start] = value
                    del got
                del grads
                if progress is not None:
                    progress(f"train gradients {sub.stop}/{n}{words}", sub.stop / n)
        for c in consumers or ():
            if hasattr(c, "flush"):
                c.flush()  # what it buffered of this chunk, before the chunk is saved
        return arrays

    # the pass's seconds include the consumers' share (projections); they cannot be split, so the bank's
    # record names the methods it fed (their own records say ``gradient_pass_shared_with``)
    fed = [str(c.method) for c in consumers or () if getattr(c, "method", None)]
    # a part's rows are written into memory-mapped scratch files next to the cache, not held in RAM: the int8 part
    # is chunk_size x P bytes (4.6 GB for 128 CIFAR-size rows, QA 54 F2).  One folder per bank and torchrun rank
    # (the build's lock keeps other processes out), emptied at the start, so a killed build's is reused; removed
    # once the build ends
    base = getattr(store, "base", None)
    if base is not None:
        scratch = Path(base) / f".rows-{Path(store.path(name, settings)).name}-rank{distributed.current().rank}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
    try:
        arrays = build_in_parts(store, name, settings, n, chunk_size, pass_rows, progress,
                                meta={"gradient_pass_fed": fed} if fed else None,
                                group=_rank_group(chunk_size, consumers), disk_siblings=_consumer_parts(consumers),
                                refeed=_refeed(consumers, lambda rows: pass_rows(rows, again=True)))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
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


@dataclass(frozen=True)
class Refeed:
    """The chunks of a resumed pass whose own part is saved but whose rows a consumer still needs.

    Why (QA 45 #2): the bank saves parts of ``chunk_size`` (128) rows, TRAK's and D-TRAK's sinks parts of their
    ``part_size`` (256).  A kill between the two left the bank with rows 0-127 and the sinks with nothing; the
    restart resumed the pass at row 128, so the sinks never saw rows 0-127 again and TRAK and D-TRAK each made a
    whole gradient pass of their own afterwards (two extra passes, at a bar that read 99-100%).  A resumed pass
    now starts at the first row any of its builds still needs: ``build_in_parts`` computes a chunk that is saved
    but ``wanted`` for the consumers with ``feed`` (their gradients only; the saved part is not rewritten), so a
    kill costs at most about one part of the largest part size, never a pass per consumer.

    ``wanted(rows)``: a consumer still needs some of these rows; ``feed(rows)``: compute them and hand them to
    the consumers; ``names``: whose parts they are, for the resume message."""

    wanted: Callable[[slice], bool]
    feed: Callable[[slice], Any]
    names: str


def _refeed(consumers: list[Any] | None, feed: Callable[[slice], Any]) -> Refeed | None:
    """A ``Refeed`` for the consumers that say which rows they still need (``FeatureSink.needs``); None when no
    consumer can say so (then a saved chunk is never computed again, as before)."""
    askers = [c for c in consumers or () if callable(getattr(c, "needs", None))]
    if not askers:
        return None
    names = ", ".join(dict.fromkeys(str(getattr(c, "method", "") or "another cache") for c in askers))
    return Refeed(wanted=lambda rows: any(c.needs(rows) for c in askers), feed=feed, names=names)


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
    refeed: Refeed | None = None,
) -> dict[str, Any]:
    """Rows 0..n-1 computed ``chunk_size`` at a time by ``compute(rows) -> {array name: (rows, ...)}``.

    Without a store: the concatenated tensors.  With one: each part is saved as soon as it is
    done (an interrupted build resumes at the first missing part, and says so through ``progress``;
    under torchrun every rank builds its own parts, ``group`` consecutive ones at a time: ``Shard.mine``), rank 0 publishes them
    atomically under ``(name, settings)``, and the published arrays are returned (memory-mapped).
    Shared by every bank kind that stores rows.  ``disk_siblings``: the resumable builds of the caches
    this pass also fills (its consumers' ``part``), whose remaining bytes the early disk check adds to
    this build's (``PartialBuild.share_disk_with``).

    ``refeed``: with a store, the parts saved by an earlier run whose rows the pass's consumers still need are
    computed again for them alone (``Refeed``, QA 45 #2), in row order with the parts still to build and dealt
    out to torchrun ranks with them (``Shard.mine`` on part indices, in runs of ``group``: a consumer's part has
    all its rows on one rank, as on a first run); this build's saved parts are neither rewritten nor counted
    again.  The resume message says so, and its fraction is the share of rows the pass skips.
    """
    t0 = time.perf_counter()
    if store is None:
        chunks = [compute(slice(s, min(n, s + chunk_size))) for s in range(0, n, chunk_size)]
        return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
    shard = distributed.current()
    partial = store.partial(name, settings, part_size=chunk_size, num_items=n)
    partial.share_disk_with(disk_siblings or [])
    todo = partial.todo()
    again = [] if refeed is None else [i for i in range(partial.num_parts)
                                       if partial.is_done(i) and refeed.wanted(partial.part_range(i))]
    saved, recomputed = n - partial.rows_in(todo), partial.rows_in(again)
    if saved and (todo or again) and progress is not None:
        message = f"resuming: {saved}/{n} examples saved by an earlier run"
        if again:
            message += f" ({recomputed} of them computed again for {refeed.names})"
        progress(message, (saved - recomputed) / n)  # the share of rows the pass skips
    build = set(todo)
    for i in shard.mine(sorted(build.union(again)), group):
        if i in build:
            partial.save_part(i, compute(partial.part_range(i)))
        elif refeed is not None:
            refeed.feed(partial.part_range(i))  # for the consumers only: this part is saved
    shard.barrier()
    if shard.is_main:
        # a resumed build counts its earlier attempts too (PartialBuild.seconds_before)
        partial.publish(meta={"build_seconds": round(time.perf_counter() - t0 + partial.seconds_before, 3),
                              "num_examples": n, **(meta or {})})
    shard.barrier()
    return store.load_arrays(name, settings)
