"""Registry of attribution methods (INTERFACES.md).

``METHODS`` maps a method name to its class.  Classes are imported on first access, so
that a method whose module is missing or heavy (K-FAC needs curvlinops; CLIP imports
open_clip only when used) does not stop the others from loading.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from ...config import AttributionConfig
from .base import AttributionMethod, Prepared, QueryInput, Unavailable

_WHERE: dict[str, tuple[str, str]] = {
    "kfac": ("kfac_influence", "KFACInfluence"),
    "trak": ("trak", "TRAK"),
    "dtrak": ("trak", "DTRAK"),
    "clip": ("clip_cosine", "CLIPCosine"),
    "pixel": ("pixel_cosine", "PixelCosine"),
}


class _LazyRegistry(Mapping[str, type[AttributionMethod]]):
    """name -> class, importing the class's module on first access."""

    def __init__(self, where: dict[str, tuple[str, str]]):
        self._where = where

    def __getitem__(self, name: str) -> type[AttributionMethod]:
        if name not in self._where:
            raise KeyError(name)
        module, cls = self._where[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), cls)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


METHODS: Mapping[str, type[AttributionMethod]] = _LazyRegistry(_WHERE)


def make_method(name: str, config: AttributionConfig | None = None) -> AttributionMethod:
    """A fresh instance of method ``name`` with its default damping taken from ``config``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name](config or AttributionConfig())


__all__ = ["METHODS", "AttributionMethod", "Prepared", "QueryInput", "Unavailable", "make_method"]
