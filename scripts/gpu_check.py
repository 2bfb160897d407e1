"""Does the engine really run on CUDA, and give the CPU's answers there?  One prepared script for a GPU lease.

Why a script: a GPU is lent to some sessions only, for minutes, so every check runs from one command,
each step under its own deadline, and the results are written after every step (a step that runs out
of time loses only itself).  Two modes:

``reference`` (on a CPU, where the float32 scores were reviewed against float64): every method's full
score vector (N,) for the first Q gallery queries of a preset, from the caches in --cache-root (built
there first with ``attribution-engine build``), saved as float32 with the preset's settings.

``compare`` (on the GPU machine, steps in this order):
  1. the environment: torch, the GPU, whether cudnn/cublas TF32 are on by default;
  2. per preset: a cold build of every method on CUDA into an empty cache (timed), then the Q queries
     on CUDA (every method, each query timed after a warm-up query), and their score vectors against
     the CPU reference: Spearman, top-10 overlap, relative L2 error ||s_gpu - s_cpu|| / ||s_cpu||;
  3. the same for digits with ``ATTRIBUTION_TF32=1`` (engine.precision: TF32 convolutions), to show
     what the exact-float32 default buys;
  4. ``attribution-engine bench-scale`` on CUDA (the CIFAR-preset U-Net on synthetic images).

    python scripts/gpu_check.py reference --preset digits --cache-root /work/cache --out gpu_ref/digits.npz
    python scripts/gpu_check.py compare --ref gpu_ref --out $OUT --deadline 480
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's engine

METHODS = "kfac,trak,dtrak,pixel"


def _engine(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> tuple[int, float, str]:
    """``python -m engine ARGS`` in a child (its own torch state and env); (rc, seconds, output tail)."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, **(env or {})}, timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = 124, f"timed out after {timeout:.0f} s: {(e.stdout or b'')[-2000:]!r}"
    return rc, time.perf_counter() - t0, out[-3000:]


def query_scores(preset: str, device: str, cache_root: str, queries: int, float32: bool = True,
                 kfac_bank: str = "auto") -> dict:
    """Every method's (Q, N) float32 scores and per-query wall seconds, from built caches, in this process;
    with ``float32``, also K-FAC's scores from float32 rotated gradients ("kfac_f32": no int8 rounding,
    one more gradient pass), which tells rounding of the bank apart from a device's arithmetic."""
    import torch

    from engine.attribution.session import AttributionSession
    from engine.bench.attribution import float32_kfac_scores
    from engine.config import get_preset

    config = dataclasses.replace(get_preset(preset).attribution, kfac_bank=kfac_bank)
    s = AttributionSession(preset, device=device, cache_root=cache_root, config=config)
    names = [m for m in METHODS.split(",") if s.status([m])[m]["built"]]
    s.query(s.parse_query("gallery:0"), "loss", methods=names)  # warm-up: kernels, caches into memory
    scores = {m: [] for m in names}
    walls, method_ms, results = [], {m: [] for m in names}, []
    for i in range(queries):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = s.query(s.parse_query(f"gallery:{i}"), "loss", methods=names)
        walls.append(time.perf_counter() - t0)
        results.append(r)
        for m in names:
            mr = r.methods[m]
            if mr.status != "ok":
                raise RuntimeError(f"gallery:{i} {m}: {mr.reason}")
            scores[m].append(np.asarray(mr.scores, np.float32))
            method_ms[m].append(sum(mr.timing_ms.values()))
    stacked = {m: np.stack(v) for m, v in scores.items()}
    if float32 and "kfac" in names and kfac_bank in ("auto", "stored"):
        t0 = time.perf_counter()
        stacked["kfac_f32"] = float32_kfac_scores(s, results).astype(np.float32)
        walls_f32 = time.perf_counter() - t0
    out = {"scores": stacked, "query_s": walls, "float32_pass_s": walls_f32 if "kfac_f32" in stacked else None,
           "method_ms_median": {m: statistics.median(v) for m, v in method_ms.items()},
           "device": str(s.device), "tf32": bool(getattr(s, "tf32", False))}
    if device.startswith("cuda"):
        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def cmd_reference(a: argparse.Namespace) -> int:
    got = query_scores(a.preset, "cpu", a.cache_root, a.queries)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(a.out, **{f"scores_{m}": v for m, v in got["scores"].items()})
    print(f"wrote {a.out}: {sorted(got['scores'])}, {a.queries} queries; CPU query median "
          f"{statistics.median(got['query_s']):.3f} s")
    return 0


