"""QA 64: the page says what the engine computed.  The sign words over D-TRAK's square norm (F2), the retraining
views' predicted change of another measurement (F1), the Groups page's M (F3), the top-k plots' top-k (F4), a
precomputed answer's timings (F5), the timing table's columns (F6), mnist's M slider (F7), the LDS heading (F8),
the precomputed D-TRAK note (F9), "on average" (F11).  Views run in Streamlit's AppTest on the fake handle of
test_app_presentation: no server, no model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from test_app_cosmetics17 import MINE, _eval_handle, _run_evaluation
from test_app_presentation import (
    METHOD_INFO,
    FakeData,
    FakeHandle,
    _grids_page,
    _query,
    _settings,
    fake_result,
)


def _own_measurements(handle):
    """D-TRAK scores the square norm whatever is asked, as the engine's session says (``measurement_used``)."""
    handle.session.measurement_used = lambda n, m: "square-norm" if n == "dtrak" else m
    return handle


# --- F2: the sign's meaning over the square norm ----------------------------------------------------------------


def test_headings_over_the_square_norm_say_what_removal_does_to_it():
    from explorer.results_view import influence_headings

    top, bottom = influence_headings([3.0, 1.0], [-1.0, -2.0], "square-norm")
    assert top == "**Proponents** · removing them raises the query's square norm"
    assert bottom == "**Opponents** · removing them lowers the query's square norm"
    assert "likely" not in top + bottom
    top, bottom = influence_headings([3.0, 1.0], [0.5, 0.1], "square-norm")  # every image a proponent
    assert "likely" not in bottom and "also raises the query's square norm, if slightly" in bottom
    top, bottom = influence_headings([3.0, 1.0], [-1.0, -2.0], "loss@t=500")  # likelihood-like: as before
    assert top.endswith("makes the query less likely") and bottom.endswith("makes the query more likely")


def test_the_grids_headings_follow_each_methods_own_measurement():
    """D-TRAK's column, and every column when the sidebar asks for the square norm, said "removing them makes the
    query less likely" over square-norm changes."""
    from streamlit.testing.v1 import AppTest

    handle = _own_measurements(FakeHandle())
    at = AppTest.from_function(_grids_page, args=(handle, _query(), fake_result(), _settings(["kfac", "dtrak"])))
    at.run()
    assert not at.exception, at.exception
    headings = [m.value for m in at.markdown if m.value.startswith("**")]
    assert "**Proponents** · removing them makes the query less likely" in headings  # K-FAC's loss
    assert "**Proponents** · removing them raises the query's square norm" in headings  # D-TRAK's square norm
    assert "**Opponents** · removing them lowers the query's square norm" in headings


def test_png_headings_say_what_removal_does_to_the_measurement_scored():
    from explorer.results_view import sheet_rows

    ds = FakeData()
    rows = sheet_rows(fake_result(), ["kfac", "dtrak"], METHOD_INFO, ds, ds.labels, _query(), 4,
                      {"kfac": "loss", "dtrak": "square-norm"})
    titles = [r.title for r in rows]
    assert "K-FAC Influence: proponents (removing them makes the query less likely)" in titles
    assert ("D-TRAK (square-norm measurement): proponents (removing them raises the query's square norm)"
            in titles)
    assert ("D-TRAK (square-norm measurement): opponents (removing them lowers the query's square norm)"
            in titles)


def _groups_page(handle, s):
    from explorer import groups_view

    groups_view.groups_page(handle, s)


def test_the_groups_caption_names_d_traks_square_norm(monkeypatch):
    from streamlit.testing.v1 import AppTest

    from explorer import groups_view

    monkeypatch.setattr(groups_view, "all_influence_methods", lambda session: ["kfac", "trak", "dtrak"])
    monkeypatch.setattr(groups_view, "influence_methods", lambda handle: [])
    monkeypatch.setattr(groups_view, "precomputed_groups", lambda handle, s: True)  # the page ends after its caption
    at = AppTest.from_function(_groups_page, args=(_own_measurements(FakeHandle()), _settings(["kfac", "trak", "dtrak"])))
    at.run()
    assert not at.exception, at.exception
    caption = at.caption[0].value
    assert ("positive: removing the group makes the sample less likely (K-FAC Influence, TRAK) or raises the "
            "sample's square norm (D-TRAK), i.e. the group supports it") in caption


