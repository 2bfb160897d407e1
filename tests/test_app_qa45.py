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
import types
import warnings
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


@pytest.mark.slow
def test_a_load_warning_is_on_the_page_and_one_line_in_the_terminal(tiny_app, tmp_path, monkeypatch, capsys):  # noqa: F811
    """QA 45 #3: the folder's warnings reached only the terminal, as Python's "file:line: UserWarning" and its
    source line, and never the page."""
    data = _data_copy(tiny_app, tmp_path)
    (data / "pic.webp").write_bytes(b"RIFF0000WEBP")  # skipped by the folder data set, with a warning
    _set_env({**tiny_app, "ATTRIBUTION_DATA_ROOT": str(data)}, monkeypatch)
    at = _app().run()
    _ok(at)
    skipped = [w.value for w in at.warning if "pic.webp" in w.value]
    assert len(skipped) == 1, [w.value for w in at.warning]
    assert "were skipped" in skipped[0] and "UserWarning" not in skipped[0] and ".py" not in skipped[0]
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "pic.webp" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "were skipped" in lines[0], err
    assert "UserWarning" not in err
    at.run()  # a later run (and a later tab) shows it again, once: the warnings live with the cached handle
    _ok(at)
    assert len([w for w in at.warning if "pic.webp" in w.value]) == 1
    assert "pic.webp" not in capsys.readouterr().err  # the terminal said it once, when the server loaded


def test_the_labels_warning_is_captured_as_one_clean_line(tmp_path):
    """QA 45 #3's other warning: images beside the class folders drop the labels.  ``runtime.load_warnings``
    collects the engine's warnings as single lines; a warning of another package is left to Python."""
    import numpy as np
    from PIL import Image

    from engine.config import DataConfig
    from engine.model.data_files import load  # as the engine reads a folder (the warning names load's caller)

    for rel in ("circles/a.png", "squares/b.png", "stray.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(tmp_path / rel)
    cfg = DataConfig(name="folder", root=str(tmp_path), image_size=8, channels=1, levels=256)
    with pytest.warns(UserWarning, match="foreign"):  # re-shown by Python, not collected
        with runtime.load_warnings() as said:
            load(cfg)
            load(cfg)  # the same warning twice is said once
            warnings.warn("foreign", UserWarning, stacklevel=1)  # this test file is not the engine
    assert len(said) == 1 and "stray.png" in said[0] and "no labels" in said[0] and "\n" not in said[0]


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


def test_a_load_failure_is_one_error_line_in_the_terminal(tmp_path, monkeypatch, capsys):
    """QA 45 #8: a missing checkpoint (or a bad data folder) was said on the page only; a headless server's log
    held the Streamlit banner and nothing else."""
    env = {"ATTRIBUTION_PRESET": "digits", "ATTRIBUTION_CHECKPOINT": str(tmp_path / "nowhere"),
           "ATTRIBUTION_CACHE": str(tmp_path / "cache"), "ATTRIBUTION_DEVICE": "cpu"}
    _set_env(env, monkeypatch)
    at = _app().run()
    assert not at.exception and len(at.error) == 1 and "nowhere" in at.error[0].value
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "nowhere" in lines[0] and "Cannot load" not in lines[0], err
    assert at.error[0].value.startswith("Cannot load the model for preset `digits`: ")  # a preset was named


def test_a_load_failure_with_no_preset_named_names_the_checkpoint(tmp_path, monkeypatch, capsys):
    """QA 45 #1: `-- --checkpoint X --data-root FOLDER` on a bad folder was headed "Cannot load the model for preset
    `digits`", the default preset the user never named."""
    env = {"ATTRIBUTION_CHECKPOINT": str(tmp_path / "nowhere"), "ATTRIBUTION_CACHE": str(tmp_path / "cache"),
           "ATTRIBUTION_DEVICE": "cpu"}
    monkeypatch.delenv("ATTRIBUTION_PRESET", raising=False)
    _set_env(env, monkeypatch)
    at = _app().run()
    assert not at.exception and len(at.error) == 1
    assert at.error[0].value.startswith(f"Cannot load the model from `{tmp_path / 'nowhere'}`: "), at.error[0].value
    assert "preset" not in at.error[0].value.split(":")[0]


@pytest.mark.slow
def test_a_tab_closed_while_loading_still_gets_the_build_started(tiny_app, tmp_path, monkeypatch):  # noqa: F811
    """QA 45 #6: the load ran in the tab's script run.  Closing the tab asks Streamlit to stop that run, and the
    stop was raised at the loading spinner's end, after the handle was cached but before ``start_build``: the
    server built nothing until someone visited again.  Here the stop is asked for in the middle of the load."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    from engine.attribution.precomputed import PrecomputedGallery

    _set_env({**tiny_app, "ATTRIBUTION_CACHE": str(tmp_path / "cache")}, monkeypatch)  # nothing built yet
    real_load = PrecomputedGallery.load
    stopped: list[bool] = []

    def load(*args, **kwargs):  # called inside get_handle: the tab goes away while the model loads
        ctx = get_script_run_ctx(suppress_warning=True)
        if ctx is not None and ctx.script_requests is not None:
            ctx.script_requests.request_stop()
            stopped.append(True)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(PrecomputedGallery, "load", load)
    at = _app().run()
    assert stopped and not at.exception
    handle = _handle()
    assert handle.worker is not None
    state = handle.worker.wait(TIMEOUT)
    assert state.status == "done", (state.status, state.error)
    assert all(handle.session.status()[n]["built"] for n in ("kfac", "trak", "dtrak"))


def test_the_servers_own_model_starts_its_build_first_whichever_tab_asks_first(monkeypatch):
    """QA 47 #2: after a restart, a tab left on digits (the sidebar's switch) reconnected first and started digits'
    build from zero, while the server's own model, mnist, 76% built, waited 7 minutes (one build at a time in a
    server).  A tab on another model loads the server's own too, and that one's build starts first, even when it
    loads slower."""
    import time as _time

    started: list[str] = []

    def get_handle(args):
        _time.sleep(0.5 if args.preset == "mnist" else 0.0)  # the server's own loads slower than the tab's
        return types.SimpleNamespace(name=args.preset)

    monkeypatch.setattr(runtime, "get_handle", get_handle)
    monkeypatch.setattr(runtime, "start_build", lambda handle: started.append(handle.name))
    own, switched = runtime.AppArgs(preset="mnist"), runtime.AppArgs(preset="digits")
    assert runtime.serve(switched, first=own).name == "digits"
    assert started == ["mnist", "digits"]
    started.clear()
    assert runtime.serve(own, first=own).name == "mnist" and started == ["mnist"]  # its own: nothing else
