"""Group specs, group scores, batched pool scores, reverse ranking and the copy check (issue 15)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from test_session import TINY_ATTRIBUTION, tiny_checkpoint

from engine.attribution.copycheck import (
    NEAR_COPY_RATIO,
    concentration,
    copy_check,
    explain,
    nearest_neighbours,
    pixel_distances,
)
from engine.attribution.groups import (
    GroupError,
    group_change,
    group_from_indices,
    parse_group,
    strongest_members,
)
from engine.attribution.pool import (
    attribution_matrix,
    gallery_set,
    generate_pool,
    parse_query_set,
    ranking_by_change,
)
from engine.attribution.session import AttributionSession

METHODS = ["kfac", "trak", "dtrak", "pixel"]


@pytest.fixture(scope="module")
def session(tmp_path_factory, digits_small):
    folder = tmp_path_factory.mktemp("tiny_group_ckpt")
    preset = tiny_checkpoint(folder, digits_small, gallery=3)
    s = AttributionSession(
        preset,
        checkpoint=folder,
        device="cpu",
        cache_root=tmp_path_factory.mktemp("cache"),
        config=TINY_ATTRIBUTION,
        dataset=digits_small,
    )
    s.build(METHODS)
    return s


@pytest.fixture(scope="module")
def pool(session, tmp_path_factory):
    """Five pool samples (tiny model, 1,000 DDPM steps: a couple of seconds)."""
    return generate_pool(session, 5, seed=3, pool_dir=tmp_path_factory.mktemp("pools"), progress=False)


# --- group specs ---------------------------------------------------------------------------


def test_label_group_holds_every_image_of_that_label(digits_small):
    g = parse_group("label:3", digits_small)
    want = np.flatnonzero(digits_small.labels.numpy() == 3)
    assert np.array_equal(g.members, want) and g.size == len(want) > 0


def test_train_group_sorted_unique_with_ranges(digits_small):
    g = parse_group("train:5, 1,3-4,1", digits_small)
    assert g.members.tolist() == [1, 3, 4, 5]


def test_group_descriptions_count_right(digits_small):
    """"1 hand-picked training image(s)" for the app's one-image group."""
    from engine.attribution.groups import group_from_indices, group_from_text

    assert parse_group("train:5", digits_small).description == "training image #5"
    assert group_from_indices([7], 64, spec="train:7").description == "training image #7"
    assert parse_group("train:1,2", digits_small).description == "2 training images, hand-picked"
    assert group_from_text("3", "x.txt", 64).description == "1 training image listed in x.txt"


def test_file_group_json_and_text(digits_small, tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([7, 2, 9]))
    (tmp_path / "b.txt").write_text("7\n2\n9\n")
    for name in ("a.json", "b.txt"):
        assert parse_group(f"file:{tmp_path / name}", digits_small).members.tolist() == [2, 7, 9]


def test_repeated_indices_are_counted_once_and_the_description_says_so(digits_small, tmp_path):
    """QA 44 #2: ``train:1,1,2`` answered for 2 images with no word (its spec still showing 1 twice); a group is a
    set, so each member counts once, and the description (in the text output and the JSON) says what was merged.
    QA 44 #1: the empty group's message read "the group group 'train:,' is empty"."""
    g = parse_group("train:1,1,2,2,2", digits_small)
    assert g.members.tolist() == [1, 2] and g.description == "2 training images, hand-picked (3 repeated indices counted once)"
    assert parse_group("train:5,5", digits_small).description == "training image #5 (1 repeated index counted once)"
    assert parse_group("train:1,2", digits_small).description == "2 training images, hand-picked"
    (tmp_path / "twice.json").write_text(json.dumps([7, 2, 7]))
    assert parse_group(f"file:{tmp_path / 'twice.json'}", digits_small).description == (
        "2 training images listed in twice.json (1 repeated index counted once)")
    from engine.attribution.groups import group_from_text

    assert group_from_text("3 3 4", "up.txt", len(digits_small)).description == (
        "2 training images listed in up.txt (1 repeated index counted once)")
    with pytest.raises(GroupError) as e:
        parse_group("train:,", digits_small)
    assert str(e.value) == "group 'train:,' is empty: give at least one training index"


