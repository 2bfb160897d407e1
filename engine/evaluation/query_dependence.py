"""How much does a method's ranking depend on the query?  Measured over a set of queries' score vectors.

Why: an attribution method whose strongest proponents are the same training images for every query
says something about the training set (images with large or aligned gradients), not about the query.
On the mnist model D-TRAK's top-20 removal sets for two different gallery samples came out identical
in the retrain-top run; over the 32 shipped gallery samples its score vectors correlate at +0.99.  The
app flags such a method beside its column, so a viewer does not read a fixed list as an explanation.

For Q queries' score vectors s_q over the N training images:

* top-k overlap: the mean over query pairs of |top_k(s_p) & top_k(s_q)| / k.  Two independent random
  sets overlap by k / N on average, the chance level;
* score correlation: the mean pairwise Pearson correlation of the s_q;
* distinct: the number of distinct training images in all Q top-k sets together (k Q when no two share).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DependenceConfig:
    """``top``: the k of the top-k sets.  ``flag_overlap``: a method whose queries share at least this
    fraction of their top-k on average is flagged as (nearly) query-independent; 0.5 is more than ten
    times chance for k = 20 at any N >= 400, and far above every method on the digits model (<= 0.04)."""

    top: int = 20
    flag_overlap: float = 0.5


@dataclass(frozen=True)
class Dependence:
    """One method's statistics over ``queries`` queries (module docstring), for top-k sets of ``top``."""

    top: int
    queries: int
    n_train: int
    top_overlap: float
    pearson: float
    distinct: int

    @property
    def chance_overlap(self) -> float:
        """The expected overlap of two independent random top-k sets: k / N."""
        return self.top / self.n_train


def dependence(scores: np.ndarray, top: int) -> Dependence:
    """``scores`` (Q, N), one row per query -> the three statistics of the module docstring."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] < 2:
        raise ValueError(f"needs at least two queries' score vectors as a (Q, N) array, got shape {scores.shape}")
    q, n = scores.shape
    if not 1 <= top <= n:
        raise ValueError(f"top must be in 1..{n} (the number of training images), got {top}")
    sets = [set(np.argsort(-row, kind="stable")[:top].tolist()) for row in scores]
    overlap = [len(a & b) / top for a, b in itertools.combinations(sets, 2)]
    r = np.corrcoef(scores)[np.triu_indices(q, 1)]
    return Dependence(top=top, queries=q, n_train=n, top_overlap=float(np.mean(overlap)),
                      pearson=float(np.nanmean(r)), distinct=len(set().union(*sets)))


def mean_pairwise_cosine(vectors: np.ndarray) -> float:
    """Mean cosine over the distinct pairs of the rows of ``vectors`` (Q, P).  Why: a method's scores are
    (preconditioned) inner products with the query's gradient, so queries whose gradients all point one
    way get one ranking; this tells whether a query-independent ranking starts at the query's gradient."""
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] < 2:
        raise ValueError(f"needs at least two vectors as a (Q, P) array, got shape {v.shape}")
    norms = np.linalg.norm(v, axis=1)
    if np.any(norms == 0):
        raise ValueError("a zero vector has no direction")
    u = v / norms[:, None]
    return float(np.mean((u @ u.T)[np.triu_indices(v.shape[0], 1)]))


def gallery_dependence(pg: Any, methods: list[str] | None = None,
                       top: int = DependenceConfig.top) -> dict[str, Dependence]:
    """The dependence of ``methods`` (default: all it holds) over a ``PrecomputedGallery``'s queries
    (``engine.attribution.precomputed``): the shipped gallery scores at the default settings, so nothing
    is recomputed.  Pass ``pg.methods_for(session)`` to use only scores that belong to a live session."""
    queries = sorted(pg.rows)
    if len(queries) < 2:
        return {}
    names = pg.methods() if methods is None else methods
    return {m: dependence(np.stack([pg.scores(i, m).astype(np.float64) for i in queries]), top) for m in names}


def flagged(deps: dict[str, Dependence], config: DependenceConfig = DependenceConfig()) -> dict[str, Dependence]:
    """The methods whose rankings barely depend on the query (mean top-k overlap >= ``config.flag_overlap``)."""
    return {m: d for m, d in deps.items() if d.top_overlap >= config.flag_overlap}
