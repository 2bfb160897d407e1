"""Many queries at once: query sets (the gallery, a generated pool) and their attribution matrix.

The reverse direction of attribution ("which outputs does this group of training images
support?") needs the scores of *every* query against every training image, the matrix

    T[q, i] = tau_i(q) = (1/N) grad m(q)^T (G + lambda I)^{-1} grad l(x_i)     (paper eqs. 5-6)

of shape (Q, N).  Q separate queries would pass over the K-FAC bank Q times; here the Q
query gradients are computed in batches (``per_example_grads`` with the session's common
random numbers, the same draws as a single query), and each method scores all of them in
one batched product (``engine.attribution.batch.score_batch``: for K-FAC, the Q rotated and damped
queries against the int8 eigenbasis bank in one ``Rows.inner_many`` pass).  Row q is therefore
the same vector a single ``session.query`` of that image returns (tests check it).

A generated pool is N samples drawn on demand from the checkpoint (no trajectories kept),
cached on disk as ``pool_<checkpoint hash>_s<seed>_n<N>.npz``; its matrices are cached
beside it, keyed by the method's cache keys, the measurement, the damping and M.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..files import atomic_write_bytes, save_json
from ..model.diffusion import MCDraws, check_sample_seed
from ..model.measurements import Measurement, parse_measurement
from ..npy_read import load_npy, load_npz
from .batch import score_batch
from .methods.base import QUERY, SERVER, ExactGroupScores, Unavailable, no_progress
from .query import QueryInput

Progress = Callable[[str, float], None]
POOL_BATCH = 64  # samples drawn at once (sample i's noise depends only on (seed, i); its last float bits on the batch)
BATCHED_KINDS = ("loss", "loss@t", "square-norm")  # measurements whose gradient is a per-example loss


class GradientCache(Protocol):
    """Where ``attribution_matrix`` keeps a query set's gradients between calls (the app: a bounded LRU)."""

    def get(self, key: Any) -> torch.Tensor | None: ...

    def put(self, key: Any, value: torch.Tensor) -> None: ...


class PoolError(ValueError):
    """A query-set spec or pool request that cannot be served; the message says why."""


@dataclass
class QuerySet:
    """Q query images with names (``gallery:3``, ``pool:17``) and classifier labels (-1: none)."""

    name: str  # "gallery" | "pool:256"
    queries: list[QueryInput]
    key: str  # identity of the images (cache key of their matrices)
    seconds: float = 0.0  # time to draw them in this call (0 when loaded from the cache)
    drawn_seconds: float = 0.0  # time it took to draw them when they were drawn (recorded in the cache)
    seed: int | None = None  # a generated pool's seed (None: the gallery)

    def identity(self) -> dict[str, Any]:
        """What names these queries in an export: the set, its images' key and, for a pool, its seed, so a
        script can ask about one of them again (``query --query pool:I --pool-seed S``; QA round 20)."""
        return {"queries": self.name, "queries_key": self.key, **({"pool_seed": self.seed} if self.seed is not None else {})}

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def names(self) -> list[str]:
        return [q.description for q in self.queries]

    @property
    def labels(self) -> np.ndarray:
        return np.array([-1 if q.label is None else int(q.label) for q in self.queries], dtype=np.int64)

    @property
    def images(self) -> torch.Tensor:
        return torch.stack([q.image for q in self.queries])  # type: ignore[misc]


@dataclass
class MatrixResult:
    """One method's (Q, N) score matrix over a query set (docs/architecture.md §4: sign and scale)."""

    name: str
    kind: str  # influence | similarity
    status: str  # ok | unavailable | error
    reason: str | None = None
    reason_about: str | None = None  # "server" | "query", as ``MethodResult.reason_about``
    damping: float | None = None
    scores: np.ndarray | None = None  # (Q, N) float32
    timing_ms: dict[str, float] = field(default_factory=dict)
    # set when ``scores`` are an estimate (K-FAC with a compressed bank): the group views' exact sums and
    # member scores (``AttributionMethod.exact_group_scores``)
    exact: ExactGroupScores | None = None
    # the measurement the method scored, when it is not the one asked for (D-TRAK: always the square norm)
    measurement: str | None = None
    # as ``MethodResult``'s: a line when the scores weigh numerical rounding at this damping (K-FAC below its
    # factors' resolution floor), and that floor (``AttributionMethod.damping_warning``/``damping_floor``)
    warning: str | None = None
    damping_floor: float | None = None


