"""The streamed K-FAC bank: ``RotatedBank``'s scoring interface without stored rows (docs/architecture.md §8).

For a model whose N x P bank does not fit, each pass recomputes the training gradients and takes the same
sums as the stored bank (``engine.attribution.bank``), exactly.  The ``streamed`` bank kind
(``methods/kfac_bank_kinds.py``) returns it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..config import COMPUTE
from ..model.diffusion import Diffusion
from .curvature import KFACFactors
from .gradients import Params, train_loss_grads
from .scoring import to_scores
from .train_draws import TrainDraws


class StreamedBank:
    """The bank's scoring interface without a stored bank (docs/architecture.md §8).

    For models whose N x P bank does not fit (CIFAR-2: 5,000 x 35.7M parameters = 166 GiB in
    int8), each ``score``/``score_many`` call recomputes the training gradients in batches and
    takes the same sums as ``RotatedBank``, exactly (no quantisation).  Since the Q are
    orthogonal, <R_i, q> = <grad l(x_i), Q_B q Q_A^T> per block, so the damped query is
    rotated back once (``unrotate``: (G + lambda I)^{-1} grad m) and each training gradient
    is used as it comes:

        scores_i = (1/N) grad l(x_i)^T (G + lambda I)^{-1} grad m(q).  A query batch -- in practice the damping grid of one query
    (``score_many``), as in Grosse et al.'s query batching -- costs one gradient pass, so the
    grid is what makes a later damping change free.  ``progress(message, fraction)`` is called
    after each batch, since a pass takes minutes at that scale.
    """

    quantized = False

    def __init__(
        self,
        model: nn.Module,
        diffusion: Diffusion,
        images: torch.Tensor,
        draws: TrainDraws,
        factors: KFACFactors,
        params: Params,
        loss: str = "loss",
        grad_batch: int = COMPUTE.streamed_grad_batch,
        progress: Callable[[str, float], None] | None = None,
        grid_max_bytes: int = COMPUTE.streamed_grid_max_bytes,
    ):
        """``grad_batch`` and ``grid_max_bytes``: ``ComputeConfig.streamed_grad_batch`` / ``streamed_grid_max_bytes``
        (every uncached damping is a full gradient pass, so a big grid is scored at once)."""
        self.model, self.diffusion, self.images, self.draws = model, diffusion, images, draws
        self.factors, self.params, self.loss, self.grad_batch = factors, params, loss, int(grad_batch)
        self.blocks = factors.blocks
        self.num_examples = int(images.shape[0])
        self.progress = progress
        self.grid_max_bytes = int(grid_max_bytes)
        self.passes = 0  # gradient passes so far (tests and benchmarks read it)

    @property
    def device(self) -> torch.device:
        return self.params[0][1].device

    @property
    def nbytes(self) -> int:
        return 0

    def inner_many(self, queries: torch.Tensor) -> torch.Tensor:
        """(G, N) inner products for G rotated, damped queries: one pass over the training set."""
        n, dev = self.num_examples, self.device
        q = self.factors.unrotate(queries.to(dev, self.params[0][1].dtype))
        out = torch.empty((n, q.shape[0]), dtype=q.dtype, device=dev)
        batches = train_loss_grads(
            self.model, self.diffusion, self.images, self.draws, self.loss,
            batch_size=self.grad_batch, progress=self.progress, params=self.params,
        )
        for rows, g in batches:
            out[rows] = g.detach() @ q.T
        self.passes += 1
        return out.T

    def score(self, query: torch.Tensor) -> np.ndarray:
        """(N,) float32 scores for one rotated, damped query (P,)."""
        return self.score_many(query[None])[0]

    def score_many(self, queries: torch.Tensor) -> np.ndarray:
        """(G, N) float32 scores for G rotated, damped queries: one pass over the training set."""
        return to_scores(self.inner_many(queries), self.num_examples)
