"""The Groups page and the reverse view from the Explore grids, driven by AppTest on the tiny app."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_app import _handle, _ok, _set_env, _start, _texts, shared_tiny_app


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory) -> dict[str, str]:
    import torch

    torch.set_num_threads(1)
    env = shared_tiny_app(tmp_path_factory)
    from engine.attribution.session import AttributionSession

    AttributionSession(env["ATTRIBUTION_PRESET"], env["ATTRIBUTION_CHECKPOINT"], "cpu", env["ATTRIBUTION_CACHE"]).build()
    return env


@pytest.fixture
def app_env(tiny_app, tmp_path, monkeypatch) -> dict[str, str]:
    results = tmp_path / "results"
    results.mkdir()
    return _set_env({**tiny_app, "ATTRIBUTION_RESULTS": str(results)}, monkeypatch)


@pytest.mark.slow
def test_groups_page_class_group_pool_copy_check_and_retrain_plot(app_env, monkeypatch):
    from engine.attribution.groups import group_change, parse_group
    from explorer import groups_view

    sheets = []  # the export's PNG is made when its button is clicked, not on every run of the page
    monkeypatch.setattr(groups_view, "compose_sheet", lambda *a, **k: sheets.append(a))

    # a shipped group-retraining record: the page plots it
    record = {
        "config": {"queries": ["gallery:0", "gallery:1", "gallery:2"], "query_labels": [0, 1, 2], "steps": 10,
                   "preset": "tiny-app"},  # this model's (a record of another model's would not be plotted)
        "groups": [{
            "spec": "label:1", "size": 5, "measured_change": [0.1, 0.3, 0.2],
            "predicted_change": {"kfac": [0.01, 0.03, 0.02]},
            "comparison": {"kfac": {"spearman": 1.0, "sign_agreement": 1.0, "mean_predicted": 0.02}},
        }],
    }
    (Path(app_env["ATTRIBUTION_RESULTS"]) / "group_retrain_tiny.json").write_text(json.dumps(record))
    at = _start(app_env)
    at.session_state["page"] = "Groups"
    at.run()
    _ok(at)
    text = _texts(at)
    assert "Groups: what if these training images were removed?" in text
    at.radio(key="grp_kind").set_value("A class").run()
    at.selectbox(key="grp_class").set_value(1).run()
    _ok(at)
    # the retraining plot says whose groups and which day's predictions it shows (QA 23b #5: old figures as current)
    # (class 1 is the group chosen above: the note says so; before QA 25 #14 it said "not the one chosen above")
    assert ("Groups label:1 (the one chosen above among them): predictions and measurements as recorded on an "
            "unrecorded date, at attribution settings the record does not name") in _texts(at)
    handle = _handle()
    session = handle.session
    metrics = {m.label: m.value for m in at.metric}
    assert "Mean predicted change (K-FAC Influence)" in metrics
    # D-TRAK's mean is of its square norm, beside the others' loss (QA 67 F2: the label named no measurement)
    assert "Mean predicted change (D-TRAK, of the square norm)" in metrics
    # the page's numbers are the engine's: mean over the gallery of the class's summed scores
    group = parse_group("label:1", session.dataset)
    changes = [
        float(group_change(session.query(session.parse_query(f"gallery:{q}"), "loss", ["kfac"]).methods["kfac"].scores, group))
        for q in range(3)
    ]
    assert metrics["Mean predicted change (K-FAC Influence)"] == f"{np.mean(changes):+.3e}"
    assert "What the group supports most" in _texts(at)
    # the plots' axes speak the page's language, not the table's column names (kfac, sample, label)
    bar = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if "change per sample" in c.proto.spec)
    axes = (bar["layout"]["xaxis"]["title"]["text"], bar["layout"]["yaxis"]["title"]["text"])
    assert axes == ("generated sample", "predicted change of the training loss"), axes
    # D-TRAK always scores the square norm: its chart and its reverse card say so (QA round 13: "the loss")
    at.selectbox(key="grp_plot_method").set_value("dtrak").run()
    _ok(at)
    dtrak_bar = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if "change per sample" in c.proto.spec)
    assert dtrak_bar["layout"]["yaxis"]["title"]["text"] == "predicted change of the square norm"
    assert any("Ranked by the square norm, the measurement this method always uses" in c.value for c in at.caption)
    at.selectbox(key="grp_plot_method").set_value("kfac").run()
    # this tiny model's gallery has no classifier labels: no legend of "predicted label: nan" (QA), a caption instead
    assert "title" not in bar["layout"].get("legend", {})
    assert "No label classifier for this model's data" in _texts(at)
    scatter = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if "Spearman" in c.proto.spec)
    assert scatter["layout"]["xaxis"]["title"]["text"] == "K-FAC Influence: predicted change of the training loss"
    assert "evidence, not proof" in " ".join(i.value for i in at.info)
    retrain = json.loads(at.get("plotly_chart")[-1].proto.spec)
    assert "Predicted vs measured" in str(retrain) and retrain["layout"]["legend"]["title"]["text"] == "predicted label"
    assert {b.label for b in at.get("download_button")} >= {"Download predicted changes (CSV)", "Download this view (PNG)"}
    assert sheets == []

    # a hand-picked group with a bad index is a message, not a failure
    at.radio(key="grp_kind").set_value("Hand-picked").run()
    at.text_input(key="grp_indices").set_value("  ").run()  # a blank box is being filled in: a hint, not CLI syntax
    assert not any("bad group" in w.value for w in at.warning) and any("Type training indices" in i.value for i in at.info)
    at.text_input(key="grp_indices").set_value("1,2,999").run()
    assert not at.exception
    assert any("out of range" in w.value for w in at.warning)
    # most of the training set, or all of it: the sums rank samples, they do not forecast a change (QA round 17)
    assert not any("training set" in w.value for w in at.warning)
    at.text_input(key="grp_indices").set_value("0-39").run()
    assert any("holds 40 of the 64 training images, more than half" in w.value and "do not forecast" in w.value
               for w in at.warning)
    at.text_input(key="grp_indices").set_value("0-63").run()
    assert any("the whole training set" in w.value for w in at.warning)

    # a pool: drawn on request (cached), then scored in one batch
    at.text_input(key="grp_indices").set_value("1,2,3").run()
    at.radio(key="grp_queries").set_value("Generated pool").run()
    at.number_input(key="grp_pool_n").set_value(8).run()
    _ok(at)
    assert any(b.label == "Draw 8 samples" for b in at.button)
    # a draw that fails says why above the button, which stays for another try (the note and the button are
    # emptied while a pool is drawn: QA 63 F5, they stood above the draw's bars as if nothing had been asked)
    from engine.attribution.pool import PoolError

    real = groups_view.generate_pool

    def failing(*args, **kwargs):
        raise PoolError("no space left for the pool (test)")

    monkeypatch.setattr(groups_view, "generate_pool", failing)
    at.button(key="grp_draw").click().run()
    _ok(at)
    assert [w.value for w in at.warning if "(test)" in w.value] == ["no space left for the pool (test)"]
    assert any(b.label == "Draw 8 samples" for b in at.button) and "No pool of 8 samples" in " ".join(
        i.value for i in at.info)
    monkeypatch.setattr(groups_view, "generate_pool", real)
    at.button(key="grp_draw").click().run()
    _ok(at)
    assert "8 samples (pool:8, seed 0)" in _texts(at)  # the seed named (QA 23b #7)
    assert (8, 0) in handle.group_pools

    # a gallery without classifier labels (-1) gives the retraining plot no legend of "-1"
    record["config"]["query_labels"] = [-1, -1, -1]
    (Path(app_env["ATTRIBUTION_RESULTS"]) / "group_retrain_tiny.json").write_text(json.dumps(record))
    at.radio(key="grp_queries").set_value("Gallery").run()
    _ok(at)
    retrain = json.loads(next(c.proto.spec for c in at.get("plotly_chart") if "Predicted vs measured" in c.proto.spec))
    assert "title" not in retrain["layout"].get("legend", {})


@pytest.mark.slow
def test_reverse_view_from_the_explore_grids(app_env):
    at = _start(app_env)
    pick = at.multiselect(key="grid_pick")
    first = pick.options[0]
    index = int(str(first).lstrip("#").split(" ")[0])
    at.multiselect(key="grid_pick").set_value([index]).run()
    _ok(at)
    assert "What the group supports most" in _texts(at)
    assert at.session_state["grp_picked"] == [index]
    # each method in the colour it has in every figure of the app (QA round 17: plotly colours by position)
    from explorer.figures import method_colours

    bar = json.loads(next(c.proto.spec for c in at.get("plotly_chart") if "gallery sample's" in c.proto.spec))
    got = {t["name"].split(" (")[0]: t["marker"]["color"] for t in bar["data"]}
    titles = {"K-FAC Influence": "kfac", "TRAK": "trak", "D-TRAK": "dtrak"}
    assert got and all(got[t] == method_colours([n])[n] for t, n in titles.items() if t in got), got
    assert any(b.label == "Download predicted changes (CSV)" for b in at.get("download_button"))
    at.session_state["page"] = "Groups"
    at.run()
    at.radio(key="grp_kind").set_value("Hand-picked").run()
    _ok(at)
    assert at.text_input(key="grp_indices").value == str(index)



@pytest.mark.slow
def test_groups_page_with_a_compressed_bank_shows_exact_changes_once(tiny_app, tmp_path, monkeypatch):
    """With a compressed K-FAC bank the page's group changes are the exact ones (the summed gradient), not
    the compressed scan's column sums, and it says so; a page run that only changes the shown sample
    does not recompute them (QA8: every pick redid them)."""
    from test_app import _compressed_app

    from engine.attribution.group_attribution import group_attribution
    from engine.attribution.groups import group_change, parse_group
    from engine.attribution.pool import gallery_set

    at = _compressed_app(tiny_app, tmp_path, monkeypatch)
    at.session_state["page"] = "Groups"
    at.run()
    at.radio(key="grp_kind").set_value("A class").run()
    at.selectbox(key="grp_class").set_value(1).run()
    _ok(at)
    session = _handle().session
    group = parse_group("label:1", session.dataset)
    want = group_attribution(session, group, gallery_set(session), "loss", ["kfac"])
    assert want.note("kfac")  # the engine's exact sums for this bank
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Mean predicted change (K-FAC Influence)"] == f"{np.mean(want.changes('kfac')):+.3e}"
    estimate = np.mean(group_change(want.methods["kfac"].scores, group))
    assert metrics["Mean predicted change (K-FAC Influence)"] != f"{estimate:+.3e}"
    assert "the group's predicted changes are exact" in _texts(at)
    (matrix,) = [m for m in _handle().group_matrices.values() if m.name == "kfac"]
    exact = matrix.exact
    calls: list[str] = []
    group_changes, member_scores = exact.group_changes, exact.member_scores
    exact.group_changes = lambda m: calls.append("group") or group_changes(m)
    exact.member_scores = lambda i: calls.append("members") or member_scores(i)
    at.selectbox(key="grp_sample").set_value(2).run()
    _ok(at)
    assert calls == []


@pytest.mark.slow
def _groups_of_class_1(app_env):
    """The Groups page on a fresh server handle's matrices, with class 1 as the group."""
    from explorer.shared_results import RecentResults

    at = _start(app_env)
    _handle().group_matrices = RecentResults(48)  # the server's handle outlives a test: start with no matrices
    at.session_state["page"] = "Groups"
    at.run()
    at.radio(key="grp_kind").set_value("A class").run()
    at.selectbox(key="grp_class").set_value(1).run()
    _ok(at)
    return at


