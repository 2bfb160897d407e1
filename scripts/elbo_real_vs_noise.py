"""The shipped digits model's exact negative ELBO on real digits against uniform-noise images.

Why: a likelihood the model assigns is only a useful measurement if it separates data from non-data.
This sums every one of the T terms of the negative ELBO (``measurements.elbo_bpd(exact=True)``, in
bits per dimension, the images snapped to the data's 17 grey levels) for the first N real digits and
N uniform-noise images (seed 0), as ``tests/test_measurements.py::test_trained_digits_elbo_real_below_noise``
does, and prints both ranges.

    python scripts/elbo_real_vs_noise.py [--n 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import get_preset  # noqa: E402
from engine.model.checkpoint import load_checkpoint  # noqa: E402
from engine.model.data import load_dataset  # noqa: E402
from engine.model.diffusion import Diffusion, make_draws  # noqa: E402
from engine.model.measurements import elbo_bpd, quantize  # noqa: E402
from engine.paths import default_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4, help="real digits (the first N) and noise images (default 4)")
    args = p.parse_args(argv)
    model, preset, _ = load_checkpoint(default_checkpoint("digits"))
    diff = Diffusion(preset.diffusion)
    real = load_dataset(get_preset("digits").data).images[: args.n]
    shape = tuple(real.shape[1:])
    noise = quantize(torch.rand(args.n, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1, 17)
    draws = make_draws(diff.T, shape, diff.T, seed=0)
    with torch.no_grad():
        r = [float(elbo_bpd(model, diff, x, draws, 17, exact=True)) for x in real]
        n = [float(elbo_bpd(model, diff, x, draws, 17, exact=True)) for x in noise]
    print(f"exact negative ELBO, bits/dim (T = {diff.T}): real digits {min(r):.2f}-{max(r):.2f} "
          f"({', '.join(f'{v:.2f}' for v in r)}); uniform noise {min(n):.2f}-{max(n):.2f} "
          f"({', '.join(f'{v:.2f}' for v in n)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
