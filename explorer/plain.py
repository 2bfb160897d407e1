"""Plain words for the page's main flow; the technical details behind a "Details" expander or a tooltip.

Why: the explorer is demoed to people who are not specialists, and the main flow read "1x8x8", a
checkpoint's content hash, a CLI command to build a cache, server file paths and configuration field
names (QA round 15, A4).  Researchers still need those details, so they are kept, one click away.
"""

from __future__ import annotations

from collections.abc import Sequence

import streamlit as st

from engine.attribution.results import reason_head

DETAILS = "Details"


def image_words(shape: Sequence[int]) -> str:
    """A data set's image shape (channels, height, width) in words: (1, 8, 8) -> "greyscale images of 8×8 pixels"."""
    c, h, w = (int(v) for v in shape)
    kind = {1: "greyscale", 3: "colour"}.get(c)
    return f"{kind} images of {h}×{w} pixels" if kind else f"images of {h}×{w} pixels with {c} channels"


def model_line(name: str, n_images: int, shape: Sequence[int]) -> str:
    """The page's subtitle: the question the explorer answers, and the model in words."""
    return (f"Which training images made this image likely, and which made it unlikely? Model **{name}**, "
            f"trained on {n_images:,} {image_words(shape)}.")


def model_details(preset: str, shape: Sequence[int], checkpoint: object, checkpoint_hash: str, device: str) -> str:
    """The subtitle's tooltip: what researchers need to identify the model exactly."""
    return (f"Preset `{preset}` · image tensors {'x'.join(map(str, shape))} (channels x height x width) · "
            f"checkpoint `{checkpoint}` · content hash `{checkpoint_hash}` · device `{device}`")


BUILDING = "being built"  # the reason of a method left out of a live answer because the build has yet to reach it
# how the explorer's reasons end for what the running build will bring (a precomputed page's missing setting)
PENDING = "ready when the cache build finishes (progress at the top of the page)"


def brought_by_build(reason: str) -> bool:
    """Whether a method has no scores only until the running build finishes: left out of a live answer
    (``BUILDING``) or a setting the precomputed file lacks (``PENDING``); said in blue, not as "Unavailable"."""
    return reason_head(reason) == BUILDING or (reason.startswith("not precomputed") and PENDING in reason)


def unavailable_line(status: str, title: str, reason: str, about: str | None = None) -> str:
    """What a method's column says in the main flow when it has no scores.  ``about`` is the engine's word on
    whose problem the reason is (``MethodResult.reason_about``): a reason about the server (a CLI command to
    build a cache, CLIP's weights: file paths, model identifiers) becomes plain words and goes into the
    column's Details; a reason about the query (a blank image) is plain already and is said as it is, as are
    the explorer's own words (a precomputed gallery not holding these settings) and a reason of unknown
    origin.  A failure says whether the method's saved cache is damaged, since Details then says how to
    rebuild it."""
    head = reason_head(reason)
    if head == BUILDING:  # left out of a live answer while the server's build has yet to reach it
        # the column is not redrawn when the method is built before the rest (a rerun from the build panel's fragment
        # blanked the page, QA 16; a column redrawn in its own fragment did too, d79f5bf), but the panel then offers
        # to redraw it: say so, so that its "Show ... live" and this column agree (QA 40 #5)
        return (f"**Being built:** {title} answers when the cache build finishes (progress at the top of the page), "
                f"or as soon as it is built: the panel there then offers a button, **Show ... live**, naming "
                f"{title}, which redraws this column.")
    if reason.startswith("not precomputed; whether"):  # drawn while a just-started server checks (results_view)
        # the check ends seconds after the start, but this page is not drawn again until the user changes
        # something (a rerun from the build panel then blanked the page, QA 16): say how to see it (QA 23 #2)
        return (f"**Not precomputed.** Whether {title} can run on this server is known seconds after it starts, "
                "once it has checked its caches: choose a sample or setting to see.")
    if brought_by_build(reason):
        # a setting the shipped file lacks while the build runs: it comes with the build, so not the amber
        # "Unavailable" of a method that cannot run here (QA 30c: TRAK one damping step right read as CLIP's)
        return f"**Not precomputed** for these settings: {title} answers them when the cache build finishes."
    if head.startswith("not precomputed"):
        return f"**Unavailable:** {head}"
    if status != "unavailable":
        if status == "corrupt" or "corrupt" in reason:
            return f"**Failed:** {title}'s saved cache is damaged; Details says how to rebuild it."
        return f"**Failed:** {title} could not score this query; Details says why."
    if head.startswith("not built"):
        return f"**Unavailable:** {title} is not built on this server yet."
    if about == "server":
        return f"**Unavailable:** {title} cannot run on this server."
    return f"**Unavailable:** {reason}"


