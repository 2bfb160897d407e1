"""Scale benchmark of the K-FAC banks on the CIFAR-preset U-Net (issue 11; docs/architecture.md §8).

What it measures, on SYNTHETIC 32x32x3 images (uniform noise in [-1, 1]: no CIFAR data here;
gradient, build and scan timings do not depend on image content) and a randomly initialised
CIFAR-preset U-Net (35.7M parameters):

* per-example gradient throughput, in (example, draw) rows per second: full per-example
  gradients (``per_example_grads``, the stored/streamed banks and re-ranking) and
  compressed ones from the hooks (``projected_grads``, the compressed bank);
* bytes per example of each bank kind (stored int8, compressed int8, streamed: none);
* the compressed bank's build time and peak memory at the measured sizes N (``--sizes``);
* a query: the scan (one damping; and the first pass's damping grid, its 49 points and the chosen
  damping) over int8 banks
  of N rows (``--scan-sizes``; the rows are random int8, since a scan's cost depends only on
  the bytes), plus exact re-ranking of 2C candidates (fresh gradients, timed on a few and
  scaled by 2C);
* projections for CIFAR-2 (N=5,000) and CIFAR-10 (N=50,000) at M=64, linear in N and M
  from the measured per-row and per-byte costs (every projected figure says so).

Everything runs on the device given (CPU here).  Timings are medians of repeats taken in
the same run.  Peak memory is the process's peak resident set (``memory.peak_rss_mib``) after each
phase, plus CUDA's peak allocation on a GPU.  Sizes are binary (MiB, GiB: ``engine.bench.memory``); the
record's ``_mb`` / ``_gb`` keys keep their shipped names and hold MiB / GiB (``config.units``).

Results go to stdout, a line per part once it is measured; what is about to run goes to stderr before it
runs (QA 27 #9: 25 s passed with nothing shown).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ..attribution.bank import RotatedBank
from ..attribution.compressed_bank import build_compressed_bank, compress_factors
from ..attribution.curvature import Block, KFACFactors, compute_kfac, layout
from ..attribution.damping_grid import DAMPING_GRID
from ..attribution.gradients import influence_params, per_example_grads
from ..attribution.layer_projection import bank_bytes, projected_grads
from ..code_version import code_version
from ..config import PRESETS, ComputeConfig
from ..model.diffusion import Diffusion, make_draws
from ..model.unet import build_model
from ..precision import configure_float32
from . import announce
from .memory import GIB, KIB, MIB, peak_rss_mib

# what the record's size keys hold (their names are the shipped records'; before this entry bank_gb was 1e9 bytes)
UNITS = {"_mb keys": "MiB (2**20 bytes)", "_gb keys": "GiB (2**30 bytes)", "bytes_per_example": "bytes"}

SYNTHETIC_NOTE = (
    "SYNTHETIC images (uniform noise in [-1, 1], 3x32x32) and a randomly initialised CIFAR-preset U-Net: "
    "no CIFAR data on this machine; gradient, build and scan timings do not depend on image content"
)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # CUDA kernels run asynchronously: time them to completion


def _timed(fn: Callable[[], Any], repeats: int = 3) -> tuple[float, Any]:
    """Median seconds over ``repeats`` calls (each waited for on a GPU), and the last result."""
    times, out = [], None
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _random_bank(
    blocks: list[Block], n: int, device: torch.device, seed: int, compute: ComputeConfig | None = None
) -> RotatedBank:
    """N random int8 rows drawn on ``device`` itself (gigabytes at CIFAR-10 scale: no host copy), scanned with
    ``compute``'s chunks, packing and grid budget (the preset's; None: the defaults)."""
    g = torch.Generator(device=device).manual_seed(seed)
    data = [torch.randint(-127, 128, (n, b.size), dtype=torch.int8, generator=g, device=device) for b in blocks]
    scales = torch.rand((n, len(blocks)), generator=g, device=device) + 0.5
    return RotatedBank(blocks, data, scales, compute=compute)


def identity_factors(model: torch.nn.Module, params: list) -> KFACFactors:
    """K-FAC factors A = I, B = I of the right shapes (timing runs: costs do not depend on the values)."""
    factors, _ = layout(model, params)
    dev = params[0][1].device  # the model's: the projections drawn from these factors follow their device
    dims: dict[int, list] = {}
    for blk in factors.blocks:
        d = dims.setdefault(blk.layer, [blk.shape[0], None])
        if blk.kind == "weight":
            d[1] = blk.shape[1]
    for i, lf in enumerate(factors.layers):
        d_out, d_in = dims[i]
        lf.qb, lf.b = torch.eye(d_out, device=dev), torch.ones(d_out, device=dev)
        if d_in is not None:
            lf.qa, lf.a = torch.eye(d_in, device=dev), torch.ones(d_in, device=dev)
    return factors


def _scan(bank: RotatedBank, p: int, device: torch.device, repeats: int, grid: bool = True) -> dict[str, float]:
    q = torch.randn(p, device=device)
    one, _ = _timed(lambda: bank.score(q), repeats)
    if not grid:
        return {"scan_one_damping_s": one, "scan_grid_s": None}
    grid = torch.randn(len(DAMPING_GRID) + 1, p, device=device)
    many, _ = _timed(lambda: bank.score_many(grid), max(1, repeats - 1))
    return {"scan_one_damping_s": one, "scan_grid_s": many}


def _flops_per_row(model: torch.nn.Module, diffusion: Diffusion, image: torch.Tensor, draws) -> float:
    """FLOPs of the loss's forward and backward pass for one (example, draw) row (``FlopCounterMode``):
    the arithmetic floor of any gradient pass, e.g. re-ranking 2C candidates at M draws is 2C M rows."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t, eps = draws.rows(image)
    with FlopCounterMode(display=False) as counter:
        diffusion.per_sample_loss(model, x, t, eps).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.shape[0]


