"""Exports say what their scores were computed with (QA round 17 finding 1): two CSV downloads of one query at
two K-FAC dampings had different K-FAC columns under one file name, with nothing in either saying which damping;
the PNG named no model and no damping, and titled D-TRAK's rows under "measurement loss" although D-TRAK scores
the square norm."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from engine.attribution import provenance
from engine.attribution.precomputed import FILE, MEASUREMENT, PrecomputedGallery, precomputed_result
from engine.attribution.session import AttributionSession
from engine.code_version import code_version
from engine.paths import default_checkpoint


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The digits model and its shipped first-page scores for gallery:0 (nothing to build)."""
    session = AttributionSession("digits", cache_root=tmp_path_factory.mktemp("cache"))
    pre = PrecomputedGallery.load(default_checkpoint("digits") / FILE)

    def result(damping: dict[str, float] | None = None):
        r = precomputed_result(session, pre, "gallery:0", MEASUREMENT, None, damping)
        assert r is not None and r.methods["kfac"].status == "ok"
        return r

    return session, result


def test_the_settings_name_the_model_the_draws_and_each_methods_damping_and_measurement(shipped):
    session, result = shipped
    r = result()
    settings = provenance.result_settings(session, r)
    assert settings["model"]["preset"] == "digits" and settings["model"]["num_train"] == 1797
    assert settings["model"]["checkpoint_hash"] == session.checkpoint_hash
    assert settings["query"] == "gallery:0" and settings["measurement"] == "loss"
    assert settings["mc_samples"] == session.config.mc_samples == settings["attribution"]["mc_samples"]
    assert settings["methods"]["kfac"]["damping"] == pytest.approx(r.methods["kfac"].damping)
    assert settings["methods"]["dtrak"]["measurement"] == "square-norm"  # D-TRAK's own, whatever was asked
    assert "measurement" not in settings["methods"]["kfac"] and "damping" not in settings["methods"]["pixel"]
    assert settings["methods"]["kfac"]["precomputed"] is True
    assert set(settings["methods"]) == {n for n, m in r.methods.items() if m.status == "ok"}  # CLIP left out
    # every setting, defaults included (QA round 21: the cache key's defaults-dropped form left out the query
    # draws and the block layout), the code that ran and the thread count
    assert settings["attribution"]["query_draws"] == session.config.query_draws == "own"
    assert settings["attribution"]["kfac_blocks"] == session.config.kfac_blocks == "separate"
    assert settings["code"] == code_version() and settings["threads"] >= 1
    # a precomputed answer names each gradient method's measurement as a live one does (review 53)
    assert {n: m.measurement for n, m in r.methods.items() if m.status == "ok"} == {
        "kfac": "loss", "trak": "loss", "dtrak": "square-norm", "pixel": None}
    # and K-FAC's bank, which the exports name for a live answer (QA round 22 #3)
    assert r.methods["kfac"].bank == settings["methods"]["kfac"]["bank"] == session.method("kfac").bank_mode(session.ctx)
    assert [n for n, m in r.methods.items() if m.bank is not None] == ["kfac"]


def test_two_dampings_give_two_file_names_and_the_csv_says_which(shipped):
    session, result = shipped
    steps = session.method_info()["kfac"]["damping_steps"]
    a, b = result({"kfac": steps[0]}), result({"kfac": steps[-1]})
    assert not np.allclose(a.methods["kfac"].scores, b.methods["kfac"].scores)
    sa, sb = provenance.result_settings(session, a), provenance.result_settings(session, b)
    assert provenance.settings_digest(sa) != provenance.settings_digest(sb)
    table = pd.DataFrame({"index": np.arange(1797), "kfac": a.methods["kfac"].scores})
    text = provenance.csv_with_settings(table.to_csv(index=False), sa)
    head = [line for line in text.splitlines() if line.startswith("#")]
    # no CLIP weights here (QA 23 #4); a contributor's method, not in the shipped precomputed file, may be listed
    # too (QA 70 F2: the line was pinned to start with clip)
    assert head[3].startswith("# not included: ") and "clip (" in head[3]
    head = head[:3] + head[4:]
    assert head[0].startswith("# model: digits, checkpoint ") and session.checkpoint_hash in head[0]
    assert f"(digits, content digest {session.data_digest})" in head[0]  # which training set (QA 34)
    assert "query: gallery:0; measurement: loss, 64 Monte Carlo draws" in head[1]
    # the lowest step (1e-12) is below the shipped digits factors' floor, 2.5e-10, which the line says (QA 37 #3)
    assert f"kfac (damping {steps[0]:.3g}, below its damping floor 2.5e-10: the scores may weigh rounding, " \
        "precomputed)" in head[2] and "dtrak (damping" in head[2]
    assert "square-norm measurement" in head[2]
    assert json.loads(head[3].removeprefix("# settings: ")) == json.loads(json.dumps(sa, default=str))
    back = pd.read_csv(io.StringIO(text), comment="#")  # the table reads back as it was, the lines skipped
    pd.testing.assert_frame_equal(back, table, check_dtype=False)


