"""AttributionSession end to end on a tiny checkpoint (trained here) with a tiny cache."""

from __future__ import annotations

import dataclasses
import io
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL

from engine.attribution.methods import method_names
from engine.attribution.session import AttributionSession, QueryError
from engine.config import AttributionConfig, DataConfig, Preset, TrainConfig
from engine.model.checkpoint import CheckpointError
from engine.model.measurements import quantize
from engine.model.sampling import generate
from engine.model.train import train

GRADIENT_METHODS = ["kfac", "trak", "dtrak"]
TINY_ATTRIBUTION = AttributionConfig(mc_samples=4, trak_dim=32, clip_pretrained=None)


def tiny_checkpoint(folder, dataset, gallery: int = 2):
    """A tiny U-Net trained 100 steps on ``dataset``, with a gallery of sampled trajectories."""
    torch.set_num_threads(1)
    preset = Preset(
        name="tiny",
        model=TINY_MODEL,
        data=DataConfig(name="digits"),
        train=TrainConfig(steps=100, batch_size=32, lr=2e-3, log_every=50, checkpoint_every=1000),
        attribution=TINY_ATTRIBUTION,
    )
    train(preset, folder, dataset=dataset, progress=False)
    if gallery:
        from engine.model.checkpoint import load_checkpoint

        model, _, _ = load_checkpoint(folder)
        images, traj = generate(model, preset, gallery, seed=7, trajectory=True)
        np.savez(
            folder / "gallery.npz",
            images=((images.clamp(-1, 1) + 1) / 2).numpy(),
            seeds=np.full(gallery, 7),
            trajectory=traj.numpy(),
            labels=np.arange(gallery),
        )
    return preset


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, digits_small):
    folder = tmp_path_factory.mktemp("tiny_ckpt")
    preset = tiny_checkpoint(folder, digits_small)
    return folder, preset


@pytest.fixture(scope="module")
def session(ckpt, digits_small, tmp_path_factory):
    """A session over 64 digits with every method built (CLIP: small random model if it is cheap)."""
    folder, preset = ckpt
    s = AttributionSession(
        preset,
        checkpoint=folder,
        device="cpu",
        cache_root=tmp_path_factory.mktemp("cache"),
        config=TINY_ATTRIBUTION,
        dataset=digits_small,
    )
    s.build(GRADIENT_METHODS + ["pixel"])
    return s


def test_a_checkpoint_is_refused_on_a_training_set_it_was_not_trained_on(ckpt, digits_small, tmp_path):
    """QA round 12: ``--data-root`` at other images of the same shape attributed the model to images it
    never saw, silently.  The run's recorded content digest (or, for runs from before it, the size of the
    whole set it trained on) is checked when the session opens."""
    import json
    import shutil

    folder, preset = ckpt
    other = dataclasses.replace(digits_small, images=digits_small.images.flip(-1))  # same shape, other images
    with pytest.raises(CheckpointError, match="was not trained on this training set.*content digest"):
        AttributionSession(preset, checkpoint=folder, device="cpu", cache_root=tmp_path, config=TINY_ATTRIBUTION,
                           dataset=other)
    # a checkpoint from before the digest (the shipped weights record only the number of images)
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["extra"]["data_sha"]
    (old / "config.json").write_text(json.dumps(cfg))
    fewer = digits_small.subset(range(40))
    with pytest.raises(CheckpointError, match="all of a 64-image training set; the one loaded has 40"):
        AttributionSession(preset, checkpoint=old, device="cpu", cache_root=tmp_path, config=TINY_ATTRIBUTION,
                           dataset=fewer)
    # a benchmark timing the passes on a subset says so (scripts/bench_busy.py, bench_shared_pass.py)
    AttributionSession(preset, checkpoint=old, device="cpu", cache_root=tmp_path, config=TINY_ATTRIBUTION,
                       dataset=fewer, check_trained_on=False)
    cfg["extra"] = None  # a config.json with "extra": null opened before the check; it still does
    (old / "config.json").write_text(json.dumps(cfg))
    AttributionSession(preset, checkpoint=old, device="cpu", cache_root=tmp_path, config=TINY_ATTRIBUTION,
                       dataset=fewer)
    # the data it was trained on opens, wherever they were read from
    s = AttributionSession(preset, checkpoint=old, device="cpu", cache_root=tmp_path, config=TINY_ATTRIBUTION,
                           dataset=digits_small)
    assert len(s.dataset) == 64


@pytest.mark.parametrize("name", ["digits", "mnist"])
def test_the_shipped_weights_know_their_training_set(name, tmp_path):
    """The shipped weights predate the recorded content digest; ``SHIPPED_TRAINING_SETS`` gives it by checkpoint
    hash.  QA 41: the shipped mnist weights attributed any other set of 1,000 images (the size was all they could
    check) without a word.  Checked against the presets' own data: the shipped set opens, the same number of other
    images (the set mirrored) is refused."""
    from engine.config import get_preset
    from engine.model.checkpoint import checkpoint_hash
    from engine.model.data import load_dataset
    from engine.model.train import SHIPPED_TRAINING_SETS
    from engine.paths import REPO_ROOT

    folder = REPO_ROOT / "assets" / name
    preset = get_preset(name)
    data = load_dataset(preset.data)
    assert SHIPPED_TRAINING_SETS[checkpoint_hash(folder)] == data.content_digest()
    opened = AttributionSession(preset, checkpoint=folder, device="cpu", cache_root=tmp_path, dataset=data)
    assert len(opened.dataset) == len(data)
    other = dataclasses.replace(data, images=data.images.flip(-1))
    with pytest.raises(CheckpointError, match=f"trained on a training set with content digest "
                                              f"{SHIPPED_TRAINING_SETS[checkpoint_hash(folder)]}"):
        AttributionSession(preset, checkpoint=folder, device="cpu", cache_root=tmp_path, dataset=other)


