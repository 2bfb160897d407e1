"""Command line: ``attribution-engine`` / ``python -m engine``.

The CLI owns all argparse: each subcommand module (``engine.cli.model``, ``.foundation``,
``.attribution``, ``.groups``, ``.bench``, ``.evaluate``, ``.lds_studies``) turns its options into typed configuration
and calls the library, which never sees an ``argparse.Namespace``.
"""

from __future__ import annotations

import argparse
import sys

from .. import warning_lines
from ..bar_redraw import match_log_intervals
from . import attribution, bench, evaluate, foundation, groups, lds_studies, model  # noqa: F401 - they register subcommands
from .common import REGISTRY, run_handler

# Subcommands in the order of the layers: model, attribution, evaluation (stable within a module).
_ORDER = ("model", "foundation", "attribution", "groups", "bench", "evaluate", "lds_studies")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attribution-engine",
        description="Diffusion Attribution Explorer engine: train DDPMs, sample, build "
        "attribution caches, query influences and evaluate them.",
        epilog="Default folders (cache/, runs/..., assets/results) are under the repository, whatever the "
        "current folder; --cache-root, --out and --results put them elsewhere.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in sorted(REGISTRY, key=lambda fn: _ORDER.index(fn.__module__.rsplit(".", 1)[-1])):
        add(sub)
    return parser


def warn_plugin_problems() -> None:
    """One ``warning:`` line on stderr per method or bank-kind file the registries had to leave out, before
    anything else (``--help`` included): the other methods work, and the contributor learns which file."""
    from ..attribution.methods import plugin_problems

    for problem in plugin_problems():
        print(f"warning: {problem}", file=sys.stderr)


def engine_warnings_on_stderr() -> None:
    """The engine's warnings (a method that failed while the others answered) as ``warning:`` lines on stderr,
    like the CLI's own; the traceback only with ATTRIBUTION_DEBUG.  Once per process; a handler the host set
    up already (a test, a notebook) is left as it is."""
    import logging

    class Stderr(logging.StreamHandler):
        """Writes to whatever ``sys.stderr`` is when a line is logged, not to the stream of the first
        ``main()`` (a test's captured stderr, long closed, when ``main`` runs again in one process)."""

        @property
        def stream(self):  # noqa: ANN202 - logging's attribute
            return sys.stderr

        @stream.setter
        def stream(self, value) -> None:  # noqa: ANN001 - StreamHandler.__init__ sets it
            pass

    # the engine's own warnings.warn (a data folder with images beside its class folders, an IDX file beside its
    # .gz) as one "warning: ..." line, not Python's "file:line: UserWarning" and the source line (QA 26 #7)
    warning_lines.install()
    logger = logging.getLogger("engine")
    if logger.handlers:
        return
    handler = Stderr()
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    match_log_intervals()  # before tqdm's import, which reads TQDM_* once
    engine_warnings_on_stderr()
    warn_plugin_problems()
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..threads import configure_threads_when_loaded

    # at torch's import, not now: a command that refuses its options before needing torch answers at once;
    # commands with --threads set their own after
    configure_threads_when_loaded(getattr(args, "command", "") or "")
    return run_handler(args)


if __name__ == "__main__":
    sys.exit(main())