def test_the_png_sheet_carries_the_settings_as_a_heading_and_a_text_chunk(shipped):
    from explorer.images import SheetRow, compose_sheet, png_bytes

    session, result = shipped
    lines = provenance.settings_lines(provenance.result_settings(session, result()))
    rows = [SheetRow("K-FAC: proponents", [np.zeros((8, 8), np.uint8)], ["#1"])]
    plain, headed = compose_sheet(rows), compose_sheet(rows, heading=lines[:-1])
    assert headed.height > plain.height  # three more lines of text above the rows
    top = np.asarray(headed.convert("L"))[: headed.height - plain.height]
    assert (top < 128).any()  # something is written there
    settings = provenance.result_settings(session, result())
    png = Image.open(io.BytesIO(png_bytes(headed, text={"attribution-settings": provenance.settings_json(settings)})))
    assert json.loads(png.text["attribution-settings"])["model"]["preset"] == "digits"


def test_the_png_names_the_measurement_a_method_scored_when_it_is_not_the_one_asked(shipped):
    from types import SimpleNamespace

    from explorer.results_view import sheet_rows

    session, result = shipped
    r = result()
    ds = session.dataset
    query = SimpleNamespace(title="Gallery sample 0", input=SimpleNamespace(image=np.zeros((1, 8, 8), np.float32)))
    names = ["kfac", "dtrak"]
    used = {n: session.measurement_used(n, r.measurement) for n in names}
    titles = [row.title for row in sheet_rows(r, names, session.method_info(), ds, session.labels, query, 2, used)]
    dtrak = [t for t in titles if "D-TRAK" in t]
    assert len(dtrak) == 2 and all(t.startswith("D-TRAK (square-norm measurement): ") for t in dtrak), titles
    assert not any("measurement)" in t for t in titles if t.startswith("K-FAC")), titles


def test_a_group_export_names_the_group_the_query_set_and_the_measurement(shipped):
    """A loss and an ELBO export of one group shared a file name and neither said which it was."""
    from types import SimpleNamespace

    session, _ = shipped

    def group_result(measurement: str):
        methods = {"kfac": SimpleNamespace(damping=1e-8, status="ok"), "dtrak": SimpleNamespace(damping=1e-4, status="ok")}
        return SimpleNamespace(group=SimpleNamespace(spec="label:3", size=183),
                               qset=SimpleNamespace(name="gallery", key="0123456789abcdef"),
                               measurement=measurement, methods=methods, ok=lambda: list(methods))

    loss, elbo = (provenance.group_settings(session, group_result(m)) for m in ("loss", "elbo"))
    assert "pool_seed" not in loss and "left_out" not in loss  # the gallery; every method asked answered
    assert provenance.settings_digest(loss) != provenance.settings_digest(elbo)
    lines = provenance.settings_lines(elbo)
    assert "group: label:3 (183 images), queries: gallery; measurement: elbo" in lines[1]
    assert "kfac (damping 1e-08)" in lines[2] and "dtrak (damping 0.0001, square-norm measurement)" in lines[2]


def test_a_compressed_banks_export_says_how_many_scores_are_exact_and_the_estimates_factor(shipped):
    """Review 50: a compressed bank's CSV held estimated and exact scores, scaled by a factor only the page
    showed, and the same file name before and after the background re-rank made more of them exact."""
    import dataclasses

    session, result = shipped
    r = result()
    kfac = r.methods["kfac"]
    mask = np.zeros(len(kfac.scores), bool)
    mask[:32] = True
    estimated = dataclasses.replace(kfac, bank="compressed", exact=mask.copy(), estimate_scale=0.8)
    mask[:64] = True
    reranked = dataclasses.replace(kfac, bank="compressed", exact=mask, estimate_scale=0.8)
    entries = [provenance.result_settings(session, dataclasses.replace(r, methods={**r.methods, "kfac": m}))
               for m in (estimated, reranked)]
    assert [e["methods"]["kfac"]["exact_scores"] for e in entries] == [32, 64]
    assert entries[0]["methods"]["kfac"]["estimate_scale"] == pytest.approx(0.8)
    assert provenance.settings_digest(entries[0]) != provenance.settings_digest(entries[1])