def agreement(gpu: np.ndarray, cpu: np.ndarray, k: int = 10) -> dict[str, float]:
    """Per-query Spearman, top-k overlap (both ends) and relative L2 error, as worst and median over queries."""
    from engine.evaluation.stats import spearman

    sp, top, bot, rel = [], [], [], []
    for g, c in zip(gpu, cpu, strict=True):
        sp.append(spearman(g, c))
        top.append(len(set(np.argsort(-g)[:k]) & set(np.argsort(-c)[:k])) / k)
        bot.append(len(set(np.argsort(g)[:k]) & set(np.argsort(c)[:k])) / k)
        rel.append(float(np.linalg.norm(g - c) / max(np.linalg.norm(c), 1e-30)))
    return {"spearman_min": min(sp), "spearman_median": statistics.median(sp),
            f"top{k}_overlap_min": min(top), f"top{k}_overlap_mean": float(np.mean(top)),
            f"bottom{k}_overlap_mean": float(np.mean(bot)),
            "rel_l2_median": statistics.median(rel), "rel_l2_max": max(rel)}


def _save(out: Path, record: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps(record, indent=2, default=float) + "\n")


def _preset_step(preset: str, a: argparse.Namespace, env: dict[str, str], timeout: float) -> dict:
    """Cold build on the device into an empty cache (or --cache-root's), then scores against the CPU
    reference (child processes: each step has its own torch state and environment)."""
    cache = a.cache_root or tempfile.mkdtemp(prefix=f"gpucheck-{preset}-")
    ref, queries, device = Path(a.ref), a.queries, a.device
    step: dict = {"preset": preset, "env": env, "device": device}
    rc, secs, tail = _engine("build", "--preset", preset, "--device", device, "--cache-root", cache,
                             "--methods", METHODS, "--kfac-bank", a.kfac_bank, env=env, timeout=timeout)
    step["kfac_bank"] = a.kfac_bank
    step.update(build_rc=rc, cold_build_s=secs, build_tail=tail[-1500:])
    if rc != 0:
        return step
    dump = Path(tempfile.mkdtemp(prefix="gpucheck-scores-")) / "scores.npz"
    code = ("import json,sys,numpy as np; sys.path.insert(0,'scripts'); import gpu_check as g; "
            f"r=g.query_scores({preset!r},{device!r},{cache!r},{queries},kfac_bank={a.kfac_bank!r}); "
            f"np.savez({str(dump)!r},**{{'scores_'+m:v for m,v in r['scores'].items()}}); "
            "r.pop('scores'); print('JSON'+json.dumps(r))")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=timeout)
    step["query_step_s"] = time.perf_counter() - t0
    if p.returncode != 0:
        step["query_error"] = (p.stdout + p.stderr)[-2000:]
        return step
    info = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("JSON"))[4:])
    info["query_s_median"] = statistics.median(info["query_s"])
    step["queries"] = info
    gpu, cpu = np.load(dump), np.load(ref / f"{preset}.npz")
    step["vs_cpu"] = {k[len("scores_"):]: agreement(gpu[k], cpu[k][: gpu[k].shape[0]])
                      for k in gpu.files if k in cpu.files}
    return step


