"""Process-wide state of the app: which model to serve, the one cached session, the one-off cache build.

``streamlit run explorer/app.py -- --preset NAME|path.json --checkpoint PATH`` selects
the model (``--max-retrain-jobs N`` caps the retraining jobs running at once, the rest queue;
``--no-retrain`` turns retraining off for public demos); the environment variables ATTRIBUTION_PRESET, ATTRIBUTION_CHECKPOINT,
ATTRIBUTION_CACHE and ATTRIBUTION_DEVICE do the same (tests and ``streamlit.testing``
use them, because there the script's argv is the test runner's).  Command-line flags win.

One ``AttributionSession`` per (preset, checkpoint, cache, device) lives in
``st.cache_resource``; widget changes never reload it.  Heavy calls go through
``Handle.lock`` so two browser tabs never build or query the same model at once.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import streamlit as st

from engine.attribution.session import AttributionSession
from explorer.job_queue import JobQueue


@dataclass(frozen=True)
class AppArgs:
    preset: str = "digits"
    checkpoint: str | None = None
    cache: str | None = None
    device: str | None = None
    max_retrain_jobs: int = 1  # retraining jobs running at once on this server; the rest queue
    no_retrain: bool = False  # public demos: no retraining at all


def parse_args(argv: list[str] | None = None, env: dict[str, str] | None = None) -> AppArgs:
    """Flags after ``--`` on the streamlit command line, falling back to ATTRIBUTION_* variables."""
    import sys

    env = dict(os.environ) if env is None else env
    p = argparse.ArgumentParser(prog="explorer/app.py", add_help=False, allow_abbrev=False)
    p.add_argument("--preset", default=None, help="preset name (digits, cifar2, cifar10) or a preset .json")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the preset's)")
    p.add_argument("--cache", default=None, help="cache root (default: ATTRIBUTION_CACHE or ./cache)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: best available)")
    p.add_argument("--max-retrain-jobs", type=int, default=None,
                   help="retraining jobs running at once on this server (default 1; the rest queue)")
    p.add_argument("--no-retrain", action="store_true", help="turn retraining off (public demos)")
    args, _ = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    jobs = args.max_retrain_jobs
    if jobs is None:
        text = env.get("ATTRIBUTION_MAX_RETRAIN_JOBS") or "1"
        try:
            jobs = int(text)
        except ValueError:
            raise SystemExit(f"error: ATTRIBUTION_MAX_RETRAIN_JOBS must be an integer, got {text!r}") from None
    if jobs < 1:
        raise SystemExit(f"error: --max-retrain-jobs must be at least 1, got {jobs} (use --no-retrain to turn it off)")
    no_retrain = args.no_retrain or env.get("ATTRIBUTION_NO_RETRAIN", "").lower() in ("1", "true", "yes")
    return AppArgs(
        preset=args.preset or env.get("ATTRIBUTION_PRESET") or "digits",
        checkpoint=args.checkpoint or env.get("ATTRIBUTION_CHECKPOINT") or None,
        cache=args.cache or env.get("ATTRIBUTION_CACHE") or None,
        device=args.device or env.get("ATTRIBUTION_DEVICE") or None,
        max_retrain_jobs=jobs,
        no_retrain=no_retrain,
    )


@dataclass
class Handle:
    """The cached session plus what every browser tab shares: a lock, generated samples, retrain jobs."""

    session: AttributionSession
    args: AppArgs
    cache_root: Path
    lock: threading.RLock = field(default_factory=threading.RLock)
    generated: dict[int, Any] = field(default_factory=dict)  # seed -> QueryInput (with trajectory)
    retrain_jobs: dict[tuple, Any] = field(default_factory=dict)
    retrain_queue: JobQueue = field(default_factory=JobQueue)  # replaced by get_handle with the server's cap
    build_summary: dict[str, Any] | None = None
    build_seconds: float | None = None
    ready: bool = False  # caches checked (and built) once for this process
    status_snapshot: dict[str, dict] | None = None

    def status(self, refresh: bool = False) -> dict[str, dict]:
        """``session.status()``, remembered: it walks the cache folders, too slow for every rerun."""
        if refresh or self.status_snapshot is None:
            self.status_snapshot = self.session.status()
        return self.status_snapshot


@st.cache_resource(show_spinner="Loading the model and the training set ...")
def get_handle(args: AppArgs) -> Handle:
    from engine.paths import cache_root

    session = AttributionSession(
        preset=args.preset, checkpoint=args.checkpoint, device=args.device, cache_root=args.cache
    )
    return Handle(
        session=session,
        args=args,
        cache_root=Path(args.cache) if args.cache else cache_root(),
        retrain_queue=JobQueue(max_running=args.max_retrain_jobs),
    )


def throttled(update: Callable[[str, float], None], every_s: float = 0.15) -> Callable[[str, float], None]:
    """Forward at most one progress update per ``every_s`` (and always the final one) to the page."""
    last = [0.0]

    def cb(message: str, fraction: float) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s or fraction >= 1.0:
            last[0] = now
            update(message, min(max(float(fraction), 0.0), 1.0))

    return cb


def missing_caches(handle: Handle) -> list[str]:
    """Available methods whose caches are not built yet."""
    status = handle.status(refresh=True)
    return [n for n, s in status.items() if s.get("available") and not s.get("built")]


def ensure_built(handle: Handle) -> None:
    """Build missing caches once per checkpoint, showing what is built and how far it is.

    The build runs in the script thread under the handle's lock: a second tab waits
    (and then finds everything built) instead of starting the same work again.
    """
    if handle.ready:
        return
    if not missing_caches(handle):
        handle.ready = True
        return
    info = handle.session.method_info()
    box = st.empty()
    with box.container():
        st.subheader("Preparing the explorer")
        note = st.empty()
        bar = st.progress(0.0, text="waiting for the build lock ...")
    with handle.lock:
        todo = missing_caches(handle)  # another tab may have built them meanwhile
        if todo:
            titles = ", ".join(info.get(n, {}).get("title", n) for n in todo)
            note.info(
                f"First start for checkpoint `{handle.session.checkpoint_hash}`: building the attribution caches "
                f"for {titles} (training-set gradients, curvature, projections). This happens once; the caches "
                f"are saved under `{handle.cache_root}` and reused on every later start."
            )

            def show(message: str, fraction: float) -> None:
                name, sep, rest = message.partition(": ")  # the session prefixes the method name
                title = info.get(name, {}).get("title")
                if sep and title:
                    message = rest if rest.startswith(title) else f"{title}: {rest}"
                bar.progress(fraction, text=f"{message} ({fraction:.0%})")

            t0 = time.perf_counter()
            handle.build_summary = handle.session.build(todo, progress=throttled(show))
            handle.build_seconds = time.perf_counter() - t0
            handle.status(refresh=True)
        handle.ready = True
    box.empty()