def unavailable(status: str, title: str, reason: str, about: str | None) -> None:
    """Why a method has no scores, in plain words (``unavailable_line``); the engine's reason (how to enable
    it: a command, the files it looked for) goes into a Details expander beside it.  ``about``:
    ``MethodResult.reason_about``.  The Explore columns and the Groups page draw it alike."""
    line = unavailable_line(status, title, reason, about)
    # what the running build brings is news, in blue; what cannot run (or failed) is a warning, in amber
    (st.info if brought_by_build(reason) else st.warning)(line)
    if reason.strip() and reason not in line and not reason.startswith(BUILDING):
        # a reason said whole in the line needs no Details (nor does BUILDING: the line says it all)
        with st.expander(DETAILS):
            st.markdown(reason)


def and_list(items: list[str]) -> str:
    """"A", "A and B", "A, B and C": a list of names in a sentence."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def sentence(clause: str) -> str:
    """A clause (the engine's caveats start lower-case, to be embedded) as a sentence of its own."""
    return clause[0].upper() + clause[1:] + "."


def details(lines: Sequence[str], label: str = DETAILS) -> None:
    """The technical ``lines`` (markdown) in a collapsed expander; nothing when there are none."""
    lines = [line for line in lines if line]
    if not lines:
        return
    with st.expander(label):
        for line in lines:
            st.caption(line)


def label_agreement_line(agreements: dict, names: Sequence[str], info: dict[str, dict],
                         gaps: dict[str, str] | None = None) -> str | None:
    """One line under the method columns: how often each shown method's 10 strongest proponents (a similarity
    method's most similar) share the query's label over the model's gallery (``Handle.gallery_agreement``), so
    that a column of mixed labels reads as this method on this model, not as this one query (QA 47 #8).  A shown
    method without a figure is named with why (``gaps``: ``Handle.gallery_agreement_gaps``; QA 52 #2: a
    compressed K-FAC bank's was left out without a word).  None when no shown method has a figure."""
    shown = [n for n in names if n in agreements]
    if not shown:
        return None
    first = agreements[shown[0]]
    figures = and_list([f"{info[n]['title']} {agreements[n].share:.0%}" for n in shown])
    line = (f"On this model's {first.queries} gallery samples, the {first.top} strongest proponents (most similar, "
            f"for a similarity method) share the sample's label, a classifier's guess, this often: {figures} (chance "
            f"{first.chance:.0%}; at the default settings; intervals in the Evaluation tab).")
    missing = no_figure_line([n for n in names if n not in agreements], gaps or {}, info)
    return f"{line} {missing}" if missing else line


def no_figure_line(names: Sequence[str], gaps: dict[str, str], info: dict[str, dict]) -> str | None:
    """"K-FAC Influence has no figure: <why>." for each of ``names`` (methods a label-agreement figure leaves
    out), those with the same reason in one sentence; a method of unknown reason is said to have none."""
    by_reason: dict[str, list[str]] = {}
    for n in names:
        by_reason.setdefault(gaps.get(n, "no precomputed gallery scores of it match this server"), []).append(
            info.get(n, {}).get("title", n))
    return " ".join(f"{and_list(titles)} {'has' if len(titles) == 1 else 'have'} no figure: {why}."
                    for why, titles in by_reason.items()) or None