def test_moving_one_methods_damping_rescores_that_method_alone(app_env, monkeypatch):
    """The Groups page keeps each method's matrix under its own damping: moving TRAK's damping scores TRAK
    again and reuses K-FAC's matrix (before, every method's matrix was recomputed)."""
    import explorer.groups_view as groups_view

    calls: list[list[str]] = []
    real = groups_view.attribution_matrix
    monkeypatch.setattr(groups_view, "attribution_matrix",
                        lambda session, qset, measurement, methods, *a, **k: calls.append(list(methods))
                        or real(session, qset, measurement, methods, *a, **k))
    at = _groups_of_class_1(app_env)
    assert calls and set(calls[-1]) >= {"kfac", "trak"}
    kfac_before = [m for m in _handle().group_matrices.values() if getattr(m, "name", None) == "kfac"]
    calls.clear()
    from explorer.controls import damping_key

    slider = at.select_slider(key=damping_key("trak", _handle().session.preset.name))
    steps = _handle().session.method_info()["trak"]["damping_steps"]
    slider.set_value(next(v for v in steps if v != float(slider.value))).run()
    _ok(at)
    assert calls == [["trak"]]
    kfac_after = [m for m in _handle().group_matrices.values() if m.name == "kfac"]
    assert len(kfac_after) == 1 and kfac_after[0] is kfac_before[0]
    trak = [m for m in _handle().group_matrices.values() if m.name == "trak"]
    assert len(trak) == 2 and trak[0].damping != trak[1].damping


