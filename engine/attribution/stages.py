"""Which coordinates of the flat gradient belong to which resolution stage of a U-Net.

Why: K-FAC is block-diagonal per layer (paper eqs. 9-12), so an influence score is a sum of
per-layer terms, tau(q, i) = sum_l g_q,l^T (G_l + lambda I)^-1 g_i,l (eq. 6), and the sum over a
set of layers is the score with the query gradient zeroed outside them (the eigenbasis rotation
keeps every layer's entries among its own coordinates).  Grouping the layers by the spatial size
they work at (28, 14, 7 pixels on mnist; "vector" for the time-embedding MLP) asks which parts of
the network a ranking listens to: diagnostics only, the method itself always sums every layer.
"""

from __future__ import annotations

import torch
from torch import nn

from .gradients import this_thread_only


def layer_stages(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> dict[str, str]:
    """Conv2d/Linear module name -> its stage: the output's spatial size ("28 px"; attention's
    projections act on h*w tokens and count as that grid), or "vector" for Linear layers on vectors.

    Found by one forward pass of ``model(x, t)`` with hooks, so no table of layer names is needed.
    """
    stages: dict[str, str] = {}
    hooks = []

    def record(name: str):
        def hook(_m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
            if out.dim() == 4:  # conv: (b, c, h, w)
                stages[name] = f"{out.shape[-1]} px"
            elif out.dim() == 3:  # (b, h*w, c) tokens
                stages[name] = f"{round(out.shape[1] ** 0.5)} px"
            else:
                stages[name] = "vector"

        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            hooks.append(mod.register_forward_hook(this_thread_only(record(name))))
    try:
        with torch.no_grad():
            model(x, t)
    finally:
        for h in hooks:
            h.remove()
    return stages


def stage_indices(params: list[tuple[str, torch.Tensor]], stages: dict[str, str]) -> dict[str, torch.Tensor]:
    """Stage -> the flat indices of its parameters in ``params`` order (the order of every gradient,
    bank row and K-FAC block offset).  A parameter's module is its name without ``.weight``/``.bias``."""
    out: dict[str, list[torch.Tensor]] = {}
    offset = 0
    for name, p in params:
        module = name.rsplit(".", 1)[0] if "." in name else ""
        if module not in stages:
            raise ValueError(f"parameter {name}: module {module!r} is not a Conv2d/Linear layer of the model")
        out.setdefault(stages[module], []).append(torch.arange(offset, offset + p.numel()))
        offset += p.numel()
    return {k: torch.cat(v) for k, v in sorted(out.items(), key=lambda kv: _stage_order(kv[0]))}


def _stage_order(stage: str) -> tuple[int, int]:
    """Finest grid first, the vector stage last."""
    return (1, 0) if stage == "vector" else (0, -int(stage.split()[0]))


def keep_only(g: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``g`` (P,) or (n, P) with every coordinate outside ``idx`` set to zero."""
    mask = torch.zeros(g.shape[-1], dtype=torch.bool, device=g.device)
    mask[idx.to(g.device)] = True
    return torch.where(mask, g, torch.zeros((), dtype=g.dtype, device=g.device))
