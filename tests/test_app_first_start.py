"""First start of the app on an empty cache (issue 12), driven by ``streamlit.testing.v1.AppTest``.

* The shipped precomputed gallery results are on the page at once, marked "precomputed",
  while the server's build runs (no query is computed, nothing waits for the build).
* The build is the server's: it keeps going when no script run is attached, and a second
  session shares it instead of starting another.
* A failed build is shown with its reason and a Retry button, and is not retried by itself.
"""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
from test_app import TIMEOUT, _handle, _ok, _set_env, _texts, tiny_app  # noqa: F401 - fixture

from engine.attribution.precomputed import FILE, write_precomputed


@pytest.fixture
def precomputed_env(tiny_app, tmp_path, monkeypatch):  # noqa: F811 - the fixture imported above
    """A copy of the tiny checkpoint with its precomputed gallery file, and an empty cache."""
    from engine.attribution.session import AttributionSession

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_app["ATTRIBUTION_CHECKPOINT"], ckpt)
    built = AttributionSession(tiny_app["ATTRIBUTION_PRESET"], ckpt, "cpu", tiny_app["ATTRIBUTION_CACHE"])
    write_precomputed(built, ckpt / FILE)
    env = {**tiny_app, "ATTRIBUTION_CHECKPOINT": str(ckpt), "ATTRIBUTION_CACHE": str(tmp_path / "cache")}
    return _set_env(env, monkeypatch)


def _gate_builds(handle, monkeypatch, fail_first: bool = False):
    """Make the server's build wait for ``gate`` (and optionally fail once); returns (gate, calls)."""
    gate, calls = threading.Event(), []
    real = handle.session.build

    def build(names, progress=None):
        calls.append(list(names))
        progress(f"{names[0]}: waiting for the test", 0.1)
        assert gate.wait(TIMEOUT)
        if fail_first and len(calls) == 1:
            raise RuntimeError("disk full (injected)")
        return real(names, progress)

    monkeypatch.setattr(handle.session, "build", build)
    return gate, calls


def _app():
    from streamlit.testing.v1 import AppTest
    from test_app import APP

    return AppTest.from_file(APP, default_timeout=TIMEOUT)


@pytest.mark.slow
def test_empty_cache_shows_precomputed_gallery_results_and_one_shared_build(shipped_methods_only, precomputed_env, monkeypatch):
    handle = _handle()
    assert handle.precomputed is not None and handle.precomputed.methods_for(handle.session)
    gate, calls = _gate_builds(handle, monkeypatch)
    queries: list = []
    real_query = handle.session.query
    monkeypatch.setattr(handle.session, "query", lambda *a, **k: queries.append((a, k)) or real_query(*a, **k))

    first = _app().run()
    _ok(first)
    assert handle.build.status == "running"
    text = _texts(first)
    assert "Precomputed results" in text and "**precomputed**" in text
    # the file holds K-FAC's damping grid, so the note does not say the dampings are the defaults alone (QA 30c #7)
    assert "K-FAC Influence at every step of its damping slider" in text
    assert text.count("**Proponents**") == 3  # K-FAC, TRAK, D-TRAK from the shipped file
    # the page did not wait for the worker to find out what is missing (its own thread does that)
    assert "Checking which attribution caches are built" in text or "Building the attribution caches" in text
    assert queries == []  # nothing computed: the scores came from the file
    assert handle.worker.wait_checked(TIMEOUT).methods  # the check found the caches to build
    first.run()
    _ok(first)
    assert "Building the attribution caches" in _texts(first) and "**precomputed**" in _texts(first)

    second = _app().run()  # another tab / session while the build runs
    _ok(second)
    assert "Building the attribution caches" in _texts(second)
    first.button(key="gallery_1").click().run()
    _ok(first)
    assert "Gallery sample 1" in _texts(first) and "**precomputed**" in _texts(first)
    # the reverse view answers from the precomputed gallery scores (it said it waited for the build)
    index = int(str(first.multiselect(key="grid_pick").options[0]).lstrip("#").split(" ")[0])
    first.multiselect(key="grid_pick").set_value([index]).run()
    _ok(first)
    text = _texts(first)
    assert "What the group supports most" in text and "**Precomputed:**" in text
    assert "Ranking the gallery samples by the images picked here will be ready" not in text
    first.multiselect(key="grid_pick").set_value([]).run()
    first.selectbox(key="measurement").set_value("elbo").run()  # not precomputed: the built methods answer
    _ok(first)
    text = _texts(first)
    # QA round 19: nothing answered live while a build ran; now what is built (pixel: no cache) does, and each
    # method still to build says so in its column, without the query touching its half-written cache
    assert len(queries) == 1 and set(queries[0][1]["methods"]).isdisjoint({"kfac", "trak", "dtrak"})
    assert "pixel" in queries[0][1]["methods"]
    assert ("Live results from the methods already built; K-FAC Influence, TRAK and D-TRAK will be ready when the "
            "cache build finishes") in text
    assert "**Being built:** K-FAC Influence answers when the cache build finishes" in text
    assert "**Being built:** D-TRAK answers when the cache build finishes" in text
    assert "**Most similar**" in text and "**Proponents**" not in text  # pixel's column; no influence method's
    assert len(calls) == 1 and handle.build.attempts == 1  # one build for every session

    del first, second  # no session attached any more
    gate.set()
    state = handle.worker.wait(TIMEOUT)
    assert state.status == "done", state.error
    status = handle.session.status()
    assert all(status[n]["built"] for n in ("kfac", "trak", "dtrak"))
    assert handle.build.attempts == 1

    later = _app().run()  # after the build: live results
    _ok(later)
    assert "Precomputed results" not in _texts(later) and _texts(later).count("**Proponents**") == 3
    assert len(queries) == 2 and queries[1][1]["methods"] is None  # every method, once the build is done


