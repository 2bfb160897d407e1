"""Sidebar: measurement, damping, top-k, Monte Carlo samples and which methods to show."""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from engine.attribution.damping_grid import DAMPING_GRID, SUPPORTED
from explorer.runtime import Handle

MEASUREMENTS = {
    "loss": "Training loss",
    "elbo": "ELBO (bits per dimension)",
    "trajectory": "Trajectory log-probability",
    "loss@t": "Loss at one timestep t",
    "square-norm": "Square norm (D-TRAK's measurement)",
}
MEASUREMENT_HELP = {
    "loss": "The diffusion training loss of the query, averaged over timesteps and noise (paper eq. 2).",
    "elbo": "Negative evidence lower bound (Ho et al. eq. 5) in bits per dimension: a bound on -log p(x).",
    "trajectory": "Minus the log-probability of the exact sampling path x_T ... x_0 that produced the query "
    "(nats, summed over every step and value, the last step x_1 -> x_0 included); only generated samples have one.",
    "loss@t": "The loss at a single noise level t (1 = almost clean, 1000 = pure noise).",
    "square-norm": "Squared norm of the predicted noise, the surrogate D-TRAK uses (not a likelihood).",
}
# Three values per decade over 1e-12..1e2: K-FAC's first pass scores all of them (engine.attribution.damping_grid),
# so every slider position is a lookup; TRAK re-scores in under a millisecond anyway.
POWERS = [10.0**e for e in range(-12, 3)]
STEPS = [g for g in DAMPING_GRID if SUPPORTED[0] <= g <= SUPPORTED[1]]


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


def damping_options(default: float) -> list[float]:
    """Three values per decade (the powers of ten among them) plus the configured default, ascending
    (a log-scale slider)."""
    return sorted(set(STEPS) | {float(default)})


def _fmt_damping(default: float):
    def fmt(v: float) -> str:
        text = f"{v:.0e}" if v in POWERS else f"{v:.1e}"
        return text + (" (default)" if v == default else "")

    return fmt


def choose_settings(handle: Handle, has_trajectory: bool) -> Settings:
    session = handle.session
    info = session.method_info()
    st.sidebar.header("Measurement")
    kind = st.sidebar.selectbox(
        "What to attribute",
        list(MEASUREMENTS),
        format_func=lambda k: MEASUREMENTS[k] + ("" if k != "trajectory" or has_trajectory else " (needs a sample)"),
        key="measurement",
        help="\n\n".join(f"**{MEASUREMENTS[k]}**: {v}" for k, v in MEASUREMENT_HELP.items()),
    )
    spec = kind
    if kind == "loss@t":
        t = st.sidebar.slider("Timestep t", 1, session.diffusion.T, 500, key="timestep")
        spec = f"loss@t={t}"
    st.sidebar.caption(MEASUREMENT_HELP[kind])

    st.sidebar.header("Methods")
    names = session.method_names()
    methods = st.sidebar.multiselect(
        "Show", names, default=names, format_func=lambda n: info[n]["title"], key="methods"
    )
    damping: list[tuple[str, float]] = []
    for name in names:
        default = info[name].get("default_damping")
        if default is None or name not in methods:
            continue
        value = st.sidebar.select_slider(
            f"{info[name]['title']} damping",
            options=damping_options(default),
            value=float(default),
            format_func=_fmt_damping(float(default)),
            key=f"damping_{name}",
            help="lambda in (G + lambda I)^-1, on the scale of the mean training loss. Moving it re-scores "
            "from the cached query state: no gradient is recomputed.",
        )
        damping.append((name, float(value)))
    st.sidebar.header("Display and sampling")
    top_k = st.sidebar.slider("Top-k images per method", 1, 32, 8, key="top_k")
    default_m = int(session.config.mc_samples)
    m_options = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, default_m})
    mc = st.sidebar.select_slider(
        "Monte Carlo samples for the query",
        options=m_options,
        value=default_m,
        key="mc_samples",
        help="Draws of (t, noise) for the query's measurement gradient (common to every method). "
        "The training-gradient caches keep the M they were built with.",
    )
    return Settings(spec, tuple(methods), tuple(damping), int(top_k), int(mc))
