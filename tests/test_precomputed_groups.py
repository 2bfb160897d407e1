"""``PrecomputedGallery.gallery_matrix``: the group views' matrices from the shipped file, and only where
its column holds eq. 6's scores (a compressed bank's column holds estimates)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from engine.attribution.precomputed import PrecomputedGallery


def _file(bank: str) -> tuple[PrecomputedGallery, SimpleNamespace]:
    pre = PrecomputedGallery.__new__(PrecomputedGallery)
    scores = np.array([[0.5, -1.0, 0.25], [1.0, 0.5, -0.5]], np.float16)
    pre.arrays = {"scores_kfac": scores, "scale_kfac": np.array([2.0, 4.0], np.float32)}
    pre.key = {"methods": {"kfac": {"settings": {"bank": bank}, "damping": 1e-8}}}
    pre.rows = {0: 0, 1: 1}
    session = SimpleNamespace(gallery=lambda: [0, 1])
    pre._matching = {id(session): ["kfac"]}
    return pre, session


def test_the_matrix_stacks_every_gallery_sample_at_its_scale():
    pre, session = _file("stored")
    mat = pre.gallery_matrix(session, "kfac")
    assert mat.shape == (2, 3) and mat.dtype == np.float32
    assert np.array_equal(mat, [[1.0, -2.0, 0.5], [4.0, 2.0, -2.0]])
    assert pre.gallery_matrix(session, "trak") is None  # not in the file for this session


def test_a_compressed_banks_estimates_are_no_group_answer():
    """Review: a file precomputed with a compressed bank would have had its estimated scores summed as exact."""
    pre, session = _file("compressed")
    assert pre.gallery_matrix(session, "kfac") is None
    pre, session = _file("no-such-kind")
    assert pre.gallery_matrix(session, "kfac") is None