# --- query sets ------------------------------------------------------------------------


def _images_key(images: torch.Tensor) -> str:
    return hashlib.sha256(np.ascontiguousarray(images.detach().cpu().float().numpy()).tobytes()).hexdigest()[:16]


def gallery_set(session: Any) -> QuerySet:
    """The checkpoint's 32-sample gallery as a query set (with trajectories)."""
    items = session.gallery()
    if not items:
        raise PoolError(f"no gallery beside the checkpoint {session.checkpoint}; use pool:N instead")
    queries = [session.parse_query(f"gallery:{g.index}") for g in items]
    return QuerySet("gallery", queries, "gallery-" + _images_key(torch.stack([q.image for q in queries])))


def pool_path(pool_dir: str | Path, checkpoint_hash: str, seed: int, n: int) -> Path:
    """Where the pool of ``n`` samples drawn with ``seed`` from the model ``checkpoint_hash`` is cached: named by
    all three, so another model's or seed's pool is never read for this one."""
    return Path(pool_dir) / f"pool_{checkpoint_hash}_s{int(seed)}_n{int(n)}.npz"


def generate_pool(
    session: Any,
    n: int,
    seed: int = 0,
    pool_dir: str | Path | None = None,
    progress: bool | Progress = True,
) -> QuerySet:
    """N samples of the session's model, drawn in batches of 64 (tqdm bar, or a callback), cached.

    Cached by (checkpoint hash, seed, N) in ``pool_dir`` (default: the session's cache root
    / pools); a cached pool loads in milliseconds.  Labels come from the preset's classifier
    where there is one (digits, mnist).
    """
    if n < 1:
        raise PoolError(f"a pool needs at least one sample, got {n}")
    check_sample_seed(seed, n, "pool seed (--pool-seed)")  # before the bar, as sampling.generate
    folder = Path(pool_dir) if pool_dir is not None else Path(session.cache_root) / "pools"
    path = pool_path(folder, session.checkpoint_hash, seed, n)
    seconds = 0.0
    labels = None
    if path.is_file():
        with load_npz(path) as z:
            images = torch.from_numpy(np.asarray(z["images"], dtype=np.float32))
            labels = np.asarray(z["labels"], dtype=np.int64) if "labels" in z else None  # None: drawn, not labelled
            drawn = float(z["seconds"]) if "seconds" in z else 0.0
        if labels is not None and labels.size and (labels < 0).all() and _has_classifier(session):
            labels = None  # kept unlabelled by a version that labelled digits' pools only (QA 63 F1): label it now
    else:
        from ..model.sampling import image_shape

        t0 = time.perf_counter()
        total = session.diffusion.T * -(-n // POOL_BATCH)  # one callback per step per batch
        bar = None
        if progress is True:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=f"pool of {n}", unit="step")
        calls = [0]

        def cb(step: int, _total: int) -> None:
            calls[0] += 1
            if bar is not None:
                bar.update(1)
            elif callable(progress) and calls[0] % 10 == 0:
                progress(f"drawing a pool of {n} samples", calls[0] / total)

        # sample i's noise depends only on (seed, i), whatever the batch size (Diffusion.sample)
        x, _ = session.diffusion.sample(
            session.model, n, image_shape(session.preset), int(seed), device=session.device,
            batch_size=POOL_BATCH, progress=cb,
        )
        if bar is not None:
            bar.close()
        parts = [x.detach().cpu().float().clamp(-1.0, 1.0)]
        images = torch.cat(parts)
        seconds = drawn = time.perf_counter() - t0  # the draw alone (group-bench reports it as the pool's cost)
        # saved before the labels: fitting the classifier takes 2-10 s, and a Ctrl-C then lost the whole
        # pool, minutes of sampling (QA 27 #3)
        _save_pool(path, images, None, seed, seconds)
    if labels is None:
        if _has_classifier(session):
            say = progress if callable(progress) else None
            if say is not None:
                say(f"labelling the pool with the {session.preset.data.name} classifier", 1.0)
            elif progress:
                print(f"pool of {n}: labelling it with the {session.preset.data.name} classifier (a few seconds)",
                      file=sys.stderr, flush=True)
        labels = _classify(session, images)
        _save_pool(path, images, labels, seed, drawn)
    queries = []
    for i in range(n):
        lab = None if labels[i] < 0 else int(labels[i])
        notes = [f"pool sample {i} (pool seed {seed}, {n} samples)"]
        queries.append(QueryInput(image=images[i], trajectory=None, description=f"pool:{i}", label=lab, notes=notes,
                                  origin={"pool_seed": int(seed), "pool_size": int(n)}))
    return QuerySet(f"pool:{n}", queries, f"pool-{session.checkpoint_hash}-s{seed}-n{n}", seconds, drawn, int(seed))


