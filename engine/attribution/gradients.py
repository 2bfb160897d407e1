"""Per-example Monte Carlo gradients, each example's own draws or common ones (docs/architecture.md §3, §4, §6).

The training loss of example i is estimated with M draws (t_m, eps_m): by default independent
draws per example (``draws="per-example"``, paper G.3; ``engine.attribution.train_draws``), or the
*same* M draws for every example (``draws="shared"``, common random numbers, the mnist preset's), so
that differences between examples' gradients are not drowned in Monte Carlo noise:

    l(theta, x_i) ~= (1/M) sum_m l(theta; flip_m(x_i), t_m, eps_m),
    l(theta; x, t, eps) = (1/D) ||eps - eps_theta(sqrt(abar_t) x + sqrt(1 - abar_t) eps, t)||^2

(docs/architecture.md §3; the paper's per-example loss, eq. 2, estimated by Monte Carlo; flip_m is
the identity unless the preset trains with random horizontal flips, paper G.8).  D-TRAK's
``square-norm`` replaces the summand by (1/D) ||eps_theta(x_t, t)||^2.

Which parameters
----------------
``influence_params(model)`` -- the weights and biases of every ``nn.Conv2d`` and
``nn.Linear`` -- is the parameter set of every attribution gradient (train, query,
curvature) and therefore of ``EngineContext.params``.  K-FAC has one Kronecker block per
Conv2d/Linear layer and none for normalisation layers (docs/architecture.md §4), so GroupNorm's
affine parameters (well under 1% of the parameters) are excluded from influence
gradients entirely, for every method, so that all methods see the same gradient.

How per-example gradients are computed
--------------------------------------
Three interchangeable back-ends give the same numbers (tests check it):

* ``loop`` (default on CPU, the fastest there): one backward per example over its M draws.
* ``hooks`` (default on other devices; needs Conv2d/Linear parameters only): one batched
  forward/backward of b*M rows; forward pre-hooks keep each layer's input, tensor hooks
  its output gradient, and each example's weight gradient is the sum over its rows and
  spatial positions of g a^T (Conv2d inputs unfolded to patches).  Cost ~ one training
  step on b*M rows.
* ``func``: ``torch.func.vmap`` over examples of ``grad`` of the M-draw loss.

Measured on the digits model (283k influence parameters), M=64, 1 CPU thread: loop 4.4-4.9 s,
hooks 11-13 s, func 19 s per 100 examples.

All gradients are taken with the model in eval mode (no dropout; docs/architecture.md §3) and on the
device of the model's parameters (no device-specific calls).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import COMPUTE
from ..model.diffusion import Diffusion, MCDraws
from ..model.measurements import Measurement, draw_pairs, measure
from .query import QueryInput
from .row_threads import gradient_workers, map_ordered
from .train_draws import TrainDraws

LOSSES = ("loss", "square-norm")
BACKENDS = ("auto", "hooks", "func", "loop")
Params = list[tuple[str, nn.Parameter]]


def params_digest(params: Params, length: int = 16) -> str:
    """A hex digest of the parameter names and shapes in flat order: which coordinates a gradient has, for the
    cache keys of everything stored per coordinate (K-FAC's factors and banks use 12 digits, TRAK's 16: their
    keys were made so, and a change of length would orphan every built cache)."""
    text = ";".join(f"{n}:{tuple(p.shape)}" for n, p in params)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for the block, then as it was.

    Why a helper: ``Module.train()`` walks every submodule (about 4 ms per query on the digits U-Net when
    done twice per gradient); a model already in eval mode (the session keeps it so) is left untouched.
    """
    if not model.training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train(True)


def influence_params(model: nn.Module) -> Params:
    """Weights and biases of every Conv2d and Linear layer, in model order (see module docstring)."""
    out: Params = []
    for mname, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            for pname, p in mod.named_parameters(recurse=False):
                if p.requires_grad:
                    out.append((f"{mname}.{pname}" if mname else pname, p))
    return out


