"""Plain result records passed from the engine to the CLI and the app (score arrays, no tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import SETTING_FLAGS
from .methods.base import Prepared

# the bits of a compressed bank's candidate's end (``rerank.merge_candidate_ends``, ``MethodResult.exact_end``)
TOP_END, BOTTOM_END = 1, 2

@dataclass
class RankedItem:
    """One training image in a method's ranking: its index, its score (tau_i for influence, paper
    eq. 6; a cosine for similarity), its label where the data set has labels, and whether the score is
    exact or a compressed bank's estimate."""

    index: int  # training index
    score: float
    label: int | None
    exact: bool = True  # False: a compressed-bank approximation, not re-ranked (engine.attribution.compressed_bank)


@dataclass(frozen=True)
class EndCheck:
    """Whether one end of a compressed bank's shown ranking may miss an image (``MethodResult.ranking_check``).

    The re-rank makes the candidates' scores exact, but an image that belongs among the exact top-k and was
    not a candidate is simply absent, and every entry shown is then exact (QA 55 #3: tiny U-Net, 2 x 8
    candidates of 48, the shown top-5 missed two of the stored bank's on each of 4 queries).  The images
    outside the candidates have only their estimates (rescaled, ``rerank.scale_estimates``), so the cheap
    check counts those that lie beyond the weakest exact score shown at this end: ``beyond`` of them,
    beyond the ``rank``-th shown (the k-th when the end shows k exact scores; above it at the top, below it
    at the bottom).  Estimates are not bounds, both ways: ``may_miss`` says only that the list may miss some,
    and no image beyond is no proof that it misses none, hence "may_miss" and not "complete".  The check
    catches lists that reach well past their candidates, and little else: the images just outside the
    candidates are those the scan ranked lower, and their rescaled estimates mostly stay below the k-th
    exact score even where their exact scores do not (on that tiny U-Net with 2 x 8 candidates the top-10's
    misses are flagged, the top-5's are not; ``tests/test_compressed_bank.py``)."""

    beyond: int
    rank: int

    @property
    def may_miss(self) -> bool:
        return self.beyond > 0

    def to_json(self) -> dict[str, Any]:
        return {"may_miss": self.may_miss, "estimates_beyond": self.beyond, "rank": self.rank}


def end_check(scores: np.ndarray, exact: np.ndarray, shown: list[int], highest: bool) -> EndCheck | None:
    """``EndCheck`` of one end: ``shown`` the indices listed there, in order (``MethodResult.top``/``bottom``);
    None when none of them is exact (the end is all estimates, each marked so)."""
    ranks = [r for r, i in enumerate(shown) if exact[i]]
    if not ranks:
        return None
    key = (1.0 if highest else -1.0) * np.asarray(scores, dtype=np.float64)
    weakest = min(key[shown[r]] for r in ranks)
    rank = 1 + max(r for r in ranks if key[shown[r]] == weakest)
    outside = ~np.asarray(exact, dtype=bool)
    outside[np.asarray(shown, dtype=np.int64)] = False  # an estimate shown is marked "≈" there: not missed
    return EndCheck(int(np.count_nonzero(key[outside] > weakest)), rank)