@pytest.mark.slow
def test_methods_already_built_answer_live_while_another_builds(shipped_methods_only, precomputed_env, monkeypatch):
    """QA round 19: a server whose caches held K-FAC but not a new method built that method in the
    background and meanwhile answered nothing live (only the precomputed gallery).  Now K-FAC answers a
    query the shipped file does not hold while TRAK and D-TRAK are being built, and they join after."""
    from engine.attribution.session import AttributionSession

    env = precomputed_env
    AttributionSession(env["ATTRIBUTION_PRESET"], env["ATTRIBUTION_CHECKPOINT"], "cpu",
                       env["ATTRIBUTION_CACHE"]).build(["kfac"])
    handle = _handle()
    gate, calls = _gate_builds(handle, monkeypatch)
    queries: list = []
    real_query = handle.session.query
    monkeypatch.setattr(handle.session, "query", lambda *a, **k: queries.append(k) or real_query(*a, **k))
    at = _app().run()
    assert set(handle.worker.wait_checked(TIMEOUT).methods) == {"trak", "dtrak"}
    at.selectbox(key="measurement").set_value("elbo").run()  # not precomputed
    _ok(at)
    text = _texts(at)
    assert handle.build.status == "running" and calls == [["trak"]]  # held at the gate: the build is under way
    assert text.count("**Proponents**") == 1  # K-FAC's column, live
    assert "kfac" in queries[-1]["methods"] and not {"trak", "dtrak"} & set(queries[-1]["methods"])
    assert "**Being built:** TRAK answers when the cache build finishes" in text
    assert "TRAK and D-TRAK will be ready when the cache build finishes" in text
    assert "other queries are answered by the methods already built" in text  # the build panel says so too
    details = [m.value for e in at.expander for m in e.markdown]
    assert details and not any(d.startswith("being built") for d in details)  # no Details repeating the line
    # the Groups page answers with K-FAC meanwhile (it waited for the build's lock before) and names the others
    at.session_state["page"] = "Groups"
    at.run()
    _ok(at)
    assert at.multiselect(key="grp_methods").options == ["K-FAC Influence"]
    assert "TRAK and D-TRAK are being built: ready when the cache build finishes" in _texts(at)
    at.session_state["page"] = "Explore"
    at.run()
    # and a new sample can be drawn meanwhile (it was refused for the whole build), then attributed live
    at.radio(key="source").set_value("New sample").run()
    at.number_input(key="gen_seed").set_value(7).run()
    at.button(key="gen_button").click().run()
    _ok(at)
    assert 7 in handle.generated and "New sample (seed 7)" in _texts(at)
    assert _texts(at).count("**Proponents**") == 1 and handle.build.status == "running"
    at.radio(key="source").set_value("Gallery").run()
    gate.set()
    assert handle.worker.wait(TIMEOUT).status == "done"
    at.run()  # the build panel's closing rerun
    _ok(at)
    assert _texts(at).count("**Proponents**") == 3 and "Being built" not in _texts(at)


