"""Run the explorer as a real server and look at it in headless Chromium (browser test, README screenshots).

Kept out of the app itself; selenium is a dev dependency and is imported only here.
Chromium runs with a fresh profile and no background networking, so nothing is
fetched from the internet.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def browser_unavailable() -> str | None:
    """Why a headless browser cannot run here (None when it can)."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).is_file():
            return f"{path} not found (install Debian packages `chromium chromium-driver`)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


@contextmanager
def serve(app_args: Sequence[str] = (), env: dict[str, str] | None = None, timeout: float = 180.0,
          log_path: Path | None = None, port: int | None = None) -> Iterator[str]:
    """``streamlit run explorer/app.py`` headless on ``port`` (a free one when None); yields its URL, stops it
    afterwards. A fixed port is for machines where each user is given a range of ports."""
    if port is None:
        port = free_port()
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.headless", "true", "--server.port", str(port), "--server.address", "127.0.0.1",
        "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
        "--", *app_args,
    ]
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(APP.parent.parent) + os.pathsep + full_env.get("PYTHONPATH", "")
    log = open(log_path, "w+b") if log_path else tempfile.TemporaryFile()
    proc = subprocess.Popen(
        cmd, env=full_env, cwd=str(APP.parent.parent), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.flush()
                log.seek(0)
                tail = log.read()[-3000:].decode(errors="replace")
                raise RuntimeError(f"streamlit exited with code {proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"streamlit did not answer on {url} within {timeout:.0f} s")
            time.sleep(0.3)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the group we started (streamlit and nothing else)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


@contextmanager
def chromium(width: int = 1600, height: int = 1400) -> Iterator:
    """A headless Chromium driven by selenium, with a throw-away profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="explorer-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.add_argument(f"--window-size={width},{height}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def page_text(driver) -> str:
    return driver.find_element("tag name", "body").text


def _busy(driver) -> bool:
    """Streamlit is running the script (running icon) or still shows elements of the previous run."""
    return bool(
        driver.find_elements("css selector", "[data-testid='stStatusWidgetRunningIcon']")
        or driver.find_elements("css selector", "[data-testid='stStatusWidgetRunningManIcon']")
        or driver.find_elements("css selector", "[data-stale='true']")
    )


def wait_for(driver, present: Sequence[str], absent: Sequence[str] = (), timeout: float = 180.0) -> str:
    """Poll until every ``present`` string shows, no ``absent`` one does and the app is idle, twice in a row."""
    deadline = time.monotonic() + timeout
    text, hits = "", 0
    while time.monotonic() < deadline:
        try:
            text = page_text(driver)
            ok = all(s in text for s in present) and not any(s in text for s in absent) and not _busy(driver)
        except Exception:  # noqa: BLE001 - the page may be re-rendering
            ok = False
        hits = hits + 1 if ok else 0
        if hits >= 2:
            return text
        time.sleep(0.5)
    raise TimeoutError(f"page never showed {list(present)} without {list(absent)}; last text:\n{text[:2000]}")


def _click(driver, selector: str, label: str, kind: str, script: str) -> None:
    """Run ``script`` (a click by script: the element may be out of view) on the first element of
    ``selector`` whose text is ``label``."""
    for el in driver.find_elements("css selector", selector):
        if el.text.strip() == label:
            driver.execute_script(script, el)
            return
    raise LookupError(f"no {kind} {label!r}")


def click_button(driver, label: str) -> None:
    """Click a button without scrolling to it (screenshots keep their scroll position)."""
    _click(driver, "button", label, "button", "arguments[0].click();")


def click_tab(driver, label: str) -> None:
    _click(driver, "[role='tab']", label, "tab", "arguments[0].scrollIntoView({block: 'center'}); arguments[0].click();")


def open_expander(driver, starts: str) -> None:
    """Open the expander whose label holds ``starts`` (its ``summary``, whose text may begin with an icon's name),
    scrolled to the top of the view."""
    for el in driver.find_elements("css selector", "summary"):
        if starts in el.get_attribute("textContent"):
            driver.execute_script("arguments[0].scrollIntoView({block: 'start'}); arguments[0].click();", el)
            return
    raise LookupError(f"no expander starting {starts!r}")


def screenshot(driver, path: str | Path, height: int | None = None) -> Path:
    """Save a PNG of the page; ``height`` resizes the window first so long pages fit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if height:
        w = driver.get_window_size()["width"]
        driver.set_window_size(w, height)
        time.sleep(1.0)
    driver.save_screenshot(str(path))
    return path
