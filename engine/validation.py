"""Checks of user-supplied numbers, done once in the engine so the CLI, the app and the API agree.

Damping (docs/architecture.md §4; paper eq. 6): scores are (1/N) grad m^T (G + lambda I)^{-1} grad l_i with G
positive semi-definite.  lambda must be finite and > 0: lambda = 0 divides by G's zero eigenvalues
(inf/NaN scores), lambda < 0 makes (G + lambda I) indefinite (directions with eigenvalue below
|lambda| flip sign, so the ranking silently inverts), NaN/inf give NaN or all-zero scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


class InvalidSettingError(ValueError):
    """A setting outside its valid range; the message names the setting and the accepted values."""


MAX_DAMPING = 1e30
"""Largest damping accepted (presets' ``attribution.*_damping``, ``--damping``, the app, the API).

Scores are float32: above float32's largest value (about 3.4e38) lambda becomes inf and every
1/(e + lambda) is 0, so every score is 0 and the ranking is meaningless, without any error (QA: 1e39
gave all zeros, 1e30 still ranked).  The limit stays well inside float32's range, where QA saw scores
still rank; no useful damping comes near it (the damping grid, engine.attribution.damping_grid, ends at 1e3)."""


def check_damping(value: Any, what: str = "damping") -> float:
    """``value`` as a float if it is a finite number in (0, MAX_DAMPING]; InvalidSettingError naming ``what``
    otherwise."""
    if isinstance(value, bool):
        raise InvalidSettingError(f"{what} must be a number > 0, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InvalidSettingError(f"{what} must be a number > 0, got {value!r}") from None
    if not math.isfinite(x) or x <= 0.0:
        raise InvalidSettingError(
            f"{what} must be finite and > 0 (e.g. 1e-8), got {value!r}: lambda = 0 divides by the "
            "curvature's zero eigenvalues and lambda < 0 flips the sign of low-curvature directions"
        )
    if x > MAX_DAMPING:
        raise InvalidSettingError(
            f"{what} must be at most {MAX_DAMPING:g}, got {value!r}: the scores are float32, and so large a "
            "lambda makes every score 0"
        )
    return x


# --- presets: field types and ranges ---------------------------------------------------------


def coerce_field(section: str, name: str, hint: Any, value: Any) -> Any:
    """``value`` checked against a dataclass field's type hint (lists become tuples, ints become floats).

    Supports what the config dataclasses use: int, float, bool, str, ``X | None`` and ``tuple[int, ...]``.
    """
    import types
    import typing

    where = f"{section}.{name}"
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce_field(section, name, inner, value)
    if hint is bool:
        if not isinstance(value, bool):
            raise InvalidSettingError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidSettingError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidSettingError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise InvalidSettingError(f"{where} must be a string, got {value!r}")
        return value
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)):
            raise InvalidSettingError(f"{where} must be a list, got {value!r}")
        inner = args[0]
        return tuple(coerce_field(section, f"{name}[{i}]", inner, v) for i, v in enumerate(value))
    return value


DATA_NAMES = ("digits", "mnist", "cifar10", "cifar2", "folder")  # what engine.model.data.load_dataset reads (and names)


def _need(ok: bool, where: str, rule: str, value: Any) -> None:
    if not ok:
        raise InvalidSettingError(f"{where} must be {rule}, got {value!r}")


# The values of ``AttributionConfig.draws`` (engine.attribution.train_draws): the shared modes give every
# training example the same M draws, which the query may then share (``query_draws="bank"``).
SHARED_DRAW_MODES = ("shared", "stratified")
DRAW_MODES = (*SHARED_DRAW_MODES, "per-example")

# The values of the other AttributionConfig settings that name a choice, written once here, where a preset file
# and the CLI's flags are checked: the modules that act on them import these (curvature, kfac_influence,
# projection, layer_projection), so a value cannot be accepted by one and refused by the other (QA 31b #3: a preset
# file's "trak_projection": "bogus" passed every check and failed in the build, naming neither file nor key)
QUERY_DRAWS = ("own", "bank")
FACTOR_DRAW_MODES = ("same", "per-example")
FACTOR_DTYPES = ("float32", "float64")  # the K-FAC factor pass's arithmetic
KFAC_BLOCKS = ("separate", "joint")
FISHER_TYPES = ("mc", "empirical")
KFAC_APPROX = ("expand", "reduce")
TRAK_PROJECTIONS = ("srht", "rademacher", "gaussian", "identity")  # identity: no projection (k = P; tests)
KFAC_PROJECTIONS = ("eigen", "gaussian")  # the compressed bank's per-layer projections
RERANK_SPLITS = ("adaptive", "even")


def one_line(text: object) -> str:
    """``text`` with its whitespace (newlines included) folded to single spaces: an error or warning as the CLI and
    the app's terminal print it, one line each (a message that spans lines, an OSError's, a warning's)."""
    return " ".join(str(text).split())


def word_list(items: Sequence[str], last: str = "or") -> str:
    """"a, b or c" (``last`` "and": "a, b and c"; one item alone, none ""): the words of a refusal that lists
    the accepted values, and of any sentence that names several things (the app's method titles)."""
    items = list(items)
    return f"{', '.join(items[:-1])} {last} {items[-1]}" if len(items) > 1 else "".join(items)


def _need_one_of(value: Any, choices: tuple[str, ...], where: str) -> None:
    """InvalidSettingError naming ``where`` and the choices, "a, b or c", unless ``value`` is one of them."""
    _need(value in choices, where, word_list(choices), value)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# torch.Generator seeds are unsigned 64-bit integers; a larger one fails deep inside torch with "Overflow"
MAX_SEED = 2**64 - 1


def check_seed(seed: Any, what: str = "seed", stride: int = 1, count: int = 1) -> int:
    """``seed`` as an int if every generator seed derived from it, ``seed * stride + i`` for i < ``count``
    (``Diffusion.sample`` gives sample i its own), fits torch's unsigned 64 bits; InvalidSettingError naming
    ``what`` and the largest valid seed otherwise."""
    largest = (MAX_SEED - max(int(count), 1) + 1) // stride
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= largest:
        raise InvalidSettingError(f"{what} must be an integer from 0 to {largest}, got {seed!r}")
    return seed


def check_train_config(tc: Any, where: str = "train") -> None:
    """Ranges of the training recipe (``TrainConfig``): refused before anything is written."""
    check_seed(tc.seed, f"{where}.seed (--seed)", count=2)  # train seeds torch with seed and seed + 1
    _need(tc.steps >= 1, f"{where}.steps (--steps)", "at least 1", tc.steps)
    _need(tc.batch_size >= 1, f"{where}.batch_size", "at least 1", tc.batch_size)
    _need(_finite(tc.lr) and tc.lr > 0, f"{where}.lr", "finite and > 0", tc.lr)
    _need(_finite(tc.weight_decay) and tc.weight_decay >= 0, f"{where}.weight_decay", "finite and >= 0", tc.weight_decay)
    _need(_finite(tc.warmup_frac) and 0 <= tc.warmup_frac <= 1, f"{where}.warmup_frac", "in [0, 1]", tc.warmup_frac)
    _need(_finite(tc.grad_clip) and tc.grad_clip >= 0, f"{where}.grad_clip", "finite and >= 0", tc.grad_clip)
    if tc.ema_decay is not None:
        _need(_finite(tc.ema_decay) and 0 <= tc.ema_decay < 1, f"{where}.ema_decay", "in [0, 1) or null", tc.ema_decay)
    _need(tc.log_every >= 1, f"{where}.log_every", "at least 1", tc.log_every)
    _need(tc.checkpoint_every >= 1, f"{where}.checkpoint_every", "at least 1", tc.checkpoint_every)
    _need(_finite(tc.checkpoint_seconds) and tc.checkpoint_seconds >= 0, f"{where}.checkpoint_seconds",
          "finite and >= 0 (0: off)", tc.checkpoint_seconds)


def check_data_fits_model(model: Any, image_shape: tuple[int, ...]) -> None:
    """The training images' (C, H, W) must be what the model takes (``model.in_channels``,
    ``model.image_size``): checked before training or attributing, so that a preset that does not
    match its data says so in one line instead of failing inside a convolution (or, for the size,
    training a model whose samples the data cannot be compared with)."""
    want = (int(model.in_channels), int(model.image_size), int(model.image_size))
    if tuple(int(v) for v in image_shape) != want:
        raise InvalidSettingError(
            f"training images are {tuple(image_shape)} (channels, height, width) but the model takes {want}; "
            "check --preset/--data-root against the checkpoint (a preset JSON sets model.in_channels and "
            "model.image_size, and data.channels and data.image_size for the loader)"
        )


def check_factor_draws(
    k: int | None, mc_samples: int, draws: str, where: str = "kfac_factor_draws", factor_mode: str = "same"
) -> None:
    """K-FAC factors from the first k of the M draws (None: all).  With shared draws and k < M the
    factors see k of the bank's M timesteps: the time-embedding layers' input factor is then rank
    <= k and the rows' components in its null space are divided by the damping alone (digits, k = 8
    of 64: Spearman 0.11 with the all-draw scores at damping 1e-8; scripts/factor_draws_agreement.py).
    ``factor_mode`` "per-example": the factors get independent draws per example whatever the bank's, so
    they see every timestep and any k is fine."""
    _need_one_of(factor_mode, FACTOR_DRAW_MODES, "kfac_factor_draws_mode (--kfac-factor-draws-mode)")
    if k is None:
        return
    _need(k >= 1, where, "at least 1 (or null: all M draws)", k)
    _need(k >= mc_samples or draws == "per-example" or factor_mode == "per-example", f"{where} (--kfac-factor-draws)",
          "per-example draws for the factors (--kfac-factor-draws-mode per-example, or --draws per-example) "
          "when below mc_samples: with shared draws the factors would see only k of the bank's M timesteps", k)


def check_attribution_config(ac: Any, where: str = "attribution", bank_modes: tuple[str, ...] | None = None) -> None:
    """Ranges of the attribution settings (``AttributionConfig``).

    ``bank_modes``: the valid ``kfac_bank`` values (``attribution.bank_kinds.bank_modes()``; bank kinds
    register themselves, so the caller that knows the registry passes them; None skips that check)."""
    _need(ac.mc_samples >= 1, f"{where}.mc_samples (--mc-samples)", "at least 1", ac.mc_samples)
    check_seed(ac.seed, f"{where}.seed (--attribution-seed)", count=2)  # the query's own draws use seed + 1
    _need(ac.trak_dim >= 1, f"{where}.trak_dim (--trak-dim)", "at least 1", ac.trak_dim)
    check_damping(ac.kfac_damping, f"{where}.kfac_damping")
    for name in ("trak_damping", "dtrak_damping"):  # None: the N-scaled default (config.trak_default_damping)
        if getattr(ac, name) is not None:
            check_damping(getattr(ac, name), f"{where}.{name}")
    _need_one_of(ac.draws, DRAW_MODES, f"{where}.draws (--draws)")
    _need_one_of(ac.query_draws, QUERY_DRAWS, f"{where}.query_draws (--query-draws)")
    _need(ac.query_draws == "own" or ac.draws in SHARED_DRAW_MODES, f"{where}.query_draws (--query-draws)",
          "own when the training draws are per-example (the query can share the bank's draws only when every "
          "training example has the same ones: --draws shared or stratified)", ac.query_draws)
    check_factor_draws(ac.kfac_factor_draws, ac.mc_samples, ac.draws, f"{where}.kfac_factor_draws",
                       ac.kfac_factor_draws_mode)
    _need_one_of(ac.kfac_factor_dtype, FACTOR_DTYPES, f"{where}.kfac_factor_dtype (--kfac-factor-dtype)")
    _need_one_of(ac.kfac_blocks, KFAC_BLOCKS, f"{where}.kfac_blocks (--kfac-blocks)")
    _need_one_of(ac.fisher_type, FISHER_TYPES, f"{where}.fisher_type")
    _need_one_of(ac.kfac_approx, KFAC_APPROX, f"{where}.kfac_approx")
    _need_one_of(ac.trak_projection, TRAK_PROJECTIONS, f"{where}.trak_projection")
    _need_one_of(ac.kfac_projection, KFAC_PROJECTIONS, f"{where}.kfac_projection (--kfac-projection)")
    if bank_modes is not None:
        _need(ac.kfac_bank in bank_modes, f"{where}.kfac_bank", "one of " + ", ".join(bank_modes), ac.kfac_bank)
    _need(_finite(ac.kfac_bank_max_gb) and ac.kfac_bank_max_gb > 0, f"{where}.kfac_bank_max_gb", "> 0", ac.kfac_bank_max_gb)
    _need(ac.kfac_bank_whiten is None or (_finite(ac.kfac_bank_whiten) and 0 <= ac.kfac_bank_whiten <= 1),
          f"{where}.kfac_bank_whiten", "null or a finite number in [0, 1]", ac.kfac_bank_whiten)
    _need(_finite(ac.kfac_compression) and ac.kfac_compression >= 1, f"{where}.kfac_compression (--kfac-compression)",
          "finite and >= 1", ac.kfac_compression)
    _need(ac.kfac_rerank >= 0, f"{where}.kfac_rerank (--kfac-rerank)", "at least 0", ac.kfac_rerank)
    _need_one_of(ac.kfac_rerank_split, RERANK_SPLITS, f"{where}.kfac_rerank_split (--kfac-rerank-split)")


def check_compute_config(cc: Any, where: str = "compute") -> None:
    """Ranges of the speed and memory settings (``ComputeConfig``): whole numbers, at least 1 (rows, batches,
    bytes), except ``pack_max_bytes``, which may be 0 (never pack).  Checked when one is made, so a preset
    file's bad value is refused in one line naming its key."""
    import dataclasses

    for f in dataclasses.fields(cc):
        value = getattr(cc, f.name)
        least = 0 if f.name == "pack_max_bytes" else 1
        _need(isinstance(value, int) and not isinstance(value, bool) and value >= least, f"{where}.{f.name}",
              "a whole number, at least 0 (0: never pack)" if least == 0 else "a whole number, at least 1", value)


def check_preset(preset: Any) -> None:
    """Every range a preset's numbers must satisfy (types are checked when it is read)."""
    m, d, data = preset.model, preset.diffusion, preset.data
    _need(m.image_size >= 1, "model.image_size", "at least 1", m.image_size)
    _need(m.in_channels >= 1, "model.in_channels", "at least 1", m.in_channels)
    _need(m.base_channels >= 1, "model.base_channels", "at least 1", m.base_channels)
    _need(len(m.channel_mults) >= 1 and all(c >= 1 for c in m.channel_mults), "model.channel_mults",
          "a non-empty list of positive integers", m.channel_mults)
    _need(m.num_res_blocks >= 1, "model.num_res_blocks", "at least 1", m.num_res_blocks)
    _need(_finite(m.dropout) and 0 <= m.dropout < 1, "model.dropout", "in [0, 1)", m.dropout)
    _need(m.num_groups >= 1, "model.num_groups", "at least 1", m.num_groups)
    # GroupNorm(min(groups, width), width) at every width the U-Net has (QA 26 #6: torch's "num_channels (32)
    # must be divisible by num_groups (7)" named neither the setting nor the file)
    widths = sorted({m.base_channels} | {m.base_channels * k for k in m.channel_mults})
    _need(all(w % min(m.num_groups, w) == 0 for w in widths), "model.num_groups",
          f"a divisor of the model's channel widths {widths} (model.base_channels x model.channel_mults)",
          m.num_groups)
    _need(d.num_timesteps >= 1, "diffusion.num_timesteps", "at least 1", d.num_timesteps)
    _need(_finite(d.beta_start) and _finite(d.beta_end) and 0 < d.beta_start <= d.beta_end < 1,
          "diffusion.beta_start/beta_end", "0 < beta_start <= beta_end < 1", (d.beta_start, d.beta_end))
    _need(data.name in DATA_NAMES, "data.name", f"one of {', '.join(DATA_NAMES)}", data.name)
    _need(data.channels >= 1, "data.channels", "at least 1", data.channels)
    _need(data.per_class >= 1, "data.per_class", "at least 1 (images of each class kept)", data.per_class)
    _need(data.levels >= 2, "data.levels", "at least 2", data.levels)
    check_train_config(preset.train)
    check_attribution_config(preset.attribution)
    check_compute_config(preset.compute)
