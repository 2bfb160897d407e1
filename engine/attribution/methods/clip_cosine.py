"""CLIP similarity baseline (docs/architecture.md §5): cosine of open_clip image embeddings.

score_i = cos(E(x_q), E(x_i)), E = the CLIP image encoder after CLIP's preprocessing
(3 channels, resized to the encoder's input size, normalised by its mean/std).  A semantic
nearest-neighbour check; not a removal prediction, so it is shown as similarity, never summed.

Weights are never downloaded at run time.  ``resolve_weights`` looks where open_clip itself
would put them, without touching the network:

* ``pretrained`` is a file path: that file (``create_model_and_transforms(model,
  pretrained=<path>)`` loads a local checkpoint; for OpenAI's weights use the
  ``-quickgelu`` model name, e.g. ``ViT-B-32-quickgelu``, since a bare file carries no
  activation setting);
* ``pretrained`` is a tag (``openai``, ``laion2b_s34b_b79k``, ...): open_clip prefers the
  Hugging Face Hub entry of the tag (``timm/vit_base_patch32_clip_224.openai`` for
  ViT-B-32/openai, file ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``),
  stored in the Hub cache (``$HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``), else
  its URL download in ``~/.cache/clip``.  ``huggingface_hub.try_to_load_from_cache``
  checks the former offline; the file found is then passed to open_clip as a path, with
  the tag's QuickGELU and normalisation settings;
* ``pretrained`` is None: random initialisation, seeded by ``config.seed`` (tests).

When nothing is found the method reports ``Unavailable`` with instructions.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...config import AttributionConfig
from ..context import EngineContext
from . import register
from .base import AttributionMethod, FixedScores, Prepared, Progress, QueryInput, Unavailable, no_progress

FORMAT = 1


@dataclass
class ClipWeights:
    """Where the weights are (None: random init) and the tag's own preprocessing/activation settings."""

    path: str | None
    quick_gelu: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    searched: list[str] = field(default_factory=list)
    trusted_jit: bool = False  # OpenAI's TorchScript archive from open_clip's URL cache


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - huggingface_hub is an open_clip dependency
        return os.path.expanduser("~/.cache/huggingface/hub")


def enable_hint(model_name: str, pretrained: str, repo: str | None) -> str:
    where = (
        f"the Hugging Face cache folder {_hf_cache_dir()}/models--{repo.replace('/', '--')}"
        if repo
        else "open_clip's download folder ~/.cache/clip"
    )
    return (
        f'to enable: on a machine with internet run `python -c "import open_clip; '
        f"open_clip.create_model_and_transforms('{model_name}', pretrained='{pretrained}')\"` and copy "
        f"{where} to the same place here (or point HF_HUB_CACHE/HF_HOME at a copy); or set "
        f"AttributionConfig.clip_pretrained to the path of a local checkpoint file "
        f"(.safetensors/.bin/.pt; for OpenAI weights use model '{model_name}-quickgelu')"
    )


