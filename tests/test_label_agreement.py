"""The gallery's label agreement (engine.evaluation.label_agreement), from scores whose answer is known by hand."""

from __future__ import annotations

import numpy as np
import pytest

from engine.evaluation.label_agreement import agreement, gallery_label_agreement, top_shares

# six training images: three labelled 0, three labelled 1
TRAIN = np.array([0, 1, 0, 1, 0, 1])


def test_top_shares_count_the_query_label_among_the_highest_scores():
    scores = np.array([
        [9.0, 1.0, 8.0, 2.0, 7.0, 3.0],  # query 0 (label 0): top 2 = images 0, 2, both label 0
        [9.0, 8.0, 1.0, 2.0, 3.0, 4.0],  # query 1 (label 1): top 2 = images 0 (0), 1 (1)
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # query 2 (label 0): top 2 = images 5 (1), 4 (0)
    ])
    assert top_shares(scores, TRAIN, np.array([0, 1, 0]), top=2).tolist() == [1.0, 0.5, 0.5]
    # the lowest scores are not proponents: reversing a row reverses its answer
    assert top_shares(-scores[:1], TRAIN, np.array([0]), top=2).tolist() == [0.0]


def test_ties_keep_the_lower_index_as_a_stable_ranking_does():
    scores = np.zeros((1, 6))  # every image tied: the top 3 are images 0, 1, 2 (labels 0, 1, 0)
    assert top_shares(scores, TRAIN, np.array([0]), top=3).tolist() == pytest.approx([2 / 3])


def test_agreement_summarises_with_an_interval_around_the_mean_and_the_chance_level():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 25)  # 100 images, 4 classes: chance 0.25 for any query label
    queries = rng.integers(0, 4, size=40)
    scores = rng.normal(size=(40, 100))
    scores[np.arange(40)[:, None], np.where(labels[None, :] == queries[:, None])[1].reshape(40, 25)] += 10.0
    a = agreement("m", scores, labels, queries, top=10)  # every query's 25 own-label images score highest
    assert a.share == 1.0 and a.ci95 == (1.0, 1.0) and a.chance == pytest.approx(0.25) and a.queries == 40
    b = agreement("m", rng.normal(size=(40, 100)), labels, queries, top=10)  # scores unrelated to labels
    assert b.ci95[0] <= b.share <= b.ci95[1] and b.ci95[0] < b.ci95[1]
    assert abs(b.share - 0.25) < 0.1  # near chance: 400 draws of a 1-in-4 event


def test_bad_shapes_and_tops_are_refused():
    with pytest.raises(ValueError, match="scores must be"):
        top_shares(np.zeros((2, 5)), TRAIN, np.array([0, 1]))
    with pytest.raises(ValueError, match="top must be in 1..6"):
        top_shares(np.zeros((1, 6)), TRAIN, np.array([0]), top=7)


class FakeGallery:
    """A precomputed gallery's two calls the function makes: ``rows`` and ``scores(index, method)``."""

    def __init__(self, scores: dict[str, dict[int, np.ndarray | None]]):
        self._scores = scores
        self.rows = {i: r for r, i in enumerate(sorted(next(iter(scores.values()))))}

    def scores(self, index: int, method: str) -> np.ndarray | None:
        return self._scores[method][index]


def test_the_gallery_leaves_out_unlabelled_samples_and_those_a_method_could_not_score():
    own = np.array([9.0, 1.0, 8.0, 2.0, 7.0, 3.0])  # label 0's images first
    pg = FakeGallery({
        "kfac": {0: own, 1: own, 2: own, 3: own},
        "pixel": {0: own, 1: None, 2: -own, 3: own},  # sample 1 blank: no pixel similarity
    })
    labels = {0: 0, 1: 0, 2: 0, 3: None}  # sample 3 unlabelled
    out = gallery_label_agreement(pg, ["kfac", "pixel"], TRAIN, labels, top=3)
    assert out["kfac"].queries == 3 and out["kfac"].share == 1.0
    assert out["pixel"].queries == 2 and out["pixel"].share == pytest.approx(0.5)  # 1.0 and 0.0
    assert gallery_label_agreement(pg, ["kfac"], None, labels) == {}  # no training labels
    assert gallery_label_agreement(pg, ["kfac"], TRAIN, {0: 0}, top=3) == {}  # one labelled sample: no interval


def test_the_shipped_digits_gallery_agrees_with_the_bench_record():
    """The page's figure (from the 16-bit precomputed scores) against the bench's (from live scores, in
    assets/results/bench_attribution.json): equal up to the float16 ties, which move at most a label or two."""
    import json

    from engine.attribution.precomputed import FILE, PrecomputedGallery
    from engine.config import get_preset
    from engine.model.data import load_dataset
    from engine.paths import ASSETS

    pg = PrecomputedGallery.load(ASSETS / "digits" / FILE)
    with np.load(ASSETS / "digits" / "gallery.npz") as g:
        gallery_labels = {i: int(g["labels"][i]) for i in sorted(pg.rows)}
    train = load_dataset(get_preset("digits").data).labels.numpy()
    bench = json.loads((ASSETS / "results" / "bench_attribution.json").read_text())["agreement_top10"]
    out = gallery_label_agreement(pg, ["kfac", "trak", "dtrak", "pixel"], train, gallery_labels)
    for m in ("kfac", "trak", "dtrak", "pixel"):
        assert out[m].queries == 32
        assert abs(out[m].share - bench[m]) <= 2 / 320, (m, out[m].share, bench[m])
