"""Plotly figures for one query's scores (pure functions of tables; no Streamlit)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engine.attribution.methods import method_names


def label_order(values: Iterable[object]) -> list[str]:
    """Distinct labels as the legends list them: numerically where they are numbers (0, 1, 2, ..., 10; plotly
    lists them in order of first appearance, "1, 0, 2, 7, ..."), then any others ("nan") alphabetically."""
    def key(v: str) -> tuple:
        try:
            x = float(v)
        except ValueError:
            return (1, 0.0, v)
        return (1, 0.0, v) if np.isnan(x) else (0, x, v)

    return sorted({str(v) for v in values}, key=key)


UNLABELLED = "#BBBBBB"  # a sample the classifier gave no label


def _digit(v: str) -> int | None:
    """``v`` as a class number 0..9, else None."""
    try:
        x = float(v)
    except ValueError:
        return None
    return int(x) if x.is_integer() and 0 <= x < 10 else None


def label_colours(values: Iterable[object]) -> dict[str, str]:
    """label -> colour from a qualitative palette: D3's ten distinct hues (Streamlit's own palette, which replaces
    plotly's default colours, pairs a light and a dark shade of one hue: 0 and 1 both blue, 2 and 7 red and pink).
    A class 0..9 takes D3's hue of its number, whichever other labels a plot has, so a digit keeps its colour from
    one plot to the next (QA 67 F4: a pool whose labels were 0, 1, 3, 4, 6, 7 drew 3 green and 4 red, the gallery
    2 green and 3 red); a sample with no label ("nan") is light grey, any other label (12, "cat") takes Dark24's
    hues from its sixth (the first five are near D3's first five) in ``label_order``."""
    order = label_order(values)
    d3, other = px.colors.qualitative.D3, px.colors.qualitative.Dark24[5:]
    rest = [v for v in order if _digit(v) is None and v != "nan"]

    def colour(v: str) -> str:
        k = _digit(v)
        if k is not None:
            return d3[k]
        return UNLABELLED if v == "nan" else other[rest.index(v) % len(other)]

    return {v: colour(v) for v in order}


def method_base(name: str) -> str:
    """A method's registry name without its variant: "kfac[loss]" (an LDS run's K-FAC ranked by the loss while
    the ELBO is measured) -> "kfac"."""
    return name.partition("[")[0]


def method_colours(names: Iterable[str], order: Sequence[str] | None = None) -> dict[str, str]:
    """name -> colour, the same for a method in every figure of the app: D3's hues (those of the LDS runs' own
    matplotlib figures) in the registry's display order (``order``, default ``method_names()``: K-FAC blue, TRAK
    orange, D-TRAK green, CLIP red, Pixel purple), so a method keeps its colour whichever others a figure shows.
    A variant ("kfac[loss]") takes its method's colour (``method_dash`` tells them apart); a name the registry
    does not know (a file from a method since removed) takes a hue after the registry's.  Why: plotly (and
    Streamlit's palette) colour series by position, so TRAK was light blue in one damping-sweep chart and red
    in the next (QA round 17)."""
    names = list(names)
    known = list(method_names() if order is None else order)
    known += sorted({method_base(n) for n in names} - set(known))
    palette = px.colors.qualitative.D3 if len(known) <= 10 else px.colors.qualitative.Dark24
    return {n: palette[known.index(method_base(n)) % len(palette)] for n in names}


def method_dash(name: str) -> str:
    """A series' line style: solid for a method, dashed for a variant of it ("kfac[loss]") in the same colour."""
    return "dash" if "[" in name else "solid"


def label_style(values: Iterable[object]) -> dict:
    """plotly.express keyword arguments that colour by a ``label`` column in ``label_order`` with ``label_colours``."""
    values = list(values)
    return {"category_orders": {"label": label_order(values)}, "color_discrete_map": label_colours(values)}


def score_distributions(table: pd.DataFrame, names: list[str], titles: Mapping[str, str],
                        axis_titles: Mapping[str, str] | None = None) -> go.Figure:
    """One histogram per method; x axes are independent because the methods' scales differ by orders of magnitude.
    Each x axis says what its scores are (``axis_titles``: an influence method's predicted change of its
    measurement, a similarity method's similarity; one caption for the row called them all influence scores).
    A column that is partly estimates (a compressed K-FAC bank: ``<method>_exact``) is drawn as two stacked
    series, exact and estimated, so the shape of the estimates is not read as computed scores."""
    fig = make_subplots(rows=1, cols=max(len(names), 1), subplot_titles=[titles.get(n, n) for n in names])
    for j, name in enumerate(names):
        if axis_titles and name in axis_titles:
            fig.update_xaxes(title_text=axis_titles[name], title_font_size=11, row=1, col=j + 1)
        flag = f"{name}_exact"
        if flag not in table.columns:
            fig.add_trace(go.Histogram(x=table[name], nbinsx=60, name=titles.get(name, name), showlegend=False),
                          1, j + 1)
            continue
        exact = table[flag].to_numpy(bool)
        for part, label, colour in ((exact, "exact", "#1f77b4"), (~exact, "estimated", "#bbbbbb")):
            fig.add_trace(go.Histogram(x=table.loc[part, name], nbinsx=60, name=f"{titles.get(name, name)}: {label}",
                                       marker_color=colour, showlegend=True, bingroup=f"b{j}"), 1, j + 1)
    fig.update_layout(height=320 if axis_titles else 300, margin=dict(l=10, r=10, t=70, b=10), bargap=0.02,
                      barmode="stack", legend=dict(orientation="h", y=-0.35 if axis_titles else -0.25))
    fig.update_yaxes(title_text="training images", row=1, col=1)
    return fig


def score_scatter(table: pd.DataFrame, a: str, b: str, titles: Mapping[str, str], rho: float) -> go.Figure:
    """Every training image as a point: method a's score against method b's, coloured by label.  Where a
    method's column is partly estimates (a compressed K-FAC bank: ``<method>_exact``), the marker says
    which points are exact on both axes, so a reader does not take an estimate for a computed score."""
    data = table.copy()
    data["label"] = data["label"].astype(str)
    flags = [f"{m}_exact" for m in (a, b) if f"{m}_exact" in data.columns]
    symbol, title = None, f"Spearman correlation {rho:+.3f} over {len(data)} training images"
    exact = np.logical_and.reduce([data[f].to_numpy(bool) for f in flags]) if flags else None
    if exact is not None and not exact.all():  # all exact (2C >= N): no "(0 of them estimated)" (QA 54 F8)
        symbol = "score"
        data[symbol] = np.where(exact, "exact", "estimated")
        title += f" ({int((~exact).sum())} of them estimated)"
    fig = px.scatter(
        data,
        x=a,
        y=b,
        color="label" if data["label"].nunique() <= 20 else None,
        symbol=symbol,
        symbol_map={"exact": "circle", "estimated": "circle-open"},
        hover_data=["index", "label"] + ([symbol] if symbol else []),
        render_mode="webgl",
        labels={a: titles.get(a, a), b: titles.get(b, b)},
        title=title,
    )
    fig.update_traces(marker=dict(size=5, opacity=0.7))
    fig.update_layout(height=420, margin=dict(l=10, r=10, t=50, b=10))
    return fig


def overlap_matrix(overlap: pd.DataFrame, titles: Mapping[str, str], k: int) -> go.Figure:
    """Heat map of the fraction of shared images in the methods' top-k sets."""
    labels = [titles.get(n, n) for n in overlap.index]
    fig = go.Figure(
        go.Heatmap(
            z=overlap.values,
            x=labels,
            y=labels,
            zmin=0,
            zmax=1,
            colorscale="Blues",
            text=np.round(overlap.values, 2),
            texttemplate="%{text}",
        )
    )
    fig.update_layout(
        title=f"Shared fraction of the top-{k} (highest scores)", height=360, margin=dict(l=10, r=10, t=50, b=10)
    )
    fig.update_yaxes(autorange="reversed")
    return fig


def label_histogram(counts: pd.DataFrame, titles: Mapping[str, str], k: int) -> go.Figure:
    """Grouped bars: how many of each method's top-k (highest scores: an influence method's proponents, a
    similarity's most similar; "proponents" misnamed the latter, QA 64 F4) carry each label."""
    data = counts.copy()
    colours = method_colours(data["method"].unique())
    data["method"] = data["method"].map(lambda n: titles.get(n, n))
    fig = px.bar(data, x="label", y="count", color="method", barmode="group", title=f"Labels of the top-{k} (highest scores)",
                 color_discrete_map={titles.get(n, n): c for n, c in colours.items()})
    fig.update_layout(height=340, margin=dict(l=10, r=10, t=50, b=10))
    fig.update_xaxes(type="category")
    return fig


def damping_sweeps(sweeps: Mapping[str, list[dict]], titles: Mapping[str, str]) -> go.Figure:
    """LDS against damping (log scale) for each method's sweep, each method in its colour (``method_colours``),
    a variant of it dashed."""
    fig = go.Figure()
    colours = method_colours(sweeps)
    for name, pts in sweeps.items():
        pts = sorted(pts, key=lambda p: p["damping"])
        fig.add_trace(
            go.Scatter(
                x=[p["damping"] for p in pts],
                y=[p.get("lds") for p in pts],
                mode="lines+markers",
                name=titles.get(name, name),
                line=dict(color=colours[name], dash=method_dash(name)),
                marker=dict(color=colours[name]),
            )
        )
    fig.update_xaxes(type="log", title_text="damping")
    fig.update_yaxes(title_text="LDS")
    fig.add_hline(y=0, line_width=1, line_color="black")
    fig.update_layout(title="Damping sweeps", height=360, margin=dict(l=10, r=10, t=50, b=10))
    return fig
