"""Do a model's per-example loss gradients carry the class?  Raw and in K-FAC's metric, against M.

Why: on mnist K-FAC's top-10 proponents share the query's label 59% of the time (bar 80%; digits
88%), TRAK's and D-TRAK's at chance, and neither the damping, EK-FAC, the classifier nor the query's
draws explain it (README, "A second model").  Label agreement of a gradient method can only be as
high as the class structure of the gradients it compares.  This measures that structure directly on
a probe set of training images (``--per-class`` of every class), with two *independent* draw sets
per image, as between a query and the training images:

* self-consistency: cos(g_i^(1), g_i^(2)), two M-draw estimates of the same image's gradient
  (how much of a gradient is Monte Carlo noise at this M);
* same-class against other-class similarity, cos(g_i^(1), g_j^(2)), i != j;
* nearest-neighbour label agreement within the probe set (chance (k - 1) / (n - 1)).

each in two metrics: the raw inner product g_i^T g_j (what TRAK's and D-TRAK's scores reduce to
before their own preconditioning) and K-FAC's g_i^T (G + lambda I)^-1 g_j (paper eq. 6, the
preconditioned inner product of K-FAC influence, computed exactly in the factors' eigenbasis at the
preset's damping).  Pixel cosine's nearest-neighbour agreement on the same probe set is the
reference.

    python scripts/gradient_class_structure.py --preset mnist [--cache-root cache] [--per-class 8]
        [--mc 16,64,256] [--by-stage] [--out assets/results/gradient_class_structure_mnist.json]

``--by-stage`` splits K-FAC's preconditioned inner product by the U-Net's resolution stage (the
spatial size of each layer's output: 28, 14, 7 pixels on mnist; "vector" for the time-embedding
MLP).  The score is a sum over stages, s_ij = sum_l g_i,l^T (G_l + lambda I)^-1 g_j,l (K-FAC is
block-diagonal per layer, eq. 6), so for each stage this reports its share of the preconditioned
energy sum_i ||g_i,l||^2 (how much of the score's scale it holds) and the nearest-neighbour label
agreement of its term alone: which layers know the class, and which ones the sum listens to.

Needs the preset's K-FAC factors (built on first use, as ``attribution-engine build --methods kfac``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.attribution.gradients import per_example_grads  # noqa: E402
from engine.attribution.session import AttributionSession  # noqa: E402
from engine.attribution.stages import layer_stages, stage_indices  # noqa: E402
from engine.cli.common import build_progress  # noqa: E402
from engine.config import get_preset  # noqa: E402
from engine.files import save_json  # noqa: E402
from engine.model.diffusion import MCDraws  # noqa: E402


def probe_indices(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """``per_class`` training images of every class, drawn without replacement (seeded)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        pool = np.nonzero(labels == c)[0]
        if len(pool) < per_class:
            raise SystemExit(f"class {c} has {len(pool)} training images, fewer than --per-class {per_class}")
        out.append(np.sort(rng.choice(pool, size=per_class, replace=False)))
    return np.concatenate(out)


def draw_set(m: int, shape: tuple[int, ...], num_timesteps: int, seed: int) -> MCDraws:
    """M shared (t, eps) draws, seeded (uniform t, standard normal eps, no flips)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, num_timesteps, (m,), generator=g)
    return MCDraws(t, torch.randn(m, *shape, generator=g))


def structure(sim: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Summary of a similarity matrix sim[i, j] = s(g_i^(1), g_j^(2)) over a labelled probe set."""
    n = len(labels)
    off = ~np.eye(n, dtype=bool)
    same = (labels[:, None] == labels[None]) & off
    other = labels[:, None] != labels[None]
    masked = np.where(off, sim, -np.inf)
    nearest = masked.argmax(1)
    return {
        "self": float(np.mean(np.diag(sim))),
        "same_class": float(np.mean(sim[same])),
        "other_class": float(np.mean(sim[other])),
        "nn_label_agreement": float(np.mean(labels[nearest] == labels)),
        # is a gradient closer to its own second estimate than to every other image's? (noise level)
        "self_is_nearest": float(np.mean(sim.argmax(1) == np.arange(n))),
    }


def cosine(a: torch.Tensor, b: torch.Tensor, metric: torch.Tensor | None = None) -> np.ndarray:
    """cos(a_i, b_j) in the inner product <u, v> = u^T diag(metric) v (plain when metric is None)."""
    a, b = a.double(), b.double()
    w = torch.ones(a.shape[1], dtype=torch.float64) if metric is None else metric.double()
    ab = (a * w) @ b.T
    na = torch.sqrt(((a * a) * w).sum(1))
    nb = torch.sqrt(((b * b) * w).sum(1))
    return (ab / (na[:, None] * nb[None])).numpy()


