"""How often a method's strongest proponents share the query's label, over the shipped gallery.

Why: beside K-FAC's column of 8s, a demo viewer sees TRAK's proponents of mixed labels and cannot tell whether
that is this one query or how the method does on this model (QA 47 #8: on mnist TRAK's top-10 share the query's
label 41% of the time, K-FAC's 73%).  The bench measures it from live scores (``engine.bench.attribution.
label_agreement``, README's tables); this measures it from the gallery's precomputed scores, which every page
already holds and whose key ties them to the served model (``PrecomputedGallery.methods_for``), so the page can say
it for the model it serves, without a query being run.

For gallery sample q with label y_q (the classifier's guess stored with the gallery, ``gallery.npz``), a method's
scores s_q over the N training images and their labels l_i:

    share_q = |{i in top_k(s_q) : l_i = y_q}| / k,      agreement = mean_q share_q,

with a 95% percentile bootstrap over the queries (``stats.bootstrap_ci``: each query's top-k is one unit; its k
labels are not independent), and the chance level mean_q |{i : l_i = y_q}| / N.  top_k is the k largest scores:
the strongest proponents of eq. 6 (tau_i > 0: removing image i raises the query's loss) or a similarity method's
most similar images.  It is a sanity check of the kind of the paper's qualitative figures, not a counterfactual
measure: a similarity method scores well on it by construction (look-alikes share labels), and the labels of
generated samples are a classifier's guesses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .stats import bootstrap_ci

TOP = 10  # the bench's k (README's "top-10 label agreement")


@dataclass(frozen=True)
class LabelAgreement:
    """One method's agreement over ``queries`` gallery samples (module docstring)."""

    method: str
    top: int
    queries: int
    share: float
    ci95: tuple[float, float]
    chance: float


def top_shares(scores: np.ndarray, train_labels: np.ndarray, query_labels: np.ndarray, top: int = TOP) -> np.ndarray:
    """(Q,) share_q of the module docstring for ``scores`` (Q, N), one row per query; ties keep the lower index."""
    scores = np.asarray(scores, dtype=np.float64)
    train_labels, query_labels = np.asarray(train_labels), np.asarray(query_labels)
    if scores.ndim != 2 or scores.shape != (len(query_labels), len(train_labels)):
        raise ValueError(f"scores must be (queries, training images) = ({len(query_labels)}, {len(train_labels)}), "
                         f"got shape {scores.shape}")
    if not 1 <= top <= scores.shape[1]:
        raise ValueError(f"top must be in 1..{scores.shape[1]} (the number of training images), got {top}")
    best = np.argsort(-scores, axis=1, kind="stable")[:, :top]
    return (train_labels[best] == query_labels[:, None]).mean(axis=1)


def agreement(method: str, scores: np.ndarray, train_labels: np.ndarray, query_labels: np.ndarray,
              top: int = TOP) -> LabelAgreement:
    """``top_shares`` summarised: their mean, its bootstrap interval and the chance level."""
    return summarise(method, top_shares(scores, train_labels, query_labels, top), train_labels, query_labels, top)


def summarise(method: str, shares: np.ndarray, train_labels: np.ndarray, query_labels: np.ndarray,
              top: int = TOP) -> LabelAgreement:
    """Per-query shares (Q,) as a ``LabelAgreement``: their mean, its 95% percentile bootstrap over the queries and
    the chance level mean_q |{i : l_i = y_q}| / N.  For shares made elsewhere too: the bench's come from the
    lists a reader sees (``MethodResult.top``: a compressed bank's exact scores first), not from ``top_shares``."""
    shares = np.asarray(shares, dtype=np.float64)
    lo, hi = bootstrap_ci(shares)
    return LabelAgreement(method, top, len(shares), float(shares.mean()), (lo, hi),
                          chance_level(train_labels, query_labels))


def chance_level(train_labels: np.ndarray, query_labels: np.ndarray) -> float:
    """mean_q |{i : l_i = y_q}| / N: a random top-k's expected share."""
    return float(np.mean([(np.asarray(train_labels) == y).mean() for y in query_labels]))


def gallery_label_agreement(pg: Any, methods: list[str], train_labels: np.ndarray | None,
                            gallery_labels: dict[int, int | None], top: int = TOP) -> dict[str, LabelAgreement]:
    """Each of ``methods`` over a ``PrecomputedGallery``'s samples (pass ``pg.methods_for(session)``: only scores
    that belong to the live session), at the settings the file holds (the defaults).  ``gallery_labels``: gallery
    index -> its label (None: unlabelled, left out).  A sample a method could not score (a blank sample's pixel
    similarity) is left out of that method's mean.  Empty without training labels or with fewer than two labelled
    samples: a mean over one query has no interval worth showing."""
    if train_labels is None:
        return {}
    labelled = [i for i in sorted(pg.rows) if gallery_labels.get(i) is not None]
    if len(labelled) < 2:
        return {}
    out: dict[str, LabelAgreement] = {}
    for m in methods:
        rows = [(i, pg.scores(i, m)) for i in labelled]
        rows = [(i, s) for i, s in rows if s is not None]
        if len(rows) < 2:
            continue
        out[m] = agreement(m, np.stack([s for _, s in rows]), train_labels,
                           np.asarray([gallery_labels[i] for i, _ in rows]), top)
    return out
