"""Sidebar: choosing the query image (gallery, new sample, training image, upload).

Returns a ``Query``: a stable key (what results are cached under), the engine's
``QueryInput`` and a short title.  Generation is a job: the button only records the
request, the script runs it with a progress bar and disables the button meanwhile, so a
double click cannot start it twice; the same run then draws the sample's results.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import streamlit as st

from explorer import chips
from explorer.images import display
from explorer.runtime import Handle, throttled

SOURCES = ("Gallery", "New sample", "Training image", "Upload")


@dataclass
class Query:
    key: str  # gallery:3 | train:17 | generate:42 | upload:<sha1>
    input: Any  # engine QueryInput
    title: str


GALLERY_PARAM = "gallery"  # the chosen gallery sample, also in the page's URL (``?gallery=6``)
MODEL_PARAM = "model"  # the sidebar's model, also in the URL (``?model=mnist&gallery=12``)
URL_READ = "url_read"  # session-state key: the model this session showed first, once it has read the URL


def gallery_key(model: str) -> str:
    """The session-state key of a model's chosen gallery sample: one per model, since digits' sample 3 has
    nothing to do with mnist's (QA 40 #3: the index carried over on switching)."""
    return f"gallery_index:{model}"


def model_from_url(args: Any) -> Any:
    """``args`` with the URL's model (``?model=mnist``) as its preset, on a session's first run only.

    Why: a reload after a server restart gives the tab a new session, which kept ``?gallery=N`` but not the
    model, so a user on mnist came back on digits, and mnist's interrupted build waited until someone chose it
    (QA 40 #3).  The switch's widget takes its first value from the preset returned here; later runs keep the
    widget's own.  A model this server does not offer is noted on the page, and the default is shown."""
    import dataclasses

    from explorer.runtime import model_choices

    if URL_READ in st.session_state:
        return args
    wanted = st.query_params.get(MODEL_PARAM)
    if not wanted or wanted == args.preset:
        return args
    choices = model_choices(args)
    if wanted in choices:
        return dataclasses.replace(args, preset=wanted)
    offered = ", ".join(f"`{c}`" for c in choices) if choices else f"only `{args.preset}`"
    st.session_state["url_model_note"] = (
        f"The link asked for the model `{wanted}`, which this server does not offer (it offers {offered}): "
        f"showing `{args.preset}`, its default."
    )
    return args


def keep_url(model: str, switch: str | None) -> None:
    """Read the URL's gallery sample once per session (it belongs to the model shown first: the URL's, else the
    default), then keep the URL in step with this tab's model and that model's gallery sample, so a reload or a
    copied link opens both.  ``model`` is the served preset's name, ``switch`` the sidebar switch's value (None
    without a switch: no ``?model=`` then)."""
    if URL_READ not in st.session_state:
        st.session_state[URL_READ] = model
        try:
            st.session_state.setdefault(gallery_key(model), int(st.query_params.get(GALLERY_PARAM)))
        except (TypeError, ValueError):  # none, or a hand-edited URL: the first sample
            pass
    if switch is not None and st.query_params.get(MODEL_PARAM) != switch:
        st.query_params[MODEL_PARAM] = switch
    note = st.session_state.pop("url_model_note", None)
    if note:
        st.info(note, icon="ℹ️")
    chosen = st.session_state.get(gallery_key(model))
    _url_gallery(None if chosen is None else int(chosen))


def _url_gallery(index: int | None) -> None:
    want = None if index is None else str(index)
    if st.query_params.get(GALLERY_PARAM) != want:
        if want is None:
            del st.query_params[GALLERY_PARAM]
        else:
            st.query_params[GALLERY_PARAM] = want


def _select_gallery(model: str, i: int) -> None:
    st.session_state[gallery_key(model)] = i
    _url_gallery(i)


def chosen_gallery_index(n: int, model: str) -> int:
    """The gallery sample this tab shows for ``model``: its own choice (read from the URL at the session's
    start by ``keep_url``), else 0.

    Why the URL too: a server restart (or a disconnect past the session's lifetime) gives the tab a new
    session, which kept the widgets' values (the browser sends them back) but not the gallery choice, so
    the first click after reconnecting silently switched the page to sample 0 (QA round 18).  The browser
    sends the URL's query string with every run, so the choice survives, and a copied link opens it."""
    chosen = st.session_state.get(gallery_key(model), 0)
    try:
        chosen = int(chosen)
    except (TypeError, ValueError):
        chosen = 0
    chosen = chosen if 0 <= chosen < n else 0  # out of range (another model's, or a hand-edited URL): the first
    st.session_state[gallery_key(model)] = chosen
    _url_gallery(chosen)
    return chosen


