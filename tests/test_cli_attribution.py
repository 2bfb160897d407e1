"""`attribution-engine build` and `query` on a tiny checkpoint and 64 digits."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from test_session import TINY_ATTRIBUTION, tiny_checkpoint

import engine.attribution.session
from engine.attribution.methods import method_names
from engine.cli.parser import main

SMALL = ["--mc-samples", "4", "--trak-dim", "32"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, digits_small):
    folder = tmp_path_factory.mktemp("cli_ckpt")
    tiny_checkpoint(folder, digits_small)
    return folder, tmp_path_factory.mktemp("cli_cache")


@pytest.fixture
def cli(setup, digits_small, monkeypatch, capsys):
    """Run the CLI in-process on the tiny checkpoint, the 64-digit slice and a private cache."""
    folder, cache = setup
    monkeypatch.setattr(engine.attribution.session, "load_dataset", lambda cfg: digits_small)

    def run(*argv: str) -> tuple[int, str, str]:
        rc = main([*argv, "--checkpoint", str(folder), "--device", "cpu", "--cache-root", str(cache), *SMALL])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def test_build_then_query_json(cli, tmp_path):
    rc, out, err = cli("build", "--methods", "kfac,trak,pixel")
    assert rc == 0, err
    # each method with a pass says what it will do first (QA 34 #9: TRAK said nothing), in images x draws as its bar
    plans = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in err.splitlines()
             if line.split(": ", 1)[0] in ("kfac", "trak")}
    assert "then a gradient pass over 64 images x 4 draws for the bank" in plans["kfac"], err
    assert plans["trak"].startswith("training-loss gradients of 64 images x 4 draws, projected to 32 of ") and \
        plans["trak"].endswith(" dimensions (from kfac's gradient pass, not a pass of its own)"), err
    for name in ("kfac", "trak", "pixel"):
        assert any(line.startswith(name) and " ok " in line for line in out.splitlines()), out
    assert "total" in out

    scores = tmp_path / "scores.npz"
    rc, out, err = cli(
        "query", "--query", "train:3", "--methods", "kfac,trak,dtrak,pixel", "--top-k", "5",
        "--damping", "1e-3", "--json", "--scores-out", str(scores),
    )
    assert rc == 0, err
    res = json.loads(out)
    assert set(res) == {"model", "query", "measurement", "methods", "timing_ms", "attribution", "code", "threads"}
    assert res["code"]["version"] and res["threads"] >= 1  # which code, and at how many threads (QA round 21)
    assert res["model"]["num_train"] == 64 and len(res["model"]["checkpoint_hash"]) == 16  # which model scored
    assert res["attribution"]["mc_samples"] == res["query"]["mc_samples"]  # the cache settings, whole
    assert res["measurement"] == "loss" and res["query"]["spec"] == "train:3"
    assert res["timing_ms"]["total"] > 0
    assert set(res["methods"]) == {"kfac", "trak", "dtrak", "pixel"}
    for name in ("kfac", "trak", "pixel"):
        m = res["methods"][name]
        assert m["status"] == "ok", m
        assert len(m["top"]) == 5 and len(m["bottom"]) == 5
        assert set(m["top"][0]) == {"index", "score", "label", "exact"} and m["top"][0]["exact"] is True
        assert m["top"][0]["score"] >= m["top"][-1]["score"] >= m["bottom"][-1]["score"] >= m["bottom"][0]["score"]
        assert {"gradient", "prepare", "score"} <= set(m["timing_ms"])
    assert res["methods"]["kfac"]["damping"] == pytest.approx(1e-3)
    assert res["methods"]["kfac"]["kind"] == "influence" and res["methods"]["pixel"]["kind"] == "similarity"
    assert "damping" not in res["methods"]["pixel"]
    # D-TRAK was not built: reported, with the command that builds it
    d = res["methods"]["dtrak"]
    assert d["status"] == "unavailable" and "--methods dtrak" in d["reason"] and d["top"] == []
    assert d["reason_about"] == "server" and "reason_about" not in res["methods"]["kfac"]
    with np.load(scores) as z:
        assert z["kfac"].shape == (64,) and z["pixel"].shape == (64,)
        assert "dtrak" not in z.files
        # the file says what its scores were computed with (a download of two dampings could not be told apart)
        saved = json.loads(str(z["settings"]))
        assert saved["methods"]["kfac"]["damping"] == pytest.approx(1e-3) and "damping" not in saved["methods"]["pixel"]
        assert saved["model"] == res["model"] and saved["query"] == "train:3" and saved["measurement"] == "loss"
        assert saved["mc_samples"] == res["query"]["mc_samples"] and "dtrak" not in saved["methods"]
        top = sorted(range(64), key=lambda i: -z["kfac"][i])[:5]
        assert top == [m["index"] for m in res["methods"]["kfac"]["top"]]
        stored_kfac = z["kfac"]
        # K-FAC's floor as the answer gave it; no warning at 1e-3 (QA 36 #8: a low damping's was not in the file)
        assert saved["methods"]["kfac"]["damping_floor"] == res["methods"]["kfac"]["damping_floor"]
        assert "warning" not in saved["methods"]["kfac"]
    low = tmp_path / "low.npz"
    rc, out, err = cli("query", "--query", "train:3", "--methods", "kfac", "--damping", "1e-15", "--json",
                       "--scores-out", str(low))
    assert rc == 0, err
    with np.load(low) as z:
        assert json.loads(str(z["settings"]))["methods"]["kfac"]["warning"] == json.loads(out)["methods"]["kfac"]["warning"]

    # --kfac-bank streamed: no bank, the same scores up to the stored bank's int8 rounding
    streamed = tmp_path / "streamed.npz"
    rc, out, err = cli(
        "query", "--query", "train:3", "--methods", "kfac", "--damping", "1e-3", "--kfac-bank", "streamed",
        "--json", "--scores-out", str(streamed),
    )
    assert rc == 0, err
    assert json.loads(out)["methods"]["kfac"]["status"] == "ok"
    with np.load(streamed) as z:
        from scipy.stats import spearmanr

        assert spearmanr(z["kfac"], stored_kfac).statistic > 0.99
        assert np.abs(z["kfac"] - stored_kfac).max() < 0.05 * np.abs(stored_kfac).max()

    # --kfac-bank compressed: the listed entries are re-ranked to exact scores (the stored bank's, up to int8)
    rc, out, err = cli(
        "query", "--query", "train:3", "--methods", "kfac", "--damping", "1e-3", "--kfac-bank", "compressed",
        "--kfac-compression", "8", "--kfac-rerank", "16", "--auto-build", "--json", "--top-k", "5",
    )
    assert rc == 0, err
    k = json.loads(out)["methods"]["kfac"]
    assert k["status"] == "ok" and k["bank"] == "compressed"
    assert res["methods"]["kfac"]["bank"] == "stored"
    for e in k["top"] + k["bottom"]:
        assert e["exact"] is True
        assert abs(e["score"] - stored_kfac[e["index"]]) < 0.05 * np.abs(stored_kfac).max()

    rc, out, err = cli("query", "--query", "gallery:0", "--measurement", "trajectory", "--methods", "kfac,pixel")
    assert rc == 0, err
    assert "[kfac]" in out and "proponents" in out and "most similar" in out


def test_query_says_when_a_compressed_end_may_miss_an_image(cli):
    """QA 55 #3: with few re-ranked candidates, images outside them may belong in the listed ends; ``query``
    says so in its text (a "ranking:" line) and its JSON (``ranking_check``, per end), and says nothing new
    when no estimate outside the candidates passes the listed exact scores (here: 2C = N, every score exact)."""
    query = ("query", "--query", "train:3", "--methods", "kfac", "--damping", "1e-3", "--kfac-bank", "compressed",
             "--kfac-compression", "8", "--auto-build")
    rc, out, err = cli(*query, "--kfac-rerank", "2", "--top-k", "2", "--json")
    assert rc == 0, err
    k = json.loads(out)["methods"]["kfac"]
    checks = k["ranking_check"]  # 2 x 2 candidates of 64 (whether an estimate passes them: test_compressed_bank.py)
    assert checks and all(set(c) == {"may_miss", "estimates_beyond", "rank"} for c in checks.values())
    fires = any(c["may_miss"] for c in checks.values())
    assert all(c["may_miss"] == (c["estimates_beyond"] > 0) for c in checks.values())
    rc, out, err = cli(*query, "--kfac-rerank", "2", "--top-k", "2")
    assert rc == 0, err
    lines = [x for x in out.splitlines() if x.startswith("  ranking: ")]
    assert len(lines) == int(fires)  # the text says it exactly when the JSON does
    assert all("outside the re-ranked candidates" in x and "may miss" in x and "`--kfac-rerank`" in x for x in lines)
    # QA 63 F3: past an end's 2 exact scores the list holds estimates, marked "~" in the text as "exact" in the JSON
    rc, out, err = cli(*query, "--kfac-rerank", "2", "--top-k", "4", "--json")
    assert rc == 0, err
    want = {end: [("" if e["exact"] else "~", e["index"]) for e in json.loads(out)["methods"]["kfac"][end]]
            for end in ("top", "bottom")}
    assert "~" in [m for m, _ in want["top"] + want["bottom"]]  # 2 x 2 candidates, 8 listed: some are estimates
    rc, out, err = cli(*query, "--kfac-rerank", "2", "--top-k", "4")
    assert rc == 0, err
    rows = [x for x in out.splitlines() if re.match(r"\s+[\w ()-:]+: #\d", x)]
    got = [[(m, int(i)) for i, m in re.findall(r"#(\d+)(?:\(\d+\))? (~?)[+-]", row)] for row in rows]
    assert got == [want["top"], want["bottom"]], out
    assert "  (~: an estimate, listed after its end's exact scores)" in out.splitlines()
    rc, out, err = cli(*query, "--kfac-rerank", "32", "--top-k", "5", "--json")  # 64 images: every one a candidate
    assert rc == 0, err
    k = json.loads(out)["methods"]["kfac"]
    assert k["ranking_check"] == {end: {"may_miss": False, "estimates_beyond": 0, "rank": 5} for end in ("top", "bottom")}
    rc, out, err = cli(*query, "--kfac-rerank", "32", "--top-k", "5")
    assert rc == 0 and "ranking:" not in out, err


def test_query_shows_a_compressed_banks_rerank_on_stderr(cli, monkeypatch):
    """QA 54 F6b: ``query --json`` on a compressed bank re-ranked 64 CIFAR candidates for 317 s on a CPU with
    nothing on stderr (its bar was drawn on a terminal only).  A re-rank that lasts (here: any, the bar's delay
    at 0) shows a bar counting candidates on stderr, log file or not; stdout stays the JSON alone."""
    import re

    import engine.attribution.rerank as rerank

    monkeypatch.setattr(rerank, "BAR_DELAY_S", 0.0, raising=False)
    rc, out, err = cli("query", "--query", "train:3", "--methods", "kfac", "--damping", "1e-3", "--kfac-bank",
                       "compressed", "--kfac-compression", "8", "--kfac-rerank", "16", "--auto-build", "--json")
    assert rc == 0, err
    assert json.loads(out)["methods"]["kfac"]["bank"] == "compressed"
    bars = [x for x in err.replace("\r", "\n").splitlines() if x.startswith("K-FAC re-rank: candidates' exact scores")]
    assert bars and re.search(r"100%.* 32/32 ", bars[-1]) and "candidate" in bars[-1], err


def test_query_errors_are_clear(cli):
    rc, _, err = cli("query", "--query", "train:1", "--methods", "kfac,magic")
    # every registered method is offered, in display order (a method added in one file included)
    assert rc == 2 and "magic" in err and ", ".join(method_names()) in err and "kfac, trak, dtrak" in err
    rc, _, err = cli("query", "--query", "train:1", "--measurement", "trajectory", "--methods", "pixel")
    assert rc == 2 and "trajectory" in err and "gallery:N" in err
    rc, _, err = cli("query", "--query", "image:/no/such/file.png", "--methods", "pixel")
    assert rc == 2 and "no image file" in err
    rc, _, err = cli("query", "--query", "train:1", "--measurement", "loss@t=0", "--methods", "pixel")
    assert rc == 2 and "out of range" in err
    rc, _, err = cli("precompute", "--out", "scores.txt")
    assert rc == 2 and err.startswith("error: --out must end in .npz"), err
    # a bad damping is refused even for a method left out of --methods
    rc, out, err = cli("query", "--query", "train:1", "--methods", "pixel", "--damping", "trak=-1")
    assert rc == 2 and out == "" and err.startswith("error: trak damping must be finite and > 0"), err


def test_query_refuses_what_it_used_to_ignore_or_answer_emptily(cli, tmp_path):
    """QA round 11: each of these exited 0 (a damping for a similarity was dropped, 1e39 made every score 0,
    --top-k 0 printed empty lists) or failed only after the scoring (--scores-out below a file)."""
    for spec in ("pixel=1e-4", "clip=1"):
        rc, out, err = cli("query", "--query", "train:1", "--methods", "pixel", "--damping", spec)
        name = spec.split("=")[0]
        assert rc == 2 and out == "" and err.startswith(f"error: --damping '{spec}': {name} has no damping"), err
    rc, out, err = cli("query", "--query", "train:1", "--methods", "pixel", "--damping", "kfac=1e39")
    assert rc == 2 and out == "" and err.startswith("error: kfac damping must be at most 1e+30"), err
    rc, out, err = cli("query", "--query", "train:1", "--methods", "pixel", "--top-k", "0")
    assert rc == 2 and out == "" and err.strip() == "error: --top-k must be at least 1, got 0", err
    blocker = tmp_path / "scores"
    blocker.write_text("a file")
    rc, out, err = cli("query", "--query", "train:1", "--methods", "pixel", "--scores-out", str(blocker / "s.npz"))
    assert rc == 2 and out == "" and err.strip() == f"error: --scores-out {blocker / 's.npz'}: {blocker} is a file, not a folder"


def test_query_text_headings_follow_the_signs_of_the_scores(cli):
    """With --top-k N every score is listed at both ends: the k highest included negative scores, printed
    under "proponents:", and the k lowest positive ones under "opponents:".  The headings now say which
    are not; on this tiny model, square-norm of gallery:1 has both signs and the loss of train:2 only
    positive scores."""
    def signs(*argv: str) -> tuple[int, int]:
        rc, out, err = cli("query", *argv, "--methods", "kfac", "--top-k", "64", "--auto-build", "--json")
        assert rc == 0, err
        scores = [t["score"] for t in json.loads(out)["methods"]["kfac"]["top"]]
        assert len(scores) == 64
        return sum(v > 0 for v in scores), sum(v < 0 for v in scores)

    mixed = ("--query", "gallery:1", "--measurement", "square-norm")
    pos, neg = signs(*mixed)
    assert pos and neg  # the premise: neither end is all proponents or all opponents
    rc, out, err = cli("query", *mixed, "--methods", "kfac", "--top-k", "64")
    assert rc == 0, err
    assert "proponents:" not in out and "opponents:" not in out, out
    assert f"highest scores ({64 - pos} of 64 not positive: not proponents): #" in out, out
    assert f"lowest scores ({64 - neg} of 64 not negative: not opponents): #" in out, out

    assert signs("--query", "train:2") == (64, 0)
    rc, out, err = cli("query", "--query", "train:2", "--methods", "kfac", "--top-k", "3")
    assert rc == 0, err
    assert "   proponents: #" in out and "lowest scores (none negative: no opponents): #" in out, out


def test_every_cache_setting_is_a_flag_of_build_and_query_and_its_range_is_checked(setup, digits_small, monkeypatch,
                                                                                    capsys):
    """SETTING_FLAGS is what the CLI reads into the config and what printed build commands write back: each
    flag is an option of build and query whose dest is the field; bad values are refused by the session's
    validation (exit 2, the flag named) before any work."""
    from engine.cli.parser import build_parser
    from engine.config import SETTING_FLAGS, AttributionConfig

    subs = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in ("build", "query"):
        options = {o: a.dest for a in subs[command]._actions for o in a.option_strings}
        for field, flag in SETTING_FLAGS.items():
            assert options.get(flag) == field and hasattr(AttributionConfig, field), (command, flag)
    folder, cache = setup
    monkeypatch.setattr(engine.attribution.session, "load_dataset", lambda cfg: digits_small)
    for bad, message in ((["--mc-samples", "0"], "mc_samples (--mc-samples) must be at least 1"),
                         (["--trak-dim", "0"], "trak_dim (--trak-dim) must be at least 1"),
                         (["--kfac-factor-draws", "0"], "kfac_factor_draws must be at least 1"),
                         (["--kfac-bank", "nope"], "kfac_bank must be one of auto, stored, streamed, compressed")):
        rc = main(["build", "--methods", "pixel", "--checkpoint", str(folder), "--device", "cpu",
                   "--cache-root", str(cache), *bad])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and message in err, err


def test_build_of_a_named_method_that_cannot_be_built_fails(cli):
    """CLIP has no weights here: asked for by name its build fails (exit 1, the reason on stderr); the
    other methods named with it are still built and listed."""
    rc, out, err = cli("build", "--methods", "pixel,clip", "--preset", "digits")  # digits' CLIP: the openai weights
    assert rc == 1 and "error: clip:" in err
    assert any(line.startswith("pixel") and " ok " in line for line in out.splitlines()), out
    assert any(line.startswith("clip") and "unavailable" in line for line in out.splitlines()), out


def test_query_that_no_method_answers_fails(cli):
    """Every requested method unavailable (CLIP has no weights here): the statuses are still printed, but
    the exit status says nothing was scored, as group and reverse do."""
    rc, out, err = cli("query", "--query", "train:1", "--methods", "clip", "--json", "--preset", "digits")
    assert rc == 2 and "no method could score this query" in err
    clip = json.loads(out)["methods"]["clip"]
    assert clip["status"] != "ok" and clip["reason"]
    assert clip["reason_about"] == "server"  # no weights on this machine: whoever runs it can add them
    rc, out, err = cli("query", "--query", "train:1", "--methods", "clip,pixel", "--json", "--preset", "digits")
    assert rc == 0, err
    assert json.loads(out)["methods"]["pixel"]["status"] == "ok"


def test_blank_image_query_says_pixel_cannot_rank_it(cli, tmp_path):
    """A constant image has no pixel correlation with anything: pixel says so (and nothing else was asked
    for, so the query fails) instead of listing the training set in index order with zero scores."""
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "blank.png")
    rc, out, err = cli("query", "--query", f"image:{tmp_path / 'blank.png'}", "--methods", "pixel", "--json")
    assert rc == 2 and "no method could score this query" in err
    pixel = json.loads(out)["methods"]["pixel"]
    assert pixel["status"] == "unavailable" and "query image is blank" in pixel["reason"], pixel
    assert pixel["reason_about"] == "query"  # the query's problem, not the server's: another query would do


def test_build_on_an_unwritable_cache_root_fails_at_once(setup, digits_small, monkeypatch, capsys, tmp_path):
    """A cache root under a regular file cannot hold caches (chmod would not stop root): one error line
    naming the root, exit 2, no "waiting for another build" bar and no table; pixel keeps no cache, so
    building it alone there still succeeds."""
    folder, _ = setup
    monkeypatch.setattr(engine.attribution.session, "load_dataset", lambda cfg: digits_small)
    root = tmp_path / "a-file"
    root.write_text("not a folder")
    argv = ["--checkpoint", str(folder), "--device", "cpu", "--cache-root", str(root), *SMALL]
    rc = main(["build", "--methods", "trak,pixel", *argv])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", out
    assert err.count("\n") == 1 and err.startswith(f"error: cache root {root} is not writable"), err
    assert main(["build", "--methods", "pixel", *argv]) == 0
    assert root.read_text() == "not a folder"


@pytest.fixture(scope="module")
def bench_session(setup, digits_small, tmp_path_factory):
    from test_session import TINY_ATTRIBUTION

    from engine.attribution.session import AttributionSession

    folder, _ = setup
    s = AttributionSession(
        "digits", checkpoint=folder, device="cpu", cache_root=tmp_path_factory.mktemp("bench_cache"),
        config=TINY_ATTRIBUTION, dataset=digits_small,
    )
    s.build(["kfac", "pixel"])
    return s


def test_bench_pieces_int8_agreement_and_table(bench_session):
    from engine.bench import attribution as bench
    from engine.bench.report import format_table

    s = bench_session
    queries = [s.parse_query(f"gallery:{i}") for i in range(2)] + [s.parse_query("train:7")]
    results = [s.query(q, "loss", methods=["kfac", "pixel"]) for q in queries]
    q8 = bench.int8_vs_float32(s, results)
    assert q8["queries"] == 3 and q8["spearman_min"] >= 0.99  # docs/architecture.md §4: int8 keeps the ranking
    assert 0 < q8["relative_l2_error_median"] < 0.05
    anyd, grid, exact = bench.time_rescore(s, results)
    assert set(anyd) == {"kfac"} and anyd["kfac"] > 0 and set(grid) == set(exact) == {"kfac"}
    ag = bench.label_agreement(s, queries, results, k=10)
    assert 0 <= ag["kfac"] <= 1 and 0 <= ag["pixel"] <= 1 and 0 < ag["chance"] < 1
    from engine.model.label_classifier import classifier_for, classify

    qlab, _ = classify(classifier_for(s.preset, s.dataset), torch.stack([q.image for q in queries]))
    for name in ("kfac", "pixel"):
        per_query = [np.mean([it.label == y for it in r.methods[name].top(10, s.labels)])
                     for r, y in zip(results, qlab, strict=True)]
        lo, hi = ag["ci95"][name]  # an interval of the mean over queries: inside the queries' own range
        assert min(per_query) - 1e-12 <= lo <= ag[name] <= hi <= max(per_query) + 1e-12
        assert ag[name] == pytest.approx(np.mean(per_query))
    table = format_table(
        {
            "preset": "tiny", "mc_samples": 4, "device": "cpu", "threads": 1, "cache": "fresh temporary",
            "methods": ["kfac", "pixel"], "agreement_top10": ag, "int8_vs_float32": q8,
            "build": {"methods": {"kfac": {"status": "ok", "seconds": 1.0, "size_mb": 0.1}}},
        }
    )
    assert "int8 vs float32" in table and "kfac" in table and "bootstrap interval" in table
    # without a classifier the column is "-": the table says why (only the JSON did; QA)
    unlabelled = format_table({"preset": "own", "mc_samples": 4, "device": "cpu", "threads": 1, "cache": "reused",
                               "methods": ["kfac"], "build": {},
                               "agreement_top10": {"note": "needs a labelled data set with a classifier"}})
    assert "top-10 label agreement: not measured: needs a labelled data set with a classifier" in unlabelled


@pytest.mark.slow
def test_kronfluence_task_matches_our_loss_and_scores(bench_session):
    pytest.importorskip("kronfluence")
    from engine.bench import kronfluence as bench
    from engine.bench.report import format_table
    from engine.model.measurements import diffusion_loss

    s = bench_session
    train = s.ctx.train_draws
    assert train.batched  # per-example draws (the default): each example its own (t, eps)
    draws = train.for_rows(slice(0, 3))
    triples = bench._Triples(s.dataset.images[:3], draws.t, draws.eps)
    assert len(triples) == 3 * len(draws)
    x, t, eps = triples[len(draws) + 2]  # example 1, draw 2
    assert torch.equal(x, s.dataset.images[1]) and t == draws.t[1, 2] and torch.equal(eps, draws.eps[1, 2])
    shared = s.query_draws()  # shared draws (one set for every example) index the same way
    x, t, eps = bench._Triples(s.dataset.images[:3], shared.t, shared.eps)[len(shared) + 2]
    assert torch.equal(x, s.dataset.images[1]) and t == shared.t[2] and torch.equal(eps, shared.eps[2])
    task = bench._make_kronfluence_task(s.diffusion, s.shape)
    batch = [torch.stack(c) for c in zip(*[triples[j] for j in range(len(triples))], strict=True)]
    with torch.no_grad():
        per_example = [diffusion_loss(s.model, s.diffusion, s.dataset.images[i], train.example(i)) for i in range(3)]
        ours = torch.stack(per_example).mean() * len(triples)
        theirs = task.compute_measurement(batch, s.model)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    q = [s.parse_query("gallery:0")]
    res = [s.query(q[0], "loss", methods=["kfac"])]
    out = bench.compare_kronfluence(s, q, res, batch_size=64)
    assert out["queries"] == 1 and out["triples"] == 64 * len(draws)
    assert out["fit_factors_s"] > 0 and np.isfinite(out["spearman_median"])
    assert out["spearman_median"] > 0.3  # same influence up to K-FAC conventions and sampled labels
    assert out["ours_query_cpu_s_median"] > 0 and out["speedup_cpu"] == pytest.approx(
        out["score_one_query_cpu_s_median"] / out["ours_query_cpu_s_median"]
    )
    table = {"preset": "tiny", "mc_samples": 64, "device": "cpu", "threads": 1, "cache": "test", "methods": []}
    assert "same conditions" in format_table({**table, "kronfluence": out})


def test_gallery_query_on_an_empty_cache_answers_with_the_checkpoints_precomputed_scores(
    setup, digits_small, monkeypatch, capsys, tmp_path
):
    """A fresh clone's `query --query gallery:N` answers with the shipped gallery scores (marked
    precomputed) instead of "not built", for the methods the file holds at these settings only; a
    built cache is scored live; other settings (another M) find nothing to show."""
    import shutil

    folder, _ = setup
    ckpt = tmp_path / "ckpt"
    shutil.copytree(folder, ckpt)
    monkeypatch.setattr(engine.attribution.session, "load_dataset", lambda cfg: digits_small)

    def run(cache, *argv, small=SMALL, expect=0):
        rc = main([*argv, "--checkpoint", str(ckpt), "--device", "cpu", "--cache-root", str(cache), *small])
        out, err = capsys.readouterr()
        assert rc == expect, err
        return out

    built, empty = tmp_path / "built", tmp_path / "empty"
    run(built, "build", "--methods", "kfac,trak")
    run(built, "precompute", "--methods", "kfac,trak")
    query = ("query", "--query", "gallery:1", "--methods", "kfac,trak,dtrak", "--top-k", "64", "--json")
    live = json.loads(run(built, *query))
    shipped = json.loads(run(empty, *query))
    assert not (empty / "kfac").exists() and "precomputed_methods" not in live["query"]
    assert shipped["query"]["precomputed_methods"] == ["kfac", "trak"]
    assert any("precomputed gallery scores" in n and "--methods kfac,trak" in n for n in shipped["query"]["notes"])
    for name in ("kfac", "trak"):
        a, b = live["methods"][name], shipped["methods"][name]
        assert a["status"] == b["status"] == "ok" and b["reason"] == "precomputed" and "reason" not in a
        # every training image's score, to float16 with one scale per vector (ties may reorder the tail)
        sa = np.array([x["score"] for x in sorted(a["top"], key=lambda x: x["index"])])
        sb = np.array([x["score"] for x in sorted(b["top"], key=lambda x: x["index"])])
        assert sa.shape == sb.shape == (64,)
        np.testing.assert_allclose(sb, sa, atol=2e-3 * np.abs(sa).max())
        assert [x["index"] for x in a["top"][:3]] == [x["index"] for x in b["top"][:3]]
    # D-TRAK is in neither the cache nor the file: still "not built", with its command
    assert shipped["methods"]["dtrak"]["status"] == "unavailable"
    assert "--methods dtrak" in shipped["methods"]["dtrak"]["reason"]
    # TRAK at another damping is not in the file: "not built", and which dampings the file holds (QA 41 #5)
    trak_default = shipped["methods"]["trak"]["damping"]
    away = json.loads(run(empty, *query, "--damping", f"trak={trak_default * 10}"))
    assert away["methods"]["trak"]["status"] == "unavailable" and away["methods"]["kfac"]["reason"] == "precomputed"
    assert away["methods"]["trak"]["reason"].endswith(
        f"(the checkpoint's precomputed scores hold it at damping {trak_default:.3g} only)")
    assert "precomputed scores hold" not in shipped["methods"]["dtrak"]["reason"]  # not in the file at all
    # another M is another setting: the file's scores are not shown for it
    other = json.loads(run(empty, *query, small=["--mc-samples", "3", "--trak-dim", "32"], expect=2))  # nothing scored
    assert "precomputed_methods" not in other["query"] and other["methods"]["kfac"]["status"] == "unavailable"


def test_group_and_reverse_on_an_empty_cache_answer_over_the_gallery_from_the_precomputed_scores(
    setup, digits_small, monkeypatch, capsys, tmp_path
):
    """QA 44 #4: the app's Groups page answered over the gallery from the shipped scores on a fresh clone, while
    `group` and `reverse` refused ("not built") until a cold build.  Now they answer from the same matrices
    (``precomputed_groups``), marked precomputed, equal to the live sums to the file's 16-bit precision; a method
    the file lacks, another measurement and a generated pool still need the caches."""
    import shutil

    folder, _ = setup
    ckpt = tmp_path / "ckpt"
    shutil.copytree(folder, ckpt)
    monkeypatch.setattr(engine.attribution.session, "load_dataset", lambda cfg: digits_small)

    def run(cache, *argv, expect=0):
        rc = main([*argv, "--checkpoint", str(ckpt), "--device", "cpu", "--cache-root", str(cache), *SMALL])
        out, err = capsys.readouterr()
        assert rc == expect, err
        return out, err

    built, empty = tmp_path / "built", tmp_path / "empty"
    run(built, "build", "--methods", "kfac,trak")
    run(built, "precompute", "--methods", "kfac,trak")
    group = ("group", "--remove", "label:3", "--remove", "train:2,5", "--queries", "gallery", "--methods",
             "kfac,trak,dtrak", "--json")
    live = json.loads(run(built, *group, "--auto-build")[0])
    out, err = run(empty, *group)
    shipped = json.loads(out)
    assert not (empty / "kfac").exists()
    assert "note: kfac, trak: the checkpoint's precomputed gallery scores" in err and "--methods kfac,trak" in err
    assert "warning: dtrak unavailable" in err  # in neither the file nor the cache: still not built
    for a, b in zip(live["groups"], shipped["groups"], strict=True):
        assert a["group"] == b["group"] and set(b["methods"]) == {"kfac", "trak"}
        for name in ("kfac", "trak"):
            assert b["methods"][name]["precomputed"] is True and "precomputed" not in a["methods"][name]
            assert b["methods"][name]["damping"] == a["methods"][name]["damping"]
            ca = np.array([q["predicted_change"] for q in a["methods"][name]["queries"]])
            cb = np.array([q["predicted_change"] for q in b["methods"][name]["queries"]])
            # each member's score within 2^-11 of its sample's largest; a sum of k members within k times that
            k = a["group"]["size"]
            np.testing.assert_allclose(cb, ca, atol=k * 2e-3 * np.abs(ca).max())
    text_out, _ = run(empty, "reverse", "--train", "7", "--queries", "gallery", "--methods", "kfac")
    assert "[kfac] removing it would raise" in text_out and "precomputed gallery scores" in text_out
    # another measurement is not in the file: refused as before
    _, err = run(empty, "group", "--remove", "label:3", "--queries", "gallery", "--methods", "kfac",
                 "--measurement", "elbo", expect=2)
    assert "not built" in err and "note:" not in err


@pytest.mark.parametrize("draws", ["per-example", "shared"])
def test_bench_compressed_runs_with_either_kind_of_training_draws(setup, digits_small, tmp_path, draws):
    """``bench-compressed`` gave every training row the whole draw object: with per-example draws (the
    digits preset's) it crashed ('PerExampleDraws' object has no attribute 'to'; QA on a user's model)."""
    import dataclasses

    from test_session import TINY_ATTRIBUTION

    from engine.attribution.session import AttributionSession
    from engine.bench.compressed import run_compressed_digits

    folder, _ = setup
    s = AttributionSession("digits", checkpoint=folder, device="cpu", cache_root=tmp_path, dataset=digits_small,
                           config=dataclasses.replace(TINY_ATTRIBUTION, draws=draws))
    s.build(["kfac"])
    rec = run_compressed_digits(s, ratios=(8.0,), kinds=("gaussian",), candidates=4, build_examples=9,
                                timed_queries=1, rerank_timed=4, log=lambda m: None)
    (v,) = rec["variants"]
    assert v["build_s"] > 0 and -1.0 <= v["spearman_median"] <= 1.0


def test_not_built_names_the_settings_the_cache_holds(setup, digits_small, monkeypatch, capsys, tmp_path):
    """QA round 12: after ``build --mc-samples 8`` a default query said only "not built: run build ..."."""
    folder, _ = setup
    monkeypatch.setattr(engine.attribution.session, "load_dataset", lambda cfg: digits_small)
    common = ["--checkpoint", str(folder), "--device", "cpu", "--cache-root", str(tmp_path / "c"), "--trak-dim", "32"]
    assert main(["build", "--methods", "trak", "--mc-samples", "4", *common]) == 0
    capsys.readouterr()
    rc = main(["query", "--query", "train:1", "--methods", "trak,pixel", "--mc-samples", "2", "--json", *common])
    out, err = capsys.readouterr()
    assert rc == 0, err
    reason = json.loads(out)["methods"]["trak"]["reason"]
    assert reason.startswith("not built for these settings: the cache holds trak built with mc_samples 4 there, "
                             "2 asked: add --mc-samples 4 to use it; to build these, run `"), reason
    rc = main(["query", "--query", "train:1", "--methods", "trak", "--mc-samples", "4", "--json", *common])
    assert rc == 0 and json.loads(capsys.readouterr()[0])["methods"]["trak"]["status"] == "ok"  # the hint was right


def test_without_preset_a_checkpoint_is_attributed_with_its_own_settings(cli):
    """QA 33: with --checkpoint and no --preset, any model was attributed with the default preset's (digits')
    attribution settings: a model trained from a preset file with M = 8 got M = 64, and diffusers weights'
    attribution_preset.json was read for its data only. The checkpoint's own settings apply now (this tiny one
    recorded clip_pretrained None); a --preset the user names still decides, with a note when the checkpoint was
    trained as another preset, and the commands printed for a checkpoint's own settings name no --preset."""
    rc, out, err = cli("query", "--query", "train:1", "--methods", "pixel", "--json")
    assert rc == 0, err
    assert json.loads(out)["attribution"]["clip_pretrained"] is None and "note:" not in err
    rc, out, err = cli("query", "--query", "train:1", "--methods", "pixel", "--json", "--preset", "digits")
    assert rc == 0, err
    assert json.loads(out)["attribution"]["clip_pretrained"] == "openai"
    assert "was trained as preset 'tiny'; its attributions use --preset digits's attribution settings" in err
    rc, out, err = cli("query", "--query", "train:1", "--methods", "kfac", "--kfac-factor-draws", "3")
    assert rc != 0 and "attribution-engine build --checkpoint " in err and "--preset" not in err, err


