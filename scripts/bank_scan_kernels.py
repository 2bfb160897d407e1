"""Single-damping scan of the stored K-FAC bank: which int8 -> float kernel (engine.attribution.bank).

Times, side by side in one run (medians), one pass <R_i, q> over the built digits bank with
  * ``_weight_int8pack_mm``: torch's fused int8-weight kernel, one call per block;
  * the numba kernel of ``engine.attribution.int8_scan`` (what ``RotatedBank.inner`` uses when numba is there:
    one parallel loop over the rows of the bank packed into one array), and the same kernel run once per
    block (what a bank too big to pack gets);
  * per-block float conversion in row chunks of ~1 MiB of floats (what ``RotatedBank.inner`` does);
  * the same with whole-block chunks (the previous fallback's 64 MiB);
and the 50-damping grid pass (``RotatedBank.inner_many``), and checks that all agree.

    OMP_NUM_THREADS=1 python scripts/bank_scan_kernels.py --cache-root cache --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's engine

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="digits")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--cache-root", default="cache")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk-mib", default="1,64",
                   help="chunk sizes to time, in MiB of converted floats per row chunk (comma list)")
    p.add_argument("--no-int8pack", action="store_true", help="skip the fused kernel (slow)")
    p.add_argument("--out", default=None, help="also write the record to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from engine.attribution.damping_grid import DAMPING_GRID
    from engine.attribution.session import AttributionSession
    from engine.config import get_preset
    from engine.files import save_json
    from engine.paths import default_checkpoint

    preset = get_preset(args.preset)
    ckpt = args.checkpoint or str(default_checkpoint(args.preset))
    config = dataclasses.replace(preset.attribution, kfac_bank="stored")
    s = AttributionSession(preset, checkpoint=ckpt, cache_root=args.cache_root, config=config, auto_build=False)
    k = s.method("kfac")
    if not k.is_built(s.ctx):
        raise SystemExit(f"no stored K-FAC bank under {args.cache_root}: run `python -m engine build` first")
    k.build(s.ctx)
    bank = k.bank
    q = torch.randn(sum(b.size for b in bank.blocks), generator=torch.Generator().manual_seed(0))

    def chunked(chunk_bytes: int) -> torch.Tensor:  # an explicit chunk size: RotatedBank's torch path
        return bank.inner(q, chunk_bytes)

    def packed() -> torch.Tensor:
        out = torch.zeros(bank.num_examples)
        for j, (blk, d) in enumerate(zip(bank.blocks, bank.data, strict=True)):
            qb, sc = q[blk.offset : blk.offset + blk.size], bank.scales[:, j].contiguous()
            out += torch.ops.aten._weight_int8pack_mm(qb[None], d.contiguous(), sc)[0]
        return out

    grid = torch.tensor(DAMPING_GRID + (1e-8,))[:, None]
    eig = k._eigenvalues
    from engine.attribution import int8_scan
    from engine.attribution.bank import RotatedBank

    kernels = {} if args.no_int8pack else {"int8pack": packed}
    if int8_scan.available():
        kernels["fused_int8_numba (RotatedBank.inner)"] = lambda: bank.inner(q)
        if bank._packed is not None:  # the same kernel with one parallel loop per block (banks over the pack limit)
            own = [torch.from_numpy(np.ascontiguousarray(d.numpy())) for d in bank.data]
            per_block = RotatedBank(bank.blocks, own, bank.scales, pack=False, compute=bank.compute)
            kernels["fused_int8_numba_per_block"] = lambda: per_block.inner(q)
    for mib in (float(x) for x in args.chunk_mib.split(",")):
        nbytes = int(mib * 2**20)
        tag = " (RotatedBank.inner without numba)" if nbytes == bank.compute.scan_chunk_bytes_cpu else ""
        kernels[f"chunks_{mib:g}MiB{tag}"] = lambda nbytes=nbytes: chunked(nbytes)
    kernels["grid_50_dampings (inner_many)"] = lambda: bank.inner_many(q[None] / (eig[None] + grid))
    ref = chunked(1 << 20)
    times: dict[str, list[float]] = {n: [] for n in kernels}
    for _ in range(args.repeats):  # interleaved, so a busy spell hits every kernel alike
        for name, fn in kernels.items():
            t0 = time.perf_counter()
            out = fn()
            times[name].append((time.perf_counter() - t0) * 1000.0)
            if out.dim() == 1:
                err = float((out - ref).abs().max() / ref.abs().max())
                assert err < 1e-5, f"{name} disagrees: {err}"
    record = {
        "bank_mb": bank.nbytes / 2**20,
        "threads": args.threads,
        "load_average": list(os.getloadavg()),
        "median_ms": {n: statistics.median(v) for n, v in times.items()},
    }
    print(json.dumps(record, indent=1))
    if args.out:
        save_json(args.out, record, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
