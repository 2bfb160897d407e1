"""The session's caches: their status, builds and repairs, and the CLI commands that build them.

``SessionBuilds`` is a mixin that ``AttributionSession`` inherits, not a helper object it delegates to:
callers, the app's build worker and the tests call (and patch) these as the session's own methods
(``session.build_missing``, ``AttributionSession.build``), and a query reaches them through ``self``
(``auto_build`` builds what it needs, an unbuilt method's reason names its build command), so a patch on
the session reaches every caller.  The bookkeeping of caches lives in ``engine.attribution.caches``
(``MethodCaches``); this mixin adds what needs the session: which methods a call names, one progress bar
per method for a library auto-build, and commands that act on this session's model, data and settings.

It reads, from the session: ``caches``, ``ctx``, ``config``, ``_methods``, the constructor's arguments as
given (``_preset_arg``, ``_checkpoint_arg``, ``_data_root_arg``, ``_cache_arg``, ``_preset_attribution``),
``_resolve_methods`` and ``_availability``.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

from ..config import SETTING_FLAGS, AttributionConfig
from .terminal_progress import terminal_progress

if TYPE_CHECKING:
    from .caches import MethodCaches
    from .context import EngineContext
    from .methods.base import AttributionMethod, Progress


class SessionBuilds:
    """Cache status, builds, repairs and the build commands of ``AttributionSession`` (see the module)."""

    caches: MethodCaches
    ctx: EngineContext
    config: AttributionConfig
    _methods: dict[str, AttributionMethod]
    _preset_arg: str
    _preset_named: bool
    _checkpoint_arg: str | None
    _data_root_arg: str | None
    _cache_arg: str | None
    _preset_attribution: AttributionConfig

    def recorded_build_seconds(self, name: str) -> float | None:
        """Build time stored with a method's current caches when they were built."""
        return self.caches.recorded_build_seconds(name)

    def status(self, names: list[str] | None = None) -> dict[str, dict]:
        """name -> {"built", "available", "reason", "settings", "size_mb"} (``MethodCaches.status``), for
        ``names`` (default: every method)."""
        return self.caches.status(names)

    def _not_built_reason(self, name: str) -> str:
        return self.caches.not_built_reason(name)

    def build(
        self, methods: list[str] | None = None, progress: Progress | None = None, rebuild: bool = False
    ) -> dict:
        """Build (or load) each method's cache; {method: {"seconds", "size_mb", "status"[, "reason"]}}.

        ``rebuild``: first verify the caches (checksums included) and delete those that fail.
        A corrupt cache otherwise comes back with status "corrupt" and the store's message.
        """
        names = self._resolve_methods(methods)
        self.share_gradient_passes(names)
        return self.caches.build(names, progress, rebuild=rebuild)

    def build_missing(self, methods: list[str] | None = None, progress: Progress | None = None) -> dict[str, dict]:
        """Build the caches of ``methods`` (default: all) that can run here and are not built, sharing one
        gradient pass as ``build`` does: what ``auto_build`` does before a query, and ``--auto-build``.
        A corrupt cache is left alone (the query reports it with how to rebuild).  Returns ``build``'s
        summary of the methods it built ({} when none was missing).

        ``progress``: a ``progress(message, fraction)`` callback; by default a tqdm bar on stderr, since a
        build on an empty cache takes minutes and a silent one was taken for a hung query (QA round 12)."""
        names = self._resolve_methods(methods)
        todo = [n for n in names if self._availability(self._methods[n])[0]
                and not self._methods[n].is_built(self.ctx) and self.cache_problem(n) is None]
        if not todo:
            return {}
        if progress is not None:
            return self.build(todo, progress)
        # one bar per method, each to 100%: on one bar the methods' equal shares read 33% for the minutes of
        # K-FAC's pass, then jumped to 100% for TRAK and D-TRAK fed by it
        self.share_gradient_passes(todo)
        summary: dict[str, dict] = {}
        for name in todo:
            with terminal_progress(f"building {name}") as bar:
                summary.update(self.caches.build([name], bar))
        return summary

    def unbuilt_status(self, name: str, built_now: dict[str, dict]) -> tuple[str, str]:
        """(status, reason) of a method that can run here but whose cache is not built, for a query or a query
        set: "error" with the store's words when the cache is corrupt or stale; else "unavailable", with the
        reason its build just gave (``build_missing``'s summary: it found the method unavailable) or how to
        build it."""
        problem = self.cache_problem(name)
        if problem is not None:
            return "error", problem
        return "unavailable", built_now.get(name, {}).get("reason") or self._not_built_reason(name)

    def share_gradient_passes(self, names: list[str]) -> dict[str, list[str]]:
        """One training-gradient pass for K-FAC's bank, TRAK and D-TRAK: {the method making the pass:
        the methods it feeds} (``MethodCaches.share_gradient_passes``)."""
        return self.caches.share_gradient_passes(names)

    def cache_problem(self, name: str) -> str | None:
        """Why method ``name``'s cache exists but is refused (``MethodCaches.cache_problem``), or None."""
        return self.caches.cache_problem(name)

    def repair(self, methods: list[str] | None = None) -> list[str]:
        """Delete these methods' caches that fail verification; returns the removed folders."""
        return self.caches.repair(self._resolve_methods(methods))

    def command(self, subcommand: str) -> str:
        """``attribution-engine SUBCOMMAND`` for this session's model and data: the preset as it was
        named (a .json path stays a path), the checkpoint and the data root when they were given.
        Every command the session prints starts here, so that pasting one acts on the same files."""
        cmd = f"attribution-engine {subcommand}"
        if self._preset_named or not self._checkpoint_arg:  # an unnamed default preset beside --checkpoint: none
            cmd += f" --preset {shlex.quote(self._preset_arg)}"
        if self._checkpoint_arg:
            cmd += f" --checkpoint {shlex.quote(self._checkpoint_arg)}"
        if self._data_root_arg:
            cmd += f" --data-root {shlex.quote(self._data_root_arg)}"
        return cmd

    def build_command(self, methods: list[str] | None = None, rebuild: bool = False) -> str:
        """The CLI command that builds (``rebuild``: verifies and rebuilds) these methods' caches."""
        cmd = self.command("build")
        if self._cache_arg:
            cmd += f" --cache-root {shlex.quote(self._cache_arg)}"
        if methods:
            cmd += f" --methods {','.join(methods)}"
        if not methods or any(self._methods[m].needs_gradient for m in methods if m in self._methods):
            cmd += "".join(f" {flag} {value}" for flag, value in _setting_flags(self.config, self._preset_attribution))
        return cmd + (" --rebuild" if rebuild else "")

    def load(self, methods: list[str] | None = None) -> dict[str, float]:
        """Load every *built* cache now so the first query is as fast as the others; builds nothing."""
        return self.caches.load(self._resolve_methods(methods))


def _setting_flags(config: AttributionConfig, base: AttributionConfig) -> list[tuple[str, object]]:
    """(flag, value) for every setting where ``config`` differs from ``base``, the preset's (what ``build
    --preset`` uses without flags), so a printed build command builds the cache that this session reads.
    A None value (K-FAC factors from all M draws) has no flag: the CLI sets it itself when --draws asks."""
    return [(flag, getattr(config, name)) for name, flag in SETTING_FLAGS.items()
            if getattr(config, name) != getattr(base, name) and getattr(config, name) is not None]




__all__ = ["SessionBuilds"]
