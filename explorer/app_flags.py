"""The explorer's own command-line flags (after ``--`` on ``streamlit run explorer/app.py``, or given to ``python -m
explorer``), with their ATTRIBUTION_* fallbacks.

Kept apart from ``runtime`` (Streamlit, torch, the session), so that ``python -m explorer`` checks the flags and
prints ``--help`` before it starts a server: under ``streamlit run`` the script, and so its flag parsing, runs
only when a browser opens the page (QA 46 #1: ``-- --help`` printed nothing until a visit, and the server kept
running).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.attribution.setting_flags import add_setting_options, setting_changes


@dataclass(frozen=True)
class AppArgs:
    preset: str = "digits"
    checkpoint: str | None = None
    cache: str | None = None
    device: str | None = None
    data_root: str | None = None  # the training data's folder (CIFAR pickles, IDX files, images), as the CLI's
    max_retrain_jobs: int = 1  # retraining jobs running at once on this server; the rest queue
    no_retrain: bool = False  # public demos: no retraining at all
    # whether --preset (or ATTRIBUTION_PRESET) was given; if not, a --checkpoint's own attribution settings apply
    preset_named: bool = True
    # the attribution settings the flags gave (--mc-samples 1 -> ("mc_samples", 1)), in SETTING_FLAGS order: they
    # replace the served model's (the preset's, or the checkpoint's own), as on `attribution-engine build/query`
    # (QA 54 F3); a tuple, so that the args stay a hashable key of the server's cached session
    settings: tuple[tuple[str, Any], ...] = ()

    def setting_changes(self) -> dict[str, Any]:
        return dict(self.settings)


class ArgsError(SystemExit):
    """A flag the app does not know or a bad value: the message says which (shown on the page and in the
    terminal).  A SystemExit, so a script calling ``parse_args`` outside Streamlit stops with it."""


APP_SCRIPT = Path(__file__).resolve().parent / "app.py"


def app_argv(argv: list[str] | None = None) -> list[str]:
    """``argv`` (default ``sys.argv``) after the script name when it is this app's command line, else [].

    Why: ``streamlit run explorer/app.py -- FLAGS`` sets ``sys.argv = ["explorer/app.py", *FLAGS]``, but
    under pytest (``streamlit.testing``) sys.argv is the test runner's (``pytest -q tests -k x``): strict
    parsing must see only the app's own flags, never another program's."""
    import sys

    argv = sys.argv if argv is None else argv
    if not argv:
        return []
    try:
        ours = Path(argv[0]).resolve() == APP_SCRIPT
    except (OSError, ValueError):
        ours = False
    return list(argv[1:]) if ours else []


class HelpRequested(SystemExit):
    """``-- --help``: ``text`` is argparse's help (the flags, their help texts, the ATTRIBUTION_* variables).
    QA 45 #7: ``--help`` was refused as an unknown flag, and the help texts below were never shown anywhere;
    ``app.main`` now prints them in the terminal and shows them on the page.  A SystemExit (code 0), so a
    script calling ``parse_args`` outside Streamlit stops with it, as argparse's own help does."""

    def __init__(self, text: str) -> None:
        super().__init__(0)
        self.text = text