def num_params(params: Params) -> int:
    """P, the length of a flat gradient over ``params`` (the one count every method uses)."""
    return int(sum(p.numel() for _, p in params))


def flatten_grads(grads: list[torch.Tensor], batch: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenate gradients in ``params`` order: (P,) or, with ``batch``, (b, P); into ``out`` when given (a row
    of a preallocated batch: no (P,) copy of its own)."""
    if batch:
        return torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1, out=out)
    return torch.cat([g.reshape(-1) for g in grads], out=out)


def _model_of(ctx_or_model: Any) -> tuple[nn.Module, Params | None]:
    if isinstance(ctx_or_model, nn.Module):
        return ctx_or_model, None
    return ctx_or_model.model, list(ctx_or_model.params)


def _rows(x0: torch.Tensor, draws: MCDraws) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All (example, draw) rows, example-major: row i*M + m is (x_i, t_m, eps_m), with x_i flipped
    where the draw's flip bit says so and each example's own draws when they are per-example."""
    return draws.rows(x0)


def row_summands(pred: torch.Tensor, eps: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-row summands (rows,) from the network's prediction: (1/D)||eps - eps_theta||^2 or, for
    square-norm, (1/D)||eps_theta||^2."""
    if loss == "loss":
        return (eps - pred).pow(2).flatten(1).mean(1)
    if loss == "square-norm":
        return pred.pow(2).flatten(1).mean(1)
    raise ValueError(f"unknown training loss {loss!r}: expected one of {LOSSES}")


def row_losses(
    model: nn.Module, diffusion: Diffusion, x0: torch.Tensor, draws: MCDraws, loss: str
) -> torch.Tensor:
    """Per-row summands (b*M,): (1/D)||eps - eps_theta||^2 or, for square-norm, (1/D)||eps_theta||^2."""
    x, t, eps = _rows(x0, draws)
    pred = model(diffusion.q_sample(x, t, eps), t)
    return row_summands(pred, eps, loss)


# --- back-end: hooks ------------------------------------------------------------------


def _layer_map(model: nn.Module, params: Params) -> list[tuple[nn.Module, int | None, int | None]] | None:
    """(module, weight position, bias position) for every Conv2d/Linear, or None if ``params``
    contains anything else (then the hooks back-end cannot be used)."""
    pos = {id(p): i for i, (_, p) in enumerate(params)}
    found: set[int] = set()
    layers = []
    for mod in model.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            if isinstance(mod, nn.Conv2d) and mod.groups != 1:
                return None
            w = pos.get(id(mod.weight))
            b = pos.get(id(mod.bias)) if mod.bias is not None else None
            if w is not None or b is not None:
                layers.append((mod, w, b))
                found.update(i for i in (w, b) if i is not None)
    return layers if len(found) == len(params) else None


def layer_inputs(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer input as (rows, positions, d_in): Conv2d patches in weight.reshape(out, -1) order."""
    if isinstance(mod, nn.Conv2d):
        if isinstance(mod.padding, str):
            raise ValueError("string padding is not supported")
        cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
        return cols.transpose(1, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def layer_output_grads(mod: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """The output gradient as (rows, positions, d_out)."""
    if isinstance(mod, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def this_thread_only(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook`` acting only on forward passes run by the thread that registers it.

    Why: module hooks belong to the shared model, so they fire on every thread's forward pass.  The
    app re-ranks in a background thread (per-example gradients with hooks, the GPU's back-end, or the
    compressed bank's projections) while the page's thread samples, queries or builds with the same
    model: unguarded, each would record (or, for the projections, change) the other's activations."""
    owner = threading.get_ident()

    def guarded(*args: Any) -> Any:
        return hook(*args) if threading.get_ident() == owner else None

    return guarded


def _hooks_grads(
    model: nn.Module,
    params: Params,
    layers: list[tuple[nn.Module, int | None, int | None]],
    diffusion: Diffusion,
    x0: torch.Tensor,
    draws: MCDraws,
    loss: str,
) -> torch.Tensor:
    b, m = x0.shape[0], len(draws)
    inputs: dict[nn.Module, torch.Tensor] = {}
    out_grads: dict[nn.Module, torch.Tensor] = {}
    handles = []

    def pre_hook(mod, args):
        inputs[mod] = args[0].detach()

    def fwd_hook(mod, args, out):
        def keep(g, mod=mod):
            out_grads[mod] = g.detach()

        out.register_hook(keep)

    for mod, _, _ in layers:
        handles.append(mod.register_forward_pre_hook(this_thread_only(pre_hook)))
        handles.append(mod.register_forward_hook(this_thread_only(fwd_hook)))
    try:
        with torch.enable_grad():
            per_row = row_losses(model, diffusion, x0, draws, loss)
            total = per_row.sum() / m  # sum_i l_i: example i's gradient is in its own rows
            torch.autograd.grad(total, [p for _, p in params])
    finally:
        for h in handles:
            h.remove()
    grads: list[torch.Tensor | None] = [None] * len(params)
    for mod, wpos, bpos in layers:
        g = layer_output_grads(mod, out_grads.pop(mod))  # (b*M, S, out)
        g = g.reshape(b, -1, g.shape[-1])
        if wpos is not None:
            a = layer_inputs(mod, inputs.pop(mod))
            a = a.reshape(b, -1, a.shape[-1])
            grads[wpos] = torch.bmm(g.transpose(1, 2), a)  # (b, out, in*k*k)
        if bpos is not None:
            grads[bpos] = g.sum(1)
    return flatten_grads(grads, batch=True)  # type: ignore[arg-type]


# --- back-end: torch.func -------------------------------------------------------------


def _func_grads(
    model: nn.Module, params: Params, diffusion: Diffusion, x0: torch.Tensor, draws: MCDraws, loss: str
) -> torch.Tensor:
    from torch.func import functional_call, grad, vmap

    names = [n for n, _ in params]
    detached = {n: p.detach() for n, p in params}
    m = len(draws)
    t = draws.t.to(x0.device)
    eps = draws.eps.to(x0.device, x0.dtype)
    flip = None if draws.flip is None else draws.flip.to(x0.device)
    per = 0 if draws.batched else None  # per-example draws are mapped over with the examples

    def loss_one(pdict, x, t, eps, flip):
        xs = x.unsqueeze(0).expand(m, *x.shape)
        if flip is not None:
            xs = torch.where(flip.reshape(m, 1, 1, 1), xs.flip(-1), xs)
        xt = diffusion.q_sample(xs, t, eps)
        pred = functional_call(model, pdict, (xt, t), strict=False)
        if loss == "loss":
            return (eps - pred).pow(2).flatten(1).mean(1).mean()
        return pred.pow(2).flatten(1).mean(1).mean()

    in_dims = (None, 0, per, per, None if flip is None else per)
    g = vmap(grad(loss_one), in_dims=in_dims)(detached, x0, t, eps, flip)
    return flatten_grads([g[n] for n in names], batch=True)


# --- back-end: loop -------------------------------------------------------------------


def _loop_grads(
    model: nn.Module, params: Params, diffusion: Diffusion, x0: torch.Tensor, draws: MCDraws, loss: str
) -> torch.Tensor:
    return _loop_grads_by_loss(model, params, diffusion, x0, draws, (loss,))[loss]


def _loop_grads_by_loss(
    model: nn.Module,
    params: Params,
    diffusion: Diffusion,
    x0: torch.Tensor,
    draws: MCDraws,
    losses: tuple[str, ...],
) -> dict[str, torch.Tensor]:
    """The loop back-end for several losses: one forward per example, one backward per loss.

    Each example's gradient is written into its row of one preallocated (b, P) tensor per loss, not stacked
    from a list of rows at the end: the list and its stacked copy held twice the batch (QA 54 F1, 2 x 4.6 GB
    for 32 CIFAR-size rows).  The same values, bit for bit."""
    plist = [p for _, p in params]
    dev, dtype = plist[0].device, plist[0].dtype
    b, total = x0.shape[0], sum(p.numel() for p in plist)
    rows = {loss: torch.empty((b, total), device=dev, dtype=dtype) for loss in losses}
    with torch.enable_grad():
        for i in range(b):
            x, t, eps = _rows(x0[i : i + 1], draws.example(i))
            pred = model(diffusion.q_sample(x, t, eps), t)
            for j, loss in enumerate(losses):
                li = row_summands(pred, eps, loss).mean()
                g = torch.autograd.grad(li, plist, retain_graph=j + 1 < len(losses))
                flatten_grads(list(g), out=rows[loss][i])  # written into its row, without a (P,) copy
                del g
    return rows


def budget_batch(largest: int, num_params: int, budget_bytes: int, row_bytes: int = 4) -> int:
    """Examples per gradient batch: ``largest``, or fewer so that batch x P x ``row_bytes`` stays within
    ``budget_bytes`` (``ComputeConfig.gradient_batch_bytes``), and at least 1.

    Why (QA 54 F1/F2): TRAK's 32 and the stored bank's 16 float32 rows were fixed, 4.6 GB and 2.3 GB at CIFAR
    size (P = 35.7M), and their copies made the builds peak at about 20 GiB.  Every row is computed on its
    own, so the batch changes no feature and no bank row (tests check it); the digits and mnist models keep
    their batches under the default 1 GiB."""
    return budget_rows(largest, int(num_params) * int(row_bytes), budget_bytes)


def budget_rows(largest: int, row_bytes: int, budget_bytes: int | None) -> int:
    """Rows per batch: ``largest``, or fewer so that rows x ``row_bytes`` (``pass_row_bytes``) stays within
    ``budget_bytes`` (``ComputeConfig.factor_batch_bytes``, ``gradient_batch_bytes`` through ``budget_batch``;
    None: no budget), and at least 1."""
    if budget_bytes is None:
        return max(1, int(largest))
    return max(1, min(int(largest), int(budget_bytes) // max(1, int(row_bytes))))


def per_example_grads_by_loss(
    model: nn.Module,
    diffusion: Diffusion,
    x0: torch.Tensor,
    draws: MCDraws,
    losses: tuple[str, ...] = ("loss", "square-norm"),
    params: Params | None = None,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """{loss: (b, P)} per-example gradients of several per-example functions with the same draws.

    Why: K-FAC's bank and TRAK need the training loss and D-TRAK the square norm
    (1/D)||eps_theta(x_t, t)||^2, both functions of the same prediction eps_theta(x_t, t) over the
    same (t, eps) rows, so on the CPU loop back-end one forward per example serves every loss and
    only the backward runs once per loss (forward is about a third of forward + backward).  Each
    entry equals ``per_example_grads(..., loss)`` (tests check it); other back-ends call it per loss.
    """
    losses = tuple(dict.fromkeys(losses))
    bad = [loss for loss in losses if loss not in LOSSES]
    if not losses or bad:
        raise ValueError(f"unknown training loss(es) {bad or losses!r}: expected some of {LOSSES}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {BACKENDS}")
    params = influence_params(model) if params is None else params
    dev, dtype = params[0][1].device, params[0][1].dtype
    use_loop = backend == "loop" or (backend == "auto" and dev.type == "cpu")
    if len(losses) == 1 or not use_loop:
        return {loss: per_example_grads(model, diffusion, x0, draws, loss, params, backend) for loss in losses}
    with eval_mode(model):
        x0 = x0.to(dev, dtype)
        return _loop_grads_by_loss(model, params, diffusion, x0, draws.to(dev, dtype), losses)


def per_example_grads(
    model: nn.Module,
    diffusion: Diffusion,
    x0: torch.Tensor,
    draws: MCDraws,
    loss: str = "loss",
    params: Params | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """(b, P) gradients of l(theta, x_i) = (1/M) sum_m l(theta; flip_m(x_i), t_m, eps_m), in ``params`` order.

    ``draws`` are shared (t (M,)) or the batch's own per-example draws (t (b, M)); flip bits,
    if any, mirror x_i (the training augmentation).  Dtype and device are those of the model's
    parameters.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown training loss {loss!r}: expected one of {LOSSES}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {BACKENDS}")
    params = influence_params(model) if params is None else params
    with eval_mode(model):
        x0 = x0.to(params[0][1].device, params[0][1].dtype)
        draws = draws.to(x0.device, x0.dtype)
        if backend == "auto":
            # CPU: one backward per example (M rows each) measured fastest (digits model, M=64:
            # loop 4.4-4.9 s, func 19 s, hooks 11-13 s per 100 examples, 1 thread); other
            # devices: the batched hooks back-end (not benchmarked here)
            backend = "loop" if x0.device.type == "cpu" else "hooks"
        if backend == "hooks":
            layers = _layer_map(model, params)
            if layers is not None:
                return _hooks_grads(model, params, layers, diffusion, x0, draws, loss)
            backend = "func"
        if backend == "func":
            return _func_grads(model, params, diffusion, x0, draws, loss)
        return _loop_grads(model, params, diffusion, x0, draws, loss)


def train_loss_grads(
    ctx_or_model: Any,
    diffusion: Diffusion,
    images: torch.Tensor,
    draws: TrainDraws,
    loss: str = "loss",
    batch_size: int = 8,
    progress: Callable[[str, float], None] | None = None,
    params: Params | None = None,
    backend: str = "auto",
    start: int = 0,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(rows, grads)`` with grads (b, P) for consecutive batches of ``images[start:]``.

    ``draws`` are shared ``MCDraws`` or per-example draws indexed like ``images``
    (``draws.for_rows(rows)``: ``MCDraws`` batched over ``images`` or ``PerExampleDraws``).

    ``ctx_or_model`` is an ``EngineContext`` (its model and params are used) or a model
    (``params`` default: ``influence_params``).  Gradients are in the model's dtype (float32
    normally) on its device.  ``progress(message, fraction)`` is called after each batch.
    """
    model, ctx_params = _model_of(ctx_or_model)
    params = params if params is not None else (ctx_params or influence_params(model))
    n = images.shape[0]
    batches = [slice(s, min(n, s + batch_size)) for s in range(start, n, batch_size)]

    def grads_of(rows: slice) -> torch.Tensor:
        return per_example_grads(model, diffusion, images[rows], draws.for_rows(rows), loss, params, backend)

    # batches computed by one single-threaded worker per free core (engine.attribution.row_threads); the
    # model is put in eval mode once, here: workers switching it back and forth would race
    workers = gradient_workers(params[0][1].device) if backend in ("auto", "loop") else 1
    with eval_mode(model):
        for rows, g in zip(batches, map_ordered(grads_of, batches, workers), strict=True):
            if progress is not None:
                progress(f"train gradients {rows.stop}/{n}", rows.stop / n)
            yield rows, g
            del g  # not held while the next batch is computed: two batches alive at once (QA 54 F1)


SHARED_FORWARD_KINDS = ("loss", "square-norm")


def shared_forward_grads(
    model: nn.Module,
    diffusion: Diffusion,
    image: torch.Tensor,
    draws: MCDraws,
    measurements: list[Measurement],
    params: Params | None = None,
    min_rows_per_worker: int = COMPUTE.min_rows_per_worker,
) -> dict[Measurement, torch.Tensor]:
    """(P,) gradients of the ``loss`` and ``square-norm`` measurements of one image from ONE forward pass.

    Why: a query with K-FAC/TRAK (loss) and D-TRAK (square norm) needs both gradients with the same
    draws (common random numbers); both are functions of the same eps_theta(x_t, t), so the forward
    pass is shared and only the backward runs twice (about a third less than two separate calls):

        loss        = (1/M) sum_m (1/D) ||eps_m - eps_theta(x_{t_m}, t_m)||^2   (docs/architecture.md §3)
        square-norm = (1/M) sum_m (1/D) ||eps_theta(x_{t_m}, t_m)||^2            (D-TRAK's output function)

    On the CPU the M rows are split between one single-threaded worker per free core, each taking its
    rows' share (1/M) sum_{m in part} of both means; the parts' gradients add up to the whole
    (``engine.attribution.row_threads``), with at least ``min_rows_per_worker`` rows each
    (``ComputeConfig.min_rows_per_worker``: fewer are not worth a thread).  Equal to ``measurement_grad`` of each to float rounding
    (tests check it).  Taken in eval mode.
    """
    kinds = [m.kind for m in measurements]
    if not kinds or any(k not in SHARED_FORWARD_KINDS for k in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError(f"shared_forward_grads takes distinct measurements among {SHARED_FORWARD_KINDS}, got {kinds}")
    params = influence_params(model) if params is None else params
    dev, dtype = params[0][1].device, params[0][1].dtype
    x0 = image.to(dev, dtype)
    x, t, eps = draw_pairs(x0[None] if x0.dim() == 3 else x0, draws.to(dev, dtype))
    tensors = [p for _, p in params]
    rows = x.shape[0]
    # the M rows split between one single-threaded worker per free core (engine.attribution.row_threads):
    # the mean over rows is the sum of each part's share, so the parts' gradients add up
    least = int(min_rows_per_worker)
    workers = min(gradient_workers(dev), rows // least) if rows >= 2 * least else 1
    bounds = [round(i * rows / workers) for i in range(workers + 1)]
    parts = [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]

    def part_grads(sl: slice) -> list[torch.Tensor]:
        with torch.enable_grad():  # grad mode is per thread
            pred = model(diffusion.q_sample(x[sl], t[sl], eps[sl]), t[sl])
            got = []
            for i, meas in enumerate(measurements):
                target = (eps[sl] - pred) if meas.kind == "loss" else pred
                value = target.pow(2).flatten(1).mean(1).sum() / rows
                grads = torch.autograd.grad(value, tensors, allow_unused=True, retain_graph=i + 1 < len(measurements))
                got.append(
                    flatten_grads([torch.zeros_like(p) if g is None else g for g, p in zip(grads, tensors, strict=True)])
                )
        return got

    with eval_mode(model):
        results = list(map_ordered(part_grads, parts, len(parts)))
    out: dict[Measurement, torch.Tensor] = {}
    for i, meas in enumerate(measurements):
        total = results[0][i]
        for r in results[1:]:
            total = total + r[i]
        out[meas] = total
    return out


def measurement_grad(
    model: nn.Module,
    diffusion: Diffusion,
    measurement: Measurement,
    query: QueryInput | torch.Tensor,
    draws: MCDraws,
    levels: int = 256,
    params: Params | None = None,
) -> torch.Tensor:
    """(P,) gradient of the measurement m(theta, x_q) (docs/architecture.md §3) w.r.t. ``params``.

    ``query`` is a ``QueryInput`` (image (C,H,W) in [-1,1] and/or trajectory) or an image
    tensor.  Taken in eval mode with the given draws (common random numbers across methods).
    """
    params = influence_params(model) if params is None else params
    dev, dtype = params[0][1].device, params[0][1].dtype
    if isinstance(query, torch.Tensor):
        image, trajectory = query, None
    else:
        image, trajectory = query.image, query.trajectory
    image = None if image is None else image.to(dev, dtype)
    trajectory = None if trajectory is None else trajectory.to(dev, dtype)
    with eval_mode(model):
        with torch.enable_grad():
            value = measure(measurement, model, diffusion, image, draws.to(dev, dtype), levels, trajectory)
            grads = torch.autograd.grad(value, [p for _, p in params], allow_unused=True)
    return flatten_grads(
        [torch.zeros_like(p) if g is None else g for g, (_, p) in zip(grads, params, strict=True)]
    )
