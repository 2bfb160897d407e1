"""Where the K-FAC factor pass spends its time (issue 12): measured rows per minute, and the
arithmetic per (example, draw) row from the layer shapes.

Why: the factor pass is most of a cold build.  The cost model shows that K-FAC-expand's input and
gradient covariances (2 S (d_in^2 + d_out^2) per layer and row, S = spatial positions), not the
forward and backward passes, dominate it, so sharing forward passes with the gradient pass
cannot shorten it much; the timing shows whether batch size or threads change the rate.

    python scripts/factor_pass_cost.py [--preset digits] [--examples 32] [--threads 1,2] [--batch-sizes 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.attribution.curvature import compute_kfac  # noqa: E402
from engine.attribution.gradients import influence_params  # noqa: E402
from engine.model.checkpoint import load_checkpoint  # noqa: E402
from engine.model.data import load_dataset  # noqa: E402
from engine.model.diffusion import Diffusion, make_draws  # noqa: E402
from engine.paths import default_checkpoint  # noqa: E402


def cost_model(model: nn.Module, shape: tuple[int, ...]) -> dict[str, float]:
    """MFLOP per row: forward, forward + backward (3x forward) and the K-FAC-expand covariances."""
    fwd = cov = 0.0

    def hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal fwd, cov
        if isinstance(m, nn.Conv2d):
            s, d_in = out.shape[-1] * out.shape[-2], m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            d_out = m.out_channels
        else:
            s, d_in, d_out = inp[0].numel() // inp[0].shape[-1], m.in_features, m.out_features
        fwd += 2 * s * d_in * d_out
        cov += 2 * s * (d_in**2 + d_out**2)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, *shape), torch.zeros(1, dtype=torch.long))
    for h in handles:
        h.remove()
    return {"forward": fwd / 1e6, "forward_plus_backward": 3 * fwd / 1e6, "kfac_expand_covariances": cov / 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="digits")
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--mc-samples", type=int, default=64)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batch-sizes", default="256")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of all settings, interleaved")
    args = ap.parse_args(argv)
    model, preset, _ = load_checkpoint(default_checkpoint(args.preset))
    diffusion = Diffusion(preset.diffusion)
    x = load_dataset(preset.data).images[: args.examples]
    shape = tuple(x.shape[1:])
    costs = cost_model(model, shape)
    print(f"{args.preset}: MFLOP per (example, draw) row: " + ", ".join(f"{k} {v:.1f}" for k, v in costs.items()))
    draws = make_draws(args.mc_samples, shape, diffusion.T, seed=0)
    params = influence_params(model)
    rows = args.examples * args.mc_samples
    for _ in range(args.repeats):
        for th in (int(t) for t in args.threads.split(",")):
            for bs in (int(b) for b in args.batch_sizes.split(",")):
                torch.set_num_threads(th)
                t0 = time.perf_counter()
                compute_kfac(model, diffusion, x, draws, params, batch_size=bs)
                dt = time.perf_counter() - t0
                print(f"  threads {th}, batch {bs}: {rows / dt * 60:,.0f} rows/min ({rows} rows in {dt:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
