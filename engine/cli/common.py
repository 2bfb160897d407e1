"""What every subcommand shares: the registry, the common options (preset, checkpoint,
device, data root) and their resolution into a preset, a checkpoint folder and a device.

Each subcommand is registered by a small ``add_*`` function next to its handler; the
modules that hold them are imported by ``engine.cli.parser``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from ..config import PRESETS, Preset, get_preset
from ..paths import best_device, check_device, default_checkpoint
from ..validation import one_line

Handler = Callable[[argparse.Namespace], int]
REGISTRY: list[Callable[[argparse._SubParsersAction], None]] = []


def register(fn: Callable[[argparse._SubParsersAction], None]) -> Callable[[argparse._SubParsersAction], None]:
    """Decorator: ``fn`` adds its subcommand to the parser (``engine.cli.parser`` calls every one)."""
    REGISTRY.append(fn)
    return fn


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, refused while parsing (a count of 0 workers,
    steps or draws was accepted and failed, or silently meant 1, after minutes of work: QA 15)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def int_list(text: str, flag: str, minimum: int = 1) -> tuple[int, ...]:
    """'2,4' -> (2, 4); ValueError naming ``flag`` for an empty list, a non-integer or a value < ``minimum``."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected a comma list of integers") from None
    if not values or min(values) < minimum:
        raise ValueError(f"{flag} {text!r}: every value must be at least {minimum}")
    return values


class DefaultPreset(str):
    """``--preset``'s default, told apart from a ``--preset digits`` the user typed (``preset_named``)."""


DEFAULT_PRESET = DefaultPreset("digits")


def preset_named(args: argparse.Namespace) -> bool:
    """Whether the user named ``--preset`` (else it is the default, and a ``--checkpoint``'s own settings apply)."""
    return not isinstance(getattr(args, "preset", None), DefaultPreset)


