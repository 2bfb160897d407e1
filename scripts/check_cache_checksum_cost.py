"""What verifying a cache's CRC-32 checksums costs at load time (issue 14, finding 4).

The K-FAC int8 bank of the digits default is 496 MB.  ``Store.load_arrays`` checks every array's
CRC-32 the first time a process loads it; this prints the time of that check next to the time of
one full pass over the same memory-mapped bank (what the first query's scoring reads anyway) and
of a plain load (``np.load`` with mmap), median of ``--repeats`` runs, interleaved, warm page cache.

    python scripts/check_cache_checksum_cost.py [--folder CACHE_FOLDER] [--mb 496]

Without ``--folder`` a synthetic int8 array of ``--mb`` MB is written to a temporary folder.
Writes assets/results/cache_checksum_cost.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.attribution.store import file_crc32  # noqa: E402 - after the path of this checkout
from engine.files import save_json  # noqa: E402


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", default=None, help="a published cache folder (its *.npy files are measured)")
    p.add_argument("--mb", type=int, default=496, help="size of the synthetic bank without --folder (default 496)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="assets/results/cache_checksum_cost.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.folder:
            files = sorted(Path(args.folder).glob("*.npy"))
        else:
            rng = np.random.default_rng(0)
            path = Path(tmp) / "bank.npy"
            np.save(path, rng.integers(-127, 128, size=args.mb * 2**20, dtype=np.int8))
            files = [path]
        size_mb = sum(f.stat().st_size for f in files) / 1e6

        def crc() -> None:
            for f in files:
                file_crc32(f)

        def load() -> None:
            for f in files:
                np.load(f, mmap_mode="r", allow_pickle=False)

        def one_pass() -> None:
            for f in files:
                a = np.load(f, mmap_mode="r", allow_pickle=False)
                int(a.reshape(-1).view(np.uint8).sum(dtype=np.uint64))  # touches every byte

        crc()  # warm the page cache
        times: dict[str, list[float]] = {"crc32": [], "mmap_load": [], "full_pass": []}
        for _ in range(args.repeats):
            times["crc32"].append(_time(crc))
            times["mmap_load"].append(_time(load))
            times["full_pass"].append(_time(one_pass))
    med = {k: statistics.median(v) for k, v in times.items()}
    record = {
        "size_mb": size_mb,
        "files": len(files),
        "median_s": med,
        "crc32_mb_per_s": size_mb / med["crc32"],
        "crc32_over_full_pass": med["crc32"] / med["full_pass"],
        "repeats": args.repeats,
        "source": args.folder or "synthetic int8",
    }
    print(
        f"{size_mb:.0f} MB in {len(files)} file(s): CRC-32 check {med['crc32'] * 1000:.0f} ms "
        f"({record['crc32_mb_per_s']:.0f} MB/s), mmap load {med['mmap_load'] * 1000:.1f} ms, one full pass "
        f"{med['full_pass'] * 1000:.0f} ms (ratio check/pass {record['crc32_over_full_pass']:.2f}); median of {args.repeats}"
    )
    save_json(args.out, record)


if __name__ == "__main__":
    main()