@pytest.mark.slow
def test_the_groups_choices_survive_a_visit_to_another_tab(app_env, monkeypatch):
    """QA 23b #4: back from the Explore tab, the Groups widgets showed their defaults ("A class", "Gallery",
    256/0) while the result below still used the earlier choices: Streamlit forgets the widgets of a tab not drawn.
    QA 28 #7: a widget given a value beside a key the state also set made Streamlit log a warning with a 30-line
    stack to the server's terminal."""
    from streamlit.elements.lib import policies

    said: list[str] = []
    monkeypatch.setattr(policies, "_shown_default_value_warning", False)  # once per process: earlier tests may show it
    monkeypatch.setattr(policies._LOGGER, "warning", lambda msg, *a, **k: said.append(msg % a))
    at = _start(app_env)
    at.session_state["page"] = "Groups"
    at.run()
    at.radio(key="grp_kind").set_value("One training image").run()
    at.number_input(key="grp_train").set_value(7).run()
    at.radio(key="grp_queries").set_value("Generated pool").run()
    at.number_input(key="grp_pool_n").set_value(16).run()
    at.number_input(key="grp_pool_seed").set_value(3).run()
    _ok(at)
    at.session_state["page"] = "Explore"
    at.run()
    _ok(at)
    at.session_state["page"] = "Groups"
    at.run()
    _ok(at)
    assert at.radio(key="grp_kind").value == "One training image" and at.number_input(key="grp_train").value == 7
    assert at.radio(key="grp_queries").value == "Generated pool"
    assert (at.number_input(key="grp_pool_n").value, at.number_input(key="grp_pool_seed").value) == (16, 3)
    assert "No pool of 16 samples with seed 3 yet" in _texts(at)
    assert not [m for m in said if "Session State API" in m], said[:1]


