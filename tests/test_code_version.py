"""``engine.code_version``: the block every record and export carries to name the code that made it."""

from __future__ import annotations

import subprocess

import engine
from engine.code_version import ROOT, code_version


def test_the_code_version_names_the_package_and_in_a_checkout_its_commit():
    v = code_version()
    assert v["version"] == engine.__version__
    if (ROOT / ".git").exists():  # a clone (CI, a developer): HEAD's hash, as git says it
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert v["git_commit"] == head.stdout.strip() and len(v["git_commit"]) == 40
        assert isinstance(v["git_dirty"], bool)
    else:  # an installed copy: no commit to name
        assert v["git_commit"] is None and v["git_dirty"] is None