def test_missing_checkpoint_says_how_to_train(tmp_path):
    with pytest.raises(CheckpointError, match="attribution-engine train --preset digits"):
        AttributionSession("digits", checkpoint=tmp_path / "nothing", device="cpu", cache_root=tmp_path)


def test_train_query_all_methods_share_one_gradient_per_measurement(session, monkeypatch):
    calls, shared = [], []
    original, original_shared = session.query_gradient, session._shared_query_gradients

    def counting(measurement, query, draws):
        calls.append(str(measurement))
        return original(measurement, query, draws)

    def counting_shared(measurements, query, draws):
        shared.append(sorted(str(m) for m in measurements))
        return original_shared(measurements, query, draws)

    monkeypatch.setattr(session, "query_gradient", counting)
    monkeypatch.setattr(session, "_shared_query_gradients", counting_shared)
    q = session.parse_query("train:5")
    assert q.trajectory is None and q.label == int(session.dataset.labels[5])
    res = session.query(q, "loss", methods=GRADIENT_METHODS + ["pixel"])
    # K-FAC and TRAK share the loss gradient; D-TRAK asks for the square norm; pixel for none;
    # the two gradients come from one shared forward pass
    assert calls == [] and shared == [["loss", "square-norm"]]
    # ... and equal the separate gradients: scores as with one call per measurement
    for name in ("kfac", "dtrak"):
        alone = session.query(q, "loss", methods=[name])
        np.testing.assert_allclose(res.methods[name].scores, alone.methods[name].scores, rtol=1e-4,
                                   atol=1e-6 * float(np.abs(alone.methods[name].scores).max()))
    assert calls == ["loss", "square-norm"] and len(shared) == 1  # one method alone: no shared pass
    n = len(session.dataset)
    for name in GRADIENT_METHODS + ["pixel"]:
        r = res.methods[name]
        assert r.status == "ok", (name, r.reason)
        assert r.scores.shape == (n,) and r.scores.dtype == np.float32
        assert np.isfinite(r.scores).all()
        assert {"gradient", "prepare", "score"} <= set(r.timing_ms)
    assert res.methods["kfac"].damping == pytest.approx(TINY_ATTRIBUTION.kfac_damping)
    assert res.methods["pixel"].damping is None
    # the query itself is its own nearest pixel neighbour
    assert res.methods["pixel"].top(1)[0].index == 5
    assert res.query["spec"] == "train:5" and res.query["label"] == q.label
    assert res.timing_ms["total"] >= res.timing_ms["gradients"] > 0
    out = res.to_json(3, session.labels)
    assert len(out["methods"]["kfac"]["top"]) == 3 and out["methods"]["kfac"]["top"][0]["label"] is not None


def test_common_random_numbers_make_queries_reproducible(session):
    q = session.parse_query("train:9")
    a = session.query(q, "loss", methods=["kfac"]).methods["kfac"].scores
    b = session.query(q, "loss", methods=["kfac"]).methods["kfac"].scores
    np.testing.assert_array_equal(a, b)
    c = session.query(q, "loss", methods=["kfac"], mc_samples=8).methods["kfac"].scores
    assert not np.array_equal(a, c)  # other draws, other estimate


def test_gallery_query_with_trajectory(session, ckpt):
    items = session.gallery()
    assert len(items) == 2
    g = items[1]
    assert g.trajectory.shape == (session.diffusion.T + 1, *session.shape)
    assert g.image.min() >= -1 and g.image.max() <= 1 and g.label == 1
    q = session.parse_query("gallery:1")
    assert q.trajectory is not None and q.label == 1
    res = session.query(q, "trajectory", methods=GRADIENT_METHODS + ["pixel"])
    for name in GRADIENT_METHODS + ["pixel"]:
        assert res.methods[name].status == "ok", (name, res.methods[name].reason)
    assert res.measurement == "trajectory" and res.query["has_trajectory"]
    loss = session.query(q, "loss", methods=["kfac"]).methods["kfac"].scores
    assert not np.allclose(loss, res.methods["kfac"].scores)  # another measurement, other scores
    with pytest.raises(ValueError, match="out of range"):
        session.parse_query("gallery:2")


