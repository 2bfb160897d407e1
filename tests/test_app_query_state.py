"""The app's query state: what the page says and keeps about the query (QA 40 #1, #3, #9).

* #9: the trajectory measurement uses no Monte Carlo (t, noise) draws, yet the Timings line said
  "64 Monte Carlo draws" and the sidebar's M slider stayed active for it.
* #3: a reload after a server restart kept ``?gallery=N`` but not the model (mnist came back as digits).
* #1: after "Generate sample" the main area once stayed empty below the build panel for minutes.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from test_app import app_env, tiny_app  # noqa: F401 - fixtures
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


# --- QA 40 #3: the model in the URL, the gallery sample per model ----------------------------------------------


def _model_page():
    import streamlit as st

    from explorer import query_view, runtime

    parsed = runtime.AppArgs(preset="digits")  # the server's default, as app.py's parse_args gives it
    args = runtime.choose_model(query_view.model_from_url(parsed))
    query_view.keep_url(args.preset, args.preset)  # app.py: the served preset's name, the switch's value
    chosen = query_view.chosen_gallery_index(32, args.preset)
    st.markdown(f"serving {args.preset}, gallery sample {chosen}")
    st.button("pick 5", key="pick5", on_click=query_view._select_gallery, args=(args.preset, 5))


def _url(at, name):
    value = at.query_params.get(name)
    return value[0] if isinstance(value, list) else value


def _two_models(monkeypatch):
    from explorer import runtime

    monkeypatch.setattr(runtime, "model_choices", lambda args: ["digits", "mnist"])


def _served(at) -> str:
    (line,) = [m.value for m in at.markdown if m.value.startswith("serving")]
    return line


def test_a_reload_keeps_the_model_and_its_gallery_sample_from_the_url(monkeypatch):
    """QA 40 #3: a reload after a server restart opened digits' sample 12 for a user on mnist's sample 12."""
    from streamlit.testing.v1 import AppTest

    _two_models(monkeypatch)
    at = AppTest.from_function(_model_page)
    at.query_params["model"] = "mnist"
    at.query_params["gallery"] = "12"
    at.run()
    assert not at.exception, at.exception
    assert at.radio(key="model_preset").value == "mnist"
    assert _served(at) == "serving mnist, gallery sample 12"
    assert (_url(at, "model"), _url(at, "gallery")) == ("mnist", "12")
    at.button(key="pick5").click().run()
    assert _served(at) == "serving mnist, gallery sample 5" and _url(at, "gallery") == "5"

    # the switch: digits opens its own first sample, not mnist's sample 5; the URL follows; back again, mnist's 5
    at.radio(key="model_preset").set_value("digits").run()
    assert not at.exception, at.exception
    assert _served(at) == "serving digits, gallery sample 0"
    assert (_url(at, "model"), _url(at, "gallery")) == ("digits", "0")
    at.radio(key="model_preset").set_value("mnist").run()
    assert _served(at) == "serving mnist, gallery sample 5"
    assert (_url(at, "model"), _url(at, "gallery")) == ("mnist", "5")
    assert not at.info  # no note for a model the server offers


def test_a_link_without_a_model_keeps_its_gallery_sample_for_the_default(monkeypatch):
    """Links made before the model was in the URL (``?gallery=N``) open the default model's sample N."""
    from streamlit.testing.v1 import AppTest

    _two_models(monkeypatch)
    at = AppTest.from_function(_model_page)
    at.query_params["gallery"] = "7"
    at.run()
    assert _served(at) == "serving digits, gallery sample 7"
    assert (_url(at, "model"), _url(at, "gallery")) == ("digits", "7")


def test_an_unknown_model_in_the_url_opens_the_default_and_says_so(monkeypatch):
    from streamlit.testing.v1 import AppTest

    _two_models(monkeypatch)
    at = AppTest.from_function(_model_page)
    at.query_params["model"] = "cifar9"
    at.query_params["gallery"] = "x"  # hand-edited too: the first sample
    at.run()
    assert not at.exception, at.exception
    assert _served(at) == "serving digits, gallery sample 0" and _url(at, "model") == "digits"
    (note,) = [i.value for i in at.info]
    assert "`cifar9`" in note and "does not offer" in note and "showing `digits`" in note
    at.run()  # said once, not on every run
    assert not at.info


# --- QA 40 #1: "Generate sample" draws the sample's results in the same run -------------------------------------


def test_generating_a_sample_draws_its_results_without_asking_for_another_run(app_env, monkeypatch):  # noqa: F811
    """QA 40 #1: after the first "Generate sample" (digits, a build running) the sidebar said "Showing the sample
    generated with seed 0" while the main area showed nothing below the build panel for minutes, no script running.
    The generating run ended in ``st.rerun()``, a full-page rerun asked for while the build panel's ``run_every``
    fragment was live, as the one that left the page blank below that panel in QA round 16. The run that generates
    now draws the header and the results itself, and the seed and button are usable again at its end."""
    import streamlit
    from test_app import _handle, _ok, _start, _texts

    at = _start(app_env)
    at.radio(key="source").set_value("New sample").run()
    _ok(at)
    at.number_input(key="gen_seed").set_value(3).run()
    reruns: list[str] = []
    original = streamlit.rerun

    def rerun(*args, **kwargs):
        reruns.append("rerun")
        return original(*args, **kwargs)

    monkeypatch.setattr(streamlit, "rerun", rerun)
    at.button(key="gen_button").click().run()
    _ok(at)
    assert reruns == []  # the generating run drew the page itself
    assert 3 in _handle().generated
    texts = _texts(at)
    assert "Showing the sample generated with seed 3." in [c.value for c in at.sidebar.caption]
    assert "New sample (seed 3)" in texts and "**Proponents**" in texts  # the header and the results
    assert [t.label for t in at.tabs][:1] == ["Explore"]
    button, seed = at.button(key="gen_button"), at.number_input(key="gen_seed")
    assert button.label == "Generate sample" and not button.disabled and not seed.disabled and seed.value == 3
    assert at.session_state["busy"] is None and at.session_state["pending_seed"] is None
    assert not [b for b in at.button if b.key == "gen_button_busy"]  # the stand-ins were replaced

    at.number_input(key="gen_seed").set_value(4).run()  # the next generation works the same
    at.button(key="gen_button").click().run()
    _ok(at)
    assert reruns == [] and "New sample (seed 4)" in _texts(at)