def pool_query(session: Any, index: int, seed: int = 0, pool_dir: str | Path | None = None, n: int | None = None,
               progress: bool | Progress = True) -> QueryInput:
    """Sample ``index`` of the generated pool of ``seed`` (``pool:I`` in group, reverse and copy-check output),
    as one query: a sample those commands flagged can be looked at on its own.

    It is read from the cached pool, the very image their scores were computed on.  Sample i depends only
    on (seed, i), but a pool drawn in other batches may differ from it in the last float bits, so with
    cached pools of several sizes holding it ``n`` must say which; with ``n`` the pool of that size is
    used, drawn first if it is not cached."""
    folder = Path(pool_dir) if pool_dir is not None else Path(session.cache_root) / "pools"
    if index < 0:
        raise PoolError(f"pool sample index must be 0 or more, got {index}")
    if n is None:
        tails = (f.stem.rsplit("_n", 1)[1] for f in folder.glob(f"pool_{session.checkpoint_hash}_s{int(seed)}_n*.npz"))
        sizes = sorted(int(t) for t in tails if t.isdigit())
        holding = [k for k in sizes if k > index]
        if not holding:
            raise PoolError(
                f"no cached pool of seed {seed} of this model in {folder} holds sample {index}"
                + (f" (sizes cached: {', '.join(map(str, sizes))})" if sizes else "")
                + f": draw one with `group`/`reverse --queries pool:N --pool-seed {seed}`, or give the size "
                "(--pool-size N) to draw it here"
            )
        if len(holding) > 1:
            raise PoolError(
                f"pools of seed {seed} of sizes {', '.join(map(str, holding))} hold sample {index}; say which "
                "with --pool-size N (the same sample drawn in other batches may differ in its last float bits)"
            )
        n = holding[0]
    if not 0 <= index < n:
        raise PoolError(f"pool sample index {index} out of range 0..{n - 1} for a pool of {n}")
    return generate_pool(session, n, seed, folder, progress).queries[index]


def _save_pool(path: Path, images: torch.Tensor, labels: np.ndarray | None, seed: int, seconds: float) -> None:
    """The pool's file, written atomically; without ``labels`` until the classifier has given them."""
    arrays = {"images": images.numpy(), "seed": np.array(seed), "seconds": np.array(seconds)}
    if labels is not None:
        arrays["labels"] = labels
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _has_classifier(session: Any) -> bool:
    """Whether the preset labels its samples (digits, mnist: ``label_classifier.has_classifier``), not fitted yet.
    Not digits alone (QA 63 F1: mnist's pool samples had no labels while its gallery and ``generate:`` had, and
    the Groups page said mnist had no classifier)."""
    from ..model.label_classifier import has_classifier

    return has_classifier(session.preset, session.dataset)


