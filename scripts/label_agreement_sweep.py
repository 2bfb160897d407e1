"""K-FAC's top-10 label agreement over the gallery against the damping and the query's draws.

Why: on mnist K-FAC's top-10 proponents share the query's classifier label less often than on
digits (bench: 0.59 vs 0.91).  This separates the candidate causes that need no rebuild: the
damping (a re-score of the same query gradients) and the number of draws of the query gradient.
Needs the preset's built caches (``attribution-engine build --preset PRESET``).

    python scripts/label_agreement_sweep.py --preset mnist [--cache-root cache] [--mc-samples 64] [--ekfac] [--fresh 512]

``--out FILE`` also writes a JSON record with every query's agreement (the gallery's, and the fresh
samples' for K-FAC and pixel cosine), so that the means, intervals and paired differences it prints can
be derived again from the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.attribution.curvature import KFAC_APPROX  # noqa: E402
from engine.attribution.session import AttributionSession  # noqa: E402
from engine.attribution.stages import keep_only, layer_stages, stage_indices  # noqa: E402
from engine.attribution.train_draws import DRAW_MODES  # noqa: E402
from engine.cli.common import build_progress  # noqa: E402
from engine.config import get_preset  # noqa: E402
from engine.evaluation.label_agreement import top_shares  # noqa: E402
from engine.evaluation.stats import bootstrap_ci  # noqa: E402
from engine.model.label_classifier import classifier_for, classify  # noqa: E402
from engine.model.measurements import parse_measurement  # noqa: E402


def agreement(scores: np.ndarray, labels: np.ndarray, label: int, k: int = 10) -> float:
    """Fraction of the k largest scores whose training label is ``label`` (``label_agreement.top_shares``)."""
    return float(top_shares(np.asarray(scores)[None], labels, np.array([label]), k)[0])


def self_influence(s: AttributionSession, damping: float) -> np.ndarray:
    """(1/N) g_i^T (G + lambda I)^-1 g_i for every training image, from the stored K-FAC bank:
    sum_b scale_{i,b}^2 sum_j int8_{i,b,j}^2 / (e_j + lambda), the bank's own rows against themselves."""
    m = s.method("kfac")
    bank, eig = m.bank, m._eigenvalues
    if not hasattr(bank, "scales") or bank.scales is None:
        raise SystemExit("--relative needs a stored int8 K-FAC bank (--kfac-bank stored)")
    n = bank.num_examples
    w = (1.0 / (eig.double() + damping)).float()
    out = np.zeros(n)
    for j, (blk, d) in enumerate(zip(bank.blocks, bank.data, strict=True)):
        wb = w[blk.offset : blk.offset + blk.size]
        for r in range(0, n, 256):
            x = d[r : r + 256].float()
            out[r : r + 256] += ((x * x) @ wb).double().numpy() * bank.scales[r : r + 256, j].double().numpy() ** 2
    return out / n


