"""The sidebar's damping sliders keep one value per model (QA 30c: after digits -> mnist -> digits, TRAK scored
digits at mnist's default damping 1e-4 instead of digits' 0.1/N = 5.6e-5: the slider's state key was shared by
the two models, as the M slider's had been before it got one per model)."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest


def _page() -> None:
    from types import SimpleNamespace

    import streamlit as st

    from engine.attribution.damping_grid import damping_steps
    from explorer.controls import choose_settings

    preset = st.session_state.get("which", "digits")
    default = {"digits": 0.1 / 1797, "mnist": 0.1 / 1000}[preset]
    info = {"trak": {"title": "TRAK", "default_damping": default, "damping_steps": damping_steps((1e-9, 1.0), default)}}
    session = SimpleNamespace(
        preset=SimpleNamespace(name=preset), diffusion=SimpleNamespace(T=100),
        config=SimpleNamespace(mc_samples=16, query_draws="own"), method_info=lambda: info, method_names=lambda: ["trak"])
    s = choose_settings(SimpleNamespace(session=session, build=SimpleNamespace(unavailable={})), True)
    st.session_state["chosen"] = dict(s.damping)["trak"]


def test_each_model_keeps_its_own_damping():
    at = AppTest.from_function(_page)
    at.run()
    digits_default = at.session_state["chosen"]
    assert abs(digits_default - 0.1 / 1797) < 1e-12  # drawn at its default
    at.session_state["which"] = "mnist"
    at.run()
    mnist_default = at.session_state["chosen"]
    assert abs(mnist_default - 0.1 / 1000) < 1e-12  # mnist's own default
    at.session_state["which"] = "digits"
    at.run()
    assert at.session_state["chosen"] == digits_default  # not mnist's value carried back
