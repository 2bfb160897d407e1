"""The float gradients a build holds are bounded by ``ComputeConfig.gradient_batch_bytes`` (QA 54 F1, F2).

At CIFAR size (P = 35.7M, 143 MB a float32 row) TRAK's and D-TRAK's builds held batches of 32 rows and their
copies (20 GiB), and the stored bank's pass kept a whole chunk's float rows and two copies of them (OOM at 21 GiB
for 64 images).  The batch is now the largest that fits the budget (``gradients.budget_batch``), the bank's pass
rotates and quantises each sub-batch as soon as it is computed, and the SRHT projection pads a bounded number of
rows at a time.  None of it changes a feature or a bank row: the tiny model's caches are compared byte for byte
with a budget that forces batches of one row, and with the whole chunk rotated at once (the former pass).
"""

from __future__ import annotations

import numpy as np
import torch
from test_resume import _arrays_bytes, _kfac_ctx

import engine.attribution.projection as projection
from engine.attribution.caches import MethodCaches
from engine.attribution.curvature import KFACFactors
from engine.attribution.gradients import num_params, per_example_grads
from engine.attribution.methods.kfac_influence import KFACInfluence
from engine.attribution.methods.trak import DTRAK, TRAK
from engine.attribution.projection import RandomProjection
from engine.config import COMPUTE, PRESETS, AttributionConfig, ComputeConfig

N = 20  # more rows than the stored bank's sub-batch (16), fewer than its chunk (128): one chunk, two sub-batches


def _one_row() -> ComputeConfig:
    """A budget that forces batches of one row."""
    return ComputeConfig(gradient_batch_bytes=1)


def test_the_batch_is_the_largest_that_fits_the_budget_and_digits_and_mnist_keep_theirs():
    from engine.attribution.gradients import budget_batch

    assert COMPUTE.gradient_batch_bytes == 1 << 30
    assert budget_batch(32, 1000, 1 << 30) == 32  # fits: the batch as before
    assert budget_batch(32, 35_717_891, 1 << 30) == 7  # CIFAR size: 7 x 143 MB under 1 GiB
    assert budget_batch(16, 35_717_891, 1 << 30) == 7
    assert budget_batch(32, 1000, 1) == 1  # never 0
    assert budget_batch(32, 1000, 4000 * 3 + 5) == 3
    from engine.model.unet import build_model

    for name in ("digits", "mnist"):  # the presets' own models keep TRAK's 32 and the bank's 16
        model = build_model(PRESETS[name].model)
        p = sum(q.numel() for q in model.parameters())
        assert budget_batch(32, p, COMPUTE.gradient_batch_bytes) == 32, (name, p)


def _spy_rows(monkeypatch, owner, attr: str) -> list[int]:
    """Rows of every call of ``owner.attr`` (its first tensor argument's leading dimension)."""
    seen: list[int] = []
    real = getattr(owner, attr)

    def spy(self, x, *args, **kwargs):
        seen.append(int(x.shape[0]) if x.dim() > 1 else 1)
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(owner, attr, spy)
    return seen


def _build(root, tiny_preset, tiny_model, data, cfg, compute, names):
    ctx = _kfac_ctx(root, tiny_preset.replace(compute=compute), tiny_model, data, cfg)
    methods = {"kfac": KFACInfluence(cfg), "trak": TRAK(cfg), "dtrak": DTRAK(cfg)}
    methods = {k: v for k, v in methods.items() if k in names}
    MethodCaches(methods, ctx, lambda names: "build").share_gradient_passes(list(methods))
    for m in methods.values():
        m.build(ctx)
    return ctx, methods


def test_traks_own_build_takes_the_budgets_batch_and_the_same_features(
        tmp_path, tiny_preset, tiny_model, digits_small, monkeypatch):
    cfg = AttributionConfig(mc_samples=2, seed=0, trak_dim=16)
    data = digits_small.subset(list(range(N)))
    projected = _spy_rows(monkeypatch, RandomProjection, "project")
    ref_ctx, ref = _build(tmp_path / "ref", tiny_preset, tiny_model, data, cfg, COMPUTE, ("trak", "dtrak"))
    assert ref["trak"].gradient_batch(ref_ctx) == 32 and max(projected) == N  # the tiny model: as before
    projected.clear()
    ctx, got = _build(tmp_path / "one", tiny_preset, tiny_model, data, cfg, _one_row(), ("trak", "dtrak"))
    assert got["trak"].gradient_batch(ctx) == 1 and got["dtrak"].gradient_batch(ctx) == 1
    assert projected and max(projected) == 1  # one gradient row at a time
    want, have = _arrays_bytes(tmp_path / "ref"), _arrays_bytes(tmp_path / "one")
    assert want.keys() == have.keys() and any("dtrak" in k for k in want)
    for k in want:
        assert want[k] == have[k], k  # bit-identical features, eigenbasis and rotated rows


