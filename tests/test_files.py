"""engine.files: save_json (strict JSON, a trailing newline, nothing left behind); the output-path checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from engine.files import nearest_existing_folder, save_json


def test_save_json_writes_one_text_line_ending_and_strict_numbers(tmp_path):
    path = tmp_path / "r.json"
    save_json(path, {"a": np.float32(1.5), "b": [math.nan, math.inf], "c": np.arange(3)})
    raw = path.read_bytes()
    assert raw.endswith(b"}\n") and not raw.endswith(b"\n\n")
    assert json.loads(raw) == {"a": 1.5, "b": [None, None], "c": [0, 1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]



class _OutError(ValueError):
    pass


def test_the_nearest_existing_folder_is_where_a_missing_path_would_be_made(tmp_path):
    """One walk for the CLI's output files and train's --out: the path itself when it exists, else its nearest
    existing parent, which must be a folder (the error type is the caller's)."""
    assert nearest_existing_folder(tmp_path, "--out x") == tmp_path
    assert nearest_existing_folder(tmp_path / "a" / "b" / "c", "--out x") == tmp_path
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(_OutError, match=f"^--out {blocker}/run/x: {blocker} is a file, not a folder$"):
        nearest_existing_folder(blocker / "run" / "x", f"--out {blocker}/run/x", _OutError)

