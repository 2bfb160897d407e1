"""CLIP similarity with a tiny randomly initialised open_clip model; missing weights -> unavailable."""

from __future__ import annotations

import dataclasses
import json
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine.attribution.methods import make_method
from engine.attribution.methods.base import QueryInput, Unavailable
from engine.attribution.methods.clip_cosine import CLIPCosine, resolve_weights, to_clip_input
from engine.attribution.store import Store
from engine.config import AttributionConfig

open_clip = pytest.importorskip("open_clip")

TINY_NAME = "engine-test-tiny-clip"
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    """Register a tiny model config with open_clip (its documented ``add_model_config``)."""
    path = tmp_path_factory.mktemp("clipcfg") / f"{TINY_NAME}.json"
    path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(path)
    assert TINY_NAME in open_clip.list_models()
    return TINY_NAME


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _ctx(tmp_path, dataset, config):
    return SimpleNamespace(
        dataset=dataset,
        device=torch.device("cpu"),
        config=config,
        checkpoint_hash="0011223344556677",
        store=Store(tmp_path / "cache", "0011223344556677", "digits-64"),
    )


def test_tiny_clip_ranks_exact_copy_first(tmp_path, digits_small, tiny_clip, no_network):
    config = AttributionConfig(clip_model=tiny_clip, clip_pretrained=None)
    ctx = _ctx(tmp_path, digits_small, config)
    method = make_method("clip", config)
    assert (method.name, method.title, method.kind) == ("clip", "CLIP similarity", "similarity")
    assert method.availability(ctx) == (True, None)
    assert not method.is_built(ctx)
    method.build(ctx)
    assert method.is_built(ctx)
    emb = ctx.store.load_arrays("clip", method.settings(ctx))["embeddings"]
    assert emb.shape == (64, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    for i in (3, 40):
        scores = method.score(method.prepare(ctx, QueryInput(image=digits_small.images[i].clone()), None))
        assert scores.dtype == np.float32 and scores.shape == (64,)
        assert int(np.argmax(scores)) == i
        np.testing.assert_allclose(scores[i], 1.0, atol=1e-5)
    assert scores.min() < 0.999  # the random encoder does separate images
    # same seed -> same random model -> a fresh instance reuses the cache and agrees
    other = CLIPCosine(config)
    assert other.is_built(ctx)
    q = QueryInput(image=digits_small.images[7])
    np.testing.assert_allclose(
        other.score(other.prepare(ctx, q, None)),
        method.score(method.prepare(ctx, q, None)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_local_checkpoint_file_is_loaded(tmp_path, digits_small, tiny_clip, no_network):
    torch.manual_seed(5)
    model = open_clip.create_model(tiny_clip, pretrained=None)
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    config = AttributionConfig(clip_model=tiny_clip, clip_pretrained=str(path))
    method = CLIPCosine(config)
    ctx = _ctx(tmp_path, digits_small, config)
    assert method.availability(ctx) == (True, None)
    loaded, prep = method.load_model(ctx)
    want, got = model.state_dict(), loaded.state_dict()
    assert list(want) == list(got)
    for n in want:
        assert torch.equal(want[n], got[n]), n
    assert prep["size"] in (32, (32, 32))


def test_missing_weights_are_unavailable_not_a_crash(tmp_path, digits_small, monkeypatch, no_network):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~/.cache/clip
    config = AttributionConfig()  # the default: ViT-B-32 / openai
    ctx = _ctx(tmp_path, digits_small, config)
    method = make_method("clip", config)
    ok, reason = method.availability(ctx)
    assert not ok
    assert "CLIP weights for ViT-B-32/openai are not on this machine" in reason
    assert "to enable" in reason and "timm/vit_base_patch32_clip_224.openai" in reason
    assert not method.is_built(ctx)
    with pytest.raises(Unavailable, match="not on this machine"):
        method.build(ctx)
    bad = dataclasses.replace(config, clip_pretrained="no-such-tag")
    ok, reason = CLIPCosine(bad).availability(_ctx(tmp_path, digits_small, bad))
    assert not ok and "no-such-tag" in reason
    with pytest.raises(Unavailable, match="no model called"):
        resolve_weights("No-Such-Model", None)


def test_preprocessing_grey_to_rgb():
    x = torch.full((2, 1, 8, 8), 1.0)
    x[1] = -1.0
    out = to_clip_input(x, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out[0], torch.full((3, 32, 32), 2.0))
    torch.testing.assert_close(out[1], torch.full((3, 32, 32), -2.0))


def test_weights_found_in_hf_cache_without_network(tmp_path, monkeypatch, no_network):
    """The place the 'to enable' message names is where resolve_weights looks (offline)."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf"
    repo = cache / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap / "open_clip_model.safetensors").write_bytes(b"stub")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    w = resolve_weights("ViT-B-32", "openai")
    assert w.path == str(snap / "open_clip_model.safetensors")
    assert w.quick_gelu  # OpenAI's weights were trained with QuickGELU
    assert w.mean == tuple(open_clip.OPENAI_DATASET_MEAN)