def test_rescore_changes_damping_without_gradients(session, monkeypatch):
    q = session.parse_query("train:3")
    res = session.query(q, "loss", methods=["kfac", "trak", "pixel"])

    def forbidden(*args, **kwargs):
        raise AssertionError("rescore must not recompute gradients or prepare")

    import engine.attribution.gradients as gradients

    monkeypatch.setattr(gradients, "measurement_grad", forbidden)
    monkeypatch.setattr(session, "query_gradient", forbidden)
    for name in ("kfac", "trak"):
        monkeypatch.setattr(session.method(name), "prepare", forbidden)
    big = {"kfac": 1e-1, "trak": res.methods["trak"].damping * 1e4}
    new = session.rescore(res, big)
    for name in ("kfac", "trak"):
        assert new.methods[name].damping == pytest.approx(big[name])
        assert not np.allclose(new.methods[name].scores, res.methods[name].scores)
        assert "score" in new.methods[name].timing_ms
    np.testing.assert_array_equal(new.methods["pixel"].scores, res.methods["pixel"].scores)
    # the first answer's times are kept, and the re-scoring's is a time, not a flag (QA 28 #1: "rescore 1.0 ms")
    assert {k: v for k, v in new.timing_ms.items() if k != "rescore"} == res.timing_ms
    # a method's "score" stays the first answer's pass, and its re-scoring is "rescore" beside it (QA 64 F6: a grid
    # lookup's 0.05 ms replaced the pass's time under "score = one pass over all training images")
    for name in ("kfac", "trak"):
        assert new.methods[name].timing_ms["score"] == res.methods[name].timing_ms["score"]
        assert new.methods[name].timing_ms["rescore"] >= 0.0
        assert {k: v for k, v in new.methods[name].timing_ms.items() if k != "rescore"} == res.methods[name].timing_ms
    assert 0.0 < new.timing_ms["rescore"] < 60_000.0 and new.timing_ms["rescore"] != 1.0
    back = session.rescore(new, {"kfac": res.methods["kfac"].damping, "trak": res.methods["trak"].damping})
    for name in ("kfac", "trak"):
        np.testing.assert_allclose(back.methods[name].scores, res.methods[name].scores, rtol=1e-5, atol=1e-12)
    # a damping for a method that takes none is refused, not dropped under a result that looks re-scored (QA 70
    # F8.3: the CLI's --damping refused it, the Python API returned pixel's scores unchanged)
    with pytest.raises(ValueError, match=r"^pixel has no damping"):
        session.rescore(res, {"kfac": 1e-1, "pixel": 1.0})
    np.testing.assert_array_equal(session.rescore(res, {"pixel": None}).methods["pixel"].scores,
                                  res.methods["pixel"].scores)  # None: no damping asked, nothing refused


def test_trajectory_measurement_needs_a_trajectory(session):
    with pytest.raises(ValueError, match="trajectory"):
        session.query(session.parse_query("train:1"), "trajectory", methods=["kfac"])


def test_bad_query_specs(session, tmp_path):
    with pytest.raises(ValueError, match="no image file"):
        session.parse_query(f"image:{tmp_path / 'missing.png'}")
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not a readable"):
        session.parse_query(f"image:{bad}")
    for spec in ("bogus:1", "train", "train:x", "train:64"):
        with pytest.raises(ValueError):
            session.parse_query(spec)
    with pytest.raises(ValueError, match="unknown method"):
        session.query(session.parse_query("train:0"), methods=["nope"])
    with pytest.raises(ValueError, match="unknown measurement"):
        session.query(session.parse_query("train:0"), "likelihood", methods=["pixel"])


def test_upload_non_image_is_rejected(session):
    with pytest.raises(ValueError, match="not a readable"):
        session.query_from_upload(b"%PDF-1.4 definitely not a picture")
    with pytest.raises(ValueError, match="empty"):
        session.query_from_upload(b"")


def test_upload_png_is_converted_to_model_space(session, tmp_path):
    from PIL import Image

    # a dark "1" on a white 28x28 RGB canvas: must become a light-on-dark 8x8 grey digit
    arr = np.full((28, 28, 3), 255, dtype=np.uint8)
    arr[4:24, 11:17] = 0
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    q = session.query_from_upload(buf.getvalue(), name="one.png")
    assert q.image.shape == (1, 8, 8)
    assert q.image.min() >= -1 and q.image.max() <= 1
    torch.testing.assert_close(q.image, quantize(q.image, 17))  # on the 17-level grid
    notes = " | ".join(q.notes)
    for part in ("converted RGB -> grey", "resized 28x28 -> 8x8", "values mapped to [-1, 1]", "inverted", "17-level"):
        assert part in notes, notes
    assert q.image[0, 4, 3:5].mean() > 0.4 and q.image[0, 0, 0] == -1  # stroke bright, corner dark
    # the digits classifier's label comes with its probability: an upload can be anything
    import re

    said = re.search(r"label (\d) predicted by a classifier with probability ([01]\.\d\d), not ground truth", notes)
    assert said and int(said[1]) == q.label and 0.1 <= float(said[2]) <= 1.0, notes
    path = tmp_path / "one.jpg"
    Image.fromarray(arr, "RGB").save(path)
    qf = session.parse_query(f"image:{path}")
    assert qf.description == f"image:{path}" and qf.image.shape == (1, 8, 8)
    res = session.query(q, "loss", methods=["pixel", "kfac"])
    assert res.methods["pixel"].status == "ok" and res.methods["kfac"].status == "ok"


