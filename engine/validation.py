"""Checks of user-supplied numbers, done once in the engine so the CLI, the app and the API agree.

Damping (DESIGN.md 4; paper eq. 6): scores are (1/N) grad m^T (G + lambda I)^{-1} grad l_i with G
positive semi-definite.  lambda must be finite and > 0: lambda = 0 divides by G's zero eigenvalues
(inf/NaN scores), lambda < 0 makes (G + lambda I) indefinite (directions with eigenvalue below
|lambda| flip sign, so the ranking silently inverts), NaN/inf give NaN or all-zero scores.
"""

from __future__ import annotations

import math
from typing import Any


class InvalidSettingError(ValueError):
    """A setting outside its valid range; the message names the setting and the accepted values."""


def check_damping(value: Any, what: str = "damping") -> float:
    """``value`` as a float if it is a finite number > 0; InvalidSettingError naming ``what`` otherwise."""
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
    return x