def _classify(session: Any, images: torch.Tensor) -> np.ndarray:
    """The preset's classifier labels (the one single samples get, ``QuerySources.classifier``) for display and
    the class checks; -1 where there is no classifier."""
    clf = session.sources.classifier() if _has_classifier(session) else None
    if clf is None:
        return np.full(len(images), -1, dtype=np.int64)
    from ..model.label_classifier import classify

    labels, _ = classify(clf, images)
    return np.asarray(labels, dtype=np.int64)


def pool_size_of(spec: str, seed: int = 0) -> int | None:
    """The N of ``pool:N`` (its seed checked too), None for ``gallery``; PoolError for anything else.  Nothing is
    drawn: a caller checks the set before slower checks and work."""
    text = (spec or "").strip().lower()
    if text == "gallery":
        return None
    kind, sep, arg = text.partition(":")
    if kind == "pool" and sep:
        try:
            n = int(arg)
        except ValueError:
            raise PoolError(f"bad pool size {arg!r} in {spec!r}: expected pool:N, e.g. pool:256") from None
        if not 1 <= n <= 100_000:
            raise PoolError(f"pool size must be in 1..100000, got {n}")
        check_sample_seed(seed, n, "pool seed (--pool-seed)")
        return n
    raise PoolError(f"bad query set {spec!r}: expected gallery or pool:N (e.g. pool:256)")


def parse_query_set(session: Any, spec: str, pool_dir: str | Path | None = None, seed: int = 0,
                    progress: bool | Progress = True) -> QuerySet:
    """``gallery`` | ``pool:N`` -> QuerySet (a pool is drawn on first use, then cached)."""
    n = pool_size_of(spec, seed)
    return gallery_set(session) if n is None else generate_pool(session, n, seed, pool_dir, progress)


# --- batched query gradients -------------------------------------------------------------


def query_gradients(
    session: Any,
    queries: list[QueryInput],
    measurement: Measurement,
    draws: MCDraws,
    batch: int | None = None,
    progress: Progress = no_progress,
) -> torch.Tensor:
    """(Q, P) gradients grad_theta m(theta, x_q) in ``ctx.params`` order, with the given draws.

    loss, loss@t and square-norm are per-example losses averaged over the draws, so they
    are computed ``batch`` images at a time with ``per_example_grads`` (the same numbers
    as ``session.query_gradient``; None: the context's ``compute.query_grad_batch``); other measurements
    (ELBO, trajectory) one at a time.
    """
    from .gradients import measurement_grad, per_example_grads

    ctx = session.ctx
    batch = int(ctx.compute.query_grad_batch if batch is None else batch)
    params = list(ctx.params)
    p = sum(t.numel() for _, t in params)
    out = torch.empty((len(queries), p), dtype=params[0][1].dtype)
    if measurement.kind in BATCHED_KINDS:
        if any(q.image is None for q in queries):
            raise PoolError(f"measurement {measurement} needs query images")
        d = draws
        if measurement.kind == "loss@t":
            d = MCDraws(torch.full_like(draws.t, int(measurement.t_idx)), draws.eps)
        loss = "square-norm" if measurement.kind == "square-norm" else "loss"
        for s in range(0, len(queries), batch):
            x = torch.stack([q.image for q in queries[s : s + batch]])  # type: ignore[misc]
            g = per_example_grads(session.model, session.diffusion, x, d, loss=loss, params=params)
            out[s : s + len(x)] = g.detach().cpu()
            progress(f"query gradients {s + len(x)}/{len(queries)}", (s + len(x)) / len(queries))
        return out
    for i, q in enumerate(queries):
        if measurement.kind == "trajectory" and q.trajectory is None:
            raise PoolError(
                f"{q.description} has no recorded trajectory; the trajectory measurement works on the gallery only"
            )
        session.model.eval()
        g = measurement_grad(session.model, session.diffusion, measurement, q, draws.to(session.device),
                             session.dataset.levels, params=params)
        out[i] = g.detach().cpu()
        progress(f"query gradients {i + 1}/{len(queries)}", (i + 1) / len(queries))
    return out


# --- the attribution matrix --------------------------------------------------------------


