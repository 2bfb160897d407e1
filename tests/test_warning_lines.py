"""engine.warning_lines: the project's warnings as one line each, and a load's own collected per thread.

The app's collector was ``warnings.catch_warnings(record=True)``, process-wide state swapped on entry and
restored on exit; a server runs loads, builds and queries in threads, and two blocks that overlapped ("A
enters, B enters, A leaves, B leaves") left every later warning of the process recorded into A's finished
list, never shown.  These run in a fresh interpreter: pytest wraps each test in a ``catch_warnings`` of its own."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


def test_overlapping_loads_in_two_threads_keep_their_own_warnings_and_leave_none_swallowed(tmp_path):
    done = _python(f"""
        import json, threading, warnings
        from explorer.runtime import load_warnings

        ENGINE = {str(ROOT / "engine" / "config.py")!r}
        def engine_warning(text):  # as if engine/config.py:1 had warned
            warnings.warn_explicit(text, UserWarning, ENGINE, 1)

        a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
        said = {{}}

        def a():
            with load_warnings() as said["a"]:
                a_in.set()
                engine_warning("from A")
                assert b_in.wait(30)
            a_out.set()

        def b():
            assert a_in.wait(30)
            with load_warnings() as said["b"]:
                b_in.set()
                engine_warning("from B")
                a_out.wait(3)  # A leaves first: the order that broke the process-wide state

        threads = [threading.Thread(target=f) for f in (a, b)]
        for t in threads: t.start()
        for t in threads: t.join(60)
        engine_warning("after both")  # no block open: a terminal line
        warnings.warn("another package's", UserWarning)  # Python's own form
        print(json.dumps(said))
    """, tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"a": ["from A"], "b": ["from B"]}
    assert "warning: after both" in done.stderr.splitlines(), done.stderr
    assert "UserWarning: another package's" in done.stderr


def test_a_second_load_of_the_same_folder_collects_its_warning_again(tmp_path):
    """Python shows a warning once per code location; a retried load (each visit retries a failed one) must still
    put it on its page, as ``catch_warnings``' "always" filter did."""
    import numpy as np
    from PIL import Image

    for rel in ("circles/a.png", "squares/b.png", "stray.png"):
        (tmp_path / "d" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(tmp_path / "d" / rel)
    done = _python(f"""
        import json
        from engine.config import DataConfig
        from engine.model.data_files import load
        from explorer.runtime import load_warnings

        cfg = DataConfig(name="folder", root={str(tmp_path / "d")!r}, image_size=8, channels=1, levels=256)
        load(cfg)  # outside a block: Python shows it (its registry now holds it)
        lists = []
        for _ in range(2):
            with load_warnings() as said:
                load(cfg)
            lists.append(said)
        print(json.dumps(lists))
    """, tmp_path)
    assert done.returncode == 0, done.stderr
    first, second = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(first) == 1 and "stray.png" in first[0] and second == first


def test_the_seed_average_is_nanmeans_value_without_its_warning():
    """``lds.seed_average`` no longer wraps ``np.nanmean`` in a process-wide ``catch_warnings``: the same values,
    bit for bit and in the input's dtype, a subset no seed has trained yet (all NaN) included, and no warning."""
    import warnings

    import numpy as np

    from engine.evaluation.lds import seed_average

    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        x = (rng.normal(size=(3, 6, 7)) * 50).astype(dtype)
        x[rng.random(x.shape) < 0.4] = np.nan
        x[:, 0, 0] = np.nan  # no seed trained yet
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            expected = np.nanmean(x, axis=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = seed_average(x)
        assert got.dtype == dtype and np.array_equal(got, expected, equal_nan=True) and np.isnan(got[0, 0])
