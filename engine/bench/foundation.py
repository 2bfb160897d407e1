"""Foundation benchmark: sizes and speeds of the foundation on this machine.

Prints the parameter count of every preset, training steps/s of one preset (digits by default; the
real ``engine.model.train.train`` loop, timed per step after a warm-up; median), the seconds to
draw that preset's samples with all T steps from its checkpoint, and the peak resident memory of the process.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ..code_version import code_version
from ..config import PRESETS, Preset
from ..files import save_json
from . import memory
from .announce import say


def bench_foundation(
    checkpoint: Path, device: str, steps: int = 100, warmup: int = 10, samples: int = 16,
    threads: int | None = None, json_out: Path | None = None, preset: Preset | None = None,
    checkpoint_required: bool = False,
) -> dict[str, Any]:
    """The figures as a dict (also printed, and written to ``json_out`` if given).

    ``preset`` (default digits) is trained and sampled, from ``checkpoint`` when it loads, else from random
    weights; ``checkpoint_required`` (a --checkpoint given by name) makes a checkpoint that does not load an
    error, raised before any timing, as is a checkpoint of another preset (QA 27 #11: --preset mnist timed
    digits training but sampled the mnist checkpoint; a mistyped --checkpoint timed random weights)."""
    import torch

    from ..model.checkpoint import CheckpointError, load_checkpoint
    from ..model.sampling import generate
    from ..model.train import train
    from ..model.unet import build_model, count_parameters

    if threads:
        torch.set_num_threads(threads)
    ckpt = Path(checkpoint)
    out: dict = {"device": str(device), "threads": torch.get_num_threads(), "params": {},
                 "code": code_version()}  # which code made the figures
    preset = PRESETS["digits"] if preset is None else preset
    # the checkpoint is read before the timing: one that was asked for and does not load, or is another
    # preset's model, is refused at once
    source = "random weights (no checkpoint found)"
    model = build_model(preset.model).to(device).eval()
    sample_preset = preset
    try:
        model, sample_preset, _ = load_checkpoint(ckpt, device, preset)
        source = f"checkpoint {ckpt}"
    except CheckpointError:
        if checkpoint_required:
            raise
    if sample_preset.name != preset.name:
        raise ValueError(f"checkpoint {ckpt} is a {sample_preset.name} model, not {preset.name}: give --preset "
                         f"{sample_preset.name} (one preset is trained and sampled)")
    # printed after the checkpoint is read, so a refused checkpoint prints its error alone (QA 29 #6)
    print(f"device {device}, {torch.get_num_threads()} torch threads")
    for name, p in PRESETS.items():
        out["params"][name] = count_parameters(build_model(p.model))
        print(f"parameters {name:8s} {out['params'][name]:>12,d}")
    total = warmup + steps
    stamps: list[float] = []
    # said before each timed part, on stderr: no bar (it would cost time in the timing), so say what runs
    # (QA 25 #11: 24 s, then 14 s, with no output)
    say(f"timing {total} training steps of the {preset.name} model ({warmup} warm-up) ...")
    with tempfile.TemporaryDirectory() as tmp:
        train(preset, Path(tmp) / "bench", device=device, steps=total,
              progress=lambda s, T, loss: stamps.append(time.perf_counter()))
    timed = stamps[max(warmup - 1, 0) :]  # the first timed step starts when the last warm-up ends
    per_step = [b - a for a, b in zip(timed[:-1], timed[1:], strict=True)]
    med = statistics.median(per_step)
    out["train_step_s_median"] = med
    out["train_steps_per_s"] = 1.0 / med
    print(
        f"training {preset.name}: {1.0 / med:.1f} steps/s (median {med * 1000:.1f} ms/step over {len(per_step)} "
        f"steps, batch {preset.train.batch_size}, after {warmup} warm-up steps)"
    )

    steps_t = sample_preset.diffusion.num_timesteps
    say(f"timing the sampling of {samples} {preset.name} samples ({steps_t} steps) ...")
    t0 = time.perf_counter()
    generate(model, sample_preset, samples, seed=0, device=device)
    secs = time.perf_counter() - t0
    out.update(preset=preset.name, sample_s=secs, sample_n=samples, sample_steps=steps_t, sample_weights=source)
    print(f"sampling: {samples} {preset.name} samples with {steps_t} steps in {secs:.2f} s ({source})")
    out["peak_rss_mib"] = memory.peak_rss_mib()
    print(f"peak RSS: {out['peak_rss_mib']:.0f} MiB")
    if json_out:
        save_json(json_out, out)
    return out