def directional_derivatives(model: torch.nn.Module, diffusion: Diffusion, images: torch.Tensor, draws,
                            params: list, tangent: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """<grad l_i, v> for every example i (its M draws averaged), by forward mode, no per-example gradient.

    Re-ranking at one damping needs only tau_i = (1/N) <grad l_i, V> with V = Q (q / (e + lambda)) rotated
    back once (``compressed_bank.rerank_scores``); a Jacobian-vector product gets all rows of a batch in
    one forward pass with tangents, where per-example gradients materialise a (rows, P) matrix.  Measured
    here as the alternative it would be; the product re-ranks with per-example gradients.
    """
    from torch.func import functional_call, jvp

    names = [n for n, _ in params]
    prims = tuple(q.detach() for _, q in params)
    x, t, eps = draws.rows(images)

    def losses(*ps: torch.Tensor) -> torch.Tensor:
        def net(xt, tt):
            return functional_call(model, dict(zip(names, ps, strict=True)), (xt, tt))
        return diffusion.per_sample_loss(net, x, t, eps)  # type: ignore[arg-type]

    with warnings.catch_warnings():
        # torch.func's first jvp imports torch._decomp.decompositions_for_jvp, which applies torch.jit.script at
        # import: torch's deprecation notice for it reached bench-scale's stderr (QA 27 #19; as curvature.py's)
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        _, dots = jvp(losses, prims, tangent)
    # detached: the parameters that are not influence parameters (norms) still require grad, so the dots did,
    # and float() of them made torch warn (QA 27 #19)
    return dots.detach().reshape(images.shape[0], -1).mean(1)


def run_bench_scale(
    sizes: tuple[int, ...] = (2, 4),
    scan_sizes: tuple[int, ...] = (256, 1024, 4096),
    mc: int = 1,
    ratio: float = 128.0,
    projection: str = "gaussian",
    rerank: int = 256,
    factor_rows: int = 0,
    device: str = "cpu",
    seed: int = 0,
    log: Callable[[str], None] = print,
    grad_batch: int = 2,
    jvp_batch: int = 2,
    say: Callable[[str], None] = announce.say,
) -> dict[str, Any]:
    """The figures described in the module docstring, as one JSON-able dict.

    ``grad_batch``: examples per per-example-gradient call (2 on a CPU; a GPU needs tens to be busy).
    ``log``: the results; ``say``: what is about to run (stderr).
    """
    if min(grad_batch, jvp_batch, mc) < 1 or factor_rows < 0 or not sizes or not scan_sizes or min(sizes) < 1 \
            or min(scan_sizes) < 1:
        raise ValueError("bench-scale: sizes, batches and M must be at least 1, factor rows at least 0")
    dev = torch.device(device)
    say(f"building the CIFAR-preset U-Net on {dev} and {max(max(sizes), factor_rows, grad_batch, jvp_batch, 2)} "
        "synthetic images ...")
    tf32 = configure_float32(dev)  # the attribution session's float32 policy (engine.precision)
    torch.manual_seed(seed)
    preset = PRESETS["cifar10"]
    model = build_model(preset.model).to(dev).eval()
    diffusion = Diffusion(preset.diffusion)
    params = influence_params(model)
    p = sum(q.numel() for _, q in params)
    shape = (3, 32, 32)
    g = torch.Generator().manual_seed(seed)
    n_img = max(max(sizes), factor_rows, grad_batch, jvp_batch, 2)
    images = (torch.rand((n_img, *shape), generator=g) * 2 - 1).to(dev)
    draws = make_draws(mc, shape, diffusion.T, seed=seed)
    log(f"CIFAR-preset U-Net: {p / 1e6:.1f}M Conv2d/Linear parameters; {SYNTHETIC_NOTE}")

    factor_row_s = None
    if factor_rows > 0:
        say(f"timing the K-FAC factor pass on {factor_rows} rows x {mc} draws ...")
        t0 = time.perf_counter()
        factors = compute_kfac(model, diffusion, images[:factor_rows], draws, params, batch_size=factor_rows)
        factor_row_s = (time.perf_counter() - t0) / (factor_rows * mc)
    else:  # timings do not depend on the factors' values: identity factors (no curvlinops pass)
        factors = identity_factors(model, params)
    comp = compress_factors(factors, projection, ratio, seed=seed)
    bytes_stored, bytes_comp = bank_bytes(factors.blocks), bank_bytes(comp.blocks)
    factor_text = ("factor pass not timed (--factor-rows 0)" if factor_row_s is None else
                   f"{factor_row_s:.3g} s per (example, draw) row")
    log(f"K-FAC factors: {factor_text}; bank bytes per example: "
        f"stored {bytes_stored / MIB:.1f} MiB, compressed {bytes_comp / KIB:.1f} KiB ({bytes_stored / bytes_comp:.0f}x)")
    mem: dict[str, float] = {"after_factors_rss_mb": peak_rss_mib()}  # every *_mb of ``mem``: MiB

    b = min(grad_batch, n_img)
    say(f"timing per-example gradients, full and compressed (hooks), at batch {b} (2 repeats each) ...")
    full_s, _ = _timed(lambda: per_example_grads(model, diffusion, images[:b], draws, "loss", params), 2)
    mem["after_full_grads_rss_mb"] = peak_rss_mib()
    proj_s, _ = _timed(lambda: projected_grads(model, diffusion, images[:b], draws, params, comp.projections,
                                               comp.blocks), 2)
    mem["after_projected_grads_rss_mb"] = peak_rss_mib()
    throughput = {"full_rows_per_s": b * mc / full_s, "projected_rows_per_s": b * mc / proj_s, "batch": b}
    log(f"per-example gradients: full {throughput['full_rows_per_s']:.2f} rows/s, "
        f"compressed (hooks) {throughput['projected_rows_per_s']:.2f} rows/s")

    say("counting one row's FLOPs ...")
    flops_row = _flops_per_row(model, diffusion, images[:1], draws.head(1))
    log(f"one (example, draw) row: {flops_row / 1e9:.1f} GFLOP forward + backward (torch's flop counter)")

    # the forward-mode alternative for re-ranking: one directional derivative per row, checked against the
    # per-example gradients' dot product on the first rows
    tangent = tuple(torch.randn_like(q) for _, q in params)
    jvp: dict[str, Any] = {"batch": jvp_batch}
    try:
        jb = min(jvp_batch, n_img)
        say(f"timing forward-mode directional derivatives at batch {jb}, then checking them ...")
        jvp_s, _ = _timed(lambda: directional_derivatives(model, diffusion, images[:jb], draws, params, tangent), 2)
        jvp["rows_per_s"] = jb * mc / jvp_s
        k = min(2, n_img)
        dots = directional_derivatives(model, diffusion, images[:k], draws, params, tangent)
        grads = per_example_grads(model, diffusion, images[:k], draws, "loss", params).detach()
        ref = grads @ torch.cat([v.reshape(-1) for v in tangent])
        jvp["check_rel_err"] = float((dots - ref).norm() / ref.norm())
        log(f"forward-mode <grad l_i, v>: {jvp['rows_per_s']:.1f} rows/s at batch {jb} "
            f"(relative error against per-example gradients {jvp['check_rel_err']:.1e})")
    except Exception as e:  # noqa: BLE001 - an alternative's figure; its failure must not lose the rest
        jvp["error"] = repr(e)[:500]
    mem["after_jvp_rss_mb"] = peak_rss_mib()

    builds = []
    for n in sizes:
        say(f"timing the compressed bank's build at N={n}, then its scans ...")
        t0 = time.perf_counter()
        bank = build_compressed_bank(model, diffusion, images[:n], draws, comp, params, grad_batch=b, device=dev,
                                     compute=preset.compute)
        _sync()
        build_s = time.perf_counter() - t0
        scan = _scan(bank, bank.blocks[-1].offset + bank.blocks[-1].size, dev, 3)
        builds.append({"n": n, "build_s": build_s, "bank_mb": bank.nbytes / MIB, **scan,  # MiB, as peak_rss_mb
                       "peak_rss_mb": peak_rss_mib()})
        log(f"compressed build N={n}: {build_s:.1f} s, {bank.nbytes / MIB:.2f} MiB")
        del bank

    p_comp = sum(blk.size for blk in comp.blocks)
    scans = []
    for n in scan_sizes:
        say(f"timing the compressed scan of N={n} random int8 rows (one damping, then the grid) ...")
        bank = _random_bank(comp.blocks, n, dev, seed, preset.compute)
        s = _scan(bank, p_comp, dev, 3)
        scans.append({"n": n, "kind": "compressed", "bank_mb": bank.nbytes / MIB, **s})  # MiB
        log(f"compressed scan N={n}: one damping {s['scan_one_damping_s'] * 1e3:.1f} ms, "
            f"grid {s['scan_grid_s'] * 1e3:.1f} ms")
        del bank
    n_stored = max(1, min(4, min(sizes)))
    say(f"timing the stored bank's scan of N={n_stored} rows (one damping) ...")
    bank = _random_bank(factors.blocks, n_stored, dev, seed, preset.compute)
    # one damping only: the grid's 50 x P float32 queries (6.7 GiB here) exceed ComputeConfig.grid_max_bytes,
    # so a stored bank of this model is scored one damping per pass
    s = _scan(bank, p, dev, 2, grid=False)
    scans.append({"n": n_stored, "kind": "stored", "bank_mb": bank.nbytes / MIB, **s})  # MiB
    del bank
    mem["after_scans_rss_mb"] = peak_rss_mib()

    # re-ranking 2C > G candidates (engine.attribution.compressed_bank.rerank_scores): G damped queries rotated
    # back once, then one fresh full gradient and one dot product per candidate
    q = torch.randn(p, device=dev)
    say("timing one query's rotation back (re-ranking) ...")
    unrotate_s, _ = _timed(lambda: factors.unrotate(q), 2)
    mem["after_rerank_rss_mb"] = peak_rss_mib()
    grid_size = len(DAMPING_GRID) + 1
    log(f"re-rank: one query rotation back {unrotate_s:.2f} s (x {grid_size} dampings, once per query: the "
        f"{len(DAMPING_GRID)} grid points and the chosen damping), "
        f"then {1 / throughput['full_rows_per_s']:.1f} s per candidate and draw (fresh gradient)")

    comp_scans = [x for x in scans if x["kind"] == "compressed"]
    per_byte_grid = statistics.median(x["scan_grid_s"] / (x["n"] * bytes_comp) for x in comp_scans)
    per_byte_one = statistics.median(x["scan_one_damping_s"] / (x["n"] * bytes_comp) for x in comp_scans)
    stored_scan = scans[-1]
    stored_per_byte_one = stored_scan["scan_one_damping_s"] / (n_stored * bytes_stored)

    def project(name: str, n: int, m: int = 64) -> dict[str, Any]:
        cands = 2 * min(rerank, n)
        rerank_s = grid_size * unrotate_s + cands * m / throughput["full_rows_per_s"]
        return {
            "dataset": name, "num_examples": n, "mc_samples": m, "projected": True,
            "how": "linear in N and M from the per-row and per-byte costs measured above on this device",
            # GiB (2**30 bytes; the shipped key's name: records without config.units hold 1e9 bytes)
            "bank_gb": {"stored": n * bytes_stored / GIB, "compressed": n * bytes_comp / GIB, "streamed": 0.0},
            "factors_s": None if factor_row_s is None else n * m * factor_row_s,
            "compressed_build_s": n * m / throughput["projected_rows_per_s"],
            "stored_build_s": n * m / throughput["full_rows_per_s"],
            "query_s": {
                "compressed_scan_one_damping": n * bytes_comp * per_byte_one,
                "compressed_scan_grid": n * bytes_comp * per_byte_grid,
                "rerank": rerank_s,
                "rerank_pflop": cands * m * flops_row / 1e15,
                "compressed_total": n * bytes_comp * per_byte_grid + rerank_s,
                "stored_scan_one_damping": n * bytes_stored * stored_per_byte_one,
                "streamed_pass": n * m / throughput["full_rows_per_s"],
            },
        }

    gpu = torch.cuda.is_available() and dev.type == "cuda"
    if gpu:
        mem["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / MIB
    return {
        "config": {
            "model": "CIFAR-preset U-Net (ch 128, mults 1,2,2,2, 2 res blocks, attention at 16x16), random init",
            "data": SYNTHETIC_NOTE,
            "num_params": p,
            "mc_samples": mc,
            "projection": projection,
            "ratio_target": ratio,
            "rerank_candidates_per_end": rerank,
            "device": str(dev),
            "tf32": tf32,
            "gpu": ("none lent to this session: every figure is CPU" if not gpu else torch.cuda.get_device_name()),
            "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_end": list(os.getloadavg()),
            "units": UNITS,
            "code": code_version(),  # which code made the figures
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "bytes_per_example": {"stored": bytes_stored, "compressed": bytes_comp, "streamed": 0,
                              "ratio": bytes_stored / bytes_comp},
        "gradient_throughput": throughput,
        "forward_mode_rerank": jvp,
        "flops_per_row": flops_row,
        "factor_row_s": factor_row_s,
        "factor_note": ("K-FAC factor pass timed on this device" if factor_row_s is not None else
                        "factor pass not timed here (--factor-rows 0: identity factors, since no timing depends on "
                        "their values; on this CPU one curvlinops row of the CIFAR U-Net takes minutes)"),
        "compressed_builds": builds,
        "scans": scans,
        "rerank": {"unrotate_query_s": unrotate_s, "dampings": grid_size,
                   "s_per_candidate_row": 1 / throughput["full_rows_per_s"],
                   "how": "G damped queries rotated back once per query, then one fresh full gradient per "
                          "candidate (M draws) and a dot product (compressed_bank.rerank_scores)"},
        "peak_memory": mem,
        "growth_with_n": "bank bytes, build time and scan time grow linearly in N; re-ranking is constant in N "
                         "(2C candidates); factors are per layer and independent of N",
        "projected": [project("cifar2", 5000), project("cifar10", 50000)],
    }