def _request_generation() -> None:
    if st.session_state.get("busy"):
        return  # a job is running; ignore the second click
    st.session_state["pending_seed"] = int(st.session_state.get("gen_seed", 0))
    st.session_state["busy"] = "generate"


def choose_query(handle: Handle) -> Query | None:
    """Render the query chooser in the sidebar; None while nothing usable is chosen."""
    session = handle.session
    gallery = session.gallery()
    sources = list(SOURCES) if gallery else [s for s in SOURCES if s != "Gallery"]
    st.sidebar.header("Query")
    # the training index, its "Pick by" and the seed, while another source is shown (QA 23 #6); not the class
    # widgets, whose ranges change with the class
    lowered = chips.keep_choices(("train_index", "train_by", "gen_seed"),
                                 upper={"train_index": len(session.dataset) - 1})
    if "train_index" in lowered:  # said under the index until it changes (QA 47 #9)
        st.session_state["train_index_lowered"] = lowered["train_index"]
    source = st.sidebar.radio("Query image", sources, key="source", horizontal=True)
    with st.sidebar:
        if source == "Gallery":
            return _gallery(handle, gallery)
        if source == "New sample":
            return _generate(handle)
        if source == "Training image":
            return _training(handle)
        return _upload(handle)


def _gallery(handle: Handle, gallery: list) -> Query:
    st.caption("Generated samples shipped with the model, trajectories included. Click one to attribute it.")
    model = handle.session.preset.name
    chosen = chosen_gallery_index(len(gallery), model)
    per_row = 4
    for start in range(0, len(gallery), per_row):
        cols = st.columns(per_row)
        for col, item in zip(cols, gallery[start : start + per_row], strict=False):
            with col:
                # "stretch": scaled to the column with its aspect ratio kept (a fixed width
                # wider than a narrow sidebar column was squeezed horizontally only)
                st.image(display(item.image, 48), width="stretch")
                st.button(
                    f"{item.index}",
                    key=f"gallery_{item.index}",
                    on_click=_select_gallery,
                    args=(model, item.index),
                    type="primary" if item.index == chosen else "secondary",
                    help=gallery_tooltip(item, len(gallery)),
                )
    spec = f"gallery:{chosen}"
    return Query(spec, handle.session.parse_query(spec), f"Gallery sample {chosen}")


def gallery_tooltip(item: Any, n: int) -> str:
    """What a gallery button's tooltip says about its sample.

    Why not "(seed 1000)" alone: every sample of the gallery carries the same seed, that of the one
    batch it was drawn in, and "New sample" with that seed draws a different image."""
    text = (f"Gallery sample {item.index} of {n}, drawn with the others in one batch "
            f"(sampling seed {item.seed}, recorded trajectory)")
    if item.label is not None:
        text += f"; a classifier reads it as a {item.label}"
    return text


