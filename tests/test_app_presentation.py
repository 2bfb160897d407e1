"""What the explorer's figures, captions and grids say (QA round 15, section A): pure functions, and views run in
Streamlit's AppTest on a fake handle; no server, no model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import plotly.express as px
import pytest

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
    from explorer.group_retrain_view import retrain_figure

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
    from explorer.group_retrain_view import retrain_figure

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


def test_a_digit_keeps_its_colour_whichever_labels_a_plot_has():
    """QA 67 F4: colours went by position among the labels present, so a pool with labels 0, 1, 3, 4, 6, 7 drew
    3 green and 4 red while the gallery's plots (all ten) drew 2 green and 3 red."""
    from explorer.figures import UNLABELLED, label_colours

    everything = label_colours(str(v) for v in range(10))
    some = label_colours(["7", "0", "3", "4", "1", "6", "nan"])
    assert all(some[v] == everything[v] for v in ("0", "1", "3", "4", "6", "7"))
    assert some["nan"] == UNLABELLED and UNLABELLED not in everything.values()
    wide = label_colours(["3", "12", "cat", "nan"])  # labels beyond 0..9 still get distinct hues
    assert wide["3"] == everything["3"] and len(set(wide.values())) == 4


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


# --- QA round 15, A3 A4 A7 A8: the Explore page's grids, plain words, feedback and chips -----------------------
# The views run in Streamlit's AppTest on a fake handle (a data set of 40 8x8 images, five methods' scores): no
# model, no cache, fast.

N_TRAIN = 40
METHOD_INFO = {
    "kfac": {"title": "K-FAC Influence", "kind": "influence", "caption": "k", "default_damping": 1e-8,
             "damping_steps": [1e-9, 1e-8, 1e-7, 1e-6]},
    "trak": {"title": "TRAK", "kind": "influence", "caption": "t", "default_damping": 1e-5,
             "damping_steps": [1e-6, 1e-5, 1e-4]},
    "dtrak": {"title": "D-TRAK", "kind": "influence", "caption": "d", "default_damping": 1e-4,
              "damping_steps": [1e-5, 1e-4, 1e-3]},
    "clip": {"title": "CLIP similarity", "kind": "similarity", "caption": "c"},
    "pixel": {"title": "Pixel similarity", "kind": "similarity", "caption": "p"},
}
CLIP_REASON = ("CLIP weights for ViT-B-32/openai are not on this machine (nothing is downloaded at run time; looked "
               "for hf:timm/vit_base_patch32_clip_224.openai/open_clip_model.safetensors); to enable: on a machine "
               "with internet run `python -c \"import open_clip; ...\"`")


class FakeData:
    """A data set as the views read it: 40 greyscale 8x8 images, labelled 0-9."""

    def __init__(self) -> None:
        self.images = np.random.default_rng(0).uniform(-1, 1, (N_TRAIN, 1, 8, 8)).astype(np.float32)
        self.labels = np.arange(N_TRAIN) % 10
        self.class_names = None
        self.shape = (1, 8, 8)

    def __len__(self) -> int:
        return N_TRAIN

    def label_name(self, i: int) -> str:
        return str(int(self.labels[i]))


def fake_result(names=tuple(METHOD_INFO), unavailable=("clip",)):
    """A query's answer: every method's scores over the 40 images (``unavailable``: CLIP, for want of weights)."""
    from engine.attribution.results import MethodResult, QueryResult

    rng = np.random.default_rng(1)
    methods = {}
    for n in names:
        info = METHOD_INFO[n]
        ok = n not in unavailable
        methods[n] = MethodResult(name=n, title=info["title"], kind=info["kind"], caption=info["caption"],
                                  status="ok" if ok else "unavailable", reason=None if ok else CLIP_REASON,
                                  reason_about=None if ok else "server",
                                  damping=info.get("default_damping"),
                                  scores=rng.normal(size=N_TRAIN).astype(np.float32) if ok else None)
    return QueryResult(query={"spec": "gallery:0"}, measurement="loss", methods=methods)


