"""QA round 17's cosmetic findings 4-7: the Evaluation page's damping-sweep colours, its LDS headings and its
retraining table, the Explore columns' note beside the query thumbnail, the Groups page's ranking captions.
Views run in Streamlit's AppTest on the fake handle of test_app_presentation: no server, no model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
from test_app_presentation import (
    METHOD_INFO,
    FakeHandle,
    _evaluation_page,
    _grids_page,
    _query,
    _settings,
    _walk,
    fake_result,
    record_images,  # noqa: F401 - fixture
)

MINE = {"checkpoint_hash": "f" * 16}


def _sweep(*values: float) -> list[dict]:
    return [{"damping": 10.0 ** -k, "lds": v} for k, v in enumerate(values)]


def _eval_handle():
    from engine.config import AttributionConfig

    handle = FakeHandle()
    handle.session.config = AttributionConfig()  # M = 64, the served model's settings
    handle.session.method = lambda n: SimpleNamespace(kind=METHOD_INFO[n]["kind"], damping_field="-")
    handle.session.damping_for = lambda n, d: METHOD_INFO[n].get("default_damping")
    handle.session.command = lambda verb: f"attribution-engine {verb}"  # the "none yet" notes of a section
    return handle


def _lds_file(folder, name: str, measurement: str, mc_samples: int, sweeps: dict) -> None:
    from engine.config import AttributionConfig

    attribution = {**AttributionConfig().__dict__, "mc_samples": mc_samples}  # only M may differ from the served
    (folder / name).write_text(json.dumps({
        "config": {**MINE, "measurement": measurement, "subsets": 32, "seeds": 1, "fraction": 0.5, "num_train": 1797,
                   "queries": 32, "true_measurement_mc_samples": 1024, "attribution": attribution},
        "methods": {n: {"lds": pts[0]["lds"], "damping": 1e-8} for n, pts in sweeps.items()},
        "sweeps": sweeps}))


def _run_evaluation(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("ATTRIBUTION_RESULTS", str(tmp_path))
    at = AppTest.from_function(_evaluation_page, args=(_eval_handle(),))
    at.run()
    assert not at.exception, at.exception
    return at


def test_each_method_keeps_its_colour_in_every_damping_sweep_chart(tmp_path, monkeypatch):
    """Finding 4: plotly coloured the series by position, so TRAK was light blue under "Training loss" (second
    series) and red under "Negative ELBO" (third, after "K-FAC Influence [loss]")."""
    _lds_file(tmp_path, "lds_fake_loss.json", "loss", 64,
              {"kfac": _sweep(0.5, 0.4), "trak": _sweep(0.1, 0.3), "dtrak": _sweep(0.1, 0.2)})
    _lds_file(tmp_path, "lds_fake_elbo.json", "elbo", 64,
              {"kfac": _sweep(0.2, 0.1), "kfac[loss]": _sweep(0.3, 0.2), "trak": _sweep(0.0, 0.1),
               "dtrak": _sweep(0.05, 0.1)})
    at = _run_evaluation(tmp_path, monkeypatch)
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart") if "Damping sweeps" in c.proto.spec]
    assert len(charts) == 2
    colour: dict[str, set] = {}
    for chart in charts:
        for trace in chart["data"]:
            line, marker = trace.get("line", {}), trace.get("marker", {})
            assert line.get("color") and line.get("color") == marker.get("color"), trace  # drawn, not themed
            colour.setdefault(trace["name"], set()).add(line["color"])
    assert set(colour) == {"K-FAC Influence", "K-FAC Influence [loss]", "TRAK", "D-TRAK"}
    assert all(len(c) == 1 for c in colour.values()), colour  # one colour per method across the charts
    kfac, trak, dtrak = (colour[t].pop() for t in ("K-FAC Influence", "TRAK", "D-TRAK"))
    assert len({kfac, trak, dtrak}) == 3
    assert colour["K-FAC Influence [loss]"] == {kfac}  # K-FAC's variant: K-FAC's colour, dashed
    dashes = {t["name"]: t["line"].get("dash") for t in charts[1]["data"]}
    assert dashes["K-FAC Influence [loss]"] == "dash" and dashes["K-FAC Influence"] == "solid"


def test_method_colours_are_the_registrys_and_the_label_chart_uses_them():
    """The same map colours the Explore page's label histogram: a method has one colour in the app."""
    import pandas as pd

    from explorer.figures import damping_sweeps, label_histogram, method_colours

    colours = method_colours(["pixel", "trak", "kfac[loss]", "kfac", "dtrak", "clip", "gone"])
    assert colours["kfac"] == colours["kfac[loss]"] == "#1F77B4" and colours["trak"] == "#FF7F0E"
    assert colours["dtrak"] == "#2CA02C"
    assert len({colours[n] for n in ("kfac", "trak", "dtrak", "clip", "pixel", "gone")}) == 6
    assert method_colours(["trak"]) == {"trak": colours["trak"]}  # whichever others a figure shows
    counts = pd.DataFrame({"method": ["trak", "trak", "pixel"], "label": ["0", "1", "0"], "count": [3, 1, 2]})
    fig = label_histogram(counts, {n: v["title"] for n, v in METHOD_INFO.items()}, 4)
    assert {t.name: t.marker.color for t in fig.data} == {"TRAK": colours["trak"], "Pixel similarity": colours["pixel"]}
    only_trak = damping_sweeps({"trak": _sweep(0.1, 0.2)}, {"trak": "TRAK"})
    assert only_trak.data[0].line.color == colours["trak"]


