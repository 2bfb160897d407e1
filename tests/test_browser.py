"""The explorer as a real server (``streamlit run``, headless) opened in headless Chromium.

Same tiny model as tests/test_app.py; the server starts with an empty cache, so the page
goes through "building caches" before the results grid appears.  Skipped with the reason
when Chromium, chromedriver or selenium is missing.
"""

from __future__ import annotations

import pytest

from explorer import headless

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory) -> dict[str, str]:
    reason = headless.browser_unavailable()
    if reason:
        pytest.skip(f"headless browser unavailable: {reason}")
    from test_app import shared_tiny_app

    return shared_tiny_app(tmp_path_factory)


def test_results_grid_in_chromium(tiny_env, tmp_path):
    env = {
        **tiny_env,
        "ATTRIBUTION_CACHE": str(tmp_path / "cache"),  # empty: the page first shows the cache build
        "ATTRIBUTION_RESULTS": str(tmp_path / "results"),
        "OMP_NUM_THREADS": "1",
    }
    log = tmp_path / "server.log"
    try:
        port = headless.free_port()  # a port chosen by the caller (QA machines give each user a range)
        with headless.serve(env=env, log_path=log, port=port) as url, headless.chromium() as driver:
            assert url.endswith(f":{port}")  # serve answered its health check there
            driver.get(url)
            text = headless.wait_for(
                driver, ["Proponents", "Opponents", "K-FAC Influence"], absent=["Attributing", "Preparing"]
            )
            shot = headless.screenshot(driver, tmp_path / "explorer.png", height=2400)
            for title in ("Diffusion Attribution Explorer", "TRAK", "D-TRAK", "Pixel similarity"):
                assert title in text
            # CLIP has no weights here: offered in "Show", not shown at first (QA 47 #10; test_app checks its column)
            assert "Most similar" in text
            assert "Gallery sample 0" in text
            assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
            headless.click_button(driver, "2")  # the page reacts: another gallery sample becomes the query
            headless.wait_for(driver, ["Gallery sample 2", "Proponents"], absent=["Attributing"])
            headless.click_tab(driver, "About the methods")
            headless.wait_for(driver, ["not removal predictions"])
    except Exception:
        print(log.read_text() if log.exists() else "(no server log)")
        raise


def test_a_compressed_bank_shows_its_exact_ranking_without_a_click(tiny_env, tmp_path):
    """The app answers from the compressed bank's scan first (approximate) and re-ranks in the background;
    the page replaces the approximate ends with the exact ones by itself (explorer.exact_view.await_exact).
    Nothing is clicked: before the poller, the page stayed approximate until the next interaction."""
    import json
    from pathlib import Path

    from engine.attribution.session import AttributionSession

    spec = json.loads(Path(tiny_env["ATTRIBUTION_PRESET"]).read_text())
    spec["attribution"].update(kfac_bank="compressed", kfac_compression=4.0, kfac_rerank=3)
    preset = tmp_path / "compressed.json"
    preset.write_text(json.dumps(spec))
    env = {
        **tiny_env,
        "ATTRIBUTION_PRESET": str(preset),
        "ATTRIBUTION_CACHE": str(tmp_path / "cache"),
        "ATTRIBUTION_RESULTS": str(tmp_path / "results"),
        "OMP_NUM_THREADS": "1",
    }
    AttributionSession(str(preset), env["ATTRIBUTION_CHECKPOINT"], "cpu", env["ATTRIBUTION_CACHE"]).build()
    log = tmp_path / "server.log"
    try:
        with headless.serve(env=env, log_path=log) as url, headless.chromium() as driver:
            driver.get(url)
            headless.wait_for(driver, ["Gallery sample 0", "Proponents"], absent=["Attributing"], timeout=120)
            # the start page may rerun after its first answer (the build check's own rerun); a click on
            # another gallery sample is the last rerun anything but the poller asks for
            headless.click_button(driver, "2")
            text = headless.wait_for(
                driver, ["Gallery sample 2", "re-ranked to exact", "Proponents"],
                absent=["Approximate ranking", "exact ones are pending", "Attributing"], timeout=60,
            )
            assert "K-FAC Influence" in text and "TRAK" in text
            shot = headless.screenshot(driver, tmp_path / "exact.png", height=2400)
            assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    except Exception:
        print(log.read_text() if log.exists() else "(no server log)")
        raise
