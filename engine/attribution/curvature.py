"""K-FAC (and EK-FAC) curvature of the diffusion training loss via curvlinops (docs/architecture.md §4).

G approximates the Hessian of L(theta) = (1/N) sum_n l(theta, x_n) (paper eq. 3; its Hessian is eq. 5's) by the
Kronecker-factored GGN / Fisher (paper eqs. 9-12), one block per Conv2d and Linear layer:

    G_l = B_l (x) A_l   (weights, W of shape (out, in*kh*kw), row-major vec)
    G_l = B_l           (biases: curvlinops' ``separate_weight_and_bias=True`` structure)

How the scale comes out exactly right
-------------------------------------
curvlinops sees a data set of N*M *rows*, one per (example n, draw m), each an input
(x_t, t) with target eps, a model output flattened to (batch, D), and
``MSELoss(reduction='mean')`` with ``num_per_example_loss_terms=1``, ``num_data=N*M``.
It treats the mean reduction as (1/(rows*D)) sum ||.||^2 and rescales internally (loss
times sqrt(D); factors corrected by batch^2/num_data), so the result is the GGN of

    (1/(N M)) sum_{n,m} (1/D) ||eps_m - eps_theta(x_{t_m}(x_n), t_m)||^2 = L(theta)

with L estimated by the train gradients' M draws per example (each example's own by default; the same for
every example, common random numbers, with ``draws="shared"``), or by
the first ``kfac_factor_draws`` of them, or, with ``kfac_factor_draws_mode="per-example"``, by
draws of the factors' own (docs/architecture.md §6).  For a single Linear layer and one data point K-FAC, the exact GGN and the
Hessian of L coincide; ``tests/test_curvature.py`` checks it.

Fisher types.  ``mc`` (default, paper eq. 10): B is built from output gradients of the
loss with labels sampled from the model's Gaussian likelihood implied by MSELoss,
y ~ N(eps_theta, 1/2 I) (curvlinops' ``draw_label``; the sqrt(D) loss rescaling makes
E[grad grad^T] = (2/D) J^T J, the GGN of (1/D)||.||^2).  Equivalently each row's pseudo
gradient is J^T sqrt(2/D) z with z ~ N(0, I).  ``empirical``: the true targets eps (the
empirical Fisher of eq. 11, but per draw rather than eq. 11's draw-averaged outer product: see
docs/architecture.md §4); by the same rescaling the per-row gradient is that of sqrt(D) * l, so the
empirical Fisher is (1/(NM)) sum_rows D grad l_r grad l_r^T (equal in expectation to the
GGN when residuals have the model's variance 1/2).  ``expand``/``reduce``: KFAC-expand or
-reduce for weight-sharing layers (Eschenhagen et al. 2023; paper eq. 12).

EK-FAC (George et al. 2018): the eigenvalues b a^T of B (x) A are replaced by the mean over
the factor pass's rows (N x k with ``kfac_factor_draws`` = k, each example's first k of its M draws
or, in ``kfac_factor_draws_mode="per-example"``, the factors' own draws; N x M without it) of the squared
per-row gradients rotated into the K-FAC eigenbasis, (Q_B^T G_r Q_A)^2, G_r the row's (pseudo-)gradient
above (the same sampled labels as the factors'), computed by curvlinops' ``EKFACLinearOperator`` in one
extra pass with our float64 eigenvectors.

Factors are accumulated in the model's dtype, eigendecomposed in float64 (eigenvalues
clamped at 0: the factors are PSD and negatives are round-off), and kept in the model's
dtype (float32 normally).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..bar_redraw import UNTIMED
from ..model.diffusion import Diffusion, apply_flip
from ..validation import FISHER_TYPES as SETTING_FISHER_TYPES
from ..validation import KFAC_APPROX as SETTING_KFAC_APPROX
from .exiting import exit_requested
from .gradients import Params, budget_rows, this_thread_only
from .pass_checkpoint import PassCheckpoint
from .train_draws import TrainDraws

# said when the factors' eigendecomposition starts; UNTIMED in it: the bars show no time left for it (QA 62 F4)
EIGH_MESSAGE = f"K-FAC factors: eigendecomposition of the factors ({UNTIMED})"
FISHER_TYPES = (*SETTING_FISHER_TYPES, "type-2")  # type-2: the exact GGN's factors, for tests
KFAC_APPROX = SETTING_KFAC_APPROX


@dataclass
class Block:
    """One parameter tensor of a K-FAC layer, at ``offset`` in the flat gradient."""

    name: str
    layer: int  # index into KFACFactors.layers
    kind: str  # "weight" | "bias" | "joint" (weight and bias in one block, [W | b])
    offset: int
    shape: tuple[int, ...]  # (out, in*kh*kw) for weights, (out,) for biases, (out, in*kh*kw + 1) joint
    bias_offset: int | None = None  # joint blocks: where the bias sits in the flat gradient

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))


@dataclass
class LayerFactors:
    """Eigendecomposed factors of one layer: A = Q_A diag(a) Q_A^T, B = Q_B diag(b) Q_B^T."""

    name: str
    qa: torch.Tensor | None  # (d_in, d_in); None if the layer's weight is not covered
    a: torch.Tensor | None
    qb: torch.Tensor  # (d_out, d_out)
    b: torch.Tensor
    ekfac_weight: torch.Tensor | None = None  # (d_out, d_in) corrected eigenvalues
    ekfac_bias: torch.Tensor | None = None  # (d_out,)


@dataclass
class KFACFactors:
    """K-FAC's G = blockdiag_l(B_l (x) A_l) (paper eq. 12) with each factor's eigendecomposition, one
    ``LayerFactors`` per Conv2d/Linear layer, and ``blocks`` laying the parameters out in ``params``
    order.  Everything influence needs comes from here: ``rotate`` (U^T g), ``eigenvalues`` (e = b a^T
    per weight block, b per bias; EK-FAC's corrected ones when fitted) and ``unrotate``, so that
    (G + lambda I)^{-1} g = U diag(1 / (e + lambda)) U^T g."""

    layers: list[LayerFactors]
    blocks: list[Block]  # in params order
    # seconds the pass that made them ran in earlier, interrupted attempts, up to their last checkpoint
    # (0 for an uninterrupted pass): a resumed build records the time of the whole pass (build_seconds)
    seconds_before: float = field(default=0.0, compare=False)

    @property
    def num_params(self) -> int:
        """P: the parameters the factors cover (every Conv2d/Linear weight and bias)."""
        return sum(b.size for b in self.blocks)

    @property
    def ekfac(self) -> bool:
        """Whether the eigenvalues are EK-FAC's corrected ones (George et al. 2018) rather than b a^T."""
        return any(lf.ekfac_weight is not None or lf.ekfac_bias is not None for lf in self.layers)

    # --- the eigenbasis ----------------------------------------------------------------

    def rotate(self, grads: torch.Tensor, batch: bool = False) -> torch.Tensor:
        """Flat gradients (n, P) or (P,) -> the same in the eigenbasis: R = Q_B^T W Q_A, r_b = Q_B^T g_b.

        ``batch``: rows of a build's batch, rotated with the same matrix products whatever their number, so that
        a stored row does not depend on the sub-batch it came in (``bank_build``, QA 54 F2): a single row is
        rotated as two (a (1, n) x (n, n) product is a matrix-vector product, whose rounding differs from the
        matrix-matrix product of several rows in the bias blocks)."""
        if batch and grads.dim() == 2 and grads.shape[0] == 1:
            return self._change_basis(torch.cat([grads, grads]), inverse=False)[:1]
        return self._change_basis(grads, inverse=False)

    def unrotate(self, rotated: torch.Tensor) -> torch.Tensor:
        """Inverse of ``rotate`` (Q orthogonal): W = Q_B R Q_A^T."""
        return self._change_basis(rotated, inverse=True)

    def _change_basis(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        """One loop for both directions: multiply each block by Q_B^T (.) Q_A, or Q_B (.) Q_A^T."""
        single = x.dim() == 1
        g = x[None] if single else x
        out = torch.empty_like(g)
        for blk in self.blocks:
            lf = self.layers[blk.layer]
            sl = slice(blk.offset, blk.offset + blk.size)
            qb = lf.qb.to(g.device, g.dtype)
            left = qb if inverse else qb.T
            if blk.kind == "weight":
                qa = lf.qa.to(g.device, g.dtype)  # type: ignore[union-attr]
                w = g[:, sl].reshape(g.shape[0], *blk.shape)
                out[:, sl] = (left @ w @ (qa.T if inverse else qa)).reshape(g.shape[0], -1)
            elif blk.kind == "joint":
                # [W | b] (out, in+1) <-> its rotation, stored over the same P entries (W's then b's)
                qa = lf.qa.to(g.device, g.dtype)  # type: ignore[union-attr]
                out_dim, cols = blk.shape
                w_sl = slice(blk.offset, blk.offset + out_dim * (cols - 1))
                b_sl = slice(blk.bias_offset, blk.bias_offset + out_dim)  # type: ignore[operator]
                if inverse:
                    r = g[:, sl].reshape(g.shape[0], out_dim, cols)
                    m = left @ r @ qa.T
                    out[:, w_sl] = m[:, :, :-1].reshape(g.shape[0], -1)
                    out[:, b_sl] = m[:, :, -1]
                else:
                    m = torch.cat([g[:, w_sl].reshape(g.shape[0], out_dim, cols - 1), g[:, b_sl, None]], dim=2)
                    out[:, sl] = (left @ m @ qa).reshape(g.shape[0], -1)
            else:
                out[:, sl] = g[:, sl] @ left.T
        return out[0] if single else out

    def eigenvalues(self) -> torch.Tensor:
        """(P,) eigenvalues of G in the rotated flat layout: b a^T (or the EK-FAC ones) per block."""
        parts = []
        for blk in self.blocks:
            lf = self.layers[blk.layer]
            if blk.kind in ("weight", "joint"):
                ev = lf.ekfac_weight if lf.ekfac_weight is not None else torch.outer(lf.b, lf.a)  # type: ignore[arg-type]
            else:
                ev = lf.ekfac_bias if lf.ekfac_bias is not None else lf.b
            parts.append(ev.reshape(-1))
        return torch.cat(parts)

    def block_largest_eigenvalues(self, eigenvalues: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) each block's largest eigenvalue of G, for ``resolution_floor``: the maxima of ``eigenvalues()`` (or
        the ``eigenvalues`` given, in its layout) block by block."""
        ev = self.eigenvalues() if eigenvalues is None else eigenvalues
        return torch.stack([part.max() for part in torch.split(ev, [blk.size for blk in self.blocks])])

    def resolution_floor(self, dtype: torch.dtype, eigenvalues: torch.Tensor | None = None) -> float:
        """The damping below which eq. 6's 1/(e + lambda) weighs the factors' rounding: eps(dtype) x the median
        block's largest eigenvalue.

        Why: a factor summed in ``dtype`` has its eigenvalues known to about eps x its largest (QA 31a), so a
        block's product eigenvalues b_i a_j are known to about eps x max b x max a; below that they are rounding,
        and at a damping under the floor most blocks' near-null directions are weighted by it. On the shipped
        float32 digits and mnist factors the floor is about 2.5e-10 (QA 31a measured the digits scores 1.3e-4 of
        the largest off at 1e-10 and 1.7e-2 at 1e-12)."""
        return float(torch.finfo(dtype).eps) * float(self.block_largest_eigenvalues(eigenvalues).double().median())

    def inverse_apply(self, v: torch.Tensor, damping: float) -> torch.Tensor:
        """(G + lambda I)^{-1} v for flat v (P,) or (n, P), exact damping (for tests and checks)."""
        ev = self.eigenvalues().to(v.device, v.dtype)
        return self.unrotate(self.rotate(v) / (ev + damping))

    # --- persistence -------------------------------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Every layer's eigenvectors and eigenvalues as named arrays, for the factor cache's npz."""
        arrays: dict[str, np.ndarray] = {}
        for i, lf in enumerate(self.layers):
            for key in ("qa", "a", "qb", "b", "ekfac_weight", "ekfac_bias"):
                t = getattr(lf, key)
                if t is not None:
                    arrays[f"l{i:03d}_{key}"] = t.detach().cpu().numpy()
        return arrays

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], template: KFACFactors, device: torch.device | str = "cpu"
    ) -> KFACFactors:
        """Rebuild from ``to_arrays`` output; ``template`` (from ``layout``) gives names and blocks."""
        layers = []
        for i, lf in enumerate(template.layers):
            vals = {}
            for key in ("qa", "a", "qb", "b", "ekfac_weight", "ekfac_bias"):
                a = arrays.get(f"l{i:03d}_{key}")
                vals[key] = None if a is None else torch.from_numpy(np.array(a)).to(device)
            layers.append(LayerFactors(name=lf.name, **vals))  # type: ignore[arg-type]
        return cls(layers=layers, blocks=template.blocks)


