"""The caches of every method for one session: whether each is available and built, its
settings and size, and building or loading them (the CLI's ``build``, the app's status panel).

Integrity (issue 14): a cache folder that exists but is refused by the store (corrupt, edited,
stale) is reported as *corrupt* with the store's message (which names the file and the rebuild
command), never as "not built"; ``build`` refuses it before computing anything unless
``rebuild=True``, which first deletes the entries that fail verification (checksums included).
A build holds a cross-process lock per method's cache entries (``Store.lock``), so a second
process building the same caches waits and then loads them.

A full disk (QA round 12): whatever a writer raised (OSError ENOSPC, numpy's short write, torch.save's
"unexpected pos"), a failed build whose cause is a full disk is raised as one ``DiskFullError`` line naming
the cache root and its free space (``store_files.disk_full_error``), and ``build`` stops there: the
methods after it would write to the same full disk.  Finished parts stay, so the rerun resumes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from .context import EngineContext
from .methods.base import AttributionMethod, Progress, Unavailable, no_progress
from .store import CacheRootError, StaleCacheError
from .store_files import DiskFullError, disk_full_error, settings_digest

log = logging.getLogger(__name__)

WAITING = "waiting for another build"  # the progress words while another process holds a method's build lock


def sharing_words(name: str, sharing: dict[str, Any] | None) -> str | None:
    """What a build time of ``name`` means when its cache was built in a shared gradient pass (``sharing``
    as ``MethodCaches.recorded_build_sharing`` gives it), or None: the pass cannot be split between the
    methods (QA round 12: TRAK's record held K-FAC's whole build, 409.7 s, against 4.7 s of its own), so
    the figure is never shown as that method's build alone.  The ``build`` table and the bench report say
    it in these words."""
    if not sharing:
        return None
    if sharing.get("shared_with"):
        return (f"built from {sharing['shared_with']}'s shared gradient pass; its build time is only what {name} "
                f"did after that pass (the pass is in {sharing['shared_with']}'s time)")
    if sharing.get("fed"):
        return f"its gradient pass also filled {', '.join(sharing['fed'])}; its build time includes their share"
    return None


class MethodCaches:
    """Cache status and builds of ``methods`` (name -> instance) over one engine context."""

    def __init__(
        self, methods: dict[str, AttributionMethod], ctx: EngineContext, build_command: Callable[[list[str]], str]
    ):
        # build_command: the session's (``AttributionSession.build_command``), so the "not built" hint names
        # the checkpoint, the cache root and every non-default setting, as the command it prints elsewhere
        self.methods, self.ctx, self.build_command = methods, ctx, build_command

    def availability(self, m: AttributionMethod) -> tuple[bool, str | None]:
        try:
            return m.availability(self.ctx)
        except Unavailable as e:
            return False, str(e)

    def _size_mb(self, name: str) -> float:
        """Disk size of a method's caches under the current settings (``AttributionMethod.size_mb``)."""
        try:
            return float(self.methods[name].size_mb(self.ctx))
        except Exception:  # noqa: BLE001 - a size is informative only
            log.debug("size_mb failed for %s", name, exc_info=True)
            return 0.0

    def _artefacts(self, name: str) -> dict[str, tuple[str, dict[str, Any]]]:
        """folder -> (name, settings) of the store artefacts a method uses now ({} without a store)."""
        if self.ctx.store is None:
            return {}
        try:
            keys = self.methods[name].cache_keys(self.ctx)
        except Exception:  # noqa: BLE001 - informative only (a method that cannot say its keys shares nothing)
            log.debug("cache_keys failed for %s", name, exc_info=True)
            return {}
        return {str(self.ctx.store.path(n, s)): (n, s) for n, s in keys}

    def shared_caches(self, names: list[str]) -> dict[str, list[str]]:
        """name -> the other methods of ``names`` that use one of its artefacts (a contributor's two scores
        of one stored feature set, QA round 19: each row's size is the whole artefact, so a total adds it once)."""
        folders = {n: set(self._artefacts(n)) for n in names}
        return {n: [o for o in names if o != n and folders[n] & folders[o]] for n in names}

    def total_size_mb(self, names: list[str]) -> float:
        """Disk size of every artefact the methods ``names`` use now, each counted once."""
        unique: dict[str, tuple[str, dict[str, Any]]] = {}
        for n in names:
            unique.update(self._artefacts(n))
        return float(sum(self.ctx.store.size_mb(k, s) for k, s in unique.values())) if unique else 0.0

    def recorded_build_seconds(self, name: str) -> float | None:
        """Build time stored with a method's current caches when they were built."""
        try:
            return self.methods[name].recorded_build_seconds(self.ctx)
        except Exception:  # noqa: BLE001 - informative only
            log.debug("recorded_build_seconds failed for %s", name, exc_info=True)
            return None

    def recorded_build_sharing(self, name: str) -> dict[str, Any]:
        """How a method's current caches shared a gradient pass when they were built
        (``AttributionMethod.recorded_build_sharing``): {"shared_with": provider} when another method's
        pass computed its gradients (its recorded seconds are only what it did after that pass),
        {"fed": [methods]} when its pass also filled theirs (its seconds include their share); {} when
        it built alone.  Every reader of ``recorded_build_seconds`` shows this beside the figure."""
        try:
            return self.methods[name].recorded_build_sharing(self.ctx)
        except Exception:  # noqa: BLE001 - informative only
            log.debug("recorded_build_sharing failed for %s", name, exc_info=True)
            return {}

    def disk_full(self, error: BaseException) -> DiskFullError | None:
        """``error`` as the one-line ``DiskFullError`` when a full cache disk caused it, else None."""
        if self.ctx is None or self.ctx.store is None:
            return None
        return disk_full_error(error, self.ctx.store.root)

    def settings(self, name: str) -> dict[str, Any]:
        """The settings ``name``'s cache is keyed by (``AttributionMethod.settings``): what a build of it used and a
        load of it must match; the generic ones when the method cannot say (CLIP without open_clip)."""
        m = self.methods[name]
        try:
            return m.settings(self.ctx)
        except Exception:  # noqa: BLE001 - informative only (CLIP's needs open_clip)
            log.debug("settings failed for %s", name, exc_info=True)
            return AttributionMethod.settings(m, self.ctx)

    def status(self, names: list[str] | None = None) -> dict[str, dict]:
        """name -> {"built", "available", "reason", "settings", "size_mb", "cached"}, for ``names`` (default: every
        method; a subset skips the others' checks, e.g. CLIP's open_clip import, seconds).  ``cached``: the
        method keeps a cache (``cache_keys``), so "built" is work done, not a method with nothing to build
        (pixel cosine)."""
        out: dict[str, dict] = {}
        listed = [n for n in self.methods if names is None or n in names]
        sharing = self.shared_caches(listed)
        for name, m in self.methods.items():
            if names is not None and name not in names:
                continue
            available, reason = self.availability(m)
            built = bool(available and m.is_built(self.ctx))
            problem = self.cache_problem(name) if available and not built else None
            if problem is not None:
                reason = problem  # a corrupt cache is not "not built": say what is wrong and how to rebuild
            elif available and not built and reason is None:
                reason = self.not_built_reason(name)
            out[name] = {
                "built": built,
                "available": available,
                "corrupt": problem is not None,
                "reason": reason,
                "settings": self.settings(name),
                "size_mb": self._size_mb(name) if built else 0.0,
                "shares_cache_with": sharing[name],
                "cached": bool(available and m.cache_keys(self.ctx)),
            }
        return out

    def not_built_reason(self, name: str) -> str:
        """"not built: run `...`", and, when the cache holds this method built with other settings (QA round
        12: after `build --mc-samples 8` a default query said only "not built"), which settings they were and
        the flags that use them."""
        other = self.built_with_other_settings(name)
        if other is None:
            return f"not built: run `{self.build_command([name])}`"
        return f"not built for these settings: {other}; to build these, run `{self.build_command([name])}`"

    def built_with_other_settings(self, name: str) -> str | None:
        """How the closest cache of ``name``'s first missing artefact differs from the current settings
        ("mc_samples 8 here, 64 asked: add --mc-samples 8"), or None when the store holds none."""
        from ..config import SETTING_FLAGS

        store = None if self.ctx is None else self.ctx.store
        if store is None:
            return None
        try:
            keys = self.methods[name].cache_keys(self.ctx)
            missing = next(((a, dict(st)) for a, st in keys if not store.exists(a, st)), None)
            if missing is None:
                return None
            artefact, want = missing
            best: dict[str, tuple[Any, Any]] | None = None
            for entry in store.describe():
                if entry.get("name") != artefact or entry.get("state") != "ok":
                    continue
                have = entry.get("settings") or {}
                diff = {k: (have.get(k), want.get(k)) for k in sorted(set(have) | set(want))
                        if have.get(k) != want.get(k) and k not in ("draws", "params")}
                diff = _implied_by_mc_samples(diff)
                if diff and (best is None or len(diff) < len(best)):
                    best = diff
        except Exception:  # noqa: BLE001 - a hint only
            log.debug("built_with_other_settings failed for %s", name, exc_info=True)
            return None
        if best is None:
            return None
        # a setting a cache's key leaves out is at its default (``kfac_blocks`` is named only when joint): say the
        # default, not None, which no flag takes (QA 61 F3: "add --kfac-blocks None to use it")
        from ..config import AttributionConfig

        defaults = AttributionConfig()
        best = {k: (getattr(defaults, k) if have is None and hasattr(defaults, k) else have,
                    getattr(defaults, k) if want is None and hasattr(defaults, k) else want)
                for k, (have, want) in best.items()}
        parts = [f"{k} {have!r} there, {want!r} asked" for k, (have, want) in list(best.items())[:3]]
        flags = [f"{SETTING_FLAGS[k]} {have}" for k, (have, _) in best.items() if k in SETTING_FLAGS]
        use = f": add {' '.join(flags)} to use it" if flags and len(flags) == len(best) else ""
        return f"the cache holds {artefact} built with {'; '.join(parts)}{use}"

    def cache_problem(self, name: str) -> str | None:
        """Why a method's cache folder exists but is refused (corrupt, edited, stale), or None.

        Cheap (reads settings.json and array headers; checksums are checked when arrays load).
        """
        store = self.ctx.store
        if store is None:
            return None
        try:
            keys = self.methods[name].cache_keys(self.ctx)
        except Exception:  # noqa: BLE001 - a method that cannot name its keys has nothing to check
            return None
        for key, settings in keys:
            try:
                store.validate(key, settings)
            except StaleCacheError as e:
                return f"corrupt cache: {e}"
        return None

    def repair(self, names: list[str]) -> list[str]:
        """Verify every cache of these methods (checksums included) and delete the ones that fail.

        Returns the removed folders; a following ``build`` recomputes them (``build --rebuild``).
        """
        store = self.ctx.store
        removed: list[str] = []
        if store is None:
            return removed
        for name in names:
            m = self.methods[name]
            if not self.availability(m)[0]:
                continue
            mine = 0
            for key, settings in m.cache_keys(self.ctx):
                try:
                    store.verify(key, settings, force=True)
                except StaleCacheError as e:
                    log.warning("removing %s", e)
                    store.remove(key, settings)
                    removed.append(str(store.path(key, settings)))
                    mine += 1
            if mine and hasattr(m, "_key"):
                m._key = None  # drop what this process loaded from a removed cache
        return removed

    def check_writable(self, names: list[str]) -> None:
        """CacheRootError (an OSError) when one of these methods keeps a cache and the cache root cannot
        be written: a build then fails at once with the root named, before any lock or progress message."""
        if self.ctx.store is not None and any(self.methods[n].cache_keys(self.ctx) for n in names):
            self.ctx.store.check_writable()

    def build_lock(self, name: str, on_wait: Callable[[], None] | None = None,
                   while_waiting: Callable[[float, float, str], None] | None = None,
                   ) -> contextlib.AbstractContextManager[bool]:
        """Cross-process lock of one method's cache entries (none under torchrun: ranks build together).

        One lock per artefact (``cache_keys`` entry), taken in a fixed order, not one per method: two
        methods that share an artefact (a contributor's two scores of one stored feature set, QA round 19)
        then wait for each other instead of building it twice at once, and no two builders can deadlock.
        The cache root is checked here, when the lock is asked for, not when it is entered: so a build
        on an unwritable root fails before it says it is waiting for another build.  ``while_waiting(seconds,
        fraction, words)``: called every few seconds while another process builds, with how far that build
        has got on disk (``Store.build_progress``)."""
        from .. import distributed

        keys = self.methods[name].cache_keys(self.ctx)
        if not keys or self.ctx.store is None:
            return contextlib.nullcontext(True)
        self.ctx.store.check_writable()
        if distributed.current().world > 1:
            return contextlib.nullcontext(True)
        store = self.ctx.store

        def waited(seconds: float) -> None:
            try:
                fraction, words = store.build_progress(keys)
            except OSError:  # a progress line must never fail the build that waits (an unreadable folder)
                fraction, words = 0.0, ""
            while_waiting(seconds, fraction, words)

        return _all_locked(store, keys, on_wait, waited if while_waiting is not None else None)

    def build(self, names: list[str], progress: Progress | None = None, rebuild: bool = False) -> dict:
        """Build (or load) each method's cache; {method: {"seconds", "size_mb", "status"[, "reason"]}}.

        ``progress(message, fraction)`` gets the method name prefixed to every message;
        fraction is the overall fraction over all methods asked for.  A build that fails because the
        cache's disk is full raises ``DiskFullError`` (named method, root, free space) at once and
        builds none of the methods after it; other failures propagate as they are.
        """
        progress = progress or no_progress
        summary: dict[str, dict] = {}
        for k, name in enumerate(names):
            m = self.methods[name]

            def sub(msg: str, frac: float, k: int = k, name: str = name) -> None:
                progress(f"{name}: {msg}", (k + min(max(frac, 0.0), 1.0)) / len(names))

            available, reason = self.availability(m)
            if not available:
                summary[name] = {"status": "unavailable", "reason": reason, "seconds": 0.0, "size_mb": 0.0}
                sub("unavailable", 1.0)
                continue
            t0 = time.perf_counter()
            waiting_since: list[float] = []  # when this process began to wait for another's build

            def on_wait(sub: Progress = sub, waiting_since: list[float] = waiting_since) -> None:
                waiting_since.append(time.perf_counter())
                sub(f"{WAITING} of this cache", 0.0)

            try:
                # CacheRootError first if the cache root cannot be written; "waiting" only if another holds it
                lock = self.build_lock(
                    name, on_wait=on_wait,
                    # the bar's own clock shows the time waited; the words, the other build's saved parts
                    while_waiting=lambda sec, frac, words: sub(
                        f"{WAITING}: {words}" if words else WAITING, frac),
                )
                with lock:  # a second process waits here, then finds the cache built
                    waited = time.perf_counter() - waiting_since[0] if waiting_since else 0.0
                    if rebuild:
                        self.repair([name])
                    problem = self.cache_problem(name)
                    if problem is not None:  # refuse before computing anything: publishing would fail anyway
                        raise StaleCacheError(problem)
                    was_built = bool(m.cache_keys(self.ctx)) and m.is_built(self.ctx)  # (pixel keeps none)
                    m.build(self.ctx, sub)
            except Unavailable as e:
                summary[name] = {"status": "unavailable", "reason": str(e), "seconds": 0.0, "size_mb": 0.0}
                continue
            except StaleCacheError as e:
                summary[name] = {"status": "corrupt", "reason": str(e), "seconds": 0.0, "size_mb": 0.0}
                continue
            except CacheRootError:
                raise  # a root that cannot be written is not a full disk (and a retry cannot mend it)
            except Exception as e:
                full = self.disk_full(e)
                if full is not None:  # the others would fail on the same disk: stop and say why now
                    raise full from e
                raise
            sub("done", 1.0)
            summary[name] = {
                "status": "ok",
                "seconds": time.perf_counter() - t0,
                "size_mb": self._size_mb(name),
                # what the seconds were: a wait for another process's build (QA round 18: a `build` that only
                # waited printed another process's shared-pass notes as its own work), or a load of a built cache
                "waited": waited,
                "was_built": was_built,
            }
        return summary

    def share_gradient_passes(self, names: list[str]) -> dict[str, list[str]]:
        """When a method asked for will make a pass over the training gradients
        (``opens_gradient_pass``: K-FAC's stored bank, not yet built), let that pass feed every
        other method asked for that offers a ``feature_sink`` (TRAK: the same training-loss
        gradients; D-TRAK: square-norm gradients from the same forward pass, same draws and
        parameters): one gradient pass instead of three.  Returns {the method making the pass:
        the methods it will feed}, empty when none.  Call before building (the session's ``build``
        does; a caller that builds one method at a time -- the CLI, the app's build worker --
        calls it once with all of them)."""
        known = [n for n in names if n in self.methods]
        provider = next((n for n in known if self.methods[n].opens_gradient_pass(self.ctx)), None)
        if provider is None or not self.availability(self.methods[provider])[0]:
            return {}
        fed, sinks = [], []
        for name in known:
            if name == provider or not self.availability(self.methods[name])[0]:
                continue  # (the build checks availability anyway, so this costs nothing extra)
            sink = self.methods[name].feature_sink(self.ctx)
            if sink is not None:
                fed.append(name)
                sinks.append(sink)
                note = getattr(sink, "fed_by", None)
                if callable(note):  # its cache then records whose pass computed its gradients (and whose time)
                    note(provider)
        if not sinks:  # a later call for fewer methods (the session's build of one method) keeps the earlier ones
            return {}
        self.methods[provider].feed_gradient_pass(sinks)
        return {provider: fed}

    def load(self, names: list[str]) -> dict[str, float]:
        """Load every *built* cache now (factors, banks memory-mapped, features) so the first query
        is as fast as the others; builds nothing.  Returns seconds per method loaded."""
        out: dict[str, float] = {}
        for name in names:
            m = self.methods[name]
            if not self.availability(m)[0] or not m.is_built(self.ctx):
                continue
            t0 = time.perf_counter()
            m.build(self.ctx, no_progress)  # a built cache is loaded, not recomputed
            out[name] = time.perf_counter() - t0
        return out