def test_about_says_the_square_norm_is_no_likelihood():
    from explorer.about_view import ABOUT

    sentences = " ".join(ABOUT.split()).split(". ")
    claim = [t for t in sentences if "lower means more likely" in t]
    assert claim and not any("squared norm" in t for t in claim)  # the exception is not listed under the rule
    assert "**no likelihood**" in ABOUT


# --- F1 (and F2's retraining caption): a predicted change of another measurement --------------------------------


class _Job:
    def __init__(self, record: dict) -> None:
        self.record = record

    def result(self) -> dict:
        return self.record

    def progress(self) -> tuple[str, float]:
        return "done", 1.0


def _retrain_result(handle, job, info):
    from explorer import evaluation_view

    evaluation_view._show_result(handle, ("k",), job, info)


RECORD = {"method": "dtrak", "measurement": "loss", "fraction": 0.02, "predicted_change": 0.0928,
          "measured_change": 0.0054, "random_measured_change": 0.0033, "full_measurement": 0.022,
          "retrained_measurement": 0.027, "random_measurement": 0.025, "mc_samples": 1024, "steps": 16000}


def test_a_retraining_result_names_the_measurement_its_prediction_is_of():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_function(_retrain_result, args=(_own_measurements(FakeHandle()), _Job(RECORD), METHOD_INFO))
    at.run()
    assert not at.exception, at.exception
    assert [m.label for m in at.metric][0] == "Predicted change of the square norm (D-TRAK; not the training loss)"
    caption = " ".join(c.value for c in at.caption)
    assert "not comparable with the measured change" in caption
    assert "A positive change means removing the images makes the query less likely" in caption
    square = {**RECORD, "method": "kfac", "measurement": "square-norm"}  # the job measured the square norm
    at = AppTest.from_function(_retrain_result, args=(_own_measurements(FakeHandle()), _Job(square), METHOD_INFO))
    at.run()
    caption = " ".join(c.value for c in at.caption)
    assert "removing the images raises the query's square norm" in caption and "likely" not in caption
    assert [m.label for m in at.metric][0] == "Predicted change (K-FAC Influence)"


def test_the_shipped_retraining_table_marks_d_traks_square_norm(tmp_path, monkeypatch):
    (tmp_path / "retrain_top_fake.json").write_text(json.dumps({
        "config": {**MINE, "measurement": "loss", "removed": 20, "num_train": 1000, "steps": 16000},
        "results": [{"query": "gallery:0", "method": m, "removed": [1, 2], "predicted_change": p,
                     "measured_change": 0.0054, "random_measured_change": 0.0033}
                    for m, p in (("kfac", 0.4066), ("dtrak", 0.09276))]}))
    handle = _own_measurements(_eval_handle())
    monkeypatch.setattr("test_app_cosmetics17._eval_handle", lambda: handle)
    at = _run_evaluation(tmp_path, monkeypatch)
    table = at.dataframe[0].value
    cells = dict(zip(table["method"], table["predicted change"], strict=True))
    assert cells == {"K-FAC Influence": "0.4066", "D-TRAK": "0.09276 (square norm)"}
    captions = " ".join(c.value for c in at.caption)
    assert ("D-TRAK's predicted change is of the square norm, the measurement it scores whatever is asked, not of "
            "the training loss measured here: it is not comparable with the measured change.") in captions


def test_the_group_retraining_table_says_what_each_prediction_is_of():
    from explorer.evaluation_view import incomparable_note
    from explorer.group_retrain_view import predicted_of

    session = _own_measurements(FakeHandle()).session
    record = {"config": {"measurement": "loss"}}
    assert predicted_of(session, "dtrak", record) == "square-norm" and predicted_of(session, "kfac", record) == "loss"
    assert incomparable_note([("K-FAC Influence", "loss")], "loss") == ""


# --- F3: the Groups matrices at the sidebar's M ------------------------------------------------------------------