@pytest.mark.slow
def test_failed_build_shows_its_reason_and_retries_only_on_request(shipped_methods_only, precomputed_env, monkeypatch):
    handle = _handle()
    gate, calls = _gate_builds(handle, monkeypatch, fail_first=True)
    gate.set()
    at = _app().run()
    state = handle.worker.wait(TIMEOUT)
    assert state.status == "failed" and "disk full (injected)" in state.error
    at.run()
    assert any("disk full (injected)" in e.value for e in at.error)
    # the shipped gallery results stay on the page, not "not built" in every column
    text = _texts(at)
    assert "**Precomputed results** for K-FAC Influence, TRAK, D-TRAK" in text and "build failed" in text
    assert text.count("**Proponents**") == 3 and "**precomputed**" in text
    # the Groups page answers from the precomputed scores, and does not promise a build that is not running
    at.session_state["page"] = "Groups"
    at.run()
    text = _texts(at)
    assert "**Precomputed:**" in text and "are ready when the build finishes" not in text and "build K-FAC" in text
    at.selectbox(key="measurement").set_value("elbo").run()
    text = _texts(at)
    assert "ready when the cache build finishes" not in text and "need the influence caches; build" in text
    at.selectbox(key="measurement").set_value("loss").run()
    at.session_state["page"] = "Explore"
    at.run()
    assert len(calls) == 1  # reruns do not restart it
    at.button(key="retry_build").click().run()
    assert handle.worker.wait(TIMEOUT).status == "done" and handle.build.attempts == 2
    at.run()
    _ok(at)


