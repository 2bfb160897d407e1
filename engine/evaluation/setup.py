"""Where an evaluation run happens: the full model's recipe, its data, its checkpoint and the
run and results folders (``RunSetup``), resolved once from typed arguments; and the lock that
keeps two trainers off one run folder.

Both evaluations (LDS and retrain-top) start here, so neither borrows from the other.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import folder_lock
from ..config import DataConfig, ModelConfig, Preset, TrainConfig
from ..files import can_create_in, nearest_existing_folder
from ..model.dataset import ImageDataset
from ..paths import REPO_ROOT
from ..validation import InvalidSettingError

QUICK_STEPS = 60  # quick mode: full tiny model 60 steps, half subsets 30


def quick_preset() -> Preset:
    """CI-sized preset: the tests' tiny U-Net on the first 64 digits."""
    return Preset(
        name="quick",
        model=ModelConfig(
            base_channels=8, channel_mults=(1, 1), num_res_blocks=1, attn_resolutions=(4,), num_groups=4
        ),
        data=DataConfig(name="digits"),
        train=TrainConfig(steps=QUICK_STEPS, batch_size=32, lr=2e-3, log_every=10, checkpoint_every=20),
    )


@dataclass
class RunSetup:
    """Everything a benchmark run needs: the full model's preset, checkpoint and data, the folders."""

    preset: Preset
    checkpoint: Path
    dataset: ImageDataset
    out: Path
    results: Path
    device: str
    quick: bool


def resolve_setup(
    preset: Preset,
    checkpoint: Path,
    device: str,
    kind: str,
    out: str | Path | None = None,
    results: str | Path | None = None,
    quick: bool = False,
    steps: int | None = None,
) -> RunSetup:
    """The full model's own recipe (its checkpoint's preset, with this machine's data root and the
    requested preset's attribution settings), its data and the folders: ``runs/<kind>/<preset>`` and ``assets/results`` unless given.

    Quick mode (CI) trains its own tiny model on 64 digits into ``out/full`` and writes its
    results under ``out/results``, never over the shipped ones.  ``steps``: retrain-top's --steps, which its
    models train instead of the recipe's (the notice on the preset's unused steps names them).
    """
    from ..model.checkpoint import read_config
    from ..model.data import load_dataset
    from .runs import is_finished

    out_dir = Path(out) if out else REPO_ROOT / "runs" / kind / ("quick" if quick else preset.name)
    results_dir = Path(results) if results else REPO_ROOT / "assets" / "results"
    if quick:
        if not results:
            results_dir = out_dir / "results"  # CI runs never touch the shipped results
        qp = quick_preset()
        dataset = load_dataset(qp.data).subset(list(range(64)))
        ckpt = out_dir / "full"
        if not is_finished(ckpt):
            from ..model.train import train

            train(qp, ckpt, dataset=dataset, device=device, progress=False)
        return RunSetup(qp, ckpt, dataset, out_dir, results_dir, device, True)
    ckpt = Path(checkpoint)
    if (ckpt / "config.json").is_file():
        ck_preset, _ = read_config(ckpt)
        requested = preset
        note = unused_steps_notice(kind, requested.train.steps, ck_preset.train.steps, steps)
        if note:  # QA 24: a preset file's steps were ignored silently
            print(f"notice: {note}", file=sys.stderr, flush=True)
        preset = ck_preset.replace(data={"root": preset.data.root}) if preset.data.root else ck_preset
        # the checkpoint fixes how the model was trained; the attribution settings are the requested preset's
        # (the CLI's lds and retrain-top give it the named preset's, else the checkpoint's own settings:
        # cli.common.with_attribution_source), as in the app and the other commands
        preset = preset.replace(attribution=requested.attribution)
    return RunSetup(preset, ckpt, load_dataset(preset.data), out_dir, results_dir, device, False)


