"""The attribution-setting flags (``--mc-samples``, ``--kfac-bank``, ... ``--attribution-seed``): one definition for
every program that opens a session, the CLI's ``build``/``query``/... (``engine.cli.attribution``) and the app
(``explorer.app_flags``), and how their values become the session's ``AttributionConfig``.

Why here (QA 54 F3): the app had none of these flags, so caches built with ``build --mc-samples 1 --kfac-bank
compressed`` were not the app's, which started a build at the preset's M.  Both programs now add the same options,
with the same help, types and choices, and apply them by the same rule.  No ``argparse`` import (only the CLI
parses arguments: tests/test_architecture.py): the caller passes its parser, and nothing here imports torch but
``check_settings`` for a bank kind named by ``--kfac-bank``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from ..config import SETTING_FLAGS, AttributionConfig
from ..validation import (
    DRAW_MODES,
    FACTOR_DRAW_MODES,
    FACTOR_DTYPES,
    KFAC_BLOCKS,
    KFAC_PROJECTIONS,
    QUERY_DRAWS,
    RERANK_SPLITS,
    SHARED_DRAW_MODES,
    check_attribution_config,
)
from .bank_kinds import bank_kind, bank_modes, bank_notes


def kfac_bank_help() -> str:
    """``--kfac-bank``'s help: every kind the registry offers (a kind added in one file included; read from
    the package's source, nothing imported), each with the note its file gives, then auto."""
    kinds, notes = [k for k in bank_modes() if k != "auto"], bank_notes()
    listed = ", ".join(f"{k} ({notes[k]})" if k in notes else k for k in kinds)
    limit = AttributionConfig().kfac_bank_max_gb
    return (f"K-FAC training-gradient bank: {listed}, auto (stored if under the preset's kfac_bank_max_gb, "
            f"{limit:g} GiB by default, else compressed; default)")


def _options() -> dict[str, dict[str, Any]]:
    """Each setting's ``add_argument`` keywords, by its field (``SETTING_FLAGS`` names the flag; dest = field)."""
    return {
        "mc_samples": dict(type=int, help="Monte Carlo draws M of (t, eps) per example for train and query gradients "
                                          "(default: preset's, 64 on digits)"),
        "trak_dim": dict(type=int, help="TRAK/D-TRAK projection dimension (default: preset's)"),
        "kfac_bank": dict(help=kfac_bank_help()),
        "draws": dict(choices=DRAW_MODES,
                      help="training-gradient and curvature draws: independent per example (paper G.3; the default "
                           "except on mnist), shared by every example, or shared with stratified timesteps"),
        "query_draws": dict(choices=QUERY_DRAWS,
                            help="the query gradient's draws: its own (default; independent of the training "
                                 "gradients') or the bank's (common random numbers with every training example; needs "
                                 "shared or stratified draws)"),
        "kfac_blocks": dict(choices=KFAC_BLOCKS,
                            help="K-FAC blocks: weight and bias separate (default) or one joint block per layer "
                                 "(ablation)"),
        "kfac_factor_draws": dict(type=int, help="K-FAC factors from the first k of the M draws of every example (k >= "
                                                 "M: all M; default: the preset's, 8 on digits, all M elsewhere)"),
        "kfac_factor_draws_mode": dict(choices=FACTOR_DRAW_MODES,
                                       help="draws of the K-FAC factor pass: the bank's (same, default) or independent "
                                            "per example (per-example, paper G.3; allows --kfac-factor-draws below M "
                                            "with shared bank draws)"),
        "kfac_factor_dtype": dict(choices=FACTOR_DTYPES,
                                  help="arithmetic of the K-FAC factor pass: float32 (default, the model's) or float64 "
                                       "(slower; in float32 dampings below about 1e-9 score the factors' rounding on a "
                                       "small training set). With the MC-Fisher, float64 also draws other sampled "
                                       "labels: another Monte Carlo sample of G"),
        "kfac_projection": dict(choices=KFAC_PROJECTIONS, help="compressed bank: projection kind (default gaussian)"),
        "kfac_compression": dict(type=float,
                                 help="compressed bank: full bank bytes / compressed bank bytes (default: the "
                                      "preset's, 32; 128 for cifar10)"),
        "kfac_rerank": dict(type=int, help="compressed bank: C, where 2C candidates are re-ranked exactly, shared "
                                           "between the ends (--kfac-rerank-split; default 256; 0: none)"),
        "kfac_rerank_split": dict(choices=RERANK_SPLITS,
                                  help="compressed bank: share the 2 x --kfac-rerank candidates between the ends by how "
                                       "crowded each is (adaptive, default: more for the opponents, whose scores are "
                                       "near-ties) or evenly"),
        "seed": dict(type=int, help="seed of the attribution's randomness: the training draws (t, eps), the query's own "
                                    "draws (seed + 1), the MC-Fisher's labels and TRAK's projection; it keys every cache "
                                    "(default: the preset's, 0)"),
    }


def add_setting_options(parser: Any) -> None:
    """Add every ``SETTING_FLAGS`` option to ``parser`` (an ``argparse`` parser or group), each with the field's name
    as its dest and None as its default (None: the preset's value)."""
    options = _options()
    assert set(options) == set(SETTING_FLAGS), "every SETTING_FLAGS field has its option here"
    for name, flag in SETTING_FLAGS.items():
        parser.add_argument(flag, dest=name, default=None, **options[name])


def setting_changes(values: Any) -> dict[str, Any]:
    """The settings the flags gave (field -> value, None left out), from a parsed namespace or a mapping."""
    get = values.get if isinstance(values, Mapping) else (lambda name: getattr(values, name, None))
    return {name: get(name) for name in SETTING_FLAGS if get(name) is not None}


def apply_settings(base: AttributionConfig, changes: Mapping[str, Any],
                   note: Callable[[str], None] | None = None) -> AttributionConfig:
    """``base`` (the preset's settings, or the checkpoint's own) with the flags' ``changes``, by the CLI's rule:
    ``--draws shared|stratified`` without ``--kfac-factor-draws`` takes the factors from all M draws when the base's
    come from k < M of the bank's draws (shared ones would give the factors k of the bank's M timesteps, which
    ``validation.check_factor_draws`` refuses); ``note`` hears that line.  Ranges are ``check_settings``'s."""
    changes = dict(changes)
    if (
        changes.get("draws") in SHARED_DRAW_MODES
        and "kfac_factor_draws" not in changes
        and changes.get("kfac_factor_draws_mode", base.kfac_factor_draws_mode) == "same"
        and base.kfac_factor_draws is not None
    ):
        if note is not None:
            note(f"--draws {changes['draws']}: K-FAC factors from all M draws (the preset's {base.kfac_factor_draws} "
                 "of M need per-example draws)")
        changes["kfac_factor_draws"] = None
    return dataclasses.replace(base, **changes)


def check_settings(config: AttributionConfig) -> None:
    """The session's own check of these settings (``InvalidSettingError`` naming the flag), for a caller that
    refuses them before it loads a model (the app's launcher); and, for a bank kind asked by name, the kind's own
    check (ValueError: ``--kfac-bank compressed --kfac-blocks joint`` started a server whose build then refused it,
    QA 61 F4).  Only then is the kind's module imported (torch with it): ``auto``'s kind needs the model's size."""
    check_attribution_config(config, bank_modes=bank_modes())
    if config.kfac_bank != "auto":
        kind = bank_kind(config.kfac_bank)
        if kind.check is not None:
            kind.check(config, "")