def test_group_matrices_are_scored_and_kept_at_the_sidebars_m(monkeypatch):
    from engine.attribution.groups import group_from_indices
    from engine.attribution.pool import MatrixResult
    from explorer import groups_view
    from explorer.shared_results import RecentResults

    asked = []

    def matrix(session, qset, measurement, methods, damping, cache, progress=None, gradient_cache=None,
               mc_samples=None):
        asked.append(mc_samples)
        return {n: MatrixResult(n, "influence", "ok", scores=np.ones((2, 40), np.float32)) for n in methods}

    monkeypatch.setattr(groups_view, "attribution_matrix", matrix)
    monkeypatch.setattr(groups_view, "GroupResult", lambda *a: SimpleNamespace(ok=lambda: [], note=lambda n: None))
    handle = FakeHandle()
    handle.group_matrices, handle.group_query_gradients = RecentResults(8), RecentResults(8)
    handle.cache_root = None
    qset = type("Q", (), {"key": "gallery", "name": "gallery", "__len__": lambda self: 2})()
    group = group_from_indices([1, 2], 40)
    for m in (8, 8, 2):
        s = _settings(["kfac"])
        s = s.__class__(s.measurement, s.methods, s.damping, s.top_k, m)
        groups_view.group_result(handle, group, qset, s, ["kfac"])
    assert asked == [8, 2]  # the slider's M reaches the engine; a matrix is kept per M


# --- F4: the top-k plots' top-k is the grids' ----------------------------------------------------------------------


def _compressed(scores, exact):
    from engine.attribution.results import MethodResult, QueryResult

    methods = {
        "kfac": MethodResult(name="kfac", title="K-FAC Influence", kind="influence", caption="", status="ok",
                             scores=np.asarray(scores, np.float32), exact=np.asarray(exact, bool)),
        "pixel": MethodResult(name="pixel", title="Pixel similarity", kind="similarity", caption="", status="ok",
                              scores=np.asarray([5.0, 4.0, 0.0, 0.0], np.float32)),
    }
    return QueryResult(query={}, measurement="loss", methods=methods)


def test_top_k_plots_rank_as_the_grids_do_and_say_so_of_estimates():
    from explorer import analysis

    # image 3's estimate is the largest score, but the grid lists the exact candidates 0 and 1 first
    res = _compressed([5.0, 4.0, 1.0, 9.0], [True, True, False, False])
    assert [x.index for x in res.methods["kfac"].top(2)] == [0, 1]
    overlap = analysis.topk_overlap(res, ["kfac", "pixel"], 2)
    assert overlap.loc["kfac", "pixel"] == 1.0  # {0, 1} both; a plain sort took {3, 0}
    counts = analysis.topk_label_counts(res, ["kfac"], 2, np.array([0, 1, 2, 3]), None)
    assert dict(zip(counts["label"], counts["count"], strict=True)) == {"0": 1, "1": 1, "2": 0, "3": 0}
    titles = {"kfac": "K-FAC Influence", "pixel": "Pixel similarity"}
    assert analysis.topk_estimated_note(res, ["kfac", "pixel"], 2, titles) == \
        "The top-2 of K-FAC Influence are exact scores (re-ranked candidates), as in the grids."
    assert analysis.topk_estimated_note(res, ["kfac"], 3, titles).startswith(
        "Estimated scores in the top-3 (compressed bank, outside the re-ranked candidates; marked ≈ in the grids): "
        "K-FAC Influence 1 of 3.")
    assert analysis.topk_estimated_note(res, ["pixel"], 2, titles) is None


def test_top_k_figures_do_not_call_a_similarity_methods_top_k_proponents():
    import pandas as pd

    from explorer import figures

    fig = figures.overlap_matrix(pd.DataFrame([[1.0]], index=["pixel"], columns=["pixel"]), {}, 4)
    assert "proponents" not in fig.layout.title.text
    counts = pd.DataFrame({"method": ["pixel"], "label": ["1"], "count": [2]})
    assert "proponents" not in figures.label_histogram(counts, {}, 4).layout.title.text


# --- F5, F6: timings ----------------------------------------------------------------------------------------------


def test_a_precomputed_answer_shows_no_made_up_time(tmp_path):
    from engine.attribution.precomputed import FILE, PrecomputedGallery, precomputed_result
    from engine.attribution.session import AttributionSession
    from engine.paths import default_checkpoint
    from explorer.results_view import timings_caption

    session = AttributionSession("digits", cache_root=tmp_path)
    pre = precomputed_result(session, PrecomputedGallery(default_checkpoint("digits") / FILE), "gallery:0", "loss",
                             session.config.mc_samples, {})
    assert pre is not None and pre.timing_ms == {}  # it was {"precomputed": 1.0}, a flag printed as a time
    line = timings_caption(pre, 64, False)
    assert line.startswith("This query: precomputed (the shipped scores, read from a file: nothing computed or "
                           "timed here) · measurement `loss`") and " ms" not in line


