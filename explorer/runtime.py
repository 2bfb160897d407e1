"""Process-wide state of the app: which model to serve, the one cached session, the one-off cache build.

``streamlit run explorer/app.py -- --preset NAME|path.json --checkpoint PATH`` selects
the model (``--max-retrain-jobs N`` caps the retraining jobs running at once, the rest queue;
``--no-retrain`` turns retraining off for public demos); the environment variables ATTRIBUTION_PRESET, ATTRIBUTION_CHECKPOINT,
ATTRIBUTION_CACHE and ATTRIBUTION_DEVICE do the same (tests and ``streamlit.testing``
use them, because there the script's argv is the test runner's).  Command-line flags win;
``--cache-root`` (the CLI's spelling) is ``--cache``, and any other unknown flag is refused.

One ``AttributionSession`` per (preset, checkpoint, cache, device) lives in
``st.cache_resource``; widget changes never reload it.  With it lives the process's one
cache build (``engine.attribution.build_worker.BuildWorker``, a thread no tab owns: closing or opening
tabs never stops, restarts or duplicates it; every tab polls its progress).  Both are made, and the build started,
in a thread of the server's that a page only waits for (``serve``), so a tab closed while it loads stops neither.  Heavy calls of the pages go
through ``Handle.lock``, one at a time; the build runs outside it, and queries meanwhile leave the methods it
has still to build alone (``BuildState.pending``; docs/architecture.md §10).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import streamlit as st

from engine import warning_lines
from engine.attribution.build_worker import WAITING_TURN, BuildState, BuildWorker
from engine.attribution.caches import WAITING
from engine.attribution.precomputed import PrecomputedGallery
from engine.attribution.session import AttributionSession
from engine.validation import word_list
from engine.warning_lines import ENGINE_ROOT
from explorer.app_flags import (  # noqa: F401 - the app's flags, re-exported: app.py and tests name them here
    APP_SCRIPT,
    AppArgs,
    ArgsError,
    HelpRequested,
    app_argv,
    parse_args,
)
from explorer.grid_filler import GridFiller
from explorer.job_queue import JobQueue
from explorer.shared_results import (
    GENERATED_KEPT,
    GROUP_MATRICES_KEPT,
    GROUP_POOLS_KEPT,
    QUERY_GRADIENTS_KEPT,
    RecentResults,
)

log = logging.getLogger(__name__)


SWITCHABLE_PRESETS = ("digits", "mnist")  # shipped models the sidebar can switch between
MODEL_LABELS = {"digits": "digits (8x8)", "mnist": "MNIST (28x28)"}  # their names on the sidebar's switch


def model_choices(args: AppArgs) -> list[str]:
    """Shipped presets the sidebar offers: only when the app serves a shipped preset's own checkpoint."""
    from engine.paths import default_checkpoint

    # attribution-setting flags are the served model's (QA 54 F3): with them, no switch to a model they do not fit
    if (args.checkpoint is not None or args.data_root is not None or args.settings
            or args.preset not in SWITCHABLE_PRESETS):
        return []
    return [p for p in SWITCHABLE_PRESETS if (default_checkpoint(p) / "model.safetensors").is_file()]


def choose_model(args: AppArgs) -> AppArgs:
    """A sidebar switch between the shipped models (digits | mnist); each keeps its own cached session."""
    import dataclasses

    choices = model_choices(args)
    if len(choices) < 2:
        return args
    choice = st.sidebar.radio(
        "Model",
        choices,
        index=choices.index(args.preset),
        format_func=lambda p: MODEL_LABELS.get(p, p),
        horizontal=True,
        key="model_preset",
        help="digits: scikit-learn's 1,797 8x8 digits. MNIST: 1,000 real 28x28 MNIST digits.",
    )
    return dataclasses.replace(args, preset=choice)


def session_alive(tab: Any) -> bool:
    """Whether a browser tab (``exact_view.tab_id``: its Streamlit session id first) is still connected
    to this server.  Without a server's session registry (no runtime; AppTest's is a mock) every tab
    counts as alive."""
    from streamlit import runtime as st_runtime

    session_id = tab[0] if isinstance(tab, tuple) and tab else None
    if not isinstance(session_id, str) or not st_runtime.exists():
        return True
    alive = st_runtime.get_instance().is_active_session(session_id)
    return alive if isinstance(alive, bool) else True