def with_attribution_source(args: argparse.Namespace, preset: Preset, checkpoint: Path) -> Preset:
    """``preset`` with the attribution settings a command uses on ``checkpoint``: the named preset's, else the
    checkpoint's own (``checkpoint.attribution_source``); its note, if any, printed on stderr."""
    from ..model.checkpoint import attribution_source  # torch, which the parser must not import

    source, note = attribution_source(checkpoint, preset, preset_named(args))
    if note:
        print(f"note: {note}", file=sys.stderr)
    return preset.replace(attribution=source.attribution)


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help=f"experiment preset ({', '.join(PRESETS)}) or a preset .json file (default: digits)",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint folder (default: assets/<preset> for the shipped digits and mnist, "
        "runs/<preset name> under the repository otherwise)",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    p.add_argument(
        "--data-root", default=None,
        help="folder with the training data: CIFAR pickles, MNIST-style IDX files or an image folder",
    )


def subcommand(
    sub: argparse._SubParsersAction, name: str, func: Handler, help: str, description: str
) -> argparse.ArgumentParser:
    """One subcommand parser with the common options (preset, checkpoint, device, data root)
    and its handler: every ``add_*`` starts here, then adds its own options."""
    p = sub.add_parser(name, help=help, description=description)
    add_common(p)
    p.set_defaults(func=func)
    return p


def resolve(args: argparse.Namespace) -> tuple[Preset, Path, str]:
    """Preset (with --data-root applied), checkpoint folder and device from common args."""
    preset = get_preset(args.preset, getattr(args, "data_root", None))
    if getattr(args, "kfac_bank", None) is None:  # --kfac-bank replaces the file's value (checked as a flag)
        check_preset_file_bank(preset, args.preset)
    ckpt = Path(args.checkpoint) if args.checkpoint else default_checkpoint(preset.name)
    return preset, ckpt, check_device(args.device) if args.device else best_device()


def check_preset_file_bank(preset: Preset, preset_arg: str) -> None:
    """Refuse a preset file's unknown ``attribution.kfac_bank`` when the file is read, by every command (QA 26
    #6: a typo was accepted by ``train``, which does not use it, and refused only at ``build``, after the
    training).  The preset loader cannot check it: bank kinds are plugins of the attribution package, which
    sits above the loader; their registry reads the package's source and imports nothing heavy."""
    from ..attribution.bank_kinds import bank_modes
    from ..validation import InvalidSettingError

    modes = bank_modes()
    if str(preset_arg).endswith(".json") and preset.attribution.kfac_bank not in modes:
        raise InvalidSettingError(f"preset file {preset_arg}: attribution.kfac_bank must be one of "
                                  f"{', '.join(modes)}, got {preset.attribution.kfac_bank!r}")


def check_output_file(path: Path, flag: str) -> None:
    """Refuse an output file that cannot be created, before the work that fills it (ValueError naming
    ``flag``): a path that is a folder, or one below a file (``x.png/y.png``), failed only after minutes
    of sampling or scoring, with a bare ``[Errno 17] File exists``.  Missing folders are fine (the
    writers create them)."""
    from ..files import can_create_in, nearest_existing_folder

    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    where = nearest_existing_folder(path.parent, f"{flag} {path}")  # the nearest parent that exists must be a folder
    if not can_create_in(where):  # a read-only mount, /proc, another user's folder: said now, not after the work
        raise ValueError(f"{flag} {path}: no file can be written in {where}; give another path")


def fail(e: Exception) -> int:
    """A clear one-line error on stderr and exit status 2 (bad input, missing cache, ...); with
    ATTRIBUTION_DEBUG set, the traceback too (QA round 20: handlers that caught their own errors printed
    the one line even then, although the README promises the traceback)."""
    import os
    import traceback

    if os.environ.get("ATTRIBUTION_DEBUG"):
        traceback.print_exception(e, file=sys.stderr)
    print(f"error: {e}", file=sys.stderr)
    return 2


class Terminated(BaseException):
    """SIGTERM (``timeout``, a job scheduler, ``docker stop``) turned into an exception, so that it ends a
    command as Ctrl-C does: one line on stderr, exit 143, and the same resumable state.  A BaseException, as
    KeyboardInterrupt is: an ``except Exception`` that reports a method's failure and goes on must not catch it
    (QA 24: a SIGTERM during an LDS's scoring became "kfac: error" for one query, whose scores were saved
    without K-FAC, and every rerun then failed; a query could exit 0)."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


POOL_KEPT = "rerun the same command to continue (a pool whose draw finished, and its finished score matrices, are kept)"
INTERRUPTED = {  # how a command ended by a signal says so, and whether rerunning it continues the work
    "build": "rerun the same command to resume the build",
    "lds": "rerun the same command to resume (finished models and measurements are kept)",
    "retrain-top": "rerun the same command to resume (finished models are kept)",
    "group-retrain": "rerun the same command to resume (finished models are kept)",
    # an interruption before the first step (a folder still decoding) has nothing to resume (QA 36 #9)
    "train": "rerun the same command to go on (once training has started, from the state saved at the interruption)",
    "precompute": "rerun the same command to resume (the samples scored so far are kept)",
    "lds-ablation": "rerun the same command to resume (built caches and finished variants are kept)",
    # a drawn pool and each method's finished score matrix are saved (QA 27 #16)
    "group": POOL_KEPT,
    "reverse": POOL_KEPT,
    "copy-check": POOL_KEPT,
    "group-bench": "rerun the same command to continue (a pool whose draw finished is kept; the matrices are timed afresh)",
}


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input or a bad file, not a bug: shown as one ``error:`` line.

    Every engine error type subclasses ValueError (settings, checkpoints, data, queries, unsafe
    files) or is a cache/training state problem; OSError covers missing and unreadable files
    (its message names the file).  Set ATTRIBUTION_DEBUG=1 to get the traceback instead.
    """
    from ..attribution.store import StaleCacheError
    from ..evaluation.lds import SubsetMismatchError
    from ..evaluation.lds_run import ScoringFailedError
    from ..evaluation.setup import TrainingBusyError

    return (ValueError, OSError, StaleCacheError, SubsetMismatchError, TrainingBusyError, ScoringFailedError)


def _close_bars() -> None:
    """Close every live tqdm bar before the interruption's line, so the terminal ends on that line: a bar closed
    later (by a ``with`` or the interpreter's exit) drew itself again below it (QA 24 #8, QA 25 #9)."""
    tqdm_module = sys.modules.get("tqdm.std")
    if tqdm_module is None:  # no bar was ever made
        return
    for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close must not hide the interruption
            pass


def run_handler(args: argparse.Namespace) -> int:
    """Run a subcommand's handler; user errors become ``error: ...`` on stderr and exit status 2."""
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run_handler(args)
    finally:  # given back: a caller in the same process (a test run, a script calling main) keeps its own (QA 30a)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run_handler(args: argparse.Namespace) -> int:
    import os

    command = getattr(args, "command", "") or ""
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a pipe's reader that stopped early shows here, not at the interpreter's exit
        return code
    except (KeyboardInterrupt, Terminated) as e:
        # on a line of its own (a progress bar may be mid-line on stderr); a command with no work to resume
        # (a query, a sample) is simply stopped
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        _close_bars()
        print(f"\n{what}" + (f"; {INTERRUPTED[command]}" if command in INTERRUPTED else ""), file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except BrokenPipeError:  # `... | head`: the reader has what it wanted; no "error: Broken pipe" line
        _silence_stdout()
        return 141  # 128 + SIGPIPE, as a shell command cut off by the pipe
    except user_errors() as e:
        if os.environ.get("ATTRIBUTION_DEBUG"):
            raise
        text = one_line(e) or type(e).__name__
        if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
            text = f"{text}: {e.filename}"
        print(f"error: {text}", file=sys.stderr)
        return 2


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's final flush of what is still buffered does not fail again
    ("Exception ignored ... BrokenPipeError" and exit 120); a stdout that is no file descriptor is left."""
    import os

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def build_progress(desc: str, position: int = 0) -> AbstractContextManager[Callable[[str, float], None]]:
    """``attribution.terminal_progress`` as ``build`` shows it: one bar per method, named by it (``desc``, aligned)
    with the messages' "method: " dropped, the elapsed time (the per mille follows an estimate of the phases'
    cost: QA 25 #6) and 100 characters of message (the resume lines say what was kept: QA 25 #8: cut at 60)."""
    from ..attribution.terminal_progress import terminal_progress  # torch, which the parser must not import

    return terminal_progress(desc, position=position, message_chars=100, after_first_colon=True, desc_width=6,
                             redraw_s=0.1)


REPLACE_HELP = ("replace the results file even if it holds a result of other settings (default: refuse, before any "
                "training, naming the settings that differ; a rerun of the same settings writes it as before)")


def add_replace_results(p: argparse.ArgumentParser) -> None:
    """``--replace-results``, of lds, retrain-top and group-retrain (QA 48 #1): one flag, one help text."""
    p.add_argument("--replace-results", action="store_true", help=REPLACE_HELP)