def test_a_preset_for_other_data_than_the_checkpoints_is_named_in_the_error(setup, monkeypatch, capsys, tmp_path):
    """QA 33 #3: a cifar2 checkpoint queried with a preset file for an image folder ended in "CIFAR folder ...
    lacks data_batch_1": the checkpoint's kind of data with the preset's folder, and nothing said that the two
    disagree. The error now names both kinds; the loader's own words stay in it."""
    from engine.model.data import DataError

    folder, cache = setup

    def read_as(cfg):
        raise DataError(f"CIFAR folder {cfg.root} lacks data_batch_1 (a stand-in for the {cfg.name} reader)")

    monkeypatch.setattr(engine.attribution.session, "load_dataset", read_as)
    spec = tmp_path / "mine.json"
    spec.write_text(json.dumps({"name": "mine", "base": "digits",
                                "data": {"name": "folder", "root": str(tmp_path), "image_size": 16, "channels": 3}}))
    rc = main(["query", "--query", "train:1", "--methods", "pixel", "--preset", str(spec), "--checkpoint", str(folder),
               "--device", "cpu", "--cache-root", str(cache)])
    err = capsys.readouterr().err
    assert rc == 2, err
    line = err.strip().splitlines()[-1]
    assert "was trained as preset 'tiny' on digits data (8x8x1)" in line, line
    assert f"--preset {spec} describes folder data (16x16x3)" in line and "lacks data_batch_1" in line, line
    # 'tiny' is no preset this code knows, so the hint names none (QA 36 #3: "--preset shapes", then refused)
    assert "(no --preset, or its preset file, with --data-root" in line and "--preset tiny" not in line, line
    assert "Traceback" not in err
    # the preset's own kind of data: the loader's error as it was, with no word of a mismatch
    spec.write_text(json.dumps({"name": "mine", "base": "digits", "data": {"root": str(tmp_path)}}))
    rc = main(["query", "--query", "train:1", "--methods", "pixel", "--preset", str(spec), "--checkpoint", str(folder),
               "--device", "cpu", "--cache-root", str(cache)])
    err = capsys.readouterr().err
    assert rc == 2 and "lacks data_batch_1" in err and "was trained as preset 'tiny' on" not in err, err


