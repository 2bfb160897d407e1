"""The speed and memory settings (``engine.config.ComputeConfig``, a preset's ``compute`` section): every value
reaches the code that reads it, none changes an answer, none enters a key, and a bad one is refused in one line
naming its key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.attribution.context import make_context
from engine.attribution.methods import make_method
from engine.attribution.methods.kfac_influence import KFACInfluence
from engine.attribution.query import QueryInput
from engine.attribution.scoring import DenseRows, choose_grid
from engine.config import COMPUTE, PRESETS, AttributionConfig, ComputeConfig, Preset, get_preset
from engine.model.diffusion import make_draws
from engine.model.measurements import Measurement
from engine.validation import InvalidSettingError

# every knob far from its default: no grid fits, nothing is packed, few-KiB scan chunks, tiny batches
SMALL = ComputeConfig(query_grad_batch=3, scan_chunk_bytes_cpu=4096, scan_chunk_bytes_gpu=4096, pack_max_bytes=0,
                      grid_max_bytes=1, hook_rows=2, pixel_chunk_rows=7, min_rows_per_worker=1,
                      streamed_grad_batch=5, streamed_grid_max_bytes=1, gradient_batch_bytes=1,
                      factor_batch_bytes=1)


def test_every_field_is_a_checked_whole_number():
    # the module constants these replaced, unchanged
    assert dataclasses.asdict(COMPUTE) == {
        "query_grad_batch": 16, "scan_chunk_bytes_cpu": 4 << 20, "scan_chunk_bytes_gpu": 256 << 20,
        "pack_max_bytes": 2 << 30, "grid_max_bytes": 256 << 20, "hook_rows": 128, "pixel_chunk_rows": 4096,
        "min_rows_per_worker": 16, "streamed_grad_batch": 16, "streamed_grid_max_bytes": 4 << 30,
        "gradient_batch_bytes": 1 << 30, "factor_batch_bytes": 2 << 30,
    }
    for f in dataclasses.fields(ComputeConfig):
        bad = (-1, 1.5, True, "8") if f.name == "pack_max_bytes" else (0, -1, 1.5, True, "8")
        for value in bad:
            with pytest.raises(InvalidSettingError, match=rf"^compute\.{f.name} must be a whole number, at least"):
                ComputeConfig(**{f.name: value})
    assert ComputeConfig(pack_max_bytes=0).pack_max_bytes == 0  # never pack


def _write(tmp_path: Path, obj) -> str:
    path = tmp_path / f"p{len(list(tmp_path.glob('p*.json')))}.json"
    path.write_text(json.dumps(obj))
    return str(path)


def test_a_preset_file_sets_the_section_and_a_bad_value_fails_in_one_line_naming_the_key(tmp_path, capsys):
    preset = get_preset(_write(tmp_path, {"base": "digits", "compute": {"hook_rows": 5}}))
    assert preset.compute == ComputeConfig(hook_rows=5)  # the rest are the defaults
    assert preset.to_dict() == PRESETS["digits"].to_dict()  # the experiment is digits'
    assert get_preset(_write(tmp_path, {"base": "digits"})).compute == COMPUTE  # the section is optional
    # a preset file round-trips its compute section (to_json), the experiment's dict leaves it out (to_dict)
    assert get_preset(_write(tmp_path, json.loads(preset.to_json()))) == preset
    cases = [
        ({"hook_rows": 0}, "compute.hook_rows must be a whole number, at least 1, got 0"),
        ({"pack_max_bytes": -1}, "compute.pack_max_bytes must be a whole number, at least 0 (0: never pack), got -1"),
        ({"grid_max_bytes": "1 GiB"}, "compute.grid_max_bytes must be an integer, got '1 GiB'"),
        ({"hook_rowz": 3}, "unknown key(s) compute.hook_rowz; valid keys of compute: query_grad_batch"),
    ]
    for section, words in cases:
        path = _write(tmp_path, {"base": "digits", "compute": section})
        with pytest.raises(InvalidSettingError) as e:
            get_preset(path)
        assert str(e.value).startswith(f"preset file {path}: {words}") and "\n" not in str(e.value)
    path = _write(tmp_path, {"base": "digits", "compute": [1]})
    with pytest.raises(InvalidSettingError, match="preset section 'compute' must be a JSON object"):
        get_preset(path)
    # the CLI: one line, exit status 2, before any model is loaded
    from engine.cli import main

    path = _write(tmp_path, {"base": "digits", "compute": {"query_grad_batch": 0}})
    assert main(["query", "--preset", path, "--query", "gallery:0", "--cache-root", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: preset file {path}: compute.query_grad_batch must be a whole number, at least 1, got 0"


def test_the_compute_section_enters_no_key(tmp_path, tiny_preset, tiny_model, digits_small):
    """Not the checkpoint's hash (its config.json records ``to_dict``, the experiment), not a method's cache
    keys: a preset that differs only in how fast it runs names the same checkpoint and the same caches."""
    from engine.model.checkpoint import checkpoint_hash, save_checkpoint

    fast = tiny_preset.replace(compute=SMALL)
    assert fast != tiny_preset and fast.to_dict() == tiny_preset.to_dict()
    assert "compute" not in tiny_preset.to_dict()
    a = save_checkpoint(tmp_path / "a", tiny_model, tiny_preset)
    b = save_checkpoint(tmp_path / "b", tiny_model, fast)
    assert checkpoint_hash(a) == checkpoint_hash(b)
    digits_fast = get_preset(_write(tmp_path, {"base": "digits", "compute": dataclasses.asdict(SMALL)}))
    assert digits_fast.compute == SMALL and digits_fast.to_dict() == PRESETS["digits"].to_dict()

    ds = digits_small.subset(list(range(12)))
    cfg = AttributionConfig(mc_samples=2)
    base = make_context(tiny_preset, tiny_model, ds, "cpu", cfg, "k" * 16, None)
    other = make_context(fast, tiny_model, ds, "cpu", cfg, "k" * 16, None)
    assert other.compute is SMALL and base.compute == COMPUTE
    for name, config in [("kfac", cfg), ("kfac", dataclasses.replace(cfg, kfac_bank="compressed")),
                         ("kfac", dataclasses.replace(cfg, kfac_bank="streamed")), ("trak", cfg), ("dtrak", cfg),
                         ("pixel", cfg)]:
        keys = make_method(name, config).cache_keys(dataclasses.replace(base, config=config))
        assert keys == make_method(name, config).cache_keys(dataclasses.replace(other, config=config)), name


def _contexts(tiny_preset, tiny_model, digits_small, n=16, **cfg):
    ds = digits_small.subset(list(range(n)))
    config = AttributionConfig(mc_samples=4, seed=0, **cfg)
    base = make_context(tiny_preset, tiny_model, ds, "cpu", config, "h" * 16, None)
    small = make_context(tiny_preset.replace(compute=SMALL), tiny_model, ds, "cpu", config, "h" * 16, None)
    return base, small


def _query(ctx, i=5):
    from engine.attribution.gradients import measurement_grad

    q = QueryInput(image=ctx.dataset.images[i])
    g = measurement_grad(ctx.model, ctx.diffusion, Measurement("loss"), q, make_draws(4, (1, 8, 8), 1000, seed=1),
                         ctx.dataset.levels, params=ctx.params)
    return q, g


class _Rows:
    """A bank block that records how many rows each read of it takes (the torch scan's chunks)."""

    def __init__(self, t: torch.Tensor, seen: list[int]):
        self.t, self.seen, self.dtype, self.device = t, seen, t.dtype, t.device

    def is_contiguous(self) -> bool:
        return True

    def __getitem__(self, rows: slice) -> torch.Tensor:
        out = self.t[rows]
        self.seen.append(int(out.shape[0]))
        return out


def test_the_stored_bank_scans_with_the_context_settings_and_the_same_scores(
        tiny_preset, tiny_model, digits_small, monkeypatch):
    from engine.attribution import int8_scan

    base, small = _contexts(tiny_preset, tiny_model, digits_small)
    m_base, m_small = KFACInfluence(base.config), KFACInfluence(small.config)
    m_base.build(base)
    m_small.build(small)
    bank = m_small.bank
    assert bank.compute is SMALL and bank.grid_max_bytes == 1 and m_base.bank.grid_max_bytes == COMPUTE.grid_max_bytes
    p = sum(blk.size for blk in bank.blocks)
    assert choose_grid(bank, p) is None and choose_grid(m_base.bank, p) is not None  # no grid fits 1 byte
    if int8_scan.available():
        assert bank._packed is None and m_base.bank._packed is not None  # pack_max_bytes 0: never packed
    q, g = _query(base)
    prep_base, prep_small = m_base.prepare(base, q, g), m_small.prepare(small, q, g)
    for lam in (1e-8, 1e-4, 1.0, 3.3e-2):  # the first answer, then grid lookups / interpolations or exact passes
        want = m_base.score(prep_base, lam)
        np.testing.assert_allclose(m_small.score(prep_small, lam), want, rtol=2e-4, atol=1e-4 * np.abs(want).max())
    # the torch scan (no numba) converts scan_chunk_bytes_cpu at a time: a few KiB, not 4 MiB
    monkeypatch.setenv("ATTRIBUTION_INT8_KERNEL", "torch")
    seen: list[list[int]] = [[] for _ in bank.data]
    rows_q = torch.randn(p, generator=torch.Generator().manual_seed(0))
    # against the small bank's own rows: its factors came from 1-row factor batches (factor_batch_bytes 1), equal
    # to the default's to float rounding, but a near-degenerate eigenpair's rotated coordinates differ more than that
    want = torch.stack([bank.row(i).to(rows_q.dtype) @ rows_q for i in range(bank.num_examples)])
    bank.data = [_Rows(d, got) for d, got in zip(bank.data, seen, strict=True)]
    torch.testing.assert_close(bank.inner(rows_q), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    n = bank.num_examples
    assert [max(got) for got in seen] == [min(n, max(1, 4096 // (4 * blk.size))) for blk in bank.blocks]
    assert min(max(got) for got in seen) < n  # some block is read in several chunks
    # TRAK's dense rows take the budget they are given (the default otherwise)
    assert DenseRows(torch.zeros(3, 4)).grid_max_bytes == COMPUTE.grid_max_bytes
    assert DenseRows(torch.zeros(3, 4), grid_max_bytes=1).grid_max_bytes == 1


def test_the_compressed_bank_batches_its_hooks_pass_by_hook_rows(tiny_preset, tiny_model, digits_small, monkeypatch):
    import engine.attribution.methods.kfac_compressed_bank as kcb

    calls: list[dict] = []
    real = kcb.build_compressed_bank

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(kcb, "build_compressed_bank", spy)
    base, small = _contexts(tiny_preset, tiny_model, digits_small, n=12, kfac_bank="compressed",
                            kfac_projection="gaussian", kfac_compression=16.0, kfac_rerank=0)
    m_base, m_small = KFACInfluence(base.config), KFACInfluence(small.config)
    m_base.build(base)
    m_small.build(small)
    assert [c["grad_batch"] for c in calls] == [128 // 4, 1]  # hook_rows // M: 128 // 4, max(1, 2 // 4)
    assert calls[1]["compute"] is SMALL and m_small.bank.grid_max_bytes == 1
    q, g = _query(base)
    want = m_base.score(m_base.prepare(base, q, g), 1e-3)
    got = m_small.score(m_small.prepare(small, q, g), 1e-3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_query_gradients_pixel_chunks_and_row_workers_follow_the_settings(
        tiny_preset, tiny_model, digits_small, monkeypatch):
    from types import SimpleNamespace

    import engine.attribution.gradients as gradients
    import engine.attribution.methods.pixel_cosine as pc
    from engine.attribution.pool import query_gradients

    base, small = _contexts(tiny_preset, tiny_model, digits_small)
    # a query set's gradients: query_grad_batch images per per_example_grads call
    sizes: list[int] = []
    real = gradients.per_example_grads

    def spy(model, diffusion, x, *args, **kwargs):
        sizes.append(int(x.shape[0]))
        return real(model, diffusion, x, *args, **kwargs)

    monkeypatch.setattr(gradients, "per_example_grads", spy)
    queries = [QueryInput(image=img) for img in digits_small.images[20:27]]
    draws = make_draws(4, (1, 8, 8), 1000, seed=1)
    got = {}
    for name, ctx in (("base", base), ("small", small)):
        session = SimpleNamespace(ctx=ctx, model=ctx.model, diffusion=ctx.diffusion)
        got[name] = query_gradients(session, queries, Measurement("loss"), draws)
    assert sizes == [7, 3, 3, 1]
    torch.testing.assert_close(got["small"], got["base"], rtol=1e-5, atol=1e-7)

    # pixel similarity: pixel_chunk_rows rows at a time, the same float32 scores
    chunks: list[int] = []
    real_cosines = pc.cosines
    monkeypatch.setattr(pc, "cosines", lambda t, q, rows: chunks.append(rows) or real_cosines(t, q, rows))
    q = QueryInput(image=digits_small.images[40])
    pixel = [make_method("pixel").score(make_method("pixel").prepare(c, q, None)) for c in (base, small)]
    assert chunks == [COMPUTE.pixel_chunk_rows, 7]
    np.testing.assert_array_equal(pixel[1], pixel[0])

    # one query's shared forward pass: at least min_rows_per_worker (t, eps) rows per worker thread
    parts: list[int] = []
    real_map = gradients.map_ordered
    monkeypatch.setattr(gradients, "gradient_workers", lambda dev: 4)
    monkeypatch.setattr(gradients, "map_ordered", lambda fn, items, n: parts.append(len(items)) or real_map(fn, items, 1))
    specs = [Measurement("loss"), Measurement("square-norm")]
    eight = make_draws(8, (1, 8, 8), 1000, seed=2)
    one = gradients.shared_forward_grads(base.model, base.diffusion, digits_small.images[3], eight, specs, base.params)
    four = gradients.shared_forward_grads(base.model, base.diffusion, digits_small.images[3], eight, specs, base.params,
                                          min_rows_per_worker=small.compute.min_rows_per_worker)
    assert parts == [1, 4]  # 8 rows: under 2 x 16 stay on one thread; at least 1 per worker: 4 workers
    for s in specs:
        torch.testing.assert_close(four[s], one[s], rtol=1e-5, atol=1e-7)


def test_preset_replace_and_equality_carry_the_section():
    p = Preset(name="x")
    assert p.compute == COMPUTE
    q = p.replace(compute={"hook_rows": 64})
    assert q.compute.hook_rows == 64 and q.attribution == p.attribution and q != p


def test_the_streamed_bank_batches_and_budgets_by_its_settings(tiny_preset, tiny_model, digits_small):
    """The streamed bank (no bank on disk) takes its gradient batch and grid budget from ``ComputeConfig``
    (were a constructor default and a class constant) and answers as with the defaults."""
    base, small = _contexts(tiny_preset, tiny_model, digits_small, kfac_bank="streamed")
    m_base, m_small = KFACInfluence(base.config), KFACInfluence(small.config)
    m_base.build(base)
    m_small.build(small)
    assert (m_small.bank.grad_batch, m_small.bank.grid_max_bytes) == (5, 1)
    assert (m_base.bank.grad_batch, m_base.bank.grid_max_bytes) == (16, 4 << 30)
    q, g = _query(base)
    prep_base, prep_small = m_base.prepare(base, q, g), m_small.prepare(small, q, g)
    want = m_base.score(prep_base, 1e-4)
    np.testing.assert_allclose(m_small.score(prep_small, 1e-4), want, rtol=2e-4, atol=1e-5 * np.abs(want).max())