@dataclass
class Handle:
    """The cached session plus what every browser tab shares: a lock, the build, generated samples, retrain jobs."""

    session: AttributionSession
    args: AppArgs
    cache_root: Path
    lock: threading.RLock = field(default_factory=threading.RLock)
    # seed -> QueryInput (with trajectory), the most recent GENERATED_KEPT
    generated: RecentResults = field(default_factory=lambda: RecentResults(GENERATED_KEPT))
    retrain_jobs: dict[tuple, Any] = field(default_factory=dict)
    retrain_queue: JobQueue = field(default_factory=JobQueue)  # replaced by get_handle with the server's cap
    status_snapshot: dict[str, dict] | None = None
    worker: BuildWorker | None = None  # the one cache build of this server process
    precomputed: PrecomputedGallery | None = None  # shipped gallery scores (engine.attribution.precomputed)
    # why this server's attribution settings are not those of the preset its checkpoint was trained as (the named
    # --preset's differ: checkpoint.attribution_source); the page shows it under the model line (QA 34: log only)
    settings_note: str | None = None
    # the engine's warnings while loading the model and the data, one line each (QA 45 #3; ``load_warnings``)
    load_warnings: tuple[str, ...] = ()
    # damping grids and exact re-ranks after the first answer, the tabs in turn
    grid_filler: GridFiller = field(default_factory=lambda: GridFiller(alive=session_alive))
    recent_results: RecentResults = field(default_factory=RecentResults)  # raw results the tabs share
    # the Groups page's (Q, N) matrices per query set, measurement, method and damping; its drawn pools; and its query
    # sets' gradients per measurement, which a damping change re-scores from (QA round 18: each new damping
    # recomputed them, 6-8 s against Explore's 1.5 s)
    group_matrices: RecentResults = field(default_factory=lambda: RecentResults(GROUP_MATRICES_KEPT))
    group_pools: RecentResults = field(default_factory=lambda: RecentResults(GROUP_POOLS_KEPT))
    group_query_gradients: RecentResults = field(default_factory=lambda: RecentResults(QUERY_GRADIENTS_KEPT))
    _independent: dict[str, Any] | None = None  # see query_independent()
    _agreement: dict[str, Any] | None = None  # see gallery_agreement()
    _agreement_gaps: dict[str, str] | None = None  # see gallery_agreement_gaps()

    def status(self, refresh: bool = False) -> dict[str, dict]:
        """``session.status()``, remembered: it walks the cache folders, too slow for every rerun."""
        if refresh or self.status_snapshot is None:
            self.status_snapshot = self.session.status()
        return self.status_snapshot

    def query_independent(self) -> dict[str, Any]:
        """Methods whose rankings barely depend on the query on this model, measured once over the shipped
        gallery's precomputed scores (``engine.evaluation.query_dependence``): name -> ``Dependence``."""
        if self._independent is None:
            from engine.evaluation.query_dependence import flagged, gallery_dependence

            pg = self.precomputed
            try:
                self._independent = flagged(gallery_dependence(pg, pg.methods_for(self.session))) if pg else {}
            except (ValueError, KeyError) as e:  # a malformed file: no flag, never a broken page
                log.warning("query-dependence check skipped: %s", e)
                self._independent = {}
        return self._independent

    def gallery_agreement(self) -> dict[str, Any]:
        """How often each method's top-10 share the query's label over the shipped gallery, measured once from its
        precomputed scores (``engine.evaluation.label_agreement``): name -> ``LabelAgreement``; empty for a model
        with no matching precomputed file, no training labels or no gallery labels."""
        if self._agreement is None:
            from engine.evaluation.label_agreement import gallery_label_agreement

            pg, session = self.precomputed, self.session
            try:
                self._agreement = gallery_label_agreement(
                    pg, pg.methods_for(session), session.labels,
                    {g.index: g.label for g in session.gallery()}) if pg else {}
            except (ValueError, KeyError) as e:  # a malformed file: no figures, never a broken page
                log.warning("gallery label agreement skipped: %s", e)
                self._agreement = {}
        return self._agreement

    def gallery_agreement_gaps(self) -> dict[str, str]:
        """Why each of the model's methods without a ``gallery_agreement`` figure has none, in a few plain words
        (name -> a lower-case clause), so that the pages say it instead of dropping the method silently (QA 52 #2:
        a compressed K-FAC bank's figure was left out, the file's scores being of the stored bank).  Empty when
        no method has a figure (the pages then show none).  A method that cannot run on this server (CLIP without
        its weights) is left out: the page says so in its own line, and "no figure" beside it was noise.  Worked out
        once: the file, the session's settings and the methods' availability do not change in a server."""
        if self._agreement_gaps is not None:
            return self._agreement_gaps
        agreements = self.gallery_agreement()
        pg = self.precomputed
        if not agreements or pg is None:
            self._agreement_gaps = {}
            return self._agreement_gaps
        gaps = {}
        for name in self.session.method_names():
            if name not in agreements and self.session.available(name)[0]:
                try:
                    gaps[name] = (pg.mismatch(self.session, name)
                                  or "too few gallery samples have both a label and a precomputed score")
                except (ValueError, KeyError) as e:  # a malformed file: a plain reason, never a broken page
                    log.warning("gallery label agreement: no reason for %s: %s", name, e)
                    gaps[name] = "its precomputed gallery scores could not be read"
        self._agreement_gaps = gaps
        return gaps

    @property
    def build(self) -> BuildState:
        return self.worker.state if self.worker is not None else BuildState(status="done")

    @property
    def ready(self) -> bool:
        """Every available cache is built (live queries may run)."""
        return self.build.status == "done"

    @property
    def build_summary(self) -> dict[str, Any] | None:
        return self.build.summary or None

    @property
    def build_seconds(self) -> float | None:
        b = self.build
        return b.elapsed_s if b.started is not None else None


