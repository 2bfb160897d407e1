"""`attribution-engine group`, `reverse` and `copy-check` on a tiny checkpoint and 64 digits."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from test_session import tiny_checkpoint

import engine.attribution.session
from engine.attribution.methods.base import FixedScores
from engine.cli.parser import main

SMALL = ["--mc-samples", "4", "--trak-dim", "32"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, digits_small):
    folder = tmp_path_factory.mktemp("cli_group_ckpt")
    tiny_checkpoint(folder, digits_small, gallery=3)
    return folder, tmp_path_factory.mktemp("cli_group_cache")


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    """One pool folder for the module: the pool is drawn once and reused."""
    return tmp_path_factory.mktemp("pools")


@pytest.fixture
def cli(setup, digits_small, monkeypatch, capsys):
    folder, cache = setup
    monkeypatch.setattr(engine.attribution.session, "load_dataset", lambda cfg: digits_small)

    def run(*argv: str) -> tuple[int, str, str]:
        rc = main([*argv, "--checkpoint", str(folder), "--device", "cpu", "--cache-root", str(cache), *SMALL])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def test_a_group_of_most_or_all_of_the_training_set_carries_a_caveat(cli):
    """Removing the whole training set (QA round 17: "0-1796") printed mean changes as if they forecast
    something; a group of more than half the set now says what its sums can and cannot say."""
    rc, out, err = cli("group", "--remove", "train:0-63", "--remove", "train:0-39", "--remove", "train:0-31",
                       "--queries", "gallery", "--methods", "kfac", "--auto-build", "--json")
    assert rc == 0, err
    whole, most, half = json.loads(out)["groups"]
    assert "the whole training set" in whole["group"]["caveat"]
    assert "40 of the 64 training images, more than half" in most["group"]["caveat"]
    assert "do not forecast" in most["group"]["caveat"]
    assert "caveat" not in half["group"]  # half the set: what the LDS checks
    rc, out, err = cli("group", "--remove", "train:0-63", "--queries", "gallery", "--methods", "kfac")
    assert rc == 0 and "caveat: the group is the whole training set" in out, out
    # the reverse direction ranks samples by the same sums: the same caveat
    rc, out, err = cli("reverse", "--remove", "train:0-63", "--queries", "gallery", "--methods", "kfac", "--json")
    assert rc == 0 and "the whole training set" in json.loads(out)["group"]["caveat"], err
    rc, out, err = cli("reverse", "--remove", "train:0-39", "--queries", "gallery", "--methods", "kfac")
    assert rc == 0 and "caveat: the group holds 40 of the 64 training images" in out, out


def test_group_json_has_exactly_the_documented_shape(cli, digits_small):
    rc, out, err = cli("group", "--remove", "label:3", "--queries", "gallery", "--methods", "kfac,trak,dtrak",
                       "--auto-build", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert set(res) == {"group", "measurement", "queries", "queries_key", "methods", "model", "mc_samples", "attribution",
                        "code", "threads"}
    assert res["queries"] == "gallery" and res["queries_key"].startswith("gallery-")  # no pool seed: not a pool
    assert res["model"]["num_train"] == 64 and res["mc_samples"] == res["attribution"]["mc_samples"] == 4
    size = int((digits_small.labels == 3).sum())
    assert res["group"] == {"spec": "label:3", "size": size, "description": f"all {size} training images labelled 3"}
    assert res["measurement"] == "loss" and set(res["methods"]) == {"kfac", "trak", "dtrak"}
    # each method says what its changes are of: D-TRAK always scores the square norm (it was labelled "loss")
    assert {n: e["measurement"] for n, e in res["methods"].items()} == {
        "kfac": "loss", "trak": "loss", "dtrak": "square-norm"}
    for name, entry in res["methods"].items():
        # K-FAC's answers carry its factors' resolution floor, as query --json's (no warning at the default damping)
        assert set(entry) == {"queries", "damping", "measurement"} | ({"damping_floor"} if name == "kfac" else set())
        assert [q["query"] for q in entry["queries"]] == ["gallery:0", "gallery:1", "gallery:2"]
        for q in entry["queries"]:
            assert set(q) == {"query", "label", "predicted_change"}
            assert isinstance(q["predicted_change"], float) and q["label"] in (0, 1, 2)
    # the group's change is the sum of the member scores of a single query
    rc, out, err = cli("query", "--query", "gallery:1", "--methods", "kfac", "--json", "--top-k", "64")
    assert rc == 0, err
    top = json.loads(out)["methods"]["kfac"]["top"]
    member_sum = sum(t["score"] for t in top if t["label"] == 3)
    assert res["methods"]["kfac"]["queries"][1]["predicted_change"] == pytest.approx(member_sum, rel=1e-4)
    # the query JSON names each gradient method's measurement under the group JSON's key (QA round 20: D-TRAK's
    # was prose in its reason only); a similarity scores no measurement
    rc, out, err = cli("query", "--query", "gallery:1", "--methods", "kfac,dtrak,pixel", "--json")
    assert rc == 0, err
    entries = json.loads(out)["methods"]
    assert {n: e.get("measurement") for n, e in entries.items()} == {
        "kfac": "loss", "dtrak": "square-norm", "pixel": None}
    # the readable forms
    rc, out, err = cli("group", "--remove", "label:3", "--methods", "kfac", "--strongest", "2")
    assert rc == 0, err
    assert "group label:3" in out and "gallery:2" in out and "strongest: #" in out
    rc, out, err = cli("reverse", "--remove", "label:3", "--methods", "kfac", "--top-k", "2")
    assert rc == 0, err
    assert "1. gallery:" in out and "2. gallery:" in out and "3. gallery:" not in out
    rc, out, err = cli("reverse", "--remove", "label:3", "--methods", "kfac,dtrak", "--top-k", "2", "--json")
    assert rc == 0, err
    assert {n: e["measurement"] for n, e in json.loads(out)["methods"].items()} == {
        "kfac": "loss", "dtrak": "square-norm"}
    rc, out, err = cli("reverse", "--train", "5", "--methods", "dtrak", "--top-k", "2")
    assert rc == 0, err
    assert "raise these samples' square-norm the most (it uses the square-norm measurement" in out, out
    rc, out, err = cli("group", "--remove", "train:5", "--methods", "dtrak")
    assert rc == 0, err
    assert "uses the square-norm measurement" in out, out


def test_reverse_text_says_which_listed_changes_are_no_support(cli):
    """"what train:5 supports most" listed every gallery sample, negative changes included, as support."""
    # the tiny model is barely trained: under the loss every image supports every sample; the trajectory
    # measurement mixes the signs
    args = ["reverse", "--methods", "kfac", "--top-k", "50", "--auto-build", "--measurement", "trajectory"]
    for i in range(0, 64, 4):
        args += ["--remove", f"train:{i}"]
    rc, out, err = cli(*args, "--json")
    assert rc == 0, err
    per_group = [[t["change"] for t in g["methods"]["kfac"]["top"]] for g in json.loads(out)["groups"]]
    rc, text, err = cli(*args)
    assert rc == 0, err
    blocks = text.split("what train:")[1:]
    assert len(blocks) == len(per_group)
    seen = 0
    for block, changes in zip(blocks, per_group, strict=True):
        not_positive = sum(c <= 0 for c in changes)
        seen += not_positive > 0
        if not_positive == 0:
            assert "not positive" not in block and "none of these" not in block
        elif not_positive == len(changes):
            assert f"none of these {len(changes)} changes is positive" in block
        else:
            assert f"{not_positive} of these {len(changes)} changes are not positive" in block
        if not_positive:  # each group here is one image, and the caveat says so (it said "the group", QA 16)
            assert "removing the image would" in block and "removing the group" not in block
    assert seen, per_group  # some training image opposes a gallery sample


def test_reverse_json_on_a_pool_ranks_by_the_training_image_score(cli, pools):
    rc, out, err = cli("reverse", "--train", "17", "--queries", "pool:4", "--pool-dir", str(pools),
                       "--top-k", "3", "--methods", "kfac", "--auto-build", "--json")
    assert rc == 0, err
    res = json.loads(out)
    top = res["methods"]["kfac"]["top"]
    assert res["group"] == {"spec": "train:17", "size": 1, "description": "training image #17"}
    assert res["queries"] == "pool:4"
    assert [t["rank"] for t in top] == [1, 2, 3]
    changes = [t["change"] for t in top]
    assert changes == sorted(changes, reverse=True)
    assert any(p.name.startswith("pool_") for p in pools.iterdir())  # the pool was cached
    assert any(p.name.startswith("matrix_") for p in pools.iterdir())  # and its matrix
    # the scoring of the pool shows a bar on stderr, stdout keeps only the JSON (QA 25 #1: 12-22 s silent)
    assert "scoring pool:4:" in err and "scored 4 queries" in err.replace("\r", "\n")


def test_a_pool_sample_the_group_commands_name_can_be_queried_on_its_own(cli, pools):
    """QA round 20: group/reverse/copy-check name pool samples ``pool:I`` but their JSON had no pool seed
    (group's not even the set), and ``query --query pool:I`` was refused, so a script could not follow up
    a flagged sample.  Now every pool JSON says its seed and key, and the query scores the very image."""
    rc, out, err = cli("reverse", "--train", "17", "--queries", "pool:4", "--pool-seed", "3", "--pool-dir",
                       str(pools), "--top-k", "4", "--methods", "kfac", "--auto-build", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert (res["queries"], res["pool_seed"]) == ("pool:4", 3) and res["queries_key"].endswith("-s3-n4")
    rc, out, err = cli("group", "--remove", "train:17", "--queries", "pool:4", "--pool-seed", "3", "--pool-dir",
                       str(pools), "--methods", "kfac", "--json")
    assert rc == 0, err
    assert {k: json.loads(out)[k] for k in ("queries", "queries_key", "pool_seed")} == {
        k: res[k] for k in ("queries", "queries_key", "pool_seed")}
    rc, out, err = cli("group", "--remove", "train:17", "--queries", "pool:4", "--pool-seed", "3", "--pool-dir",
                       str(pools), "--methods", "kfac")
    assert rc == 0 and "queries pool:4 (pool seed 3)" in out, out
    last = res["methods"]["kfac"]["top"][-1]  # the least supported of the four: any of them must do
    rc, out, err = cli("query", "--query", last["query"], "--pool-seed", "3", "--pool-dir", str(pools),
                       "--methods", "kfac", "--top-k", "64", "--json")
    assert rc == 0, err
    q = json.loads(out)
    assert q["query"]["spec"] == last["query"] and any("pool seed 3" in n for n in q["query"]["notes"])
    score17 = [t["score"] for t in q["methods"]["kfac"]["top"] if t["index"] == 17]
    assert score17 == [pytest.approx(last["change"], rel=1e-4)]  # removing train:17 changes it by its score
    # the query's own settings say which pool (QA 44 #3: only "pool:I" and an image digest), so a saved answer reruns
    assert q["query"]["origin"] == {"pool_seed": 3, "pool_size": 4}
    out_npz = pools / "pool_query_scores.npz"
    rc, out, err = cli("query", "--query", last["query"], "--pool-seed", "3", "--pool-dir", str(pools),
                       "--methods", "kfac", "--scores-out", str(out_npz))
    assert rc == 0, err
    with np.load(out_npz) as z:
        saved = json.loads(str(z["settings"]))
    assert (saved["query"], saved["pool_seed"], saved["pool_size"]) == (last["query"], 3, 4)
    out_npz.unlink()
    # no pool of that seed cached: said, with how to draw one; a pool option without a pool query: refused
    rc, out, err = cli("query", "--query", "pool:1", "--pool-seed", "7", "--pool-dir", str(pools))
    assert rc == 2 and "no cached pool of seed 7" in err and "--queries pool:N --pool-seed 7" in err, err
    rc, out, err = cli("query", "--query", "gallery:0", "--pool-seed", "3")
    assert rc == 2 and "go with --query pool:N" in err, err
    rc, out, err = cli("query", "--query", "pool:4", "--pool-seed", "3", "--pool-dir", str(pools))
    assert rc == 2 and "holds sample 4" in err, err


def test_group_and_reverse_json_record_each_methods_damping(cli):
    """The scores depend on the damping, but group and reverse JSON did not say which (QA); each method's
    entry now has ``damping``, as in ``query --json``: the one asked for, else the preset's."""
    rc, out, err = cli("query", "--query", "gallery:0", "--methods", "kfac,trak", "--auto-build", "--json")
    assert rc == 0, err
    default = {n: e["damping"] for n, e in json.loads(out)["methods"].items()}
    assert default["kfac"] != 1e-3 and default["trak"] != 2e-2
    rc, out, err = cli("group", "--remove", "label:3", "--methods", "kfac,trak", "--damping", "kfac=1e-3", "--json")
    assert rc == 0, err
    res = json.loads(out)["methods"]
    assert res["kfac"]["damping"] == 1e-3 and res["trak"]["damping"] == default["trak"]
    rc, out, err = cli("reverse", "--train", "5", "--methods", "kfac,trak", "--damping", "trak=2e-2", "--json")
    assert rc == 0, err
    res = json.loads(out)["methods"]
    assert res["kfac"]["damping"] == default["kfac"] and res["trak"]["damping"] == 2e-2


def test_group_reverse_and_copy_check_warn_below_kfacs_damping_floor(cli):
    """QA 32 #7's warning reached single queries only: group sums, reverse rankings and copy-check shares at
    --damping kfac=1e-15 (below the float32 factors' resolution floor) said nothing. Each now prints it and carries
    damping_floor and warning in its JSON, as query --json does; at the floor itself there is none."""
    rc, out, err = cli("build", "--methods", "kfac,trak")
    assert rc == 0, err
    rc, out, err = cli("query", "--query", "gallery:0", "--methods", "kfac", "--json")
    assert rc == 0, err
    floor = json.loads(out)["methods"]["kfac"]["damping_floor"]
    assert 0 < floor < 1e-6
    low = f"kfac={floor / 1e3:.3e}"
    for argv, entry in (
        (("group", "--remove", "label:3", "--methods", "kfac,trak"), lambda d: d["methods"]["kfac"]),
        (("reverse", "--train", "5", "--methods", "kfac,trak"), lambda d: d["methods"]["kfac"]),
        (("copy-check", "--queries", "gallery"), lambda d: d),
    ):
        rc, out, err = cli(*argv, "--damping", low, "--json")
        assert rc == 0, err
        e = entry(json.loads(out))
        assert e["damping_floor"] == pytest.approx(floor) and "below the float32 factors' resolution" in e["warning"]
        assert "warning: kfac: damping" in err, (argv, err)
        rc, out, err = cli(*argv, "--damping", f"kfac={floor * 1.01:.6e}", "--json")
        assert rc == 0 and "warning" not in entry(json.loads(out)) and "warning: kfac" not in err, err
    rc, out, err = cli("group", "--remove", "label:3", "--methods", "kfac,trak", "--damping", low, "--json")
    assert "damping_floor" not in json.loads(out)["methods"]["trak"]  # a method with no such floor says none


@pytest.mark.parametrize(
    "argv, message",
    [
        (("group", "--remove", "label:11"), "unknown label 11"),
        (("group", "--remove", "train:3,99"), "out of range"),
        (("group", "--remove", "train:1", "--methods", "pixel"), "similarity"),
        (("group", "--remove", "train:1", "--queries", "pool:abc"), "bad pool size"),
        (("reverse", "--train", "64"), "out of range"),
        # refused before the pool's sampling bar starts (torch's own message was "Overflow")
        (("group", "--remove", "train:1", "--queries", "pool:2", "--pool-seed", str(2**64)),
         "error: pool seed (--pool-seed) must be an integer from 0 to"),
        (("copy-check", "--method", "pixel"), "copy-check --method pixel: a similarity has no influence mass"),
        (("copy-check", "--method", "kfac,trak"), "copy-check --method takes one method"),
        # accepted and ignored before (QA 15: --method and --methods side by side, unexplained)
        (("copy-check", "--methods", "trak"), "copy-check takes one influence method with --method"),
        # accepted before, listing no sample (0) or all but the last (-1)
        (("copy-check", "--top-k", "0"), "error: --top-k must be at least 1, got 0"),
        (("copy-check", "--top-k", "-1"), "error: --top-k must be at least 1, got -1"),
        # taken as a slice before: all members but the last two
        (("group", "--remove", "train:1", "--strongest", "-2"), "error: --strongest must be 0 (none listed) or more"),
        # the library's "empty range" was caught by its own except ValueError: "'20-10' is not an integer"
        (("group", "--remove", "train:20-10"), "the range '20-10' in"),
        (("group", "--remove", "train:5,20-10"), "is reversed; write 10-20"),
        (("reverse", "--remove", "train:1,9-3"), "the range '9-3' in"),
        (("group", "--remove", "train:1", "--damping", "pixel=1e-4"), "pixel has no damping"),
    ],
)
def test_bad_input_is_one_line_error(cli, argv, message):
    rc, out, err = cli(*argv)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("argv, message", [
    (("copy-check", "--near-copy-ratio", "0"), "argument --near-copy-ratio: must lie in (0, 1), got 0.0"),
    # r <= 1 always: a ratio of 1 flagged every sample and every training image (QA 32)
    (("copy-check", "--near-copy-ratio", "1"), "argument --near-copy-ratio: must lie in (0, 1), got 1.0"),
    (("copy-check", "--near-copy-ratio", "x"), "argument --near-copy-ratio: expected a number, got 'x'"),
    (("copy-check", "--neighbours", "0"), "argument --neighbours: must be at least 1, got 0"),
])
def test_a_bad_near_copy_rule_is_refused_while_parsing(argv, message, capsys):
    from engine.cli.parser import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(list(argv))
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


def test_a_similarity_is_refused_before_the_session_loads(cli, monkeypatch):
    """QA 30b #6: ``reverse --train 5 --methods pixel`` loaded the session (~10 s), then said pixel "cannot be
    summed over a group" though no group was given; now refused at once, in words that fit one image."""
    import engine.cli.groups as groups_cli

    def no_session(args):
        raise AssertionError("the session was opened")

    monkeypatch.setattr(groups_cli, "open_session", no_session)
    for argv in (("reverse", "--train", "5", "--methods", "kfac,pixel"), ("group", "--remove", "label:3", "--methods",
                                                                          "clip")):
        rc, out, err = cli(*argv)
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert "a similarity, not a removal prediction" in err and "summed over a group" not in err, err
        # the shipped ones, then any a contributor's file adds (QA 70 F2: the whole list was pinned)
        assert re.search(r"use influence methods \(kfac, trak, dtrak[,)]", err), err


def test_group_and_reverse_answer_every_repeated_remove(cli):
    """``--remove label:3 --remove label:8`` kept only the last group, silently.  Each group now gets its own
    answer from the one matrix: the same as asking for it alone."""
    alone = {}
    for g in ("label:3", "label:8"):
        rc, out, err = cli("group", "--remove", g, "--methods", "kfac", "--auto-build", "--json")
        assert rc == 0, err
        alone[g] = json.loads(out)
    rc, out, err = cli("group", "--remove", "label:3", "--remove", "label:8", "--methods", "kfac", "--json")
    assert rc == 0, err
    assert json.loads(out) == {"groups": [alone["label:3"], alone["label:8"]]}
    rc, out, err = cli("group", "--remove", "label:3", "--remove", "label:8", "--methods", "kfac", "--strongest", "0")
    assert rc == 0 and "group label:3" in out and "group label:8" in out and "strongest" not in out, out
    rc, out, err = cli("reverse", "--remove", "label:3", "--remove", "train:5", "--methods", "kfac", "--top-k", "2",
                       "--json")
    assert rc == 0, err
    assert [g["group"]["spec"] for g in json.loads(out)["groups"]] == ["label:3", "train:5"]
    rc, out, err = cli("reverse", "--remove", "label:3", "--remove", "train:5", "--methods", "kfac", "--top-k", "2")
    assert rc == 0 and "what label:3 supports most" in out and "what train:5 supports most" in out, out


def test_copy_check_json(cli, pools):
    rc, out, err = cli("copy-check", "--queries", "pool:4", "--pool-dir", str(pools), "--auto-build", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert len(res["rows"]) == 4 and "not proof" in res["caveat"]
    rel = [r["relative_distance"] for r in res["rows"]]
    assert rel == sorted(rel)
    for r in res["rows"]:
        assert 0.0 <= r["top1_share"] <= r["top5_share"] <= 1.0
        assert r["near_copy"] == (r["relative_distance"] < 0.5)
    assert np.isfinite(res["training_flag_rate"])
    assert res["rule"] == {"neighbours": 50, "near_copy_ratio": 0.5, "neighbours_used": 50}
    # a looser rule, recorded with what it flagged (the pool's matrix is cached: no second scoring)
    rc, out, err = cli("copy-check", "--queries", "pool:4", "--pool-dir", str(pools), "--json",
                       "--near-copy-ratio", "0.9", "--neighbours", "7")
    assert rc == 0, err
    loose = json.loads(out)
    assert loose["rule"] == {"neighbours": 7, "near_copy_ratio": 0.9, "neighbours_used": 7}
    assert all(r["neighbours"] == 7 and r["near_copy"] == (r["relative_distance"] < 0.9) for r in loose["rows"])
    # more neighbours than the training set has others: the record says how many were averaged (QA 32)
    rc, out, err = cli("copy-check", "--queries", "pool:4", "--pool-dir", str(pools), "--json", "--neighbours", "5000")
    assert rc == 0, err
    many = json.loads(out)
    assert many["rule"]["neighbours"] == 5000 and many["rule"]["neighbours_used"] == many["rows"][0]["neighbours"] == 63
    rc, out, err = cli("copy-check", "--queries", "pool:4", "--pool-dir", str(pools), "--near-copy-ratio", "0.8")
    assert rc == 0 and "under 0.8 x the mean distance to the next 50" in out, out
    assert loose["training_flag_rate"] > res["training_flag_rate"]


def test_group_retrain_with_nothing_finished_keeps_the_last_results(cli, tmp_path):
    """``group-retrain --no-train`` before any model is finished wrote ``"groups": []`` over the last
    record and exited 0 (QA); it now says so, exit 2, and leaves the file as it was."""
    results = tmp_path / "results"
    results.mkdir()
    earlier = results / "group_retrain_tiny.json"
    earlier.write_text('{"groups": [{"spec": "label:2"}]}')  # the same group: not refused as another's (QA 48 #1)
    rc, out, err = cli("group-retrain", "--remove", "label:2", "--no-train", "--out", str(tmp_path / "models"),
                       "--results", str(results), "--methods", "kfac")
    assert rc == 2 and "no group's retrained model is finished yet" in err and "left as it was" in err, err
    assert earlier.read_text() == '{"groups": [{"spec": "label:2"}]}'


def test_an_influence_method_with_non_finite_scores_is_refused_on_the_group_paths(cli):
    """QA round 19: a query refused NaN scores, but `group` printed `+nan`, `group --json` wrote a bare NaN
    (invalid JSON) and `reverse` ranked the NaN rows first. The matrix path now refuses them as a query does,
    naming the method's code (it keeps no cache, so "rebuild the cache" would not help); the other method's
    answer is strict JSON."""
    from distance_methods import PixelDistance

    from engine.attribution.methods import register, unregister

    class Distance(PixelDistance):
        nan_every = 0

        def prepare(self, ctx, query, query_grad):
            scores = -self.distances(ctx, query)
            if self.nan_every:
                scores[:: self.nan_every] = np.nan
            return FixedScores(scores=scores.astype(np.float32))

    class HalfNaN(Distance):
        name, title, nan_every = "halfnan", "Half NaN", 2

    register(Distance)
    register(HalfNaN)
    try:
        rc, out, err = cli("group", "--remove", "label:3", "--queries", "gallery", "--methods", "halfnan,distance",
                           "--json")
        assert rc == 0, err
        assert "halfnan error: 96 of 192 scores are not finite" in err  # 3 queries x 64 images, every other one
        assert "halfnan keeps no cache, so its scoring code produced them" in err and "rebuild" not in err
        res = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
        assert list(res["methods"]) == ["distance"]
        rc, out, err = cli("reverse", "--remove", "label:3", "--queries", "gallery", "--methods", "halfnan")
        assert rc == 2 and "no method could score these queries" in err and "nan" not in out.lower()
    finally:
        unregister("halfnan")
        unregister("distance")


def test_copy_check_json_says_what_its_shares_were_computed_with(cli):
    """QA round 20: copy-check --json carried no damping, model or settings, so two runs at two dampings
    could not be told apart; it now carries them as group and reverse do."""
    from distance_methods import PixelDistance

    from engine.attribution.methods import register, unregister

    class Near(PixelDistance):
        name, title, damping_default = "near", "Near", 0.5

        def prepare(self, ctx, query, query_grad):
            return FixedScores(scores=(1.0 / (self.distances(ctx, query) + 1e-3)).astype(np.float32))

        def score(self, prepared, damping=None):
            return prepared.scores / (self.default_damping if damping is None else damping)

    register(Near)
    try:
        rc, out, err = cli("copy-check", "--queries", "gallery", "--method", "near", "--damping", "near=2", "--json")
        assert rc == 0, err
        res = json.loads(out)
        assert res["method"] == "near" and res["damping"] == 2.0 and res["measurement"] == "loss"
        assert res["model"]["checkpoint_hash"] and "attribution" in res and res["queries_key"]
        assert "kfac_damping_default" in res["attribution"] and "kfac_damping" not in res["attribution"]
    finally:
        unregister("near")


def test_the_attribution_seed_has_a_flag_that_keys_the_caches(cli):
    """QA round 21: the attribution seed keys every cache and seeds every draw, but only a preset file could set
    it (and such a file did not inherit the preset it named).  --attribution-seed sets it: a cache built at the
    preset's seed does not answer for another, and the build command printed carries the flag."""
    rc, out, err = cli("query", "--query", "train:3", "--methods", "kfac", "--json", "--auto-build")
    assert rc == 0, err
    rc, out, err = cli("query", "--query", "train:3", "--methods", "kfac", "--attribution-seed", "7", "--json")
    assert rc == 2 and "--attribution-seed 7" in err, err  # not built for this seed: the command to build it
    rc, out, err = cli("query", "--query", "train:3", "--methods", "pixel", "--attribution-seed", "-1")
    assert rc == 2 and "attribution.seed (--attribution-seed) must be an integer from 0" in err, err


def test_a_pool_is_not_drawn_when_no_method_asked_for_can_score_it(cli, tmp_path):
    """QA 27 #17: with nothing built, copy-check and reverse drew the whole pool (minutes at pool:256) and then said
    "not built".  Now that comes first, with the build command; --auto-build still builds after the first pass."""
    for argv in (("copy-check",), ("reverse", "--train", "3", "--methods", "kfac,trak")):
        rc, out, err = cli(*argv, "--queries", "pool:2", "--pool-dir", str(tmp_path / "p"), "--attribution-seed", "9")
        line = err.strip().splitlines()[-1]
        assert rc == 2 and line.startswith("error: no method asked for can score: kfac: not built"), err
        assert "attribution-engine build" in line and "--attribution-seed 9" in line and "--auto-build" in line
        assert not (tmp_path / "p").exists()


def test_copy_check_help_offers_only_its_own_method_option(capsys):
    """QA 27 #12: copy-check's help listed group's --methods, which copy-check refuses (it takes one --method);
    the measurement list of the three commands lacked elbo-exact, which they accept."""
    from engine.cli.parser import build_parser

    parser = build_parser()
    for command, has_methods in (("copy-check", False), ("reverse", True), ("group", True)):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = capsys.readouterr().out
        assert ("--methods" in text) == has_methods, command
        assert "elbo-exact" in "".join(text.split()), command  # argparse may wrap it after the hyphen


def test_the_true_measurements_draws_have_a_name_of_their_own():
    """QA 27 #13: ``--mc-samples`` is the attribution's M in build, query and the group commands, but the draws of
    each TRUE measurement in lds, retrain-top and lds-ablation.  These take ``--true-mc-samples`` (group-retrain's
    name); ``--mc-samples`` stays an alias there, so existing commands keep their meaning."""
    from engine.cli.parser import build_parser

    parser = build_parser()
    for command, extra in (("lds", []), ("retrain-top", ["--query", "gallery:0"]), ("lds-ablation", ["--run", "r"])):
        for flag in ("--true-mc-samples", "--mc-samples"):
            args = parser.parse_args([command, *extra, flag, "8"])
            assert args.mc_samples == 8, (command, flag)
        assert "--true-mc-samples" in parser._subparsers._group_actions[0].choices[command].format_help()


def test_group_retrain_refuses_to_replace_a_record_of_other_settings(cli, tmp_path):
    """QA 48 #1: a group-retrain of other groups or steps silently replaced the shipped record; refused now before any
    training, naming the settings and both ways out (--results DIR, --replace-results)."""
    results = tmp_path / "results"
    results.mkdir()
    earlier = results / "group_retrain_tiny.json"
    text = '{"config": {"steps": 999999}, "groups": [{"spec": "label:2", "comparison": {"kfac": {}}}]}'
    earlier.write_text(text)
    args = ("group-retrain", "--remove", "label:2", "--no-train", "--out", str(tmp_path / "models"),
            "--results", str(results), "--methods", "kfac")
    rc, out, err = cli(*args)
    assert rc == 2 and "steps 999999 there" in err and "--results DIR" in err and "--replace-results" in err, err
    assert earlier.read_text() == text and not (tmp_path / "models").exists()
    rc, out, err = cli(*args, "--replace-results")  # goes on, to the next check (nothing trained yet)
    assert rc == 2 and "no group's retrained model is finished yet" in err, err


def test_group_retrain_with_other_steps_measures_against_a_same_steps_reference(cli, tmp_path):
    """QA 48 #4: with --steps below the full model's, the "measured change" was the training-length gap (+0.135 on
    every sample); a reference model of the full training set, trained as long with the same seed, is the baseline
    now, said in a notice and recorded (reference_steps, full_steps)."""
    from pathlib import Path

    from engine.evaluation.group_retrain import reference_model
    from engine.evaluation.runs import is_finished
    from engine.model.checkpoint import checkpoint_hash

    models, results = tmp_path / "models", tmp_path / "results"
    rc, out, err = cli("group-retrain", "--remove", "label:2", "--steps", "3", "--true-mc-samples", "4", "--out",
                       str(models), "--results", str(results), "--methods", "kfac")
    assert rc == 0, err
    assert "notice: --steps 3 differs from the full model's" in err and "reference model" in err
    record = json.loads((results / "group_retrain_tiny.json").read_text())
    c = record["config"]
    assert c["reference_steps"] == 3 and c["full_steps"] != 3 and "changes against a reference" in out
    folder = Path(record["groups"][0]["model"]).parent.parent
    ref = reference_model(folder, record["config"]["checkpoint_hash"], 3)
    assert is_finished(ref) and checkpoint_hash(ref) != record["config"]["checkpoint_hash"]
    full = np.asarray(record["groups"][0]["full_measurement"])
    mfile = next((ref / "measurements").glob("*.json"))
    assert np.allclose(full, json.loads(mfile.read_text())["values"])  # the reference's losses, not the full model's
