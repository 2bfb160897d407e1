"""The app on a user's own data (QA 45 #3, #6, #7, #8), driven by ``streamlit.testing.v1.AppTest``.

* #3: a warning the engine raises while loading the model or the data (a .webp the folder data set skips) is on the
  page (one ``st.warning`` per distinct message, no Python source line) and in the terminal as one ``warning:`` line.
* #6: a tab closed while the page says "Loading the model and the training set ..." no longer leaves the server
  without its build: the load and the build's start are the server's, not the script run's.
* #7: ``-- --help`` prints the app's flags with their help texts and shows them on the page.
* #8: a model or data load failure is printed in the terminal too (one ``error:`` line), not only on the page.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from test_app import APP, TIMEOUT, _handle, _ok, _set_env, tiny_app  # noqa: F401 - fixture

from explorer import runtime


def _app():
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(APP, default_timeout=TIMEOUT)


def _data_copy(tiny_app, tmp_path: Path) -> Path:  # noqa: F811 - the fixture imported above
    """A copy of the tiny checkpoint's training folder: another data root, so another (uncached) handle."""
    data = tmp_path / "copy" / "data"
    shutil.copytree(Path(tiny_app["ATTRIBUTION_CHECKPOINT"]).parent / "data", data)
    return data


def test_help_prints_the_flags_and_their_help_texts(monkeypatch, tmp_path, capsys):
    """QA 45 #7: ``-- --help`` was refused as "unrecognized arguments: --help"; the flags' help texts were never
    shown anywhere."""
    from streamlit.testing.v1 import AppTest

    with pytest.raises(runtime.HelpRequested) as e:
        runtime.parse_args(["--help"], env={})
    text = " ".join(e.value.text.split())  # argparse wraps the lines at the terminal's width
    assert "--data-root" in text and "training data folder (default: the one the checkpoint was trained on)" in text
    assert e.value.code == 0
    monkeypatch.setenv("ATTRIBUTION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", [APP, "--help"])
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    page = "\n".join(c.value for c in at.code)
    assert "training data folder (default: the one the checkpoint was trained on)" in " ".join(page.split())
    assert "--max-retrain-jobs" in page and "ATTRIBUTION_CHECKPOINT" in page
    out = capsys.readouterr().out
    assert "--checkpoint" in out and "the one the checkpoint was trained on" in " ".join(out.split())
    assert not (tmp_path / "cache").exists()  # nothing loaded or built