def test_the_retraining_caption_compares_the_records_settings_with_the_served_models():
    """A group-retrain record written with its attribution settings is compared with the served model's, the
    dampings included (they ranked the predictions): the caption says when they are this model's current ones,
    and names each one that differs; a record without them says it does not name them."""
    import dataclasses

    from engine.config import AttributionConfig, attribution_settings
    from explorer.group_retrain_view import retrain_record_note

    cfg = AttributionConfig(kfac_damping=1e-8)
    resolved = attribution_settings(cfg, 100)  # the served model's dampings, each resolved as the page scores
    served = {**dataclasses.asdict(cfg), **{k: resolved[k] for k in ("kfac_damping", "trak_damping", "dtrak_damping")}}

    def record(config):
        return {"config": {"created": "2026-12-06T12:00:00Z", **config}}

    same = record({"attribution": attribution_settings(cfg, 100)})
    other = record({"attribution": attribution_settings(dataclasses.replace(cfg, kfac_damping=1e-6), 100)})
    old = {"config": {"created": "2026-12-01T15:54:58Z"}}
    assert retrain_record_note([same], ["label:3"], served, chosen="label:0") == (
        "Groups label:3, not the one chosen above: predictions and measurements as recorded on 2026-12-06, at "
        "this model's current attribution settings; not recomputed.")
    # the group chosen above is among the recorded ones: said so, not denied (QA 25 #14)
    assert retrain_record_note([same], ["label:3", "label:8"], served, chosen="label:8").startswith(
        "Groups label:3, label:8 (the one chosen above among them): predictions")
    assert retrain_record_note([same], ["label:3"], served).startswith("Groups label:3: predictions")
    assert retrain_record_note([other], ["label:3"], served).endswith(
        "at other attribution settings than this model's: kfac_damping: 1e-06 (now 1e-08); not recomputed.")
    assert "the record does not name" in retrain_record_note([old, same], ["label:3", "label:8"], served)
    assert "2026-12-01 and 2026-12-06" in retrain_record_note([old, same], ["label:3", "label:8"], served)