def resolve_weights(model_name: str, pretrained: str | None, cache_dir: str | None = None) -> ClipWeights:
    """Find CLIP weights on this machine without any network access; ``Unavailable`` if absent."""
    import open_clip

    name = model_name.replace("/", "-")
    if open_clip.get_model_config(name) is None:
        raise Unavailable(
            f"open_clip has no model called {model_name!r}; known models include "
            f"{', '.join(open_clip.list_models()[:8])}, ..."
        )
    if pretrained is None or str(pretrained).lower() in ("", "none", "random"):
        return ClipWeights(path=None)
    expanded = os.path.expanduser(str(pretrained))
    if os.path.isfile(expanded):
        return ClipWeights(path=expanded, searched=[expanded])
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise Unavailable(
            f"CLIP weights {pretrained!r} for {model_name}: neither a file on this machine nor a known "
            f"tag (tags: {', '.join(tags) or 'none'})"
        )
    settings = dict(
        quick_gelu=bool(cfg.get("quick_gelu", False)),
        mean=tuple(cfg["mean"]) if cfg.get("mean") else None,
        std=tuple(cfg["std"]) if cfg.get("std") else None,
    )
    searched: list[str] = []
    repo = None
    if cfg.get("file"):
        searched.append(cfg["file"])
        if os.path.isfile(cfg["file"]):
            return ClipWeights(path=cfg["file"], searched=searched, **settings)
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache
        from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

        hub = cfg["hf_hub"]  # "org/repo/filename" or "org/repo/" (default file names)
        repo, filename = (hub[:-1], "") if hub.endswith("/") else os.path.split(hub)
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for fn in names:
            searched.append(f"hf:{repo}/{fn}")
            found = try_to_load_from_cache(repo, fn, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return ClipWeights(path=found, searched=searched, **settings)
    if cfg.get("url"):
        target = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        searched.append(target)
        if os.path.isfile(target):
            return ClipWeights(
                path=target, searched=searched, trusted_jit="openaipublic" in cfg["url"], **settings
            )
    raise Unavailable(
        f"CLIP weights for {model_name}/{pretrained} are not on this machine (nothing is downloaded at run "
        f"time; looked for {', '.join(searched)}); " + enable_hint(model_name, str(pretrained), repo)
    )


def to_clip_input(images: torch.Tensor, size: int | tuple[int, int], mean: Any, std: Any) -> torch.Tensor:
    """[-1, 1] images (B, 1|3, H, W) -> CLIP input: [0, 1], 3 channels, bicubic resize, normalised."""
    x = (images.float() + 1.0) / 2.0
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise ValueError(f"CLIP needs grey or RGB images, got {x.shape[1]} channels")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) != hw:
        x = F.interpolate(x, size=hw, mode="bicubic", align_corners=False, antialias=True)
    x = x.clamp(0.0, 1.0)
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