class FakeSession:
    """What the views ask of an AttributionSession; ``query`` and ``rescore`` record the spinners open at the call."""

    preset = SimpleNamespace(name="fake")
    checkpoint_hash = "f" * 16
    config = SimpleNamespace(mc_samples=4, query_draws="own")
    diffusion = SimpleNamespace(T=100)

    def __init__(self) -> None:
        self.dataset = FakeData()
        self.labels = self.dataset.labels
        self.calls: list[tuple[str, list[str]]] = []

    def method_info(self) -> dict:
        return METHOD_INFO

    def method_names(self) -> list[str]:
        return list(METHOD_INFO)

    def command(self, subcommand: str) -> str:
        return f"attribution-engine {subcommand} --preset fake"

    def method(self, name: str):
        return SimpleNamespace(kind=METHOD_INFO[name]["kind"])

    def measurement_used(self, name: str, measurement: str) -> str:
        return measurement

    def gallery(self) -> list:
        return []

    def query(self, query, measurement, **kwargs):
        self.calls.append(("query", list(OPEN_SPINNERS)))
        return fake_result()

    def rescore(self, raw, damping):
        import dataclasses

        self.calls.append(("rescore", list(OPEN_SPINNERS)))
        return dataclasses.replace(raw, methods={n: dataclasses.replace(r, damping=damping.get(n, r.damping))
                                                 for n, r in raw.methods.items()})


class FakeHandle:
    def __init__(self) -> None:
        import threading

        from explorer.shared_results import RecentResults

        self.session = FakeSession()
        self.build = SimpleNamespace(status="done", checking=False, unavailable={})
        self.worker = None
        self.precomputed = None
        self.settings_note = None  # runtime.Handle: no named-preset note
        self.load_warnings = ()  # runtime.Handle: no warning while loading (QA 45 #3)
        self.lock = threading.RLock()
        self.recent_results = RecentResults()
        self.grid_filler = SimpleNamespace(submit=lambda *a: None)

    def query_independent(self) -> dict:
        return {}

    def gallery_agreement(self) -> dict:
        return {}

    def gallery_agreement_gaps(self) -> dict:
        return {}

    def status(self, refresh: bool = False) -> dict:
        return {n: {"built": True} for n in METHOD_INFO}


OPEN_SPINNERS: list[str] = []  # the texts of the st.spinner blocks open now (see record_spinners)


@pytest.fixture
def record_spinners(monkeypatch):
    """st.spinner, recording each text while its block runs (AppTest shows no transient spinner)."""
    import contextlib

    import streamlit

    opened: list[str] = []

    @contextlib.contextmanager
    def spinner(text: str = "", **kwargs):
        OPEN_SPINNERS.append(text)
        opened.append(text)
        try:
            yield
        finally:
            OPEN_SPINNERS.pop()

    monkeypatch.setattr(streamlit, "spinner", spinner)
    return opened


@pytest.fixture
def record_images(monkeypatch):
    """st.image, recording the width and captions of every call (AppTest's image element has neither width)."""
    import streamlit

    calls: list[dict] = []
    original = streamlit.image

    def image(img, caption=None, width="content", **kwargs):
        calls.append({"n": len(img) if isinstance(img, list) else 1, "width": width, "captions": caption})
        return original(img, caption=caption, width=width, **kwargs)

    monkeypatch.setattr(streamlit, "image", image)
    return calls


def _query():
    from explorer.query_view import Query

    return Query("gallery:0", SimpleNamespace(image=np.zeros((1, 8, 8), np.float32), trajectory=None, label=None,
                                              notes=[]), "Gallery sample 0")


def _settings(names, damping=(("kfac", 1e-8), ("trak", 1e-5), ("dtrak", 1e-4)), top_k=4):
    from explorer.controls import Settings

    return Settings("loss", tuple(names), tuple(damping), top_k, 4)


def _grids_page(handle, query, result, settings):
    from explorer import results_view

    results_view.method_columns(handle, query, result, settings)


def _walk(node, in_expander=False, out=None):
    """(text, inside an expander?) of every markdown, caption, warning and info element under ``node``."""
    out = [] if out is None else out
    kind = getattr(node, "type", None)
    if kind in ("markdown", "caption", "warning", "info"):
        out.append((node.value, in_expander))
    children = getattr(node, "children", None)
    for child in (children.values() if isinstance(children, dict) else []):
        _walk(child, in_expander or kind == "expander", out)
    return out


