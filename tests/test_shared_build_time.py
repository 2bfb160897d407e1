"""The build time a cache records when one gradient pass fed several methods (QA round 12, F1).

K-FAC's bank pass also fills TRAK's projections (``MethodCaches.share_gradient_passes``).  TRAK's record
counted from the moment its sink was opened, before K-FAC's factor pass: 409.7 s recorded against 4.7 s of
its own, and the bench printed that as TRAK's build time.  A shared pass cannot be split: its seconds
stay in the method that made it, which records whom it fed, and the fed method records whose pass it
was; the bench report says so beside the figure.
"""

from __future__ import annotations

import time

from test_resume import _kfac, _kfac_ctx, _trak

import engine.attribution.methods.kfac_influence as kfac_influence
from engine.attribution.caches import MethodCaches
from engine.bench.report import format_table
from engine.config import AttributionConfig

SLOW = 1.5  # seconds added to K-FAC's factor pass


def test_a_fed_cache_records_its_own_seconds_and_whose_pass_fed_it(tmp_path, tiny_preset, tiny_model,
                                                                    digits_small, monkeypatch):
    real = kfac_influence.compute_kfac

    def slow_factors(*a, **k):
        time.sleep(SLOW)
        return real(*a, **k)

    monkeypatch.setattr(kfac_influence, "compute_kfac", slow_factors)
    cfg = AttributionConfig(mc_samples=2, seed=0, trak_dim=16)
    data = digits_small.subset(list(range(10)))
    ctx = _kfac_ctx(tmp_path, tiny_preset, tiny_model, data, cfg)
    methods = {"kfac": _kfac(cfg), "trak": _trak(cfg)}
    caches = MethodCaches(methods, ctx, lambda names: "build")
    assert caches.share_gradient_passes(["kfac", "trak"]) == {"kfac": ["trak"]}
    t0 = time.perf_counter()
    methods["kfac"].build(ctx)
    kfac_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    methods["trak"].build(ctx)
    trak_wall = time.perf_counter() - t0

    trak_meta = ctx.store.load_meta(*methods["trak"].cache_keys(ctx)[0])
    # its own work after the pass, not K-FAC's factor pass (SLOW) nor the shared pass
    assert trak_meta["build_seconds"] <= trak_wall + 0.05 < SLOW
    assert trak_meta["gradient_pass_shared_with"] == "kfac"
    assert caches.recorded_build_seconds("trak") < SLOW <= caches.recorded_build_seconds("kfac") <= kfac_wall + 0.05
    assert caches.recorded_build_sharing("trak") == {"shared_with": "kfac"}
    assert caches.recorded_build_sharing("kfac") == {"fed": ["trak"]}

    # the bench report (caches reused) says so instead of presenting the figures as each method's own build
    report = {
        "preset": "tiny", "mc_samples": 2, "device": "cpu", "threads": 1, "cache": "reused",
        "methods": ["kfac", "trak"],
        "build": {"methods": {
            name: {"status": "ok", "cold": False, "size_mb": 1.0,
                   "recorded_build_seconds": caches.recorded_build_seconds(name),
                   "recorded_build_sharing": caches.recorded_build_sharing(name)}
            for name in ("kfac", "trak")
        }},
    }
    table = format_table(report)
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.split()[:1] in (["kfac"], ["trak"])}
    assert rows["trak"][1] == "ok*+" and rows["kfac"][1] == "ok*+", table
    assert ("+ trak: built from kfac's shared gradient pass; its build time is only what trak did after that "
            "pass (the pass is in kfac's time)") in table
    assert "+ kfac: its gradient pass also filled trak; its build time includes their share" in table


def test_a_method_built_alone_records_no_sharing(tmp_path, tiny_preset, tiny_model, digits_small):
    cfg = AttributionConfig(mc_samples=2, seed=0, trak_dim=16)
    ctx = _kfac_ctx(tmp_path, tiny_preset, tiny_model, digits_small.subset(list(range(6))), cfg)
    caches = MethodCaches({"trak": _trak(cfg)}, ctx, lambda names: "build")
    assert caches.share_gradient_passes(["trak"]) == {}
    caches.methods["trak"].build(ctx)
    assert caches.recorded_build_sharing("trak") == {}
    assert "gradient_pass_shared_with" not in ctx.store.load_meta(*caches.methods["trak"].cache_keys(ctx)[0])


def test_the_bank_pass_declares_the_caches_it_fills_to_the_early_disk_check(tmp_path, tiny_preset, tiny_model,
                                                                              digits_small, monkeypatch):
    """The early disk check can only count TRAK's rows with K-FAC's if the bank pass joins their builds."""
    import engine.attribution.partial_build as partial_build

    joined = []
    real = partial_build.PartialBuild.share_disk_with

    def spy(self, others):
        joined.append((self.name, sorted(o.name for o in others)))
        return real(self, others)

    monkeypatch.setattr(partial_build.PartialBuild, "share_disk_with", spy)
    cfg = AttributionConfig(mc_samples=2, seed=0, trak_dim=16)
    ctx = _kfac_ctx(tmp_path, tiny_preset, tiny_model, digits_small.subset(list(range(10))), cfg)
    methods = {"kfac": _kfac(cfg), "trak": _trak(cfg)}
    MethodCaches(methods, ctx, lambda names: "build").share_gradient_passes(["kfac", "trak"])
    methods["kfac"].build(ctx)
    fed = [others for name, others in joined if others]
    assert fed == [["trak"]], joined


def test_a_build_that_only_waited_for_another_process_says_so(tmp_path, tiny_preset, tiny_model, digits_small):
    """QA round 18: `build` run while another process built the same cache waited, then loaded it, and its table
    printed "its gradient pass also filled trak, dtrak" for a pass it never made. The summary now records the
    wait and that the cache was already built, and the table's note says that instead."""
    import threading

    from engine.cli.attribution import build_note

    cfg = AttributionConfig(mc_samples=2, seed=0, trak_dim=16)
    ctx = _kfac_ctx(tmp_path, tiny_preset, tiny_model, digits_small.subset(list(range(6))), cfg)
    caches = MethodCaches({"trak": _trak(cfg)}, ctx, lambda names: "build")
    holding = threading.Event()

    def other_process() -> None:  # another open file description: flock conflicts as between processes
        with caches.build_lock("trak"):
            holding.set()
            _trak(cfg).build(ctx)
            time.sleep(1.0)

    t = threading.Thread(target=other_process)
    t.start()
    assert holding.wait(30)
    summary = caches.build(["trak"])
    t.join()
    s = summary["trak"]
    assert s["status"] == "ok" and s["was_built"] and s["waited"] > 0.3
    note = build_note("trak", s, summary, {}, {"trak": ["dtrak"]}, lambda n, sh: "its gradient pass also filled dtrak")
    assert note.startswith("waited ") and "another process's build of this cache, then loaded it" in note

    again = caches.build(["trak"])["trak"]  # built, no wait: a load
    assert again["was_built"] and again["waited"] == 0.0
    assert build_note("trak", again, {"trak": again}, {}, {}, lambda n, sh: None) == "already built; loaded"
    fresh = {"status": "ok", "waited": 0.0, "was_built": False}  # built here, fed another: the shared words
    assert build_note("kfac", fresh, {"kfac": fresh}, {}, {"kfac": ["trak"]},
                      lambda n, sh: f"fed {sh['fed']}") == "fed ['trak']"
