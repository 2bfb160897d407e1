"""Group attribution in both directions, over a query set (the app's Groups page and the CLI).

* **Group removal** (output -> group): for each query q and method, the predicted change of
  the measurement if the group R were removed, delta m(q; R) = sum_{i in R} tau_i(q)
  (``engine.attribution.groups``), with the group's strongest members for that query.
* **Reverse** (group -> outputs): the queries ranked by the same delta m(q; R), largest
  first: the outputs the group (or one training image, R = {i}) supports most.

Both read one (Q, N) matrix per method from ``engine.attribution.pool.attribution_matrix`` (batched
gradients, one batched product over each method's bank), so a group query over a cached
pool costs one (Q, |R|) sum.  Where that matrix is an estimate (K-FAC with a compressed bank: its
compressed scan, on another scale than eq. 6) the method's exact group sums and member scores are
used instead (``MatrixResult.exact``): one summed gradient per group, and fresh gradients of the
members shown.  Only influence methods are accepted: a similarity is not a removal prediction and
its sum over a group means nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .groups import Group, group_change, size_caveat, strongest_members
from .methods import names_of_kind
from .methods.base import no_progress
from .pool import MatrixResult, Progress, QuerySet, Supported, attribution_matrix, ranking_by_change


@dataclass
class GroupResult:
    """Every method's matrix over a query set, and the group whose removal is asked about."""

    group: Group
    measurement: str
    qset: QuerySet
    methods: dict[str, MatrixResult]
    labels: np.ndarray | None  # training labels (for the strongest members' labels)

    def ok(self) -> list[str]:
        return [n for n, r in self.methods.items() if r.status == "ok"]

    def changes(self, name: str) -> np.ndarray:
        """(Q,) predicted change of each query's measurement if the group were removed: the members' column
        sum of the matrix, or, where the matrix is an estimate, the method's exact group sum."""
        r = self.methods[name]
        if r.scores is None:
            raise ValueError(f"{name} has no scores: {r.reason}")
        if r.exact is None:
            return group_change(r.scores, self.group)
        key = ("group", self.group.members.tobytes())
        if key not in r.exact.cache:
            r.exact.cache[key] = np.asarray(r.exact.group_changes(self.group.members), dtype=np.float64)
        return r.exact.cache[key]

    def strongest(self, name: str, q: int, k: int = 5) -> list[tuple[int, float]]:
        """The group's k members with the largest scores for query q.  Where the matrix is an estimate:
        the exact top-k among the members the estimate ranks highest for any query of the set (4k per
        query, at least 32; the re-rank's idea), their exact scores computed once for every query."""
        r = self.methods[name]
        if r.exact is None:
            return strongest_members(r.scores[q], self.group, k)  # type: ignore[index]
        est = np.asarray(r.scores, dtype=np.float64)[:, self.group.members]  # type: ignore[index]
        per_query = min(max(4 * k, 32), self.group.size)
        idx = np.unique(self.group.members[np.argsort(-est, axis=1, kind="stable")[:, :per_query]])
        key = ("members", idx.tobytes())
        if key not in r.exact.cache:
            r.exact.cache[key] = np.asarray(r.exact.member_scores(idx), dtype=np.float64)
        exact = r.exact.cache[key][q]
        order = np.lexsort((idx, -exact))[:k]
        return [(int(idx[j]), float(exact[j])) for j in order]

    def ranking(self, name: str, top_k: int | None = None) -> list[Supported]:
        """Queries by how much removing the group would raise their measurement, largest first."""
        return ranking_by_change(self.changes(name), self.qset, top_k)

    def measurement_of(self, name: str) -> str:
        """The measurement method ``name``'s changes are of: the one asked for, except where the method
        always scores its own (D-TRAK: the square norm), which the headings and the JSON must say (QA round
        13: D-TRAK's changes were labelled "loss")."""
        return self.methods[name].measurement or self.measurement

    def note(self, name: str) -> str | None:
        """What is exact and what is estimated, where the method's matrix is an estimate (else None)."""
        exact = self.methods[name].exact
        return None if exact is None else exact.note

    def damping_json(self, name: str) -> dict[str, Any]:
        """A method's damping, and, as ``query --json`` gives them, its floor and the warning when the damping is
        below it (QA 32 #7's warning reached the single query only: a group's sums at ``--damping kfac=1e-15``
        said nothing)."""
        r = self.methods[name]
        return {"damping": r.damping,
                # read from the checkpoint's precomputed gallery scores, not computed here (precomputed_groups)
                **({"precomputed": True} if r.reason == "precomputed" else {}),
                **({"damping_floor": r.damping_floor} if r.damping_floor is not None else {}),
                **({"warning": r.warning} if r.warning else {})}

    def size_caveat(self) -> str | None:
        """``groups.size_caveat`` for this group (None while no method has scores to give the set's size)."""
        scored = [r.scores for r in self.methods.values() if r.status == "ok" and r.scores is not None]
        return None if not scored else size_caveat(self.group.size, int(scored[0].shape[-1]))

    def _group_json(self) -> dict[str, Any]:
        """The group's entry of both JSONs: its spec, size and description (which says when repeated indices
        were counted once), and the size caveat where there is one."""
        caveat = self.size_caveat()
        return {"spec": self.group.spec, "size": self.group.size, "description": self.group.description,
                **({"caveat": caveat} if caveat else {})}

    def to_json(self) -> dict[str, Any]:
        """The ``group`` command's JSON (issue 15): one entry per query, in query-set order, and the damping
        each method's scores were computed with (the key ``query --json`` uses)."""
        labels = self.qset.labels
        return {
            "group": self._group_json(),
            "measurement": self.measurement,
            **self.qset.identity(),
            "methods": {
                name: {
                    "queries": [
                        {
                            "query": self.qset.names[q],
                            "label": None if labels[q] < 0 else int(labels[q]),
                            "predicted_change": float(c),
                        }
                        for q, c in enumerate(self.changes(name))
                    ],
                    **self.damping_json(name),
                    "measurement": self.measurement_of(name),
                    **({"note": self.note(name)} if self.note(name) else {}),
                }
                for name in self.ok()
            },
        }

    def reverse_json(self, top_k: int) -> dict[str, Any]:
        """The ``reverse`` command's JSON: the top-k supported queries per method, and its damping."""
        return {
            "group": self._group_json(),
            "measurement": self.measurement,
            **self.qset.identity(),
            "methods": {
                name: {"top": [vars(s) for s in self.ranking(name, top_k)], **self.damping_json(name),
                       "measurement": self.measurement_of(name),
                       **({"note": self.note(name)} if self.note(name) else {})}
                for name in self.ok()
            },
        }


