"""LDS ablations on the trained LDS subset models (`attribution-engine lds-ablation`, engine/evaluation/lds_ablation.py): draws shared vs
per-example (K-FAC), TRAK and D-TRAK at k = 2,048 / 8,192 / 32,768 (each also at its best damping),
K-FAC weight and bias in separate vs joint blocks.  Writes assets/results/lds_digits_ablation_*.json.

Build the variants' caches while the subset models train (no models needed):
    OMP_NUM_THREADS=1 nice -n 5 python scripts/lds_ablation.py --run runs/lds/digits \\
        --cache-root cache-ablation --baseline-cache cache --build-only
then score against the finished models (the run folder is only read):
    OMP_NUM_THREADS=1 nice -n 5 python scripts/lds_ablation.py --run runs/lds/digits \\
        --cache-root cache-ablation --baseline-cache cache
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's engine, not an installed one

from engine.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["lds-ablation", *sys.argv[1:]]))
