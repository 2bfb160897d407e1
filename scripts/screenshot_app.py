"""Screenshots of the explorer on the shipped digits model for the README (docs/screenshots/*.png).

Starts ``streamlit run explorer/app.py`` headless on a free port, opens it in headless
Chromium, waits for the results grid, and saves:

  explore.png       the query and the per-method proponent/opponent grids
  explore_full.png  the whole Explore page (grids, plots)
  compare.png       the comparison plots (score distributions)
  scatter.png       two methods' scores against each other, with their Spearman correlation
  overlap.png       shared fraction of the methods' top-k (highest scores, as the grids list them)
  labels.png        labels among each method's top-k
  groups.png        the Groups tab (a class group's predicted effect on the gallery)
  groups_retrain.png  the Groups tab's shipped check by retraining (predicted against measured change)
  evaluation.png    the Evaluation tab (LDS results, check by retraining)
  about.png         the About tab
  first_start.png   (--first-start) the page of a server started on an EMPTY cache: the build's
                    live progress and the shipped precomputed gallery results meanwhile

Run after the caches are built (``attribution-engine build --preset digits``); with
``--allow-build`` the app builds missing caches itself first (slow on CPU).

    python scripts/screenshot_app.py [--preset digits] [--gallery 3] [--out docs/screenshots] [--only explore,groups]
    python scripts/screenshot_app.py --first-start [--preset mnist] --out docs/screenshots/mnist
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _missing(preset: str, checkpoint: str | None) -> list[str]:
    from engine.attribution.session import AttributionSession

    s = AttributionSession(preset, checkpoint)
    return [n for n, v in s.status().items() if v["available"] and not v["built"]]


def _scroll_to(driver, text: str) -> None:
    for el in driver.find_elements("xpath", f"//*[self::h1 or self::h2 or self::h3 or self::h4][contains(., '{text}')]"):
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", el)
        time.sleep(1.0)
        return
    raise LookupError(f"no heading {text!r}")


def main(argv: list[str] | None = None) -> int:
    from explorer import headless

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="digits")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--gallery", type=int, default=None, help="gallery sample to show (default: the app's first)")
    p.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    p.add_argument("--width", type=int, default=1600)
    p.add_argument("--port", type=int, default=None, help="port to serve the app on (default: a free one)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--allow-build", action="store_true", help="let the app build missing caches first")
    p.add_argument("--only", default=None, help="comma list of shots: explore,compare,groups,evaluation,about")
    p.add_argument("--first-start", action="store_true",
                   help="serve on an empty temporary cache and capture the build panel with precomputed results")
    args = p.parse_args(argv)
    if args.first_start:
        return _first_start(args)
    only = set(args.only.split(",")) if args.only else None

    reason = headless.browser_unavailable()
    if reason:
        print(f"cannot take screenshots: {reason}", file=sys.stderr)
        return 2
    missing = _missing(args.preset, args.checkpoint)
    if missing and not args.allow_build:
        print(f"caches not built for {', '.join(missing)}; build them first or pass --allow-build", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    app_args = ["--preset", args.preset] + (["--checkpoint", args.checkpoint] if args.checkpoint else [])
    log = out / ".server.log"
    saved: list[Path] = []
    with headless.serve(app_args, log_path=log, timeout=120, port=args.port) as url, headless.chromium(args.width, 1100) as d:
        d.get(url)
        ready = ["Proponents", "Opponents", "K-FAC Influence"]
        headless.wait_for(d, ready, absent=["Attributing", "Preparing"], timeout=args.timeout)
        if args.gallery is not None:
            headless.click_button(d, str(args.gallery))
            headless.wait_for(d, [f"Gallery sample {args.gallery}", *ready], absent=["Attributing"], timeout=args.timeout)
        time.sleep(2.0)  # let images and plots finish drawing
        if only is None or "explore" in only:
            saved.append(headless.screenshot(d, out / "explore.png", height=1300))
            saved.append(headless.screenshot(d, out / "explore_full.png", height=3600))
        d.set_window_size(args.width, 1100)
        time.sleep(1.0)
        if only is None or "compare" in only:
            headless.open_expander(d, "Compare the methods")  # closed at first (results_view.plots)
            headless.wait_for(d, ["Score distributions"], timeout=args.timeout)
            time.sleep(2.0)
            saved.append(headless.screenshot(d, out / "compare.png"))
            headless.click_tab(d, "Scatter of two methods")
            time.sleep(2.0)
            saved.append(headless.screenshot(d, out / "scatter.png"))
            for tab, name in (("Top-k overlap", "overlap.png"), ("Labels of the top-k", "labels.png")):
                headless.click_tab(d, tab)
                time.sleep(2.0)
                saved.append(headless.screenshot(d, out / name))
        if only is None or "groups" in only:
            headless.click_tab(d, "Groups")
            headless.wait_for(d, ["what if these training images were removed", "predicted change"],
                              absent=["Attributing"], timeout=args.timeout)
            time.sleep(2.0)
            saved.append(headless.screenshot(d, out / "groups.png", height=2200))
            d.set_window_size(args.width, 1100)
            _scroll_to(d, "Check by retraining: predicted against measured change")
            saved.append(headless.screenshot(d, out / "groups_retrain.png"))
        if only is None or "evaluation" in only:
            headless.click_tab(d, "Evaluation")
            headless.wait_for(d, ["Linear data-modelling score"], timeout=120)
            time.sleep(2.0)
            saved.append(headless.screenshot(d, out / "evaluation.png", height=4200))
        if only is None or "about" in only:
            headless.click_tab(d, "About the methods")
            headless.wait_for(d, ["not removal predictions"], timeout=120)
            time.sleep(1.0)
            saved.append(headless.screenshot(d, out / "about.png", height=2000))
    log.unlink(missing_ok=True)
    for path in saved:
        print(path)
    return 0


def _first_start(args: argparse.Namespace) -> int:
    """The page a person sees right after starting the app on an empty cache (issue: first start)."""
    import tempfile

    from explorer import headless

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    app_args = ["--preset", args.preset] + (["--checkpoint", args.checkpoint] if args.checkpoint else [])
    with tempfile.TemporaryDirectory() as cache:
        app_args += ["--cache", cache]
        with headless.serve(app_args, timeout=120, port=args.port) as url, headless.chromium(args.width, 1100) as d:
            d.get(url)
            want = ["Building the attribution caches", "Precomputed results", "Proponents"]
            deadline = time.monotonic() + args.timeout  # the build's fragment reruns every second, so
            while not all(w in headless.page_text(d) for w in want):  # the page is never idle: poll the text
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the page never showed {want}")
                time.sleep(0.5)
            time.sleep(3.0)
            path = headless.screenshot(d, out / "first_start.png", height=1400)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