def test_a_data_error_with_no_preset_named_is_the_loaders_own(setup, monkeypatch, capsys, tmp_path):
    """QA 45 #1: `--checkpoint X --data-root FOLDER` (no --preset) on a corrupt folder said "--preset digits
    describes digits data ... (no --preset, or ...)": the command line's default preset taken for one the user
    named, the real cause in parentheses.  With no preset named nothing disagrees: the loader's line is the error."""
    import shutil

    from engine.model.data import DataError

    folder, cache = setup
    ckpt = tmp_path / "ckpt"
    shutil.copytree(folder, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["preset"]["data"] = {**config["preset"]["data"], "name": "folder", "root": str(tmp_path)}
    (ckpt / "config.json").write_text(json.dumps(config))

    def corrupt(cfg):
        raise DataError(f"cannot read image {cfg.root}/a/c3.png: image file is truncated")

    monkeypatch.setattr(engine.attribution.session, "load_dataset", corrupt)
    rc = main(["query", "--query", "train:1", "--methods", "pixel", "--checkpoint", str(ckpt), "--data-root",
               str(tmp_path), "--device", "cpu", "--cache-root", str(cache)])
    err = capsys.readouterr().err
    assert rc == 2, err
    line = err.strip().splitlines()[-1]
    assert line == f"error: cannot read image {tmp_path}/a/c3.png: image file is truncated", line
    # a preset the user named for other data: the disagreement is still said (QA 33 #3)
    rc = main(["query", "--query", "train:1", "--methods", "pixel", "--preset", "digits", "--checkpoint", str(ckpt),
               "--data-root", str(tmp_path), "--device", "cpu", "--cache-root", str(cache)])
    err = capsys.readouterr().err
    assert rc == 2 and "--preset digits describes digits data (8x8x1)" in err and "truncated" in err, err


def test_the_attribution_source_rule_that_every_command_applies(setup, capsys):
    """``with_attribution_source``, which query, build and the evaluation commands (lds, retrain-top) apply to
    their preset: the checkpoint's own settings unless --preset was named, then the named one's with a note."""
    import argparse

    from engine.cli.common import DEFAULT_PRESET, with_attribution_source
    from engine.config import get_preset

    folder, _ = setup
    digits = get_preset("digits")
    assert with_attribution_source(argparse.Namespace(preset=DEFAULT_PRESET), digits, folder).attribution == \
        TINY_ATTRIBUTION  # the tiny checkpoint's recorded settings
    assert with_attribution_source(argparse.Namespace(preset="digits"), digits, folder).attribution == digits.attribution
    assert "trained as preset 'tiny'" in capsys.readouterr().err


def test_only_the_shipped_folders_take_the_shipped_presets_settings(setup, tmp_path):
    """QA 34: a preset file named "digits" with M = 8 trained a checkpoint whose queries then used the shipped
    digits' M = 64, because the recorded name was looked up among the shipped presets. Only the shipped folders
    (assets/<preset>) are read as their preset as this code defines it; any other folder by its recorded settings."""
    import shutil

    from engine.config import PRESETS
    from engine.model.checkpoint import recorded_preset
    from engine.paths import ASSETS

    folder, _ = setup
    mine = tmp_path / "mine"
    shutil.copytree(folder, mine)
    cfg = json.loads((mine / "config.json").read_text())
    cfg["preset"]["name"] = "digits"  # a run of one's own that kept the name
    (mine / "config.json").write_text(json.dumps(cfg))
    assert recorded_preset(mine).attribution == TINY_ATTRIBUTION and recorded_preset(mine).name == "digits"
    assert recorded_preset(ASSETS / "digits") == PRESETS["digits"]
    assert recorded_preset(ASSETS / "mnist") == PRESETS["mnist"]


def test_a_factor_draws_difference_that_the_caches_m_implies_needs_no_flag_of_its_own():
    """QA 33 #6: a K-FAC cache built at M = 8 with all its draws (stored as factor_draws None) against digits' M = 64
    with k = 8: the hint gave no flag, since "factor_draws None" has none, though --mc-samples 8 alone finds it (k >= M
    is stored as None). The difference it implies is dropped; others stay."""
    from engine.attribution.caches import _implied_by_mc_samples

    implied = {"factor_draws": (None, 8), "mc_samples": (8, 64)}
    assert _implied_by_mc_samples(implied) == {"mc_samples": (8, 64)}
    kept = {"factor_draws": (None, 4), "mc_samples": (8, 64)}  # k = 4 < 8: --mc-samples 8 would give other factors
    assert _implied_by_mc_samples(kept) == kept
    assert _implied_by_mc_samples({"factor_draws": (None, 8)}) == {"factor_draws": (None, 8)}  # M is the same


def test_scores_out_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A ``--scores-out`` write cut short (a kill, a full disk) left half an archive under the user's name, where
    their earlier file was; it now goes through a temporary file beside it, renamed into place once whole."""
    import numpy as np

    from engine.attribution.results import MethodResult, QueryResult
    from engine.cli.query_output import write_scores

    path = tmp_path / "scores.npz"
    result = QueryResult(query={"spec": "train:1"}, measurement="loss",
                         methods={"pixel": MethodResult(name="pixel", title="Pixel", kind="similarity", caption="",
                                                         status="ok", scores=np.arange(4, dtype=np.float32))})
    write_scores(path, result, labels=[0, 1, 0, 1])
    before = path.read_bytes()

    def cut_short(file, **arrays):
        file.write(b"PK\x03\x04 half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", cut_short)
    with pytest.raises(OSError):
        write_scores(path, result, labels=[0, 1, 0, 1])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["scores.npz"]


def test_not_built_names_a_default_setting_by_its_value_not_none(setup, digits_small, monkeypatch, capsys, tmp_path):
    """QA 61 F3: a cache key leaves out a setting at its default (``kfac_blocks`` is named only when joint), so the
    hint read "kfac_blocks None there, 'joint' asked: add --kfac-blocks None to use it", a value no flag takes."""
    folder, _ = setup
    monkeypatch.setattr(engine.attribution.session, "load_dataset", lambda cfg: digits_small)
    common = ["--checkpoint", str(folder), "--device", "cpu", "--cache-root", str(tmp_path / "c"), "--mc-samples", "2"]
    assert main(["build", "--methods", "kfac", *common]) == 0
    capsys.readouterr()
    rc = main(["query", "--query", "train:1", "--methods", "kfac,pixel", "--kfac-blocks", "joint", "--json", *common])
    out, err = capsys.readouterr()
    assert rc == 0, err
    reason = json.loads(out)["methods"]["kfac"]["reason"]
    assert "kfac_blocks 'separate' there, 'joint' asked: add --kfac-blocks separate to use it" in reason, reason
    assert "None" not in reason
