"""Factorised per-layer projections of per-example gradients (LoGra-style; docs/architecture.md §8).

For a Conv2d/Linear layer with weight gradient G_i (d_out x d_in; Conv2d: d_in = C_in*kh*kw
of the unfolded input) and K-FAC factors A (inputs) and B (output gradients), the layer is
compressed by two small matrices P_out (k_out x d_out) and P_in (k_in x d_in):

    G~_i = P_out G_i P_in^T   (k_out x k_in),     g~_i = P_out g_i   (bias: output side only).

Because G_i = sum_{draws m, positions s} g_{ms} a_{ms}^T (output gradient times layer input,
summed over the example's M draws and the spatial positions),

    G~_i = sum_{m,s} (P_out g_{ms}) (P_in a_{ms})^T,

so the projected gradient comes from the projected inputs and output gradients without the
full G_i ever existing: ``projected_grads`` projects each layer's input in a forward hook
(for Conv2d as a convolution with P_in reshaped to (k_in, C_in, kh, kw): no unfolded
patches either) and each output gradient in a tensor hook during the backward pass, and
keeps only (b, k_out, k_in) per layer.  Peak extra memory per batch: the projected inputs
(rows x positions x k_in) and the projected result, not the (b, P) per-example gradients.

Inside the projected space K-FAC is B~ (x) A~ with A~ = P_in A P_in^T, B~ = P_out B P_out^T
(exact for the projected gradients: E[(P_out g)(P_out g)^T] = P_out B P_out^T), so the
compressed bank is the same rotated int8 eigenbasis bank, only smaller (engine.attribution.compressed_bank).

Two kinds (``KINDS``):

* ``eigen``: P_in = the top k_in eigenvectors of A (as rows), P_out = the top k_out of B.
  Then A~, B~ are diagonal and the compressed bank is the full bank restricted to the
  top eigen-directions of each factor; with every eigenvector (ratio 1) it *is* the full bank.
* ``gaussian``: i.i.d. N(0, 1/k) entries from a generator seeded by (seed, layer, side), so
  E[P^T P] = I (Johnson-Lindenstrauss inner products).

``choose_dims`` picks k_in, k_out per layer for a target ratio = full int8 bank bytes /
compressed bank bytes: every side of every layer is shrunk by the same factor s
(k = ceil(d / s)), s found by bisection, then what is left of the byte budget is spent one
dimension at a time on the relatively smallest side, so the small layers are not starved to pay for the
large ones (LoGra uses one k per side for all layers; a shared shrink factor keeps the
layer's share of the bank).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..model.diffusion import Diffusion, MCDraws
from ..validation import KFAC_PROJECTIONS
from .curvature import Block, KFACFactors, layout
from .gradients import Params, _rows, layer_output_grads, this_thread_only

KINDS = KFAC_PROJECTIONS


@dataclass
class LayerProjection:
    """P_out (k_out, d_out) and P_in (k_in, d_in) of one layer (P_in None: weight not covered)."""

    name: str
    p_out: torch.Tensor
    p_in: torch.Tensor | None


def bank_bytes(blocks: list[Block]) -> int:
    """int8 bytes per example of a bank with these blocks: one byte per coordinate + a float32 scale per block."""
    return sum(b.size for b in blocks) + 4 * len(blocks)


def _layer_dims(factors: KFACFactors) -> list[tuple[int, int | None, bool]]:
    """(d_out, d_in or None, has_bias) per layer, from the full layout's blocks."""
    dims: dict[int, list] = {}
    for blk in factors.blocks:
        d = dims.setdefault(blk.layer, [blk.shape[0], None, False])
        if blk.kind == "weight":
            d[1] = blk.shape[1]
        else:
            d[2] = True
    return [tuple(dims[i]) for i in range(len(factors.layers))]  # type: ignore[misc]


def _dims_for(shrink: float, dims: list[tuple[int, int | None, bool]]) -> list[tuple[int, int | None]]:
    return [
        (min(d_out, math.ceil(d_out / shrink)), None if d_in is None else min(d_in, math.ceil(d_in / shrink)))
        for d_out, d_in, _ in dims
    ]


def _compressed_bytes(ks: list[tuple[int, int | None]], dims: list[tuple[int, int | None, bool]]) -> int:
    total = 0
    for (k_out, k_in), (_, _, has_bias) in zip(ks, dims, strict=True):
        if k_in is not None:
            total += k_out * k_in + 4
        if has_bias:
            total += k_out + 4
    return total