@contextlib.contextmanager
def _all_locked(store: Any, keys: list[tuple[str, dict[str, Any]]], on_wait: Callable[[], None] | None,
                while_waiting: Callable[[float], None] | None) -> Iterator[bool]:
    """Hold ``Store.lock`` of every artefact in ``keys`` (``build-<name>-<settings digest>``), taken in
    sorted order so that two builders of overlapping sets cannot each hold what the other waits for;
    ``on_wait`` is called once, at the first lock another process holds."""
    told: list[bool] = []

    def first_wait() -> None:
        if not told and on_wait is not None:
            told.append(True)
            on_wait()

    tags = sorted({(key, settings_digest(settings)): settings for key, settings in keys}.items())
    with contextlib.ExitStack() as stack:
        for (key, _), settings in tags:
            stack.enter_context(store.lock(f"build-{key}", settings, on_wait=first_wait, while_waiting=while_waiting))
        yield True


def _implied_by_mc_samples(diff: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    """``diff`` without a K-FAC ``factor_draws`` difference that the cache's M implies: a cache built with all of its
    M draws (None) against k >= that M asked is the same factor set once ``--mc-samples M`` is added (k >= M is
    stored as None, ``KFACInfluence``). QA 33 #6: the hint for a cache built at M = 8 against digits' M = 64, k = 8
    offered no flag, since "factor_draws None" has none, where TRAK's said "add --mc-samples 8"."""
    fd, mc = diff.get("factor_draws"), diff.get("mc_samples")
    if fd is not None and mc is not None and fd[0] is None and fd[1] is not None and mc[0] is not None \
            and int(fd[1]) >= int(mc[0]):
        return {k: v for k, v in diff.items() if k != "factor_draws"}
    return diff
