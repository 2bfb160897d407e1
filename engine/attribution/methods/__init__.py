"""Registry of attribution methods: the only list of method names in the engine.

Everything else (the session, the CLI, the LDS, the bench, the app) asks this registry which
methods exist and asks each method class what it is (``AttributionMethod``: title, kind,
default damping and its range, config fields, whether it shards and takes part in sweeps).

Adding a method is one file: put a subclass of ``AttributionMethod`` decorated with ``@register``
in this package (its ``name`` a literal, its place in lists an ``order``), and every front-end
lists it.  The registry finds such files by reading their source (``engine.attribution.plugins``),
so listing names imports no method module, and a method whose optional dependency is missing
(K-FAC needs curvlinops; CLIP imports open_clip only when used) does not stop the others from
loading: the session reports it as unavailable with the import error.  A class defined elsewhere
(a script, a test) is added by calling ``register`` on it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ...config import AttributionConfig
from ..plugins import Declared, declared_classes, scan_calls, scan_classes

if TYPE_CHECKING:  # the registry itself stays light (no torch): the CLI lists names with it
    from .base import AttributionMethod

_PACKAGE_DIR = Path(__file__).resolve().parent
_REGISTERED: dict[str, type[AttributionMethod]] = {}


def _shipped() -> dict[str, tuple[str, str]]:
    """name -> (module in this package, class) of every ``@register`` class here, in display order."""
    return {d.name: (d.module, d.cls or "") for d in declared_classes(_PACKAGE_DIR)}


def declaration(name: str) -> Declared | None:
    """What this package's source declares for method ``name`` (its file, title and kind), or None."""
    return next((d for d in declared_classes(_PACKAGE_DIR) if d.name == name), None)


def source_file(name: str) -> str | None:
    """``engine/attribution/methods/<module>.py`` of a method this package declares, for messages."""
    d = declaration(name)
    return None if d is None else f"engine/attribution/methods/{d.module}.py"


def plugin_problems() -> list[str]:
    """Every problem the scan of this package's files found (a file that does not parse, a class with no
    literal name, a name declared twice, for methods and bank kinds alike), each naming its file, once."""
    found = [*scan_classes(_PACKAGE_DIR).problems, *scan_calls(_PACKAGE_DIR, "register_bank_kind").problems]
    return list(dict.fromkeys(found))


def register(cls: type[AttributionMethod]) -> type[AttributionMethod]:
    """Class decorator: make ``cls`` available under ``cls.name`` everywhere.

    On a class in this package it marks the class for the registry's scan (importing the module
    then registers the same class); on a class defined elsewhere, it adds it after the shipped ones."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTERED[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a method added with ``register`` (tests)."""
    _REGISTERED.pop(name, None)


class _Registry(Mapping[str, "type[AttributionMethod]"]):
    """name -> class; this package's methods first (imported on first access), then registered ones."""

    def __getitem__(self, name: str) -> type[AttributionMethod]:
        if name in _REGISTERED:
            return _REGISTERED[name]
        shipped = _shipped()
        if name not in shipped:
            raise KeyError(name)
        module, cls = shipped[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), cls)

    def __iter__(self) -> Iterator[str]:
        shipped = _shipped()
        yield from shipped
        yield from (n for n in _REGISTERED if n not in shipped)

    def __len__(self) -> int:
        return len(set(_shipped()) | set(_REGISTERED))


METHODS: Mapping[str, type[AttributionMethod]] = _Registry()


def method_names() -> list[str]:
    """Every method's name, in display order (no module is imported)."""
    return list(METHODS)


def names_of_kind(kind: str) -> list[str]:
    """The methods of ``kind`` ("influence" or "similarity"), in display order, read from their declarations
    (no module is imported: the CLI's help texts list them, QA 30b: typed by hand, they left a new method out)."""
    def kind_of(name: str) -> str | None:  # a registered class (imported: its own), else its file's literal
        cls = _REGISTERED.get(name)
        return cls.kind if cls is not None else declaration(name).kind  # type: ignore[union-attr]

    return [name for name in METHODS if kind_of(name) == kind]


def gradient_methods() -> list[str]:
    """The influence methods whose scores come from gradients (``needs_gradient``), in display order, read from
    their declarations (no module is imported): what "every gradient method" means where a setting of the
    gradients (M, the query's draws) is varied for all of them (``lds-ablation``, QA 70 F3: a hand-written
    list left a new method out)."""
    def needs_gradient(name: str) -> bool:
        cls = _REGISTERED.get(name)
        if cls is not None:
            return bool(cls.needs_gradient)
        declared = declaration(name)
        return declared is None or declared.needs_gradient is not False  # the base class's default: True

    return [name for name in names_of_kind("influence") if needs_gradient(name)]


def parse_methods(text: str | None) -> list[str] | None:
    """'kfac,trak' -> ['kfac', 'trak']; None/'all' -> None (every method).  Unknown names: ValueError."""
    if text is None or text.strip().lower() == "all":
        return None
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    valid = method_names()
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise ValueError(f"unknown method(s) {', '.join(bad) or repr(text)}; valid methods: {', '.join(valid)}")
    return names


def make_method(name: str, config: AttributionConfig | None = None) -> AttributionMethod:
    """A fresh instance of method ``name`` with its default damping taken from ``config``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name](config or AttributionConfig())


__all__ = [
    "METHODS",
    "declaration",
    "gradient_methods",
    "make_method",
    "method_names",
    "names_of_kind",
    "parse_methods",
    "plugin_problems",
    "register",
    "source_file",
    "unregister",
]