def kfac_pixel_agreements(s: AttributionSession, images: torch.Tensor, descriptions: list[str], labels: np.ndarray,
                          query_labels: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """Query each image (loss measurement) with K-FAC and pixel cosine and score each method's top-10
    against each set of query labels: ``{method + suffix: [agreement per image]}``."""
    from engine.attribution.query import QueryInput

    got: dict[str, list[float]] = {}
    for i, desc in enumerate(descriptions):
        res = s.query(QueryInput(image=images[i], description=desc), "loss", methods=["kfac", "pixel"])
        for name, r in res.methods.items():
            for suffix, qlab in query_labels.items():
                got.setdefault(name + suffix, []).append(agreement(r.scores, labels, int(qlab[i])))
    return got


def real_agreement(s: AttributionSession, labels: np.ndarray, n: int) -> None:
    """Top-10 label agreement of K-FAC and pixel cosine for n real mnist digits outside the training set,
    against their true labels (and against the classifier's labels, as for the gallery)."""
    from engine.model.data_mnist import per_class_indices, read_shipped

    if s.preset.data.name != "mnist" or s.preset.data.root is not None:
        raise SystemExit("--real needs the shipped mnist digits")
    images, true = read_shipped()
    train = set(per_class_indices(true, s.preset.data.per_class, s.preset.data.seed).tolist())
    rest = np.array([i for i in range(len(true)) if i not in train])
    pick = np.sort(np.random.default_rng(1).choice(rest, size=n, replace=False))
    x = torch.from_numpy(images[pick].astype(np.float32) / 255.0 * 2.0 - 1.0)[:, None]
    clf = classifier_for(s.preset, s.dataset)
    pred, _ = classify(clf, x)
    got = kfac_pixel_agreements(s, x, [f"mnist10k:{int(i)}" for i in pick], labels,
                                {"": true[pick], " (classifier label)": pred})
    print(f"  {n} real held-out digits as queries, classifier right on {np.mean(pred == true[pick]):.2f}:")
    for name, v in got.items():
        print(f"    {name}: {np.mean(v):.3f}")


def fresh_samples(s: AttributionSession, n: int, seed: int) -> torch.Tensor:
    """n fresh samples of the session's model (sampling seed ``seed``), on the CPU, clamped to [-1, 1].

    Drawn once per run and shared by ``--fresh`` and ``--ensemble-seeds``, which score the same samples."""
    from engine.model.sampling import generate

    images, _ = generate(s.model, s.preset, n, seed, device=str(s.device), progress=True)
    return images.cpu().clamp(-1, 1)


def fresh_agreement(s: AttributionSession, clf, labels: np.ndarray, images: torch.Tensor, seed: int) -> dict:
    """K-FAC's (and pixel cosine's) top-10 agreement over fresh samples of the model, not the gallery.

    Why: the bar counts the 32 gallery samples, a small draw from the model's samples; this estimates
    the same figure for the model's sample distribution, with a bootstrap interval, so that a gallery
    figure near the bar can be told from the model's.  ``images``: ``fresh_samples(s, n, seed)``."""
    n = len(images)
    lab, prob = classify(clf, images)
    got = kfac_pixel_agreements(s, images, [f"fresh:{seed}:{i}" for i in range(n)], labels, {"": lab})
    conf = prob >= 0.8
    print(f"  {n} fresh samples (seed {seed}; {conf.sum()} labelled with p >= 0.8):")
    for name, v in got.items():
        lo, hi = bootstrap_ci(v)
        arr = np.asarray(v)
        print(f"    {name}: top-10 {arr.mean():.3f} [{lo:.3f}, {hi:.3f}]; p >= 0.8 {arr[conf].mean():.3f}, "
              f"p < 0.8 {arr[~conf].mean() if (~conf).any() else float('nan'):.3f}")
    diff = np.asarray(got["kfac"]) - np.asarray(got["pixel"])  # same samples: a paired difference
    lo, hi = bootstrap_ci(diff)
    print(f"    kfac - pixel, paired over the same samples: {diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]")
    return {"seed": seed, "n": n, "labels": [int(x) for x in lab], "confident": [bool(c) for c in conf],
            "per_query": {name: [float(x) for x in v] for name, v in got.items()},
            "top10": {name: float(np.mean(v)) for name, v in got.items()},
            "ci95": {name: [float(x) for x in bootstrap_ci(v)] for name, v in got.items()},
            "kfac_minus_pixel": {"difference": float(diff.mean()), "ci95": [float(lo), float(hi)]}}


def ensemble_agreement(args: argparse.Namespace, s: AttributionSession, clf, labels: np.ndarray, gallery: torch.Tensor,
                       fresh: torch.Tensor | None) -> None:
    """K-FAC's top-10 agreement of the mean score over independent attribution seeds, on the gallery
    (and on ``--fresh`` samples).

    Why: one seed's figure moves by about 0.03 with the seed (the bank's, the factors' and, with common
    random numbers, the query's draws).  Averaging the scores (1/S) sum_s tau_s(x_q, x_i) over S
    independent draw sets removes the part of each estimate's Monte Carlo noise that is independent
    between sets, while each set keeps the query's and the training image's draws common; it tells
    whether that noise is what holds the figure down.  One cold K-FAC build per seed other than the run's
    own (``s``, reused); ``fresh``: the run's ``fresh_samples`` or None."""
    from engine.attribution.query import QueryInput

    seeds = [int(x) for x in args.ensemble_seeds.split(",")]
    sessions = []
    for sd in seeds:
        if sd == s.config.seed:
            sessions.append(s)
            continue
        sess = AttributionSession(preset=args.preset, checkpoint=args.checkpoint, cache_root=args.cache_root,
                                  config=dataclasses.replace(s.config, seed=sd))
        with build_progress("kfac") as progress:
            sess.build(["kfac"], progress)
        sessions.append(sess)
    sets = [("gallery", gallery)]
    if fresh is not None:
        sets.append((f"{len(fresh)} fresh (seed {args.fresh_seed})", fresh))
    print(f"  K-FAC scores averaged over attribution seeds {seeds}:")
    for name, imgs in sets:
        lab, _ = classify(clf, imgs)
        scores = np.stack([np.stack([s.query(QueryInput(image=imgs[i], description=f"{name}:{i}"), "loss",
                                             methods=["kfac"]).methods["kfac"].scores for i in range(len(imgs))])
                           for s in sessions])  # (seeds, queries, N)
        single = [np.mean([agreement(scores[a, i], labels, int(lab[i])) for i in range(len(imgs))])
                  for a in range(len(seeds))]
        print(f"    {name}: each seed alone " + ", ".join(f"{v:.3f}" for v in single) + f" (mean {np.mean(single):.3f})")
        for k in range(2, len(seeds) + 1):
            v = [agreement(scores[:k, i].mean(0), labels, int(lab[i])) for i in range(len(imgs))]
            lo, hi = bootstrap_ci(v)
            print(f"    {name}: mean score of the first {k} seeds {np.mean(v):.3f} [{lo:.3f}, {hi:.3f}]")


def float_bank_agreement(s: AttributionSession, qlab: np.ndarray, labels: np.ndarray, int8: list[np.ndarray]) -> None:
    """The same agreement with K-FAC's training rows in float32 (the streamed kind, no int8 rounding).

    The stored bank keeps R_i = Q_B^T G_i Q_A rounded to int8 with one scale per row and block
    (docs/architecture.md §4); its Spearman against float32 scores is >= 0.99, but a top-10 is a
    small set, so this asks whether the rounding moves it.  The float rows are recomputed from
    the training gradients with the bank's own draws, every gallery query in one batched pass
    (``pool.attribution_matrix``), against the same cached factors."""
    from engine.attribution.pool import attribution_matrix, gallery_set

    f = AttributionSession(preset=s.preset, checkpoint=s.checkpoint, cache_root=s.cache_root, dataset=s.dataset,
                           config=dataclasses.replace(s.config, kfac_bank="streamed"))
    qset = gallery_set(f)
    n = len(int8)
    res = attribution_matrix(f, qset, "loss", ["kfac"])["kfac"]
    if res.status != "ok":
        raise SystemExit(f"float32 rows: {res.reason}")
    exact = res.scores[:n]
    top = [agreement(e, labels, y) for e, y in zip(exact, qlab, strict=True)]
    overlap = [len(set(np.argsort(-a)[:10]) & set(np.argsort(-b)[:10])) / 10 for a, b in zip(exact, int8, strict=True)]
    rho = [float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1]) for a, b in zip(exact, int8, strict=True)]
    print(f"  float32 rows (streamed, no int8), damping {res.damping:g}: top-10 {np.mean(top):.3f} "
          f"(int8 bank {np.mean([agreement(b, labels, y) for b, y in zip(int8, qlab, strict=True)]):.3f}); "
          f"top-10 sets shared with the int8 bank's {np.mean(overlap):.3f} (min {np.min(overlap):.1f}), "
          f"Spearman int8 vs float32 median {np.median(rho):.4f}")


