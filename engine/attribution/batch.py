"""Scores of many queries at once: one batched product over a method's rows (paper eq. 6).

For the eigenbasis methods (K-FAC, TRAK, D-TRAK; ``engine.attribution.scoring``) the scores of
Q queries at one damping are

    T = (1/N) R [q_1 / (e + lambda), ..., q_Q / (e + lambda)]      (Q, N)

so the Q damped queries are stacked and the rows are passed over once (``Rows.inner_many``),
instead of Q passes (each of which would also score the whole damping grid).  Similarity
methods (``FixedScores``) are stacked as they are; any other method is scored query by query.
Row q equals what ``session.query`` returns for query q (tests check it).
"""

from __future__ import annotations

import numpy as np
import torch

from .context import EngineContext
from .methods.base import AttributionMethod, EigenPrepared, FixedScores
from .query import QueryInput
from .scoring import to_scores


def score_batch(
    method: AttributionMethod,
    ctx: EngineContext,
    queries: list[QueryInput],
    query_grads: torch.Tensor | None,
    damping: float | None,
) -> np.ndarray:
    """(Q, N) float32 scores of ``queries`` (row q's gradient in ``query_grads[q]``) at one damping."""
    preps = [method.prepare(ctx, q, None if query_grads is None else query_grads[i]) for i, q in enumerate(queries)]
    if preps and all(isinstance(p, EigenPrepared) for p in preps):
        rows = preps[0].query.rows
        if all(p.query.rows is rows for p in preps):
            lam = float(damping if damping is not None else method.default_damping)
            damped = torch.stack([p.query.damped(lam) for p in preps])
            return to_scores(rows.inner_many(damped), rows.num_examples)
    if preps and all(isinstance(p, FixedScores) for p in preps):
        return np.stack([np.asarray(p.scores, dtype=np.float32).reshape(-1) for p in preps])
    return np.stack([np.asarray(method.score(p, damping), dtype=np.float32).reshape(-1) for p in preps])
