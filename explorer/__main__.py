"""``python -m explorer [flags]``: check the app's flags, then start the Streamlit server on ``explorer/app.py``.

Why a launcher: under ``streamlit run explorer/app.py -- FLAGS`` the flags are parsed by the script, which Streamlit
runs only when a browser opens the page, so ``-- --help`` printed nothing until a visit and a misspelt flag or
preset started a server that could only show an error (QA 46 #1).  Here ``--help`` prints and stops, a bad flag or
an unknown preset is one ``error:`` line (exit 2), and only then is the server started, with the same flags.

Streamlit's own options go through as they are, by their dotted names (``--server.port 8502``,
``--server.headless=true``): every other argument is the app's.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from explorer.app_flags import APP_SCRIPT, AppArgs, ArgsError, HelpRequested, parse_args


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the app's flags, Streamlit's options): an option whose name has a dot (``--server.port``) is Streamlit's,
    with its value (``--server.port=8502``, or the next argument); everything else is the app's."""
    app: list[str] = []
    streamlit: list[str] = []
    items = list(argv)
    i = 0
    while i < len(items):
        arg = items[i]
        name = arg.split("=", 1)[0]
        if arg.startswith("--") and "." in name:
            streamlit.append(arg)
            if "=" not in arg:
                if i + 1 >= len(items):
                    raise ArgsError(f"error: {arg} needs a value (Streamlit's options all take one: {arg} VALUE)")
                streamlit.append(items[i + 1])
                i += 1
        else:
            app.append(arg)
        i += 1
    return app, streamlit


def check_preset(args: AppArgs) -> None:
    """An unknown preset name or an unreadable preset file, or attribution settings the session would refuse
    (``--mc-samples 0``: the CLI's message, ``engine.attribution.setting_flags.check_settings``): ``ArgsError``
    before a server starts.  The settings are checked on the preset's own when it is known here: a ``--checkpoint``
    without ``--preset`` takes the checkpoint's own settings, read with torch, so the server's session checks
    those (the same message, on the page)."""
    if not args.preset_named and not (args.settings and args.checkpoint is None):
        return
    from engine.config import get_preset
    from engine.validation import one_line

    try:
        preset = get_preset(args.preset)
        if args.settings:
            from engine.attribution.setting_flags import apply_settings, check_settings

            check_settings(apply_settings(preset.attribution, args.setting_changes()))
    except (ValueError, OSError) as e:
        raise ArgsError(f"error: {one_line(e)}") from None


def streamlit_command(app_flags: Sequence[str], streamlit_options: Sequence[str]) -> list[str]:
    """The ``streamlit run`` command line that serves the app with these flags, in this Python."""
    return [sys.executable, "-m", "streamlit", "run", str(APP_SCRIPT), *streamlit_options, "--", *app_flags]


def main(argv: Sequence[str] | None = None) -> int:
    """Check the flags, then replace this process with the Streamlit server (``os.execv``: its signals, its exit
    status and its terminal are the server's own)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        app_flags, options = split_argv(argv)
        check_preset(parse_args(app_flags, env=dict(os.environ), prog="python -m explorer"))
    except HelpRequested as e:
        print(e.text, end="" if e.text.endswith("\n") else "\n")
        return 0
    except ArgsError as e:
        print(f"python -m explorer: {e}", file=sys.stderr)
        return 2
    command = streamlit_command(app_flags, options)
    sys.stdout.flush()
    os.execv(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
