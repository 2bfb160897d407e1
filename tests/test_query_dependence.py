"""Query dependence (issue 16): overlap, correlation and distinct top-k on constructed scores, the gallery
reader on a real precomputed file, and the script's output."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.evaluation.query_dependence import (
    Dependence,
    DependenceConfig,
    dependence,
    flagged,
    gallery_dependence,
    mean_pairwise_cosine,
)


def test_query_independent_scores_share_one_top_set():
    base = np.random.default_rng(0).normal(size=50)
    scores = np.stack([base * a for a in (1.0, 2.0, 0.5)])  # same ranking, different scale
    d = dependence(scores, top=5)
    assert d.top_overlap == 1.0
    assert d.pearson == pytest.approx(1.0)
    assert d.distinct == 5
    assert d.chance_overlap == pytest.approx(5 / 50)


def test_disjoint_top_sets():
    scores = np.zeros((3, 30))
    for q in range(3):
        scores[q, q * 10 : q * 10 + 5] = 1.0 + np.arange(5)  # query q's top-5 are its own five images
    d = dependence(scores, top=5)
    assert d.top_overlap == 0.0
    assert d.distinct == 15
    assert d.pearson < 0


def test_partial_overlap_is_the_mean_over_pairs():
    # query 0 and 1 share 2 of their top-4, query 2 shares none with either: pairs 0.5, 0, 0 -> 1/6
    scores = np.zeros((3, 20))
    scores[0, [0, 1, 2, 3]] = [4, 3, 2, 1]
    scores[1, [0, 1, 4, 5]] = [4, 3, 2, 1]
    scores[2, [10, 11, 12, 13]] = [4, 3, 2, 1]
    d = dependence(scores, top=4)
    assert d.top_overlap == pytest.approx(1 / 6)
    assert d.distinct == 10


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="two queries"):
        dependence(np.ones((1, 4)), top=2)
    with pytest.raises(ValueError, match="top must be"):
        dependence(np.ones((2, 4)), top=5)


def test_flagged_uses_the_configured_overlap():
    mk = lambda o: Dependence(top=20, queries=32, n_train=1000, top_overlap=o, pearson=0.0, distinct=1)  # noqa: E731
    deps = {"a": mk(0.9), "b": mk(0.49), "c": mk(0.5)}
    assert set(flagged(deps)) == {"a", "c"}
    assert set(flagged(deps, DependenceConfig(flag_overlap=0.95))) == set()


def test_gallery_dependence_reads_a_precomputed_file(tmp_path):
    """On a file in the shipped format: the stored float16 rows times their scales, per method, in index order."""
    from engine.attribution.precomputed import PrecomputedGallery

    rng = np.random.default_rng(1)
    q, n = 4, 60
    same = rng.normal(size=n)
    fixed = np.stack([same] * q)
    varying = rng.normal(size=(q, n))
    scale = np.array([1e-3, 2.0, 5.0, 1e4], np.float32)  # the scale must not matter for the ranking
    key = {"methods": {"fixed": {"damping": None}, "varying": {"damping": None}}}
    path = tmp_path / "pre.npz"
    np.savez(path, indices=np.arange(q, dtype=np.int32), key=np.asarray(json.dumps(key)),
             scores_fixed=(fixed / np.abs(fixed).max(1, keepdims=True)).astype(np.float16), scale_fixed=scale,
             scores_varying=(varying / np.abs(varying).max(1, keepdims=True)).astype(np.float16), scale_varying=scale)
    pg = PrecomputedGallery(path)
    deps = gallery_dependence(pg, top=10)
    assert set(deps) == {"fixed", "varying"}
    assert deps["fixed"].top_overlap == 1.0 and deps["fixed"].queries == q and deps["fixed"].n_train == n
    want = dependence(varying, top=10)
    assert deps["varying"].top_overlap == want.top_overlap and deps["varying"].distinct == want.distinct
    assert set(flagged(deps)) == {"fixed"}
    assert gallery_dependence(pg, ["varying"], top=10).keys() == {"varying"}


@pytest.mark.parametrize("preset", ["digits", "mnist"])
def test_shipped_galleries_flag_no_method(preset):
    """What the app shows on the shipped models: no method is flagged. On mnist D-TRAK's top-20 was
    nearly one fixed list (overlap 0.906) while the query gradient had draws of its own; with the
    bank's draws (the mnist preset since issue 16's common-random-numbers measurement) it varies."""
    from engine.attribution.precomputed import FILE, PrecomputedGallery
    from engine.paths import default_checkpoint

    pg = PrecomputedGallery.load(default_checkpoint(preset) / FILE)
    assert pg is not None
    deps = gallery_dependence(pg)
    assert {"kfac", "trak", "dtrak", "pixel"} <= set(deps)
    assert set(flagged(deps)) == set()


def test_the_script_prints_every_method(load_script, capsys):
    qd = load_script("query_dependence")
    assert qd.main(["--preset", "digits", "--top", "10"]) == 0
    out = capsys.readouterr().out
    assert "32 gallery queries, top-10" in out
    for m in ("kfac", "trak", "dtrak", "pixel"):
        assert f"  {m:6s} top-10 overlap" in out


def test_mean_pairwise_cosine_of_constructed_vectors():
    assert mean_pairwise_cosine(np.eye(3)) == pytest.approx(0.0)  # orthogonal
    v = np.array([1.0, -2.0, 0.5])
    assert mean_pairwise_cosine(np.stack([v, 3 * v, 0.1 * v])) == pytest.approx(1.0)  # one direction, any scale
    # pairs (a, b) = 1/sqrt(2), (a, c) = 0, (b, c) = 1/sqrt(2)
    assert mean_pairwise_cosine(np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])) == pytest.approx(np.sqrt(0.5) * 2 / 3)
    assert mean_pairwise_cosine(np.stack([v, -v])) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="zero vector"):
        mean_pairwise_cosine(np.stack([v, 0 * v]))
    with pytest.raises(ValueError, match="two vectors"):
        mean_pairwise_cosine(v[None])


@pytest.mark.slow
def test_the_script_compares_query_gradients(load_script, capsys):
    """``--gradients K``: the loss's and the square norm's query gradients of K gallery samples."""
    qd = load_script("query_dependence")
    cos = qd.query_gradient_cosines("digits", None, 3)
    assert set(cos) == {"loss", "square-norm"} and all(-1.0 <= c <= 1.0 for c in cos.values())
    assert cos["square-norm"] > cos["loss"]  # on the shipped digits model (+0.99 against +0.1 over 32 samples)
    assert qd.main(["--preset", "digits", "--gradients", "3"]) == 0
    assert "square-norm measurement: mean pairwise cosine" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="at least 2"):
        qd.main(["--preset", "digits", "--gradients", "1"])