def test_the_grids_hold_at_least_two_thumbnails_per_row_at_1280_px():
    """A3: five bordered method columns at 1280 px are 118 px wide inside, so the 72 px thumbnails stood one per
    row; the thumbnails are sized from the number of methods shown so that two fit, and more at 1920 px."""
    from explorer.layout import column_inner_width, per_row, thumbnails

    assert per_row(column_inner_width(5, 1280), 72) == 1  # the finding: the old 72 px thumbnails, five methods
    for side in (8, 28, 32):  # digits, MNIST, CIFAR
        for k in range(1, 6):
            t = thumbnails(k, side)
            assert t.per_row(k, 1280) >= 2 and t.per_row(k, 1920) >= t.per_row(k, 1280), (side, k, t)
    five = thumbnails(5, 8)
    assert (five.image, five.width, five.compact) == (40, 48, True)  # 5 px per pixel of an 8x8 digit
    assert (five.per_row(5, 1280), five.per_row(5, 1920)) == (2, 4)
    three = thumbnails(3, 8)  # three methods leave room for the full thumbnails and captions
    assert (three.image, three.width, three.compact, three.per_row(3, 1280)) == (64, 72, False, 2)
    assert thumbnails(4, 28).compact is False  # 64 px: the full caption still wraps between its fields


def test_five_methods_get_compact_grids_and_their_scores_in_a_table(record_images):
    from streamlit.testing.v1 import AppTest

    from explorer.layout import column_inner_width, per_row

    handle = FakeHandle()  # five methods with scores (CLIP with its weights)
    at = AppTest.from_function(_grids_page, args=(handle, _query(), fake_result(unavailable=()),
                                                  _settings(METHOD_INFO)))
    at.run()
    assert not at.exception, at.exception
    grids = [c for c in record_images if c["n"] == 4]  # top-4 and bottom-4 of the five methods
    assert len(grids) == 10
    for c in grids:  # two per row in each of the five columns at 1280 px, each captioned "index·label"
        assert per_row(column_inner_width(5, 1280), c["width"]) == 2, c["width"]
        for cap in c["captions"]:  # the fake labels are the index mod 10, one character: "1499·2" fits 48 px
            index, _, label = cap.partition("·")
            assert len(cap) <= 6 and label == str(int(index) % 10), cap
    (table,) = [e for e in at.expander if e.label == "Scores of the images above"]
    frame = table.dataframe[0].value
    assert list(frame.columns) == ["K-FAC Influence", "TRAK", "D-TRAK", "CLIP similarity", "Pixel similarity"]
    assert list(frame.index) == ["top 1", "top 2", "top 3", "top 4", "bottom 1", "bottom 2", "bottom 3", "bottom 4"]
    top = fake_result().methods["kfac"].top(4, handle.session.labels)[0]
    assert frame.iloc[0, 0] == f"#{top.index} · {top.index % 10} · {top.score:+.2e}"
    assert "training index·label** (its score" in at.caption[0].value

    record_images.clear()  # two methods: the full thumbnails and captions, no table
    at = AppTest.from_function(_grids_page, args=(handle, _query(), fake_result(), _settings(["kfac", "pixel"])))
    at.run()
    assert {c["width"] for c in record_images if c["n"] == 4} == {72}
    assert all(" · " in cap for c in record_images if c["n"] == 4 for cap in c["captions"])
    assert not [e for e in at.expander if e.label == "Scores of the images above"]