def _matrix_key(session: Any, qset: QuerySet, name: str, measurement: str, damping: float | None, m: int) -> str:
    """What a cached (Q, N) matrix was scored with.  The training data's key (its content digest) is part of
    it: a checkpoint that does not pin its data (a diffusers folder, read with any ``--data-root``) shares
    one pools folder across data sets, and without it one set's matrix was served for another's (QA 26)."""
    method = session.method(name)
    payload = [qset.key, name, measurement, damping, m, method.cache_keys(session.ctx), session.checkpoint_hash,
               session.store.data_key]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def attribution_matrix(
    session: Any,
    qset: QuerySet,
    measurement: str = "loss",
    methods: list[str] | None = None,
    damping: dict[str, float] | None = None,
    cache_dir: str | Path | None = None,
    progress: Progress = no_progress,
    gradient_cache: GradientCache | None = None,
    mc_samples: int | None = None,
) -> dict[str, MatrixResult]:
    """Every method's (Q, N) scores over the query set: batched gradients, one batched product each.

    Methods not built (and ``session.auto_build`` off: on, ``session.build_missing`` builds them first)
    or unavailable come back with a reason, as in ``session.query``.  With ``cache_dir`` each matrix is cached as .npy (atomic).
    ``gradient_cache`` (``get``/``put``, e.g. the app's bounded ``RecentResults``) keeps the query set's
    gradients per measurement across calls: the gradients do not depend on the damping, so a damping change
    costs one product per method, as a single query's ``rescore`` does.
    ``mc_samples``: the query's Monte Carlo draws M, as ``session.query`` takes it (None: the preset's); the app
    passes its sidebar's, which the Groups page and the reverse view ignored while the columns used it (QA 64
    F3).  The gradient and matrix caches are keyed by it already (``len(draws)``).
    """
    names = session._resolve_methods(methods)
    meas = parse_measurement(measurement, session.diffusion.T)
    damping = dict(damping or {})
    draws = session.query_draws(mc_samples)
    grads: dict[Measurement, tuple[torch.Tensor, float]] = {}
    timed: set[Measurement] = set()
    out: dict[str, MatrixResult] = {}
    built_now = session.build_missing(names) if session.auto_build else {}  # one shared pass, with a bar
    for k, name in enumerate(names):
        m = session.method(name)
        lam = session.damping_for(name, damping)
        res = MatrixResult(name=name, kind=m.kind, status="ok", damping=None if lam is None else float(lam))
        out[name] = res
        try:
            available, reason = m.availability(session.ctx)
        except Unavailable as e:
            available, reason = False, str(e)
        if not available:
            res.status, res.reason, res.reason_about = "unavailable", reason, SERVER
            continue
        if not m.is_built(session.ctx):
            res.status, res.reason = session.unbuilt_status(name, built_now)
            res.reason_about = SERVER if res.status == "unavailable" else None
            continue
        qm = m.query_measurement(meas)
        if qm is not None and qm != meas:
            res.measurement = str(qm)

        def gradients(qm: Measurement | None = qm, k: int = k, name: str = name) -> torch.Tensor | None:
            """The query set's gradients for ``qm``, computed once per measurement (None: no gradient)."""
            if qm is None:
                return None
            shared_key = (session.checkpoint_hash, qset.key, str(qm), len(draws))
            kept = None if qm in grads or gradient_cache is None else gradient_cache.get(shared_key)
            if kept is not None:
                grads[qm] = (kept, 0.0)
            if qm not in grads:
                t0 = time.perf_counter()

                def sub(msg: str, f: float) -> None:
                    progress(f"{name}: {msg}", (k + 0.9 * f) / len(names))

                grads[qm] = (query_gradients(session, qset.queries, qm, draws, progress=sub),
                             (time.perf_counter() - t0) * 1000.0)
                if gradient_cache is not None:
                    gradient_cache.put(shared_key, grads[qm][0])
            return grads[qm][0]

        res.exact = m.exact_group_scores(session.ctx, gradients, res.damping)
        path = None
        if cache_dir is not None:
            key = _matrix_key(session, qset, name, str(meas), res.damping, len(draws))
            path = Path(cache_dir) / f"matrix_{qset.key}_{name}_{key}.npy"
            recorded = _recorded_floor(path)
            if path.is_file() and recorded is not None:
                res.scores = load_npy(path)
                res.timing_ms["loaded"] = 0.0
                # the floor recorded with the matrix: the method's factors are not loaded on this path (QA 36 #1)
                floor = m.floor_or_recorded(recorded["damping_floor"])
                res.warning, res.damping_floor = m.damping_warning(res.damping, floor), floor
                continue
        try:
            g = gradients()
            if qm is not None and qm not in timed:  # the first method to use a measurement's gradients pays for
                res.timing_ms["gradients"] = grads[qm][1]  # them; the others share them (not counted twice)
                timed.add(qm)
            t0 = time.perf_counter()
            scores = np.asarray(score_batch(m, session.ctx, qset.queries, g, res.damping), dtype=np.float32)
            res.timing_ms["score"] = (time.perf_counter() - t0) * 1000.0
            if scores.shape != (len(qset), len(session.dataset)):
                raise RuntimeError(f"{name} returned scores of shape {scores.shape}")
            bad = session.non_finite_reason(m, scores)
            if bad is not None:  # as a single query's: group sums and reverse rankings never see NaN (QA 19)
                res.status, res.reason = "error", bad
                continue
            res.scores = scores
            res.warning, res.damping_floor = m.damping_warning(res.damping), m.damping_floor()
            if path is not None:
                buf = io.BytesIO()
                np.save(buf, scores)
                atomic_write_bytes(path, buf.getvalue())
                save_json(_floor_path(path), {"damping_floor": res.damping_floor})  # the matrix counts only with it
        except (Unavailable, PoolError) as e:  # a PoolError here is about the query set (no images to score)
            res.status, res.reason = "unavailable", str(e)
            res.reason_about = e.about if isinstance(e, Unavailable) else QUERY
        progress(f"{name}: scored {len(qset)} queries", (k + 1) / len(names))
    return out


