"""Precomputed attribution scores of the shipped gallery, shown before any cache is built.

Why: a first ``make run`` needs minutes of CPU to build the caches, but the gallery samples
and the default settings are known in advance.  ``write_precomputed`` scores every gallery
sample with every available method at the default settings (measurement ``loss``, the
default Monte Carlo draws and dampings) and stores, per sample:

* each method's full score vector over the N training images, and
* K-FAC's scores at every damping of the app's slider (``method_info()["kfac"]["damping_steps"]``:
  the first-pass grid's values inside K-FAC's damping range), so the damping slider works too,

as float16 with one float32 scale per vector (``scores ~= scale * f16``; influence scores
span many decades, float16 alone would underflow).  Relative error <= 2^-11 of the vector's
largest score: plenty for ranking and display.  Similarity methods (pixel, CLIP) are kept as
float32 (scale 1): their scores lie in [-1, 1] with many near-ties (two digits of the same shape),
which float16 rounding reordered, so the first page's order changed when the live scores replaced
the precomputed ones; at float32 they are the live scores, bit for bit (pixel similarity's on any
CPU: its sums are float64, rounded to float32 at the end, ``methods.pixel_cosine``).

The file is keyed: ``key`` holds the checkpoint's content hash, the training set's key, the
gallery's hash, the measurement, the query draws, and every method's cache settings and
default damping.  ``PrecomputedGallery.methods_for`` compares all of it with a live session, so
the scores are never shown for another model, data set or setting; a method whose settings
differ is simply absent.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write_bytes, save_json, save_npz
from ..npy_read import load_npz

FILE = "precomputed_gallery.npz"
FORMAT = 1
MEASUREMENT = "loss"


def gallery_hash(session: Any) -> str:
    """16 hex digits of the SHA-256 of the gallery's images (float32 bytes): a file's scores are of these images,
    so a regenerated gallery (same indices, other samples) no longer matches it."""
    h = hashlib.sha256()
    for item in session.gallery():
        h.update(np.ascontiguousarray(item.image.cpu().numpy(), dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def method_key(session: Any, name: str) -> dict[str, Any]:
    """Everything one method's precomputed scores depend on besides the query."""
    return {"settings": session.caches.settings(name), "damping": session.method(name).default_damping}


def session_key(session: Any, methods: list[str]) -> dict[str, Any]:
    """Everything a precomputed file's scores depend on, compared whole with a live session before a page shows
    them (``PrecomputedGallery.methods_for``): the model's hash, the training data, the gallery's images, the
    measurement, the draws of the query gradient and each method's ``method_key``.  The query's draws are named
    by their seed: ``config.seed + 1`` for the query's own draws (the default, left unnamed so that files
    written before ``query_draws`` existed stay valid), the bank's ``config.seed`` with ``query_draws="bank"``
    (the session's ``query_draws``; the mnist preset)."""
    from .session import data_key

    c = session.config
    key = {
        "format": FORMAT,
        "checkpoint_hash": session.checkpoint_hash,
        "data_key": data_key(session.dataset, session.data_digest),
        "gallery": gallery_hash(session),
        "measurement": MEASUREMENT,
        "mc_samples": int(c.mc_samples),
        "query_seed": int(c.seed) + 1,
        "methods": {n: method_key(session, n) for n in methods},
    }
    if c.query_draws != "own":  # the bank's draws (seed c.seed); absent for the default: older files stay valid
        key["query_draws"] = c.query_draws
        key["query_seed"] = int(c.seed)
    return key


# the keys of ``session_key`` that name the query gradient's draws: only the methods that take a gradient depend on them
QUERY_DRAW_KEYS = ("mc_samples", "query_seed", "query_draws")


def _needs_gradient(session: Any, name: str) -> bool:
    return bool(getattr(session.method(name), "needs_gradient", True))


