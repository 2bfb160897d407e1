"""Time the explorer's page runs on the server: one per gallery click, after the caches are built (QA 47 #4).

A click in the browser reruns the whole page script on the server (the query's answer, the method columns, the
exports, the plots) before the browser draws it; this times that server part through Streamlit's ``AppTest``,
with the caches in ``--cache-root`` already built (``attribution-engine build --preset P --cache-root DIR``; a
method still to build is answered from the precomputed file and would not be timed fairly).  It runs the page
as ``streamlit run explorer/app.py -- --preset P --cache DIR`` does, in this process.  The browser's own drawing
time is not in it.  Prints each run's seconds and the median of the clicks.

``--browser``: the same clicks in headless Chromium on a real server (``streamlit run``), timed from the click
until the page shows the sample's header and proponents ("content") and until Streamlit is idle ("idle"): the
server's run and the browser's drawing together, what a person waits for.  Needs chromium, chromium-driver and
selenium (tests/test_browser.py's).

``--generate SEEDS``: then "New sample" with each seed in turn, timing the page run of each Generate click (the
DDPM sampling, the sample's label and its answer).  A server's first one also fits the labelling classifier unless
the cache folder keeps its fit (``engine.model.label_classifier``): run the command twice on one cache to see both.

    python scripts/time_page_runs.py --preset mnist --cache-root DIR [--clicks 5,12,20,27] [--repeat 2] [--browser]
    python scripts/time_page_runs.py --preset mnist --cache-root DIR --clicks "" --generate 11,12,13
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mnist")
    p.add_argument("--cache-root", required=True, help="a cache with every method built for the preset")
    p.add_argument("--clicks", default="5,12,20,27", help="gallery samples to click, in order")
    p.add_argument("--repeat", type=int, default=1, help="times to click the whole list")
    p.add_argument("--browser", action="store_true", help="time the clicks in headless Chromium instead")
    p.add_argument("--port", type=int, default=None, help="--browser: the server's port (default: a free one)")
    p.add_argument("--generate", default="", help="then New sample: seeds to generate, in order (not --browser)")
    args = p.parse_args(argv)
    clicks = [int(c) for c in args.clicks.split(",") if c.strip()]
    seeds = [int(c) for c in args.generate.split(",") if c.strip()]
    if seeds and args.browser:
        print("error: --generate times the server's page runs only (leave out --browser)", file=sys.stderr)
        return 2
    if not Path(args.cache_root).is_dir():
        print(f"error: --cache-root {args.cache_root} is not a folder", file=sys.stderr)
        return 2
    if args.browser:
        return _browser(args.preset, Path(args.cache_root).resolve(), clicks, args.repeat, args.port)
    os.environ["ATTRIBUTION_PRESET"] = args.preset
    os.environ["ATTRIBUTION_CACHE"] = str(Path(args.cache_root).resolve())
    sys.path.insert(0, str(ROOT))
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "explorer" / "app.py"), default_timeout=600)
    t = time.perf_counter()
    at.run()
    print(f"first page run (load): {time.perf_counter() - t:.2f} s")
    if at.exception:
        print(f"error: {at.exception[0].value}", file=sys.stderr)
        return 1
    from explorer import runtime

    handle = runtime.get_handle(runtime.parse_args([], env=dict(os.environ)))
    state = handle.worker.wait(600) if handle.worker is not None else None
    if state is not None and state.summary and any(v.get("status") == "ok" and v.get("seconds", 0) > 1
                                                   for v in state.summary.values()):
        print("warning: the server built caches first: the cache was not complete", file=sys.stderr)
    at.run()  # the page once the build is done: live results
    times = []
    for _ in range(args.repeat):
        for i in clicks:
            buttons = [b for b in at.button if (b.key or "").startswith("gallery_")]
            if i >= len(buttons):
                print(f"error: no gallery sample {i} (the gallery has {len(buttons)})", file=sys.stderr)
                return 2
            buttons[i].click()
            t = time.perf_counter()
            at.run()
            dt = time.perf_counter() - t
            if at.exception:
                print(f"error: {at.exception[0].value}", file=sys.stderr)
                return 1
            if not any(f"Gallery sample {i} " in m.value for m in at.markdown):
                print(f"error: the page did not show gallery sample {i} after its click", file=sys.stderr)
                return 1
            times.append(dt)
            print(f"gallery click {i}: {dt:.2f} s")
    if times:
        print(f"median of {len(times)} page runs: {statistics.median(times):.2f} s (load average "
              f"{os.getloadavg()[0]:.1f})")
    if seeds:
        at.radio(key="source").set_value("New sample").run()
    for seed in seeds:
        at.number_input(key="gen_seed").set_value(seed).run()
        t = time.perf_counter()
        at.button(key="gen_button").click().run()
        dt = time.perf_counter() - t
        if at.exception or not any(f"New sample (seed {seed})" in m.value for m in at.markdown):
            print(f"error: the page did not show the sample of seed {seed}", file=sys.stderr)
            return 1
        print(f"generate seed {seed}: {dt:.2f} s (load average {os.getloadavg()[0]:.1f})")
    return 0


def _browser(preset: str, cache: Path, clicks: list[int], repeat: int, port: int | None) -> int:
    sys.path.insert(0, str(ROOT))
    from explorer import headless

    why = headless.browser_unavailable()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    content, idle = [], []
    with headless.serve(app_args=["--preset", preset, "--cache", str(cache)], port=port) as url, \
            headless.chromium() as driver:
        driver.get(url)
        headless.wait_for(driver, ["Gallery sample 0 ", "Proponents"], absent=["Attributing", "Being built"],
                          timeout=600)
        for _ in range(repeat):
            for i in clicks:
                headless.click_button(driver, str(i))
                t = time.perf_counter()
                while True:  # content: the clicked sample's header and its proponents
                    text = headless.page_text(driver)
                    if f"Gallery sample {i} " in text and "Proponents" in text and "Attributing" not in text:
                        break
                    if time.perf_counter() - t > 120:
                        print(f"error: gallery sample {i} never showed", file=sys.stderr)
                        return 1
                    time.sleep(0.05)
                content.append(time.perf_counter() - t)
                while headless._busy(driver):  # idle: the run finished and nothing stale is left
                    time.sleep(0.05)
                idle.append(time.perf_counter() - t)
                print(f"gallery click {i}: content {content[-1]:.2f} s, idle {idle[-1]:.2f} s")
    print(f"median of {len(content)} clicks: content {statistics.median(content):.2f} s, idle "
          f"{statistics.median(idle):.2f} s (load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # at once: the page's server threads (the build worker's, AppTest's script thread) are daemon threads inside
    # torch at interpreter exit, where C++ aborted ("terminate called without an active exception", rc 134)
    os._exit(code)