def test_an_unavailable_method_says_so_plainly_and_keeps_how_to_enable_it_in_details(record_images):
    """A4: CLIP's column read "CLIP weights for ViT-B-32/openai are not on this machine", under an expander named
    "Details and how to enable"; the model identifier and the instructions belong in Details."""
    from streamlit.testing.v1 import AppTest

    from explorer.plain import unavailable_line

    at = AppTest.from_function(_grids_page, args=(FakeHandle(), _query(), fake_result(), _settings(METHOD_INFO)))
    at.run()
    (warning,) = at.warning
    assert warning.value == "**Unavailable:** CLIP similarity cannot run on this server."
    texts = _walk(at._tree)
    assert not [t for t, inside in texts if not inside and ("ViT" in t or "open_clip" in t)], texts
    assert (CLIP_REASON, True) in texts  # the whole reason, inside the column's Details
    assert [e.label for e in at.expander if e.label == "Details"] == ["Details"]
    # a CLI command to build a cache is a detail too; the explorer's own "not precomputed" words are plain already
    assert unavailable_line("unavailable", "TRAK", "not built: run `attribution-engine build --methods trak`",
                            "server") == "**Unavailable:** TRAK is not built on this server yet."
    assert unavailable_line("unavailable", "TRAK", "not precomputed for these settings; ready when ...") == \
        "**Unavailable:** not precomputed for these settings"
    # QA 30c: one the running build brings is not "Unavailable", CLIP's word for a method that cannot run here
    assert unavailable_line("unavailable", "TRAK", "not precomputed for these settings; ready when the cache build "
                            "finishes (progress at the top of the page)") == \
        "**Not precomputed** for these settings: TRAK answers them when the cache build finishes."
    # a reason about the query is said as it is (a blank query read "Pixel similarity cannot run on this
    # server", review 49), whatever its words: the engine says whose problem it is, the words do not decide
    blank = "the query image is blank (every pixel has the same value), so ...; query an image with some content"
    assert unavailable_line("unavailable", "Pixel similarity", blank, "query") == f"**Unavailable:** {blank}"
    on_this_machine = "the query image is blank; this machine's pixel method needs some content"
    assert unavailable_line("unavailable", "Pixel similarity", on_this_machine, "query") == \
        f"**Unavailable:** {on_this_machine}"
    assert unavailable_line("unavailable", "My method", "needs a licence file", "server") == \
        "**Unavailable:** My method cannot run on this server."
    # a damaged cache is named, its rebuild command in Details
    corrupt = "cache file kfac/bank.npy is corrupt (CRC-32 mismatch); rebuild it with `attribution-engine build --rebuild`"
    assert unavailable_line("error", "K-FAC Influence", corrupt) == \
        "**Failed:** K-FAC Influence's saved cache is damaged; Details says how to rebuild it."
    assert unavailable_line("error", "TRAK", "RuntimeError: boom") == \
        "**Failed:** TRAK could not score this query; Details says why."


def test_the_subtitle_names_the_model_in_words_and_keeps_shape_and_hash_in_its_tooltip(monkeypatch):
    """A4: the subtitle read "Model `digits` (1797 training images of 1x8x8) · checkpoint `3c6f55835a48dc83`"."""
    from streamlit.testing.v1 import AppTest

    from explorer import runtime
    from explorer.plain import image_words

    handle = FakeHandle()  # the whole page on the fake model: no gallery, so no query until a sample is drawn
    handle.session.shape, handle.session.checkpoint, handle.session.device = (1, 8, 8), "/models/digits", "cpu"
    handle.session.checkpoint_hash = "3c6f55835a48dc83"
    monkeypatch.setattr(runtime, "get_handle", lambda args: handle)
    monkeypatch.setattr(runtime, "start_build", lambda h: None)
    monkeypatch.setattr(runtime, "choose_model", lambda args: args)
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "explorer" / "app.py"))
    at.run()
    assert not at.exception, at.exception
    subtitle = at.caption[0]
    assert subtitle.value == ("Which training images made this image likely, and which made it unlikely? "
                              "Model **fake**, trained on 40 greyscale images of 8×8 pixels.")
    tip = subtitle.proto.help
    assert "1x8x8" in tip and "3c6f55835a48dc83" in tip and "/models/digits" in tip
    assert image_words((3, 32, 32)) == "colour images of 32×32 pixels"


def _evaluation_page(handle):
    from explorer import evaluation_view

    files = evaluation_view.result_files()
    evaluation_view.other_models_note(handle, files)
    evaluation_view.lds_section(handle, files)
    evaluation_view.retrain_results_section(handle, files)


