"""Groups of training images and the predicted effect of removing them (docs/architecture.md §4).

First-order influence is additive: removing a set R of training images changes a query's
measurement by approximately

    delta m(q; R) = sum_{i in R} tau_i(q),    tau_i(q) = (1/N) grad m(q)^T (G + lambda I)^{-1} grad l(x_i)

(paper eqs. 5-6 summed over the group; the same sign and 1/N scale as each member's score:
positive = removing the group would raise the loss-like measurement, i.e. the group
supports the query).  For a score matrix over many queries, (Q, N), the group's predicted
changes are one matrix-vector product with the group's indicator vector.

Group specs (the CLI's ``--remove`` and the app's group picker):

* ``label:3``        every training image with label 3 (class names are accepted too);
* ``train:1,2,3``    hand-picked training indices (ranges ``10-20`` allowed);
* ``file:PATH``      a JSON list of integers, or text with one integer per line / comma-separated.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..model.dataset import ImageDataset

USAGE = "expected label:C, train:I,J,K (ranges like 10-20 allowed) or file:PATH"
# what an empty ``kind:`` lacks, in its own words
EMPTY_KIND = {"label": "name a class, e.g. label:3", "train": "give at least one training index, e.g. train:1,2,3",
              "file": "give the path of a file of training indices, e.g. file:picked.json"}


class GroupError(ValueError):
    """A group spec that cannot be turned into training indices; the message says why."""


@dataclass(frozen=True)
class Group:
    """A named set of training indices (sorted, unique)."""

    spec: str
    members: np.ndarray  # int64, sorted
    description: str

    @property
    def size(self) -> int:
        return int(len(self.members))

    def mask(self, n: int) -> np.ndarray:
        """Indicator vector (N,) float64 of the members: removal = mask . scores."""
        m = np.zeros(n, dtype=np.float64)
        m[self.members] = 1.0
        return m


def _check_indices(values: list[int], n: int, where: str) -> np.ndarray:
    """The sorted, unique members; ``where`` names the input ("group 'train:1,2'", "file F", "selection")."""
    if not values:
        raise GroupError(f"{where} is empty: give at least one training index")
    idx = np.asarray(values, dtype=np.int64)
    bad = idx[(idx < 0) | (idx >= n)]
    if len(bad):
        raise GroupError(f"training index {int(bad[0])} in {where} is out of range 0..{n - 1}")
    return np.unique(idx)


def _repeats(values: list[int], members: np.ndarray) -> str:
    """What the description adds when the input named an index more than once: a group is a set (removing an image
    twice is removing it), so its sum counts each member once, and the answer says so (QA 44 #2: ``train:1,1,2``
    answered for 2 images with no word, its JSON spec still showing 1 twice)."""
    extra = len(values) - len(members)
    return "" if extra <= 0 else f" ({extra} repeated {'indices' if extra > 1 else 'index'} counted once)"


def _parse_int_list(text: str, where: str) -> list[int]:
    """'1,2,3', '1 2 3', '10-20' (inclusive) -> integers; GroupError names the bad token."""
    out: list[int] = []
    for tok in re.split(r"[,\s]+", text.strip()):
        if not tok:
            continue
        m = re.fullmatch(r"(-?\d+)-(\d+)", tok)
        if m:  # outside the try below: GroupError is a ValueError, whose message it would replace
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise GroupError(f"the range {tok!r} in {where} is reversed; write {hi}-{lo}")
            out.extend(range(lo, hi + 1))
            continue
        try:
            out.append(int(tok))
        except ValueError:
            raise GroupError(f"{tok!r} in {where} is not an integer training index") from None
    return out


def parse_index_text(text: str, where: str) -> list[int]:
    """A JSON list of integers, or plain text of integers (comma, space or newline separated)."""
    text = text.strip()
    if text.startswith("[") or text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise GroupError(f"{where} is not valid JSON ({e.msg}); expected a list of integers") from None
        if not isinstance(data, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in data):
            raise GroupError(f"{where} must hold a JSON list of integers (training indices)")
        return [int(v) for v in data]
    return _parse_int_list(text, where)


def read_index_file(path: str | Path) -> list[int]:
    """``parse_index_text`` of a file's contents."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise GroupError(f"no group file at {p}")
    return parse_index_text(p.read_text(encoding="utf-8", errors="replace"), f"file {p}")


def group_from_text(text: str, name: str, n: int) -> Group:
    """A group from the contents of an index file (e.g. uploaded in the app): ``file:NAME``."""
    values = parse_index_text(text, f"file {name}")
    members = _check_indices(values, n, f"file {name}")
    return Group(f"file:{name}", members, f"{_images(len(members))} listed in {name}" + _repeats(values, members))


def _valid_labels(present: list[int], names: list[str]) -> str:
    """The labels a ``label:C`` group accepts, each number with its class name where it has one
    (``0 (airplane), 1 (automobile)``; just ``0, 1`` where the names are the numbers)."""
    def one(lab: int) -> str:
        name = names[lab] if 0 <= lab < len(names) else None
        return str(lab) if name is None or name == str(lab) else f"{lab} ({name})"

    return ", ".join(one(lab) for lab in present)


def _label_index(arg: str, dataset: ImageDataset) -> int:
    if dataset.labels is None:
        raise GroupError("this training set has no labels, so label:C groups are not available")
    names = dataset.class_names or []
    present = sorted({int(v) for v in dataset.labels.tolist()})
    if arg in names:
        return names.index(arg)
    try:
        lab = int(arg)
    except ValueError:
        raise GroupError(f"unknown label {arg!r}; valid labels: {_valid_labels(present, names)}") from None
    if lab not in present:
        raise GroupError(f"unknown label {lab}; valid labels: {_valid_labels(present, names)}")
    return lab