def test_an_lds_section_measured_with_another_m_says_so_in_its_heading(tmp_path, monkeypatch):
    """Finding 5: two sections both headed "Measurement: Training loss (`loss`)" with the same first line, K-FAC
    at 0.44 in one and 0.14 in the other; only the second's Details said M = 8."""
    _lds_file(tmp_path, "lds_fake_loss.json", "loss", 64, {"kfac": _sweep(0.44)})
    _lds_file(tmp_path, "lds_fake_loss_attribution_m8.json", "loss", 8, {"kfac": _sweep(0.14)})
    at = _run_evaluation(tmp_path, monkeypatch)
    headings = [m.value for m in at.markdown if m.value.startswith("#### Measurement:")]
    assert headings == ["#### Measurement: Training loss (`loss`)",  # the served settings: nothing to add
                        "#### Measurement: Training loss (`loss`) · measured with M = 8 Monte Carlo draws "
                        "(the app now uses 64)"]
    details = " ".join(t for t, inside in _walk(at._tree) if inside)
    assert "mc_samples: 8 (now 64)" in details  # the same difference, as Details has named it


def test_settings_heading_words():
    from explorer.evaluation_view import settings_heading

    assert settings_heading(None, False) == settings_heading([], False) == ""
    assert settings_heading(["mc_samples: 8 (now 64)", "draws: shared (now per-example)", "kfac_bank_whiten: None "
                             "(now 1e-10)"], False) == \
        " · measured with M = 8 Monte Carlo draws (the app now uses 64) and 2 other settings"
    assert settings_heading(["draws: shared (now per-example)"], True) == \
        " · measured with shared gradient draws (the app now uses per-example) and 1 other setting"
    # a setting without words, or one the file does not record, is counted, never named by its field
    assert settings_heading(["kfac_bank_whiten: None (now 1e-10)"], False) == " · measured with 1 other setting"
    assert settings_heading(["mc_samples: not recorded (now 64)", "fisher_type: mc (now type-2)"], False) == \
        " · measured with 2 other settings"
    assert settings_heading([], True) == " · measured with 1 other setting"


def test_the_retraining_table_shows_a_dash_where_a_similarity_predicts_nothing(tmp_path, monkeypatch):
    """Finding 7: "predicted change" read "None" in Pixel similarity's rows."""
    (tmp_path / "retrain_top_fake.json").write_text(json.dumps({
        "config": {**MINE, "measurement": "loss", "removed": 36, "num_train": 1797, "steps": 6000},
        "results": [{"query": "gallery:0", "method": "kfac", "predicted_change": 0.99391, "measured_change": 0.013,
                     "random_measured_change": 0.0004},
                    {"query": "gallery:0", "method": "pixel", "predicted_change": None, "measured_change": 0.0164,
                     "random_measured_change": 0.0004}]}))
    at = _run_evaluation(tmp_path, monkeypatch)
    (frame,) = [d.value for d in at.dataframe if "predicted change" in d.value.columns]
    assert frame["predicted change"].tolist() == ["0.9939", "–"]
    assert "None" not in frame.astype(str).to_numpy().ravel().tolist()
    flow = [t for t, inside in _walk(at._tree) if not inside]
    (note,) = [t for t in flow if t.startswith("– in *predicted change*")]
    assert "Pixel similarity is a similarity, not an influence method" in note and "predicts no change" in note