def test_the_shared_pass_holds_one_sub_batch_and_writes_the_same_bank_and_features(
        tmp_path, tiny_preset, tiny_model, digits_small, monkeypatch):
    """The stored bank's pass (feeding TRAK's and D-TRAK's sinks) rotates and quantises each sub-batch, never the
    chunk: at most 16 rows by default, 1 under a 1-byte budget, and its parts are the bytes of the whole chunk
    rotated and quantised at once (the former pass)."""
    cfg = AttributionConfig(mc_samples=2, seed=0, trak_dim=16, kfac_bank="stored")
    data = digits_small.subset(list(range(N)))
    rotated = _spy_rows(monkeypatch, KFACFactors, "rotate")
    ref_ctx, ref = _build(tmp_path / "ref", tiny_preset, tiny_model, data, cfg, COMPUTE, ("kfac", "trak", "dtrak"))
    assert rotated and max(rotated) == 16  # the bank's sub-batch, not the chunk of N = 20
    rotated.clear()
    _build(tmp_path / "one", tiny_preset, tiny_model, data, cfg, _one_row(), ("kfac", "trak", "dtrak"))
    assert rotated and max(rotated) == 1
    want, have = _arrays_bytes(tmp_path / "ref"), _arrays_bytes(tmp_path / "one")
    assert want.keys() == have.keys() and any("kfac-bank" in k for k in want) and any("dtrak" in k for k in want)
    for k in want:
        assert want[k] == have[k], k

    # the bank's rows are the former whole-chunk rotation's, quantised, byte for byte
    from engine.attribution.bank import SCALES, block_key, quantize_blocks, whitening

    kfac = ref["kfac"]
    factors = kfac.factors
    grads = per_example_grads(ref_ctx.model, ref_ctx.diffusion, data.images, ref_ctx.train_draws.for_rows(slice(0, N)), "loss",
                              ref_ctx.params)
    weights = None if kfac.bank_whiten() is None else whitening(factors.eigenvalues(), factors.blocks,
                                                                  float(kfac.bank_whiten()))
    blocks, scales = quantize_blocks(factors.rotate(grads), factors.blocks, weights)
    bank = {k.rsplit("/", 1)[1]: v for k, v in want.items() if "/kfac-bank-" in k}
    assert bank, sorted(want)
    for j, b in enumerate(blocks):
        assert _npy(bank[f"{block_key(j)}.npy"]).tobytes() == b.numpy().tobytes(), j
    assert _npy(bank[f"{SCALES}.npy"]).tobytes() == scales.numpy().tobytes()
    assert num_params(ref_ctx.params) == sum(blk.size for blk in factors.blocks)


def _npy(raw: bytes) -> np.ndarray:
    import io

    return np.load(io.BytesIO(raw))


def test_the_srht_projection_pads_a_bounded_number_of_rows_with_the_same_features(monkeypatch):
    p, k = 3000, 16
    proj = RandomProjection(p, k, seed=3, kind="srht")
    g = torch.randn(9, p, generator=torch.Generator().manual_seed(0))
    want = proj.project(g, build=True)
    assert projection.srht_chunk_rows(proj.padded) == 64  # small models: 64 rows at a time, as before
    assert projection.srht_chunk_rows(1 << 26) == 1  # CIFAR size: one padded 2^26 row (256 MiB) at a time
    padded_rows: list[int] = []
    real_zeros = torch.zeros

    def zeros(*shape, **kw):
        out = real_zeros(*shape, **kw)
        if out.dim() == 2 and out.shape[1] == proj.padded:
            padded_rows.append(int(out.shape[0]))
        return out

    monkeypatch.setattr(projection, "SRHT_CHUNK_BYTES", 2 * 4 * proj.padded)  # two padded rows
    monkeypatch.setattr(torch, "zeros", zeros)
    got = proj.project(g, build=True)
    monkeypatch.setattr(torch, "zeros", real_zeros)
    assert padded_rows == [2, 2, 2, 2, 1]
    assert torch.equal(got, want)
    # a build's features do not depend on the batch they came in, down to one row
    assert torch.equal(torch.cat([proj.project(g[i : i + 1], build=True) for i in range(9)]), want)


def test_the_banks_part_is_written_to_memory_mapped_scratch_files_removed_at_the_end(
        tmp_path, tiny_preset, tiny_model, digits_small, monkeypatch):
    """The int8 part (chunk_size x P bytes, 4.6 GB for 128 CIFAR-size rows) is not held in RAM: its arrays are
    memory-mapped files in a scratch folder next to the cache while the part is built and saved, and the folder
    is gone once the bank is published (its rows byte-identical: the test above)."""
    from engine.attribution.partial_build import PartialBuild

    seen: list[int] = []
    real = PartialBuild.save_part

    def save_part(self, i, arrays):
        if self.name.startswith("kfac-bank"):
            files = list(tmp_path.rglob(".rows-kfac-bank-*-rank0/*.npy"))
            seen.append(sum(f.stat().st_size for f in files))
            assert {f.stem for f in files} == set(arrays)  # every array of the part, memory-mapped
        return real(self, i, arrays)

    monkeypatch.setattr(PartialBuild, "save_part", save_part)
    cfg = AttributionConfig(mc_samples=2, seed=0, kfac_bank="stored")
    ctx, methods = _build(tmp_path, tiny_preset, tiny_model, digits_small.subset(list(range(N))), cfg, COMPUTE,
                          ("kfac",))
    assert len(seen) == 1 and seen[0] > N * num_params(ctx.params)  # the int8 rows (and scales) of the part
    assert not list(tmp_path.rglob(".rows-*"))
