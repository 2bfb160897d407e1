"""Checkpoints: safetensors weights + a JSON config, and a content hash used as cache key.

A checkpoint is a folder holding ``model.safetensors`` (the model used for sampling and
attribution: the EMA weights when EMA is on) and ``config.json`` (the preset: model,
diffusion, data, training recipe, seed; plus ``extra`` such as the training subset).

The weights file records the SHA-256 of its tensor data in its own header (safetensors metadata,
``DATA_DIGEST``), and loading checks it: safetensors checks the header but not the data, so flipped bytes
in the data loaded as a silently different model (QA 16). Files written before 2026-12-05 (the shipped
digits and mnist weights among them) carry no digest and load unchecked; adding one would change their
content hash, which keys every cache and result of theirs.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Preset
from ..files import atomic_torch_save, atomic_write_bytes  # noqa: F401 - atomic_torch_save: re-exported
from ..validation import one_line
from .unet import build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
DATA_DIGEST = "data_sha256"  # the weights file's metadata key: SHA-256 of the bytes after its header


class CheckpointError(ValueError):
    """Missing or unreadable checkpoint; the message names the file."""


def save_checkpoint(
    folder: str | Path, model: nn.Module, preset: Preset, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model``'s weights (safetensors, with the digest of their data) and ``config.json`` (the preset and
    ``extra``) into ``folder``, each atomically; returns the folder."""
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    cfg = {"preset": preset.to_dict(), "extra": extra or {}}
    # the config first, the weights last: a run counts as finished when its weights exist, so a kill
    # between the two writes must leave a config without weights (trained again), never the reverse
    atomic_write_bytes(folder / CONFIG, json.dumps(cfg, indent=2, sort_keys=True).encode())
    atomic_write_bytes(folder / WEIGHTS, weights_with_digest(state))
    return folder


def _split_safetensors(blob: bytes | memoryview) -> tuple[dict[str, Any], memoryview]:
    """(the header's JSON, the tensor data after it) of safetensors bytes: an 8-byte little-endian header
    length, the header, then the data."""
    view = memoryview(blob)
    n = int.from_bytes(view[:8], "little")
    return json.loads(bytes(view[8 : 8 + n])), view[8 + n :]


def weights_with_digest(state: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes of ``state`` whose metadata holds the SHA-256 of its tensor data. The data's bytes do
    not depend on the metadata (tensor offsets count from the data's start), which is checked."""
    from safetensors.torch import save

    _, data = _split_safetensors(save(state))
    blob = save(state, metadata={DATA_DIGEST: hashlib.sha256(data).hexdigest()})
    assert _split_safetensors(blob)[1] == data  # the same tensor bytes: the digest holds for this file
    return blob


def check_weights_digest(path: Path, blob: bytes) -> None:
    """CheckpointError when the weights file ``path``, whose bytes are ``blob``, records a digest of its data
    (``weights_with_digest``) that its data no longer have; files without one are not checked."""
    header, data = _split_safetensors(blob)  # parsed by safetensors already: a well-formed header
    recorded = (header.get("__metadata__") or {}).get(DATA_DIGEST)
    if recorded is not None and hashlib.sha256(data).hexdigest() != recorded:
        raise CheckpointError(
            f"weights {path} are corrupt: their data's SHA-256 differs from the one recorded when they were "
            "saved (train again into a new folder, or restore the file)"
        )


def read_config(folder: str | Path) -> tuple[Preset, dict[str, Any]]:
    """(the preset, the ``extra`` record) of the checkpoint in ``folder``, without loading its weights;
    CheckpointError naming the folder when the file is missing, the file when it is not a checkpoint's config."""
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {folder}: expected our {CONFIG} and {WEIGHTS} (from `train`), or a diffusers "
            "UNet2DModel (its config.json and weights, or a pipeline folder with unet/)"
        )
    try:
        cfg = json.loads(path.read_text())
        if not isinstance(cfg, dict) or "preset" not in cfg:  # a bare KeyError said only "'preset'" (QA 26 #6)
            raise ValueError("it has no \"preset\" entry (the settings `train` writes there)")
        return Preset.from_dict(cfg["preset"], strict=False), cfg.get("extra", {})
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"unreadable checkpoint config {path}: {e}") from e


