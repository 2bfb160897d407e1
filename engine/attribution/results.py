"""Plain result records passed from the engine to the CLI and the app (score arrays, no tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .methods.base import Prepared


@dataclass
class RankedItem:
    """One training image in a method's ranking: its index, its score (tau_i for influence, paper
    eq. 6; a cosine for similarity), its label where the data set has labels, and whether the score is
    exact or a compressed bank's estimate."""

    index: int  # training index
    score: float
    label: int | None
    exact: bool = True  # False: a compressed-bank approximation, not re-ranked (engine.attribution.compressed_bank)


@dataclass
class MethodResult:
    """One method's answer to one query.

    ``scores`` (N,) float32 over all training images: influence (docs/architecture.md §4 sign and scale,
    positive = proponent) or similarity (kind == "similarity").
    """

    name: str
    title: str
    kind: str  # influence | similarity
    caption: str
    status: str  # ok | unavailable | error
    reason: str | None = None
    # status "unavailable": whose problem the reason is, "server" (this installation lacks something: weights,
    # a cache) or "query" (this query cannot be scored by the method here: a blank image); methods.base.Unavailable
    reason_about: str | None = None
    damping: float | None = None
    scores: np.ndarray | None = None
    timing_ms: dict[str, float] = field(default_factory=dict)
    bank: str | None = None  # K-FAC: "stored" | "compressed" | "streamed"
    exact: np.ndarray | None = None  # (N,) bool: which scores are exact (None: all)
    exact_pending: bool = False  # the re-rank that makes the ends exact runs after this answer
    # the factor on the estimated entries, fitted on the exact ones (rerank.scale_estimates); None: unscaled
    estimate_scale: float | None = None
    # the measurement a gradient method scored (D-TRAK: always the square norm), under the key the group
    # commands' JSON uses (QA round 20: the query JSON said it in prose only); None for a similarity
    measurement: str | None = None
    # why these scores weigh numerical rounding at this damping (AttributionMethod.damping_warning); None: they do not
    warning: str | None = None
    damping_floor: float | None = None  # AttributionMethod.damping_floor: below it the scores weigh rounding


    def bank_note(self) -> str | None:
        """One line on where the scores come from (K-FAC's bank; None for other methods)."""
        if self.bank is None:
            return None
        if self.reason == "precomputed":  # how the shipped file was made, not a bank this server has (QA 23 #5)
            how = {"stored": "a stored int8 bank: every training image scored, none estimated",
                   # write_precomputed scores with the re-rank (it never defers it) but keeps no exact mask
                   "compressed": "a compressed bank, re-ranked to exact K-FAC scores at both ends"}
            return f"shipped scores, computed with {how.get(self.bank, f'a {self.bank} bank')}"
        if self.bank == "stored":  # int8 rows: computed for every image, none estimated, but rounded (~1e-3)
            return "stored int8 bank: every training image scored, none estimated"
        if self.bank != "compressed":
            return f"{self.bank} bank: every training image scored, none estimated"
        if self.exact_pending:
            done = 0 if self.exact is None else int(self.exact.sum())
            if done == 0:
                return "compressed bank: estimated scores (the exact ones are pending)"
            # short: it stands in a narrow column beside the query, above K-FAC's grid (a 7-line note pushed
            # the grid 200 px below the other methods' for the whole re-rank); the progress bar says it runs
            return f"compressed bank: re-ranking, {done} candidates exact so far (≈: estimated)"
        if self.exact is None or not self.exact.any():
            return "compressed bank: estimated scores (no re-ranking)"
        # "at both ends", not "the highest and lowest": the candidates are not split evenly (rerank.CandidateSplit)
        scaled = ("" if self.estimate_scale is None else
                  f" (the compressed scan x {self.estimate_scale:.3g}, the factor fitted on the exact ones)")
        return (f"compressed bank: {int(self.exact.sum())} candidates at both ends re-ranked to exact "
                f"K-FAC scores, the other {int((~self.exact).sum())} estimated{scaled}")

    def top(self, k: int, labels: np.ndarray | None = None) -> list[RankedItem]:
        """k largest scores: strongest proponents (or most similar); exact scores rank before approximate ones."""
        return self._ranked(-1.0, k, labels)

    def bottom(self, k: int, labels: np.ndarray | None = None) -> list[RankedItem]:
        """k smallest scores: strongest opponents (or least similar); exact scores rank before approximate ones."""
        return self._ranked(1.0, k, labels)

    def _ranked(self, sign: float, k: int, labels: np.ndarray | None) -> list[RankedItem]:
        if self.scores is None:
            return []
        key = sign * self.scores.astype(np.float64)
        idx = np.argsort(key, kind="stable") if self.exact is None else np.lexsort((key, ~self.exact))
        return [_item(i, self.scores, labels, self.exact) for i in idx[:k]]


def reason_head(reason: str) -> str:
    """A method's reason cut to its first clause ("being built; ready when ..." -> "being built", "not built (run
    `...`)" -> "not built"): what a page's column and an export's ``left_out`` say of it, the rest being detail."""
    return reason.split(" (")[0].split(";")[0].strip()


def _item(i: int, scores: np.ndarray, labels: np.ndarray | None, exact: np.ndarray | None = None) -> RankedItem:
    return RankedItem(
        int(i), float(scores[i]), None if labels is None else int(labels[i]), True if exact is None else bool(exact[i])
    )


@dataclass
class QueryResult:
    """Every method's answer to one query.

    ``prepared`` holds each method's damping-free per-query state, so that
    ``AttributionSession.rescore`` changes damping without a gradient; it is not part of the
    JSON and is empty for a result rebuilt from JSON.
    """

    query: dict[str, Any]  # {"spec": "gallery:3", "description": ..., "label": ..., "notes": [...]}
    measurement: str
    methods: dict[str, MethodResult]
    timing_ms: dict[str, float] = field(default_factory=dict)
    prepared: dict[str, Prepared] = field(default_factory=dict, repr=False, compare=False)

    def to_json(self, top_k: int, labels: np.ndarray | None = None) -> dict[str, Any]:
        """The CLI's JSON object (issue 3)."""
        out: dict[str, Any] = {"query": self.query, "measurement": self.measurement, "methods": {}}
        for name, r in self.methods.items():
            entry: dict[str, Any] = {"status": r.status, "kind": r.kind, "timing_ms": r.timing_ms}
            if r.reason:
                entry["reason"] = r.reason
            if r.reason_about is not None:
                entry["reason_about"] = r.reason_about
            if r.damping is not None:
                entry["damping"] = r.damping
            if r.measurement is not None:
                entry["measurement"] = r.measurement
            if r.bank is not None:
                entry["bank"] = r.bank
            if r.estimate_scale is not None:
                entry["estimate_scale"] = r.estimate_scale
            if r.damping_floor is not None:
                entry["damping_floor"] = r.damping_floor
            if r.warning is not None:
                entry["warning"] = r.warning
            entry["top"] = [vars(x) for x in r.top(top_k, labels)]
            entry["bottom"] = [vars(x) for x in r.bottom(top_k, labels)]
            out["methods"][name] = entry
        out["timing_ms"] = self.timing_ms
        return out
