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
        with headless.serve(env=env, log_path=log) as url, headless.chromium() as driver:
            driver.get(url)
            text = headless.wait_for(
                driver, ["Proponents", "Opponents", "K-FAC Influence"], absent=["Attributing", "Preparing"]
            )
            shot = headless.screenshot(driver, tmp_path / "explorer.png", height=2400)
            for title in ("Diffusion Attribution Explorer", "TRAK", "D-TRAK", "Pixel similarity", "CLIP similarity"):
                assert title in text
            assert "Most similar" in text and "Unavailable" in text  # CLIP has no weights here
            assert "Gallery sample 0" in text
            assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
            # the page reacts: another gallery sample becomes the query
            for b in driver.find_elements("css selector", "button"):
                if b.text.strip() == "2":
                    b.click()
                    break
            headless.wait_for(driver, ["Gallery sample 2", "Proponents"], absent=["Attributing"])
            headless.click_tab(driver, "About the methods")
            headless.wait_for(driver, ["not removal predictions"])
    except Exception:
        print(log.read_text() if log.exists() else "(no server log)")
        raise