@register
class CLIPCosine(AttributionMethod):
    """Cosine similarity of CLIP image embeddings; training embeddings cached in the store."""

    name = "clip"
    order = 30
    title = "CLIP similarity"
    kind = "similarity"
    caption = "How alike the images look to a CLIP image model (cosine of embeddings); a semantic nearest-neighbour check, not influence."
    needs_gradient = False
    config_fields = ("clip_model", "clip_pretrained")
    batch_size = 64

    def __init__(self, config: AttributionConfig | None = None):
        super().__init__(config)
        self._model: tuple[str, Any, dict[str, Any]] | None = None
        self._embeddings: dict[str, torch.Tensor] = {}

    # --- settings -----------------------------------------------------------------------

    @staticmethod
    def _names(ctx: EngineContext) -> tuple[str, str | None]:
        return str(ctx.config.clip_model), ctx.config.clip_pretrained

    def settings(self, ctx: EngineContext) -> dict[str, Any]:
        import open_clip

        model_name, pretrained = self._names(ctx)
        cfg = open_clip.get_model_config(model_name.replace("/", "-"))
        arch = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12] if cfg else None
        s: dict[str, Any] = {
            "format": FORMAT,
            "method": self.name,
            "model": model_name,
            "model_config": arch,
            "pretrained": pretrained,
            "num_train": len(ctx.dataset),
        }
        if pretrained and os.path.isfile(os.path.expanduser(str(pretrained))):
            st = Path(os.path.expanduser(str(pretrained))).stat()
            s["weights_file"] = {"size": st.st_size, "mtime": int(st.st_mtime)}
        if pretrained is None or str(pretrained).lower() in ("", "none", "random"):
            s["init_seed"] = int(ctx.config.seed)
        return s

    def availability(self, ctx: EngineContext) -> tuple[bool, str | None]:
        try:
            resolve_weights(*self._names(ctx))
        except Unavailable as e:
            return False, str(e)
        except Exception as e:  # availability must never crash the app
            return False, f"CLIP cannot be loaded: {e}"
        return True, None

    def is_built(self, ctx: EngineContext) -> bool:
        try:
            return ctx.store.exists(self.name, self.settings(ctx))
        except Exception:
            return False

    def cache_keys(self, ctx: EngineContext) -> list[tuple[str, dict[str, Any]]]:
        return [(self.name, self.settings(ctx))]

    # --- model --------------------------------------------------------------------------

    def load_model(self, ctx: EngineContext) -> tuple[Any, dict[str, Any]]:
        """(model in eval mode, preprocessing {size, mean, std}); ``Unavailable`` when the weights are absent."""
        import open_clip

        model_name, pretrained = self._names(ctx)
        key = f"{model_name}|{pretrained}|{ctx.config.seed}|{ctx.device}"
        if self._model is not None and self._model[0] == key:
            return self._model[1], self._model[2]
        w = resolve_weights(model_name, pretrained)
        kwargs: dict[str, Any] = {"device": ctx.device}
        if w.quick_gelu:
            kwargs["force_quick_gelu"] = True
        if w.mean is not None:
            kwargs.update(image_mean=w.mean, image_std=w.std)
        if w.trusted_jit:
            kwargs["weights_only"] = False
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(ctx.config.seed))
            model, _, _ = open_clip.create_model_and_transforms(
                model_name, pretrained=w.path, pretrained_text=False, **kwargs
            )
        model.eval()
        pp = getattr(model.visual, "preprocess_cfg", {})
        prep = {
            "size": pp.get("size", model.visual.image_size),
            "mean": tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            "std": tuple(pp.get("std", open_clip.OPENAI_DATASET_STD)),
        }
        self._model = (key, model, prep)
        return model, prep

    @torch.no_grad()
    def embed(self, ctx: EngineContext, images: torch.Tensor, progress: Progress = no_progress) -> torch.Tensor:
        """Unit-norm CLIP embeddings (B, d) of [-1, 1] images, float32 on the CPU."""
        model, prep = self.load_model(ctx)
        out = []
        for s in range(0, images.shape[0], self.batch_size):
            x = to_clip_input(images[s : s + self.batch_size].cpu(), prep["size"], prep["mean"], prep["std"])
            out.append(model.encode_image(x.to(ctx.device), normalize=True).float().cpu())
            progress(
                f"{self.title}: embedded {min(s + self.batch_size, images.shape[0])}/{images.shape[0]}",
                min(1.0, (s + self.batch_size) / images.shape[0]),
            )
        return torch.cat(out)

    # --- life cycle ---------------------------------------------------------------------

    def build(self, ctx: EngineContext, progress: Progress = no_progress) -> None:
        settings = self.settings(ctx)
        if not ctx.store.exists(self.name, settings):
            t0 = time.perf_counter()
            emb = self.embed(ctx, ctx.dataset.images, progress)
            ctx.store.save_arrays(
                self.name, settings, {"embeddings": emb}, meta={"build_seconds": time.perf_counter() - t0}
            )
        self._train_embeddings(ctx)
        progress(f"{self.title}: built", 1.0)

    def _train_embeddings(self, ctx: EngineContext) -> torch.Tensor:
        settings = self.settings(ctx)
        key = str(ctx.store.path(self.name, settings))
        if key not in self._embeddings:
            arrays = ctx.store.load_arrays(self.name, settings)
            if arrays is None:
                raise RuntimeError(f"{self.title} is not built yet: call build() first")
            self._embeddings[key] = torch.from_numpy(np.array(arrays["embeddings"]))
        return self._embeddings[key]

    def query_measurement(self, measurement: Any) -> None:
        return None

    def prepare(self, ctx: EngineContext, query: QueryInput, query_grad: torch.Tensor | None = None) -> Prepared:
        if query.image is None:
            raise ValueError("CLIP similarity needs a query image")
        t0 = time.perf_counter()
        train = self._train_embeddings(ctx)
        q = self.embed(ctx, query.image[None])[0]
        t1 = time.perf_counter()
        scores = (train @ q).clamp(-1.0, 1.0).numpy().astype(np.float32)  # cosine; rounding can exceed 1
        return FixedScores(
            scores=scores, timing_ms={"embed": (t1 - t0) * 1e3, "similarity": (time.perf_counter() - t1) * 1e3}
        )

    def score(self, prepared: Prepared, damping: float | None = None) -> np.ndarray:
        assert isinstance(prepared, FixedScores)
        return prepared.scores