_OURS = (ENGINE_ROOT, Path(__file__).resolve().parent)  # whose warnings are the app's to say: the engine's, its own


def server_log() -> None:
    """Send the app's own INFO lines (``explorer.*``: the background worker dropping a closed tab's query,
    stopping a re-rank) to the server's terminal.  Why: Streamlit configures only its own loggers, and
    Python's fallback prints warnings and errors only, so these lines went nowhere.  Once per process;
    a handler the host set up already (tests, an embedding app) is left as it is.  The project's warnings are one
    ``warning: ...`` line each from then on, as the CLI's (``engine.warning_lines``)."""
    warning_lines.install(_OURS)
    logger = logging.getLogger("explorer")
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def load_warnings() -> contextlib.AbstractContextManager[list[str]]:
    """Collect the engine's ``warnings.warn`` that this thread raises in the block, each distinct message once, as
    one line (``engine.warning_lines.collected``).

    Why (QA 45 #3): a folder with an image beside its class folders loses its labels, and a .webp in it is skipped;
    the engine says so with a UserWarning (``engine.model.data_files``), which the app let through to Python's
    default: "path/data_files.py:98: UserWarning: ..." plus the source line, in the terminal only.  The caller puts
    the lines on the page and prints them as the CLI does ("warning: ...").  Another package's warning keeps
    Python's form; another thread's (a build, a query, another model's load) is a terminal line, not this load's."""
    return warning_lines.collected(_OURS)


@st.cache_resource(show_spinner="Loading the model and the training set ...")
def get_handle(args: AppArgs) -> Handle:
    """The process-wide handle: one session, one build worker, shared by every tab and session.  The engine's
    warnings while loading go with it (``Handle.load_warnings``, on every page) and, once, to the terminal."""
    said: list[str] = []
    try:
        with load_warnings() as said:
            handle = _make_handle(args)
    finally:  # said in the terminal even when the load then fails (a stray image, then a damaged one)
        for line in said:
            print(f"warning: {line}", file=sys.stderr, flush=True)
    handle.load_warnings = tuple(said)
    return handle