def test_unbuilt_methods_are_unavailable_with_instructions(ckpt, digits_small, tmp_path):
    folder, preset = ckpt
    s = AttributionSession(
        preset, checkpoint=folder, device="cpu", cache_root=tmp_path, config=TINY_ATTRIBUTION, dataset=digits_small
    )
    st = s.status()
    assert set(st) == set(method_names()) >= {"kfac", "trak", "dtrak", "clip", "pixel"}
    assert not st["kfac"]["built"] and "attribution-engine build" in st["kfac"]["reason"]
    assert st["pixel"]["built"] and st["pixel"]["available"]
    res = s.query(s.parse_query("train:0"), methods=["kfac", "pixel"])
    assert res.methods["kfac"].status == "unavailable"
    # the hint is a command that builds the cache this session reads: its checkpoint, cache root and settings
    hint = res.methods["kfac"].reason
    assert f"attribution-engine build --preset tiny --checkpoint {folder} --cache-root {tmp_path} --methods kfac" in hint
    assert "--mc-samples" not in hint  # the preset's own settings need no flags
    other = AttributionSession(
        preset, checkpoint=folder, device="cpu", cache_root=tmp_path, dataset=digits_small,
        config=dataclasses.replace(TINY_ATTRIBUTION, draws="shared", kfac_factor_draws=2,
                                   kfac_factor_draws_mode="per-example"),
    )
    hint = other.status(["kfac"])["kfac"]["reason"]
    for flag in ("--draws shared", "--kfac-factor-draws 2", "--kfac-factor-draws-mode per-example"):
        assert flag in hint, hint
    assert "--mc-samples" not in other.build_command(["pixel"])  # pixel's cache has no Monte Carlo settings
    # a preset named by its .json path and a --data-root: the printed commands act on the same files
    # (they named the preset's own name, which `--preset` does not know, and dropped the data root)
    import shutil

    bare = tmp_path / "no gallery"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("gallery.npz"))
    json_session = AttributionSession(
        preset.replace(data={"root": str(tmp_path / "my data")}), checkpoint=bare, device="cpu",
        cache_root=tmp_path, config=TINY_ATTRIBUTION, dataset=digits_small, preset_spec="presets/tiny.json",
    )
    named = f"--preset presets/tiny.json --checkpoint '{bare}' --data-root '{tmp_path / 'my data'}'"
    assert json_session.build_command(["kfac"]).startswith(f"attribution-engine build {named} --cache-root")
    with pytest.raises(QueryError, match=re.escape(f"`attribution-engine assets {named}`")):
        json_session.parse_query("gallery:0")
    assert res.methods["pixel"].status == "ok"
    info = s.method_info()
    assert info["kfac"]["kind"] == "influence" and info["pixel"]["kind"] == "similarity"
    assert info["kfac"]["default_damping"] == pytest.approx(1e-8)
    n = len(digits_small)  # TRAK's defaults scale with this training set's size, not digits' 1797
    assert info["trak"]["default_damping"] == pytest.approx(0.1 / n)
    assert info["dtrak"]["default_damping"] == pytest.approx(1.0 / n)


def test_auto_build_and_status(ckpt, digits_small, tmp_path, capsys):
    folder, preset = ckpt
    s = AttributionSession(
        preset,
        checkpoint=folder,
        device="cpu",
        cache_root=tmp_path,
        config=TINY_ATTRIBUTION,
        dataset=digits_small,
        auto_build=True,
    )
    t0 = time.perf_counter()
    res = s.query(s.parse_query("train:2"), methods=["trak"])
    assert res.methods["trak"].status == "ok" and "build" in res.methods["trak"].timing_ms
    assert time.perf_counter() - t0 < 30
    err = capsys.readouterr().err  # a library auto-build shows its progress (it was silent for minutes)
    assert "building trak" in err and "100%" in err, err
    st = s.status()
    assert st["trak"]["built"] and st["trak"]["size_mb"] > 0
    summary = s.build(["trak"])  # already built: a load, recorded with its size
    assert summary["trak"]["status"] == "ok" and summary["trak"]["size_mb"] > 0


def test_auto_build_shares_one_gradient_pass_as_build_does(ckpt, digits_small, tmp_path):
    """A library query with ``auto_build`` on an empty cache builds K-FAC's bank and TRAK from one pass over
    the training gradients, as ``build`` does (it built them one after the other, two passes), and gives
    the same scores as a session on caches made by ``build``."""
    folder, preset = ckpt
    opened = dict(preset=preset, checkpoint=folder, device="cpu", config=TINY_ATTRIBUTION, dataset=digits_small)
    auto = AttributionSession(**opened, cache_root=tmp_path / "auto", auto_build=True)
    res = auto.query(auto.parse_query("train:2"), methods=["kfac", "trak"])
    assert all(r.status == "ok" for r in res.methods.values()), res.methods
    assert auto.caches.recorded_build_sharing("trak") == {"shared_with": "kfac"}
    built = AttributionSession(**opened, cache_root=tmp_path / "built")
    built.build(["kfac", "trak"])
    ref = built.query(built.parse_query("train:2"), methods=["kfac", "trak"])
    for name in ("kfac", "trak"):
        np.testing.assert_array_equal(res.methods[name].scores, ref.methods[name].scores)