def test_two_pools_of_one_size_give_two_group_exports(shipped):
    """Review 50: pool:256 drawn with seeds 0 and 1 gave one settings digest: the query set's key tells them apart."""
    from types import SimpleNamespace

    session, _ = shipped
    methods = {"kfac": SimpleNamespace(damping=1e-8, status="ok")}

    def on(key: str):
        return provenance.group_settings(session, SimpleNamespace(
            group=SimpleNamespace(spec="label:3", size=183), qset=SimpleNamespace(name="pool:256", key=key),
            measurement="loss", methods=methods, ok=lambda: list(methods)))

    assert provenance.settings_digest(on("aaaa")) != provenance.settings_digest(on("bbbb"))


def test_precomputed_group_matrices_carry_the_damping_of_their_scores(shipped):
    """Review 50: a method the sidebar did not show has no damping in ``damping_dict``, so its precomputed
    group matrix said none (and its export named no damping) although its scores are at the default."""
    from types import SimpleNamespace

    from explorer.groups_view import precomputed_matrices

    session, _ = shipped
    handle = SimpleNamespace(session=session, precomputed=PrecomputedGallery.load(default_checkpoint("digits") / FILE))
    s = SimpleNamespace(measurement=MEASUREMENT, mc_samples=session.config.mc_samples, damping_dict={})
    mats = precomputed_matrices(handle, s)
    assert set(mats) == {"kfac", "trak", "dtrak"}
    for n, m in mats.items():
        assert m.damping == pytest.approx(session.damping_for(n, {})), n


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="PNG")
    return buf.getvalue()


def test_two_uploads_of_one_name_are_told_apart_by_their_image(shipped):
    """Review 50: an upload's export named it only ``upload:<name>``, so two different images uploaded under one
    file name gave the same settings, file name and CSV heading. The query's image digest now goes with it."""
    session, _ = shipped
    one, other = np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)
    one[1:7, 3:5] = 255  # a "1"
    other[2:6, 2:6] = 255  # a block
    ra, rb, ra2 = (session.query(session.query_from_upload(_png(a), name="digit.png"), methods=["pixel"])
                   for a in (one, other, one))
    sa, sb, sa2 = (provenance.result_settings(session, r) for r in (ra, rb, ra2))
    assert sa["query"] == sb["query"] == "upload:digit.png"
    assert sa["query_image"] != sb["query_image"] and sa["query_image"] == sa2["query_image"]
    assert provenance.settings_digest(sa) != provenance.settings_digest(sb)
    assert provenance.settings_digest(sa) == provenance.settings_digest(sa2)
    assert f"(image {sa['query_image']})" in provenance.settings_lines(sa)[1]


def test_a_precomputed_answer_names_the_same_image_as_the_live_one(shipped):
    session, result = shipped
    live = session.query(session.parse_query("gallery:0"), methods=["pixel"])
    assert result().query["image_digest"] == live.query["image_digest"] is not None



def test_a_precomputed_compressed_bank_answer_is_not_called_unre_ranked():
    """write_precomputed scores with the re-rank (it never defers it) but keeps no exact mask: a precomputed
    compressed-bank column must not read "no re-ranking", which is what a live answer without a mask means."""
    from engine.attribution.results import MethodResult

    live = MethodResult(name="kfac", title="K-FAC", kind="influence", caption="", status="ok", bank="compressed")
    shipped = MethodResult(name="kfac", title="K-FAC", kind="influence", caption="", status="ok",
                           bank="compressed", reason="precomputed")
    assert "no re-ranking" in live.bank_note()
    assert shipped.bank_note() == "shipped scores, computed with a compressed bank, re-ranked to exact K-FAC scores at both ends"
    # nor does a precomputed column speak of a bank as if this server held it (QA 23 #5: "stored int8 bank: ..."
    # while the bank was still being built)
    stored = dataclasses.replace(shipped, bank="stored")
    assert stored.bank_note() == "shipped scores, computed with a stored int8 bank: every training image scored, none estimated"


def test_an_export_says_which_methods_it_leaves_out_and_why(shipped):
    """QA 23 #4: a CSV or PNG exported while the app built TRAK and D-TRAK had no columns for them, and nothing in
    it said why; a researcher opening it later could not tell a left-out method from one never run."""
    from explorer.plain import BUILDING

    session, result = shipped
    r = result()
    for name in ("trak", "dtrak"):
        r.methods[name] = dataclasses.replace(r.methods[name], status="unavailable", scores=None, reason=BUILDING)
    settings = provenance.result_settings(session, r)
    assert settings["left_out"]["trak"] == settings["left_out"]["dtrak"] == "being built"
    assert set(settings["left_out"]) == {n for n, m in r.methods.items() if m.status != "ok"}
    assert not set(settings["left_out"]) & set(settings["methods"])
    csv = provenance.csv_with_settings("index,kfac\n0,1.0\n", settings)
    assert "# not included: " in csv and "trak (being built), dtrak (being built)" in csv
    assert json.loads(csv.split("# settings: ")[1].splitlines()[0])["left_out"]["dtrak"] == "being built"
    whole = dataclasses.replace(r, methods={n: m for n, m in r.methods.items() if m.status == "ok"})
    assert "left_out" not in provenance.result_settings(session, whole)  # nothing left out: nothing said
    assert not any(line.startswith("not included") for line in provenance.settings_lines(
        provenance.result_settings(session, whole)))