def test_evaluation_captions_keep_file_names_paths_and_setting_names_in_details(tmp_path, monkeypatch):
    """A4: the Evaluation captions named the results folder on the server, the files, and configuration fields
    ("kfac_bank_whiten: None (now 1e-10)"); the main flow now says in words how a result was measured."""
    import json

    from streamlit.testing.v1 import AppTest

    from engine.config import AttributionConfig

    handle = FakeHandle()
    handle.session.config = AttributionConfig()
    handle.session.method = lambda n: SimpleNamespace(kind=METHOD_INFO[n]["kind"], damping_field="-")
    handle.session.damping_for = lambda n, d: METHOD_INFO[n].get("default_damping")
    mine = {"checkpoint_hash": "f" * 16, "measurement": "loss"}
    (tmp_path / "lds_fake_loss.json").write_text(json.dumps({
        "config": {**mine, "subsets": 32, "seeds": 2, "fraction": 0.5, "num_train": 1797, "queries": 128,
                   "true_measurement_mc_samples": 1024, "created": "2026-12-02T07:56:44Z",
                   "attribution": {"mc_samples": 64, "query_draws": "bank", "kfac_bank_whiten": None}},
        "methods": {"kfac": {"lds": 0.49, "ci95": [0.46, 0.52], "damping": 1e-8}}}))
    (tmp_path / "retrain_top_fake.json").write_text(json.dumps({
        "config": {**mine, "removed": 36, "num_train": 1797, "steps": 6000, "true_measurement_mc_samples": 1024},
        "results": [{"query": "gallery:0", "method": "kfac", "removed": [1, 2], "predicted_change": 0.9,
                     "measured_change": 0.013, "random_measured_change": 0.0004}]}))
    (tmp_path / "lds_other_loss.json").write_text(json.dumps({"config": {"checkpoint_hash": "e" * 16},
                                                              "methods": {"kfac": {"lds": 0.9}}}))
    monkeypatch.setenv("ATTRIBUTION_RESULTS", str(tmp_path))
    at = AppTest.from_function(_evaluation_page, args=(handle,))
    at.run()
    assert not at.exception, at.exception
    texts = _walk(at._tree)
    flow = [t for t, inside in texts if not inside]
    details = " ".join(t for t, inside in texts if inside)
    for technical in (str(tmp_path), ".json", "kfac_bank_whiten", "query_draws", "2026-12-02", "common random"):
        assert not [t for t in flow if technical in t], (technical, flow)
    assert f"`{tmp_path}`" in details and "`lds_other_loss.json`" in details and "`lds_fake_loss.json`" in details
    assert "the query on the bank's draws (common random numbers), not this model's setting" in details
    assert "2026-12-02T07:56:44Z" in details and "`retrain_top_fake.json`" in details
    assert "Not shown: 1 result file(s) measured on other models; start the app on that model to see them." in flow
    assert ("Models retrained on 32 random subsets (50% of the 1,797 training images each) x 2 seed(s); 128 queries"
            " · **measured with other settings than this model's (see Details)**") in flow
    assert ("Measurement: Training loss; 36 of the 1,797 training images removed; 6,000 training steps per model"
            " · settings not recorded (see Details)") in flow


def _explore_sidebar(handle):
    from explorer import controls

    controls.choose_settings(handle, True)


def test_hidden_methods_come_back_with_one_click():
    """A8: putting back the methods one had hidden took a click per chip (Streamlit's own "Select all" is inside
    the dropdown, only while two or more are left out)."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_function(_explore_sidebar, args=(FakeHandle(),))
    at.run()
    assert at.multiselect(key="methods").value == list(METHOD_INFO)
    assert not [b for b in at.button if b.key == "methods__all"]  # nothing to put back: no button
    at.multiselect(key="methods").set_value(["pixel"]).run()
    (button,) = [b for b in at.button if b.key == "methods__all"]
    assert button.label == "Show all methods"
    button.click().run()
    assert not at.exception, at.exception
    assert at.multiselect(key="methods").value == list(METHOD_INFO)
    assert not [b for b in at.button if b.key == "methods__all"]


def test_the_methods_multiselect_is_the_same_widget_on_every_run():
    """A run that changed the multiselect's ``default`` (every method on the first run, None after) made the
    browser draw a new, empty widget while the server held every method; the next click (a gallery sample on a
    just-started server) sent the empty selection back: "Select at least one method" (3 of 5 fresh starts,
    2026-12-06). The widget's arguments, its default among them, must not change between runs."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_function(_explore_sidebar, args=(FakeHandle(),))
    at.run()
    first = at.multiselect(key="methods")
    before = (list(first.proto.default), first.proto.id)
    at.run()  # a rerun with nothing changed: what the build panel's full-page rerun does
    again = at.multiselect(key="methods")
    assert (list(again.proto.default), again.proto.id) == before
    assert again.value == list(METHOD_INFO)
    assert again.proto.set_value and list(again.proto.raw_values) == [METHOD_INFO[n]["title"] for n in METHOD_INFO]
    # the value is written on every run, so the browser is told what the server holds (only a first write, or a
    # default, left the browser's widget empty in 6 of 8 fresh starts); kept as chosen, less what is gone
    again.set_value(["pixel", "kfac"]).run()
    assert at.multiselect(key="methods").value == ["pixel", "kfac"]
    at.session_state["methods"] = ["kfac", "gone"]  # a method of the other model after a switch
    at.run()
    assert at.multiselect(key="methods").value == ["kfac"] and not at.exception


