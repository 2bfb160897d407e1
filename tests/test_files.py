"""engine.files.save_json: strict JSON, a trailing newline, nothing left behind."""

from __future__ import annotations

import json
import math

import numpy as np

from engine.files import save_json


def test_save_json_writes_one_text_line_ending_and_strict_numbers(tmp_path):
    path = tmp_path / "r.json"
    save_json(path, {"a": np.float32(1.5), "b": [math.nan, math.inf], "c": np.arange(3)})
    raw = path.read_bytes()
    assert raw.endswith(b"}\n") and not raw.endswith(b"\n\n")
    assert json.loads(raw) == {"a": 1.5, "b": [None, None], "c": [0, 1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]

