"""How K-FAC keeps its rotated training rows: the registry of bank kinds.

A bank kind turns (the K-FAC method, the engine context, the K-FAC factors, a progress callback)
into ``scoring.Rows``, which is all the scoring operator needs.  Built-in kinds
(``engine.attribution.methods.kfac_bank_kinds``): ``stored`` (the rotated int8 bank on disk)
and ``streamed`` (no bank: one gradient pass per query, the whole damping grid at once).

A new kind (a compressed bank, say) is one module that defines a builder and calls
``register_bank_kind``; naming the module in ``KIND_MODULES`` makes ``--kfac-bank NAME`` find it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .scoring import Rows

# modules that register bank kinds when imported (imported on the first look-up)
KIND_MODULES: tuple[str, ...] = (
    "engine.attribution.methods.kfac_bank_kinds",
    "engine.attribution.methods.kfac_compressed_bank",
)


@dataclass(frozen=True)
class BankKind:
    """``build(method, ctx, factors, progress) -> Rows``; ``stored``: the rows are a cache artefact
    of the K-FAC method (counted in its cache keys, sizes and build times); ``cache_key(method, ctx)``:
    that artefact's (name, settings) when it is not the stored bank's."""

    build: Callable[[Any, Any, Any, Callable[[str, float], None]], Rows]
    stored: bool
    cache_key: Callable[[Any, Any], tuple[str, dict[str, Any]]] | None = None


_KINDS: dict[str, BankKind] = {}


def register_bank_kind(name: str, kind: BankKind) -> None:
    """Make ``AttributionConfig.kfac_bank = name`` (``--kfac-bank name``) available."""
    _KINDS[name] = kind


def _load() -> None:
    for module in KIND_MODULES:
        importlib.import_module(module)


def bank_modes() -> tuple[str, ...]:
    """Valid values of ``kfac_bank``: "auto" and every registered kind."""
    _load()
    return ("auto", *_KINDS)


def bank_kind(name: str) -> BankKind:
    """The registered kind ``name``; ValueError naming the valid ones otherwise."""
    _load()
    if name not in _KINDS:
        raise ValueError(f"kfac_bank must be one of {bank_modes()}, not {name!r}")
    return _KINDS[name]