def test_errors_quote_what_was_typed_and_an_empty_kind_says_it_is_empty(digits_small):
    """QA 63 F4: the app's box holding '5-2' answered "the range '5-2' in group 'train:5-2' is reversed" (CLI
    syntax the person never typed), and `--remove train:` was a "bad group" rather than an empty one."""
    from engine.attribution.groups import group_from_typed

    n = len(digits_small)
    for typed, message in (("5-2", "the range '5-2' in your list is reversed; write 2-5"),
                           ("1, 99999", f"training index 99999 in your list is out of range 0..{n - 1}"),
                           ("abc", "'abc' in your list is not an integer training index")):
        with pytest.raises(GroupError) as e:
            group_from_typed(typed, n)
        assert str(e.value) == message and "train:" not in str(e.value)
    typed = group_from_typed(" 3, 1-2 ", n)
    assert typed.spec == "train:3, 1-2" and typed.members.tolist() == [1, 2, 3]
    assert typed.members.tolist() == parse_group(typed.spec, digits_small).members.tolist()
    for kind in ("train", "label", "file"):
        with pytest.raises(GroupError, match=f"^the group '{kind}:' is empty: "):
            parse_group(f"{kind}: ", digits_small)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("label:12", "unknown label 12"),
        ("label:seven", "unknown label 'seven'"),
        ("train:1,64", "training index 64"),
        ("train:-1", "out of range"),
        ("train:1,x", "'x'"),
        ("train:,", "empty"),
        ("nonsense", "expected label:C"),
        ("pixels:3", "bad group kind"),
    ],
)
def test_bad_group_specs_say_why(digits_small, spec, message):
    with pytest.raises(GroupError, match=message):
        parse_group(spec, digits_small)


def test_an_unknown_label_lists_the_numbers_and_the_names_whatever_was_typed(digits_small):
    """A numeric unknown label listed only the numbers, an unknown name only the names (QA): both now list
    each number with its name; names that are just the numbers are not repeated."""
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    named = dataclasses.replace(digits_small, class_names=words)
    valid = "valid labels: " + ", ".join(f"{i} ({w})" for i, w in enumerate(words))
    for spec, unknown in (("label:12", "12"), ("label:twelve", "'twelve'")):
        with pytest.raises(GroupError) as e:
            parse_group(spec, named)
        assert str(e.value) == f"unknown label {unknown}; {valid}"
    assert parse_group("label:seven", named).members.tolist() == parse_group("label:7", named).members.tolist()
    with pytest.raises(GroupError, match=r"valid labels: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9$"):
        parse_group("label:twelve", digits_small)  # the digits' names are "0".."9"