def stage_agreement(s: AttributionSession, qs: list, qlab: np.ndarray, labels: np.ndarray, full: list[np.ndarray]) -> None:
    """K-FAC's top-10 agreement when the score sums only some of the U-Net's stages (``engine.attribution.stages``).

    Why: the score is a sum of per-layer terms (K-FAC is block-diagonal, eq. 6); if one stage's term
    carries the class and the others' do not, the sum's agreement sits between them.  The query gradient
    zeroed outside a stage gives that stage's term exactly (the rotation keeps a layer's coordinates), so
    this is one more pass over the same bank per stage.  A diagnostic: the method sums every layer."""
    kfac = s.method("kfac")
    stages = layer_stages(s.model, qs[0].image[None].to(s.device), torch.zeros(1, dtype=torch.long, device=s.device))
    idx = stage_indices(list(s.ctx.params), stages)
    sets = dict(idx)
    if len(idx) > 2:
        for name in idx:
            sets[f"all but {name}"] = torch.cat([i for other, i in idx.items() if other != name])
    meas = parse_measurement("loss", s.diffusion.T)
    draws = s.query_draws()
    got: dict[str, list[float]] = {name: [] for name in sets}
    same_top = []
    for q, y, sc in zip(qs, qlab, full, strict=True):
        g = s.query_gradient(meas, q, draws)
        whole = kfac.score(kfac.prepare(s.ctx, q, g))
        same_top.append(np.array_equal(np.argsort(-whole)[:10], np.argsort(-sc)[:10]))
        for name, i in sets.items():
            got[name].append(agreement(kfac.score(kfac.prepare(s.ctx, q, keep_only(g, i))), labels, int(y)))
    print(f"  by stage (the score summed over these layers only; the whole gradient reproduces the method's "
          f"top-10 for {np.mean(same_top):.0%} of the queries):")
    for name, v in got.items():
        print(f"    {name:>14} ({len(sets[name]):7d} params): top-10 {np.mean(v):.3f}")


