"""The command line ``attribution-engine`` (the only place that parses arguments).

``main`` lives in ``engine.cli.main``; it is re-exported here for ``python -m engine`` and
the console script.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
