"""Sidebar: measurement, damping, top-k, Monte Carlo samples and which methods to show."""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from engine.model.measurements import CATALOGUE, measurement_info, uses_draws
from explorer import chips
from explorer.runtime import Handle

# The engine's catalogue (engine.model.measurements.CATALOGUE): names, titles and help in one place.
MEASUREMENTS = {m.spec: m.title for m in CATALOGUE}
MEASUREMENT_HELP = {m.spec: m.help for m in CATALOGUE}
POWERS = [10.0**e for e in range(-12, 3)]  # labelled as 1e-06, the other steps as 4.6e-03


@dataclass(frozen=True)
class Settings:
    measurement: str  # engine spec: loss | elbo | trajectory | loss@t=500 | square-norm
    methods: tuple[str, ...]
    damping: tuple[tuple[str, float], ...]
    top_k: int
    mc_samples: int

    @property
    def damping_dict(self) -> dict[str, float]:
        return dict(self.damping)


def _fmt_damping(default: float):
    def fmt(v: float) -> str:
        text = f"{v:.0e}" if v in POWERS else f"{v:.1e}"
        return text + (" (default)" if v == default else "")

    return fmt


def mc_options(default_m: int, bank_draws: bool) -> list[int]:
    """The Monte Carlo slider's steps.  With ``bank_draws`` (``query_draws == "bank"``: the query takes the
    training gradients' own draws) none above the bank's M, ``default_m``: the engine refuses every larger one,
    and the slider offered 32-256 on mnist, each answered by an error in configuration words (QA 64 F7)."""
    options = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, int(default_m)})
    return [m for m in options if m <= default_m] if bank_draws else options


def damping_key(method: str, preset: str) -> str:
    """The sidebar damping slider's state key, one per model as the M slider's: a key shared by the models kept
    one model's value for the other (QA 30c: after digits -> mnist -> digits, TRAK scored digits at mnist's
    default 1e-4, not its own 5.6e-5, the sidebar showing digits' defaults)."""
    return f"damping_{method}:{preset}"


def choose_settings(handle: Handle, has_trajectory: bool) -> Settings:
    session = handle.session
    info = session.method_info()
    st.sidebar.header("Measurement")
    kind = st.sidebar.selectbox(
        "What to attribute",
        list(MEASUREMENTS),
        format_func=lambda k: MEASUREMENTS[k]
        + ("" if not measurement_info(k).needs_trajectory or has_trajectory else " (needs a sample)"),
        key="measurement",
        help="\n\n".join(f"**{MEASUREMENTS[k]}**: {v}" for k, v in MEASUREMENT_HELP.items()),
    )
    spec = kind
    if kind == "loss@t":
        T = session.diffusion.T
        if not 1 <= st.session_state.get("timestep", 1) <= T:  # a value kept from a model with more steps
            del st.session_state["timestep"]
        t = st.sidebar.slider(f"Timestep t (1..{T})", 1, T, max(1, T // 2), key="timestep")
        spec = f"loss@t={t}"
    st.sidebar.caption(MEASUREMENT_HELP[kind])

    st.sidebar.header("Methods")
    names = session.method_names()
    # at first the methods that can run here (the server's check: CLIP without its weights cannot, QA 47 #10)
    unavailable = handle.build.unavailable
    chips.init_selection("methods", names, initial=[n for n in names if n not in unavailable])
    methods = st.sidebar.multiselect("Show", names, format_func=lambda n: info[n]["title"], key="methods")
    chips.select_all("methods", names, "Show all methods", where=st.sidebar)
    damping: list[tuple[str, float]] = []
    for name in names:
        default = info[name].get("default_damping")
        if default is None or name not in methods:
            continue
        value = st.sidebar.select_slider(
            f"{info[name]['title']} damping",
            # the engine's steps: three per decade, every one a lookup after the first pass
            options=info[name]["damping_steps"],
            value=float(default),
            format_func=_fmt_damping(float(default)),
            key=damping_key(name, session.preset.name),
            help="lambda in (G + lambda I)^-1, on the scale of the mean training loss. Moving it re-scores "
            "from the cached query state: no gradient is recomputed.",
        )
        damping.append((name, float(value)))
    st.sidebar.header("Display and sampling")
    top_k = st.sidebar.slider("Top-k images per method", 1, 32, 8, key="top_k")
    default_m = int(session.config.mc_samples)
    bank = session.config.query_draws == "bank"
    m_options = mc_options(default_m, bank)
    draws = uses_draws(spec)
    mc = st.sidebar.select_slider(
        "Monte Carlo samples for the query",
        options=m_options,
        value=default_m,
        key=f"mc_samples:{session.preset.name}",  # each model keeps its own (its default is its bank's M)
        disabled=not draws,  # its value is kept for the measurements that use it
        help="Draws of (t, noise) for the query's measurement gradient (common to every method). "
        "The training-gradient caches keep the M they were built with."
        + (f" This model's queries take the training gradients' own draws, so at most their M = {default_m}."
           if bank else "")
        + ("" if draws else " Not used by the trajectory measurement, which evaluates the recorded sampling path "
           "exactly."),
    )
    if not draws:
        st.sidebar.caption("The trajectory measurement uses no Monte Carlo draws: the slider applies to the others.")
    return Settings(spec, tuple(methods), tuple(damping), int(top_k), int(mc))
