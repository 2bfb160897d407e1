"""One query's scores as tables for the plots and the CSV (no Streamlit, no maths).

The comparisons themselves (rank correlations, top-k overlaps, label counts) are the engine's
(``engine.evaluation.compare``); this module only puts them in pandas frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from engine.attribution.results import QueryResult
from engine.evaluation import compare
from engine.evaluation.compare import scored_methods

__all__ = ["estimated_note", "format_score", "score_table", "scored_methods", "spearman_matrix", "topk_estimated_note",
           "topk_label_counts", "topk_overlap"]


def score_table(result: QueryResult, names: Sequence[str], labels: np.ndarray | None,
                ids: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per training image: index, label, its id (``ids``: an image folder's file path, given when known;
    QA 33: the CSV of a folder data set could not be mapped back to its files), one column of scores per method,
    and for a method whose scores are partly estimates (a compressed bank's: only its re-ranked candidates are
    exact) a column ``<method>_exact`` saying which are exact."""
    names = scored_methods(result, names)
    n = len(result.methods[names[0]].scores) if names else (0 if labels is None else len(labels))
    table = pd.DataFrame({"index": np.arange(n)})
    table["label"] = labels[:n] if labels is not None else pd.NA
    if ids is not None:
        table["id"] = list(ids)[:n]
    for name in names:
        table[name] = np.asarray(result.methods[name].scores, dtype=np.float64)
        exact = result.methods[name].exact
        if exact is not None:
            table[f"{name}_exact"] = np.asarray(exact, dtype=bool)
    return table


def estimated_note(result: QueryResult, names: Sequence[str], titles: dict[str, str]) -> str | None:
    """A sentence naming the methods among ``names`` whose scores are partly estimates (a compressed K-FAC
    bank's non-candidates) and how many, for the captions of plots and correlations over all N: those
    figures include the estimates, and a reader must not take them for figures of exact scores."""
    parts = []
    for n in scored_methods(result, names):
        exact = result.methods[n].exact
        if exact is not None and (~exact).any():
            parts.append(f"{titles.get(n, n)} {int((~exact).sum())} of {len(exact)}")
    if not parts:
        return None
    return ("Estimated scores included (compressed bank, rescaled to the exact ones; only the re-ranked "
            f"candidates are exact): {', '.join(parts)}. Figures over all training images are approximate.")


def topk_estimated_note(result: QueryResult, names: Sequence[str], k: int, titles: dict[str, str]) -> str | None:
    """The top-k plots' note on a compressed bank's estimates (QA 64 F4: the distributions and the scatter had
    one, these two none): which methods' top-k, taken as the grids list it (``MethodResult.top``: the re-ranked
    candidates' exact scores first), hold estimates and how many; or, where a method has estimates but its top-k
    none, that the top-k are exact.  None when no method among ``names`` has an estimate."""
    estimated, exact = [], []
    for n in scored_methods(result, names):
        r = result.methods[n]
        if r.exact is None or bool(np.all(r.exact)):
            continue
        count = sum(1 for x in r.top(k) if not x.exact)
        (estimated if count else exact).append(f"{titles.get(n, n)} {count} of {k}" if count else titles.get(n, n))
    parts = []
    if estimated:
        parts.append(f"Estimated scores in the top-{k} (compressed bank, outside the re-ranked candidates; "
                     f"marked ≈ in the grids): {', '.join(estimated)}.")
    if exact:
        parts.append(f"The top-{k} of {', '.join(exact)} are exact scores (re-ranked candidates), as in the grids.")
    return " ".join(parts) or None


def spearman_matrix(result: QueryResult, names: Sequence[str]) -> pd.DataFrame:
    """Spearman rank correlation of every pair of methods' scores over all training images."""
    names, m = compare.spearman_matrix(result, names)
    return pd.DataFrame(m, index=names, columns=names)


def topk_overlap(result: QueryResult, names: Sequence[str], k: int) -> pd.DataFrame:
    """Fraction of shared training images between the top-k sets (highest scores: proponents / most similar),
    each the one its grid shows (``compare.top_indices``)."""
    names, m = compare.topk_overlap(result, names, k)
    return pd.DataFrame(m, index=names, columns=names)


def topk_label_counts(
    result: QueryResult, names: Sequence[str], k: int, labels: np.ndarray, class_names: Sequence[str] | None
) -> pd.DataFrame:
    """Long table (method, label, count) of the labels among each method's top-k."""
    rows = compare.topk_label_counts(result, names, k, labels, class_names)
    return pd.DataFrame(rows, columns=["method", "label", "count"])


def format_score(x: float) -> str:
    """Short signed scientific notation: scores span many orders of magnitude across methods."""
    return f"{x:+.2e}"