def test_no_prediction_note():
    from explorer.evaluation_view import no_prediction_note

    assert no_prediction_note([], METHOD_INFO) == ""
    both = no_prediction_note(["pixel", "clip", "pixel"], METHOD_INFO)
    assert both.startswith("– in *predicted change*: Pixel similarity and CLIP similarity are similarities")
    assert no_prediction_note(["trak"], METHOD_INFO) == "– in *predicted change*: TRAK: no predicted change in the file."


def _caption_places(node, depth=0, out=None):
    """(caption text, how many st.columns levels it sits in) of every caption under ``node``."""
    out = [] if out is None else out
    kind = getattr(node, "type", None)
    if kind == "caption":
        out.append((node.value, depth))
    children = getattr(node, "children", None)
    for child in (children.values() if isinstance(children, dict) else []):
        _caption_places(child, depth + (kind == "column"), out)
    return out


def test_the_note_beside_the_query_thumbnail_takes_the_columns_width_with_four_or_five_methods():
    """Finding 6: at 1280 px D-TRAK's "uses the square-norm measurement" beside the 48 px thumbnail (a third of a
    118 px column) broke as "measureme / nt"; with 4 or 5 methods it goes under the thumbnail, across the column."""
    from streamlit.testing.v1 import AppTest

    for names, depth in ((list(METHOD_INFO), 1), (["kfac", "trak", "dtrak", "pixel"], 1), (["kfac", "trak", "dtrak"], 2)):
        result = fake_result()
        result.methods["dtrak"].reason = "uses the square-norm measurement"
        at = AppTest.from_function(_grids_page, args=(FakeHandle(), _query(), result, _settings(names)))
        at.run()
        assert not at.exception, at.exception
        notes = [(t, d) for t, d in _caption_places(at._tree) if t.startswith(("damping", "similarity score"))]
        assert len(notes) == len([n for n in names if n != "clip"]), notes
        assert ("damping 1.0e-04 · uses the square-norm measurement", depth) in notes, (names, notes)
        assert {d for _, d in notes} == {depth}, (names, notes)  # every column alike: the grids stay level


class _Ranked(SimpleNamespace):
    pass


def _reverse_section_page(handle, result, settings):
    from explorer import groups_view

    groups_view.reverse_section(handle, result, settings)


def test_the_groups_ranking_captions_break_after_the_name(record_images):  # noqa: F811 - the fixture imported above
    """Finding 7: "2. gallery:20 · +5.4e-01" under a 72 px thumbnail wrapped over three ragged lines
    ("2." / "gallery:20 ·" / "+5.4e-01"); now the name, a line break, the change."""
    from streamlit.testing.v1 import AppTest

    from explorer.groups_view import RANKING_NOTE

    names = [f"gallery:{i}" for i in range(25)]
    qset = SimpleNamespace(name="gallery", names=names,
                           queries=[SimpleNamespace(image=np.zeros((1, 8, 8), np.float32)) for _ in names])
    order = [20, 1, 2, 9]
    result = SimpleNamespace(
        ok=lambda: ["kfac", "trak"], measurement="loss", measurement_of=lambda n: "loss", qset=qset,
        group=SimpleNamespace(size=5),
        ranking=lambda n, k: [_Ranked(rank=i + 1, query=f"gallery:{q}", change=0.54 / (i + 1))
                              for i, q in enumerate(order[:k])])
    at = AppTest.from_function(_reverse_section_page, args=(FakeHandle(), result, _settings(["kfac", "trak"])))
    at.run()
    assert not at.exception, at.exception
    grids = [c for c in record_images if c["n"] == 4]
    assert len(grids) == 2
    assert grids[0]["captions"] == ["gallery:20  \n+5.4e-01", "gallery:1  \n+2.7e-01", "gallery:2  \n+1.8e-01",
                                    "gallery:9  \n+1.4e-01"]
    assert RANKING_NOTE in [c.value for c in at.caption]
