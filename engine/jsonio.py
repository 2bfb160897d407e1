"""Strict JSON for every file and printout users read.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which no other JSON parser accepts
(RFC 8259 has no such numbers).  ``dumps`` writes non-finite floats as ``null`` (the value is
unknown, e.g. a bootstrap interval over too few subsets) and then serialises with
``allow_nan=False``, so an output can never hold a bare ``NaN``.  Results whose *scores* are not
finite are refused earlier, in the engine (``AttributionSession``), never silently nulled here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def finite_or_none(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, tuples, numpy scalars and arrays) with NaN/inf floats as None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite_or_none(obj.tolist())
    if isinstance(obj, np.generic):
        return finite_or_none(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that never emits NaN/Infinity (they become null); keyword arguments as json.dumps."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)