def _floor_path(matrix: Path) -> Path:
    return matrix.with_suffix(".json")


def _recorded_floor(matrix: Path) -> dict[str, Any] | None:
    """What was recorded beside a cached matrix (``{"damping_floor": float | None}``), or None when there is no
    record, or it does not read: the matrix is then scored again (a matrix cached before the record existed
    carried no floor, and its answers no low-damping warning: QA 36 #1)."""
    try:
        rec = json.loads(_floor_path(matrix).read_text())
    except (OSError, ValueError):
        return None
    floor = rec.get("damping_floor") if isinstance(rec, dict) else None
    return rec if isinstance(rec, dict) and (floor is None or isinstance(floor, (int, float))) else None


# --- the reverse direction ---------------------------------------------------------------


@dataclass
class Supported:
    """One query of a reverse ranking: how much removing the group would raise its measurement."""

    query: str
    label: int | None
    change: float
    rank: int


def ranking_by_change(change: np.ndarray, qset: QuerySet, top_k: int | None = None) -> list[Supported]:
    """Queries sorted by their predicted change (Q,) if a group were removed, largest first (ties by index):
    the largest positive changes are the outputs the group supports most, removing it would make them least
    likely.  The change is the group's column sum of the (Q, N) matrix (``groups.group_change``) or, where
    the matrix is an estimate, the method's exact group sum (``GroupResult.changes``)."""
    change = np.asarray(change, dtype=np.float64)
    order = np.lexsort((np.arange(len(change)), -change))
    if top_k is not None:
        order = order[:top_k]
    labels = qset.labels
    return [
        Supported(qset.names[q], None if labels[q] < 0 else int(labels[q]), float(change[q]), r + 1)
        for r, q in enumerate(order)
    ]


__all__ = [
    "QuerySet",
    "MatrixResult",
    "PoolError",
    "Supported",
    "gallery_set",
    "generate_pool",
    "parse_query_set",
    "pool_path",
    "query_gradients",
    "attribution_matrix",
    "ranking_by_change",
]
