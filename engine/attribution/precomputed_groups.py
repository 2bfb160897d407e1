"""Group and reverse answers over the gallery from the checkpoint's precomputed scores, before any cache is built.

Why: first-order influence is additive (eq. 6 is linear in the training gradient), so a group's predicted change
for a gallery sample is the sum of its members' scores, and the shipped ``precomputed_gallery.npz`` holds every
gallery sample's full score vector.  The app's Groups page answered from it on a fresh clone while the CLI's
``group`` and ``reverse`` said "not built" until a cold build of minutes (QA 44 #4); both read the matrices here.

Only the gallery, at the settings the file was written for (measurement ``loss``, the session's draws, a damping
the file holds), and only for methods whose bank stores exact scores (``PrecomputedGallery.gallery_matrix``:
a compressed bank's column holds estimates, whose sums are no group answer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .pool import MatrixResult
from .precomputed import FILE, MEASUREMENT, PrecomputedGallery, fillable

# the note a filled method's answer carries (text output and JSON ``note``), as the app's Groups page says it
NOTE = ("the checkpoint's precomputed gallery scores, each stored at 16 bits (within 0.05% of its sample's largest "
        "score); the caches are not built here")


def precomputed_matrices(session: Any, pre: PrecomputedGallery | None, measurement: str,
                         damping: dict[str, float] | None = None,
                         methods: list[str] | None = None) -> dict[str, MatrixResult]:
    """Each influence method's (Q, N) gallery matrix from ``pre`` (default: every influence method), as
    ``MatrixResult``s with reason "precomputed", at ``damping`` (per method; the default where absent).  Empty when
    the file does not match this model, the measurement is not the file's or the session has no gallery; a method
    the file does not hold at that damping is absent."""
    from .group_attribution import influence_methods

    if pre is None or not session.gallery() or measurement != MEASUREMENT:
        return {}
    damping = damping or {}
    mats: dict[str, MatrixResult] = {}
    for n in methods if methods is not None else influence_methods(session):
        scores = pre.gallery_matrix(session, n, damping.get(n))
        if scores is None:
            continue
        used = session.measurement_used(n, MEASUREMENT)
        lam = session.damping_for(n, damping)  # the default where none is asked: what the exports record
        floor = session.method(n).floor_or_recorded(pre.damping_floor(n))  # the file's while the method is unloaded
        mats[n] = MatrixResult(n, "influence", "ok", reason="precomputed", damping=lam, scores=scores,
                               measurement=None if used == MEASUREMENT else used,
                               warning=session.method(n).damping_warning(lam, floor), damping_floor=floor)
    return mats


def fill_unbuilt_groups(session: Any, result: Any, damping: dict[str, float] | None = None) -> list[str]:
    """Give the methods of a gallery ``GroupResult`` whose caches are not built (available, not corrupt) the
    precomputed matrices, as ``precomputed.fill_unbuilt`` does for one query; returns the filled names.  A pool,
    another measurement or a damping the file does not hold is left as it was ("not built")."""
    if result.qset.name != "gallery":
        return []
    wanted = fillable(session, result.methods)
    if not wanted:
        return []
    pre = PrecomputedGallery.load(Path(session.checkpoint) / FILE)
    mats = precomputed_matrices(session, pre, result.measurement, damping, wanted)
    for n, m in mats.items():
        result.methods[n] = m
    return list(mats)


__all__ = ["NOTE", "fill_unbuilt_groups", "precomputed_matrices"]