RERANK_FLAG = SETTING_FLAGS["kfac_rerank"]  # what sets the candidates' count, for the CLI and the app alike


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
    # (N,) int8, with ``exact``: the end a re-ranked candidate was picked for, bit 1 the top (TOP_END), bit 2 the
    # bottom (BOTTOM_END), 0 not a candidate; None: not known (every exact score belongs to both ends' lists)
    exact_end: np.ndarray | None = None
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
        if self.exact.all():  # every image a candidate (2C >= N): no "the other 0 estimated" (QA 54 F8)
            return (f"compressed bank: all {int(self.exact.sum())} training images re-ranked to exact K-FAC scores, "
                    "none estimated")
        scaled = ("" if self.estimate_scale is None else
                  f" (the compressed scan x {self.estimate_scale:.3g}, the factor fitted on the exact ones)")
        return (f"compressed bank: {int(self.exact.sum())} candidates at both ends re-ranked to exact "
                f"K-FAC scores, the other {int((~self.exact).sum())} estimated{scaled}")

    def ranking_check(self, k: int) -> dict[str, EndCheck] | None:
        """Per end ("top", "bottom") of the k shown, whether it may miss an image (``EndCheck``): only for a
        compressed bank's final answer (a pending one is marked approximate as a whole, and the other banks
        score every image); None otherwise, and an end with no exact score shown is left out.

        Computed here, from the answer's scores and exact mask, not with the re-rank: k is the reader's (the
        app's top-k slider, the CLI's --top-k), and this answer is the one they list."""
        if self.bank != "compressed" or self.exact is None or self.exact_pending or self.scores is None:
            return None
        checks = {}
        for end, items, highest in (("top", self.top(k), True), ("bottom", self.bottom(k), False)):
            check = end_check(self.scores, self.exact, [x.index for x in items], highest)
            if check is not None:
                checks[end] = check
        return checks or None

    def ranking_note(self, k: int) -> str | None:
        """One line when an end of the k shown may miss an image (``ranking_check``), else None (nothing new
        to say: the page and the CLI's text look as before).  It says "may": the images it counts have only
        estimates, which are not bounds."""
        checks = self.ranking_check(k) or {}
        parts = [(end, c) for end, c in checks.items() if c.may_miss]
        if not parts:
            return None
        def beyond(end: str, c: EndCheck) -> str:  # "above the 10th highest exact score"
            return (f"{'above' if end == 'top' else 'below'} the {_ordinal(c.rank)} "
                    f"{'highest' if end == 'top' else 'lowest'} exact score")

        if len(parts) > 1:  # per end: their sum counted twice an image beyond both (QA 61 F1: 3,542 of 1,797 images)
            where = " and ".join(f"{c.beyond} {beyond(end, c)}" for end, c in parts)
            return (f"images outside the re-ranked candidates have estimates beyond the lists' exact scores ({where}): "
                    f"both lists may miss some; more candidates: `{RERANK_FLAG}`")
        (end, c), = parts
        lists = f"the {'highest' if end == 'top' else 'lowest'} {k}"
        return (f"{c.beyond} image{'s' if c.beyond != 1 else ''} outside the re-ranked candidates "
                f"{'have estimates' if c.beyond != 1 else 'has an estimate'} {beyond(end, c)}: {lists} may miss "
                f"{'some' if c.beyond != 1 else 'it'}; more candidates: `{RERANK_FLAG}`")

    def top(self, k: int, labels: np.ndarray | None = None) -> list[RankedItem]:
        """k largest scores: strongest proponents (or most similar); this end's exact scores rank first."""
        return self._ranked(-1.0, k, labels)

    def bottom(self, k: int, labels: np.ndarray | None = None) -> list[RankedItem]:
        """k smallest scores: strongest opponents (or least similar); this end's exact scores rank first."""
        return self._ranked(1.0, k, labels)

    def _ranked(self, sign: float, k: int, labels: np.ndarray | None) -> list[RankedItem]:
        """The k first by ``sign`` x score, the end's exact scores (its re-ranked candidates) before the rest.

        Exact scores rank first because an estimate, even rescaled, is not comparable with them: it could push
        ahead of the candidates it was ranked below.  Only this end's: with fewer candidates at an end than k
        (``--kfac-rerank 8 --top-k 10``), the rest follow by score, estimates and the other end's exact scores
        alike, instead of the other end's exact scores ranking first (QA 61 F2: the top-10 listed two of the
        most negative scores after its 8 candidates).  Without ``exact_end`` every exact score ranks first."""
        if self.scores is None:
            return []
        key = sign * self.scores.astype(np.float64)
        if self.exact is None:
            idx = np.argsort(key, kind="stable")
        else:
            first = np.asarray(self.exact, dtype=bool)
            if self.exact_end is not None:
                first = first & ((self.exact_end & (TOP_END if sign < 0 else BOTTOM_END)) != 0)
            idx = np.lexsort((key, ~first))
        return [_item(i, self.scores, labels, self.exact) for i in idx[:k]]


def _ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, 21st."""
    tail = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{tail}"


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
            checks = r.ranking_check(top_k)
            if checks is not None:  # a compressed bank's ends: whether each may miss an image (EndCheck)
                entry["ranking_check"] = {end: c.to_json() for end, c in checks.items()}
            entry["top"] = [vars(x) for x in r.top(top_k, labels)]
            entry["bottom"] = [vars(x) for x in r.bottom(top_k, labels)]
            out["methods"][name] = entry
        out["timing_ms"] = self.timing_ms
        return out
