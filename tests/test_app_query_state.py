"""The app's query state: what the page says and keeps about the query (QA 40 #1, #3, #9).

* #9: the trajectory measurement uses no Monte Carlo (t, noise) draws, yet the Timings line said
  "64 Monte Carlo draws" and the sidebar's M slider stayed active for it.
* #3: a reload after a server restart kept ``?gallery=N`` but not the model (mnist came back as digits).
* #1: after "Generate sample" the main area once stayed empty below the build panel for minutes.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from test_app_presentation import METHOD_INFO, FakeHandle, _settings, fake_result

# --- QA 40 #9: draws for the measurements that use them, none for trajectory ---------------------------------


def _sidebar(handle):
    from explorer import controls

    controls.choose_settings(handle, True)


def test_the_monte_carlo_slider_is_off_for_the_trajectory_measurement_only():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_function(_sidebar, args=(FakeHandle(),))
    at.run()
    slider = at.select_slider(key="mc_samples:fake")
    assert not slider.disabled  # the training loss is estimated with (t, noise) draws
    at.selectbox(key="measurement").set_value("trajectory").run()
    assert not at.exception, at.exception
    slider = at.select_slider(key="mc_samples:fake")
    assert slider.disabled and "Not used by the trajectory measurement" in slider.help
    assert any("uses no Monte Carlo draws" in c.value for c in at.sidebar.caption)
    for kind in ("loss@t", "square-norm", "elbo", "elbo-exact"):  # each reads the draws (measurements.measure)
        at.selectbox(key="measurement").set_value(kind).run()
        assert not at.select_slider(key="mc_samples:fake").disabled, kind
    assert at.select_slider(key="mc_samples:fake").value == 4  # kept through the trajectory measurement


def _timings_page(handle, result, settings):
    from explorer import results_view

    results_view.timings(handle, result, settings)


def _timings_caption(measurement: str, query_draws: str = "per-example") -> str:
    from streamlit.testing.v1 import AppTest

    handle = FakeHandle()
    handle.session.config = SimpleNamespace(mc_samples=64, query_draws=query_draws)
    result = dataclasses.replace(fake_result(), measurement=measurement,
                                 query={"spec": "gallery:0", "mc_samples": 64}, timing_ms={"gradient": 5.0})
    at = AppTest.from_function(_timings_page, args=(handle, result, _settings(METHOD_INFO)))
    at.run()
    assert not at.exception, at.exception
    (line,) = [c.value for c in at.caption if "measurement `" in c.value]
    return line


def test_the_timings_line_says_what_the_draws_were_for_each_measurement():
    """QA 40 #9: "measurement `trajectory` · 64 Monte Carlo draws" for a measurement that reads no draws."""
    traj = _timings_caption("trajectory", query_draws="bank")
    assert "64" not in traj and "no Monte Carlo draws" in traj and "common random numbers" not in traj
    assert _timings_caption("loss").endswith("measurement `loss` · 64 Monte Carlo draws")
    assert "64 Monte Carlo noise draws at that timestep" in _timings_caption("loss@t=500")
    assert "every timestep, 64 Monte Carlo noise draws reused" in _timings_caption("elbo-exact")
    assert _timings_caption("square-norm").endswith("64 Monte Carlo draws")
    assert "common random numbers" in _timings_caption("loss", query_draws="bank")