def by_stage(ra: torch.Tensor, rb: torch.Tensor, metric: torch.Tensor, labels: np.ndarray,
             slices: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per stage l: share of the preconditioned energy and the label agreement of the term s_ij,l alone."""
    ra, rb, metric = ra.double(), rb.double(), metric.double()
    total = float(((ra * ra) * metric).sum())
    rows = {}
    for stage, idx in slices.items():  # finest grid first
        a, b, w = ra[:, idx], rb[:, idx], metric[idx]
        inner = ((a * w) @ b.T).numpy()
        rows[stage] = {
            "params": int(len(idx)),
            "energy_share": float(((a * a) * w).sum()) / total,
            "nn_label_agreement_unnormalised": structure(inner, labels)["nn_label_agreement"],
            "nn_label_agreement_cosine": structure(cosine(a, b, w), labels)["nn_label_agreement"],
        }
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mnist")
    ap.add_argument("--cache-root", default=None)
    ap.add_argument("--per-class", type=int, default=8, help="training images of every class in the probe set")
    ap.add_argument("--mc", default="16,64,256", help="draws M per gradient estimate (comma list)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--kfac-factor-draws", type=int, default=None,
                    help="K-FAC factors from k draws per example (default: the preset's)")
    ap.add_argument("--kfac-factor-draws-mode", default=None, choices=("same", "per-example"),
                    help="per-example: factors from independent draws per example, which see every timestep "
                         "(a preset with shared draws has factors whose time-embedding inputs span only its M "
                         "timesteps)")
    ap.add_argument("--factor-mc-samples", type=int, default=None,
                    help="the session's M for the factors' cache key (default: the preset's)")
    ap.add_argument("--by-stage", action="store_true",
                    help="split K-FAC's inner product by the U-Net's resolution stage (see the module docstring)")
    args = ap.parse_args(argv)
    mcs = [int(x) for x in args.mc.split(",") if x.strip()]
    if not mcs or min(mcs) < 1:
        raise SystemExit("--mc needs positive draw counts, e.g. 16,64,256")
    if args.per_class < 2:
        raise SystemExit("--per-class must be at least 2 (a same-class neighbour has to exist)")
    t0 = time.time()
    changes = {k: v for k, v in (("kfac_factor_draws", args.kfac_factor_draws),
                                  ("kfac_factor_draws_mode", args.kfac_factor_draws_mode),
                                  ("mc_samples", args.factor_mc_samples)) if v is not None}
    s = AttributionSession(preset=args.preset, cache_root=args.cache_root,
                           config=dataclasses.replace(get_preset(args.preset).attribution, **changes))
    if s.labels is None:
        raise SystemExit(f"preset {args.preset} has no labels: the class structure needs them")
    labels_all = np.asarray(s.labels)
    idx = probe_indices(labels_all, args.per_class, args.seed)
    labels = labels_all[idx]
    x = s.dataset.images[torch.as_tensor(idx)].float()
    with build_progress("kfac") as progress:
        s.build(["kfac"], progress)
    kfac = s.method("kfac")
    damping = float(kfac.default_damping)
    factors = kfac.factors
    metric = 1.0 / (factors.eigenvalues().double() + damping)
    chance = (args.per_class - 1) / (len(idx) - 1)
    flat = x.flatten(1)
    pixel = structure(cosine(flat, flat), labels)
    print(f"{args.preset}: {len(idx)} training images ({args.per_class} per class), two independent draw sets "
          f"per image; K-FAC damping {damping:g}; nearest-neighbour chance {chance:.3f}; pixel cosine "
          f"nearest-neighbour agreement {pixel['nn_label_agreement']:.3f}")
    rows = []
    shape = tuple(x.shape[1:])
    slices = None
    if args.by_stage:
        stages = layer_stages(s.model, x[:1], torch.zeros(1, dtype=torch.long))
        slices = stage_indices(list(s.ctx.params), stages)  # the rotation keeps each layer's coordinates
    for m in mcs:
        ga = per_example_grads(s.model, s.diffusion, x, draw_set(m, shape, s.diffusion.T, 2 * m + args.seed))
        gb = per_example_grads(s.model, s.diffusion, x, draw_set(m, shape, s.diffusion.T, 2 * m + args.seed + 1))
        raw = structure(cosine(ga, gb), labels)
        ra, rb = factors.rotate(ga), factors.rotate(gb)
        kf = structure(cosine(ra, rb, metric), labels)
        # as K-FAC influence ranks: the plain preconditioned inner product, no normalisation
        inner = ((ra.double() * metric) @ rb.double().T).numpy()
        kf["nn_label_agreement_unnormalised"] = structure(inner, labels)["nn_label_agreement"]
        row = {"mc_samples": m, "raw": raw, "kfac": kf}
        if slices is not None:
            row["kfac_by_stage"] = by_stage(ra, rb, metric, labels, slices)
        rows.append(row)
        for name, r in (("raw  ", raw), ("K-FAC", kf)):
            print(f"  M = {m:4d} {name}: self {r['self']:+.3f}  same class {r['same_class']:+.3f}  other class "
                  f"{r['other_class']:+.3f}  nearest neighbour same label {r['nn_label_agreement']:.3f}  "
                  f"own second estimate nearest {r['self_is_nearest']:.2f}", flush=True)
        print(f"  M = {m:4d} K-FAC inner product (no normalisation, as influence ranks): nearest neighbour "
              f"same label {kf['nn_label_agreement_unnormalised']:.3f}", flush=True)
        for stage, r in row.get("kfac_by_stage", {}).items():
            print(f"      stage {stage:>6}: {r['params']:7d} params, {r['energy_share']:6.1%} of the preconditioned "
                  f"energy, its term alone: nearest neighbour same label {r['nn_label_agreement_unnormalised']:.3f} "
                  f"(cosine {r['nn_label_agreement_cosine']:.3f})", flush=True)
    record = {
        "preset": args.preset,
        "checkpoint_hash": s.checkpoint_hash,
        "probe": {"per_class": args.per_class, "seed": args.seed, "indices": [int(i) for i in idx]},
        "kfac_damping": damping,
        "factors": {"draws": s.config.draws, "mc_samples": s.config.mc_samples,
                    "kfac_factor_draws": s.config.kfac_factor_draws,
                    "kfac_factor_draws_mode": s.config.kfac_factor_draws_mode},
        "nn_chance": chance,
        "pixel": pixel,
        "rows": rows,
        "seconds": round(time.time() - t0, 1),
        "command": "python scripts/gradient_class_structure.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if args.out:
        save_json(args.out, record)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
