"""Result files of the evaluations, read back for the app and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _load_results(results_dir: str | Path, pattern: str) -> list[dict[str, Any]]:
    """Every readable JSON file matching ``pattern`` in ``results_dir``, sorted by name, each
    with its file name under ``"file"``; [] if the folder is missing.  Unreadable files are
    skipped (a result being written elsewhere must not break the app's page)."""
    folder = Path(results_dir)
    out = []
    for p in sorted(folder.glob(pattern)) if folder.is_dir() else []:
        try:
            rec = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        rec["file"] = p.name
        out.append(rec)
    return out


def load_lds_results(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``lds_*.json`` in ``results_dir`` (for the app)."""
    return _load_results(results_dir, "lds_*.json")


def load_retrain_results(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``retrain_top_*.json`` in ``results_dir`` (for the app)."""
    return _load_results(results_dir, "retrain_top_*.json")
