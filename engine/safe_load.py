"""Loading state files without running code from them.

``torch.load(..., weights_only=False)`` unpickles arbitrary objects, and a pickle can call any
function while it is read (``__reduce__`` returning ``(os.system, ("...",))``).  A run folder or a
cache is data that may come from elsewhere (copied, downloaded, shared), so every torch state
file in the engine is read here, with ``weights_only=True``: only tensors, numbers, strings,
lists, tuples and dicts are rebuilt, and a file holding anything else is refused with a message
that names the file and says what to do (the files read this way are all resumable state that
the engine can recreate).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


class UnsafeFileError(ValueError):
    """A state file holds objects other than tensors and plain values, or cannot be read; the message says what to do."""


def load_plain_state(path: str | Path, fix: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` restricted to tensors and plain Python values.

    ``fix`` is the sentence telling the user what to do with a refused file (for resumable
    state: delete it, the engine recomputes it).
    """
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UnsafeFileError(
            f"{path} holds objects other than tensors and plain values (written by an older version "
            f"of this program, or tampered with: {first[:160]}); it is not loaded because unpickling "
            f"it could run code. {fix}"
        ) from e
    except (EOFError, RuntimeError, OSError, ValueError) as e:
        raise UnsafeFileError(f"{path} is unreadable ({type(e).__name__}: {str(e)[:160]}). {fix}") from e
