"""What ``query`` prints and writes: the text table of each method's ends and the ``--scores-out`` file (the JSON
is ``QueryResult.to_json``).  Its own module so that the command's module keeps to its options and its flow."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..attribution.signs import end_signs
from ..files import atomic_write_bytes

if TYPE_CHECKING:  # the parser must not import torch (tests/test_architecture.py)
    from ..attribution.results import QueryResult


def write_scores(path: Path, result: QueryResult, labels: Sequence[int] | None, settings: dict | None = None) -> None:
    """One array per method with status ok (N,) float32, plus ``labels``, the query spec, the measurement and
    ``settings`` (``engine.attribution.provenance.result_settings``: model, draws, each method's damping, as
    a JSON string: ``json.loads(str(np.load(f)["settings"]))``)."""
    import numpy as np

    from ..attribution.provenance import settings_json

    arrays = {name: r.scores for name, r in result.methods.items() if r.scores is not None}
    if labels is not None:
        arrays["labels"] = np.asarray(labels)
    arrays["query"] = np.array(str(result.query.get("spec", "")))
    arrays["measurement"] = np.array(result.measurement)
    if settings is not None:
        arrays["settings"] = np.array(settings_json(settings))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())  # a kill mid-write leaves the old file or none, never half of one


def format_result(result: QueryResult, top_k: int, labels: Sequence[int] | None) -> str:
    """A readable table per method: top proponents and opponents with labels and scores."""
    q = result.query
    lines = [f"query: {q.get('spec')} ({q.get('description')})" + (f", label {q['label']}" if q.get("label") is not None else "")]
    for note in q.get("notes", []):
        lines.append(f"  - {note}")
    took = ("precomputed (read from the shipped file, nothing timed)" if q.get("precomputed")
            else f"total {result.timing_ms.get('total', 0.0):.0f} ms")
    lines.append(f"measurement: {result.measurement}    {took}")
    for name, r in result.methods.items():
        lines.append("")
        head = f"[{name}] {r.title} ({r.kind})"
        if r.status != "ok":
            lines.append(f"{head}: {r.status.upper()}: {r.reason}")
            continue
        if r.damping is not None:
            head += f"  damping {r.damping:.3g}"
        times = ", ".join(f"{k} {v:.0f} ms" for k, v in r.timing_ms.items())
        lines.append(f"{head}  [{times}]" if times else head)
        if r.reason:
            lines.append(f"  note: {r.reason}")
        if r.bank_note():
            lines.append(f"  bank: {r.bank_note()}")
        if r.warning:
            lines.append(f"  warning: {r.warning}")
        note = r.ranking_note(top_k)
        if note:  # a compressed bank's end may miss an image outside its re-ranked candidates (EndCheck)
            lines.append(f"  ranking: {note}")
        top, bottom = r.top(top_k, labels), r.bottom(top_k, labels)
        if r.kind == "influence":
            top_title = end_signs([it.score for it in top], highest=True).heading()
            bottom_title = end_signs([it.score for it in bottom], highest=False).heading()
        else:
            top_title, bottom_title = "most similar", "least similar"
        for title, items in ((top_title, top), (bottom_title, bottom)):
            # "~": a compressed bank's estimate, listed after its end's exact scores (QA 63 F3: unmarked, +0.0411
            # after +0.0378 read as mis-sorted); the page marks it "≈", the PNG "~"
            cells = [
                f"#{it.index}" + (f"({it.label})" if it.label is not None else "")
                + f" {'' if it.exact else '~'}{it.score:+.3g}"
                for it in items
            ]
            lines.append(f"  {title:>13}: " + "  ".join(cells))
        if any(not it.exact for it in (*top, *bottom)):
            lines.append("  (~: an estimate, listed after its end's exact scores)")
    return "\n".join(lines)
