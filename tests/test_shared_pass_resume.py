"""A kill in K-FAC's shared gradient pass costs TRAK and D-TRAK no pass of their own (QA 45 #2, #9).

K-FAC's bank pass also fills TRAK's and D-TRAK's projections (``FeatureSink``).  The bank saves parts of
``chunk_size`` rows, the sinks parts of ``part_size`` rows.  A kill after the bank's first part and before the
sinks' first one left the bank with rows 0-127 and the sinks with nothing; the restart resumed the pass at row 128,
so TRAK and D-TRAK each made a whole gradient pass of their own afterwards, at a bar that read 99-100% with no rows
and no time left.  The resumed pass now starts at the first row any of its builds needs (``bank_build.Refeed``),
and a pass of TRAK's own reports its rows every batch.  Small scale here: chunks of 4 rows, sink parts of 8.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_resume import _arrays_bytes, _kfac, _kfac_ctx

import engine.attribution.bank_build as bank_build
import engine.attribution.gradients as gradients
from engine.attribution.caches import MethodCaches
from engine.attribution.methods.trak import DTRAK, TRAK
from engine.attribution.partial_build import PartialBuild
from engine.config import AttributionConfig

N = 10  # rows: bank chunks 0-3, 4-7, 8-9; sink parts 0-7, 8-9


class _Kill(BaseException):
    pass


def _methods(cfg: AttributionConfig) -> dict[str, object]:
    trak, dtrak = TRAK(cfg), DTRAK(cfg)
    trak.part_size = dtrak.part_size = 8  # larger than the bank's chunks (4), as TRAK's 256 against K-FAC's 128
    return {"kfac": _kfac(cfg), "trak": trak, "dtrak": dtrak}


def _build_all(root: Path, tiny_preset, tiny_model, data, cfg, progress=None):
    """The app's build: one shared pass set up for all three, then each method built in turn."""
    ctx = _kfac_ctx(root, tiny_preset, tiny_model, data, cfg)
    methods = _methods(cfg)
    caches = MethodCaches(methods, ctx, lambda names: "build")
    feeds = caches.share_gradient_passes(list(methods))
    for name, m in methods.items():
        m.build(ctx, (lambda msg, f, name=name: progress(name, msg, f)) if progress else lambda msg, f: None)
    return ctx, feeds


def test_a_kill_between_the_banks_part_and_the_sinks_part_costs_no_pass_of_their_own(
        tmp_path, tiny_preset, tiny_model, digits_small, monkeypatch):
    cfg = AttributionConfig(mc_samples=2, seed=0, trak_dim=16)
    data = digits_small.subset(list(range(N)))
    _build_all(tmp_path / "ref", tiny_preset, tiny_model, data, cfg)  # uninterrupted

    def kill_in_second_chunk(name: str, msg: str, f: float) -> None:
        if name == "kfac" and "train gradients 8/10" in msg:  # chunk 0 saved, the sinks' part 0 not yet
            raise _Kill

    with pytest.raises(_Kill):
        _build_all(tmp_path / "cut", tiny_preset, tiny_model, data, cfg, kill_in_second_chunk)
    partial = {p.name.split("-")[1]: p for p in (tmp_path / "cut").rglob(".partial-*")}
    assert sorted(x.name for x in partial["kfac"].glob("part-*.done")) == ["part-00000.done"]
    assert not list(partial["trak"].glob("part-*.done")) and not list(partial["dtrak"].glob("part-*.done"))

    # count the gradients computed: the shared pass's rows, and any pass of TRAK's or D-TRAK's own
    pass_rows: list[int] = []
    real_by_loss = bank_build.per_example_grads_by_loss

    def counting_by_loss(model, diffusion, x0, *a, **k):
        pass_rows.append(x0.shape[0])
        return real_by_loss(model, diffusion, x0, *a, **k)

    own_passes: list[int] = []
    real_train = gradients.train_loss_grads

    def counting_train(ctx_, diffusion_, images, *a, **k):
        own_passes.append(images.shape[0])
        return real_train(ctx_, diffusion_, images, *a, **k)

    saved: list[tuple[str, int]] = []
    real_save = PartialBuild.save_part

    def recording_save(self, i, arrays):
        saved.append((self.name, i))
        return real_save(self, i, arrays)

    monkeypatch.setattr(bank_build, "per_example_grads_by_loss", counting_by_loss)
    monkeypatch.setattr(gradients, "train_loss_grads", counting_train)
    monkeypatch.setattr(PartialBuild, "save_part", recording_save)
    msgs: list[tuple[str, str, float]] = []
    _, feeds = _build_all(tmp_path / "cut", tiny_preset, tiny_model, data, cfg,
                          lambda name, msg, f: msgs.append((name, msg, f)))

    assert feeds == {"kfac": ["trak", "dtrak"]}
    assert own_passes == [], own_passes  # no separate TRAK / D-TRAK pass
    assert sum(pass_rows) == N  # one pass over every row: the bank's saved rows again for the sinks, once
    assert ("kfac-bank", 0) not in saved  # the bank's saved part is not rewritten
    assert sorted(i for name, i in saved if name == "trak") == [0, 1]
    kfac = [(m, f) for name, m, f in msgs if name == "kfac"]
    resumed = next(m for m, _ in kfac if "resuming" in m)
    assert "resuming: 4/10 examples saved by an earlier run (4 of them computed again for trak, dtrak)" in resumed
    fractions = [f for _, f in kfac]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0  # the bar never steps back
    # the saved rows computed again say so (QA 46 #4: "train gradients 2/10" after "4/10 saved" read as a loss)
    rows = [m.split("train gradients ", 1)[1] for m, _ in kfac if "train gradients" in m]
    assert all(r.endswith("(saved; again for the projections)") for r in rows if int(r.split("/")[0]) <= 4), rows
    assert not any("again" in r for r in rows if int(r.split("/")[0]) > 4), rows
    assert not any("projected gradients" in m for name, m, _ in msgs if name in ("trak", "dtrak"))

    # the final caches are the uninterrupted build's, byte for byte, under the same keys
    ref, got = _arrays_bytes(tmp_path / "ref"), _arrays_bytes(tmp_path / "cut")
    assert ref.keys() == got.keys() and any("trak" in k for k in ref) and any("dtrak" in k for k in ref)
    for k in ref:
        assert ref[k] == got[k], k
    assert not list((tmp_path / "cut").rglob(".partial-*"))