def recorded_preset(folder: str | Path) -> Preset | None:
    """The preset a checkpoint folder says it is attributed with, read without its weights; None when it says none
    (a diffusers folder without ``attribution_preset.json``) or there is no checkpoint there to read.

    Why: a command run with ``--checkpoint`` and no ``--preset`` took the default preset's (digits') attribution
    settings for any model: a model trained from a preset file with ``mc_samples`` 8, or diffusers weights whose
    ``attribution_preset.json`` sets them, were attributed with digits' M = 64 (QA 33). The attribution settings
    come from here instead (``attribution_source``). A shipped checkpoint (``assets/<preset>``) gives its preset as
    this code defines it (its recorded copy may predate a settings change the shipped caches were built with); any
    other folder its recorded settings, whatever its preset's name (QA 34: a preset file named "digits" with M = 8
    was read as the shipped digits, M = 64)."""
    from ..config import PRESETS
    from ..paths import ASSETS

    folder = Path(folder)
    try:
        if _is_diffusers_folder(folder):
            side = folder / "attribution_preset.json"
            return side_preset(side) if side.is_file() else None
        preset, _ = read_config(folder)
    except CheckpointError:
        return None  # no checkpoint (yet) or an unreadable one: the command that loads it says so
    shipped = preset.name in PRESETS and folder.resolve() == (ASSETS / preset.name).resolve()
    return PRESETS[preset.name] if shipped else preset


def preset_words(folder: str | Path, name: str) -> str:
    """``checkpoint F was trained as preset 'n'``, or, for diffusers weights, which record no training preset,
    ``checkpoint F's attribution_preset.json names preset 'n'`` (QA 34 #9)."""
    if (Path(folder) / "attribution_preset.json").is_file() and _is_diffusers_folder(Path(folder)):
        return f"checkpoint {folder}'s attribution_preset.json names preset '{name}'"
    return f"checkpoint {folder} was trained as preset '{name}'"


def describe_data(preset: Preset) -> str:
    """``cifar2 data (32x32x3)``: the kind and shape of a preset's training images, for messages."""
    d = preset.data
    shape = f" ({d.image_size}x{d.image_size}x{d.channels})" if d.image_size else ""
    return f"{d.name} data{shape}"


def attribution_source(folder: str | Path | None, caller: Preset, named: bool) -> tuple[Preset, str | None]:
    """The preset whose attribution settings a command uses on checkpoint ``folder``, and a note for the user when
    the choice is worth saying. ``named``: the caller named its preset (``--preset``); its settings are then used,
    with a note when the checkpoint says it was trained as another preset. Otherwise the checkpoint's own
    (``recorded_preset``), falling back to the caller's default."""
    recorded = None if folder is None else recorded_preset(folder)
    if recorded is None:
        return caller, None
    if not named:
        return recorded, None
    if recorded.name != caller.name and recorded.attribution != caller.attribution:
        return caller, (f"{preset_words(folder, recorded.name)}; its attributions use "
                        f"--preset {caller.name}'s attribution settings, which differ "
                        f"(omit --preset to use the checkpoint's own)")
    return caller, None