def layout(
    model: nn.Module, params: Params, joint: bool = False
) -> tuple[KFACFactors, dict[str, nn.Module]]:
    """Blocks for ``params`` (which must all be Conv2d/Linear weights or biases) and empty layers.

    ``joint``: a layer whose weight is directly followed by its bias in ``params`` gets one block
    [W | b] of shape (out, in*kh*kw + 1) (curvlinops' ``separate_weight_and_bias=False``: A has an
    appended constant input 1); otherwise weight and bias are separate blocks (B (x) A and B).
    """
    owner: dict[int, tuple[str, nn.Module, str]] = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            for pname, p in mod.named_parameters(recurse=False):
                owner[id(p)] = (mname, mod, pname)
    layer_index: dict[str, int] = {}
    modules: dict[str, nn.Module] = {}
    layers: list[LayerFactors] = []
    blocks: list[Block] = []
    offset = 0
    for name, p in params:
        if id(p) not in owner:
            raise ValueError(
                f"parameter {name} is not a Conv2d/Linear weight or bias: K-FAC has no block for it"
            )
        mname, mod, pname = owner[id(p)]
        if mname not in layer_index:
            layer_index[mname] = len(layers)
            modules[mname] = mod
            empty = torch.empty(0)
            layers.append(LayerFactors(name=mname, qa=None, a=None, qb=empty, b=empty))
        shape = (p.shape[0], p[0].numel()) if pname == "weight" else (p.shape[0],)
        prev = blocks[-1] if blocks else None
        if (
            joint
            and pname == "bias"
            and prev is not None
            and prev.kind == "weight"
            and prev.layer == layer_index[mname]
        ):
            blocks[-1] = Block(
                name=f"{mname}.weight+bias" if mname else "weight+bias",
                layer=prev.layer,
                kind="joint",
                offset=prev.offset,
                shape=(prev.shape[0], prev.shape[1] + 1),
                bias_offset=offset,
            )
        else:
            blocks.append(Block(name=name, layer=layer_index[mname], kind=pname, offset=offset, shape=shape))
        offset += p.numel()
    if joint:
        with_weight = {b.layer for b in blocks if b.kind == "weight"}
        split = [b.name for b in blocks if b.kind == "bias" and b.layer in with_weight]
        if split:
            raise ValueError(f"joint K-FAC blocks need each layer's bias right after its weight: {split}")
    return KFACFactors(layers=layers, blocks=blocks), modules


