"""Result files of the evaluations, read back for the app and the CLI."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DAMPING_FIELDS, KEY_NEUTRAL


def _load_results(results_dir: str | Path, pattern: str) -> list[dict[str, Any]]:
    """Every readable JSON file matching ``pattern`` in ``results_dir``, sorted by name, each
    with its file name under ``"file"``; [] if the folder is missing.  Unreadable files are
    skipped (a result being written elsewhere must not break the app's page)."""
    folder = Path(results_dir)
    out = []
    for p in sorted(folder.glob(pattern)) if folder.is_dir() else []:
        try:
            rec = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(rec, dict):
            continue
        rec["file"] = p.name
        out.append(rec)
    return out


@dataclass(frozen=True)
class ModelKey:
    """Which model a result file must have been measured on to be shown beside it: the checkpoint's
    content hash (``config.checkpoint_hash`` in every result file), or, for a file written before
    results carried one, the preset's name.  A folder of results usually holds several models'
    files (digits and mnist share assets/results); a query such as ``gallery:0`` means another
    image on another model, so another model's figures must never be shown as this one's."""

    checkpoint_hash: str
    preset: str

    def owns(self, config: dict[str, Any]) -> bool:
        h = config.get("checkpoint_hash")
        return h == self.checkpoint_hash if h else config.get("preset") == self.preset


def split_by_model(records: list[dict[str, Any]], model: ModelKey | None) -> tuple[list[dict], list[dict]]:
    """(this model's records, the others'); every record is this model's when ``model`` is None."""
    if model is None:
        return list(records), []
    mine: list[dict] = []
    others: list[dict] = []
    for r in records:
        (mine if model.owns(r.get("config") or {}) else others).append(r)
    return mine, others


def load_group_retrain_results(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``group_retrain_*.json`` in ``results_dir`` (for the app)."""
    return _load_results(results_dir, "group_retrain_*.json")


def load_lds_results(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every LDS run's ``lds_*.json`` in ``results_dir`` (for the app).  An ablation's file
    (``lds_<preset>_ablation_<name>.json``, its variants under ``"variants"``) is not a run: the run's
    own file carries the ablations' summary (``best_settings``)."""
    return [r for r in _load_results(results_dir, "lds_*.json") if "ablation" not in r]


def load_retrain_results(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``retrain_top_*.json`` in ``results_dir`` (for the app)."""
    return _load_results(results_dir, "retrain_top_*.json")


@dataclass(frozen=True)
class ResultFiles:
    """One read of a results folder: its LDS, retrain-top and group-retrain records.

    Why: the app's Evaluation tab shows several sections and a note over the same files on every
    rerun; reading the folder once per page and handing this to each loader keeps the sections
    consistent with each other (a file being rewritten cannot appear in one and not another) and
    parses each file once."""

    folder: Path
    lds: list[dict[str, Any]]
    retrain: list[dict[str, Any]]
    group_retrain: list[dict[str, Any]]

    @classmethod
    def read(cls, results_dir: str | Path) -> ResultFiles:
        folder = Path(results_dir)
        return cls(folder, load_lds_results(folder), load_retrain_results(folder), load_group_retrain_results(folder))


def _files(results: str | Path | ResultFiles) -> ResultFiles:
    return results if isinstance(results, ResultFiles) else ResultFiles.read(results)


# --- typed records (what the app reads) -----------------------------------------------------


def recorded_query_draws(config: dict[str, Any]) -> str:
    """The ``AttributionConfig.query_draws`` a result file's ``config`` was measured with: "own" (the
    paper's estimator; files written before the option, or before the run recorded its attribution
    settings, all used it) or "bank" (common random numbers)."""
    return str((config.get("attribution") or {}).get("query_draws") or "own")


# the attribution settings that decide the methods' scores (so an LDS figure, or which images a retrain-top
# run removed); query_draws has its own note (``recorded_query_draws``), the dampings are left to the caller,
# and the compressed bank's own settings count only where a side used that bank (``COMPRESSED_SETTINGS``)
SCORE_SETTINGS = (
    "mc_samples", "seed", "draws", "fisher_type", "kfac_approx", "ekfac", "kfac_blocks", "kfac_factor_draws",
    "kfac_factor_draws_mode", "kfac_factor_dtype", "kfac_bank", "kfac_bank_whiten", "trak_dim", "trak_projection", "clip_model",
    "clip_pretrained",
)
COMPRESSED_SETTINGS = ("kfac_projection", "kfac_compression", "kfac_rerank", "kfac_rerank_split")
DAMPINGS = DAMPING_FIELDS
# what a setting a file leaves out was: cache keys leave out ``KEY_NEUTRAL`` fields at their old value, and a
# file written before an option existed was measured with the behaviour the option's neutral value keeps
# (the plain int8 grid before ``kfac_bank_whiten``)
BEFORE_OPTION = {**KEY_NEUTRAL, "kfac_bank_whiten": None, "kfac_factor_draws": None, "kfac_factor_draws_mode": "same"}


def settings_differences(
    config: dict[str, Any], served: Mapping[str, Any], keys: tuple[str, ...] = SCORE_SETTINGS
) -> list[str] | None:
    """How the attribution settings a result file recorded differ from the served model's ``served``
    (``dataclasses.asdict(AttributionConfig)``), one "key: recorded (now served)" per difference; a key the
    file does not record (it predates the setting) reads "key: not recorded (now served)".  None when the
    file records no attribution settings at all.  Why: a retrain-top file removed the images its scores
    ranked first *then*; shown beside today's settings without a word, its predicted changes read as
    today's (QA round 14: the shipped digits file's removals share 15-27 of 36 images with today's)."""
    recorded = config.get("attribution")
    if not recorded:
        return None
    if "compressed" in (recorded.get("kfac_bank"), served.get("kfac_bank")):
        keys = keys + COMPRESSED_SETTINGS
    out = []
    for key in keys:
        if key not in served:
            continue
        if key not in recorded and key in BEFORE_OPTION:  # left out of the file: its value before the option
            if BEFORE_OPTION[key] != served[key]:
                out.append(f"{key}: {BEFORE_OPTION[key]} (now {served[key]})")
        elif key not in recorded:
            out.append(f"{key}: not recorded (now {served[key]})")
        elif recorded[key] is None and key in DAMPINGS:
            continue  # the method's default of the day, whose value the file does not say
        elif recorded[key] != served[key]:
            out.append(f"{key}: {recorded[key]} (now {served[key]})")
    return out


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

    @property
    def query_draws(self) -> str:
        """Whose draws the query gradients were estimated on (``recorded_query_draws``)."""
        return recorded_query_draws(self.config)

    def settings_differences(self, served: Mapping[str, Any]) -> list[str] | None:
        """``settings_differences`` without the dampings (an LDS run sweeps them and reports its own)."""
        return settings_differences(self.config, served)

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

    @property
    def query_draws(self) -> str:
        """Whose draws the query gradients that chose the removals were estimated on (``recorded_query_draws``)."""
        return recorded_query_draws(self.config)

    def settings_differences(self, served: Mapping[str, Any]) -> list[str] | None:
        """``settings_differences`` including the dampings: the removals are the top scores at them."""
        return settings_differences(self.config, served, SCORE_SETTINGS + DAMPINGS)


def lds_records(
    results: str | Path | ResultFiles, model: ModelKey | None = None, query_draws: str | None = None
) -> list[LDSRecord]:
    """Every LDS result in a results folder or an already read ``ResultFiles`` (of ``model`` only,
    when given), the headline first (see ``LDSRecord.headline_order``); with ``query_draws`` (the
    served model's ``AttributionConfig.query_draws``) the files measured with it come before the others."""
    files = _files(results)
    folder = files.folder
    out = []
    for rec in split_by_model(files.lds, model)[0]:
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
                variant="_attribution_m" in path.stem,  # engine.evaluation.lds_run.results_stem
                best_settings=rec.get("best_settings") or {},
            )
        )
    return sorted(out, key=lambda r: (query_draws is not None and r.query_draws != query_draws, r.headline_order()))