@pytest.mark.slow
def test_precomputed_scores_are_keyed_to_model_and_settings(precomputed_env):
    import dataclasses
    import json

    import numpy as np

    from engine.attribution.precomputed import PrecomputedGallery
    from engine.attribution.session import AttributionSession

    ckpt = precomputed_env["ATTRIBUTION_CHECKPOINT"]
    built_cache = precomputed_env["ATTRIBUTION_CACHE"]  # empty: the scores come from the file
    session = AttributionSession(precomputed_env["ATTRIBUTION_PRESET"], ckpt, "cpu", built_cache)
    pre = PrecomputedGallery(f"{ckpt}/precomputed_gallery.npz")
    assert set(pre.methods_for(session)) >= {"kfac", "trak", "dtrak", "pixel"}  # and any method file added
    assert pre.nbytes < 200_000
    # other settings: nothing is shown
    other = AttributionSession(
        precomputed_env["ATTRIBUTION_PRESET"], ckpt, "cpu", built_cache,
        config=dataclasses.replace(session.config, mc_samples=3),
    )
    assert pre.methods_for(other) == ["pixel"]  # the gradient methods' scores depend on M; pixel's do not
    # another model (its hash in the key): nothing is shown
    pre.key = json.loads(json.dumps(pre.key).replace(session.checkpoint_hash, "f" * 16))
    pre._matching.clear()
    assert pre.methods_for(session) == []
    # float16 with a scale: within 1e-3 of the largest score, and the K-FAC grid is there
    pre = PrecomputedGallery(f"{ckpt}/precomputed_gallery.npz")
    s0 = pre.scores(0, "kfac")
    steps = pre.arrays["kfac_grid_damping"]
    lam = float(steps[len(steps) // 2])
    s1 = pre.scores(0, "kfac", lam)
    assert s0 is not None and s1 is not None and not np.allclose(s0, s1)
    assert pre.scores(0, "trak", 123.0) is None  # TRAK only at its default damping


@pytest.mark.parametrize("preset", ["digits", "mnist"])
def test_shipped_precomputed_results_match_the_presets_current_settings(preset, tmp_path):
    """The shipped gallery results must belong to the shipped checkpoint AND the preset's current
    attribution settings: a changed default (draws, factor draws, projection) changes the cache keys,
    and without regenerating the file (`attribution-engine precompute`) a first start would show none."""
    from engine.attribution.precomputed import PrecomputedGallery
    from engine.attribution.session import AttributionSession
    from engine.paths import default_checkpoint

    pre = PrecomputedGallery.load(default_checkpoint(preset) / FILE)
    assert pre is not None, f"no shipped precomputed results for {preset}"
    session = AttributionSession(preset, cache_root=tmp_path)  # empty cache: nothing is built or loaded
    assert {"kfac", "trak", "dtrak", "pixel"} <= set(pre.methods_for(session)), pre.key["methods"].keys()
    # pixel similarity is stored at float32: the first page's order is the live order, not float16's
    # reordering of near-ties (pixel needs no cache, so this is a live query on an empty cache)
    for i in (0, 7, 31):
        live = session.query(session.parse_query(f"gallery:{i}"), "loss", methods=["pixel"]).methods["pixel"]
        assert np.array_equal(pre.scores(i, "pixel"), live.scores), (preset, i)


def test_similarity_scores_are_stored_exactly_and_influence_scores_packed(precomputed_env):
    """A similarity's near-ties must keep their live order on the first page; influence vectors, spanning
    decades, keep float16 with a scale (2^-11 of the largest score)."""
    from engine.attribution.precomputed import PrecomputedGallery
    from engine.attribution.session import AttributionSession

    ckpt = precomputed_env["ATTRIBUTION_CHECKPOINT"]
    session = AttributionSession(precomputed_env["ATTRIBUTION_PRESET"], ckpt, "cpu", precomputed_env["ATTRIBUTION_CACHE"])
    pre = PrecomputedGallery(f"{ckpt}/{FILE}")
    assert pre.arrays["scores_pixel"].dtype == np.float32 and pre.arrays["scores_kfac"].dtype == np.float16
    for i in range(len(session.gallery())):
        live = session.query(session.parse_query(f"gallery:{i}"), "loss", methods=["pixel"]).methods["pixel"]
        shown = pre.scores(i, "pixel")
        assert np.array_equal(shown, live.scores)
        assert np.array_equal(np.argsort(-shown, kind="stable"), np.argsort(-live.scores, kind="stable"))


@pytest.mark.slow
def test_a_query_independent_method_is_flagged_beside_its_column(precomputed_env):
    """A method whose shipped gallery scores rank the same training images for every query gets a warning
    in its column (issue 16: D-TRAK on mnist); a method whose rankings differ between queries does not."""
    import numpy as np

    from engine.attribution.precomputed import PrecomputedGallery

    path = f"{precomputed_env['ATTRIBUTION_CHECKPOINT']}/{FILE}"
    with np.load(path) as z:
        arrays = {k: np.asarray(z[k]) for k in z.files}
    q, n = arrays["scores_trak"].shape
    assert q >= 2
    arrays["scores_trak"][:] = arrays["scores_trak"][0]  # one ranking for every query
    rng = np.random.default_rng(0)  # D-TRAK: an independent random ranking per query (overlap ~ chance)
    arrays["scores_dtrak"] = np.stack([rng.permutation(n) for _ in range(q)]).astype(np.float16)
    np.savez_compressed(path, **arrays)

    handle = _handle()
    assert PrecomputedGallery.load(path).methods_for(handle.session)  # the edited file still belongs to it
    flagged = handle.query_independent()
    assert "trak" in flagged and flagged["trak"].top_overlap == 1.0 and flagged["trak"].distinct == flagged["trak"].top
    assert "dtrak" not in flagged
    at = _app().run()
    _ok(at)
    notes = [w.value for w in at.warning if w.value.startswith("**Barely depends on the query**")]
    assert len(notes) == len(flagged)
    assert any("share on average 100% of their top-20" in note for note in notes)  # TRAK's
    assert handle.worker.wait(TIMEOUT).status == "done"  # the server's build, started by the page, ends here


def test_the_build_panel_does_not_rerun_the_page_when_the_cache_check_ends(monkeypatch):
    """QA round 16: the panel's full-page rerun when the check ended, issued from its run_every fragment,
    intermittently left the browser blank below the panel until the build ended; the check's end now only
    redraws the panel (the next rerun of the page shows the reasons the check found)."""
    import sys
    import types
    from dataclasses import replace

    from streamlit.testing.v1 import AppTest

    from engine.attribution.build_worker import BuildState

    info = {n: {"title": n.upper()} for n in ("kfac", "clip")}
    handle = types.SimpleNamespace(build=BuildState(status="running", started=0.0),
                                   session=types.SimpleNamespace(method_info=lambda: info), cache_root="/c",
                                   precomputed=None)
    monkeypatch.setitem(sys.modules, "_fake_build", types.SimpleNamespace(handle=handle))

    def page():
        import _fake_build
        import streamlit as st

        from explorer import build_view

        st.session_state["runs"] = st.session_state.get("runs", 0) + 1
        build_view.build_panel(_fake_build.handle)

    at = AppTest.from_function(page).run(timeout=60)
    assert at.session_state["runs"] == 1 and "Checking which attribution caches" in at.caption[0].value
    handle.build = replace(handle.build, methods=("kfac",), unavailable={"clip": "no CLIP weights"})
    at.run(timeout=60)
    assert not at.exception and at.session_state["runs"] == 2  # this run only: no rerun from the fragment
    assert "Building the attribution caches" in at.markdown[0].value


def test_only_the_model_whose_build_ran_says_it_has_finished(monkeypatch):
    """QA 23 #1: a tab that switched to mnist during the digits build was told "Attribution caches built in 0.0
    min; results below are live" by the mnist page, which had built nothing: the flag was one for all models."""
    import sys
    import types
    from dataclasses import replace

    from streamlit.testing.v1 import AppTest

    from engine.attribution.build_worker import BuildState

    info = {"kfac": {"title": "K-FAC"}}

    def handle(status: str):
        return types.SimpleNamespace(build=BuildState(status=status, started=0.0, methods=("kfac",)),
                                     session=types.SimpleNamespace(method_info=lambda: info), cache_root="/c",
                                     precomputed=None)

    handles = {"digits": handle("running"), "mnist": handle("done")}
    monkeypatch.setitem(sys.modules, "_fake_builds", types.SimpleNamespace(handles=handles))

    def page():
        import _fake_builds
        import streamlit as st

        from explorer import build_view

        build_view.build_panel(_fake_builds.handles[st.session_state.get("model", "digits")])

    at = AppTest.from_function(page).run(timeout=60)
    assert "Building the attribution caches" in at.markdown[0].value
    at.session_state["model"] = "mnist"
    at.run(timeout=60)
    assert not at.success and not at.exception  # mnist built nothing in this tab's sight
    handles["digits"].build = replace(handles["digits"].build, status="done")
    at.session_state["model"] = "digits"
    at.run(timeout=60)
    assert len(at.success) == 1 and at.success[0].value.startswith("Attribution caches built in")
    assert "earlier" not in at.success[0].value
    # a build that resumed an interrupted one says its minutes are this run's (QA 23 #3)
    handles["digits"].build = replace(handles["digits"].build, status="running", resumed=("kfac: resuming ...",))
    at.run(timeout=60)
    handles["digits"].build = replace(handles["digits"].build, status="done")
    at.run(timeout=60)
    assert at.success[0].value.startswith("Attribution caches built ") and \
        "min in this run, which resumed work saved by an earlier one" in at.success[0].value


def test_a_method_built_mid_build_is_offered_to_the_page_that_left_it_out(monkeypatch):
    """Review 53: a method that finished while the build went on kept its "Being built" column until the user
    changed something, with nothing saying it was ready (the page reruns by itself only when the build ends).
    The panel now offers a button once a method the page left out is built; clicking it redraws the page."""
    import sys
    import types
    from dataclasses import replace

    from streamlit.testing.v1 import AppTest

    from engine.attribution.build_worker import BuildState
    from explorer.build_view import DRAWN_PENDING

    info = {"kfac": {"title": "K-FAC"}, "trak": {"title": "TRAK"}, "dtrak": {"title": "D-TRAK"}}
    handle = types.SimpleNamespace(
        build=BuildState(status="running", started=0.0, methods=("trak", "dtrak"), current="trak"),
        session=types.SimpleNamespace(method_info=lambda: info), cache_root="/c", precomputed=None)
    monkeypatch.setitem(sys.modules, "_fake_mid_build", types.SimpleNamespace(handle=handle))

    def page():
        import _fake_mid_build
        import streamlit as st

        from explorer import build_view

        st.session_state["runs"] = st.session_state.get("runs", 0) + 1
        build_view.build_panel(_fake_mid_build.handle)
        if st.session_state["runs"] == 1:  # what results_view.get_result records of the answer it drew
            st.session_state[build_view.DRAWN_PENDING] = _fake_mid_build.handle.build.pending

    at = AppTest.from_function(page).run(timeout=60)
    assert at.session_state[DRAWN_PENDING] == ("trak", "dtrak")
    at.run(timeout=60)
    assert not at.button  # nothing built since the page was drawn
    handle.build = replace(handle.build, summary={"trak": {"status": "ok"}}, current="dtrak")
    at.run(timeout=60)
    assert [b.label for b in at.button] == ["Show TRAK live"]
    runs = at.session_state["runs"]
    at.button(key="show_built").click().run(timeout=60)
    assert not at.exception and at.session_state["runs"] == runs + 2  # the click's run, then the page's rerun
    assert at.session_state[DRAWN_PENDING] == () and not at.button


def test_the_groups_page_counts_a_method_the_running_build_has_finished():
    """The Groups page's methods come from a status snapshot refreshed when the build ends: a method built
    mid-build was neither offered nor named as "being built" (so the panel's "Show TRAK live" would have
    redrawn a page without it)."""
    import types

    from engine.attribution.build_worker import BuildState
    from explorer.groups_view import influence_methods

    kinds = {"kfac": "influence", "trak": "influence", "dtrak": "influence", "pixel": "similarity"}
    session = types.SimpleNamespace(method_names=lambda: list(kinds),
                                    method=lambda n: types.SimpleNamespace(kind=kinds[n]))
    snapshot = {"kfac": {"built": True}, "trak": {"built": False}, "dtrak": {"built": False}, "pixel": {"built": True}}
    build = BuildState(status="running", methods=("trak", "dtrak"), summary={"trak": {"status": "ok"}})
    handle = types.SimpleNamespace(session=session, build=build, status=lambda: snapshot)
    assert influence_methods(handle) == ["kfac", "trak"]  # D-TRAK is still being built
    handle.build = BuildState(status="running", methods=("trak", "dtrak"), summary={"trak": {"status": "corrupt"}})
    assert influence_methods(handle) == ["kfac"]


@pytest.mark.slow
def test_groups_page_answers_over_the_gallery_from_the_precomputed_scores(precomputed_env, tiny_app, monkeypatch):  # noqa: F811
    """QA round 12: on an empty cache the Groups page only waited for the build, though the shipped file holds
    every gallery sample's full score vector and a group's change is the sum of its members' scores."""
    from engine.attribution.group_attribution import group_attribution
    from engine.attribution.groups import parse_group
    from engine.attribution.pool import gallery_set
    from engine.attribution.session import AttributionSession

    handle = _handle()
    gate, calls = _gate_builds(handle, monkeypatch)
    at = _app()
    at.session_state["page"] = "Groups"
    at.run()
    _ok(at)
    text = _texts(at)
    assert "**Precomputed:**" in text and "If the group were removed" in text and "What the group supports most" in text
    assert "Groups need the influence caches" not in text
    # the sums agree with a live answer on the built cache (float16 storage: 2^-11 of each sample's largest)
    live = AttributionSession(tiny_app["ATTRIBUTION_PRESET"], tiny_app["ATTRIBUTION_CHECKPOINT"], "cpu",
                              tiny_app["ATTRIBUTION_CACHE"])
    group = parse_group("label:1", live.dataset)
    want = group_attribution(live, group, gallery_set(live), methods=["kfac", "trak"])
    for name in ("kfac", "trak"):
        mat = handle.precomputed.gallery_matrix(handle.session, name)
        got = mat[:, group.members].sum(axis=1)
        tol = len(group.members) * 2.0**-11 * np.abs(mat).max(axis=1) + 1e-12
        assert np.all(np.abs(got - want.changes(name)) <= tol), name
    # K-FAC's slider at its lowest step, below this model's floor: the file's floor gives the live page's box (QA 37 #2)
    from explorer.controls import damping_key

    assert not any("resolution" in w.value for w in at.warning)
    lowest = min(handle.session.method_info()["kfac"]["damping_steps"])
    assert lowest < handle.precomputed.damping_floor("kfac")
    at.select_slider(key=damping_key("kfac", handle.session.preset.name)).set_value(lowest).run()
    _ok(at)
    assert "**Precomputed:**" in _texts(at)
    assert any(w.value.startswith("K-FAC Influence: damping") and "resolution" in w.value for w in at.warning)
    # another measurement is not precomputed: it says so, and waits for the build
    at.selectbox(key="measurement").set_value("elbo").run()
    _ok(at)
    assert "**Precomputed:**" not in _texts(at) and "Groups at these settings need the influence caches" in _texts(at)
    gate.set()
    handle.worker.wait(TIMEOUT)


def test_a_method_offered_after_the_build_joins_the_selection_and_a_removed_one_stays_out(monkeypatch):
    """QA 23b #3: after the build the Groups page kept only K-FAC selected, though it had said TRAK and D-TRAK
    would be ready when the build finished; the new ones were behind an "All methods" button."""
    import sys
    import types

    from streamlit.testing.v1 import AppTest

    box = types.SimpleNamespace(options=["kfac"])
    monkeypatch.setitem(sys.modules, "_fake_options", box)

    def page():
        import _fake_options
        import streamlit as st

        from explorer import chips

        chips.init_selection("m", _fake_options.options)
        st.multiselect("Methods", _fake_options.options, key="m")

    at = AppTest.from_function(page).run(timeout=60)
    assert at.multiselect(key="m").value == ["kfac"]
    box.options = ["kfac", "trak", "dtrak"]  # the build finished
    at.run(timeout=60)
    assert at.multiselect(key="m").value == ["kfac", "trak", "dtrak"]
    at.multiselect(key="m").unselect("trak").run(timeout=60)
    at.run(timeout=60)
    assert at.multiselect(key="m").value == ["kfac", "dtrak"]  # the user's removal is kept


def test_the_groups_page_names_the_unbuilt_methods_while_the_server_checks_its_caches(monkeypatch):
    """QA 23b #1: opened in the seconds a just-started server checks its caches, the Groups page answered with
    K-FAC alone and named no other method (the build's pending list is empty until the check ends)."""
    import sys
    import types

    from streamlit.testing.v1 import AppTest

    from engine.attribution.build_worker import BuildState

    kinds = {"kfac": "influence", "trak": "influence", "dtrak": "influence", "pixel": "similarity"}
    info = {"kfac": {"title": "K-FAC"}, "trak": {"title": "TRAK"}, "dtrak": {"title": "D-TRAK"}}
    session = types.SimpleNamespace(method_names=lambda: list(kinds), method_info=lambda: info,
                                    method=lambda n: types.SimpleNamespace(kind=kinds[n]))
    snapshot = {"kfac": {"built": True}, "trak": {"built": False}, "dtrak": {"built": False}}
    handle = types.SimpleNamespace(session=session, build=BuildState(status="running", started=0.0),
                                   status=lambda: snapshot)
    assert handle.build.checking
    monkeypatch.setitem(sys.modules, "_fake_checking", types.SimpleNamespace(handle=handle))

    def page():
        import _fake_checking

        from explorer.groups_view import _joining_later

        _joining_later(_fake_checking.handle)

    at = AppTest.from_function(page).run(timeout=60)
    assert [i.value for i in at.info] == ["TRAK and D-TRAK are not built yet: the server is checking which caches it "
                                          "has to build (seconds; progress at the top of the page)."]


def test_the_first_selection_leaves_out_the_methods_that_cannot_run_and_a_lowered_index_says_so(monkeypatch):
    """QA 47 #10: CLIP's column read "Unavailable" on every query of an offline laptop, one column in five; the
    first selection holds the methods that can run (CLIP stays offered).  QA 47 #9: training image 1500 on digits
    became mnist's last, 999, with no word; ``keep_choices`` returns what it lowered, for the page to say."""
    import sys
    import types

    from streamlit.testing.v1 import AppTest

    box = types.SimpleNamespace(n=1797)
    monkeypatch.setitem(sys.modules, "_fake_models", box)

    def page():
        import _fake_models
        import streamlit as st

        from explorer import chips

        names = ["kfac", "clip", "pixel"]
        chips.init_selection("m", names, initial=[n for n in names if n != "clip"])
        st.multiselect("Methods", names, key="m")
        lowered = chips.keep_choices(("i",), upper={"i": _fake_models.n - 1})
        st.number_input("index", 0, _fake_models.n - 1, key="i")
        st.write(f"lowered {lowered}")

    at = AppTest.from_function(page).run(timeout=60)
    assert at.multiselect(key="m").value == ["kfac", "pixel"]
    assert [o for o in at.multiselect(key="m").options] == ["kfac", "clip", "pixel"]
    at.number_input(key="i").set_value(1500).run(timeout=60)
    assert at.markdown[-1].value == "lowered {}"
    box.n = 1000  # the sidebar switched to a model with fewer images
    at.run(timeout=60)
    assert at.markdown[-1].value == "lowered {'i': (1500, 999)}" and at.number_input(key="i").value == 999
    at.run(timeout=60)
    assert at.markdown[-1].value == "lowered {}"  # said once; the page keeps it until the index changes


@pytest.mark.slow
def test_the_pages_say_how_often_each_methods_top_share_the_querys_label_over_the_gallery(precomputed_env):
    """QA 47 #8: a column of mixed labels beside K-FAC's read as a broken method; the Explore tab says each shown
    method's figure over the gallery under the columns, and the Evaluation tab gives them with their intervals,
    both the engine's figures from the shipped precomputed scores."""
    from engine.evaluation.label_agreement import gallery_label_agreement

    gallery = f"{precomputed_env['ATTRIBUTION_CHECKPOINT']}/gallery.npz"  # the tiny gallery has no classifier labels
    with np.load(gallery) as z:
        arrays = {k: np.asarray(z[k]) for k in z.files}
    arrays["labels"] = np.arange(len(arrays["images"]), dtype=np.int64) % 2  # labels of the tiny training set
    np.savez_compressed(gallery, **arrays)  # the images unchanged: the precomputed file still matches them
    handle = _handle()
    session, pg = handle.session, handle.precomputed
    expected = gallery_label_agreement(pg, pg.methods_for(session), session.labels,
                                       {g.index: g.label for g in session.gallery()})
    assert expected and handle.gallery_agreement().keys() == expected.keys()
    at = _app().run()
    _ok(at)
    line = next(c.value for c in at.caption if "gallery samples, the 10 strongest proponents" in c.value)
    info = session.method_info()
    shown = [n for n in expected if info[n]["title"] in line]
    assert shown, line
    for n in shown:
        assert f"{info[n]['title']} {expected[n].share:.0%}" in line
    at.session_state["page"] = "Evaluation"
    at.run()
    _ok(at)
    assert "Do the top proponents share the query's label?" in [h.value for h in at.subheader]
    table = next(d.value for d in at.dataframe if "top-10 share" in d.value.columns)
    assert list(table["top-10 share"]) == [f"{expected[n].share:.0%}" for n in session.method_names() if n in expected]
    assert handle.worker.wait(TIMEOUT).status == "done"