def test_the_groups_page_warns_below_kfacs_damping_floor(app_env):
    """The Explore column's box for a K-FAC damping below its factors' resolution floor (QA 32 #7) was missing
    from the Groups page, whose sums and rankings are made of the same scores; it is there now, and only then."""
    from explorer.controls import damping_key
    at = _groups_of_class_1(app_env)
    assert not any("resolution" in w.value for w in at.warning)
    session = _handle().session
    steps = session.method_info()["kfac"]["damping_steps"]
    assert min(steps) < session.method("kfac").damping_floor()  # the slider reaches below this tiny model's floor
    at.select_slider(key=damping_key("kfac", session.preset.name)).set_value(min(steps)).run()
    _ok(at)
    assert any(w.value.startswith("K-FAC Influence: damping") and "below the float32 factors' resolution" in w.value
               for w in at.warning), [w.value for w in at.warning]


def test_the_copy_check_reads_the_chosen_methods_shares(app_env):
    """QA 70 F4: the Groups page's copy check always read K-FAC's shares, where ``copy-check --method`` takes any
    influence method.  Picking TRAK shows the copy check of TRAK's scores (the CLI's rows, from the engine's
    matrix over the gallery), and the caption names TRAK."""
    from engine.attribution.copycheck import copy_check, explain
    from engine.attribution.group_attribution import group_attribution
    from engine.attribution.groups import parse_group
    from engine.attribution.pool import gallery_set

    at = _groups_of_class_1(app_env)
    assert at.selectbox(key="grp_copy_method").value == "kfac"  # K-FAC first, as before
    session = _handle().session
    qset = gallery_set(session)
    result = group_attribution(session, parse_group("label:1", session.dataset), qset, "loss", ["kfac", "trak"])

    def rows(name):
        return [explain(r) for r in copy_check(result.methods[name].scores, qset.images, session.dataset.images,
                                               qset.names, qset.labels)[:5]]

    def shown():
        return [m.value for m in at.markdown if m.value.startswith("Sample ")]

    assert shown() == rows("kfac")
    assert rows("trak") != rows("kfac")  # else the test could not tell the methods apart
    at.selectbox(key="grp_copy_method").set_value("trak").run()
    _ok(at)
    assert shown() == rows("trak")
    assert any(c.value.startswith("Two kinds of evidence per sample") and "(TRAK: the share" in c.value
               for c in at.caption)
    at.session_state["page"] = "Explore"  # kept across tabs, as the page's other choices (keep_choices)
    at.run()
    at.session_state["page"] = "Groups"
    at.run()
    _ok(at)
    assert at.selectbox(key="grp_copy_method").value == "trak" and shown() == rows("trak")


def test_the_reverse_views_chart_gives_each_method_its_own_y_scale(app_env):
    """QA 70 F5: the reverse view's bar chart put every method on one y axis, scaled to the largest changes, so a
    method on a smaller scale (a gradient dot product: about 1e-3 against K-FAC's 0.08) drew flat bars.  Each
    method now has its own panel and y axis (not matched to another), which says what its bars are, in the
    method's colour."""
    from explorer.figures import method_colours

    at = _start(app_env)
    index = int(str(at.multiselect(key="grid_pick").options[0]).lstrip("#").split(" ")[0])
    at.multiselect(key="grid_pick").set_value([index]).run()
    _ok(at)
    fig = json.loads(next(c.proto.spec for c in at.get("plotly_chart") if "gallery sample's" in c.proto.spec))
    info = _handle().session.method_info()
    by_title = {info[n]["title"]: n for n in info}
    traces = {t["name"].split(" (")[0]: t for t in fig["data"]}
    assert len(traces) >= 2 and set(traces) <= set(by_title), list(traces)
    axes = {t["yaxis"] for t in traces.values()}
    assert len(axes) == len(traces)  # one panel per method
    layout = {name: fig["layout"]["yaxis" + t["yaxis"][1:]] for name, t in traces.items()}
    assert all(a.get("matches") is None for a in layout.values()), layout  # independent scales
    for name, t in traces.items():
        assert t["marker"]["color"] == method_colours([by_title[name]])[by_title[name]]
        want = "square norm" if by_title[name] == "dtrak" else "training loss"
        assert layout[name]["title"]["text"] == f"change of the {want}"
    assert "if train:" in fig["layout"]["title"]["text"]  # the title's words kept