def retrain_records(results: str | Path | ResultFiles, model: ModelKey | None = None) -> list[RetrainRecord]:
    """Every retrain-top result in a results folder or a ``ResultFiles`` (of ``model`` only, when
    given), by file name."""
    files = _files(results)
    folder = files.folder
    return [
        RetrainRecord(
            path=folder / rec["file"],
            config=rec.get("config") or {},
            results=rec.get("results") or [],
            summary=rec.get("summary") or {},
        )
        for rec in split_by_model(files.retrain, model)[0]
    ]


def _evaluation_files(results: str | Path | ResultFiles, model: ModelKey) -> tuple[list[str], list[str]]:
    """The names of a results folder's LDS, retrain-top and group-retrain files: (measured on ``model``, on others)."""
    files = _files(results)
    mine, others = split_by_model(files.lds + files.retrain + files.group_retrain, model)
    return sorted(r["file"] for r in mine), sorted(r["file"] for r in others)


def model_files(results: str | Path | ResultFiles, model: ModelKey) -> list[str]:
    """The LDS, retrain-top and group-retrain files of a results folder measured on ``model`` (the app names the
    sidebar's other model whose files they are)."""
    return _evaluation_files(results, model)[0]


def other_models_files(results: str | Path | ResultFiles, model: ModelKey) -> list[str]:
    """The LDS, retrain-top and group-retrain files of a results folder measured on other models (the
    app says they exist and why they are not shown)."""
    return _evaluation_files(results, model)[1]