def _generate(handle: Handle) -> Query | None:
    """The seed, the button and the sample generated last.

    Why no ``st.rerun()`` after generating: it was the one full-page rerun the script asked for on its own while the
    build panel's ``run_every`` fragment was live, and once (QA 40 #1: the first generation in a fresh server, a
    build running) the browser was left with the sidebar saying "Showing the sample generated with seed 0" and
    nothing below the build panel for minutes (no tabs, no results, no script running), as a full rerun from that
    fragment once left it (QA round 16).  The run that generates now draws the sample's results itself: the seed
    and the button are drawn disabled in two slots while it samples, then replaced there by the usable ones."""
    # also while a build runs: its factor pass hooks a private copy of the model, and the gradient passes' hooks
    # act in their own thread only (review 53: 26 samples drawn during a K-FAC build equal those drawn after)
    pending = st.session_state.get("pending_seed")
    busy = st.session_state.get("busy") == "generate" and pending is not None
    seed_slot, button_slot = st.empty(), st.empty()
    if busy:  # stand-ins under their own keys: each key is drawn once per run, the usable ones after the job
        seed_slot.number_input("Seed", value=int(pending), step=1, key="gen_seed_busy", disabled=True)
        button_slot.button("Generating ...", key="gen_button_busy", disabled=True, type="primary")
        try:
            if pending not in handle.generated:
                bar = st.progress(0.0, text="sampling ...")

                def show(message: str, fraction: float) -> None:
                    bar.progress(fraction, text=message)

                cb = throttled(show)
                with handle.lock:
                    q = handle.session.generate(
                        pending, progress=lambda i, n: cb(f"DDPM step {i}/{n}", i / max(n, 1))
                    )
                handle.generated[pending] = q
                bar.empty()
            st.session_state["generated_seed"] = pending
        finally:
            st.session_state["busy"] = None
            st.session_state["pending_seed"] = None
    # no value=: the default is the minimum, 0, and the value comes from the state chips.keep_choices keeps
    seed_slot.number_input("Seed", min_value=0, max_value=2**31 - 1, step=1, key="gen_seed")
    button_slot.button(
        "Generate sample",
        key="gen_button",
        on_click=_request_generation,
        type="primary",
        help=f"Runs all {handle.session.diffusion.T} DDPM steps and keeps the trajectory.",
    )
    seed = st.session_state.get("generated_seed")
    q = None if seed is None else handle.generated.get(seed)
    if q is None:  # none yet, or evicted from the server's most recent GENERATED_KEPT
        st.info("Pick a seed and press **Generate sample**.")
        return None
    st.caption(f"Showing the sample generated with seed {seed}.")
    return Query(f"generate:{seed}", q, f"New sample (seed {seed})")


def _training(handle: Handle) -> Query:
    ds = handle.session.dataset
    n = len(ds)
    by = st.radio("Pick by", ["index", "class"], key="train_by", horizontal=True)
    if by == "class" and ds.labels is not None:
        labels = ds.labels.cpu().numpy()
        classes = sorted(set(int(v) for v in labels))
        c = st.selectbox("Class", classes, key="train_class", format_func=lambda v: _class_name(ds, v))
        members = [int(i) for i in (labels == c).nonzero()[0]]
        pos = st.number_input(
            f"Image of that class (1..{len(members)})", 1, len(members), 1, key="train_class_pos"
        )
        index = members[int(pos) - 1]
    else:
        index = int(st.number_input(f"Training index (0..{n - 1})", 0, n - 1, key="train_index"))  # default: 0
        lowered = st.session_state.get("train_index_lowered")
        if lowered is not None and lowered[1] == index:
            st.caption(f"Training image {lowered[0]} is past this model's {n:,} images: showing the last, {index}.")
        elif lowered is not None:
            del st.session_state["train_index_lowered"]
    spec = f"train:{index}"
    return Query(spec, handle.session.parse_query(spec), f"Training image {index}")


def _class_name(ds, v: int) -> str:
    return ds.class_names[v] if ds.class_names and v < len(ds.class_names) else str(v)


def _upload(handle: Handle) -> Query | None:
    f = st.file_uploader("PNG or JPEG image", type=["png", "jpg", "jpeg"], key="upload")
    if f is None:
        st.info("Upload an image; it is converted to the model's size and channels.")
        return None
    data = f.getvalue()
    key = "upload:" + hashlib.sha1(data).hexdigest()[:12]
    try:
        q = prepared_upload(handle, data, f.name, st.session_state.setdefault("uploads", {}))
    except Exception as e:  # noqa: BLE001 - any unreadable upload becomes a message, never a traceback
        st.error(f"Cannot use **{f.name}**: {e}")
        return None
    st.caption("What was done to the upload: " + "; ".join(q.notes))
    return Query(key, q, f"Upload {f.name}")


def prepared_upload(handle: Handle, data: bytes, name: str, cache: dict) -> Any:
    """The upload as ``handle``'s model takes it (resized, its channels, its grid: ``query_from_upload``), kept in
    ``cache`` (the tab's) for the page's reruns: the latest upload of this tab, for this model.

    Keyed by the model too (QA 47 #1): an upload prepared for mnist (28x28) was kept by its bytes alone, so after the
    sidebar switched to digits the page read "query image is (1, 28, 28), the model takes (1, 8, 8)", and uploading
    the same file again found the same stale entry."""
    session = handle.session
    key = (session.preset.name, session.checkpoint_hash, hashlib.sha1(data).hexdigest())
    if key not in cache:
        cache.clear()
        cache[key] = session.query_from_upload(data, name)
    return cache[key]
