"""Every method at its best settings over an LDS run and its ablations (`attribution-engine lds-best`, engine/evaluation/lds_best.py):
writes ``best_settings`` into assets/results/lds_<preset>_<measurement>.json and prints the table.

    python scripts/lds_best_settings.py --results assets/results --preset digits --measurement loss
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's engine, not an installed one

from engine.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["lds-best", *sys.argv[1:]]))