def test_a_pass_of_traks_own_reports_its_rows_every_batch(tmp_path, tiny_preset, tiny_model, digits_small):
    """QA 45 #2, #9: a pass of TRAK's own said nothing until its first part was saved (a part of 256 was the whole
    200-image set), so the page read "TRAK: starting" and the terminal bar stood still for a minute."""
    cfg = AttributionConfig(mc_samples=2, seed=0, trak_dim=16)
    ctx = _kfac_ctx(tmp_path, tiny_preset, tiny_model, digits_small.subset(list(range(N))), cfg)
    trak = TRAK(cfg)
    trak.part_size, trak.batch_size = 16, 2  # one part holds every row, as TRAK's 256 held QA 45's 200 images
    msgs: list[tuple[str, float]] = []
    trak.build(ctx, lambda msg, f: msgs.append((msg, f)))
    rows = [m for m, _ in msgs if "projected gradients" in m]
    assert rows == [f"TRAK: projected gradients {k}/{N}" for k in range(0, N + 1, 2)]
    fractions = [f for _, f in msgs]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_under_torchrun_the_rows_computed_again_go_to_the_rank_that_owns_their_run(tmp_path, monkeypatch):
    """``Shard.mine`` deals the chunks computed again for the consumers with the ones still to build, in the same
    runs of ``group`` chunks, so a consumer's part gets all its rows on one rank (as on a first run) and each
    rank saves only its own parts.  Ranks simulated one after the other (rank 0, the publisher, last)."""
    import torch

    from engine import distributed
    from engine.attribution.store import Store

    store = Store(tmp_path, "0" * 16, "digits16")
    n, chunk = 16, 4
    bank = store.partial("bank", {"t": 1}, part_size=chunk, num_items=n)
    for i in (0, 1, 2):  # an earlier run saved three chunks; the consumer's parts of 8 rows: none
        bank.save_part(i, {"x": torch.full((chunk, 1), float(i))})
    sink = store.partial("sink", {"t": 1}, part_size=8, num_items=n)
    feeds: dict[int, list[int]] = {}
    computed: dict[int, list[int]] = {}
    for rank in (1, 0):
        monkeypatch.setattr(bank_build.distributed, "current", lambda rank=rank: distributed.Shard(rank, 2))
        monkeypatch.setattr(distributed.Shard, "barrier", lambda self: None)

        def compute(rows: slice, rank: int = rank) -> dict[str, torch.Tensor]:
            computed.setdefault(rank, []).append(rows.start // chunk)
            return {"x": torch.full((rows.stop - rows.start, 1), float(rows.start // chunk))}

        def feed(rows: slice, rank: int = rank) -> None:
            feeds.setdefault(rank, []).append(rows.start // chunk)

        refeed = bank_build.Refeed(
            wanted=lambda rows: not sink.is_done(rows.start // 8), feed=feed, names="sink")
        bank_build.build_in_parts(store, "bank", {"t": 1}, n, chunk, compute, group=2, refeed=refeed)
    assert feeds == {0: [0, 1], 1: [2]} and computed == {1: [3]}
    assert store.load_arrays("bank", {"t": 1})["x"][:, 0].tolist() == [i // chunk for i in range(n)]
