"""The app's page shows a folder decode's progress (``engine.model.decode_progress``, ``explorer.load_progress``).

Before, the first start on a large image folder showed only the spinner "Loading the model and the training set
..." for minutes; the counts went to the server's terminal.  The engine now reports each decoded image to the
listeners of the caller's context, and the app draws them into a placeholder made before ``get_handle``."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.runtime.scriptrunner import RerunException, StopException
from test_app import TIMEOUT, _ok, app_env, tiny_app  # noqa: F401 - fixtures

from engine.config import DataConfig
from engine.model import decode_progress, folder_cache
from engine.model.data import load_dataset
from engine.model.decode_progress import DecodeProgress
from explorer import load_progress


def _folder(root: Path, n: int = 5) -> Path:
    for i in range(n):
        (root / "c").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 6), 10 * i, dtype=np.uint8), "L").save(root / "c" / f"{i}.png")
    return root


def _cfg(root: Path) -> DataConfig:
    return DataConfig(name="folder", root=str(root), image_size=6, channels=1, levels=256)


# --- the engine's hook ------------------------------------------------------------------------------------------------


def test_a_decode_reports_each_image_to_this_contexts_listeners_only(tmp_path, monkeypatch):
    monkeypatch.setenv(folder_cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(folder_cache, "SETTLE_NS", 0)
    root = _folder(tmp_path / "pics")
    heard: list[DecodeProgress] = []
    elsewhere: list[DecodeProgress] = []

    def other_thread() -> None:  # another tab's load, without a listener of its own: ours hears nothing of it
        with monkeypatch.context() as m:
            m.setenv(folder_cache.CACHE_ENV, "off")
            load_dataset(_cfg(root))

    with decode_progress.listening(heard.append):
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        with decode_progress.listening(elsewhere.append):  # nested listeners both hear
            load_dataset(_cfg(root))
        load_dataset(_cfg(root))  # a cache hit decodes nothing, so reports nothing
    load_dataset(_cfg(_folder(tmp_path / "more", 3)))  # outside the block: nobody hears
    assert [p.done for p in heard] == [0, 1, 2, 3, 4, 5]
    assert heard == elsewhere
    assert {(p.folder, p.total) for p in heard} == {(root, 5)}
    assert heard[-1].finished and not heard[-2].finished
    assert all(a.elapsed_s <= b.elapsed_s for a, b in zip(heard, heard[1:], strict=False))


# --- the page's listener ------------------------------------------------------------------------------------------------


class Placeholder:
    """What an ``st.empty()`` is asked to show."""

    def __init__(self, raises: BaseException | None = None) -> None:
        self.shown: list[tuple[float, str] | None] = []
        self.raises = raises

    def progress(self, value: float, text: str) -> None:
        if self.raises is not None:
            raise self.raises
        self.shown.append((value, text))

    def empty(self) -> None:
        self.shown.append(None)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _p(done: int, elapsed: float, total: int = 3000) -> DecodeProgress:
    return DecodeProgress(Path("/data/my pictures"), done, total, elapsed)


def test_the_line_says_the_folder_the_counts_and_the_time_left():
    assert load_progress.progress_text(_p(0, 0.0)) == "Decoding 3,000 images in `/data/my pictures`: 0/3,000"
    assert load_progress.progress_text(_p(100, 2.0)) == "Decoding 3,000 images in `/data/my pictures`: 100/3,000"
    assert load_progress.progress_text(_p(1000, 60.0)) == (
        "Decoding 3,000 images in `/data/my pictures`: 1,000/3,000 (about 2 min left)")
    assert load_progress.progress_text(_p(3000, 150.0)) == (
        "Decoded 3,000 images in `/data/my pictures` in 2 min; loading the rest of the model ...")


def test_the_page_is_drawn_after_a_moment_a_few_times_a_second_and_the_last_count_at_once():
    place, clock = Placeholder(), Clock()
    listener = load_progress.PageProgress(place, "key-a", clock=clock)
    for done in range(0, 3001):  # 3,000 images in 6 s, one report each
        clock.now = done * 0.002
        listener(_p(done, clock.now))
    values = [v for v, _ in place.shown]
    assert values[0] == pytest.approx(250 / 3000)  # nothing in the first SHOW_AFTER_S (0.5 s): a small folder's flash
    assert values[-1] == 1.0 and place.shown[-1][1].startswith("Decoded 3,000 images")
    assert 21 <= len(values) <= 24  # every EVERY_S (0.25 s) over 5.5 s, and the last count
    assert load_progress._latest["key-a"].finished  # what another tab shows meanwhile
    load_progress._latest.clear()


@pytest.mark.parametrize("control", [RerunException(None), StopException()], ids=["rerun", "stop"])
def test_a_rerun_or_stop_while_drawing_waits_for_the_load_to_end(control):
    """A refresh, a click or a closed tab raises at the next element drawn; inside the decode that threw the
    minutes of work away (and a refresh started the decode again).  The load goes on; the request is raised after."""
    place = Placeholder(raises=control)
    decoded = []
    with pytest.raises(type(control)), load_progress.shown(place, "key-b"):
        for done in range(0, 11):
            decode_progress.report(Path("/d"), done, 10, 1.0 + done)
            decoded.append(done)
    assert decoded == list(range(11))  # the whole decode ran
    assert "key-b" not in load_progress._latest


def test_a_page_that_cannot_be_drawn_does_not_fail_the_load(caplog):
    place = Placeholder(raises=RuntimeError("no page"))
    with load_progress.shown(place, "key-c"):
        for done in range(0, 11):
            decode_progress.report(Path("/d"), done, 10, 1.0 + done)
    assert "decode progress not shown on the page: no page" in caplog.text
    assert caplog.text.count("not shown") == 1


def test_another_tab_shows_the_loading_tabs_counts_until_its_load_ends():
    """A second tab, or the page after a refresh, waited on the cache's lock with the spinner only."""
    place = Placeholder()
    load_progress.wait_for_other_load(place, "key-d")  # nothing loading: no wait, nothing drawn
    assert place.shown == []
    reports = iter([_p(500, 10.0), _p(900, 20.0), _p(3000, 60.0)])
    load_progress._latest["key-d"] = next(reports)

    def sleep(_s: float) -> None:  # the loading tab's decode moves on meanwhile, then its load ends
        p = next(reports, None)
        if p is None:
            load_progress._latest.pop("key-d")
        else:
            load_progress._latest["key-d"] = p

    load_progress.wait_for_other_load(place, "key-d", sleep=sleep)
    texts = [s[1] for s in place.shown[:-1]]
    assert texts[0].startswith("Decoding 3,000 images in `/data/my pictures`: 500/3,000")
    assert texts[-1].startswith("Decoded 3,000 images") and len(texts) == 3
    assert place.shown[-1] is None  # emptied when it ends


