"""The command line ``attribution-engine`` (the only place that parses arguments).

The parser and ``main`` live in ``engine.cli.parser``; ``main`` here forwards to it without
importing the subcommand modules up front, so ``python -m engine.cli.evaluate`` (the entry of
long background runs) runs that module alone.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """``attribution-engine`` / ``python -m engine``: see ``engine.cli.parser.main``."""
    from .parser import main as run

    return run(argv)


__all__ = ["main"]