def test_generate_records_a_trajectory(session):
    steps = []
    q = session.generate(3, progress=lambda i, n: steps.append(i))
    assert q.trajectory.shape == (session.diffusion.T + 1, *session.shape)
    assert len(steps) == session.diffusion.T and q.description == "generate:3"
    torch.testing.assert_close(q.image, q.trajectory[-1].clamp(-1, 1))


def test_first_answer_is_one_pass_and_fill_grids_makes_damping_changes_lookups(session, monkeypatch):
    """K-FAC on a stored bank (and TRAK) answers with one exact pass at the damping asked for; ``fill_grids``
    (the app runs it in a thread while the answer shows) scores the grid, after which a damping
    change on the grid makes no pass over the bank and equals a direct exact pass."""
    q = session.parse_query("train:5")
    res = session.query(q, "loss", methods=["kfac", "trak"])
    query = res.prepared["kfac"].query
    assert query.grid is None and list(query.scores) == [res.methods["kfac"].damping]
    assert res.prepared["trak"].query.grid is None  # TRAK's first answer too: one product at its damping
    assert session.fill_grids(res) == ["kfac", "trak"]
    assert query.grid is not None and res.prepared["trak"].query.grid is not None and session.fill_grids(res) == []
    bank = session.method("kfac").bank
    calls = []
    monkeypatch.setattr(bank, "inner_many", lambda *a, **k: calls.append(1))
    lam = query.grid[10]
    new = session.rescore(res, {"kfac": lam})
    assert calls == []
    monkeypatch.undo()
    np.testing.assert_allclose(new.methods["kfac"].scores, query.exact(lam), rtol=1e-5,
                               atol=1e-6 * float(np.abs(query.exact(lam)).max()))


