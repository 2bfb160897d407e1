"""Two methods that read one stored artefact (QA round 19, #12).

A contributor's ``gradcos`` and ``graddot`` both scored one stored set of gradient features.  The build
table's total added that folder once per method (28.08 MB for one 14.04 MB folder), the app's cache
table gave no hint, and each method's build took a lock named after the method, so two processes
building the two methods at once both computed the one artefact.  Locks are now per artefact, the total
counts each artefact once, and the status says which methods share a cache.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from distance_methods import PixelDistance
from test_resume import _kfac_ctx

from engine.attribution.caches import MethodCaches
from engine.config import AttributionConfig

ARTEFACT = ("pixelnorms", {"version": 1})
BUILD_SECONDS = 0.6


class StoredNorms(PixelDistance):
    """A method whose build stores every image's squared norm (one artefact, read by both subclasses)."""

    builds: list[str] = []

    def cache_keys(self, ctx):
        return [ARTEFACT]

    def is_built(self, ctx) -> bool:
        return ctx.store.exists(*ARTEFACT)

    def build(self, ctx, progress=None) -> None:
        if self.is_built(ctx):
            return
        StoredNorms.builds.append(self.name)
        time.sleep(BUILD_SECONDS)  # long enough for the other builder to ask for the lock meanwhile
        norms = (ctx.dataset.images.flatten(1) ** 2).sum(1).numpy()
        ctx.store.save_arrays(*ARTEFACT, {"norms": np.tile(norms[:, None], (1, 4096)).astype(np.float32)})


class NormsA(StoredNorms):
    name = "normsa"


class NormsB(StoredNorms):
    name = "normsb"


def _caches(tmp_path, tiny_preset, tiny_model, digits_small) -> MethodCaches:
    ctx = _kfac_ctx(tmp_path, tiny_preset, tiny_model, digits_small.subset(list(range(8))), AttributionConfig())
    methods = {"normsa": NormsA(), "normsb": NormsB(), "distance": PixelDistance()}
    return MethodCaches(methods, ctx, lambda names: "build")


def test_two_builders_of_one_artefact_wait_for_each_other(tmp_path, tiny_preset, tiny_model, digits_small):
    """Two builds (as two processes: each lock is its own open file) of two methods over one artefact:
    the second waits and loads; on the per-method locks both computed it."""
    StoredNorms.builds = []
    first = _caches(tmp_path, tiny_preset, tiny_model, digits_small)
    second = _caches(tmp_path, tiny_preset, tiny_model, digits_small)
    out: dict[str, dict] = {}
    a = threading.Thread(target=lambda: out.update(first.build(["normsa"])))
    a.start()
    time.sleep(0.2)
    out.update(second.build(["normsb"]))
    a.join()
    assert StoredNorms.builds == ["normsa"]
    assert out["normsb"]["waited"] > 0.1 and out["normsb"]["was_built"]


def test_a_shared_artefact_is_counted_once_and_named(tmp_path, tiny_preset, tiny_model, digits_small):
    caches = _caches(tmp_path, tiny_preset, tiny_model, digits_small)
    caches.build(["normsa", "normsb", "distance"])
    one = caches.ctx.store.size_mb(*ARTEFACT)
    assert one > 0.1
    status = caches.status()
    assert status["normsa"]["size_mb"] == status["normsb"]["size_mb"] == one  # each row: the whole artefact
    assert status["normsa"]["shares_cache_with"] == ["normsb"]
    assert status["normsb"]["shares_cache_with"] == ["normsa"]
    assert status["distance"]["shares_cache_with"] == []
    assert caches.total_size_mb(["normsa", "normsb", "distance"]) == one