def parse_group(spec: str, dataset: ImageDataset) -> Group:
    """``label:3`` | ``train:1,2,3`` | ``file:PATH`` -> Group; GroupError with a one-line reason."""
    text = (spec or "").strip()
    kind, sep, arg = text.partition(":")
    kind = kind.strip().lower()
    arg = arg.strip()
    if sep and not arg and kind in EMPTY_KIND:  # QA 63 F4: "bad group 'train:'" did not say the list was empty
        raise GroupError(f"the group {text!r} is empty: {EMPTY_KIND[kind]}")
    if not sep or not arg:
        raise GroupError(f"bad group {spec!r}: {USAGE}")
    n = len(dataset)
    if kind == "label":
        lab = _label_index(arg, dataset)
        members = np.flatnonzero(dataset.labels.cpu().numpy() == lab).astype(np.int64)  # type: ignore[union-attr]
        if len(members) == 0:
            raise GroupError(f"the group label:{arg} is empty: no training image has that label")
        name = dataset.class_names[lab] if dataset.class_names else str(lab)
        return Group(text, members, f"all {len(members)} training images labelled {name}")
    if kind == "train":
        return _train_group(text, arg, n, f"group {text!r}")
    if kind == "file":
        values = read_index_file(arg)
        members = _check_indices(values, n, f"file {arg}")
        return Group(text, members, f"{_images(len(members))} listed in {Path(arg).name}" + _repeats(values, members))
    raise GroupError(f"bad group kind {kind!r} in {spec!r}: {USAGE}")


def _train_group(spec: str, text: str, n: int, where: str) -> Group:
    """``train:TEXT``: the indices in ``text`` (``_parse_int_list``), errors naming ``where``."""
    values = _parse_int_list(text, where)
    members = _check_indices(values, n, where)
    return Group(spec, members, _picked(members) + _repeats(values, members))


def group_from_typed(text: str, n: int) -> Group:
    """A hand-picked group typed into a box (the app's): ``train:TEXT``.  Its errors quote what was typed ("the
    range '5-2' in your list is reversed"), not the CLI's spec the box's text was turned into ("in group
    'train:5-2'", which the person never typed: QA 63 F4)."""
    return _train_group(f"train:{text.strip()}", text, n, "your list")


def group_from_indices(indices: list[int] | np.ndarray, n: int, spec: str | None = None) -> Group:
    """A hand-picked group (e.g. ticked in the app): ``train:i,j,k``."""
    members = _check_indices([int(i) for i in indices], n, "selection")
    spec = spec or "train:" + ",".join(str(int(i)) for i in members)
    return Group(spec, members, _picked(members))


def _images(k: int) -> str:
    return f"{k} training image" + ("" if k == 1 else "s")


def _picked(members: np.ndarray) -> str:
    """How a hand-picked group is described: one image by its index, several by their number."""
    return f"training image #{int(members[0])}" if len(members) == 1 else f"{_images(len(members))}, hand-picked"


def group_change(scores: np.ndarray, group: Group) -> np.ndarray:
    """Predicted change of the measurement if the group were removed: sum of the members' scores.

    ``scores`` (N,) for one query or (Q, N) for many; returns a float (as a 0-d array) or (Q,).
    Summed in float64 (the scores are float32; a class holds ~180 of them).
    """
    s = np.asarray(scores, dtype=np.float64)
    return s[..., group.members].sum(axis=-1)


def size_caveat(size: int, num_train: int) -> str | None:
    """What a group's predicted change cannot say when the group is a large part of the training set.

    Why: influence (eq. 6, summed over the group) is a first-order prediction around the trained model. Its
    sums are checked (the LDS) on random halves of the training set, as a ranking: they order groups and
    samples against each other, but the further a removal goes from the trained model the less their size
    forecasts the retrained model's change, and a removal of every image leaves nothing to train. None for
    a group of at most half the training set."""
    if size >= num_train:
        return ("the group is the whole training set: removing it leaves nothing to train on, so these sums "
                "predict nothing; they are only the sum of every score")
    if 2 * size > num_train:
        return (f"the group holds {size:,} of the {num_train:,} training images, more than half: influence is a first-order "
                "prediction around the trained model, so for a removal this large its sums can rank samples "
                "(the LDS checks that on random halves) but do not forecast how large the change would be")
    return None


def strongest_members(scores: np.ndarray, group: Group, k: int = 10) -> list[tuple[int, float]]:
    """The group's k members with the largest scores (its strongest proponents of the query)."""
    s = np.asarray(scores, dtype=np.float64)[group.members]
    order = np.lexsort((group.members, -s))[:k]
    return [(int(group.members[j]), float(s[j])) for j in order]


def top_share(scores: np.ndarray, group: Group) -> float:
    """The group's share of the query's positive influence mass (0 when there is none)."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.clip(s, 0.0, None)
    total = float(pos.sum())
    return float(pos[group.members].sum() / total) if total > 0 else 0.0


__all__ = [
    "Group",
    "size_caveat",
    "GroupError",
    "USAGE",
    "parse_group",
    "group_from_indices",
    "read_index_file",
    "parse_index_text",
    "group_from_text",
    "group_change",
    "strongest_members",
    "top_share",
]