def load_checkpoint(
    folder: str | Path, device: torch.device | str = "cpu", wanted: Preset | None = None
) -> tuple[nn.Module, Preset, dict[str, Any]]:
    """Load (model in eval mode, preset, extra).  A diffusers folder is wrapped (see below); ``wanted``, the
    caller's preset, gives it the data it names none of (``diffusers_data``), so every command that loads
    one reads the same data.  Our checkpoints name their own."""
    from safetensors.torch import load

    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if _is_diffusers_folder(folder):
        model, preset, extra = load_diffusers(folder, device)
        return model, preset if wanted is None else diffusers_data(preset, wanted, extra), extra
    if (folder / "unet").is_dir() or (folder / "model_index.json").is_file():
        raise CheckpointError(
            f"{folder} looks like a diffusers pipeline but {folder / 'unet' / 'config.json'} is missing "
            "(save the pipeline again, or copy the UNet's config.json there)"
        )
    preset, extra = read_config(folder)
    path = folder / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"missing weights {path}")
    blob = path.read_bytes()  # read once: parsed here, and its data checked against the recorded digest
    try:
        state = load(blob)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"unreadable weights {path}: {e}") from e
    check_weights_digest(path, blob)
    model = build_model(preset.model)
    problem = state_mismatch(model.state_dict(), state)
    if problem:
        raise CheckpointError(f"weights {path} do not match the model in {folder / 'config.json'}: {problem}")
    model.load_state_dict(state)
    return model.to(device).eval(), preset, extra


def state_mismatch(expected: dict, found: dict) -> str | None:
    """One line on how the weights differ from the model a config builds, or None when they fit.  Why: torch's
    own message lists every tensor (QA 26: 112 lines for one changed ``base_channels``); the first difference
    and the counts tell the user which file is wrong."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and tuple(expected[k].shape) != tuple(found[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} tensor(s) of another shape (first: {k} is {list(found[k].shape)} in the weights, "
                     f"{list(expected[k].shape)} in the model)")
    if missing:
        parts.append(f"{len(missing)} missing from the weights (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} the model does not have (first: {unexpected[0]})")
    return "; ".join(parts) + "; was config.json edited, or do the files come from two runs?"


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The files that define a checkpoint: weights and configs, nothing else.

    Our format: ``model.safetensors`` + ``config.json``.  A diffusers folder: the UNet's
    weights and config (in ``unet/`` for a pipeline), the scheduler config and
    ``attribution_preset.json`` when present.  Logs, galleries and resume state are left
    out, so re-running training or sampling does not change the cache key.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if _is_diffusers_folder(folder):
        unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
        files = [
            p
            for p in sorted(unet_dir.iterdir())
            if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name == "config.json")
        ]
        files += [
            p
            for p in (folder / "scheduler" / "scheduler_config.json", folder / "attribution_preset.json")
            if p.is_file()
        ]
        return files
    files = [folder / WEIGHTS, folder / CONFIG]
    for p in files:
        if not p.is_file():
            raise CheckpointError(f"missing checkpoint file {p}")
    return files


def checkpoint_hash(folder: str | Path) -> str:
    """SHA-256 (first 16 hex) of the weights and the canonical configs: the cache key.

    JSON files are hashed after re-serialising with sorted keys, so formatting does not
    matter; weights byte for byte (safetensors output is deterministic for equal tensors).
    """
    folder = Path(folder)
    h = hashlib.sha256()
    for path in checkpoint_files(folder):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0")
        if path.suffix == ".json":
            try:
                canon = json.dumps(json.loads(path.read_text()), sort_keys=True, separators=(",", ":"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"unreadable checkpoint config {path}: {e}") from e
            h.update(canon.encode())
        else:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:16]


# --- diffusers adapter -------------------------------------------------------------


def _is_diffusers_folder(folder: Path) -> bool:
    """A diffusers pipeline folder (``unet/config.json``) or a bare ``UNet2DModel`` folder."""
    return (folder / "unet" / "config.json").is_file() or _is_diffusers_unet(folder)


def _is_diffusers_unet(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("_class_name") == "UNet2DModel"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


class DiffusersEps(nn.Module):
    """Wraps a diffusers ``UNet2DModel`` to the ``eps_theta(x_t, t)`` interface (0-based t)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return self.unet(x, t).sample


DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"  # the stem of a diffusers model's weight files (.safetensors, .bin, shards)


