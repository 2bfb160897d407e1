"""Result files of the evaluations, read back for the app and the CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
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
    """Every LDS run's ``lds_*.json`` in ``results_dir`` (for the app).  An ablation's file
    (``lds_<preset>_ablation_<name>.json``, its variants under ``"variants"``) is not a run: the run's
    own file carries the ablations' summary (``best_settings``)."""
    return [r for r in _load_results(results_dir, "lds_*.json") if "ablation" not in r]


def load_retrain_results(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``retrain_top_*.json`` in ``results_dir`` (for the app)."""
    return _load_results(results_dir, "retrain_top_*.json")


# --- typed records (what the app reads) -----------------------------------------------------


@dataclass
class LDSRecord:
    """One ``lds_*.json`` written by ``engine.evaluation.lds``: the LDS per method for one measurement."""

    path: Path
    measurement: str
    config: dict[str, Any]
    methods: dict[str, dict[str, Any]]  # name -> {"lds", "ci95", "damping", "best_lds", "best_damping", ...}
    sweeps: dict[str, list[dict[str, Any]]]  # name -> [{"damping", "lds", "ci95", "sem"}]
    noise: dict[str, Any]
    figure: Path | None  # the bar chart written beside the JSON
    variant: bool  # a run with another attribution M (``--attribution-mc``), not the headline
    best_settings: dict[str, Any] = field(default_factory=dict)  # engine.evaluation.lds_best's summary

    @property
    def file(self) -> str:
        return self.path.name

    def headline_order(self) -> tuple:
        """The preset's M before variants, the loss before other measurements, then by file."""
        return (self.variant, self.measurement != "loss", self.file)


@dataclass
class RetrainRecord:
    """One ``retrain_top_*.json`` written by ``engine.evaluation.retrain_top``."""

    path: Path
    config: dict[str, Any]
    results: list[dict[str, Any]]  # per (query, method): predicted / measured / random change
    summary: dict[str, dict[str, float]]

    @property
    def file(self) -> str:
        return self.path.name


def lds_records(results_dir: str | Path) -> list[LDSRecord]:
    """Every LDS result in ``results_dir``, the headline first (see ``LDSRecord.headline_order``)."""
    folder = Path(results_dir)
    out = []
    for rec in load_lds_results(folder):
        path = folder / rec["file"]
        cfg = rec.get("config") or {}
        png = path.with_suffix(".png")
        out.append(
            LDSRecord(
                path=path,
                measurement=str(cfg.get("measurement") or "?"),
                config=cfg,
                methods=rec.get("methods") or {},
                sweeps=rec.get("sweeps") or {},
                noise=rec.get("noise") or {},
                figure=png if png.is_file() else None,
                variant="_attribution_m" in path.stem,  # engine.evaluation.lds.results_stem
                best_settings=rec.get("best_settings") or {},
            )
        )
    return sorted(out, key=LDSRecord.headline_order)


def retrain_records(results_dir: str | Path) -> list[RetrainRecord]:
    """Every retrain-top result in ``results_dir``, by file name."""
    folder = Path(results_dir)
    return [
        RetrainRecord(
            path=folder / rec["file"],
            config=rec.get("config") or {},
            results=rec.get("results") or [],
            summary=rec.get("summary") or {},
        )
        for rec in load_retrain_results(folder)
    ]
