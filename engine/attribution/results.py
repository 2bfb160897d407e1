"""Plain result records passed from the engine to the CLI and the app (score arrays, no tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .methods.base import Prepared


@dataclass
class RankedItem:
    index: int  # training index
    score: float
    label: int | None


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
    damping: float | None = None
    scores: np.ndarray | None = None
    timing_ms: dict[str, float] = field(default_factory=dict)

    def top(self, k: int, labels: np.ndarray | None = None) -> list[RankedItem]:
        """k largest scores: strongest proponents (or most similar)."""
        if self.scores is None:
            return []
        idx = np.argsort(-self.scores, kind="stable")[:k]
        return [_item(i, self.scores, labels) for i in idx]

    def bottom(self, k: int, labels: np.ndarray | None = None) -> list[RankedItem]:
        """k smallest scores: strongest opponents (or least similar)."""
        if self.scores is None:
            return []
        idx = np.argsort(self.scores, kind="stable")[:k]
        return [_item(i, self.scores, labels) for i in idx]


def _item(i: int, scores: np.ndarray, labels: np.ndarray | None) -> RankedItem:
    return RankedItem(int(i), float(scores[i]), None if labels is None else int(labels[i]))


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
            if r.damping is not None:
                entry["damping"] = r.damping
            entry["top"] = [vars(x) for x in r.top(top_k, labels)]
            entry["bottom"] = [vars(x) for x in r.bottom(top_k, labels)]
            out["methods"][name] = entry
        out["timing_ms"] = self.timing_ms
        return out
