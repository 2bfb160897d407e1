"""QA 64: the page says what the engine computed.  The sign words over D-TRAK's square norm (F2), the retraining
views' predicted change of another measurement (F1), the Groups page's M (F3), the top-k plots' top-k (F4), a
precomputed answer's timings (F5), the timing table's columns (F6), mnist's M slider (F7), the LDS heading (F8),
the precomputed D-TRAK note (F9), "on average" (F11).  Views run in Streamlit's AppTest on the fake handle of
test_app_presentation: no server, no model."""

from __future__ import annotations

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