def _make_handle(args: AppArgs) -> Handle:
    """``get_handle``'s work: the preset, the session (model and training set), the precomputed gallery, the worker."""
    from engine.attribution.precomputed import FILE
    from engine.attribution.setting_flags import apply_settings
    from engine.config import get_preset
    from engine.model.checkpoint import attribution_source
    from engine.paths import cache_root, default_checkpoint
    from engine.threads import configure_threads

    configure_threads("the app")
    preset = get_preset(args.preset, args.data_root)
    folder = args.checkpoint or default_checkpoint(preset.name)
    source, note = attribution_source(folder, preset, args.preset_named)  # the CLI's rule (QA 33)
    if note:
        log.warning(note)
    # the attribution-setting flags (--mc-samples, --kfac-bank, ...) over those, by the CLI's rule (QA 54 F3): a
    # server started with a build's flags reads that build's caches; its printed build commands name them
    config = apply_settings(source.attribution, args.setting_changes(), note=log.warning)
    session = AttributionSession(
        preset=preset, checkpoint=args.checkpoint, device=args.device, cache_root=args.cache,
        preset_spec=args.preset, config=config, preset_named=args.preset_named,
        attribution_base=source.attribution,
    )
    handle = Handle(
        session=session,
        args=args,
        settings_note=note,
        cache_root=Path(args.cache) if args.cache else cache_root(),
        retrain_queue=JobQueue(max_running=args.max_retrain_jobs),
    )
    handle.precomputed = PrecomputedGallery.load(session.checkpoint / FILE)
    handle.worker = BuildWorker(session, handle.lock, on_done=lambda _: handle.status(refresh=True))
    return handle


_loads_lock = threading.Lock()
_loads: dict[AppArgs, Future] = {}  # the server's loads under way, by model: every tab waits for the same one


def serve(args: AppArgs, first: AppArgs | None = None) -> Handle:
    """The handle for ``args`` (``get_handle``), its cache build started; loaded in a thread of the server's.

    Why (QA 45 #6): the load ran in the first tab's script run.  Closing that tab asks Streamlit to stop the run,
    which it does at the run's next page element: the end of the loading spinner, after the handle was cached but
    before ``start_build``, so the server built nothing until someone visited again (README: closing tabs never
    stops the build).  Here a thread no tab owns loads the handle and starts the build; the script run only waits
    for it, so a stopped run cannot come between the two.  The thread runs in a copy of the caller's context (the
    decode listener of ``load_progress.shown`` hears the decode) and with the run's Streamlit context (the spinner
    and the decode's counts are drawn on that page, and drawing from it never raises a stop).  A failed load is
    raised here, and the next call loads again.

    ``first``: the server's own model (its flags') when the tab shows another (the sidebar's switch): that one is
    loaded too and its build starts first, whichever tab asks first.  Why (QA 47 #2): after a restart, a tab left
    on digits reconnected first and started digits' build from zero while the server's mnist, 76% built, waited
    7 minutes for it (one build at a time in a server)."""
    prior = _start_load(first, None) if first is not None and first != args else None
    return _start_load(args, prior).result()


def _start_load(args: AppArgs, prior: Future | None) -> Future:
    from streamlit.runtime.scriptrunner import add_script_run_ctx, get_script_run_ctx

    with _loads_lock:
        future = _loads.get(args)
        if future is None:
            future = Future()
            _loads[args] = future
            thread = threading.Thread(target=contextvars.copy_context().run,
                                      args=(_load_and_start, args, future, prior), name="app-load", daemon=True)
            add_script_run_ctx(thread, get_script_run_ctx(suppress_warning=True))
            thread.start()
    return future


def _load_and_start(args: AppArgs, future: Future, prior: Future | None = None) -> None:
    """``serve``'s thread: the handle and its build's start (after ``prior``'s, the server's own model's, has
    started or failed), then the result (or the failure) for every waiter."""
    try:
        handle = get_handle(args)
        if prior is not None:
            with contextlib.suppress(BaseException):  # its own page says why it failed; this one goes on
                prior.result()
        start_build(handle)
    except BaseException as e:  # noqa: BLE001 - every failure goes to the waiting runs, which show it
        future.set_exception(e)
    else:
        future.set_result(handle)
    finally:
        with _loads_lock:  # the next run asks the cache again (a hit at once): a cleared cache or a failure reloads
            if _loads.get(args) is future:
                del _loads[args]


def throttled(update: Callable[[str, float], None], every_s: float = 0.15) -> Callable[[str, float], None]:
    """Forward at most one progress update per ``every_s`` (and always the final one) to the page."""
    last = [0.0]

    def cb(message: str, fraction: float) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s or fraction >= 1.0:
            last[0] = now
            update(message, min(max(float(fraction), 0.0), 1.0))

    return cb