# --- the app wires it ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_apps_first_load_shows_the_decode_on_the_page(app_env, tmp_path, monkeypatch):  # noqa: F811 - fixture
    """The app's own start on a folder not decoded yet draws the counts into its placeholder, empties it after, and
    a later page load (a cache hit, which replays what the cached function drew) has no error: drawn inside
    ``get_handle`` on a block made outside it, Streamlit failed every later page with CacheReplayClosureError."""
    from streamlit.testing.v1 import AppTest
    from test_app import APP

    data = tmp_path / "copy" / "data"  # another data root: another handle, and a folder the data cache has not seen
    shutil.copytree(Path(app_env["ATTRIBUTION_CHECKPOINT"]).parent / "data", data)
    monkeypatch.setenv("ATTRIBUTION_DATA_ROOT", str(data))
    monkeypatch.setenv(folder_cache.CACHE_ENV, str(tmp_path / "data-cache"))
    monkeypatch.setattr(load_progress, "SHOW_AFTER_S", 0.0)  # 64 tiny images decode in well under the usual 0.5 s
    drawn: list[str] = []
    real_draw = load_progress._draw

    def draw(placeholder, p):
        drawn.append(load_progress.progress_text(p))
        real_draw(placeholder, p)

    monkeypatch.setattr(load_progress, "_draw", draw)
    first = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    _ok(first)
    assert drawn and drawn[0].startswith(f"Decoding 64 images in `{data}`: ")
    assert drawn[-1].startswith(f"Decoded 64 images in `{data}`")
    assert not first.get("progress")  # emptied once loaded
    assert first.title[0].value == "Diffusion Attribution Explorer"
    count = len(drawn)
    again = AppTest.from_file(APP, default_timeout=TIMEOUT).run()  # another page load: the handle from the cache
    _ok(again)
    assert len(drawn) == count and not again.get("progress")  # nothing decoded, nothing drawn
    assert again.title[0].value == "Diffusion Attribution Explorer"
