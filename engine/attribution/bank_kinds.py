"""How K-FAC keeps its rotated training rows: the registry of bank kinds.

A bank kind turns (the K-FAC method, the engine context, the K-FAC factors, a progress callback)
into ``scoring.Rows``, which is all the scoring operator needs.  Built-in kinds
(``engine.attribution.methods.kfac_bank_kinds``): ``stored`` (the rotated int8 bank on disk)
and ``streamed`` (no bank: one gradient pass per query, the whole damping grid at once).

A new kind is one file in ``engine/attribution/methods/`` that defines a builder and calls
``register_bank_kind("NAME", ...)`` at top level: the registry finds the call by reading the
package's source (``engine.attribution.plugins``), so ``--kfac-bank NAME`` offers it, and imports
the module only when that kind is used.  ``compressed`` (``methods/kfac_compressed_bank.py``) was
added this way.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .plugins import declared_calls

if TYPE_CHECKING:  # the registry stays light (no torch): the CLI's --kfac-bank help lists the kinds with it
    from .scoring import Rows

_KIND_PACKAGE = "engine.attribution.methods"  # where bank-kind files live (the K-FAC method's package)
_KIND_DIR = Path(__file__).resolve().parent / "methods"


@dataclass(frozen=True)
class BankKind:
    """``build(method, ctx, factors, progress) -> Rows``; ``stored``: the rows are a cache artefact
    of the K-FAC method (counted in its cache keys, sizes and build times); ``cache_key(method, ctx)``:
    that artefact's (name, settings) when it is not the stored bank's; ``estimates``: the rows' batched
    product is an estimate of eq. 6, not eq. 6 (the compressed bank's scan), so group sums and member
    scores come from the rows' exact paths instead (``KFACInfluence.exact_group_scores``); ``note``: a few
    words for ``--kfac-bank``'s help, read from the file's source as a literal (``bank_notes``);
    ``gradient_pass``: the build makes a pass over the training gradients (False: nothing to build but the
    factors, as for the streamed kind), for the build bar's split (``KFACInfluence.factor_share``);
    ``check(config, chosen)``: raises ValueError for attribution settings (``AttributionConfig``) the kind cannot
    serve, called before the factor pass (minutes to hours at CIFAR scale), so that a refused combination fails at
    once, not after it (QA 55 #1), and by the app's launcher before a server starts when the kind is asked by name
    (QA 61 F4); ``chosen`` says why ``auto`` picked the kind ("" when named), for the message."""

    build: Callable[[Any, Any, Any, Callable[[str, float], None]], Rows]
    stored: bool
    cache_key: Callable[[Any, Any], tuple[str, dict[str, Any]]] | None = None
    estimates: bool = False
    note: str = ""
    gradient_pass: bool = True
    check: Callable[[Any, Any], None] | None = None


_KINDS: dict[str, BankKind] = {}


def register_bank_kind(name: str, kind: BankKind) -> None:
    """Make ``AttributionConfig.kfac_bank = name`` (``--kfac-bank name``) available.

    ValueError when another module registered the name already: a second file registering ``stored``
    silently replaced the shipped bank (QA round 19); the source scan leaves such a call out too."""
    old = _KINDS.get(name)
    if old is not None and old.build.__module__ != kind.build.__module__:
        raise ValueError(f"bank kind {name!r} is registered twice: by {old.build.__module__} and by "
                         f"{kind.build.__module__}; rename one of them")
    _KINDS[name] = kind


def _declared() -> dict[str, str]:
    """kind name -> the module in ``methods/`` that registers it (read from source, not imported)."""
    return {d.name: d.module for d in declared_calls(_KIND_DIR, "register_bank_kind")}


def bank_notes() -> dict[str, str]:
    """kind name -> its literal ``note`` (read from source, nothing imported), for the kinds that give one."""
    return {d.name: d.title for d in declared_calls(_KIND_DIR, "register_bank_kind") if d.title}


def bank_modes() -> tuple[str, ...]:
    """Valid values of ``kfac_bank``: "auto" and every kind a file declares or code registered."""
    return ("auto", *dict.fromkeys([*_declared(), *_KINDS]))


def bank_kind(name: str) -> BankKind:
    """The kind ``name`` (its module imported on first use); ValueError naming the valid ones otherwise."""
    if name not in _KINDS and name in _declared():
        importlib.import_module(f"{_KIND_PACKAGE}.{_declared()[name]}")
    if name not in _KINDS:
        raise ValueError(f"kfac_bank must be one of {bank_modes()}, not {name!r}")
    return _KINDS[name]
