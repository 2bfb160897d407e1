"""Comparisons of the methods' answers to one query: rank correlations, top-k overlaps, the
labels among each method's top-k.  The app plots them and the CLI or a script can reuse them;
rank correlations use ``stats.spearman``, the LDS's definition.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..attribution.results import QueryResult
from .stats import spearman


def scored_methods(result: QueryResult, names: Sequence[str]) -> list[str]:
    """The names among ``names`` whose result has scores (status ok)."""
    out = []
    for n in names:
        r = result.methods.get(n)
        if r is not None and r.status == "ok" and r.scores is not None:
            out.append(n)
    return out


def top_indices(result: QueryResult, name: str, k: int) -> list[int]:
    """Method ``name``'s top-k training indices as its list shows them (``MethodResult.top``: a compressed bank's
    exact re-ranked scores first, then the rest by score; ties by index).  A plain sort of the scores ranked a
    compressed bank's estimates among them, so the overlap and label plots counted images the grids do not show
    and dropped ones they do (QA 64 F4)."""
    return [x.index for x in result.methods[name].top(k)]


def spearman_matrix(result: QueryResult, names: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(methods with scores, their pairwise Spearman correlations over all training images)."""
    names = scored_methods(result, names)
    m = np.eye(len(names))
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            m[i, j] = m[j, i] = spearman(result.methods[a].scores, result.methods[names[j]].scores)
    return names, m


def topk_overlap(result: QueryResult, names: Sequence[str], k: int) -> tuple[list[str], np.ndarray]:
    """(methods with scores, fraction of shared training images between every pair's top-k, ``top_indices``)."""
    names = scored_methods(result, names)
    tops = {n: set(top_indices(result, n, k)) for n in names}
    m = np.array([[len(tops[a] & tops[b]) / max(k, 1) for b in names] for a in names], dtype=float)
    return names, m


def topk_label_counts(
    result: QueryResult, names: Sequence[str], k: int, labels: np.ndarray, class_names: Sequence[str] | None
) -> list[dict[str, object]]:
    """Rows {method, label, count}: how often each label occurs among each method's top-k (``top_indices``)."""
    rows: list[dict[str, object]] = []
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    for name in scored_methods(result, names):
        idx = np.asarray(top_indices(result, name, k), dtype=np.int64)
        counts = np.bincount(labels[idx], minlength=n_classes)
        for c, count in enumerate(counts):
            rows.append({"method": name, "label": class_names[c] if class_names else str(c), "count": int(count)})
    return rows