def start_build(handle: Handle) -> BuildState:
    """Start the process's cache build if caches are missing and it is not running or failed.

    Called on every script run; it returns at once.  A failed build stays failed until the
    Retry button (``retry_build``): never restarted in a loop.
    """
    assert handle.worker is not None
    state = handle.worker.state
    if state.status == "idle":
        handle.worker.start()
    return handle.worker.state


def retry_build(handle: Handle) -> None:
    assert handle.worker is not None
    handle.worker.start()


def build_message(handle: Handle, state: BuildState | None = None) -> str:
    """One line for the page: the current step, then how far the whole build is.

    The step's own count ("13824/14376 rows") and the build's share differ (the factor pass is
    a quarter of the build), so the share says it is the whole build's.  While another process builds,
    this server's share is only what that build has saved on disk (nothing during its factor pass), not
    the builder's own figure (QA round 18: 0% here against 24% on the builder's page), so none is shown:
    the words name the other build's saved parts.  Nor before the build's first step, which is when a resumed
    build reads what it saved."""
    state = state or handle.build
    info = handle.session.method_info()
    msg = state.message
    name, sep, rest = msg.partition(": ")  # the session prefixes the method name
    title = info.get(name, {}).get("title")
    if sep and title:
        msg = rest if rest.startswith(title) else f"{title}: {rest}"
    if WAITING in msg:
        return f"{msg} (another process is building these caches; {state.elapsed_s / 60:.1f} min so far)"
    if WAITING_TURN in msg:  # another model's build in this server: the words say all (no share of its own yet)
        return msg
    if state.start_fraction is None and (msg == "starting" or msg.endswith(": starting")):
        # before the build's first step nothing has read what earlier runs saved, so a share here is only the
        # methods built before: a build resuming at 76% read "starting (whole build 0%)" for a second or more after
        # a restart (QA 50 #2, QA 53).  The share comes with the first step
        return f"{msg} (reading what earlier runs saved, if anything; {state.elapsed_s / 60:.1f} min so far)"
    # a resumed build's minutes are this run's: say so, and that it resumed (QA 23 #3: after kill -9 the time
    # restarted from 0 and the page never said the build had resumed)
    run = " in this run, which resumed work saved by an earlier one" if state.resumed else ""
    # the CLI's bars say it too (QA 34); at this run's pace over the work it computed, not over what it reloaded
    # (QA 40 #2: a resumed build's "about 2 min left" took 12 min)
    left = state.time_left()
    left_words = f", about {left} left" if left else ""
    return f"{msg} (whole build {whole_percent(state)}%, {state.elapsed_s / 60:.1f} min so far{left_words}{run})"


def whole_percent(state: BuildState) -> int:
    """The whole build's share done in percent, as the panel's words and bar show it: rounded down, so that a
    running build never reads 100 (QA 40 #5: "D-TRAK: eigendecomposing ... (whole build 100%, ...)" with D-TRAK
    still to finish, at 99.6%)."""
    import math

    percent = math.floor(100 * min(max(state.fraction, 0.0), 1.0) + 1e-9)
    return min(percent, 99) if state.status == "running" else percent


def finished_message(state: BuildState, titles: dict[str, str] | None = None) -> str:
    """The line a tab that watched the build shows when it ends.  Its minutes are this run's: a run that resumed
    saved work, or found methods built by an earlier run (killed after they finished), says so and names them
    (QA 32: after a restart "Attribution caches built in 0.3 min" stood for about 11 min of work)."""
    minutes = f"{state.elapsed_s / 60:.1f} min"
    titles = titles or {}
    before = [titles.get(n, n) for n in state.built_before]
    if before:
        words = word_list(before, "and")
        # QA 34: without a resume the line read "in this run, which K-FAC Influence and TRAK were built by ..."
        run = " in this run, which resumed saved work" if state.resumed else " in this run"
        return (f"Attribution caches built: {minutes}{run}; {words} {'were' if len(before) > 1 else 'was'} built by "
                "an earlier run; results below are live.")
    if state.resumed:
        return f"Attribution caches built {minutes} in this run, which resumed work saved by an earlier one; results below are live."
    return f"Attribution caches built in {minutes}; results below are live."


def influence_titles(handle: Handle) -> str:
    """Every influence method's title, "A, B or C" (from the registry): what a page asks to build or select."""
    from engine.attribution.group_attribution import influence_methods

    info = handle.session.method_info()
    return word_list([info[n]["title"] for n in influence_methods(handle.session)])
