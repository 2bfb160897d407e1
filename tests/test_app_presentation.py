"""What the explorer's figures and captions say (QA round 15, section A): pure functions, no server, no model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px

TITLES = {"kfac": "K-FAC Influence", "trak": "TRAK", "dtrak": "D-TRAK"}


def _record(specs: list[str], labels: list[int]) -> list[tuple[dict, dict]]:
    """A group-retraining result as ``group_retrain_section`` reads it: 3 methods, one group per spec."""
    rng = np.random.default_rng(0)
    q = len(labels)
    rec = {"config": {"queries": [f"gallery:{i}" for i in range(q)], "query_labels": labels, "measurement": "loss"}}
    groups = []
    for k, spec in enumerate(specs):
        scale = 10.0 ** -k  # the groups' measured changes differ in scale: one y range per row
        groups.append((rec, {
            "spec": spec, "size": 5, "measured_change": (scale * rng.normal(size=q)).tolist(),
            "predicted_change": {n: (s * rng.normal(size=q)).tolist() for n, s in (("kfac", 1e-2), ("trak", 1e2),
                                                                                    ("dtrak", 1e-5))},
            "comparison": {n: {"spearman": rho, "sign_agreement": 1.0, "mean_predicted": 0.0}
                           for n, rho in (("kfac", 0.448), ("trak", -0.5), ("dtrak", 0.0))},
        }))
    return groups


def test_the_retraining_check_has_one_row_per_group_and_one_column_per_method_all_readable():
    """2 groups were laid out 2 x 6 with 6 empty panels (the facet column held the method *and* its Spearman),
    one row had no x ticks and the other no y ticks, and the facet titles ("method=...") overlapped."""
    from explorer.groups_view import retrain_figure

    labels = [1, 0, 2, 7, 9, 0, 1, 3]
    fig = retrain_figure(_record(["label:3", "label:8"], labels), TITLES.get,
                         lambda n: "predicted change of the " + ("square-norm" if n == "dtrak" else "loss"))
    layout = fig.layout
    xs = sorted(k for k in layout.to_plotly_json() if k.startswith("xaxis"))
    ys = sorted(k for k in layout.to_plotly_json() if k.startswith("yaxis"))
    assert len(xs) == len(ys) == 6  # 2 rows x 3 columns, no empty panel
    assert {(t.xaxis, t.yaxis) for t in fig.data} == {(f"x{i or ''}", f"y{i or ''}") for i in ["", 2, 3, 4, 5, 6]}
    # every panel's ticks are readable
    assert all(layout[k].showticklabels for k in xs + ys)
    # x independent (the methods' scales differ by orders of magnitude), y shared along a row only
    assert all(layout[k].matches is None for k in xs)
    assert [layout[k].matches for k in ("yaxis", "yaxis2", "yaxis3", "yaxis4", "yaxis5", "yaxis6")] == \
        [None, "y", "y", None, "y4", "y4"]
    # short panel titles: the method's short name and its Spearman, row-major (group label:3 first)
    titles = [a.text for a in layout.annotations]
    assert titles == ["K-FAC · Spearman +0.45", "TRAK · Spearman -0.50", "D-TRAK · Spearman +0.00",
                      "K-FAC · Spearman +0.45", "TRAK · Spearman -0.50", "D-TRAK · Spearman +0.00"]
    assert not any("method=" in t or "group=" in t for t in titles)
    # axis titles once per column (bottom row) and once per row (first column): none side by side
    x_titles = {k: layout[k].title.text for k in xs}
    assert x_titles == {"xaxis": None, "xaxis2": None, "xaxis3": None, "xaxis4": "predicted change of the loss",
                        "xaxis5": "predicted change of the loss", "xaxis6": "predicted change of the square-norm"}
    assert [layout[k].title.text for k in ys] == ["label:3 removed: measured change", None, None,
                                                  "label:8 removed: measured change", None, None]
    # one legend entry per label, in numeric order
    assert layout.legend.title.text == "predicted label"
    assert [t.name for t in fig.data if t.showlegend] == ["0", "1", "2", "3", "7", "9"]


def test_the_retraining_check_without_labels_has_no_legend():
    from explorer.groups_view import retrain_figure

    fig = retrain_figure(_record(["label:1"], [-1, -1, -1]), TITLES.get)
    assert len(fig.data) == 3 and not any(t.showlegend for t in fig.data)
    assert fig.layout.legend.title.text is None and fig.layout.showlegend is False
    # a sample the classifier gave no label is still plotted, outside the legend
    mixed = retrain_figure(_record(["label:1"], [-1, 2, 2]), TITLES.get)
    assert sum(len(t.x) for t in mixed.data) == 3 * 3 and [t.name for t in mixed.data if t.showlegend] == ["2"]


def test_label_legends_are_in_numeric_order_in_distinct_hues():
    """The Groups bar chart's legend read 1, 0, 2, 7, ... (first appearance) in Streamlit's palette, where
    0 and 1 are two blues and 2 and 7 a red and a pink."""
    from explorer.figures import label_order, label_style

    data = pd.DataFrame({"sample": [f"g{i}" for i in range(10)], "y": np.arange(10.0),
                         "label": [str(v) for v in (1, 0, 2, 7, 9, 6, 5, 3, 4, 8)]})
    fig = px.bar(data, x="sample", y="y", color="label", **label_style(data["label"]))
    assert [t.name for t in fig.data] == [str(v) for v in range(10)]
    colours = [t.marker.color for t in fig.data]
    assert colours == list(px.colors.qualitative.D3) and len(set(colours)) == 10
    assert label_order(["10", "2", "nan", "1"]) == ["1", "2", "10", "nan"]


def test_score_histograms_label_each_x_axis_by_the_kind_of_score():
    from explorer.figures import score_distributions
    from explorer.results_view import axis_title, distribution_caption

    table = pd.DataFrame({"index": range(4), "label": [0, 1, 1, 2], "kfac": [1.0, 2, 3, 4], "pixel": [0.1, 0.2, 0.3, 0.4]})
    axes = {"kfac": axis_title("influence", "elbo"), "pixel": axis_title("similarity", "elbo")}
    fig = score_distributions(table, ["kfac", "pixel"], {"kfac": "K-FAC Influence", "pixel": "Pixel similarity"}, axes)
    assert fig.layout.xaxis.title.text == "predicted change of<br>negative ELBO (bits per<br>dimension)"
    assert fig.layout.xaxis2.title.text == "similarity to the query"
    assert axis_title("influence", "loss") == "predicted change of<br>training loss"
    # short lines: four or five panels share a 1280 px page, and one-line titles ran into each other
    assert axis_title("influence", "square-norm") == "predicted change of<br>square norm (D-TRAK's<br>measurement)"
    caption = distribution_caption([("K-FAC Influence", "influence"), ("Pixel similarity", "similarity")])
    assert caption.startswith("Influence scores (K-FAC Influence): predicted change")
    assert "Similarity scores (Pixel similarity): how alike" in caption
    assert "Similarity" not in distribution_caption([("TRAK", "influence")])


def test_the_score_legend_says_what_a_caption_holds_for_the_measurement_in_use():
    """Captions like "#726 · 1 · +8.94e-02" were not explained, and their scale changes with the measurement."""
    from explorer.results_view import measurement_title, score_legend

    methods = [("K-FAC Influence", "influence", "loss"), ("TRAK", "influence", "loss"),
               ("D-TRAK", "influence", "square-norm"), ("Pixel similarity", "similarity", "loss")]
    text = score_legend(methods, has_labels=True)
    assert text.startswith("Under each image: **training index · label · score**.")
    assert text.endswith(
        "Score of K-FAC Influence and TRAK: predicted change of the query's training loss if that image were removed; "
        "of D-TRAK: predicted change of the query's square norm (D-TRAK's measurement) if that image were removed; "
        "of Pixel similarity: similarity to the query (not a change).")
    elbo = score_legend([("TRAK", "influence", "elbo")], has_labels=False)
    assert elbo.startswith("Under each image: **training index · score**.")
    # the unit comes from the engine's catalogue, and the sign's quantity is named: a positive score means the
    # negative ELBO rises (the sentence said "the query's ELBO", the opposite sign)
    assert "predicted change of the query's negative ELBO (bits per dimension)" in elbo
    traj = score_legend([("K-FAC Influence", "influence", "trajectory")], has_labels=True)
    assert "the query's trajectory negative log-probability" in traj
    # the header's name for it: the sidebar's, with the timestep filled in
    assert measurement_title("loss") == "Training loss"
    assert measurement_title("loss@t=500") == "Loss at timestep 500"
    assert measurement_title("elbo") == "Negative ELBO (bits per dimension)"


def test_a_training_image_says_it_has_no_trajectory_once():
    from explorer.results_view import trajectory_note

    assert trajectory_note(["training image 0 (digits:0); no sampling trajectory"], False) is None
    assert trajectory_note(["resized 32x24 -> 8x8"], False) == "No sampling trajectory."
    assert trajectory_note([], True) == "Has a sampling trajectory."