def test_the_cli_says_a_precomputed_answer_was_not_timed():
    from engine.attribution.results import QueryResult
    from engine.cli.query_output import format_result

    text = format_result(QueryResult(query={"spec": "gallery:0", "precomputed": True}, measurement="loss",
                                     methods={}, timing_ms={}), 4, None)
    assert "measurement: loss    precomputed (read from the shipped file, nothing timed)" in text  # was "total 0 ms"


def test_the_timing_columns_say_what_score_and_rescore_hold():
    from explorer.results_view import TIMING_COLUMNS

    assert "score = the first answer's pass over all training images" in TIMING_COLUMNS
    assert "rescore = the latest re-scoring at the chosen damping" in TIMING_COLUMNS
    assert "includes loading its cache from disk" in TIMING_COLUMNS


# --- F7: mnist's M slider ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("draws", ["bank", "own"])
def test_the_m_slider_offers_no_m_the_engine_refuses(draws):
    from streamlit.testing.v1 import AppTest
    from test_app_presentation import _explore_sidebar

    handle = FakeHandle()
    handle.session.config = SimpleNamespace(mc_samples=16, query_draws=draws)
    at = AppTest.from_function(_explore_sidebar, args=(handle,))
    at.run()
    assert not at.exception, at.exception
    options = [int(o) for o in at.select_slider(key="mc_samples:fake").options]
    assert options == ([1, 2, 4, 8, 16] if draws == "bank" else [1, 2, 4, 8, 16, 32, 64, 128, 256])


# --- F8, F9, F11 -------------------------------------------------------------------------------------------------


def test_an_lds_heading_of_a_loss_at_t_record_names_its_timestep(tmp_path, monkeypatch):
    from test_app_cosmetics17 import _lds_file, _sweep

    _lds_file(tmp_path, "lds_fake_losst500.json", "loss@t=500", 64, {"kfac": _sweep(0.3)})
    at = _run_evaluation(tmp_path, monkeypatch)
    headings = [m.value for m in at.markdown if m.value.startswith("#### Measurement:")]
    assert headings == ["#### Measurement: Loss at timestep 500 (`loss@t=500`)"]  # was "Training loss"


def test_a_precomputed_d_trak_column_keeps_its_measurement():
    from engine.attribution.results import MethodResult
    from explorer.results_view import column_note

    r = MethodResult(name="dtrak", title="D-TRAK", kind="influence", caption="", status="ok", reason="precomputed",
                     damping=5.6e-4, measurement="square-norm")
    assert column_note(r, "loss") == "damping 5.6e-04 · **precomputed** · uses the square-norm measurement"
    kfac = MethodResult(name="kfac", title="K", kind="influence", caption="", status="ok", reason="precomputed",
                        damping=1e-8, measurement="loss")
    assert column_note(kfac, "loss") == "damping 1.0e-08 · **precomputed**"


def test_the_query_independence_box_says_its_overlap_is_a_mean():
    from explorer.results_view import query_independence_note

    d = SimpleNamespace(top_overlap=0.95, top=20, chance_overlap=0.011)
    assert "two gallery samples share on average 95% of their top-20" in query_independence_note(d)


def test_the_timing_table_leaves_a_method_without_a_time_blank():
    """QA 67 F5: after a damping change pixel similarity (no damping, no rescore) showed "None" in the rescore
    column; its cell is blank, and the influence methods' times are the results' own."""
    from engine.attribution.results import MethodResult, QueryResult
    from explorer.results_view import timing_table

    kfac = MethodResult("kfac", "K-FAC", "influence", "", "ok", timing_ms={"score": 180.354, "rescore": 0.05})
    pixel = MethodResult("pixel", "Pixel", "similarity", "", "ok", timing_ms={"score": 3.0})
    info = {"kfac": {"title": "K-FAC Influence"}, "pixel": {"title": "Pixel similarity"}}
    table = timing_table(QueryResult({}, "loss", {"kfac": kfac, "pixel": pixel}), ["kfac", "pixel"], info)
    assert table.to_dict("records") == [
        {"method": "K-FAC Influence", "status": "ok", "score (ms)": 180.35, "rescore (ms)": 0.05},
        {"method": "Pixel similarity", "status": "ok", "score (ms)": 3.0, "rescore (ms)": ""},
    ]