def load_diffusers(
    folder: str | Path, device: torch.device | str = "cpu"
) -> tuple[nn.Module, Preset, dict[str, Any]]:
    """Load a diffusers UNet2DModel folder (or a pipeline folder with ``unet/``).

    The preset is read from ``attribution_preset.json`` beside it when present (refused when its image
    shape or schedule disagrees with the UNet's config or the pipeline's scheduler: ``_check_side_preset``;
    ``extra["preset_file"]`` names it), else built from the UNet's sample size and channels with the
    scheduler's linear schedule (the default T = 1000, betas 1e-4..0.02 for a bare UNet) and an image
    folder for data, which ``diffusers_data`` replaces by the caller's preset's data.
    """
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        raise CheckpointError(
            "loading a diffusers checkpoint needs the extra: pip install -e '.[diffusers]'"
        ) from e
    folder = Path(folder)
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    if (unet_dir / "config.json").is_file() and not any(unet_dir.glob(f"{DIFFUSERS_WEIGHTS}*")):
        # diffusers would print its own "Defaulting to unsafe serialization ... allow_pickle" line and then name a
        # .bin file the user never had (QA 26 #6): say what is missing here, in one line
        raise CheckpointError(f"no weights in {unet_dir}: config.json is there but not {DIFFUSERS_WEIGHTS}.safetensors "
                              "(or .bin); save the UNet with save_pretrained, which writes both")
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:  # no weights file, a broken config, shapes that differ
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"cannot load the diffusers UNet2DModel in {unet_dir}: {first[:200]} (expected "
            "config.json and diffusion_pytorch_model.safetensors there)"
        ) from e
    from ..config import DataConfig, ModelConfig

    size = unet.config.sample_size
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    ch = int(unet.config.in_channels)
    scheduler = folder / "scheduler" / "scheduler_config.json"
    extra: dict[str, Any] = {"diffusers": str(unet_dir)}
    side = folder / "attribution_preset.json"
    if side.is_file():
        preset = side_preset(side)
        _check_side_preset(side, preset, (ch, size), scheduler)
        extra["preset_file"] = str(side)
    else:
        preset = Preset(
            name="diffusers",
            model=ModelConfig(image_size=size, in_channels=ch),
            diffusion=_diffusers_schedule(scheduler),
            data=DataConfig(name="folder", image_size=size, channels=ch, levels=256),
        )
    if unet_dir != folder:
        _say_missing_scheduler(folder, scheduler, preset, side if side.is_file() else None)
    return DiffusersEps(unet).to(device).eval(), preset, extra


def _say_missing_scheduler(folder: Path, scheduler: Path, preset: Preset, side: Path | None) -> None:
    """A warning when a pipeline folder names a scheduler (``model_index.json``, or a ``scheduler/`` folder) whose
    ``scheduler_config.json`` is missing.  Why: the schedule then comes from the default (T = 1000, betas
    1e-4..0.02) or the preset file beside the weights, unchecked, and a user whose scheduler had other betas and
    lost the file attributed under the wrong schedule without a word (QA 54 F7; the checkpoint hash does change,
    so no cache is mixed up)."""
    if scheduler.is_file():
        return
    named = scheduler.parent.is_dir()
    index = folder / "model_index.json"
    if index.is_file():
        try:
            named = named or bool(json.loads(index.read_text()).get("scheduler"))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, OSError):
            pass  # a broken index says nothing either way; diffusers' own loaders would refuse it
    if not named:
        return
    d = preset.diffusion
    whose = f"the one {side.name} sets" if side is not None else "the default linear one"
    warnings.warn(f"{folder} names a scheduler but {scheduler} is missing: the noise schedule is {whose}, T = "
                  f"{d.num_timesteps}, betas {d.beta_start:g}..{d.beta_end:g}; if the weights were trained with "
                  "another, restore the file (the scores depend on the schedule)", stacklevel=2)


def side_preset(side: Path) -> Preset:
    """An ``attribution_preset.json`` read as ``--preset FILE.json`` reads a preset file, the ``{"base": ...}``
    form included (QA 26 #3: the form the README shows for preset files was refused here as an unknown key); a
    relative data folder in it is taken from the checkpoint's folder, which the file travels with."""
    from ..config import preset_file, with_absolute_data_root

    try:
        preset = preset_file(side)
    except ValueError as e:
        said = one_line(e)
        raise CheckpointError(f"unreadable preset: {said}" if str(side) in said else
                              f"unreadable preset {side}: {said}") from e
    return with_absolute_data_root(preset, side.parent)