def test_a_group_export_names_its_pools_seed_and_the_methods_a_build_kept_out(shipped):
    """QA 23b #6-7: a Groups export made during the build did not say TRAK and D-TRAK were left out, and a pool's
    header ("queries: pool:8") did not give the seed that `query --query pool:I --pool-seed S` needs."""
    from types import SimpleNamespace

    session, _ = shipped
    methods = {"kfac": SimpleNamespace(damping=1e-8, status="ok")}
    result = SimpleNamespace(group=SimpleNamespace(spec="train:10-40", size=31),
                             qset=SimpleNamespace(name="pool:8", key="pool-abc-s3-n8", seed=3),
                             measurement="loss", methods=methods, ok=lambda: list(methods))
    settings = provenance.group_settings(session, result, {"trak": "being built", "dtrak": "being built"})
    assert settings["pool_seed"] == 3 and settings["left_out"] == {"trak": "being built", "dtrak": "being built"}
    lines = provenance.settings_lines(settings)
    assert "queries: pool:8 (pool seed 3)" in lines[1]
    assert "not included: trak (being built), dtrak (being built)" in lines


def test_the_readable_settings_lines_say_when_a_damping_is_below_the_floor():
    """QA 37 #3: the CSV's `# methods:` line and the PNG heading gave K-FAC's damping with no word that it was below
    the factors' resolution floor; only the JSON line carried the warning."""
    settings = {"model": {"preset": "p", "checkpoint": "c", "checkpoint_hash": "h", "num_train": 3},
                "query": "gallery:0", "measurement": "loss", "mc_samples": 4,
                "methods": {"kfac": {"damping": 1e-12, "damping_floor": 2.5e-10, "warning": "damping 1.0e-12 is below"},
                            "trak": {"damping": 1e-4}}}
    methods = provenance.settings_lines(settings)[2]
    assert methods == ("methods: kfac (damping 1e-12, below its damping floor 2.5e-10: the scores may weigh rounding); "
                       "trak (damping 0.0001)"), methods
    settings["methods"]["kfac"] = {"damping": 1e-6, "damping_floor": 2.5e-10}  # above it: the floor alone says nothing
    assert provenance.settings_lines(settings)[2] == "methods: kfac (damping 1e-06); trak (damping 0.0001)"


def test_the_settings_name_the_checkpoint_and_data_folders_absolute(shipped, tmp_path, monkeypatch):
    """A checkpoint or data root typed relative ("data/pipe") is named absolute in the exports, as a preset's
    checkpoint is (QA 41): an export read in another folder still says which model and data it was."""
    import types

    session, _ = shipped
    monkeypatch.chdir(tmp_path)
    fake = types.SimpleNamespace(
        preset=session.preset.replace(data={"root": "data/idx"}), checkpoint="models/pipe",
        checkpoint_hash=session.checkpoint_hash, dataset=session.dataset, data_digest=session.data_digest)
    model = provenance.model_settings(fake)
    assert model["checkpoint"] == str(tmp_path.resolve() / "models" / "pipe")
    assert model["data_root"] == str(tmp_path.resolve() / "data" / "idx")


def test_an_exports_lines_say_a_trajectory_reads_no_draws(shipped):
    """QA 40 #9: the readable lines said "64 Monte Carlo draws" for the trajectory measurement, which reads none;
    loss@t's line says its M draws are noise at one timestep."""
    session, result = shipped
    r = result()
    lines = {m: provenance.settings_lines(provenance.result_settings(session, dataclasses.replace(r, measurement=m)))[1]
             for m in ("trajectory", "loss@t=500", "loss")}
    assert lines["trajectory"].endswith("measurement: trajectory, no Monte Carlo draws (the recorded sampling path "
                                        "is evaluated exactly)")
    assert lines["loss@t=500"].endswith("measurement: loss@t=500, 64 Monte Carlo noise draws at that timestep")
    assert lines["loss"].endswith("measurement: loss, 64 Monte Carlo draws")
