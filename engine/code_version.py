"""Which code made a record: the package version and, in a git checkout, the commit and whether it was edited.

Why: a figure or a cache can only be redone by someone who knows which code made it, and defaults change
between rounds (QA round 21: no record the CLI or the app wrote named its code; the README itself says an
old retrain-top record "does not record" its settings).  Every export, evaluation and bench record carries
this block beside its settings, as ``"code"`` (the LDS run's and its ablations' ``config``, lds-best's
``best_settings``, retrain-top's, group-retrain's, group-bench's and the benches' records; QA 31b #2).  Records
written before a writer added it simply lack the key.  Read once per process: ``git`` runs at most twice,
and not at all outside a checkout (an installed wheel has only its version).
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """{"version": the package's, "git_commit": HEAD's hash or None, "git_dirty": tracked files edited since
    HEAD (True/False; None outside a checkout)}."""
    from . import __version__

    commit = _git("rev-parse", "HEAD") if (ROOT / ".git").exists() else None
    dirty = None
    if commit is not None:
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = None if status is None else bool(status)
    return {"version": __version__, "git_commit": commit, "git_dirty": dirty}