def _canonical(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _pack(scores: np.ndarray) -> tuple[np.ndarray, np.float32]:
    scale = np.float32(np.abs(scores).max() or 1.0)
    return (scores / scale).astype(np.float16), scale


def write_precomputed(
    session: Any,
    out: str | Path,
    methods: list[str] | None = None,
    indices: list[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    notice: Callable[[str], None] | None = None,
    resumed: Callable[[int], None] | None = None,
) -> Path:
    """Score the gallery at the default settings with the built caches and write ``out`` (.npz).

    Methods that are unavailable or not built are left out (and so not shown precomputed).
    Resumable: each scored gallery sample is saved at once in ``.<out name>.partial-<digest>/`` (one small .npz per
    sample, written atomically, beside the settings key it was scored under), so a run killed part-way
    scores only the samples still missing when it is run again, with the same settings; the folder goes
    once ``out`` is written.  On a large model each sample costs seconds (the K-FAC grid included), and
    32 of them were all lost to an interruption.  ``notice`` gets one line when a run resumes; ``resumed(k)``, when
    given, is told once of the k samples scored before instead of ``progress`` (a bar's start, not its speed).
    """
    status = session.status()
    names = [n for n in (methods or session.method_names()) if status[n]["available"] and status[n]["built"]]
    if not names:
        raise RuntimeError(f"no method has a built cache: run `{session.build_command(methods)}` first")
    items = session.gallery()
    if not items:
        raise RuntimeError(f"no gallery in {session.checkpoint}")
    idx = list(range(len(items))) if indices is None else list(indices)
    steps = tuple(session.method_info()["kfac"]["damping_steps"]) if "kfac" in names else ()
    key = json.dumps(_canonical(session_key(session, names)), sort_keys=True)
    out = Path(out)
    rows = _RowFolder(out, {"key": key, "methods": names, "grid": list(steps)})
    arrays_of = [rows.load(i) for i in idx]
    done = sum(a is not None for a in arrays_of)
    if notice is not None and done:
        notice(f"resuming: {done}/{len(idx)} gallery samples scored by an earlier run ({rows.folder})")
    if resumed is not None:
        resumed(done)
    elif progress is not None and done:
        for k in range(done):
            progress(k + 1, len(idx))
    for row, i in enumerate(idx):
        if arrays_of[row] is None:
            arrays_of[row] = _score_gallery_sample(session, i, names, steps)
            rows.save(i, arrays_of[row])
            done += 1
            if progress is not None:
                progress(done, len(idx))
    arrays: dict[str, np.ndarray] = {"indices": np.asarray(idx, dtype=np.int32)}
    session.caches.load(names)  # loaded (every row may have come from an earlier run): their floors are read below
    for m in names:
        floor = session.method(m).damping_floor()
        if floor is not None:  # so that an answer read from the file below it warns, as a live one does (QA 36 #2)
            arrays[f"damping_floor_{m}"] = np.float64(floor)
        arrays[f"scores_{m}"] = np.stack([a[f"scores_{m}"] for a in arrays_of])
        arrays[f"scale_{m}"] = np.stack([a[f"scale_{m}"] for a in arrays_of]).astype(np.float32)
        why = [str(a[f"unavailable_{m}"]) if f"unavailable_{m}" in a else "" for a in arrays_of]
        if any(why):  # only then: a file without such samples keeps the format readers before it know
            arrays[f"unavailable_{m}"] = np.asarray(why)
    if steps:
        arrays["kfac_grid"] = np.stack([a["kfac_grid"] for a in arrays_of])
        arrays["kfac_grid_scale"] = np.stack([a["kfac_grid_scale"] for a in arrays_of]).astype(np.float32)
        arrays["kfac_grid_damping"] = np.asarray(steps, dtype=np.float64)
    arrays["key"] = np.asarray(key)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(out, buf.getvalue())  # a temporary of its own: two runs on one file never share one
    rows.remove()
    return out


def _score_gallery_sample(session: Any, i: int, names: list[str], steps: tuple[float, ...]) -> dict[str, np.ndarray]:
    """One gallery sample's packed score vectors (and K-FAC's damping grid): a row of the file."""
    from .methods.base import QUERY

    exact = {m for m in names if session.method(m).kind == "similarity"}  # stored as float32, scale 1
    result = session.query(session.parse_query(f"gallery:{i}"), MEASUREMENT, methods=names)
    row: dict[str, np.ndarray] = {}
    n = len(session.dataset)
    for m in names:
        r = result.methods[m]
        if r.status == "unavailable" and r.reason_about == QUERY:
            # this sample cannot be scored by the method (pixel similarity of a blank image): the file says
            # why, as a live query does, and keeps the other samples and methods (QA 26: one blank sample of
            # a short training run stopped the whole file)
            row[f"scores_{m}"] = np.zeros(n, dtype=np.float32 if m in exact else np.float16)
            row[f"scale_{m}"], row[f"unavailable_{m}"] = np.asarray(0.0, dtype=np.float32), np.asarray(r.reason)
            continue
        if r.status != "ok" or r.scores is None:
            raise RuntimeError(f"gallery:{i}: {m} failed: {r.reason}")
        if m in exact:
            values, scale = np.asarray(r.scores, dtype=np.float32), np.float32(1.0)
        else:
            values, scale = _pack(r.scores)
        row[f"scores_{m}"], row[f"scale_{m}"] = values, np.asarray(scale, dtype=np.float32)
    if steps and "unavailable_kfac" in row:
        row["kfac_grid"] = np.zeros((len(steps), n), dtype=np.float16)
        row["kfac_grid_scale"] = np.zeros(len(steps), dtype=np.float32)
    elif steps:
        kfac, method = result.prepared["kfac"], session.method("kfac")
        packed = [_pack(np.asarray(method.score(kfac, lam), dtype=np.float32)) for lam in steps]
        row["kfac_grid"] = np.stack([v for v, _ in packed])
        row["kfac_grid_scale"] = np.asarray([sc for _, sc in packed], dtype=np.float32)
    return row


class _RowFolder:
    """``.<out name>.partial-<digest>/``: the gallery samples a ``write_precomputed`` run has scored so far,
    each in ``row-<index>.npz``, under ``settings.json`` (the file's key, its methods, damping grid and
    format).  The folder's name carries the digest of those settings, so rows scored under other settings
    are never reused, even when two runs with other settings share ``out`` (each keeps its own folder);
    ``remove`` drops every such folder of ``out`` once ``out`` is written."""

    def __init__(self, out: Path, settings: dict[str, Any]):
        settings = {**settings, "format": FORMAT}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        self.out = out
        self.folder = out.with_name(f".{out.name}.partial-{digest}")
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            same = json.loads((self.folder / "settings.json").read_text()) == settings
        except (OSError, ValueError):
            same = False
        if not same:  # new, or a settings file a kill cut short: its rows cannot be trusted
            for row in self.folder.glob("row-*.npz"):
                row.unlink(missing_ok=True)
            save_json(self.folder / "settings.json", settings)

    def load(self, index: int) -> dict[str, np.ndarray] | None:
        try:
            with load_npz(self.folder / f"row-{index:05d}.npz") as z:
                return {k: np.asarray(z[k]) for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # not scored yet (or unreadable: again)
            return None

    def save(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        save_npz(self.folder / f"row-{index:05d}.npz", **arrays)

    def remove(self) -> None:
        for folder in self.out.parent.glob(f".{self.out.name}.partial-*"):
            shutil.rmtree(folder, ignore_errors=True)


class PrecomputedGallery:
    """A loaded precomputed file: ``scores(index, method, damping)`` for a session it matches."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with load_npz(self.path) as z:
            self.arrays = {k: np.asarray(z[k]) for k in z.files}
        self.key = json.loads(str(self.arrays["key"]))
        self.rows = {int(i): r for r, i in enumerate(self.arrays["indices"])}
        self._matching: dict[int, list[str]] = {}

    @classmethod
    def load(cls, path: str | Path) -> PrecomputedGallery | None:
        """The file, or None when it is absent or unreadable (precomputed results are optional)."""
        try:
            return cls(path)
        except (OSError, ValueError, KeyError):
            return None

    def methods_for(self, session: Any) -> list[str]:
        """Methods whose precomputed scores belong to this session's model, data, gallery and settings."""
        sid = id(session)
        if sid not in self._matching:
            names = list(self.key.get("methods", {}))
            live = _canonical(session_key(session, [n for n in names if n in session.method_names()]))
            same, draws = self._same_model(live, draws=False), self._same_model(live)
            self._matching[sid] = [
                n for n in names if same and live["methods"].get(n) == self.key["methods"][n]
                and (draws or not _needs_gradient(session, n))
            ]
        return self._matching[sid]

    def _same_model(self, live: dict[str, Any], draws: bool = True) -> bool:
        """Whether a session's key (``session_key``, canonical) matches the file's outside its methods: the model,
        the data, the gallery and the measurement, and with ``draws`` the query gradient's draws too (M, their
        seed and kind), on which only the gradient methods' scores depend: a server at another M kept no pixel
        scores, and said they were for another model (FIX 59's report)."""
        keys = (set(live) | set(self.key)) - {"methods"} - (set() if draws else set(QUERY_DRAW_KEYS))
        return all(live.get(k) == self.key.get(k) for k in keys)

    def mismatch(self, session: Any, name: str) -> str | None:
        """Why the file holds no scores of ``name`` for this session, in a few plain words (a clause, lower-case),
        or None when it does (``methods_for``).  The page says it where a figure from these scores leaves the
        method out (QA 52 #2: a compressed K-FAC bank's label agreement was dropped without a word)."""
        if name in self.methods_for(session):
            return None
        held = self.key.get("methods", {}).get(name)
        if held is None:
            return "the gallery's precomputed scores leave it out"
        live = _canonical(session_key(session, [name]))
        if not self._same_model(live, draws=False):
            return "the gallery's scores were precomputed for another model, data set or gallery"
        if not self._same_model(live):
            return ("the gallery's scores were precomputed with other query-gradient draws (their number M, seed or "
                    "kind: --mc-samples, --attribution-seed, --query-draws)")
        mine = live["methods"][name]
        banks = [(m.get("settings") or {}).get("bank") for m in (held, mine)]
        if banks[0] != banks[1] and None not in banks:
            words = {"stored": "stored int8"}
            return (f"the gallery's scores were precomputed with the {words.get(banks[0], banks[0])} bank, not "
                    f"this server's {words.get(banks[1], banks[1])} one")
        if held.get("settings") == mine.get("settings"):
            return "the gallery's scores were precomputed at another default damping"
        return "the gallery's scores were precomputed at other settings of this method"

    def has(self, index: int) -> bool:
        return index in self.rows

    def methods(self) -> list[str]:
        """Every method the file holds scores of (whether or not they match a given session)."""
        return [n for n in self.key.get("methods", {}) if f"scores_{n}" in self.arrays]

    def unavailable(self, index: int, method: str) -> str | None:
        """Why ``method`` could not score gallery sample ``index`` (a blank sample's pixel similarity), or None."""
        row = self.rows.get(int(index))
        why = self.arrays.get(f"unavailable_{method}")
        return None if row is None or why is None or not str(why[row]) else str(why[row])

    def scores(self, index: int, method: str, damping: float | None = None) -> np.ndarray | None:
        """float32 (N,) scores of gallery sample ``index``; None when not precomputed (that damping too) or
        when the method could not score that sample (``unavailable`` says why)."""
        row = self.rows.get(int(index))
        if row is None or f"scores_{method}" not in self.arrays or self.unavailable(index, method):
            return None
        default = self.key["methods"][method]["damping"]
        if damping is None or default is None or float(damping) == float(default):
            return self.arrays[f"scores_{method}"][row].astype(np.float32) * self.arrays[f"scale_{method}"][row]
        if method == "kfac" and "kfac_grid" in self.arrays:
            grid = self.arrays["kfac_grid_damping"]
            hit = np.nonzero(np.isclose(grid, float(damping), rtol=1e-9, atol=0.0))[0]
            if hit.size:
                g = int(hit[0])
                return self.arrays["kfac_grid"][row, g].astype(np.float32) * self.arrays["kfac_grid_scale"][row, g]
        return None

    def dampings(self, method: str) -> list[float]:
        """The dampings ``scores`` answers ``method`` at: its default, and K-FAC's grid when the file holds one
        (empty for a method without a damping)."""
        default = self.key.get("methods", {}).get(method, {}).get("damping")
        out = [] if default is None else [float(default)]
        if method == "kfac" and "kfac_grid_damping" in self.arrays:
            out += [float(g) for g in self.arrays["kfac_grid_damping"] if not out or float(g) != out[0]]
        return out

    def damping_floor(self, method: str) -> float | None:
        """The method's ``damping_floor`` when the file was written (None: it has none, or the file predates it)."""
        floor = self.arrays.get(f"damping_floor_{method}")
        return None if floor is None else float(floor)

    def bank(self, method: str) -> str | None:
        """The bank kind ``method``'s scores came from, as its settings in the file's key name it (K-FAC's
        "stored" | "compressed" | "streamed"; None for a method without one)."""
        return (self.key["methods"][method].get("settings") or {}).get("bank")

    def gallery_matrix(self, session: Any, method: str, damping: float | None = None) -> np.ndarray | None:
        """(Q, N) float32 scores of every gallery sample for ``method``: what a group answer over the gallery
        needs (a group's predicted change is the sum of its members' scores, eq. 6 being linear in the
        training gradient), so the Groups page answers before any cache is built.  None unless the file
        matches this session for the method and holds every gallery sample."""
        if method not in self.methods_for(session):
            return None
        bank = self.bank(method)
        if bank is not None:
            from .bank_kinds import bank_kind

            try:
                estimates = bank_kind(bank).estimates
            except ValueError:  # not a bank kind this installation knows: do not sum what it stored
                return None
            if estimates:  # a compressed bank's column: estimates, whose sums are no group answer
                return None
        rows = [self.scores(i, method, damping) for i in range(len(session.gallery()))]
        if not rows or any(r is None for r in rows):
            return None
        return np.stack(rows).astype(np.float32)

    @property
    def nbytes(self) -> int:
        return self.path.stat().st_size


def precomputed_result(
    session: Any,
    pre: PrecomputedGallery | None,
    query_spec: str,
    measurement: str,
    mc_samples: int | None,
    damping: dict[str, float] | None = None,
    pending_reason: str = "not precomputed for this setting; ready when the cache build finishes",
    unavailable: dict[str, str] | None = None,
) -> Any:
    """A ``QueryResult`` from the precomputed file for ``gallery:N`` at the default settings, else None.

    Methods the file holds for this session come back with status "ok" and reason
    "precomputed"; the others (or a damping the file does not hold) "unavailable" with
    ``pending_reason``.  Returns None when nothing about this query is precomputed.
    ``unavailable``: methods known to be unavailable in this session (name -> reason, e.g. CLIP
    without weights) keep that reason instead.
    """
    from .methods.base import QUERY, SERVER
    from .results import MethodResult, QueryResult

    kind, _, arg = query_spec.partition(":")
    if pre is None or kind != "gallery" or measurement != MEASUREMENT:
        return None
    if mc_samples is not None and int(mc_samples) != int(session.config.mc_samples):
        return None
    try:
        index = int(arg)
    except ValueError:
        return None
    available = pre.methods_for(session)
    if not available or not pre.has(index):
        return None
    damping = dict(damping or {})
    methods = {}
    for name in session.method_names():
        m = session.method(name)
        lam = session.damping_for(name, damping)
        res = MethodResult(name=name, title=m.title, kind=m.kind, caption=m.caption, status="unavailable")
        scores = pre.scores(index, name, lam) if name in available else None
        if scores is not None:
            res.status, res.reason, res.scores, res.damping = "ok", "precomputed", scores, lam
            if m.needs_gradient:  # as a live answer names it (D-TRAK: the square norm; review 53)
                res.measurement = session.measurement_used(name, measurement)
            # the bank the scores came from, as a live K-FAC answer names it (QA round 22 #3)
            res.bank = pre.bank(name)
            # below the floor the file recorded, the live answer's warning (QA 36 #2: the first page's slider
            # reaches 1e-12, under digits' 2.5e-10, with no word of it)
            res.damping_floor = m.floor_or_recorded(pre.damping_floor(name))
            res.warning = m.damping_warning(lam, res.damping_floor)
        elif name in available and (why := pre.unavailable(index, name)):  # this sample: as a live query says it
            res.reason, res.reason_about = why, QUERY
        else:
            known = (unavailable or {}).get(name)  # from availability, which never sees the query
            res.reason, res.reason_about = (known, SERVER) if known else (pending_reason, None)
        methods[name] = res
    q = session.parse_query(query_spec)
    query = {
        "spec": query_spec,
        "image_digest": q.digest(),
        "description": f"generated sample {index} from the gallery",
        "label": q.label,
        "notes": list(q.notes),
        "has_trajectory": q.trajectory is not None,
        "mc_samples": int(session.config.mc_samples),
        "precomputed": True,
    }
    # nothing was timed: no timing (QA 64 F5: a flag of 1.0 read "precomputed 1.0 ms"); ``query["precomputed"]`` says it
    return QueryResult(query=query, measurement=MEASUREMENT, methods=methods, timing_ms={})


def fillable(session: Any, results: dict[str, Any]) -> list[str]:
    """The methods of an answer (``results``: name -> a result with ``status``) that precomputed scores may stand in
    for: unavailable because their caches are not built, while they could run here and no cache of theirs is
    corrupt (a corrupt cache keeps its reason: the user must learn about it).  The rule of ``fill_unbuilt`` and of
    ``precomputed_groups.fill_unbuilt_groups``."""
    unavailable = [name for name, r in results.items() if r.status == "unavailable"]
    status = session.status(unavailable) if unavailable else {}
    return [name for name in unavailable
            if status[name]["available"] and not status[name]["built"] and not status[name]["corrupt"]]


def fill_unbuilt(
    session: Any,
    result: Any,
    query_spec: str,
    measurement: str,
    damping: dict[str, float] | None = None,
) -> list[str]:
    """Give the methods of ``result`` whose caches are not built the shipped precomputed scores.

    Why: on a fresh clone ``attribution-engine query --query gallery:N`` would answer "not built"
    for every gradient method until a cold build (minutes on a CPU), while the checkpoint ships
    exactly those scores for its gallery at the default settings (the app shows them on its first
    page).  Only methods that are available, not built and not corrupt are filled, and only from a
    file whose key matches this session (``precomputed_result``); each filled method gets status
    "ok" and reason "precomputed"; the query's notes say which ones and how to build them, and
    ``result.query["precomputed_methods"]`` lists them.
    A corrupt cache keeps its reason: the user must learn about it.  Returns the filled names.
    """
    wanted = fillable(session, result.methods)
    if not wanted:
        return []
    pre = PrecomputedGallery.load(Path(session.checkpoint) / FILE)
    shipped = precomputed_result(session, pre, query_spec, measurement, None, damping)
    if shipped is None:
        return []
    filled = [name for name in wanted if shipped.methods[name].status == "ok"]
    for name in filled:
        result.methods[name] = shipped.methods[name]
    held = pre.methods_for(session)
    for name in wanted:  # precomputed, but not at the damping asked (QA 41 #5: it said only "not built")
        r = result.methods[name]
        if name not in filled and name in held and (at := pre.dampings(name)) and r.reason:
            grid = sorted(at[1:])
            also = f" or {len(grid)} others from {grid[0]:.3g} to {grid[-1]:.3g} on its grid" if grid else " only"
            r.reason += f" (the checkpoint's precomputed scores hold it at damping {at[0]:.3g}{also})"
    if filled:
        names = ",".join(filled)
        result.query.setdefault("notes", []).append(
            f"{names}: the checkpoint's precomputed gallery scores (caches not built here; "
            f"`{session.build_command(filled)}` computes them live)"
        )
        result.query["precomputed_methods"] = filled
    return filled