def unused_steps_notice(kind: str, preset_steps: int, recipe_steps: int, steps: int | None) -> str | None:
    """Why the preset's ``train.steps`` is not what a run trains, when it is not (QA 24: a preset file's steps were
    ignored silently): the runs train with the checkpoint's recipe, at its ``recipe_steps`` or at the ``steps`` the
    user gave (retrain-top's --steps; QA 37: the notice named the recipe's 1,500 steps while ``--steps 600`` trained
    600).  None when the preset's steps are the recipe's, or the ones trained."""
    trained = recipe_steps if steps is None else steps
    if preset_steps in (recipe_steps, trained):
        return None
    name = kind.replace("_", "-")
    if steps is not None:
        what = f"trains {steps:,} steps (--steps) with the checkpoint's recipe"
    elif kind == "lds":
        what = f"trains with the checkpoint's recipe ({recipe_steps:,} steps, scaled by the subset fraction)"
    else:
        what = f"trains with the checkpoint's recipe ({recipe_steps:,} steps, pass --steps to train fewer)"
    return f"{name} {what}; the preset's train.steps = {preset_steps:,} is not used"


def check_image_measurement(measurement: str, num_timesteps: int, queries: str) -> None:
    """A measurement an evaluation can take of its query images: known, and not one that needs a recorded
    sampling trajectory, which ``queries`` (e.g. "the LDS queries") do not have.  Both evaluations refuse it
    before any training (retrain-top trained every model, then failed: QA 48 #3)."""
    from ..model.measurements import measurement_info, parse_measurement

    parse_measurement(measurement, num_timesteps)
    info = measurement_info(measurement)
    if info is not None and info.needs_trajectory:
        raise InvalidSettingError(f"--measurement {measurement}: needs a recorded sampling trajectory, which "
                                  f"{queries} do not have; choose loss, elbo, loss@t=NNN or square-norm")


class TrainingBusyError(RuntimeError):
    """Another live process (or another job of this one) is training into the same run folder."""


@contextlib.contextmanager
def train_lock(out: Path) -> Iterator[None]:
    """Hold the run folder's training lock while the block runs; ``TrainingBusyError`` at once when it is held.

    Two trainers of one folder would waste the CPU twice and write the same files.  The lock is
    ``folder_lock.exclusive`` on ``out/.train-run.lock``, the one ``train`` takes on its --out: a flock, which the
    kernel drops when its process ends (``kill -9`` too), so a rerun resumes.  It replaced a pid file
    (``.train.lock``, now ignored), which refused a folder when a killed run's pid came back as another process's,
    and which two runs could take over together.  A flock is refused to a second take in the same process too:
    nothing inside the block takes this folder's lock again (the models train in sub-folders, each under its own).
    """
    out = Path(out)
    def busy(holder: folder_lock.Holder | None) -> TrainingBusyError:
        return TrainingBusyError(_busy_words(out, holder))

    with folder_lock.exclusive(out / folder_lock.RUN_LOCK, busy=busy):
        yield


def _busy_words(out: Path, holder: folder_lock.Holder | None) -> str:
    """Who trains into ``out``, and what to do: wait, or measure the finished models without training."""
    if holder is None:  # its note not written yet: it took the lock an instant ago
        who = "another process"
    elif holder.is_this_process():  # another thread (an app's jobs)
        who = "another job of this process"
    else:
        who = f"process {holder.pid}{holder.where()} (started {holder.since()})"
    return f"{who} is training into {out}; evaluate the finished models with --no-train, or wait for it"


# --- what a run may write where (QA 48 #1 and #7) ----------------------------------------------------------
# What an evaluation may write where: its folders checked up front, and a results record replaced only by a
# run of the same settings (QA 48 #1 and #7).
#
# Why: the results files are named by preset and measurement only (``lds_<preset>_<measurement>.json``,
# ``retrain_top_<preset>.json``, ``group_retrain_<preset>.json``), and ``--results`` defaults to the tracked
# ``assets/results``; a trial run at other settings (K = 5, Q = 4) silently replaced the record README cites and
# the app's Evaluation tab reads.  Each command now says, before any training, which settings it would write, and
# refuses a record that holds other ones, unless told ``--replace-results``.  A rerun with the same settings
# (resume, repeat) writes as before.  A record written before a setting was kept lacks it: that setting is
# "unknown" there and compared with nothing (only the stored settings that differ refuse).
#
# An unwritable ``--out`` or ``--results`` was a bare ``[Errno 2]`` (``--results`` only after the training and
# scoring): ``check_writable_folder`` says it first, naming the option, as the cache root's check does.

