"""Start the explorer, wait for its first results, click a gallery sample at once, and check that the method
selection survived: repeated, on a cache where every method is built.

Why: on a just-started server whose caches are all built, the build panel reruns the whole page right after
its first run; in 3 of 5 starts (2026-12-06) the browser then held the sidebar's method selection empty while
the server held every method, and the first click (a gallery sample) sent the empty selection back: "Select at
least one method in the sidebar".  ``streamlit.testing`` does not run the browser, so only a real one shows
it.  Each try prints one JSON line; the last line counts the tries whose page lost the methods.

    python scripts/first_click_check.py --preset digits --runs 6 --cache-root <built cache>
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="digits")
    p.add_argument("--runs", type=int, default=5, help="server starts (each about a minute)")
    p.add_argument("--gallery", type=int, default=3, help="the gallery sample clicked once the results show")
    p.add_argument("--cache-root", default=None, help="a cache with every method built (default: ATTRIBUTION_CACHE)")
    p.add_argument("--out", default=None, help="a folder for the failing tries' page text and screenshot")
    args = p.parse_args(argv)

    from explorer import headless

    reason = headless.browser_unavailable()
    if reason:
        print(f"error: no headless browser: {reason}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    if args.cache_root:
        env["ATTRIBUTION_CACHE"] = args.cache_root
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    lost = 0
    for i in range(args.runs):
        log = out / f"first_click_{i}.log" if out is not None else None  # the server's output
        with headless.serve(["--preset", args.preset], env=env, log_path=log, timeout=120) as url, \
                headless.chromium(1280, 1100) as driver:
            t0 = time.monotonic()
            driver.get(url)
            headless.wait_for(driver, ["Proponents", "Opponents"], absent=["Attributing", "Preparing"], timeout=300)
            shown = time.monotonic() - t0
            headless.click_button(driver, str(args.gallery))
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and f"Gallery sample {args.gallery}" not in headless.page_text(driver):
                time.sleep(0.5)
            time.sleep(5.0)  # the page settles: the results, or the message that no method is selected
            text = headless.page_text(driver)
            empty = "Select at least one method" in text
            lost += empty
            print(json.dumps({"try": i, "results_after_s": round(shown, 1), "methods_lost": empty,
                              "results_after_click": "Proponents" in text}), flush=True)
            if empty and out is not None:
                (out / f"first_click_{i}.txt").write_text(text)
                headless.screenshot(driver, out / f"first_click_{i}.png", height=1300)
    print(f"methods lost after the first click: {lost} of {args.runs} starts")
    return 1 if lost else 0


if __name__ == "__main__":
    raise SystemExit(main())