def influence_methods(session: Any) -> list[str]:
    """The session's influence methods, in display order: the ones whose scores predict a removal."""
    return [n for n in session.method_names() if session.method(n).kind == "influence"]


def refuse_similarities(methods: list[str] | None) -> None:
    """ValueError when ``methods`` name a similarity: it predicts no removal's effect, of a group or of one image.
    From the registry's declarations alone, so the CLI refuses before a session loads (QA 30b #6: ~10 s, then
    words about a group that ``reverse --train N`` had not given)."""
    similar = [n for n in methods or [] if n in names_of_kind("similarity")]
    if similar:
        raise ValueError(f"{', '.join(similar)}: a similarity, not a removal prediction, says nothing of what removing "
                         f"training images would change; use influence methods ({', '.join(names_of_kind('influence'))})")


def check_influence_methods(session: Any, methods: list[str] | None) -> list[str]:
    """The methods asked for (default: every influence method); ValueError for an unknown name or a similarity."""
    names = list(methods) if methods else influence_methods(session)
    for n in names:
        session.method(n)  # ValueError for an unknown name
    refuse_similarities(names)
    return names


def group_attribution(
    session: Any,
    group: Group,
    qset: QuerySet,
    measurement: str = "loss",
    methods: list[str] | None = None,
    damping: dict[str, float] | None = None,
    cache_dir: str | Path | None = None,
    progress: Progress = no_progress,
) -> GroupResult:
    """Scores of every query in ``qset`` for each influence method, ready for both directions."""
    names = check_influence_methods(session, methods)
    mats = attribution_matrix(session, qset, measurement, names, damping, cache_dir, progress)
    return GroupResult(group, measurement, qset, mats, session.labels)


__all__ = ["GroupResult", "check_influence_methods", "group_attribution", "influence_methods", "refuse_similarities"]