def _reverse_page(handle, result, settings):
    from explorer import groups_view

    groups_view.reverse_from_grids(handle, result, settings)


def test_a_methods_top_k_is_picked_from_the_grids_with_one_click():
    """A8: "What do these training images support?" took a click per image to take a method's top-k as a group."""
    from streamlit.testing.v1 import AppTest

    handle, result = FakeHandle(), fake_result()
    at = AppTest.from_function(_reverse_page, args=(handle, result, _settings(["kfac", "clip", "pixel"])))
    at.run()
    assert at.multiselect(key="grid_pick").value == []
    picks = {b.label: b for b in at.button if b.key and b.key.startswith("grid_pick__pick")}
    assert list(picks) == ["K-FAC Influence's top 4", "Pixel similarity's top 4"]  # CLIP has no grid here
    picks["K-FAC Influence's top 4"].click().run()
    assert not at.exception, at.exception
    assert at.multiselect(key="grid_pick").value == [x.index for x in result.methods["kfac"].top(4, handle.session.labels)]
    assert at.session_state["grp_picked"] == at.multiselect(key="grid_pick").value  # the Groups page's group too


def _result_page(handle, query, settings):
    import streamlit as st

    from explorer import results_view

    results_view.get_result(handle, query, settings[st.session_state.get("test_kfac_damping", 1e-8)])


def test_a_rerun_that_computes_says_what_it_computes_and_an_instant_one_does_not(record_spinners):
    """A7: a new damping re-scored the query with the page greyed and only Streamlit's small "Running" icon (the
    damping grid still being scored in the background held the lock for seconds); a query's spinner did not
    say which measurement it computes."""
    from streamlit.testing.v1 import AppTest

    handle = FakeHandle()
    settings = {v: _settings(METHOD_INFO, (("kfac", v), ("trak", 1e-5), ("dtrak", 1e-4))) for v in (1e-8, 1e-6)}
    at = AppTest.from_function(_result_page, args=(handle, _query(), settings))
    at.run()
    assert not at.exception, at.exception
    ((kind, spinners),) = handle.session.calls
    assert kind == "query" and spinners == [
        "Attributing gallery sample 0 (training loss, 4 Monte Carlo draws) with every method: query gradients, "
        "then scores ..."]
    record_spinners.clear()
    at.run()  # nothing changed: a lookup, no spinner
    assert len(handle.session.calls) == 1 and record_spinners == []
    at.session_state["test_kfac_damping"] = 1e-6
    at.run()
    assert handle.session.calls[1] == ("rescore", ["Re-scoring K-FAC Influence at damping 1.0e-06 ..."])


def test_a_column_says_checking_while_a_just_started_server_checks_its_caches(tmp_path):
    """The first page of a just-started server, drawn from the precomputed file before the cache check knows
    which methods cannot run here: CLIP's column said "not precomputed for these settings; ready when the cache
    build finishes", then "weights are not on this machine" (QA 16). The page is not drawn again when the check
    ends (that rerun blanked the page), so a column drawn before then must not promise results."""
    from types import SimpleNamespace

    from engine.attribution.precomputed import FILE, PrecomputedGallery
    from engine.attribution.session import AttributionSession
    from engine.paths import default_checkpoint
    from explorer.plain import unavailable_line
    from explorer.results_view import _precomputed

    session = AttributionSession("digits", cache_root=tmp_path)
    s = SimpleNamespace(measurement="loss", mc_samples=session.config.mc_samples, damping_dict={})

    def column(checking: bool, unavailable: dict[str, str]) -> str:
        handle = SimpleNamespace(session=session, precomputed=PrecomputedGallery(default_checkpoint("digits") / FILE),
                                 build=SimpleNamespace(checking=checking, unavailable=unavailable))
        r = _precomputed(handle, SimpleNamespace(key="gallery:0"), s).methods["clip"]
        assert r.status == "unavailable"
        return unavailable_line(r.status, r.title, r.reason, r.reason_about)

    # and it does not say the build settles it: the check ends seconds after the start (QA 23 #2)
    assert column(True, {}) == ("**Not precomputed.** Whether CLIP similarity can run on this server is known "
                                "seconds after it starts, once it has checked its caches: choose a sample or "
                                "setting to see.")
    assert column(False, {}) == ("**Not precomputed** for these settings: CLIP similarity answers them when the "
                                 "cache build finishes.")
    assert column(False, {"clip": "CLIP weights are not on this machine"}) == \
        "**Unavailable:** CLIP similarity cannot run on this server."