# --- data: (example, draw) rows for curvlinops --------------------------------------------


class _FlatEps(nn.Module):
    """(x_t flattened | t) rows -> eps_theta(x_t, t) flattened to (batch, D)."""

    def __init__(self, net: nn.Module, shape: tuple[int, ...]):
        super().__init__()
        self.net = net
        self.shape = tuple(shape)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        x = X[:, :-1].reshape(X.shape[0], *self.shape)
        t = X[:, -1].round().long()
        return self.net(x, t).flatten(1)


class DrawRows:
    """Re-iterable loader over the N*M rows (x_n, t_m, eps_m), example-major, as curvlinops wants.

    ``draws`` are shared ``MCDraws`` or per-example draws (``engine.attribution.train_draws``); flip bits
    mirror x_n (the training augmentation), exactly as in the per-example gradients.

    Yields ``(X, y)`` with X = [x_t flattened, t] (batch, D+1) and y = eps flattened (batch, D).
    ``on_batch(rows_done, rows_total)`` is told the rows *finished*: before each batch is produced (the
    consumer has finished every batch before it) and once at the end.  Why not after a batch is produced: with
    one batch larger than N the bar read "64/64 rows" at 0:00 and stayed so for the 7-10 min that batch took
    (QA 54 F6a); now it reads "0/64" with its clock moving until the batch is done.
    ``on_start()`` (called when iteration begins) returns the row to start at (a resumed pass);
    ``between(rows_done)`` is called before each batch and once at the end, when the consumer
    has finished every batch before ``rows_done`` (where a checkpoint can be taken).
    """

    def __init__(
        self,
        diffusion: Diffusion,
        images: torch.Tensor,
        draws: TrainDraws,
        batch_size: int,
        on_batch: Callable[[int, int], None] | None = None,
        on_start: Callable[[], int] | None = None,
        between: Callable[[int], None] | None = None,
    ):
        self.diffusion = diffusion
        self.images = images
        self.draws = draws
        self.batch_size = int(batch_size)
        self.on_batch = on_batch
        self.on_start = on_start
        self.between = between
        self.total = images.shape[0] * len(draws)

    def __len__(self) -> int:
        return -(-self.total // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        m = len(self.draws)
        dev = self.images.device
        start = self.on_start() if self.on_start is not None else 0
        for s in range(start, self.total, self.batch_size):
            if self.between is not None:
                self.between(s)
            if self.on_batch is not None:
                self.on_batch(s, self.total)  # rows finished: the consumer asks for this batch after the last one
            r = torch.arange(s, min(self.total, s + self.batch_size), device=dev)
            ex, k = r // m, r % m
            first = int(ex[0])
            d = self.draws.for_rows(slice(first, int(ex[-1]) + 1)).to(dev, self.images.dtype)
            if d.batched:  # per-example draws of the examples in this batch
                t, eps = d.t[ex - first, k], d.eps[ex - first, k]
                flip = None if d.flip is None else d.flip[ex - first, k]
            else:
                t, eps = d.t[k], d.eps[k]
                flip = None if d.flip is None else d.flip[k]
            x0 = self.images[ex]
            if flip is not None:
                x0 = apply_flip(x0, flip)
            xt = self.diffusion.q_sample(x0, t, eps)
            X = torch.cat([xt.flatten(1), t.to(xt.dtype)[:, None]], dim=1)
            yield X, eps.flatten(1)
        if self.between is not None:
            self.between(self.total)
        if self.on_batch is not None and start < self.total:
            self.on_batch(self.total, self.total)


class _FactorResume:
    """Checkpoints of a curvlinops pass (``engine.attribution.pass_checkpoint``): every ``every`` rows (a
    multiple of the batch size) the pass's accumulators and curvlinops' label generator are saved;
    a new pass restores them and starts at the saved row, so it adds exactly what an uninterrupted
    pass would have added, in the same order.

    ``kind`` is "factors" (K-FAC's input and gradient covariances) or "ekfac" (EK-FAC's
    eigenvalue-correction pass: the corrected eigenvalues accumulated in the eigenbasis of the
    finished factors; its checkpoint is a separate file, so a kill during the correction pass
    keeps the factor pass's final state and resumes the correction where it stopped).
    """

    def __init__(self, checkpoint: PassCheckpoint, every: int, batch_size: int, kind: str = "factors",
                 seconds: float | None = None):
        if kind not in ("factors", "ekfac"):
            raise ValueError(f"unknown pass {kind!r}")
        self.checkpoint = checkpoint
        self.kind = kind
        self.every = max(batch_size, (int(every) // batch_size) * batch_size)
        # also saved once ``seconds`` have passed since the last save, at the next batch's end: on a slow or busy
        # machine 8,192 rows took minutes, and a Ctrl-C before the first checkpoint lost all of them (QA 30c:
        # 6,144 digits rows after 73 s; two mnist passes stopped before row 8,192 after 10-25 min)
        self.seconds = seconds
        self.saved_at = time.monotonic()
        self.save_cost = 0.0  # seconds the last save took: a timed save waits at least 20 of them (<= 5% of the time)
        self.op: Any = None  # the curvlinops operator, set once created
        self.total = 0
        self.last = 0
        self.resumed_at = 0
        self.prior = 0.0  # seconds the earlier attempts ran up to the loaded checkpoint (saved with it)
        self.started = time.monotonic()
        self.notice: Callable[[str], None] | None = None  # told once when a pass resumes
        self.threads_before: int | None = None  # torch's thread count before a resume pinned it (restored after)

    def _accumulators(self) -> dict[str, Any]:
        op = self.op
        if self.kind == "factors":
            return {"input_covariances": op._input_covariances, "gradient_covariances": op._gradient_covariances}
        return {"corrected_eigenvalues": op._corrected_eigenvalues}

    def start(self) -> int:
        self.started = self.saved_at = time.monotonic()
        if self.op is None:  # curvlinops peeks at the first batch while it is being created
            return 0
        state = self.checkpoint.load()
        if state is None:
            return 0
        self.prior = float(state.get("seconds", 0.0))
        dev = self.op.device
        for key, acc in self._accumulators().items():
            acc.clear()
            acc.update(_map_tensors(state[key], lambda v: v.to(dev).clone()))
        self.op._generator.set_state(state["generator"])
        self.last = self.resumed_at = int(state["rows"])
        # the rest of the pass runs at the thread count of the rows saved: reductions split across threads round
        # differently, and a pass resumed at another count matched neither uninterrupted pass (QA round 21)
        saved_threads = state.get("threads")
        words = ""
        if saved_threads is not None and int(saved_threads) != torch.get_num_threads():
            self.threads_before = torch.get_num_threads()
            torch.set_num_threads(int(saved_threads))
            words = f", at the {int(saved_threads)} thread(s) it ran with"
        if self.notice is not None:
            what = "K-FAC factors" if self.kind == "factors" else "EK-FAC eigenvalues"
            self.notice(f"{what}: resuming at row {self.last}/{self.total} saved by an earlier run{words}")
        return self.last

    def restore_threads(self) -> None:
        """Give torch back the thread count a resume pinned (``start``)."""
        if self.threads_before is not None:
            torch.set_num_threads(self.threads_before)
            self.threads_before = None

    def between(self, rows: int) -> None:
        """After each batch: save when ``every`` rows or ``seconds`` have passed since the last save (any batch end
        is an exact resume point: the accumulators and the label generator's state), and at the pass's end."""
        if self.op is None or rows <= self.last:
            return
        # the process is exiting (the app's server stopped): save now, the build stops at this batch's progress call
        due = rows - self.last >= self.every or rows == self.total or exit_requested()
        if not due and (self.seconds is None
                        or time.monotonic() - self.saved_at < max(self.seconds, 20 * self.save_cost)):
            return
        began = time.monotonic()
        state: dict[str, Any] = {"rows": rows, "generator": self.op._generator.get_state(),
                                 "seconds": self.prior + time.monotonic() - self.started,
                                 "threads": torch.get_num_threads()}
        for key, acc in self._accumulators().items():
            state[key] = _map_tensors(acc, lambda v: v.detach().clone())
        self.checkpoint.save(state)
        self.last = rows
        self.saved_at = time.monotonic()
        self.save_cost = self.saved_at - began


def _map_tensors(tree: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor of a (nested) dict: curvlinops keeps EK-FAC's corrected
    eigenvalues as {layer: tensor} for joint blocks and {layer: {"weight": ..., "bias": ...}} otherwise."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _map_tensors(v, fn) for k, v in tree.items()}
    return tree


def _eigh(factor: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    f64 = factor.detach().double()
    f64 = 0.5 * (f64 + f64.T)
    evals, evecs = torch.linalg.eigh(f64)
    # contiguous: factors loaded from the cache are, and a matmul's rounding depends on the layout,
    # so a build that computed its factors and one that loaded them give the same bank bytes
    return evals.clamp(min=0.0).to(dtype).contiguous(), evecs.to(dtype).contiguous()


def private_copy(model: nn.Module, params: Params) -> tuple[nn.Module, Params]:
    """A copy of ``model`` and ``params`` (the same names, the copy's tensors) for the factor pass.

    Why: curvlinops hooks the modules it is given, and its hooks fire on every thread's forward pass.  The
    app answers queries with the shared model while a build runs in its own thread, so on the shared model
    a query's activations would enter the factors (and the query would run through the pass's hooks).  On a
    private copy neither sees the other; the weights are the same values, so the factors are the same
    numbers.  Parameters that are not the model's own (a test's stand-ins) keep the model as it is."""
    import copy

    names = {id(p): n for n, p in model.named_parameters()}
    if not all(id(t) in names for _, t in params):
        return model, params
    # every module's hook tables are replaced by empty ones in the copy, never read: another thread may be
    # adding or removing its own (thread-guarded) hooks meanwhile, and deepcopy iterating such a table then
    # failed with "OrderedDict mutated during iteration" (review 53: 3 of 300 copies)
    memo: dict[int, Any] = {}
    for module in model.modules():
        for key, value in list(vars(module).items()):
            if "hook" in key and isinstance(value, dict):
                memo[id(value)] = type(value)()
    twin = copy.deepcopy(model, memo)
    own = dict(twin.named_parameters())
    return twin, [(n, own[names[id(t)]]) for n, t in params]


# What one row costs beside the saved activations, as multiples (``pass_row_bytes``): the backward's activation
# gradients (about as large as what autograd saved) and the widest unfolded input twice (curvlinops' patches and
# their rearranged copy, alive together in its input-covariance hook)
SAVED_FACTOR = 2
UNFOLD_FACTOR = 2


def pass_row_bytes(model: nn.Module, image_shape: tuple[int, ...], params: Params) -> int:
    """Bytes one (example, draw) row holds at once in a pass with hooks on the layers of ``params`` (the K-FAC
    factor pass, the compressed bank's hooks pass), measured by one forward of a single row (zeros at t = 0):

        row_bytes = SAVED_FACTOR x S + UNFOLD_FACTOR x U,

    S = the bytes autograd saves for the backward (``saved_tensors_hooks``, storages counted once, the parameters
    left out: they do not grow with the rows), U = the largest unfolded input of a hooked layer (kfac-expand's
    patches: C_in/groups x k_h x k_w x H_out x W_out elements of a Conv2d, the input of a Linear) in the
    parameters' dtype.  Why these: the pass's memory grows with its rows by the forward's saved activations, their
    gradients in the backward (as large again), and one layer's patches plus their copy at a time; the
    factor sums and parameter gradients do not grow with the rows.  At CIFAR size (QA 62's 35.7M-parameter
    diffusers UNet, U = 14 MB) 122 MB a row (124 MB for the cifar2 preset's own UNet), against the ~98 MB a row QA
    62 measured (7.1 GB at 64 rows, 0.8 GB before the pass): a bound with some room.  Digits: 1.0 MB, mnist: 6.3 MB.  Deterministic for a model and
    dtype, so a resumed pass derives the batch it was checkpointed with."""
    dtype = params[0][1].dtype
    dev = params[0][1].device
    size = torch.empty((), dtype=dtype).element_size()
    owner = {id(p) for _, p in params}
    modules = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
               and any(id(p) in owner for p in m.parameters(recurse=False))]
    param_ptrs = {p.data_ptr() for p in model.parameters()}
    widest = [0]

    def on_forward(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        if isinstance(mod, nn.Conv2d):
            k = math.prod(mod.kernel_size) * (mod.in_channels // mod.groups)
            u = k * math.prod(out.shape[2:])
        else:
            u = args[0][0].numel()  # one row's input (batch of 1)
        widest[0] = max(widest[0], int(u))

    saved: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in param_ptrs:
            n = t.untyped_storage().nbytes()
            saved[(t.untyped_storage().data_ptr(), n)] = n
        return t

    # this thread's forward only: the model may be shared with threads that answer queries
    handles = [m.register_forward_hook(this_thread_only(on_forward)) for m in modules]
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros((1, *image_shape), dtype=dtype, device=dev, requires_grad=True)
        t = torch.zeros((1,), dtype=torch.long, device=dev)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x, t)
        del out
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return SAVED_FACTOR * sum(saved.values()) + UNFOLD_FACTOR * widest[0] * size


def compute_kfac(
    model: nn.Module,
    diffusion: Diffusion,
    images: torch.Tensor,
    draws: TrainDraws,
    params: Params,
    fisher_type: str = "mc",
    kfac_approx: str = "expand",
    ekfac: bool = False,
    batch_size: int = 256,
    seed: int = 0,
    progress: Callable[[str, float], None] | None = None,
    checkpoint: PassCheckpoint | None = None,
    checkpoint_rows: int = 8192,
    joint: bool = False,
    checkpoint_seconds: float | None = None,
    factor_dtype: torch.dtype | None = None,
    batch_bytes: int | None = None,
) -> KFACFactors:
    """K-FAC (or EK-FAC) factors of the GGN/Fisher of L over the N x M (example, draw) rows.

    ``images`` (N, C, H, W) and ``draws`` (M) are the training set and the train-gradient
    draws (per example, or shared by every example: ``engine.attribution.train_draws``).  ``seed`` seeds the sampled labels of the MC-Fisher.
    ``type-2`` (exact GGN, D backward passes per batch) is for tests.

    ``checkpoint``: save the pass's running state every ``checkpoint_rows`` (example, draw)
    rows, or after ``checkpoint_seconds`` since the last save if that comes first, and resume from it
    (``_FactorResume``); a resumed pass gives the same factors as an
    uninterrupted one.  The caller clears it once the factors are stored.  EK-FAC's
    eigenvalue-correction pass is checkpointed the same way, in ``checkpoint.part("ekfac")``
    (cleared with it).
    ``joint``: weight and bias
    of a layer in one Kronecker block (curvlinops ``separate_weight_and_bias=False``; an ablation).
    ``factor_dtype``: run the pass (forward, backward and the factors' sums) in this dtype on the private copy
    of the model, e.g. float64; the eigenvectors and eigenvalues are stored in the model's dtype.  Why: in
    float32 each factor's eigenvalues are known only to about 1e-7 of its largest, and 1/(e + lambda) at a
    damping below that turns the rounding into the scores (QA 31a: a 128-image model's scores were 10% off a
    float64 eq. 6 at lambda = 1e-10 and 10x off at 1e-12; the shipped digits model 1.7% at 1e-12, 1.3e-4 at
    1e-10); everything after the factors is float32-exact.  (AttributionConfig.kfac_factor_dtype.)
    ``batch_bytes``: the rows per batch are ``batch_size`` or fewer, so that they hold at most this many bytes
    by ``pass_row_bytes`` of the private copy in the pass's dtype (``ComputeConfig.factor_batch_bytes``; QA 62 F1:
    256 CIFAR-size rows passed 13 GB).  The factors are sums over rows, so the batch changes them by float
    rounding only (the MC labels are the same stream when a batch's D values are a multiple of 16: torch's CPU
    normal fills blocks of 16); the derived batch is in the checkpoint's signature as the given one was.
    """
    import warnings

    # linear_operator, which curvlinops imports, applies torch.jit.script at import time to code we never call;
    # torch's deprecation notice for it landed in every build's first bar line (QA 25 #16)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        from curvlinops import EKFACLinearOperator, KFACLinearOperator

    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"unknown fisher_type {fisher_type!r}: expected one of {FISHER_TYPES}")
    if kfac_approx not in KFAC_APPROX:
        raise ValueError(f"unknown kfac_approx {kfac_approx!r}: expected one of {KFAC_APPROX}")
    out_dtype = params[0][1].dtype  # what the factors are stored in: the model's
    twin, params = private_copy(model, params)
    if factor_dtype is not None and factor_dtype != out_dtype:
        if twin is model:  # no private copy (parameters that are not the model's own): never convert the caller's
            raise ValueError("factor_dtype needs the model's own parameters (the pass converts a private copy)")
        twin.to(factor_dtype)  # in place: ``params`` are the copy's parameters, now of factor_dtype
    model = twin
    factors, modules = layout(model, params, joint=joint)
    dev, dtype = params[0][1].device, params[0][1].dtype
    images = images.to(dev, dtype)
    if batch_bytes is not None:
        batch_size = budget_rows(batch_size, pass_row_bytes(model, tuple(images.shape[1:]), params), batch_bytes)
    was_training = model.training
    model.eval()
    passes = 2 if ekfac else 1
    state = {"pass": 0}

    def on_batch(done: int, total: int) -> None:
        if progress is not None:
            what = "K-FAC factors" if state["pass"] == 0 else "EK-FAC eigenvalues"
            progress(f"{what}: {done}/{total} (example, draw) rows", (state["pass"] + done / total) / passes)

    resume = None
    if checkpoint is not None:
        checkpoint = checkpoint.with_signature(
            {
                "rows": images.shape[0] * len(draws),
                "batch_size": int(batch_size),
                "seed": int(seed),
                "fisher_type": fisher_type,
                "kfac_approx": kfac_approx,
                "dtype": str(dtype),
                "blocks": [(b.name, list(b.shape)) for b in factors.blocks],
            }
        )
        resume = _FactorResume(checkpoint, checkpoint_rows, batch_size, seconds=checkpoint_seconds)
        correction = _FactorResume(checkpoint.part("ekfac"), checkpoint_rows, batch_size, kind="ekfac",
                                   seconds=checkpoint_seconds)
        if progress is not None:  # a resumed pass says so (QA round 21: only the bank pass did)
            for k, r in enumerate((resume, correction)):
                r.notice = lambda msg, k=k, r=r: progress(msg, (k + r.last / max(r.total, 1)) / passes)
    loader = DrawRows(
        diffusion,
        images,
        draws,
        batch_size,
        None,  # set below: curvlinops peeks at a batch while it is created, which is no progress
        on_start=None if resume is None else resume.start,
        between=None if resume is None else resume.between,
    )
    wrapper = _FlatEps(model, tuple(images.shape[1:])).eval()
    op_cls = EKFACLinearOperator if ekfac else KFACLinearOperator
    op = op_cls(
        wrapper,
        nn.MSELoss(reduction="mean"),
        [p for _, p in params],
        loader,
        check_deterministic=False,
        seed=seed,
        fisher_type=fisher_type,
        kfac_approx=kfac_approx,
        num_per_example_loss_terms=1,
        separate_weight_and_bias=not joint,
        num_data=loader.total,
    )
    loader.on_batch = on_batch
    if resume is not None:
        resume.op, resume.total = op, loader.total
    try:
        op.compute_kronecker_factors()
        if progress is not None:  # minutes at CIFAR size, with no rows to count (QA 62 F4: a stale time left)
            progress(EIGH_MESSAGE, 1.0 / passes)
        mod_name = {id(m): n for n, m in wrapper.named_modules()}
        curv_names = {lf.name: mod_name[id(modules[lf.name])] for lf in factors.layers}
        for lf in factors.layers:
            cname = curv_names[lf.name]
            aaT = op._input_covariances.get(cname)
            ggT = op._gradient_covariances[cname]
            if aaT is not None:
                lf.a, lf.qa = _eigh(aaT, out_dtype)
            lf.b, lf.qb = _eigh(ggT, out_dtype)
        if ekfac:
            # use our float64-eigh eigenvectors for the correction pass (curvlinops skips its own
            # eigh when these dicts are filled)
            for lf in factors.layers:
                cname = curv_names[lf.name]
                if lf.qa is not None:
                    op._input_covariances_eigenvectors[cname] = lf.qa.to(dtype)
                op._gradient_covariances_eigenvectors[cname] = lf.qb.to(dtype)
            op._input_covariances.clear()
            op._gradient_covariances.clear()
            state["pass"] = 1
            if resume is None:
                loader.on_start = loader.between = None
            else:  # the correction pass has its own checkpoint (same rows, its own accumulators)
                correction.op, correction.total = op, loader.total
                loader.on_start, loader.between = correction.start, correction.between
            op.compute_eigenvalue_correction()
            for lf in factors.layers:
                corrected = op._corrected_eigenvalues[curv_names[lf.name]]
                if isinstance(corrected, torch.Tensor):  # joint block: one (out, in + 1) tensor
                    lf.ekfac_weight = corrected.to(out_dtype).reshape(lf.qb.shape[0], -1)
                    continue
                for ev in corrected.values():
                    ev = ev.to(out_dtype)
                    if ev.dim() == 2:
                        lf.ekfac_weight = ev.reshape(lf.qb.shape[0], -1)
                    else:
                        lf.ekfac_bias = ev
    finally:
        model.train(was_training)
        if resume is not None:
            resume.restore_threads()
            correction.restore_threads()
    if resume is not None:
        factors.seconds_before = resume.prior + (correction.prior if ekfac else 0.0)
    if progress is not None:
        progress("K-FAC factors done", 1.0)
    return factors