def _check_side_preset(side: Path, preset: Preset, unet_shape: tuple[int, int], scheduler: Path) -> None:
    """An ``attribution_preset.json`` beside diffusers weights names the data and the attribution settings;
    the UNet's config fixes the image shape and the pipeline's scheduler the noise schedule the weights were
    trained for.  A preset that disagrees with either is refused: it replaced the scheduler's 500 steps
    by 1,000 silently, and a 3-channel 16x16 UNet was attributed against 1-channel 8x8 data until a
    convolution failed (QA round 13)."""
    ch, size = unet_shape
    if (preset.model.in_channels, preset.model.image_size) != (ch, size):
        raise CheckpointError(
            f"{side} describes a model taking {preset.model.in_channels} channels at {preset.model.image_size}x"
            f"{preset.model.image_size}, but the UNet's config takes {ch} at {size}x{size}: set model.in_channels "
            "and model.image_size (and the data's channels and image_size) to the UNet's"
        )
    if scheduler.is_file():
        sched = _diffusers_schedule(scheduler)
        mine = preset.diffusion
        if (sched.num_timesteps, sched.beta_start, sched.beta_end) != (mine.num_timesteps, mine.beta_start, mine.beta_end):
            raise CheckpointError(
                f"{side} sets the noise schedule T = {mine.num_timesteps}, betas {mine.beta_start:g}..{mine.beta_end:g}, "
                f"but the pipeline's {scheduler} has T = {sched.num_timesteps}, betas {sched.beta_start:g}.."
                f"{sched.beta_end:g}, the schedule the weights were trained with: make the preset's diffusion "
                "section match it (or leave it out of the preset file)"
            )


def diffusers_data(ckpt_preset: Preset, wanted: Preset, extra: dict[str, Any] | None) -> Preset:
    """The preset to attribute a diffusers checkpoint with, when no ``attribution_preset.json`` came with it.

    Why: diffusers weights carry no description of the data they were trained on, so the data come from the
    caller's preset (``--preset cifar10 --data-root FOLDER`` for google/ddpm-cifar10-32, say), while the
    model's shape and the noise schedule stay the checkpoint's.  The default preset, digits, takes no data
    folder: with a ``--data-root`` it means an image folder, read at the UNet's size and channels.  Our own
    checkpoints and diffusers folders with a preset file come back unchanged."""
    extra = extra or {}  # a config.json of ours may hold "extra": null
    if not extra.get("diffusers") or extra.get("preset_file"):
        return ckpt_preset
    if wanted.data.name == "digits" and wanted.data.root:
        return ckpt_preset.replace(data={"root": wanted.data.root})
    # named apart from the preset's own model: results files are named by the preset (group-bench would have
    # written over the shipped groups_digits.json)
    return ckpt_preset.replace(name=f"diffusers-{wanted.name}", data=wanted.data)


def _diffusers_schedule(path: Path):
    """DiffusionConfig from a pipeline's ``scheduler_config.json`` (linear betas only), else the default."""
    from ..config import DiffusionConfig

    if not path.is_file():
        return DiffusionConfig()
    try:
        sc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"unreadable scheduler config {path}: {e}") from e
    if sc.get("beta_schedule", "linear") != "linear":
        raise CheckpointError(
            f"{path}: beta_schedule {sc.get('beta_schedule')!r} is not supported (only 'linear', Ho et al. 2020)"
        )
    if sc.get("prediction_type", "epsilon") != "epsilon":
        raise CheckpointError(f"{path}: prediction_type {sc.get('prediction_type')!r} is not supported (only 'epsilon')")
    return DiffusionConfig(
        num_timesteps=int(sc.get("num_train_timesteps", 1000)),
        beta_start=float(sc.get("beta_start", 1e-4)),
        beta_end=float(sc.get("beta_end", 0.02)),
    )