REPLACE_FLAG = "--replace-results"


class ResultsSettingsError(InvalidSettingError):
    """The results file this run would write holds a record made with other settings."""


def check_writable_folder(folder: str | Path, flag: str) -> None:
    """Refuse a folder no file can be made in (a read-only mount, ``/proc``, below a file), naming ``flag``,
    before the work that fills it.  A missing folder is fine when its nearest existing parent is writable."""
    folder = Path(folder)
    where = nearest_existing_folder(folder, f"{flag} {folder}", error=InvalidSettingError)
    if not can_create_in(where):
        why = "" if where == folder else f": nothing can be created in {where}"
        raise InvalidSettingError(f"{flag} {folder} is not writable{why}; choose a writable folder ({flag} DIR)")


def _same(old: Any, new: Any) -> bool:
    if isinstance(old, bool) or isinstance(new, bool):
        return old == new
    if isinstance(old, (int, float)) and isinstance(new, (int, float)):
        return math.isclose(float(old), float(new), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return len(old) == len(new) and all(_same(a, b) for a, b in zip(old, new, strict=True))
    return old == new


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def differing(stored: dict[str, Any], planned: dict[str, Any]) -> list[str]:
    """'name OLD there, NEW here' for each setting both hold (stored not None) that differs; a dict setting (the
    attribution settings) is compared key by key over the keys both hold."""
    out: list[str] = []
    for name, new in planned.items():
        old = stored.get(name)
        if old is None or new is None:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            out += [f"{name}.{k} {_show(old[k])} there, {_show(new[k])} here" for k in old
                    if k in new and old[k] is not None and new[k] is not None and not _same(old[k], new[k])]
        elif not _same(old, new):
            out.append(f"{name} {_show(old)} there, {_show(new)} here")
    return out


def check_results_record(
    path: str | Path,
    planned: dict[str, Any],
    stored_settings: Callable[[dict[str, Any]], dict[str, Any]],
    replace: bool = False,
) -> None:
    """Refuse (``ResultsSettingsError``) when ``path`` holds a record whose settings (``stored_settings(record)``)
    differ from this run's ``planned`` ones; ``replace`` (``--replace-results``) allows it.  A missing or
    unreadable file is no record: the run writes it."""
    path = Path(path)
    if replace or not path.is_file():
        return
    try:
        record = json.loads(path.read_text())
        stored = stored_settings(record) if isinstance(record, dict) else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return
    diffs = differing(stored, planned)
    if diffs:
        raise ResultsSettingsError(
            f"{path} holds a result made with other settings ({'; '.join(diffs)}); write this run's results "
            f"elsewhere with --results DIR, or pass {REPLACE_FLAG} to replace it")


def sorted_names(names: Any) -> list[str] | None:
    """A list of names as compared (sorted, unique); None for none (an unknown setting)."""
    out = sorted({str(n) for n in names or ()})
    return out or None


def base_method(name: str) -> str:
    """``kfac[loss]`` and ``kfac@1e-05`` -> ``kfac``: the method an LDS record's entry belongs to."""
    return name.split("@", 1)[0].split("[", 1)[0]


def load_queries_file(path: Path) -> dict[str, Any]:
    """An LDS run's ``queries.pt`` read without unpickling code (tensors and strings only, ``engine.safe_load``)."""
    from ..safe_load import load_plain_state

    return load_plain_state(path, f"Delete it and rerun the command; the queries are made again: rm {path}")
