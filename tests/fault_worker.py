"""Subprocess driver of the fault-injection tests (not a test module): build a tiny cache, and
optionally SIGKILL this process at one stage of the build, as a power cut or ``kill -9`` would.

    python tests/fault_worker.py CHECKPOINT CACHE METHODS STAGE

STAGE: ``none`` | ``factor`` (K-FAC factors being computed) | ``bank`` (K-FAC bank gradients) |
``trak`` (TRAK projected gradients) | ``publish`` (arrays written to the ``.tmp-*`` folder, not yet
renamed).  The build uses ``NUM_EXAMPLES`` seeded random images and ``CONFIG`` (seconds per build).
Prints one JSON line {method: status} and exits 0 when every method built.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NUM_EXAMPLES = 32


def config():
    from engine.config import AttributionConfig

    return AttributionConfig(mc_samples=2, trak_dim=16, clip_pretrained=None)


def dataset():
    """32 seeded random 8x8 images on the digits' 17-level grid (no scikit-learn import: subprocesses start faster)."""
    import torch

    from engine.model.data import ImageDataset
    from engine.model.measurements import quantize

    g = torch.Generator().manual_seed(0)
    images = quantize(torch.rand(NUM_EXAMPLES, 1, 8, 8, generator=g) * 2 - 1, 17)
    ids = [f"synthetic/{i}" for i in range(NUM_EXAMPLES)]
    return ImageDataset(name="synthetic", images=images, labels=None, class_names=None, ids=ids, levels=17)


def session(checkpoint: str, cache: str):
    from engine.attribution.session import AttributionSession
    from engine.model.checkpoint import read_config

    preset, _ = read_config(checkpoint)
    return AttributionSession(
        preset, checkpoint=checkpoint, device="cpu", cache_root=cache, config=config(), dataset=dataset()
    )


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> int:
    import torch

    torch.set_num_threads(1)
    checkpoint, cache, methods, stage = argv
    if stage == "publish":
        from engine.attribution import store

        finish = store.Store._finish

        def finish_then_die(self, tmp, final, name, *args, **kwargs):
            if name == "kfac-bank":
                _die()  # the complete arrays are in tmp; the rename never happens
            return finish(self, tmp, final, name, *args, **kwargs)

        store.Store._finish = finish_then_die
    if stage == "trak":
        # TRAK's projected gradients come out of the K-FAC bank's gradient pass (one shared pass,
        # engine.attribution.methods.trak.FeatureSink): die while they are being projected
        from engine.attribution.methods import trak

        consume, calls = trak.FeatureSink.consume, [0]

        def consume_then_die(self, rows, grads):
            consume(self, rows, grads)
            calls[0] += 1
            if calls[0] == 2:
                _die()

        trak.FeatureSink.consume = consume_then_die
    s = session(checkpoint, cache)

    def progress(message: str, fraction: float) -> None:
        if stage == "factor" and "factors" in message and "/" in message:
            _die()
        if stage == "bank" and "train gradients" in message:
            _die()
        if stage == "trak" and message.startswith("trak:") and "projected gradients" in message:
            _die()  # TRAK's own gradient pass, when it has one

    summary = s.build(methods.split(","), progress)
    print(json.dumps({name: v["status"] for name, v in summary.items()}))
    return 0 if all(v["status"] == "ok" for v in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