def choose_dims(factors: KFACFactors, ratio: float) -> list[tuple[int, int | None]]:
    """(k_out, k_in) per layer so that full bytes / compressed bytes is as close to ``ratio`` as
    possible without falling below it (ratio 1: every dimension kept)."""
    if not ratio >= 1.0:
        raise ValueError(f"compression ratio must be >= 1, not {ratio}")
    dims = _layer_dims(factors)
    budget = bank_bytes(factors.blocks) / ratio
    if _compressed_bytes(_dims_for(1.0, dims), dims) <= budget:
        return _dims_for(1.0, dims)
    lo, hi = 1.0, float(max(max(d_out, d_in or 1) for d_out, d_in, _ in dims))
    for _ in range(60):  # bytes fall monotonically with the shrink factor
        mid = math.sqrt(lo * hi)
        if _compressed_bytes(_dims_for(mid, dims), dims) <= budget:
            hi = mid
        else:
            lo = mid
    ks = [list(k) for k in _dims_for(hi, dims)]
    # ceil(d / s) moves in steps; spend what is left of the budget one dimension at a time,
    # always on the side that is relatively smallest (largest d / k), so the ratio lands near the target
    used = _compressed_bytes([tuple(k) for k in ks], dims)  # type: ignore[misc]
    while True:
        best, best_gap = None, 1.0
        for i, ((d_out, d_in, has_bias), (k_out, k_in)) in enumerate(zip(dims, ks, strict=True)):
            cost_out = (k_in or 0) + (1 if has_bias else 0)
            if k_out < d_out and used + cost_out <= budget and d_out / k_out > best_gap:
                best, best_gap = (i, 0, cost_out), d_out / k_out
            if k_in is not None and k_in < d_in and used + k_out <= budget and d_in / k_in > best_gap:
                best, best_gap = (i, 1, k_out), d_in / k_in
        if best is None:
            break
        i, side, cost = best
        ks[i][side] += 1
        used += cost
    return [(k_out, k_in) for k_out, k_in in ks]


def _gaussian(rows: int, cols: int, seed: int, layer: int, side: int, dtype, device) -> torch.Tensor:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(layer), int(side), 0x4C47])))
    p = rng.standard_normal((rows, cols)) / math.sqrt(rows)
    return torch.from_numpy(p).to(device, dtype)


def make_projections(
    factors: KFACFactors, kind: str, ratio: float, seed: int = 0
) -> list[LayerProjection]:
    """Per-layer projections of ``kind`` for a target compression ``ratio`` (see module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown projection kind {kind!r}: expected one of {KINDS}")
    out = []
    for i, (lf, (k_out, k_in)) in enumerate(zip(factors.layers, choose_dims(factors, ratio), strict=True)):
        dtype, dev = lf.qb.dtype, lf.qb.device
        d_out = lf.qb.shape[0]
        if kind == "eigen":  # eigh: ascending eigenvalues, so the top k are the last k columns
            p_out = lf.qb[:, d_out - k_out :].T.contiguous()
            p_in = None if k_in is None else lf.qa[:, lf.qa.shape[0] - k_in :].T.contiguous()  # type: ignore[index]
        else:
            p_out = _gaussian(k_out, d_out, seed, i, 0, dtype, dev)
            p_in = None if k_in is None else _gaussian(k_in, lf.qa.shape[0], seed, i, 1, dtype, dev)  # type: ignore[union-attr]
        out.append(LayerProjection(lf.name, p_out, p_in))
    return out


def projected_blocks(factors: KFACFactors, projections: list[LayerProjection]) -> list[Block]:
    """Blocks of the compressed flat layout, in the full layout's order: (k_out, k_in) weights, (k_out,) biases."""
    blocks, offset = [], 0
    for blk in factors.blocks:
        lp = projections[blk.layer]
        shape = (lp.p_out.shape[0], lp.p_in.shape[0]) if blk.kind == "weight" else (lp.p_out.shape[0],)  # type: ignore[union-attr]
        blocks.append(Block(name=blk.name, layer=blk.layer, kind=blk.kind, offset=offset, shape=shape))
        offset += int(math.prod(shape))
    return blocks