def test_a_server_waiting_for_another_processs_build_shows_no_whole_build_share():
    """QA round 18: a tab waiting for another process's build said "whole build 0%" through that build's factor
    pass while the builder's page said 24%: the waiting server only sees what is saved on disk. It now names
    the other build's saved parts and no share of its own; its own build keeps its share."""
    import time

    from engine.attribution.build_worker import BuildState
    from explorer.runtime import build_message

    handle = SimpleNamespace(session=SimpleNamespace(method_info=lambda: {"kfac": {"title": "K-FAC Influence"}}))
    start = time.time() - 90
    waiting = BuildState(status="running", message="kfac: waiting for another build: kfac-bank 3/15 parts",
                         fraction=0.2, started=start)
    text = build_message(handle, waiting)
    assert "whole build" not in text and "another process is building these caches" in text
    assert "kfac-bank 3/15 parts" in text and "1.5 min so far" in text
    own = BuildState(status="running", message="kfac: factors 100/400 rows", fraction=0.24, started=start)
    assert "(whole build 24%, 1.5 min so far)" in build_message(handle, own)
    # QA 34: the time left at this run's speed, as the CLI's bars give it: 0.2 of the build in 120 s, 0.6 left
    timed = BuildState(status="running", message="kfac: factors 100/400 rows", fraction=0.4,
                       started=time.time() - 120, start_fraction=0.2)
    assert "(whole build 40%, 2.0 min so far, about 6 min left)" in build_message(handle, timed)
    # QA 30c: another model's build in this server holds the turn; its words are the whole line
    turn = ("waiting for the digits model's cache build in this server to finish (one build at a time, so that each "
            "gets the whole CPU; 1.5 min so far)")
    assert build_message(handle, BuildState(status="running", message=turn, started=start)) == turn


def test_the_evaluation_page_names_unevaluated_methods_and_offers_no_command_for_one_that_cannot_run():
    from explorer.evaluation_view import unevaluated_note

    info = {"kfac": {"title": "K-FAC"}, "clip": {"title": "CLIP similarity"}, "gc": {"title": "Gradient cosine"}}
    assert unevaluated_note(["kfac"], {"kfac"}, info, "attribution-engine lds") == ("", "")
    line, command = unevaluated_note(["kfac", "clip", "gc"], {"kfac"}, info, "attribution-engine lds", {"clip"})
    assert line == "Not evaluated on this model yet: Gradient cosine; CLIP similarity, which cannot run on this server."
    assert command == "`attribution-engine lds --methods gc` adds an LDS of it."  # for Details, not the page's flow
    assert unevaluated_note(["clip"], set(), info, "x", {"clip"}) == \
        ("Not evaluated on this model yet: CLIP similarity, which cannot run on this server.", "")


def test_the_retraining_offer_says_how_long_training_took(tmp_path):
    """QA 23b #8: the offer gave no duration (the job took 20-30 min on a shared machine); it now gives the served
    model's own training time from its train_log.json, and nothing when there is none."""
    import json
    from types import SimpleNamespace

    from engine.paths import default_checkpoint
    from explorer.evaluation_view import training_time_note

    log = json.loads((default_checkpoint("digits") / "train_log.json").read_text())
    note = training_time_note(SimpleNamespace(session=SimpleNamespace(checkpoint=default_checkpoint("digits"))))
    assert f"took {log[-1]['elapsed_s'] / 60:.0f} min for {log[-1]['step']:,} steps" in note
    assert "two such models, one after the other" in note
    assert training_time_note(SimpleNamespace(session=SimpleNamespace(checkpoint=tmp_path))) == ""