def witness(s: AttributionSession, clf, qs: list, qlab: np.ndarray, qprob: np.ndarray, scores: list[np.ndarray],
            labels: np.ndarray) -> None:
    """Agreement split by the labelling classifier's confidence, and under a stronger classifier's labels.

    Why: the queries' labels come from a pixel logistic regression (``engine.model.label_classifier``),
    right on about 90% of real held-out mnist digits; if its labels of ambiguous samples were what keeps
    the agreement low, the confident samples would agree more and a better classifier's labels would
    lift it."""
    conf = qprob >= 0.8
    top = np.array([agreement(sc, labels, int(y)) for sc, y in zip(scores, qlab, strict=True)])

    def part(mask: np.ndarray) -> str:
        return f"{np.mean(top[mask]):.3f}" if mask.any() else "-"

    print(f"  by the classifier's confidence: p >= 0.8 ({conf.sum()} queries) {part(conf)}, "
          f"p < 0.8 ({(~conf).sum()}) {part(~conf)}")
    if s.preset.data.name != "mnist" or s.preset.data.root is not None:
        print("  (the SVM witness needs the shipped mnist digits: skipped)")
        return
    from sklearn.svm import SVC

    from engine.model.dataset import to_unit_range
    from engine.model.label_classifier import _shipped_halves

    (xf, yf), (xh, yh) = _shipped_halves()
    svm = SVC(C=10.0, gamma="scale", random_state=0).fit(xf, yf)
    x = to_unit_range(torch.stack([q.image for q in qs])).flatten(1).numpy()
    slab = svm.predict(x)
    again = [agreement(sc, labels, int(y)) for sc, y in zip(scores, slab, strict=True)]
    print(f"  RBF SVM witness (held-out real digits right {np.mean(svm.predict(xh) == yh):.3f}, the logistic "
          f"regression {np.mean(clf.predict(xh) == yh):.3f}): same label on "
          f"{np.mean(slab == qlab):.2f} of the queries, top-10 agreement {np.mean(again):.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mnist")
    ap.add_argument("--cache-root", default=None)
    ap.add_argument("--checkpoint", default=None,
                    help="another model of the preset's data (its gallery beside it, from `attribution-engine assets`)")
    ap.add_argument("--mc-samples", type=int, default=None,
                    help="M for the bank, factors and query (default: the preset's; K-FAC is built first if missing)")
    ap.add_argument("--queries", type=int, default=32, help="gallery samples")
    ap.add_argument("--dampings", default="1e-8,1e-6,1e-4,1e-3,1e-2,1e-1,1")
    ap.add_argument("--query-draws", default="128", help="extra query-gradient draws to try (comma list)")
    ap.add_argument("--real", type=int, default=0,
                    help="also query this many real held-out mnist digits (not in the training set), scored "
                         "against their true labels: separates the method from the samples' ambiguity")
    ap.add_argument("--measurements", default="",
                    help="other measurements to try at the default damping (comma list, e.g. elbo,loss@t=100)")
    ap.add_argument("--relative", action="store_true",
                    help="also rank by influence / sqrt(self-influence) of each training image (a cosine in the "
                         "metric (G + lambda I)^-1): does a few images' large self-influence crowd out the class?")
    ap.add_argument("--method", default="kfac", choices=("kfac", "trak", "dtrak"),
                    help="the method whose damping sweep and agreement are reported (--relative, --ekfac, "
                         "--real and --measurements are K-FAC's)")
    ap.add_argument("--witness", action="store_true",
                    help="also split the agreement by the classifier's confidence (p >= 0.8 or not) and relabel "
                         "the queries with a stronger classifier (an RBF SVM on the same half of the shipped mnist "
                         "digits): is the 0.59 the logistic regression's labels?")
    ap.add_argument("--ekfac", action="store_true",
                    help="EK-FAC eigenvalues (George et al. 2018) instead of K-FAC's (one more pass over the data)")
    ap.add_argument("--draws", default=None, choices=DRAW_MODES,
                    help="training-gradient draws (default: the preset's)")
    ap.add_argument("--kfac-factor-draws", type=int, default=None,
                    help="K-FAC factors from k draws per example (with --kfac-factor-draws-mode per-example "
                         "k < M is allowed with shared bank draws)")
    ap.add_argument("--kfac-factor-draws-mode", default=None, choices=("same", "per-example"))
    ap.add_argument("--kfac-approx", default=None, choices=KFAC_APPROX,
                    help="K-FAC-expand (default) or -reduce for weight-sharing layers (paper eq. 12)")
    ap.add_argument("--fisher-type", default=None, choices=("mc", "empirical"),
                    help="curvature: the MC-Fisher GGN (default; labels sampled from the model) or the "
                         "empirical Fisher (paper eq. 11)")
    ap.add_argument("--query-draws-mode", default=None, choices=("own", "bank"),
                    help="the query gradient on its own draws or on the bank's shared draws (common random numbers "
                         "between the query and every training example: AttributionConfig.query_draws); "
                         "default: the preset's (mnist: bank)")
    ap.add_argument("--fresh", type=int, default=0,
                    help="also query this many fresh samples of the model (not the gallery), with a bootstrap "
                         "interval: is the gallery's figure the model's?")
    ap.add_argument("--fresh-seed", type=int, default=2000, help="sampling seed of --fresh (the gallery's is 1000)")
    ap.add_argument("--out", default=None, help="also write the per-query agreements to this JSON file")
    ap.add_argument("--attribution-seed", type=int, default=None,
                    help="seed of every Monte Carlo draw of the attribution (AttributionConfig.seed; default: the "
                         "preset's): how much of the gallery's figure is the method's own draw?")
    ap.add_argument("--ensemble-seeds", default="",
                    help="also average K-FAC's scores over these attribution seeds (comma list; one cold build "
                         "each) and report the agreement of the mean, on the gallery and on --fresh samples")
    ap.add_argument("--float-bank", action="store_true",
                    help="also score the gallery against float32 training rows (the streamed bank: no int8 rounding; "
                         "one batched gradient pass): does the bank's quantisation move the top-10?")
    ap.add_argument("--by-stage", action="store_true",
                    help="also score with the query gradient kept on one resolution stage of the U-Net at a time "
                         "(and on all but one): which layers' terms of the sum carry the class?")
    args = ap.parse_args(argv)
    if args.method != "kfac" and (args.relative or args.ekfac or args.real or args.measurements or args.by_stage
                                  or args.fresh or args.ensemble_seeds or args.float_bank):
        raise SystemExit("--relative, --ekfac, --real, --fresh, --ensemble-seeds, --measurements, --by-stage and "
                         "--float-bank are K-FAC's: use --method kfac")
    changes = {k: v for k, v in (("mc_samples", args.mc_samples), ("ekfac", args.ekfac or None),
                                  ("draws", args.draws), ("kfac_factor_draws", args.kfac_factor_draws),
                                  ("kfac_factor_draws_mode", args.kfac_factor_draws_mode),
                                  ("kfac_approx", args.kfac_approx), ("fisher_type", args.fisher_type),
                                  ("query_draws", args.query_draws_mode), ("seed", args.attribution_seed))
               if v is not None}
    s = AttributionSession(preset=args.preset, checkpoint=args.checkpoint, cache_root=args.cache_root,
                           config=dataclasses.replace(get_preset(args.preset).attribution, **changes))
    with build_progress(args.method) as progress:
        s.build([args.method], progress)
    labels = s.labels
    clf = classifier_for(s.preset, s.dataset)
    if labels is None or clf is None:
        raise SystemExit("needs a labelled data set with a classifier (digits, mnist)")
    qs = [s.parse_query(f"gallery:{i}") for i in range(args.queries)]
    qlab, qprob = classify(clf, torch.stack([q.image for q in qs]))
    meth = args.method
    raws = [s.query(q, "loss", methods=[meth]) for q in qs]
    title = {"kfac": "EK-FAC" if s.config.ekfac else "K-FAC", "trak": "TRAK", "dtrak": "D-TRAK"}[meth]
    print(f"{args.preset}: {title} top-10 label agreement over {len(qs)} "
          f"gallery samples (M = {s.config.mc_samples} for the training gradients and the query, {s.config.draws} "
          f"draws, factors from {s.config.kfac_factor_draws or 'all'} {s.config.kfac_factor_draws_mode} draws, "
          f"K-FAC-{s.config.kfac_approx}, {s.config.fisher_type} Fisher, the query on {s.config.query_draws} draws, "
          f"attribution seed {s.config.seed})")
    # both ends and the magnitude at the default damping: is the query's class at the top, at the bottom, or both?
    ends = {"top-10": [], "bottom-10": [], "top-10 by |score|": []}
    for y, r in zip(qlab, raws, strict=True):
        sc = r.methods[meth].scores
        ends["top-10"].append(agreement(sc, labels, y))
        ends["bottom-10"].append(agreement(-sc, labels, y))
        ends["top-10 by |score|"].append(agreement(np.abs(sc), labels, y))
    print(f"  default damping {raws[0].methods[meth].damping:g}: " + ", ".join(f"{k} {np.mean(v):.3f}" for k, v in ends.items()))
    lo, hi = bootstrap_ci(ends["top-10"])
    print(f"  top-10 95% bootstrap interval over the {len(qs)} queries (each query one unit): [{lo:.3f}, {hi:.3f}]")
    record = {
        "config": {"preset": s.preset.name, "checkpoint_hash": s.checkpoint_hash, "method": meth,
                   "attribution": dataclasses.asdict(s.config), "argv": list(sys.argv[1:] if argv is None else argv)},
        "gallery": {"queries": len(qs), "labels": [int(x) for x in qlab], "damping": raws[0].methods[meth].damping,
                    "per_query": {k: [float(x) for x in v] for k, v in ends.items()},
                    "top10": float(np.mean(ends["top-10"])), "ci95": [float(lo), float(hi)]},
    }
    if args.witness:
        witness(s, clf, qs, qlab, qprob, [r.methods[meth].scores for r in raws], labels)
    if args.float_bank:
        float_bank_agreement(s, qlab, labels, [r.methods["kfac"].scores for r in raws])
    if args.by_stage:
        stage_agreement(s, qs, qlab, labels, [r.methods["kfac"].scores for r in raws])
    if args.relative:
        lam = raws[0].methods["kfac"].damping
        norm = np.sqrt(self_influence(s, lam))
        rel = [agreement(r.methods["kfac"].scores / norm, labels, y) for y, r in zip(qlab, raws, strict=True)]
        share = [np.mean(np.isin(np.argsort(-r.methods["kfac"].scores)[:10], np.argsort(-norm)[: len(norm) // 10]))
                 for r in raws]
        print(f"  relative (influence / sqrt(self-influence)), damping {lam:g}: top-10 {np.mean(rel):.3f}; "
              f"share of the plain top-10 among the 10% largest self-influences: {np.mean(share):.2f}")
    for lam in (float(x) for x in args.dampings.split(",")):
        fr = [agreement(s.rescore(r, {meth: lam}).methods[meth].scores, labels, y) for y, r in zip(qlab, raws, strict=True)]
        print(f"  damping {lam:g}: {np.mean(fr):.3f}")
    for qm in (int(x) for x in args.query_draws.split(",") if x.strip()):
        fr = [agreement(s.query(q, "loss", methods=[meth], mc_samples=qm).methods[meth].scores, labels, y)
              for y, q in zip(qlab, qs, strict=True)]
        print(f"  query gradient with {qm} draws (default damping): {np.mean(fr):.3f}")
    if args.real:
        real_agreement(s, labels, args.real)
    fresh = fresh_samples(s, args.fresh, args.fresh_seed) if args.fresh else None
    if fresh is not None:
        record["fresh"] = fresh_agreement(s, clf, labels, fresh, args.fresh_seed)
    if args.ensemble_seeds:
        ensemble_agreement(args, s, clf, labels, torch.stack([q.image for q in qs]), fresh)
    for meas in (x.strip() for x in args.measurements.split(",") if x.strip()):
        fr = [agreement(s.query(q, meas, methods=["kfac"]).methods["kfac"].scores, labels, y)
              for y, q in zip(qlab, qs, strict=True)]
        print(f"  measurement {meas} (default damping): {np.mean(fr):.3f}")
    if args.out:
        from engine.files import save_json

        save_json(Path(args.out), record)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