def project_flat(
    grads: torch.Tensor, factors: KFACFactors, projections: list[LayerProjection], blocks: list[Block]
) -> torch.Tensor:
    """Full flat gradients (n, P) or (P,) -> compressed (n, P~): P_out W P_in^T per weight, P_out g per bias.

    For query gradients (one per query) and tests; training gradients go through ``projected_grads``.
    """
    single = grads.dim() == 1
    g = grads[None] if single else grads
    out = torch.empty((g.shape[0], sum(b.size for b in blocks)), dtype=g.dtype, device=g.device)
    for full, small in zip(factors.blocks, blocks, strict=True):
        lp = projections[full.layer]
        x = g[:, full.offset : full.offset + full.size]
        p_out = lp.p_out.to(g.device, g.dtype)
        if full.kind == "weight":
            w = x.reshape(g.shape[0], *full.shape)
            y = p_out @ w @ lp.p_in.to(g.device, g.dtype).T  # type: ignore[union-attr]
        else:
            y = x @ p_out.T
        out[:, small.offset : small.offset + small.size] = y.reshape(g.shape[0], -1)
    return out[0] if single else out


def _project_input(mod: nn.Module, x: torch.Tensor, p_in: torch.Tensor) -> torch.Tensor:
    """(rows, positions, k_in): P_in applied to every input patch (Conv2d: a convolution with P_in as kernel)."""
    if isinstance(mod, nn.Conv2d):
        if isinstance(mod.padding, str) or mod.groups != 1:
            raise ValueError("projected gradients support Conv2d with numeric padding and groups=1 only")
        kernel = p_in.to(x.dtype).reshape(p_in.shape[0], *mod.weight.shape[1:])
        y = F.conv2d(x, kernel, stride=mod.stride, padding=mod.padding, dilation=mod.dilation)
        return y.flatten(2).transpose(1, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1]) @ p_in.to(x.dtype).T


def projected_grads(
    model: nn.Module,
    diffusion: Diffusion,
    x0: torch.Tensor,
    draws: MCDraws,
    params: Params,
    projections: list[LayerProjection],
    blocks: list[Block],
) -> torch.Tensor:
    """(b, P~) compressed per-example gradients of l(theta, x_i) = (1/M) sum_m l(theta; x_i, t_m, eps_m).

    Equal to ``project_flat(per_example_grads(...))`` (tests check it) without forming the
    per-example gradients: see the module docstring.  How the backward reaches every layer
    without computing any parameter gradient: each layer's output gets a zero scalar leaf
    added in a forward hook, and the backward is asked for that leaf's gradient only; the
    tensor hook on each output receives dL/d(output) as the backward passes it.
    """
    template, modules = layout(model, params)
    layer_of = {id(modules[lf.name]): i for i, lf in enumerate(template.layers)}
    has_weight = {blk.layer for blk in template.blocks if blk.kind == "weight"}
    b, m = x0.shape[0], len(draws)
    dev, dtype = params[0][1].device, params[0][1].dtype
    x0 = x0.to(dev, dtype)
    draws = draws.to(dev, dtype)
    out = torch.zeros((b, sum(blk.size for blk in blocks)), dtype=dtype, device=dev)
    weight_block = {blk.layer: blk for blk in blocks if blk.kind == "weight"}
    bias_block = {blk.layer: blk for blk in blocks if blk.kind == "bias"}
    zero = torch.zeros((), dtype=dtype, device=dev, requires_grad=True)
    handles = []

    def fwd_hook(mod, args, output):
        i = layer_of[id(mod)]
        lp = projections[i]
        a = None
        if i in has_weight:
            with torch.no_grad():
                a = _project_input(mod, args[0].detach(), lp.p_in)  # type: ignore[arg-type]
                a = a.reshape(b, -1, a.shape[-1])  # (b, M*S, k_in): example-major rows
        output = output + zero

        def on_grad(g, mod=mod, i=i, a=a, lp=lp):
            with torch.no_grad():
                gp = layer_output_grads(mod, g.detach()) @ lp.p_out.to(g.dtype).T  # (rows, S, k_out)
                gp = gp.reshape(b, -1, gp.shape[-1])
                if a is not None:
                    blk = weight_block[i]
                    w = torch.bmm(gp.transpose(1, 2), a).reshape(b, -1)
                    out[:, blk.offset : blk.offset + blk.size] += w
                if i in bias_block:
                    blk = bias_block[i]
                    out[:, blk.offset : blk.offset + blk.size] += gp.sum(1)

        output.register_hook(on_grad)
        return output

    for mod in modules.values():
        handles.append(mod.register_forward_hook(this_thread_only(fwd_hook)))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x, t, eps = _rows(x0, draws)
            pred = model(diffusion.q_sample(x, t, eps), t)
            total = (eps - pred).pow(2).flatten(1).mean(1).sum() / m  # sum_i l_i
            torch.autograd.grad(total, [zero])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return out


__all__ = [
    "KINDS",
    "LayerProjection",
    "bank_bytes",
    "choose_dims",
    "make_projections",
    "project_flat",
    "projected_blocks",
    "projected_grads",
]
