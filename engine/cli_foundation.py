"""``bench-foundation``: sizes and speeds of the foundation on this machine.

Prints the parameter count of every preset, training steps/s of the digits preset (the
real ``engine.train.train`` loop, timed per step after a warm-up; median), the seconds to
draw digits samples with all T steps, and the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from . import jsonio
from .cli import register, resolve, subcommand


@register
def add_bench_foundation(sub: argparse._SubParsersAction) -> None:
    p = subcommand(
        sub,
        "bench-foundation",
        cmd_bench_foundation,
        help="time training and sampling of the digits preset; print preset sizes",
        description="Parameters of each preset, training steps/s for the digits preset (median "
        "per-step time of a short run after a warm-up), seconds to draw digits samples with all "
        "T steps (shipped checkpoint if present, else random weights), and peak RSS memory.",
    )
    p.add_argument("--steps", type=int, default=100, help="timed training steps (default 100)")
    p.add_argument("--warmup", type=int, default=10, help="untimed warm-up training steps (default 10)")
    p.add_argument("--samples", type=int, default=16, help="number of samples to draw (default 16)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")


def peak_rss_mib() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def cmd_bench_foundation(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import CheckpointError, load_checkpoint
    from .config import PRESETS
    from .sampling import generate
    from .train import train
    from .unet import build_model, count_parameters

    if args.threads:
        torch.set_num_threads(args.threads)
    _, ckpt, device = resolve(args)
    out: dict = {"device": str(device), "threads": torch.get_num_threads(), "params": {}}
    print(f"device {device}, {torch.get_num_threads()} torch threads")
    for name, p in PRESETS.items():
        out["params"][name] = count_parameters(build_model(p.model))
        print(f"parameters {name:8s} {out['params'][name]:>12,d}")

    preset = PRESETS["digits"]
    total = args.warmup + args.steps
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        train(preset, Path(tmp) / "bench", device=device, steps=total,
              progress=lambda s, T, loss: stamps.append(time.perf_counter()))
    timed = stamps[max(args.warmup - 1, 0) :]  # the first timed step starts when the last warm-up ends
    per_step = [b - a for a, b in zip(timed[:-1], timed[1:], strict=True)]
    med = statistics.median(per_step)
    out["train_step_s_median"] = med
    out["train_steps_per_s"] = 1.0 / med
    print(
        f"training digits: {1.0 / med:.1f} steps/s (median {med * 1000:.1f} ms/step over {len(per_step)} "
        f"steps, batch {preset.train.batch_size}, after {args.warmup} warm-up steps)"
    )

    source = "random weights (no checkpoint found)"
    model = build_model(preset.model).to(device).eval()
    try:
        model, preset, _ = load_checkpoint(ckpt, device)
        source = f"checkpoint {ckpt}"
    except CheckpointError:
        pass
    t0 = time.perf_counter()
    generate(model, preset, args.samples, seed=0, device=device)
    secs = time.perf_counter() - t0
    out.update(sample_s=secs, sample_n=args.samples, sample_steps=preset.diffusion.num_timesteps,
               sample_weights=source)
    print(f"sampling: {args.samples} digits with {preset.diffusion.num_timesteps} steps in {secs:.2f} s ({source})")
    out["peak_rss_mib"] = peak_rss_mib()
    print(f"peak RSS: {out['peak_rss_mib']:.0f} MiB")
    if args.json:
        Path(args.json).write_text(jsonio.dumps(out, indent=2))
    return 0
