"""Summaries of one query's scores for the plots and the CSV (no Streamlit, no tensors).

Everything here reads the score arrays a ``QueryResult`` already holds; rank
correlations come from ``engine.evaluation.stats.spearman`` so the app and the LDS use one
definition.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from engine.attribution.results import QueryResult


def scored_methods(result: QueryResult, names: Sequence[str]) -> list[str]:
    """The names among ``names`` whose result has scores (status ok)."""
    out = []
    for n in names:
        r = result.methods.get(n)
        if r is not None and r.status == "ok" and r.scores is not None:
            out.append(n)
    return out


def score_table(result: QueryResult, names: Sequence[str], labels: np.ndarray | None) -> pd.DataFrame:
    """One row per training image: index, label, one column of scores per method."""
    names = scored_methods(result, names)
    n = len(result.methods[names[0]].scores) if names else (0 if labels is None else len(labels))
    table = pd.DataFrame({"index": np.arange(n)})
    table["label"] = labels[:n] if labels is not None else pd.NA
    for name in names:
        table[name] = np.asarray(result.methods[name].scores, dtype=np.float64)
    return table


def spearman_matrix(result: QueryResult, names: Sequence[str]) -> pd.DataFrame:
    """Spearman rank correlation of every pair of methods' scores over all training images."""
    from engine.evaluation.stats import spearman

    names = scored_methods(result, names)
    m = np.eye(len(names))
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            m[i, j] = m[j, i] = spearman(result.methods[a].scores, result.methods[names[j]].scores)
    return pd.DataFrame(m, index=names, columns=names)


def top_indices(scores: np.ndarray, k: int, largest: bool = True) -> np.ndarray:
    order = np.argsort(-scores if largest else scores, kind="stable")
    return order[:k]


def topk_overlap(result: QueryResult, names: Sequence[str], k: int) -> pd.DataFrame:
    """Fraction of shared training images between the top-k sets (proponents / most similar)."""
    names = scored_methods(result, names)
    tops = {n: set(top_indices(result.methods[n].scores, k).tolist()) for n in names}
    m = np.array([[len(tops[a] & tops[b]) / max(k, 1) for b in names] for a in names], dtype=float)
    return pd.DataFrame(m, index=names, columns=names)


def topk_label_counts(
    result: QueryResult, names: Sequence[str], k: int, labels: np.ndarray, class_names: Sequence[str] | None
) -> pd.DataFrame:
    """Long table (method, label, count) of the labels among each method's top-k."""
    rows = []
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    for name in scored_methods(result, names):
        idx = top_indices(result.methods[name].scores, k)
        counts = np.bincount(labels[idx], minlength=n_classes)
        for c, count in enumerate(counts):
            rows.append({"method": name, "label": class_names[c] if class_names else str(c), "count": int(count)})
    return pd.DataFrame(rows, columns=["method", "label", "count"])


def format_score(x: float) -> str:
    """Short signed scientific notation: scores span many orders of magnitude across methods."""
    return f"{x:+.2e}"