class _Help(argparse.Action):
    """argparse's help action, raising ``HelpRequested`` instead of printing and exiting the server."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        raise HelpRequested(parser.format_help())


HELP_EPILOG = """\
Run it as:  python -m explorer [the flags above] [streamlit's own --section.option flags]
       or:  streamlit run explorer/app.py [streamlit's own flags] -- [the flags above]
Without a flag, these environment variables give its value: ATTRIBUTION_PRESET, ATTRIBUTION_CHECKPOINT,
ATTRIBUTION_CACHE, ATTRIBUTION_DEVICE, ATTRIBUTION_DATA_ROOT, ATTRIBUTION_MAX_RETRAIN_JOBS and
ATTRIBUTION_NO_RETRAIN (1, true or yes).  The attribution settings have no variable: give them as flags, or in a
preset .json ({"base": "cifar2", "attribution": {"mc_samples": 1}}).
The attribution settings are attribution-engine build's and query's, with the same meaning: a server started with
the flags a build was given reads the caches that build made.  They apply to the model this server serves (its
--preset, or --checkpoint's); with any of them, the sidebar offers no switch to the other shipped model."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit(2) under Streamlit
        # the usage without its "usage:" word, on one line; the program's name whole (QA 61 F5: dropping two
        # words left "-m explorer" of "python -m explorer")
        usage = " ".join(self.format_usage().strip().removeprefix("usage:").split())
        raise ArgsError(f"error: {message} (the app takes: {usage})")


def parse_args(argv: list[str] | None = None, env: dict[str, str] | None = None,
               prog: str = "explorer/app.py") -> AppArgs:
    """Flags after ``--`` on the streamlit command line (``argv``: the flags themselves; default: this app's
    flags from sys.argv, ``app_argv``), falling back to ATTRIBUTION_* variables.  ``ArgsError`` on an
    unknown flag: a misspelt ``--cache`` silently building a new cache under ./cache costs minutes.  ``prog``: the
    program its usage line names (``python -m explorer`` there: QA 49 #2)."""
    env = dict(os.environ) if env is None else env
    p = _Parser(prog=prog, add_help=False, allow_abbrev=False, epilog=HELP_EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Diffusion Attribution Explorer: which training images a diffusion model's output "
                            "comes from.")
    p.add_argument("-h", "--help", action=_Help, nargs=0,
                   help="show these flags and their help texts, and stop (under streamlit run: on the page, at the "
                        "first visit; python -m explorer --help prints them at once)")
    p.add_argument("--preset", default=None, help="preset name (digits, mnist, cifar2, cifar10) or a preset .json")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the preset's)")
    p.add_argument("--cache", "--cache-root", dest="cache", default=None,
                   help="cache root (default: ATTRIBUTION_CACHE or ./cache)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: best available)")
    p.add_argument("--data-root", default=None,
                   help="training data folder (default: the one the checkpoint was trained on)")
    p.add_argument("--max-retrain-jobs", type=int, default=None,
                   help="retraining jobs running at once on this server (default 1; the rest queue)")
    p.add_argument("--no-retrain", action="store_true", help="turn retraining off (public demos)")
    add_setting_options(p.add_argument_group(
        "attribution settings", "as on attribution-engine build and query; they apply to the served model (its "
                                "--preset, or --checkpoint's), whose preset gives the rest"))
    args = p.parse_args(app_argv() if argv is None else argv)
    jobs = args.max_retrain_jobs
    if jobs is None:
        text = env.get("ATTRIBUTION_MAX_RETRAIN_JOBS") or "1"
        try:
            jobs = int(text)
        except ValueError:
            raise ArgsError(f"error: ATTRIBUTION_MAX_RETRAIN_JOBS must be an integer, got {text!r}") from None
    if jobs < 1:
        raise ArgsError(f"error: --max-retrain-jobs must be at least 1, got {jobs} (use --no-retrain to turn it off)")
    no_retrain = args.no_retrain or env.get("ATTRIBUTION_NO_RETRAIN", "").lower() in ("1", "true", "yes")
    return AppArgs(
        preset=args.preset or env.get("ATTRIBUTION_PRESET") or "digits",
        checkpoint=args.checkpoint or env.get("ATTRIBUTION_CHECKPOINT") or None,
        cache=args.cache or env.get("ATTRIBUTION_CACHE") or None,
        device=args.device or env.get("ATTRIBUTION_DEVICE") or None,
        data_root=args.data_root or env.get("ATTRIBUTION_DATA_ROOT") or None,
        max_retrain_jobs=jobs,
        no_retrain=no_retrain,
        preset_named=bool(args.preset or env.get("ATTRIBUTION_PRESET")),
        settings=tuple(setting_changes(args).items()),
    )
