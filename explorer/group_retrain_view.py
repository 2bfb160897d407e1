"""The Groups page's check by retraining: each group's predicted against measured change over the gallery,
read from the shipped group-retraining results (``engine.evaluation.group_retrain``, ``group-retrain``), with a
note on when and at which attribution settings they were made.  Layout only: nothing is recomputed here."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from explorer import plain
from explorer.figures import label_colours, label_order
from explorer.results_view import short_measurement
from explorer.runtime import Handle


def group_retrain_section(handle: Handle, chosen: str | None = None) -> None:
    from engine.evaluation.report import load_group_retrain_results, split_by_model
    from explorer.evaluation_view import model_key, results_dir, served_settings

    st.markdown("#### Check by retraining: predicted against measured change")
    records, _ = split_by_model(load_group_retrain_results(results_dir()), model_key(handle))  # this model's
    groups = [(rec, g) for rec in records for g in rec.get("groups", [])]
    if not groups:
        name = handle.session.preset.name
        st.caption("No group retraining results for this model yet.")
        plain.details([f"Run `{handle.session.command('group-retrain')} --remove label:3 --remove label:8` "
                       f"(writes assets/results/group_retrain_{name}.json)."])
        return
    st.caption("The model retrained without the whole group (same recipe and steps), each gallery sample's loss "
               "measured on both models with the same random draws. A method that knows which outputs depend on "
               "the group ranks the samples in the same order as the measurement (Spearman near +1).")
    st.caption(retrain_record_note(records, [g["spec"] for _, g in groups], served_settings(handle), chosen))
    info = handle.session.method_info()

    def title(n: str) -> str:
        return info.get(n, {}).get("title", n)

    def x_title(n: str) -> str:  # D-TRAK predicts the change of its square norm whatever is measured
        return f"predicted change of the {short_measurement(predicted_of(handle.session, n, groups[0][0]))}"

    st.plotly_chart(retrain_figure(groups, title, x_title), key="grp_fig_retrain")
    st.dataframe(pd.DataFrame([{"group": g["spec"], "size": g["size"], "method": title(n), "Spearman": c["spearman"],
                                "sign agreement": c["sign_agreement"], "mean predicted": c["mean_predicted"],
                                "predicted change of": short_measurement(predicted_of(handle.session, n, rec)),
                                "mean measured": float(np.mean(g["measured_change"]))}
                               for rec, g in groups for n, c in g["comparison"].items()]), hide_index=True)
    from explorer.evaluation_view import incomparable_note

    note = incomparable_note(list(dict.fromkeys((title(n), predicted_of(handle.session, n, rec))
                                                for rec, g in groups for n in g["comparison"])), _measured(groups))
    if note:  # D-TRAK's mean predicted is of its square norm, beside the loss's mean measured (QA 64 F1)
        st.caption(note)


def _record_measurement(record: dict) -> str:
    """The measurement a group-retraining record measured (its config's; "loss" when it names none)."""
    return str(record.get("config", {}).get("measurement", "loss"))


def _measured(groups: list[tuple[dict, dict]]) -> str:
    return _record_measurement(groups[0][0]) if groups else "loss"


def predicted_of(session: Any, method: str, record: dict) -> str:
    """The measurement whose change ``method``'s predictions in ``record`` are of: the record's measured one, or
    the method's own (D-TRAK's square norm: ``session.measurement_used``)."""
    from explorer.evaluation_view import predicted_measurement

    return predicted_measurement(session, method, _record_measurement(record))


def retrain_record_note(records: list[dict], specs: list[str], served: Mapping[str, Any] | None = None,
                        chosen: str | None = None) -> str:
    """Which groups the plot shows, when their predictions were made, and at which attribution settings against
    the served model's ``served`` (``evaluation_view.served_settings``).  Why: the page showed label:3's and
    label:8's Spearman of 2026-12-01 under whatever group was chosen above, as if current; at the settings of
    2026-12-06 K-FAC's is +0.52 / +0.24, not +0.45 / +0.11 (QA 23b #5).  A record written since 2026-12-06 holds
    its attribution settings (``attribution``), compared like a retrain-top record's (the dampings included:
    they ranked the predictions); an older one does not.  ``chosen``: the group chosen above on the page, which
    the note says is, or is not, among the recorded ones (QA 25 #14: "not the one chosen above" was said always)."""
    from engine.evaluation.report import DAMPINGS, SCORE_SETTINGS, settings_differences

    dates = sorted({str(r.get("config", {}).get("created", ""))[:10] or "an unrecorded date" for r in records})
    found = [settings_differences(r.get("config", {}), served, SCORE_SETTINGS + DAMPINGS) if served is not None
             else None for r in records]
    if any(d is None for d in found):
        recorded = all("attribution" in r.get("config", {}) for r in records)
        settings = ("at the attribution settings each record names" if recorded else
                    "at attribution settings the record does not name (they may differ from this page's)")
    else:
        differences = sorted({line for d in found for line in d or []})
        settings = ("at other attribution settings than this model's: " + "; ".join(differences) if differences
                    else "at this model's current attribution settings")
    which = ("" if chosen is None else " (the one chosen above among them)" if chosen in specs
             else ", not the one chosen above")
    return (f"Groups {', '.join(specs)}{which}: predictions and measurements as recorded on "
            f"{' and '.join(dates)}, {settings}; not recomputed.")


def short_title(title: str) -> str:
    """A method's title short enough for a panel heading: "K-FAC Influence" -> "K-FAC", "CLIP similarity" -> "CLIP"."""
    return title.removesuffix(" Influence").removesuffix(" similarity")


def retrain_figure(groups: list[tuple[dict, dict]], title: Callable[[str], str],
                   x_title: Callable[[str], str] = lambda n: "predicted change of the loss") -> go.Figure:
    """Predicted against measured change of each gallery sample: one row per group removed, one column per method
    (``groups``: (record, group) pairs of the group-retraining results; ``title``: a method's name -> its title;
    ``x_title``: a method's name -> its x axis title).

    Built panel by panel rather than with plotly express's facets: faceting on a column that held the method
    *and* its Spearman made one column per (method, group) pair (2 groups: 2 x 6 panels, 6 of them empty), and
    its shared axes left one row without x ticks and the other without y ticks.  Every panel shows its tick
    labels.  The x axes are independent, because the methods' predicted changes differ in scale by orders of
    magnitude (and D-TRAK's are of another measurement); the y axes are shared within a row, where every panel
    plots the same measured changes, and independent between rows, where the groups' measured changes differ.
    Panel titles are short (the method and its Spearman); the x axis title is on the bottom row only and the y
    axis title, which names the group, on the first column only, so neither collides with its neighbour's."""
    methods = list(dict.fromkeys(n for _, g in groups for n in g["predicted_change"]))
    panel_titles = []
    for _, g in groups:
        for n in methods:
            rho = g.get("comparison", {}).get(n, {}).get("spearman")
            panel_titles.append("" if n not in g["predicted_change"] else
                                short_title(title(n)) + ("" if rho is None else f" · Spearman {rho:+.2f}"))
    rows = len(groups)
    if not methods:  # make_subplots refuses 0 columns
        return go.Figure(layout=dict(title="No method's predictions in these group-retraining results"))
    fig = make_subplots(rows=rows, cols=len(methods), subplot_titles=panel_titles,
                        horizontal_spacing=0.08, vertical_spacing=min(0.25, 0.5 / rows))
    colours = label_colours(str(int(v)) for rec, _ in groups for v in rec["config"].get("query_labels") or []
                            if v is not None and v >= 0)  # keyed as the points look them up (a 3.0 is "3")
    shown: set[str] = set()
    for r, (rec, g) in enumerate(groups, start=1):
        measured = g["measured_change"]
        # the gallery's classifier labels, -1 (or absent) where there is no classifier, as QuerySet.labels
        labels = [None if v is None or v < 0 else str(int(v))
                  for v in rec["config"].get("query_labels") or [None] * len(measured)]
        samples = rec["config"].get("queries") or [f"sample {q}" for q in range(len(measured))]
        for c, n in enumerate(methods, start=1):
            pred = g["predicted_change"].get(n)
            if pred is None:
                continue
            # a sample without a label (none from the classifier) in the default colour, out of the legend
            kinds = label_order(v for v in labels if v is not None) + ([None] if None in labels else [])
            for lab in kinds:
                idx = [q for q, v in enumerate(labels) if v == lab]
                if not idx:
                    continue
                fig.add_trace(go.Scatter(
                    x=[pred[q] for q in idx], y=[measured[q] for q in idx], mode="markers",
                    marker=dict(color=colours.get(lab, "#1f77b4"), size=8),
                    name=lab or "", legendgroup=lab or "", showlegend=lab is not None and lab not in shown,
                    customdata=[samples[q] for q in idx],
                    hovertemplate="%{customdata}<br>predicted %{x:+.3g}<br>measured %{y:+.3g}<extra></extra>",
                ), row=r, col=c)
                shown.add(lab or "")
        fig.update_yaxes(title_text=f"{g['spec']} removed: measured change", row=r, col=1)
        for c in range(2, len(methods) + 1):  # one y scale per row: the same measured changes in every panel
            fig.update_yaxes(matches=fig.get_subplot(r, 1).yaxis.plotly_name.replace("yaxis", "y"), row=r, col=c)
    fig.update_xaxes(showticklabels=True, matches=None, nticks=5)
    fig.update_yaxes(showticklabels=True, nticks=6)
    for c, n in enumerate(methods, start=1):
        fig.update_xaxes(title_text=x_title(n), row=rows, col=c)
    fig.update_annotations(font_size=13)
    # the measured change is of the records' measurement; a method's predictions may be of another (D-TRAK's
    # square norm), which its panel's x axis says (QA 67 F2: the title called every prediction one "of the loss")
    measured = short_measurement(_measured(groups))
    fig.update_layout(title=f"Predicted vs measured change (measured: the {measured}), per gallery sample",
                      height=320 * rows + 90, margin=dict(l=10, r=10, t=80, b=10),
                      legend_title_text="predicted label" if colours else None, showlegend=bool(colours))
    return fig
