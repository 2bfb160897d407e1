"""Registry of attribution methods: the only list of method names in the engine.

Everything else (the session, the CLI, the LDS, the bench, the app) asks this registry which
methods exist and asks each method class what it is (``AttributionMethod``: title, kind,
default damping and its range, config fields, whether it shards and takes part in sweeps).

Adding a method is one file: define a subclass of ``AttributionMethod`` and decorate it with
``@register``; for a method shipped in this package, also name its module in ``_BUILTIN`` so
that it is found without importing every method module up front.

Built-in classes are imported on first access, so that a method whose optional dependency is
missing (K-FAC needs curvlinops; CLIP imports open_clip only when used) does not stop the
others from loading: the session reports it as unavailable with the import error.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from ...config import AttributionConfig

if TYPE_CHECKING:  # the registry itself stays light (no torch): the CLI lists names with it
    from .base import AttributionMethod

# name -> (module in this package, class): the built-in methods, in display order.
_BUILTIN: dict[str, tuple[str, str]] = {
    "kfac": ("kfac_influence", "KFACInfluence"),
    "trak": ("trak", "TRAK"),
    "dtrak": ("trak", "DTRAK"),
    "clip": ("clip_cosine", "CLIPCosine"),
    "pixel": ("pixel_cosine", "PixelCosine"),
}
_REGISTERED: dict[str, type[AttributionMethod]] = {}


def register(cls: type[AttributionMethod]) -> type[AttributionMethod]:
    """Class decorator: make ``cls`` available under ``cls.name`` everywhere (after the built-ins)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTERED[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a method added with ``register`` (tests)."""
    _REGISTERED.pop(name, None)


class _Registry(Mapping[str, "type[AttributionMethod]"]):
    """name -> class; built-ins first (imported on first access), then registered methods."""

    def __getitem__(self, name: str) -> type[AttributionMethod]:
        if name in _REGISTERED:
            return _REGISTERED[name]
        if name not in _BUILTIN:
            raise KeyError(name)
        module, cls = _BUILTIN[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), cls)

    def __iter__(self) -> Iterator[str]:
        yield from _BUILTIN
        yield from (n for n in _REGISTERED if n not in _BUILTIN)

    def __len__(self) -> int:
        return len(set(_BUILTIN) | set(_REGISTERED))


METHODS: Mapping[str, type[AttributionMethod]] = _Registry()


def method_names() -> list[str]:
    """Every method's name, in display order (no module is imported)."""
    return list(METHODS)


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
    "make_method",
    "method_names",
    "parse_methods",
    "register",
    "unregister",
]