def _upload_png(session, arr: np.ndarray):
    """``arr`` (H, W) uint8 uploaded to ``session`` as a greyscale PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="PNG")
    return session.query_from_upload(buf.getvalue(), name="x.png")


def test_an_upload_unlike_every_training_image_gets_its_label_called_a_guess(session):
    """A pixel classifier labels anything, with a probability that reads as confidence (QA: a blank upload
    was "4" at 0.7): an image farther from the training set than its own images stand from each other is
    said to be unlike them; a training image is not."""

    from engine.attribution.copycheck import pixel_distances, training_spread

    def upload(arr: np.ndarray):
        return _upload_png(session, arr)

    rng = np.random.default_rng(0)
    noise = upload(rng.integers(0, 256, (8, 8), dtype=np.uint8))
    bound, _ = training_spread(session.dataset.images)
    assert float(pixel_distances(noise.image[None], session.dataset.images).min()) > bound  # the premise
    assert any("unlike the training images" in n and "is a guess" in n for n in noise.notes), noise.notes
    same = upload(((session.dataset.images[3, 0].numpy() + 1) * 127.5).round().astype(np.uint8))
    assert not any("unlike the training images" in n for n in same.notes), same.notes
    assert noise.label_doubt == "guess"


def test_an_upload_identical_to_a_training_image_takes_its_label(session):
    """QA 28 #2: mnist training image 17, a clear 0 uploaded as it is, was "Label: 5" at the classifier's 0.81.
    An image identical to a training image takes that image's label, and says so; the classifier is not asked."""
    from engine.model import label_classifier

    for i in (3, 10, 40):
        arr = ((session.dataset.images[i, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
        q = _upload_png(session, arr)
        assert torch.equal(q.image, session.dataset.images[i])  # the premise: the same pixels
        assert q.label == int(session.dataset.labels[i]) and q.label_doubt == "", q.notes
        assert any(f"identical to training image #{i}" in n and "ground truth" in n for n in q.notes), q.notes
        assert not any("predicted by a classifier" in n for n in q.notes)
        assert q.identical_to == i  # QA 29 #3: the app marks it "query" in the grids, as a train:N query
    # one grey level off is not identical: the classifier labels it, as before
    arr = ((session.dataset.images[3, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
    arr[0, 0] = 255 - arr[0, 0]
    off = _upload_png(session, arr)
    assert any("predicted by a classifier" in n for n in off.notes), off.notes
    assert off.identical_to is None
    assert label_classifier.CONFIDENT > 0
    # the classifier's fit is kept in the model's cache folder, so the next server's first label is not a fit
    assert len(list(session.store.base.glob("label-classifier-*.npz"))) == 1


def test_an_upload_of_an_unlabelled_training_file_is_known_as_that_image(session, monkeypatch):
    """QA 29 #3: on a training set without labels (an image folder without classes, a diffusers model's images)
    and without a classifier, an uploaded training file was not recognised at all; the pixel distances were
    skipped, as there was no label to give.  An upload is now compared (samples still are not: nothing to say)."""
    sources = session.sources
    monkeypatch.setattr(sources.dataset, "labels", None)
    monkeypatch.setattr(sources, "_classifier", False)
    arr = ((session.dataset.images[10, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
    q = _upload_png(session, arr)
    assert q.identical_to == 10 and q.label is None, q.notes
    assert "identical to training image #10" in q.notes
    arr[0, 0] = 255 - arr[0, 0]
    assert _upload_png(session, arr).identical_to is None


def test_apart_shows_enough_decimals_to_tell_two_numbers_apart():
    """QA 28 #6: "its distance to the nearest is 0.25, more than any ... (0.25)"."""
    from engine.attribution.query import apart

    assert apart(0.2512, 0.2498) == ("0.251", "0.250")
    assert apart(0.31, 0.25) == ("0.31", "0.25")
    assert apart(0.5, 0.5) == ("0.500000", "0.500000")


def test_a_blank_or_ambiguous_mnist_upload_gets_its_label_qualified(tmp_path):
    """On 28x28 a blank image lies near a thin training digit, within the training set's own spread, so the
    distance rule let "Label: 5" (probability 0.43) stand unqualified for a black upload on mnist (QA round 17;
    digits said "a guess"). A blank image is now said to be blank, and an image the classifier is unsure of
    (a blend of two digits) is said to be so; a training digit gets neither."""

    from engine.attribution.session import AttributionSession
    from engine.model.label_classifier import CONFIDENT

    mnist = AttributionSession("mnist", cache_root=tmp_path)
    ds = mnist.dataset

    def upload(arr: np.ndarray):
        return _upload_png(mnist, arr)

    def pixels(x: np.ndarray) -> np.ndarray:
        return ((x + 1) * 127.5).round().astype(np.uint8)

    for blank in (np.zeros((8, 8), np.uint8), np.full((1, 1), 200, np.uint8)):
        q = upload(blank)
        assert q.label is not None and any("is blank" in n and "is a guess" in n for n in q.notes), q.notes
    other = int(np.nonzero(ds.labels != ds.labels[3])[0][0])
    blend = upload(pixels((ds.images[3, 0].numpy() + ds.images[other, 0].numpy()) / 2))
    prob = float(next(n for n in blend.notes if "probability" in n).split("probability ")[1].split(",")[0])
    assert prob < CONFIDENT  # the premise: the classifier hesitates between the two digits
    assert any("classifier is unsure" in n for n in blend.notes), blend.notes
    digit = upload(pixels(ds.images[3, 0].numpy()))
    assert not any("unsure" in n or "guess" in n or "blank" in n for n in digit.notes), digit.notes


def test_labels_name_the_measurement_each_method_scores(session):
    """D-TRAK always scores the square norm: the group views' labels said "predicted change of the loss"
    for it (QA round 13); the other methods score what is asked."""
    from types import SimpleNamespace

    from explorer.groups_view import axis_labels

    assert session.measurement_used("dtrak", "loss") == "square-norm"
    assert session.measurement_used("kfac", "loss@t=5") == "loss@t=5"
    assert session.measurement_used("pixel", "elbo") == "elbo"
    labels = axis_labels(SimpleNamespace(session=session), ["kfac", "dtrak"], "loss")
    assert labels["kfac"].endswith("predicted change of the training loss")
    # in words, not the spec pasted into a sentence ("of the square-norm"; QA 67 F3)
    assert labels["dtrak"].endswith("predicted change of the square norm")
    # the one axis over every method's bars names D-TRAK's other measurement (QA 67 F2: "of the loss" over them all)
    assert labels["change"] == "predicted change of the training loss (D-TRAK: of the square norm)"
    assert axis_labels(SimpleNamespace(session=session), ["kfac"], "loss")["change"] == \
        "predicted change of the training loss"


def test_the_cli_names_the_checkpoint_in_printed_commands_only_when_given(tmp_path):
    """Without --checkpoint the printed build command said `--checkpoint /abs/path/assets/digits`
    (the default folder, resolved): harmless, but not what the user typed, and tied to this clone."""
    from engine.cli.attribution import open_session
    from engine.cli.parser import build_parser
    from engine.paths import default_checkpoint

    def session(*extra: str) -> AttributionSession:
        args = build_parser().parse_args(
            ["query", "--preset", "digits", "--query", "gallery:0", "--device", "cpu", "--cache-root", str(tmp_path),
             *extra])
        return open_session(args)

    plain = session().build_command(["pixel"])
    assert plain.startswith("attribution-engine build --preset digits --cache-root") and "--checkpoint" not in plain
    given = session("--checkpoint", str(default_checkpoint("digits"))).build_command(["pixel"])
    assert f"--checkpoint {default_checkpoint('digits')}" in given


def test_a_sample_of_a_samples_file_is_a_query_with_its_trajectory(session, tmp_path):
    """QA round 21: a sample `attribution-engine sample --out FILE.npz --trajectory` drew could not be asked about
    (``image:FILE.npz`` is refused as an image, and ``generate:SEED`` draws sample 0 again in a batch of one, which
    rounds differently).  ``samples:FILE.npz:I`` is that very image, with its trajectory."""
    from engine.model.sampling import generate, save_npz

    images, traj = generate(session.model, session.preset, 3, 11, True, "cpu")
    path = tmp_path / "my samples.npz"
    save_npz(images, path, 11, traj)
    q = session.parse_query(f"samples:{path}:2")
    with np.load(path) as z:
        assert torch.equal(q.image, torch.from_numpy(z["images"][2]) * 2.0 - 1.0)
        assert torch.equal(q.trajectory, torch.from_numpy(z["trajectory"][2]))
    assert q.description == f"samples:{path}:2" and "sampling seed 11" in q.notes[0]
    res = session.query(q, "trajectory", methods=["kfac"])  # the trajectory measurement needs the file's
    assert res.methods["kfac"].status == "ok"
    save_npz(images, tmp_path / "plain.npz", 11)  # no trajectory kept: said, and the other measurements work
    assert session.parse_query(f"samples:{tmp_path / 'plain.npz'}:0").trajectory is None
    # a file that names the model that drew it: nothing to say for this model, a note for another (QA 26 #9)
    save_npz(images, tmp_path / "mine.npz", 11, traj, checkpoint=session.checkpoint_hash)
    assert not any("another model" in n for n in session.parse_query(f"samples:{tmp_path / 'mine.npz'}:0").notes)
    save_npz(images, tmp_path / "short.npz", 11, traj[:, :5])  # another T: the error names the file (QA 26 #6)
    with pytest.raises(ValueError) as e:
        session.query(session.parse_query(f"samples:{tmp_path / 'short.npz'}:0"), "trajectory", methods=["kfac"])
    assert str(e.value).startswith(f"the trajectory of samples:{tmp_path / 'short.npz'}:0 is (5, "), e.value
    save_npz(images, tmp_path / "theirs.npz", 11, traj, checkpoint="0123456789abcdef")
    notes = session.parse_query(f"samples:{tmp_path / 'theirs.npz'}:0").notes
    assert (f"drawn by another model (checkpoint 0123456789abcdef; this one is {session.checkpoint_hash}): its "
            "trajectory is that model's sampling path, scored under this model") in notes
    for spec, words in [
        (f"samples:{path}:3", "sample 3 out of range 0..2"),
        (f"samples:{path}:x", "bad sample number 'x'"),
        (f"samples:{tmp_path / 'none.npz'}:0", "no samples file at"),
        (f"samples:{Path(__file__)}:0", "not an .npz archive"),
    ]:
        with pytest.raises(ValueError, match=words):
            session.parse_query(spec)


def test_a_sigterm_while_a_method_scores_stops_the_query_instead_of_becoming_that_methods_error(
    session, monkeypatch
):
    """QA 24: the CLI's SIGTERM exception (``Terminated``) was an Exception, so the session's "one broken method
    must not hide the others" handler reported it as "pixel: error" and the command went on (an LDS then saved
    a query's scores without K-FAC, and every rerun failed). It must leave the query as Ctrl-C does."""
    from engine.cli.common import Terminated

    def terminated(*args, **kwargs):
        raise Terminated()

    monkeypatch.setattr(AttributionSession, "_score_into", terminated)
    with pytest.raises(Terminated):
        session.query(session.parse_query("train:3"), "loss", ["pixel"])
    # an ordinary failure still becomes that method's error, and the query answers
    monkeypatch.setattr(AttributionSession, "_score_into", lambda *a, **k: 1 / 0)
    r = session.query(session.parse_query("train:3"), "loss", ["pixel"])
    assert r.methods["pixel"].status == "error" and "ZeroDivisionError" in r.methods["pixel"].reason


def test_an_upload_on_a_folder_model_says_how_its_channels_were_converted():
    """QA 28 #5: on a model of an image folder, a grey upload became RGB and an RGBA one lost its alpha without a
    word, where the shipped models' notes say so."""
    from PIL import Image

    from engine.attribution.query import folder_image_to_model

    grey = Image.fromarray(np.full((8, 8), 90, np.uint8), "L")
    x, notes = folder_image_to_model(grey, 3, 16, 256)
    assert x.shape == (3, 16, 16) and "converted L -> RGB" in notes[0] and "resized 8x8 -> 16x16" in notes[0]
    rgba = Image.fromarray(np.zeros((16, 16, 4), np.uint8), "RGBA")
    _, notes = folder_image_to_model(rgba, 3, 16, 256)
    assert "converted RGBA -> RGB" in notes[0] and "transparency dropped" in notes[0] and "resized" not in notes[0]
    rgb = Image.fromarray(np.zeros((16, 16, 3), np.uint8), "RGB")
    _, notes = folder_image_to_model(rgb, 3, 16, 256)
    assert notes[0] == "prepared as the training folder's images were"
    _, notes = folder_image_to_model(rgb, 1, 16, 256)
    assert "converted RGB -> grey" in notes[0]


def test_a_kfac_damping_below_the_factors_resolution_comes_with_a_warning(session):
    """QA 32 #7: ``--damping kfac=1e-15`` answered with scores that are mostly the float32 factors' rounding, and
    no word of it. Below ``KFACFactors.resolution_floor`` the answer carries a warning (text, JSON, rescoring);
    at the default damping, and for methods without such a limit, none."""
    from engine.cli.query_output import format_result

    kfac = session.method("kfac")
    floor = kfac.factors.resolution_floor(torch.float32)
    assert kfac.default_damping > floor  # the tiny preset's default is above it
    q = session.parse_query("train:0")
    res = session.query(q, methods=["kfac", "trak"])
    assert res.methods["kfac"].warning is None and res.methods["trak"].warning is None
    low = session.query(q, methods=["kfac", "trak"], damping={"kfac": floor / 100})
    warning = low.methods["kfac"].warning
    assert warning is not None and f"{floor:.1e}" in warning and "--kfac-factor-dtype float64" in warning
    assert low.methods["trak"].warning is None
    assert low.to_json(3, session.labels)["methods"]["kfac"]["warning"] == warning
    assert f"warning: {warning}" in format_result(low, 3, session.labels)
    assert "warning" not in res.to_json(3, session.labels)["methods"]["kfac"]
    assert res.to_json(3, session.labels)["methods"]["kfac"]["damping_floor"] == floor  # said with every answer
    assert "damping_floor" not in res.to_json(3, session.labels)["methods"]["trak"]
    back = session.rescore(low, {"kfac": floor * 100})  # the slider moved back above the floor
    assert back.methods["kfac"].warning is None
    assert session.rescore(back, {"kfac": floor / 10}).methods["kfac"].warning is not None
    assert "(the default)" not in warning
    # a default below the floor (a user's model, QA 45 #5) is said to be the default, not a damping the user chose
    kfac.default_damping, default = floor / 10, kfac.default_damping
    try:
        said = kfac.damping_warning(None)
        assert said.startswith(f"damping {floor / 10:.1e} (the default) is below the float32 factors' resolution")
        assert kfac.damping_warning(floor / 10).startswith(f"damping {floor / 10:.1e} (the default) is below")
    finally:
        kfac.default_damping = default


def test_the_callers_compute_section_reaches_the_session_and_its_banks(ckpt, digits_small, tmp_path):
    """A preset's ``compute`` section (speed and memory only) is the session's, although the checkpoint's recorded
    preset has none (``Preset.to_dict`` leaves it out): the context, K-FAC's stored bank and TRAK's rows use it, and
    the answers equal the defaults'."""
    from engine.config import ComputeConfig

    folder, preset = ckpt
    small = ComputeConfig(grid_max_bytes=1, pack_max_bytes=0, scan_chunk_bytes_cpu=4096, min_rows_per_worker=1)
    cache = tmp_path / "cache"
    answers = []
    for p in (preset, preset.replace(compute=small)):
        s = AttributionSession(p, checkpoint=folder, device="cpu", cache_root=cache, config=TINY_ATTRIBUTION,
                               dataset=digits_small)
        assert s.preset.compute == p.compute and s.ctx.compute == p.compute
        s.build(["kfac", "trak"])
        res = s.query(s.parse_query("train:1"), methods=["kfac", "trak"])
        answers.append({n: r.scores for n, r in res.methods.items()})
        if p.compute == small:
            assert s.method("kfac").bank.grid_max_bytes == 1
            assert res.prepared["trak"].query.rows.grid_max_bytes == 1
    for name in ("kfac", "trak"):
        np.testing.assert_allclose(answers[1][name], answers[0][name], rtol=1e-5, atol=1e-7)


def test_the_app_says_a_predicted_label_as_the_classifiers_guess_and_a_training_label_as_the_label(session):
    """QA 47 #3: a generated sample that is a clear 8 read "Label: **1**" (the pixel classifier, probability 0.95),
    which a lay audience took as a fact.  The engine's own notes decide which the page says."""
    from explorer.results_view import label_line

    train = session.parse_query("train:3")
    assert label_line(train.label, train.notes, train.label_doubt) == f"Label: **{int(session.dataset.labels[3])}**"
    arr = ((session.dataset.images[3, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
    same = _upload_png(session, arr)  # a training file uploaded as it is: its ground truth
    assert label_line(same.label, same.notes, same.label_doubt) == f"Label: **{int(session.dataset.labels[3])}**"
    arr[0, 0] = 255 - arr[0, 0]
    off = _upload_png(session, arr)  # the classifier's
    line = label_line(off.label, off.notes, off.label_doubt)
    assert line.startswith(f"Label, as a simple pixel classifier guesses it: {off.label} (not ground truth")
    assert "**" not in line


def test_an_mnist_pool_is_labelled_by_the_classifier_its_single_samples_get(tmp_path):
    """QA 63 F1: a pool was labelled only on digits, so mnist's pool samples had no label (the CLI's "label -", the
    Groups page's "No label classifier for this model's data") while its gallery and ``generate:`` samples had
    one.  A pool of the shipped mnist model gets the classifier's labels, the same as each sample alone; a pool
    file written unlabelled by the old code (labels -1) is labelled on its next load."""
    from engine.attribution.pool import generate_pool, pool_path
    from engine.model.label_classifier import classify

    mnist = AttributionSession("mnist", cache_root=tmp_path)
    pool = generate_pool(mnist, 2, seed=5, pool_dir=tmp_path / "pools", progress=False)
    want, _ = classify(mnist.sources.classifier(), pool.images)
    assert [int(x) for x in pool.labels] == [int(x) for x in want] and all(0 <= int(x) <= 9 for x in pool.labels)
    path = pool_path(tmp_path / "pools", mnist.checkpoint_hash, 5, 2)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(path, **{**arrays, "labels": np.full(2, -1, dtype=np.int64)})  # as the old code left it
    again = generate_pool(mnist, 2, seed=5, pool_dir=tmp_path / "pools", progress=False)
    assert [int(x) for x in again.labels] == [int(x) for x in want]
