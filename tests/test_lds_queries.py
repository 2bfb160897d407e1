"""An LDS run's queries: the checkpoint's gallery first, samples of the full model after it, and a
run asked for more queries later keeps the ones it already measured as its first."""

from __future__ import annotations

import numpy as np
import torch

from engine.evaluation.lds_run import lds_queries
from engine.evaluation.setup import RunSetup
from engine.model.checkpoint import save_checkpoint


def test_queries_start_with_the_gallery_and_extending_keeps_the_saved_ones(
    tmp_path, tiny_preset, tiny_model, digits_small
):
    preset = tiny_preset.replace(diffusion={"num_timesteps": 5})
    folder = save_checkpoint(tmp_path / "ckpt", tiny_model, preset)
    gallery = np.random.default_rng(0).uniform(size=(2, 1, 8, 8)).astype(np.float32)
    np.savez(folder / "gallery.npz", images=gallery)
    setup = RunSetup(preset, folder, digits_small, tmp_path / "lds", tmp_path / "res", "cpu", True)
    setup.out.mkdir()

    three, source = lds_queries(setup, 3)
    assert three.shape == (3, 1, 8, 8)
    assert torch.allclose(three[:2], torch.from_numpy(gallery) * 2 - 1)  # the gallery, in [-1, 1]
    assert not torch.allclose(three[2], three[0]) and "gallery.npz" in source and "seed 2" in source

    five, source5 = lds_queries(setup, 5)
    assert torch.equal(five[:3], three)  # the measured queries stay the first ones
    assert len({tuple(q.flatten().tolist()) for q in five}) == 5 and "seed 3" in source5
    again, _ = lds_queries(setup, 4)  # fewer than saved: the saved prefix, nothing generated
    assert torch.equal(again, five[:4])