def test_the_plot_tabs_build_the_open_one_only():
    """QA 47 #4: the four plots (plotly figures over every training image) took 1.0 s of a 2.3 s page run on mnist,
    though one tab is seen at a time.  Only the open tab's content runs (the first, at first)."""
    from streamlit.testing.v1 import AppTest

    def page():
        import streamlit as st

        from explorer.results_view import lazy_tabs, shown

        tabs = lazy_tabs(["one", "two", "three"], key="t")
        for i, tab in enumerate(tabs):
            if shown(tab):
                with tab:
                    st.write(f"content {i}")

    at = AppTest.from_function(page).run(timeout=60)
    assert not at.exception
    assert [m.value for m in at.markdown] == ["content 0"]


def _plots_page(handle, result, settings):
    from explorer import results_view

    results_view.plots(handle, result, settings)


def test_the_scatters_axes_are_kept_while_another_plot_tab_is_open():
    """The lazy plot tabs (QA 47 #4) do not draw a closed tab's widgets, and Streamlit drops the value of a widget a
    run does not draw: the scatter's axes came back as the defaults after a look at another plot."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_function(_plots_page, args=(FakeHandle(), fake_result(), _settings(["kfac", "trak", "pixel"])))
    at.run(timeout=60)
    assert not at.exception and not at.get("plotly_chart")  # the plots' expander is closed at first: nothing built
    at.session_state["plots_open"] = True
    at.run(timeout=60)
    assert [s.key for s in at.selectbox] == [] and len(at.get("plotly_chart")) == 1  # the first tab: no scatter widgets
    at.session_state["plot_tab"] = "Scatter of two methods"
    at.run(timeout=60)
    assert [(s.key, s.value) for s in at.selectbox] == [("scatter_a", "kfac"), ("scatter_b", "trak")]
    at.selectbox(key="scatter_b").set_value("pixel").run(timeout=60)
    at.session_state["plot_tab"] = "Top-k overlap"
    at.run(timeout=60)
    at.session_state["plot_tab"] = "Scatter of two methods"
    at.run(timeout=60)
    assert not at.exception
    assert [(s.key, s.value) for s in at.selectbox] == [("scatter_a", "kfac"), ("scatter_b", "pixel")]
    at.session_state["plots_open"] = False  # closed and opened again: the tab and the axes are kept
    at.run(timeout=60)
    assert not at.get("plotly_chart") and [s.key for s in at.selectbox] == []
    at.session_state["plots_open"] = True
    at.run(timeout=60)
    assert [(s.key, s.value) for s in at.selectbox] == [("scatter_a", "kfac"), ("scatter_b", "pixel")]


def test_a_compressed_column_says_when_its_lists_may_miss_an_image_and_nothing_when_not():
    """QA 55 #3: K-FAC's column on a compressed bank, every listed score exact.  When an image outside the
    re-ranked candidates has an estimate above the 4th exact score listed, one line under the column says
    that the list may miss some; when none has, the column is as before (no new line)."""
    import dataclasses

    from streamlit.testing.v1 import AppTest

    handle, result = FakeHandle(), fake_result(("kfac",), unavailable=())
    kfac = result.methods["kfac"]
    order = np.argsort(-kfac.scores)
    exact = np.zeros(N_TRAIN, bool)
    exact[np.concatenate([order[:4], order[-4:]])] = True  # the 4 highest and 4 lowest: complete
    notes = {}
    for case, mask in (("complete", exact), ("missing", exact.copy())):
        if case == "missing":
            mask[order[1]] = False  # the 2nd highest is an estimate outside the candidates: above the 4th exact
            mask[order[4]] = True
        r = dataclasses.replace(kfac, bank="compressed", exact=mask)
        at = AppTest.from_function(_grids_page, args=(handle, _query(), dataclasses.replace(
            result, methods={"kfac": r}), _settings(["kfac"])))
        at.run()
        assert not at.exception, at.exception
        notes[case] = [c.value for c in at.caption if "outside the re-ranked candidates" in c.value]
    assert notes["complete"] == []
    assert notes["missing"] == ["1 image outside the re-ranked candidates has an estimate above the 4th highest exact "
                                "score: the highest 4 may miss it; more candidates: `--kfac-rerank`"]


def test_the_spinner_after_a_background_re_rank_says_exact_scores_not_an_exact_ranking():
    """QA 55 #3: "Showing the exact ranking ..." claimed more than the re-rank gives (exact scores for its
    candidates; an image outside them may belong in the ends), and whether one may is known only after."""
    from explorer.results_view import rescore_text

    same = (("kfac", 1e-8),)
    assert rescore_text(METHOD_INFO, same, same) == "Showing the exact scores of the re-ranked candidates ..."