def test_bad_group_files_say_why(digits_small, tmp_path):
    cases = {
        "floats.json": ("[1.5, 2]", "list of integers"),
        "dict.json": ('{"a": 1}', "list of integers"),
        "words.txt": ("one two", "not an integer"),
        "empty.txt": ("", "empty"),
        "broken.json": ("[1, 2", "not valid JSON"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(GroupError, match=message):
            parse_group(f"file:{tmp_path / name}", digits_small)
    with pytest.raises(GroupError, match="no group file"):
        parse_group(f"file:{tmp_path / 'missing.json'}", digits_small)


# --- group scores ----------------------------------------------------------------------------


def test_group_change_is_the_sum_of_member_scores(session):
    res = session.query(session.parse_query("gallery:0"), "loss", ["kfac", "trak"])
    g = parse_group("label:2", session.dataset)
    for name in ("kfac", "trak"):
        s = res.methods[name].scores
        expected = sum(float(s[i]) for i in g.members)
        assert float(group_change(s, g)) == pytest.approx(expected, rel=1e-6, abs=1e-12)
        # the group's strongest members are its largest scores, in order
        top = strongest_members(s, g, 3)
        assert [i for i, _ in top] == sorted(g.members.tolist(), key=lambda i: -s[i])[:3]
    # additivity across disjoint groups: removing both = the sum of removing each
    a, b = group_from_indices([0, 1, 2], 64), group_from_indices([10, 11], 64)
    both = group_from_indices([0, 1, 2, 10, 11], 64)
    s = res.methods["kfac"].scores
    assert float(group_change(s, both)) == pytest.approx(float(group_change(s, a) + group_change(s, b)), rel=1e-6)


# --- batched pool scores -----------------------------------------------------------------------


def test_pool_is_cached_and_reproducible(session, pool, tmp_path):
    again = generate_pool(session, 5, seed=3, pool_dir=tmp_path, progress=False)  # a fresh folder: redraws
    assert torch.allclose(again.images, pool.images, atol=1e-6)
    assert pool.names == [f"pool:{i}" for i in range(5)] and len(pool.labels) == 5


def test_a_pool_interrupted_while_it_is_labelled_keeps_its_draw(session, pool, tmp_path, monkeypatch):
    """QA 27 #3: the pool was written only after the digits classifier's fit (2-10 s, silent), so a Ctrl-C then lost
    minutes of sampling.  The draw is saved first; a rerun labels it without drawing again."""
    from engine.attribution import pool as pool_module

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(pool_module, "_classify", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_pool(session, 5, seed=3, pool_dir=tmp_path, progress=False)
    path = pool_module.pool_path(tmp_path, session.checkpoint_hash, 3, 5)
    with np.load(path) as z:
        assert "labels" not in z and z["images"].shape[0] == 5
    monkeypatch.undo()
    monkeypatch.setattr(session.diffusion, "sample", lambda *a, **k: pytest.fail("the pool was drawn again"))
    again = generate_pool(session, 5, seed=3, pool_dir=tmp_path, progress=False)
    assert torch.allclose(again.images, pool.images, atol=1e-6)
    assert [q.label for q in again.queries] == [q.label for q in pool.queries]
    with np.load(path) as z:
        assert "labels" in z


@pytest.mark.parametrize("measurement", ["loss", "loss@t=300"])
def test_batched_matrix_equals_one_query_at_a_time(session, pool, measurement):
    mats = attribution_matrix(session, pool, measurement, METHODS)
    for name in METHODS:
        assert mats[name].status == "ok", mats[name].reason
        assert mats[name].scores.shape == (5, 64)
    for q, query in enumerate(pool.queries):
        single = session.query(query, measurement, METHODS)
        for name in METHODS:
            want = single.methods[name].scores
            got = mats[name].scores[q]
            scale = float(np.abs(want).max())
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale, err_msg=f"{name} row {q}")


def test_a_matrix_says_whether_a_missing_answer_is_the_query_sets_or_the_servers(session, pool):
    """Pool samples have no recorded trajectory: the trajectory measurement cannot score them (the query
    set's problem: the gallery would do); CLIP without weights cannot score anything (this server's)."""
    mats = attribution_matrix(session, pool, "trajectory", ["kfac", "clip"])
    assert mats["kfac"].status == "unavailable" and "no recorded trajectory" in mats["kfac"].reason
    assert mats["kfac"].reason_about == "query"
    assert mats["clip"].status == "unavailable" and mats["clip"].reason_about == "server", mats["clip"].reason


def test_matrix_cache_round_trip(session, pool, tmp_path):
    first = attribution_matrix(session, pool, "loss", ["kfac"], cache_dir=tmp_path)
    again = attribution_matrix(session, pool, "loss", ["kfac"], cache_dir=tmp_path)
    assert "loaded" in again["kfac"].timing_ms
    np.testing.assert_array_equal(first["kfac"].scores, again["kfac"].scores)
    other = attribution_matrix(session, pool, "loss", ["kfac"], damping={"kfac": 1e-3}, cache_dir=tmp_path)
    assert "loaded" not in other["kfac"].timing_ms  # another damping is another matrix


def test_a_cached_matrix_keeps_its_damping_floor_and_warning(session, pool, tmp_path):
    """QA 36 #1: a pool's matrix read back from the cache came without K-FAC's damping floor and low-damping
    warning, since a new session had not loaded the factors they come from; the floor is recorded beside the
    matrix now, and a matrix cached without that record is scored again."""
    floor = session.method("kfac").damping_floor()
    low = {"kfac": floor / 100}
    first = attribution_matrix(session, pool, "loss", ["kfac", "trak"], damping=low, cache_dir=tmp_path)["kfac"]
    assert first.damping_floor == floor and "below the float32 factors' resolution" in first.warning
    fresh = AttributionSession(session.preset, checkpoint=session.checkpoint, device="cpu", cache_root=session.cache_root,
                               config=session.config, dataset=session.dataset)
    assert fresh.method("kfac").damping_floor() is None  # nothing loaded: the floor can only come from the record
    again = attribution_matrix(fresh, pool, "loss", ["kfac", "trak"], damping=low, cache_dir=tmp_path)
    assert "loaded" in again["kfac"].timing_ms and again["kfac"].damping_floor == pytest.approx(floor)
    assert again["kfac"].warning == first.warning
    assert again["trak"].damping_floor is None and again["trak"].warning is None
    at = attribution_matrix(fresh, pool, "loss", ["kfac"], damping={"kfac": floor * 2}, cache_dir=tmp_path)["kfac"]
    assert at.warning is None
    for record in tmp_path.glob("matrix_*kfac*.json"):  # a matrix cached before the record: scored again
        record.unlink()
    older = AttributionSession(session.preset, checkpoint=session.checkpoint, device="cpu", cache_root=session.cache_root,
                               config=session.config, dataset=session.dataset)
    redone = attribution_matrix(older, pool, "loss", ["kfac"], damping=low, cache_dir=tmp_path)["kfac"]
    assert "loaded" not in redone.timing_ms and redone.warning == first.warning


def test_a_damping_change_reuses_the_query_sets_gradients_from_the_gradient_cache(session, pool, monkeypatch):
    """QA round 18: the Groups page recomputed every sample's gradients at each new damping (6-8 s), although
    they do not depend on it; with a gradient cache the second damping is one product per method, and its
    scores equal a fresh computation's."""
    from engine.attribution import pool as pool_module
    from explorer.shared_results import RecentResults

    calls = []
    real = pool_module.query_gradients
    monkeypatch.setattr(pool_module, "query_gradients", lambda *a, **k: calls.append(str(a[2])) or real(*a, **k))
    cache = RecentResults(2)
    attribution_matrix(session, pool, "loss", ["kfac", "trak"], gradient_cache=cache)
    assert calls == ["loss"]  # one pass for both methods
    again = attribution_matrix(session, pool, "loss", ["kfac", "trak"], damping={"kfac": 1e-3, "trak": 1e-2},
                               gradient_cache=cache)
    assert calls == ["loss"]  # no new gradients
    fresh = attribution_matrix(session, pool, "loss", ["kfac", "trak"], damping={"kfac": 1e-3, "trak": 1e-2})
    assert calls == ["loss", "loss"]
    for name in ("kfac", "trak"):
        np.testing.assert_array_equal(again[name].scores, fresh[name].scores)
    attribution_matrix(session, pool, "loss@t=300", ["kfac"], gradient_cache=cache)  # another measurement
    assert calls == ["loss", "loss", "loss@t=300"]


def test_the_matrix_scores_at_the_m_asked(session, pool):
    """QA 64 F3: the Groups page and the reverse view scored at the preset's M while the Explore columns beside
    them used the sidebar's; the matrix now takes the query's M as ``session.query`` does, and caches by it."""
    m = session.config.mc_samples // 2
    mats = attribution_matrix(session, pool, "loss", ["kfac"], mc_samples=m)["kfac"].scores
    per_query = np.stack([session.query(q, "loss", ["kfac"], mc_samples=m).methods["kfac"].scores
                          for q in pool.queries])
    np.testing.assert_allclose(mats, per_query, rtol=1e-4, atol=1e-5 * np.abs(per_query).max())
    default = attribution_matrix(session, pool, "loss", ["kfac"])["kfac"].scores
    assert not np.allclose(default, mats, rtol=1e-3, atol=1e-5 * np.abs(per_query).max())


def test_gallery_set_and_bad_query_sets(session):
    g = gallery_set(session)
    assert g.names == ["gallery:0", "gallery:1", "gallery:2"] and g.queries[0].trajectory is not None
    for bad in ("pool:x", "pool:0", "everything"):
        with pytest.raises(ValueError):
            parse_query_set(session, bad)


# --- reverse ranking -----------------------------------------------------------------------------


def test_reverse_ranking_agrees_with_per_query_scores(session, pool):
    mats = attribution_matrix(session, pool, "loss", ["kfac"])
    train_index = 17
    per_query = [session.query(q, "loss", ["kfac"]).methods["kfac"].scores[train_index] for q in pool.queries]
    one = group_from_indices([train_index], len(session.dataset))
    ranking = ranking_by_change(group_change(mats["kfac"].scores, one), pool)
    assert [r.query for r in ranking] == [pool.names[q] for q in np.argsort(-np.array(per_query), kind="stable")]
    np.testing.assert_allclose([r.change for r in ranking], sorted(per_query, reverse=True), rtol=1e-4)
    # a group: the per-query group changes, sorted
    g = parse_group("label:4", session.dataset)
    changes = group_change(mats["kfac"].scores, g)
    ranked = ranking_by_change(changes, pool, top_k=2)
    assert [r.query for r in ranked] == [pool.names[q] for q in np.argsort(-changes, kind="stable")[:2]]


def test_a_compressed_bank_gives_exact_group_changes_and_members(session, pool, tmp_path, digits_small):
    """A compressed K-FAC bank's batched product is its compressed scan: another scale than eq. 6 (mnist:
    about 1/26) and approximate ranks.  Summing its columns made the group's predicted change wrong; the
    group views take the exact sum (one summed gradient) and the strongest members' exact scores instead,
    which match the stored bank's up to its int8 rounding."""
    from engine.attribution.group_attribution import group_attribution

    cfg = dataclasses.replace(TINY_ATTRIBUTION, kfac_bank="compressed", kfac_compression=4.0, kfac_rerank=3)
    def compressed() -> AttributionSession:
        return AttributionSession(session.preset, checkpoint=session.checkpoint, device="cpu", cache_root=tmp_path,
                                  config=cfg, dataset=digits_small)

    compressed().build(["kfac"])
    comp = compressed()  # built on disk, not loaded: the group view is its first use (as in the CLI)
    g = parse_group("label:4", session.dataset)
    stored = group_attribution(session, g, pool, "loss", ["kfac"])
    got = group_attribution(comp, g, pool, "loss", ["kfac"])
    want = stored.changes("kfac")
    scale = np.abs(want).max()
    np.testing.assert_allclose(got.changes("kfac"), want, rtol=0.02, atol=0.01 * scale)
    estimate = group_change(got.methods["kfac"].scores, g)  # what the group views summed before
    assert np.abs(estimate - want).max() > 0.1 * scale
    assert [r.query for r in got.ranking("kfac")] == [r.query for r in stored.ranking("kfac")]
    assert got.note("kfac") and "exact" in got.note("kfac") and stored.note("kfac") is None
    ref = stored.methods["kfac"].scores
    for q in range(len(pool)):
        for i, v in got.strongest("kfac", q, 3):
            assert abs(v - ref[q, i]) <= 0.03 * np.abs(ref[q]).max()  # the stored bank's int8 rounding
    assert got.to_json()["methods"]["kfac"]["note"] == got.note("kfac")
    # the app builds a GroupResult per page run over the matrices it keeps: the exact work is kept with them
    from engine.attribution.group_attribution import GroupResult

    calls: list[str] = []
    exact = got.methods["kfac"].exact
    group_changes, member_scores = exact.group_changes, exact.member_scores
    exact.group_changes = lambda m: calls.append("group") or group_changes(m)
    exact.member_scores = lambda i: calls.append("members") or member_scores(i)
    again = GroupResult(g, "loss", pool, got.methods, session.labels)
    assert np.array_equal(again.changes("kfac"), got.changes("kfac")) and again.strongest("kfac", 0, 3)
    assert calls == []


# --- copy check ------------------------------------------------------------------------------------


def test_concentration_shares():
    scores = np.array([[4.0, 1.0, -3.0, 0.0, 3.0, 2.0, 0.0]])
    s1, s5, top = concentration(scores)
    assert s1[0] == pytest.approx(0.4) and s5[0] == pytest.approx(1.0)
    assert top[0].tolist()[:3] == [0, 4, 5]
    s1, s5, _ = concentration(np.array([[-1.0, -2.0]]))
    assert s1[0] == 0.0 and s5[0] == 0.0  # no positive mass


def test_pixel_distance_units_and_a_planted_copy(digits_small):
    train = digits_small.images
    d = pixel_distances(train[:2], train)
    assert float(d[0, 0]) == pytest.approx(0.0, abs=1e-6)
    black, white = -torch.ones(1, 1, 8, 8), torch.ones(1, 1, 8, 8)
    assert float(pixel_distances(black, white)[0, 0]) == pytest.approx(1.0)
    # a copy of training image 5 with a little noise is flagged; a blank image is not
    torch.manual_seed(0)
    copy = (train[5:6] + 0.02 * torch.randn_like(train[5:6])).clamp(-1, 1)
    images = torch.cat([copy, black])
    nearest, d1, rel = nearest_neighbours(images, train)
    assert nearest[0] == 5 and rel[0] < NEAR_COPY_RATIO and rel[1] > NEAR_COPY_RATIO
    scores = np.zeros((2, len(train)), dtype=np.float32)
    scores[0, 5] = 1.0
    rows = copy_check(scores, images, train, ["a", "b"])
    assert rows[0].query == "a" and rows[0].near_copy and rows[0].influence_agrees
    assert not rows[1].near_copy
    assert "typical distance to its 50 next-closest" in explain(rows[0])
    # a training set of 40 has 39 other images: the words say what was averaged (they said 50; QA)
    few = copy_check(scores[:, :40], images, train[:40], ["a", "b"])
    assert few[0].neighbours == 39 and "its 39 next-closest training images" in explain(few[0])
    # next to the threshold the ratio gets a third decimal: 0.4992 (flagged) and 0.5046 (not) both read 0.50 (QA 27)
    near = [dataclasses.replace(rows[0], relative_distance=v, near_copy=v < NEAR_COPY_RATIO) for v in (0.4992, 0.5046)]
    assert "0.499 times" in explain(near[0]) and "flagged as a possible" in explain(near[0])
    assert "0.505 times" in explain(near[1]) and "not flagged" in explain(near[1])
    assert "0.31 times" in explain(dataclasses.replace(rows[0], relative_distance=0.3123))



def test_the_near_copy_rule_is_a_setting_the_rows_and_the_flag_rate_follow(digits_small):
    """The rule's threshold and neighbour count were module constants (QA 30b); as ``CopyCheckConfig`` a study can
    move them, and each row records the threshold that set its flag."""
    from engine.attribution.copycheck import training_flag_rate
    from engine.config import CopyCheckConfig

    train = digits_small.images
    images = train[10:16].flip(-1)  # mirrored training images: near some training image, at various distances
    scores = np.zeros((6, len(train)), dtype=np.float32)
    default = copy_check(scores, images, train, list("abcdef"))
    rel = sorted(r.relative_distance for r in default)
    cut = (rel[2] + rel[3]) / 2  # three of the six below it
    loose = copy_check(scores, images, train, list("abcdef"), rule=CopyCheckConfig(near_copy_ratio=cut))
    assert sum(r.near_copy for r in loose) == 3 and {r.near_copy_ratio for r in loose} == {cut}
    assert [r.relative_distance for r in loose] == [r.relative_distance for r in default]
    few = copy_check(scores, images, train, list("abcdef"), rule=CopyCheckConfig(neighbours=5))
    assert {r.neighbours for r in few} == {5} and "its 5 next-closest" in explain(few[0])
    assert [r.relative_distance for r in few] != [r.relative_distance for r in default]  # averaged over 5, not 50
    _, _, own = nearest_neighbours(train, train, exclude_self=True)
    assert training_flag_rate(train, CopyCheckConfig(near_copy_ratio=0.9)) == pytest.approx(float(np.mean(own < 0.9)))
    assert training_flag_rate(train, CopyCheckConfig(near_copy_ratio=0.9)) > training_flag_rate(train)
    assert "under the rule's " + f"{cut:g}" in explain(next(r for r in loose if r.near_copy))
    for bad in ({"neighbours": 0}, {"near_copy_ratio": 0.0}, {"near_copy_ratio": 1.0}, {"near_copy_ratio": 1.5}):
        with pytest.raises(ValueError, match="copy check"):
            CopyCheckConfig(**bad)


# --- group retraining check -------------------------------------------------------------------------


def test_group_retrain_record_is_resumable_and_consistent(session, tmp_path, capsys, monkeypatch):
    from engine.evaluation.group_retrain import plan_group, run_group_retrain

    monkeypatch.setenv("TQDM_MININTERVAL", "0")
    record = run_group_retrain(session, ["label:1"], ["kfac", "trak"], tmp_path, steps=10, mc_samples=8,
                               log=lambda s: None)
    # the half minute or more after the training shows what it does (QA 24: 31.7 s without a line)
    err = capsys.readouterr().err
    assert "scoring and measuring the groups" in err
    assert "label:1: measuring the full model: 1/3" in err and "label:1: measuring the model without label:1: " in err
    (g,) = record["groups"]
    group = parse_group("label:1", session.dataset)
    assert g["size"] == group.size and len(g["measured_change"]) == 3
    # predicted = the group's sum of the gallery queries' scores (one query at a time here)
    for q in range(3):
        s = session.query(session.parse_query(f"gallery:{q}"), "loss", ["kfac"]).methods["kfac"].scores
        assert g["predicted_change"]["kfac"][q] == pytest.approx(float(group_change(s, group)), rel=1e-4)
    assert set(g["comparison"]) == {"kfac", "trak"}
    # what the predictions and the true measurement were made with (QA round 21: only M and the dampings)
    config = record["config"]
    assert config["true_measurement_seed"] == 12345 and config["code"]["version"]
    assert config["attribution"]["seed"] == session.config.seed
    assert config["attribution"]["draws"] == session.config.draws
    assert config["attribution"]["query_draws"] == session.config.query_draws
    # the model folder is keyed by (checkpoint, members, steps): a second run trains nothing
    plan = plan_group("label:1", group.members, session.checkpoint_hash, 10, tmp_path)
    mtime = (plan.model / "model.safetensors").stat().st_mtime
    again = run_group_retrain(session, ["label:1"], ["kfac"], tmp_path, steps=10, mc_samples=8, log=lambda s: None)
    assert (plan.model / "model.safetensors").stat().st_mtime == mtime
    assert again["groups"][0]["measured_change"] == g["measured_change"]


def test_group_retrain_trains_on_the_sessions_device(digits_small, tiny_preset, tmp_path, monkeypatch):
    """``group-retrain --device cuda`` trained the models without each group on the CPU: ``run_training`` was
    called without ``device`` (its default is "cpu")."""
    from types import SimpleNamespace

    import engine.evaluation.runs as runs
    from engine.attribution.pool import PoolError
    from engine.evaluation.group_retrain import run_group_retrain

    devices = []
    monkeypatch.setattr(runs, "run_training", lambda tasks, **kw: devices.append(kw.get("device", "cpu")))
    session = SimpleNamespace(dataset=digits_small, checkpoint_hash="h", preset=tiny_preset, checkpoint=tmp_path,
                              device=torch.device("cuda:0"), gallery=lambda: [])
    with pytest.raises(PoolError):  # no gallery to measure: the training call is all this test needs
        run_group_retrain(session, ["label:1"], ["kfac"], tmp_path, steps=1, log=lambda s: None)
    assert devices == [torch.device("cuda:0")]


def test_group_gradient_scores_match_the_sum_of_bank_scores(session, pool):
    """One summed gradient per group (factors only) = the sum of the members' int8-bank scores."""
    from engine.attribution.group_gradient import kfac_group_scores
    from engine.attribution.pool import query_gradients
    from engine.model.measurements import Measurement

    groups = [parse_group("label:1", session.dataset), parse_group("train:0-9", session.dataset)]
    grads = query_gradients(session, pool.queries, Measurement("loss"), session.query_draws())
    direct = kfac_group_scores(session, grads, groups)
    mats = attribution_matrix(session, pool, "loss", ["kfac"])
    for g, group in enumerate(groups):
        summed = group_change(mats["kfac"].scores, group)
        scale = float(np.abs(summed).max())
        np.testing.assert_allclose(direct[:, g], summed, rtol=0, atol=0.05 * scale)  # int8 bank rounding
        assert np.corrcoef(direct[:, g], summed)[0, 1] > 0.99


def test_class_check_counts_classes_whose_own_samples_rise_most(digits_small):
    from engine.bench.groups import class_check

    classes = sorted({int(v) for v in digits_small.labels.tolist()})
    labels = np.array([0, 0, 1, 2])
    changes = np.zeros((4, len(classes)))
    changes[:2, 0] = 1.0  # class 0: its own samples rise most -> holds
    changes[2, 1] = -1.0  # class 1: its own sample falls -> fails
    changes[3, 2] = 0.5  # class 2 holds
    out = class_check(None, labels, digits_small, changes=changes)
    assert out["classes"] == 3 and out["holds"] == 2  # classes without a sample of their own are not counted
    assert [r["holds"] for r in out["per_class"][:3]] == [True, False, True]


def test_class_check_from_factors_matches_the_bank(session):
    from engine.bench.groups import class_check_from_factors

    out = class_check_from_factors(session)
    changes = np.array(out["changes"])
    mats = attribution_matrix(session, gallery_set(session), "loss", ["kfac"])
    for c in range(changes.shape[1]):
        summed = group_change(mats["kfac"].scores, parse_group(f"label:{c}", session.dataset))
        np.testing.assert_allclose(changes[:, c], summed, rtol=0, atol=0.05 * float(np.abs(summed).max()))


def test_group_scores_without_factors_name_the_sessions_build_command(session, tmp_path):
    """Before K-FAC's factors exist, the error is the session's own build command (checkpoint, cache
    root and every non-default setting), which a user can paste to get the factors these scores need."""
    from engine.attribution.group_gradient import load_kfac_factors

    empty = AttributionSession(
        session.preset, checkpoint=session.checkpoint, device="cpu", cache_root=tmp_path / "empty",
        config=dataclasses.replace(session.config, mc_samples=session.config.mc_samples + 1), dataset=session.dataset,
    )
    with pytest.raises(RuntimeError, match="no K-FAC factors") as e:
        load_kfac_factors(empty)
    command = str(e.value).split("`")[1]
    assert command == empty.build_command(["kfac"])
    assert f"--cache-root {tmp_path / 'empty'}" in command and f"--mc-samples {session.config.mc_samples + 1}" in command


@pytest.mark.parametrize("exclude_self", [False, True])
def test_nearest_neighbours_in_row_chunks_equal_the_whole_matrix(digits_small, exclude_self):
    """The copy-check's distances are taken a few rows at a time (the training set against itself is N x N:
    20 GB at CIFAR-10's N); the answer is that of the whole matrix, the excluded diagonal included."""
    from engine.attribution.copycheck import neighbour_count, pixel_distances

    train = digits_small.images[:40]
    images = train if exclude_self else digits_small.images[40:57]
    nearest, d1, rel = nearest_neighbours(images, train, k=5, exclude_self=exclude_self, chunk_bytes=3 * 8 * 40)
    d = pixel_distances(images, train)
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    vals, idx = torch.topk(d, neighbour_count(40, 5, exclude_self) + 1, dim=1, largest=False)
    np.testing.assert_array_equal(nearest, idx[:, 0].numpy())
    np.testing.assert_allclose(d1, vals[:, 0].numpy())
    np.testing.assert_allclose(rel, (vals[:, 0] / vals[:, 1:].mean(1)).numpy())
    if exclude_self:
        assert (nearest != np.arange(40)).all()


def test_a_measurements_query_gradients_are_timed_once_not_at_every_method_sharing_them(session, pool):
    """The Groups page's timing line read "K-FAC: gradients 2.41 s ...; TRAK: gradients 2.41 s" for one
    computation that both methods share (the loss): it is counted at the first method only."""
    out = attribution_matrix(session, pool, "loss", ["kfac", "trak", "dtrak"])
    assert "gradients" in out["kfac"].timing_ms and "gradients" not in out["trak"].timing_ms
    assert "gradients" in out["dtrak"].timing_ms  # the square norm's own gradients


def test_a_cached_matrix_is_never_served_for_other_training_data(session, pool, digits_small, tmp_path):
    """One checkpoint read with two training sets of the same size (a diffusers folder with another
    --data-root, or a folder edited in place) shares a pools folder: each set gets its own matrix (QA 26:
    the first set's scores were served for the second, exit 0, no notice)."""
    import dataclasses

    edited_images = digits_small.images.clone()
    edited_images[7] = -edited_images[7]
    edited = dataclasses.replace(digits_small, images=edited_images)
    other = AttributionSession(
        session.preset, checkpoint=session.checkpoint, device="cpu", cache_root=tmp_path / "cache",
        config=TINY_ATTRIBUTION, dataset=edited, check_trained_on=False,
    )
    other.build(["pixel"])
    first = attribution_matrix(session, pool, "loss", ["pixel"], cache_dir=tmp_path / "pools")
    second = attribution_matrix(other, pool, "loss", ["pixel"], cache_dir=tmp_path / "pools")
    assert "loaded" not in second["pixel"].timing_ms
    assert not np.allclose(first["pixel"].scores[:, 7], second["pixel"].scores[:, 7])
    np.testing.assert_array_equal(first["pixel"].scores[:, :7], second["pixel"].scores[:, :7])


# --- group-bench ----------------------------------------------------------------------------------


def test_group_bench_refuses_unbuilt_methods_before_any_work_and_says_what_it_times(session, tmp_path, capsys,
                                                                                      digits_small):
    """QA 27 #2: on a cache without the method, group-bench printed "0.0 s" timings, drew the pool, then stopped on
    an AssertionError.  #9: it was silent on stderr for 10-17 s at a time.  #14: a rerun printed the earlier run's
    draw time as its own."""
    from engine.bench.groups import run_group_bench

    empty = AttributionSession(session.preset, checkpoint=session.checkpoint, device="cpu",
                               cache_root=tmp_path / "empty", config=TINY_ATTRIBUTION, dataset=digits_small)
    with pytest.raises(ValueError, match=r"not built: kfac: run `attribution-engine build .*--methods kfac"):
        run_group_bench(empty, ["kfac"], pool_size=2, work_dir=tmp_path / "w0", log=lambda s: None)
    assert not (tmp_path / "w0").exists()
    with pytest.raises(ValueError, match="pool seed"):
        run_group_bench(session, ["kfac"], pool_size=2, pool_seed=-1, work_dir=tmp_path / "w0", log=lambda s: None)
    lines: list[str] = []
    capsys.readouterr()
    out = run_group_bench(session, ["kfac", "trak"], pool_size=3, pool_seed=3, work_dir=tmp_path / "w",
                          single_queries=1, log=lines.append)
    err = capsys.readouterr().err
    for part in ("timing the gallery's attribution matrix", "timing the pool's attribution matrix",
                 "timing a group query", "timing 1 single queries"):
        assert part in err, err
    assert out["pool_drawn_in_this_run"] and any(line.startswith("drawing the pool of 3: ") for line in lines)
    assert set(out["class_check"]["pool"]) == {"kfac", "trak"}
    lines.clear()
    again = run_group_bench(session, ["kfac"], pool_size=3, pool_seed=3, work_dir=tmp_path / "w", single_queries=1,
                            log=lines.append)
    assert not again["pool_drawn_in_this_run"] and again["pool_draw_seconds"] == out["pool_draw_seconds"]
    assert any("loaded from" in line and "drawn by an earlier run" in line for line in lines), lines


def test_group_scores_from_joint_block_factors_match_the_sum_of_bank_scores(session, pool, tmp_path, digits_small):
    """QA 55 #2: the group scores' factors were reloaded on a separate-block template whatever the factors' own
    layout, so joint [W | b] factors failed with a shape mismatch.  They load on their own layout now, and a
    group's change is the sum of its members' scores from the joint-block bank."""
    from engine.attribution.group_gradient import kfac_group_scores
    from engine.attribution.pool import query_gradients
    from engine.model.measurements import Measurement

    cfg = dataclasses.replace(TINY_ATTRIBUTION, kfac_blocks="joint")
    joint = AttributionSession(session.preset, checkpoint=session.checkpoint, device="cpu", cache_root=tmp_path,
                               config=cfg, dataset=digits_small)
    joint.build(["kfac"])
    groups = [parse_group("train:0-9", joint.dataset)]
    grads = query_gradients(joint, pool.queries, Measurement("loss"), joint.query_draws())
    direct = kfac_group_scores(joint, grads, groups)
    summed = group_change(attribution_matrix(joint, pool, "loss", ["kfac"])["kfac"].scores, groups[0])
    np.testing.assert_allclose(direct[:, 0], summed, rtol=0, atol=0.05 * float(np.abs(summed).max()))
    assert np.corrcoef(direct[:, 0], summed)[0, 1] > 0.99
