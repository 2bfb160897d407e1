"""The kronfluence comparison of the attribution bench (``bench --kronfluence``): kronfluence's
KFAC on the same model, N and M draws, timed per query against ours, with the Spearman
correlation of the two score vectors.
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import TYPE_CHECKING, Any

import torch

from ..evaluation.stats import spearman
from .report import median as _median

if TYPE_CHECKING:  # annotations only
    from ..attribution.query import QueryInput
    from ..attribution.results import QueryResult
    from ..attribution.session import AttributionSession
    from ..model.diffusion import Diffusion


def _make_kronfluence_task(diffusion: Diffusion, shape: tuple[int, int, int]) -> Any:
    """A kronfluence Task whose loss is the diffusion MSE on (x_0, t, eps) triples.

    Each data item is one (x_0, t, eps) triple.  Train loss (summed over the batch, as
    kronfluence expects): (1/D)||eps - eps_theta(x_t, t)||^2.  With ``sample=True`` the target
    is drawn from the Gaussian whose negative log-likelihood is this loss,
    y ~ N(eps_theta, (D/2) I), so E[grad grad^T] = J^T (2/D) J, the GGN (MC-Fisher).
    The measurement is the same loss with the true eps (our ``loss`` measurement).
    """
    from kronfluence.task import Task

    d = math.prod(shape)

    class DiffusionMSETask(Task):
        def _pred(self, batch, model):
            x0, t, eps = batch
            return model(diffusion.q_sample(x0, t, eps), t), eps

        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            pred, eps = self._pred(batch, model)
            if sample:
                with torch.no_grad():
                    target = pred.detach() + math.sqrt(d / 2.0) * torch.randn_like(pred)
            else:
                target = eps
            return (target - pred).pow(2).flatten(1).mean(1).sum()

        def compute_measurement(self, batch, model) -> torch.Tensor:
            pred, eps = self._pred(batch, model)
            return (eps - pred).pow(2).flatten(1).mean(1).sum()

    return DiffusionMSETask()


class _Triples(torch.utils.data.Dataset):
    """Item j = (x_i, t, eps) of example i = j // M and draw k = j % M: every example with every draw.

    ``t`` (M,) and ``eps`` (M, C, H, W) are draws shared by every example; ``t`` (N, M) and ``eps``
    (N, M, C, H, W) are each example's own (per-example draws)."""

    def __init__(self, images: torch.Tensor, t: torch.Tensor, eps: torch.Tensor):
        self.images, self.t, self.eps = images, t, eps
        self.per_example = t.dim() == 2
        self.m = int(t.shape[-1])

    def __len__(self) -> int:
        return int(self.images.shape[0]) * self.m

    def __getitem__(self, j: int):
        i, k = divmod(int(j), self.m)
        if self.per_example:
            return self.images[i], self.t[i, k], self.eps[i, k]
        return self.images[i], self.t[k], self.eps[k]


def compare_kronfluence(
    session: AttributionSession,
    queries: list[QueryInput],
    query_results: list[QueryResult],
    batch_size: int = 512,
) -> dict[str, Any]:
    """kronfluence KFAC (same model, N, M, draws; sampled labels) vs our K-FAC on a few queries.

    A query's score for training example i is the mean over its M triples of the triple scores
    with the summed query gradient (the query's M triples, ``aggregate_query_gradients``):
    scores are linear in both gradients, so this equals grad m^T (G + lambda)^-1 grad l_i up to
    the constant factors kronfluence's own normalisation puts on G (irrelevant to Spearman).
    """
    import copy
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    ctx = session.ctx
    shape = session.shape
    task = _make_kronfluence_task(session.diffusion, shape)
    model = prepare_model(copy.deepcopy(session.model).cpu().eval(), task)
    draws = ctx.train_draws
    if getattr(draws, "batched", False):  # per-example draws: every example's own (t, eps), all at once
        if draws.flip:
            raise ValueError("the kronfluence comparison does not support flip augmentation")
        draws = draws.for_rows(slice(0, len(session.dataset.images)))
    elif draws.flip is not None:
        raise ValueError("the kronfluence comparison does not support flip augmentation")
    qdraws = session.query_draws()
    train = _Triples(session.dataset.images, draws.t, draws.eps)
    m = train.m
    out: dict[str, Any] = {"N": len(session.dataset), "M": m, "triples": len(train), "strategy": "kfac"}
    with tempfile.TemporaryDirectory(prefix="kronfluence-") as folder:
        analyzer = Analyzer(
            analysis_name="bench", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=folder
        )
        fargs = FactorArguments(strategy="kfac", use_empirical_fisher=False)
        t0, c0 = time.perf_counter(), time.process_time()
        analyzer.fit_all_factors("kfac", dataset=train, per_device_batch_size=batch_size, factor_args=fargs)
        out["fit_factors_s"] = time.perf_counter() - t0
        out["fit_factors_cpu_s"] = time.process_time() - c0
        damping = query_results[0].methods["kfac"].damping
        sargs = ScoreArguments(damping_factor=damping, aggregate_query_gradients=True)
        rhos, times, cpu, ours, ours_cpu = [], [], [], [], []
        for qi, (q, r) in enumerate(zip(queries, query_results, strict=False)):
            # ours, in the same conditions (a busy machine inflates both alike; CPU time is fairer)
            t0, c0 = time.perf_counter(), time.process_time()
            session.query(q, "loss", methods=["kfac"])
            ours.append(time.perf_counter() - t0)
            ours_cpu.append(time.process_time() - c0)
            qset = _Triples(q.image[None].float(), qdraws.t, qdraws.eps)
            t0, c0 = time.perf_counter(), time.process_time()
            analyzer.compute_pairwise_scores(
                scores_name=f"q{qi}",
                factors_name="kfac",
                query_dataset=qset,
                train_dataset=train,
                per_device_query_batch_size=len(qset),
                per_device_train_batch_size=batch_size,
                score_args=sargs,
                overwrite_output_dir=True,
            )
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            scores = analyzer.load_pairwise_scores(f"q{qi}")["all_modules"]
            per_example = scores.reshape(-1, len(session.dataset), m).sum(0).mean(1).double().numpy()
            rhos.append(spearman(per_example, r.methods["kfac"].scores))
    out.update(
        score_one_query_s_median=_median(times),
        score_one_query_cpu_s_median=_median(cpu),
        ours_query_s_median=_median(ours),
        ours_query_cpu_s_median=_median(ours_cpu),
        speedup_wall=_median(times) / _median(ours),
        speedup_cpu=_median(cpu) / _median(ours_cpu),
        spearman_vs_ours=rhos,
        spearman_median=_median(rhos),
        damping=damping,
        queries=len(rhos),
    )
    return out


