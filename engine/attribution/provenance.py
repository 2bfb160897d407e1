"""What an exported answer was computed with, so a saved file can be read (and redone) without the page.

Why: a score depends on the model, the query, the measurement, the Monte Carlo draws and each method's
damping (and on the attribution settings its caches were built with).  Two downloads of one query at two
dampings held different K-FAC columns under the same file name, with nothing saying which was which (QA
round 17).  Every export (the app's CSV and PNG, the CLI's ``--scores-out`` and ``--json``) now carries
these settings: as a JSON object where the format has room for one, as ``# key: value`` lines above a CSV's
header (``pandas.read_csv(f, comment="#")`` reads the table), and as a short digest in file names, so two
exports of different settings never share a name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..code_version import code_version
from ..config import DAMPING_FIELDS, attribution_settings
from .results import reason_head


def model_settings(session: Any) -> dict[str, Any]:
    """The model that made the scores: preset name, checkpoint folder and its content hash, and the training set
    it attributes to: its name, folder (when read from one) and content digest (QA 33/34: an export of a model of
    one's own named neither its data folder nor which images were in it)."""
    return {
        "preset": session.preset.name,
        # absolute, whatever the user typed (QA 41: a diffusers folder given as data/pipe was "data/pipe" in the JSON,
        # a preset's checkpoint absolute): an export read elsewhere still names the folder
        "checkpoint": str(Path(session.checkpoint).expanduser().resolve()),
        "checkpoint_hash": session.checkpoint_hash,
        "num_train": len(session.dataset),
        "data": session.dataset.name,
        "data_root": None if session.preset.data.root is None else str(Path(session.preset.data.root).expanduser().resolve()),
        "data_digest": session.data_digest,
    }


def session_settings(session: Any) -> dict[str, Any]:
    """What every answer of this session shares: the model, the Monte Carlo draws it is set to, every
    attribution setting (``engine.config.attribution_settings``, the whole config), the code that ran
    (``engine.code_version``) and torch's thread count (the scores' last bits follow it).  Its dampings are
    the session's defaults, named ``<method>_damping_default``: the damping a method scored with is its
    ``methods.<name>.damping`` (QA round 20: ``attribution.kfac_damping`` read 1e-08 beside a K-FAC answer
    scored at 1e-06)."""
    import torch

    full = attribution_settings(session.config, len(session.dataset))
    attribution = {(f"{k}_default" if k in DAMPING_FIELDS else k): v for k, v in full.items()}
    return {
        "model": model_settings(session),
        "mc_samples": int(session.config.mc_samples),
        "attribution": attribution,
        "code": code_version(),
        "threads": int(torch.get_num_threads()),
    }


def _method_entry(session: Any, name: str, r: Any, measurement: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"title": session.method(name).title}
    if r.damping is not None:
        entry["damping"] = float(r.damping)
    used = session.measurement_used(name, measurement)
    if used != str(measurement):
        entry["measurement"] = used  # D-TRAK: the square norm, whatever was asked
    if getattr(r, "bank", None) is not None:
        entry["bank"] = r.bank
    # a --scores-out file or an export kept for later says that its scores weigh rounding, as the answer did (QA 36 #8)
    if getattr(r, "damping_floor", None) is not None:
        entry["damping_floor"] = float(r.damping_floor)
    if getattr(r, "warning", None):
        entry["warning"] = r.warning
    exact = getattr(r, "exact", None)
    if isinstance(exact, np.ndarray):  # a compressed bank's answer: which scores are exact, the others' factor
        entry["exact_scores"] = int(exact.sum())
        if getattr(r, "estimate_scale", None) is not None:
            entry["estimate_scale"] = float(r.estimate_scale)
    elif exact is not None and getattr(exact, "note", None):  # a group matrix: its exact sums (ExactGroupScores)
        entry["note"] = exact.note
    if getattr(r, "reason", None) == "precomputed":
        entry["precomputed"] = True  # the shipped first-page scores, keyed to these same settings
    return entry


def result_settings(session: Any, result: Any) -> dict[str, Any]:
    """Everything one query's scores depend on (a ``QueryResult``): model, query, measurement, draws, and
    per scored method its damping, the measurement it used when another, and its bank; plus the session's
    attribution settings (``session_settings``)."""
    methods = {n: _method_entry(session, n, r, result.measurement)
               for n, r in result.methods.items() if r.status == "ok"}
    return {
        **session_settings(session),
        "query": result.query.get("spec"),
        "query_image": result.query.get("image_digest"),  # an upload's name alone does not say which image
        **result.query.get("origin", {}),  # a pool sample's pool_seed and pool_size: what reruns it (QA 44 #3)
        "measurement": str(result.measurement),
        "mc_samples": result.query.get("mc_samples"),  # the query's own (a query may ask for another M)
        "methods": methods,
        **_left_out(result.methods, methods),
    }


def _left_out(results: dict[str, Any], scored: dict[str, Any]) -> dict[str, Any]:
    """``{"left_out": {method: why}}`` for the methods an answer holds no scores of, or nothing when it holds
    them all.  Why: an export made while the app builds has no TRAK column, and nothing said why (QA 23 #4);
    the reason is its first clause ("being built", "not built ...", CLIP's missing weights)."""
    why = {n: reason_head(r.reason or r.status) for n, r in results.items() if n not in scored}
    return {"left_out": why} if why else {}


def group_settings(session: Any, result: Any, not_asked: dict[str, str] | None = None) -> dict[str, Any]:
    """The same for a group answer (a ``GroupResult``): the group and the query set instead of one query.
    ``not_asked``: methods the answer was not asked for, with why (the app's Groups page leaves out the ones
    a running build has still to reach: named under ``left_out`` as a query's are, QA 23b #6)."""
    methods = {n: _method_entry(session, n, result.methods[n], result.measurement) for n in result.ok()}
    left_out = _left_out(result.methods, methods)
    if not_asked:
        left_out = {"left_out": {**left_out.get("left_out", {}), **not_asked}}
    seed = getattr(result.qset, "seed", None)
    return {
        **session_settings(session),
        "group": result.group.spec,
        "group_size": int(result.group.size),
        "queries": result.qset.name,
        "queries_key": result.qset.key,  # which images: two pools of one size and other seeds differ here only
        # a pool's seed, as group --json gives it: what `query --query pool:I --pool-seed S` needs (QA 23b #7)
        **({"pool_seed": int(seed)} if seed is not None else {}),
        "measurement": str(result.measurement),
        "methods": methods,
        **left_out,
    }


def settings_json(settings: dict[str, Any]) -> str:
    """The settings as one JSON object (sorted keys): what a program reads back (a PNG's text chunk, the
    last ``# settings:`` line of a CSV, ``--scores-out``'s ``settings`` entry)."""
    return json.dumps(settings, sort_keys=True, default=str)


def settings_digest(settings: dict[str, Any]) -> str:
    """8 hex digits of the settings: part of an export's file name, so two settings never share one."""
    return hashlib.sha256(settings_json(settings).encode()).hexdigest()[:8]


def _damping_words(settings: dict[str, Any]) -> list[str]:
    words = []
    for name, m in settings["methods"].items():
        parts = []
        if "damping" in m:
            parts.append(f"damping {m['damping']:.3g}")
        if m.get("warning") and m.get("damping_floor") is not None:  # the readable lines say it too (QA 37 #3)
            parts.append(f"below its damping floor {m['damping_floor']:.2g}: the scores may weigh rounding")
        if "measurement" in m:
            parts.append(f"{m['measurement']} measurement")
        if m.get("precomputed"):
            parts.append("precomputed")
        words.append(f"{name} ({', '.join(parts)})" if parts else name)
    return words


def settings_lines(settings: dict[str, Any]) -> list[str]:
    """The settings in a few readable lines (a CSV's comment lines, a PNG's heading); the last line is the
    whole JSON object, for a program."""
    model = settings["model"]
    named_by_file = str(settings.get("query", "")).startswith(("upload", "image:"))  # the others name their image
    image = f" (image {settings['query_image']})" if named_by_file and settings.get("query_image") else ""
    what = (f"query: {settings['query']}{image}" if "query" in settings
            else f"group: {settings['group']} ({settings['group_size']} images), queries: {settings['queries']}"
            + (f" (pool seed {settings['pool_seed']})" if "pool_seed" in settings else ""))
    return [
        f"model: {model['preset']}, checkpoint {model['checkpoint']} (content hash {model['checkpoint_hash']}), "
        f"{model['num_train']} training images"
        + (f" ({model['data']}{' from ' + model['data_root'] if model.get('data_root') else ''}, content digest "
           f"{model['data_digest']})" if model.get("data_digest") else ""),
        f"{what}; measurement: {settings['measurement']}, {_draws_words(settings)}",
        "methods: " + "; ".join(_damping_words(settings)),
        *([f"not included: {', '.join(f'{n} ({why})' for n, why in settings['left_out'].items())}"]
          if settings.get("left_out") else []),
        "settings: " + settings_json(settings),
    ]


def csv_with_settings(table_csv: str, settings: dict[str, Any]) -> str:
    """``table_csv`` with the settings as ``# `` lines above its header (read it with
    ``pandas.read_csv(f, comment="#")``)."""
    return "".join(f"# {line}\n" for line in settings_lines(settings)) + table_csv


def _draws_words(settings: dict[str, Any]) -> str:
    """The query's draws as the readable lines say them: none for a trajectory (QA 40 #9: an export said "64 Monte
    Carlo draws" for a measurement that reads no draws), else what its M means for the measurement."""
    from ..model.measurements import draws_phrase

    return draws_phrase(str(settings["measurement"]), settings["mc_samples"])