def cmd_compare(a: argparse.Namespace) -> int:
    import torch

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    left = lambda: a.deadline - (time.perf_counter() - start)  # noqa: E731
    rec: dict = {"env": {
        "torch": torch.__version__, "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cudnn_allow_tf32_default": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32_default": torch.backends.cuda.matmul.allow_tf32,
        "python": sys.version.split()[0], "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, "steps": []}
    _save(out, rec)
    presets = a.presets.split(",")
    # priority order: the default preset's exactness, then scale, then the other presets, then TF32
    plan = [(presets[0], {})] + ([("scale", {})] if a.scale else []) + [(p, {}) for p in presets[1:]]
    plan += [(presets[0], {"ATTRIBUTION_TF32": "1"})] if a.tf32 else []
    for what, env in plan:
        if left() < 60:
            rec["steps"].append({"preset": what, "env": env, "skipped": "deadline"})
            continue
        t0 = time.perf_counter()
        try:
            step = _scale_step(a, out, left()) if what == "scale" else _preset_step(
                what, a, env, timeout=max(30.0, left() - 20))
        except Exception as e:  # noqa: BLE001 - one step's failure must not lose the others
            step = {"preset": what, "env": env, "error": repr(e)[-2000:]}
        step["step_s"] = time.perf_counter() - t0
        rec["steps"].append(step)
        _save(out, rec)
        print(json.dumps(step, default=float)[:4000], flush=True)
    return 0


def _scale_step(a: argparse.Namespace, out: Path, left: float) -> dict:
    """``attribution-engine bench-scale`` on the device; its JSON lands beside gpu_check.json."""
    rc, secs, tail = _engine("bench-scale", "--device", a.device, "--sizes", a.scale_sizes, "--scan-sizes",
                             a.scan_sizes, "--mc", "1", "--grad-batch", str(a.grad_batch), "--factor-rows",
                             str(a.factor_rows), "--out", str(out / f"bench_scale_{a.device}.json"),
                             timeout=max(30.0, min(a.scale_timeout, left - 10)))
    return {"preset": "scale", "rc": rc, "seconds": secs, "tail": tail[-2500:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reference", help="CPU float32 score vectors of the first Q gallery queries")
    r.add_argument("--preset", default="digits")
    r.add_argument("--cache-root", required=True)
    r.add_argument("--queries", type=int, default=8)
    r.add_argument("--out", required=True)
    c = sub.add_parser("compare", help="on CUDA: cold builds, scores against the reference, bench-scale")
    c.add_argument("--ref", required=True, help="folder with <preset>.npz from `reference`")
    c.add_argument("--out", required=True)
    c.add_argument("--presets", default="digits,mnist")
    c.add_argument("--queries", type=int, default=8)
    c.add_argument("--device", default="cuda", help="cuda (the check); cpu to dry-run this script")
    c.add_argument("--cache-root", default=None, help="reuse this cache (dry runs); default: an empty one")
    c.add_argument("--kfac-bank", default="auto", help="K-FAC bank kind to build and query on the device "
                   "(compressed: its exact ends are compared with the CPU reference's stored bank)")
    c.add_argument("--scale-timeout", type=float, default=240.0, help="seconds at most for bench-scale")
    c.add_argument("--deadline", type=float, default=480.0, help="seconds for every step together")
    c.add_argument("--no-tf32", dest="tf32", action="store_false", help="skip the TF32 digits build")
    c.add_argument("--no-scale", dest="scale", action="store_false", help="skip bench-scale")
    c.add_argument("--scale-sizes", default="64,256")
    c.add_argument("--scan-sizes", default="4096,16384,50000")
    c.add_argument("--grad-batch", type=int, default=32)
    c.add_argument("--factor-rows", type=int, default=64)
    a = ap.parse_args()
    return cmd_reference(a) if a.cmd == "reference" else cmd_compare(a)


if __name__ == "__main__":
    raise SystemExit(main())
