"""Datasets: digits, CIFAR-10 / CIFAR-2 pickles (written here in the exact CIFAR format), image folders."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import DataConfig
from engine.model import data_files
from engine.model.data import DataError, load_dataset, random_flip
from engine.model.data_files import CIFAR_CLASSES, cifar2_indices

# --- digits ------------------------------------------------------------------------------


def test_digits_shape_range_levels_labels(digits):
    assert digits.images.shape == (1797, 1, 8, 8)
    assert digits.images.dtype == torch.float32
    assert digits.images.min() == -1.0 and digits.images.max() == 1.0
    # 17 grey levels on the grid -1 + 2k/16
    k = (digits.images + 1) / 2 * 16
    assert torch.allclose(k, k.round(), atol=1e-6)
    assert len(torch.unique(k.round())) == 17
    assert digits.levels == 17
    assert digits.labels.shape == (1797,) and set(digits.labels.tolist()) == set(range(10))
    assert digits.label_name(0) == str(int(digits.labels[0]))
    assert len(set(digits.ids)) == 1797


def test_subset_keeps_ids_and_labels(digits):
    sub = digits.subset([5, 2])
    assert sub.ids == [digits.ids[5], digits.ids[2]]
    assert torch.equal(sub.images[1], digits.images[2])
    assert torch.equal(sub.labels, digits.labels[[5, 2]])


def test_random_flip_is_seeded_and_flips_some():
    x = torch.arange(4 * 8 * 8, dtype=torch.float32).reshape(4, 1, 8, 8).repeat(8, 1, 1, 1)
    a = random_flip(x, torch.Generator().manual_seed(3))
    b = random_flip(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    flipped = [bool(torch.equal(a[i], x[i].flip(-1))) for i in range(len(x))]
    kept = [bool(torch.equal(a[i], x[i])) for i in range(len(x))]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 0 < sum(flipped) < len(x)


# --- CIFAR pickles -------------------------------------------------------------------------


def _write_batch(path: Path, data: np.ndarray, labels: list[int]) -> None:
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"test", b"data": data, b"labels": labels, b"filenames": []}, f)


def make_cifar(folder: Path, per_batch: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Five tiny train batches + meta in the real CIFAR-10 python format; returns (data, labels)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    datas, labs = [], []
    for b in range(1, 6):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        labels[:2], labels[2:4] = [1, 1], [7, 7]  # every batch has cars and horses
        _write_batch(folder / f"data_batch_{b}", data, labels)
        datas.append(data)
        labs.append(labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in CIFAR_CLASSES], b"num_cases_per_batch": per_batch}, f)
    return np.concatenate(datas), np.concatenate(labs)


def _cifar_cfg(root: Path, name: str = "cifar10", **kw) -> DataConfig:
    return DataConfig(name=name, root=str(root), image_size=32, channels=3, levels=256, flip=True, **kw)


def test_cifar10_loader_values_ids_labels(tmp_path):
    data, labels = make_cifar(tmp_path / "cifar-10-batches-py")
    # root may be the batches folder or its parent
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        ds = load_dataset(_cifar_cfg(root))
        assert ds.images.shape == (100, 3, 32, 32) and ds.images.dtype == torch.float32
        assert ds.ids[0] == "cifar10:data_batch_1:0" and ds.ids[23] == "cifar10:data_batch_2:3"
        assert ds.class_names == CIFAR_CLASSES
        assert ds.labels.tolist() == labels.tolist()
        # channel-major layout: value 0 of row 23 is red pixel (0, 0); value 1024 green (0, 0)
        expect = data[23].reshape(3, 32, 32).astype(np.float32) / 255 * 2 - 1
        assert np.allclose(ds.images[23].numpy(), expect, atol=1e-6)
        assert ds.levels == 256


def test_cifar2_selection_deterministic_balanced(tmp_path):
    _, labels = make_cifar(tmp_path, per_batch=40)
    n_car, n_horse = int((labels == 1).sum()), int((labels == 7).sum())
    per = min(n_car, n_horse) - 2
    ds = load_dataset(_cifar_cfg(tmp_path, "cifar2", per_class=per, seed=5))
    again = load_dataset(_cifar_cfg(tmp_path, "cifar2", per_class=per, seed=5))
    other = load_dataset(_cifar_cfg(tmp_path, "cifar2", per_class=per, seed=6))
    assert ds.ids == again.ids and torch.equal(ds.images, again.images)
    assert ds.ids != other.ids
    assert len(ds) == 2 * per
    assert ds.class_names == ["automobile", "horse"]
    assert int((ds.labels == 0).sum()) == per and int((ds.labels == 1).sum()) == per
    full = load_dataset(_cifar_cfg(tmp_path))
    pos = {id_: i for i, id_ in enumerate(full.ids)}
    for i, id_ in enumerate(ds.ids):
        j = pos[id_]  # ids keep the original CIFAR index
        assert torch.equal(ds.images[i], full.images[j])
        assert int(full.labels[j]) == (1 if int(ds.labels[i]) == 0 else 7)
    with pytest.raises(DataError, match="automobile") as e:
        load_dataset(_cifar_cfg(tmp_path, "cifar2", per_class=n_car + 1))
    # the folder it read and the setting to change are named (QA 16: neither was)
    assert str(tmp_path) in str(e.value) and "data.per_class" in str(e.value)


def test_cifar2_indices_paper_size():
    labels = np.repeat(np.arange(10), 5000)
    idx = cifar2_indices(labels, 2500, seed=0)
    assert len(idx) == 5000 and len(np.unique(idx)) == 5000
    assert (labels[idx] == 1).sum() == 2500 and (labels[idx] == 7).sum() == 2500
    assert np.array_equal(idx, cifar2_indices(labels, 2500, seed=0))


def _assert_data_error(cfg: DataConfig, needle: str) -> None:
    with pytest.raises(DataError) as e:
        load_dataset(cfg)
    assert needle in str(e.value), str(e.value)


def test_cifar_bad_inputs_name_the_file(tmp_path):
    _assert_data_error(_cifar_cfg(tmp_path / "nope"), "nope")
    _assert_data_error(DataConfig(name="cifar10", root=None, image_size=32, channels=3), "--data-root")
    make_cifar(tmp_path)
    bad = tmp_path / "data_batch_3"
    # missing file
    bad.unlink()
    _assert_data_error(_cifar_cfg(tmp_path), "data_batch_3")
    # not a pickle
    bad.write_bytes(b"this is not a pickle")
    _assert_data_error(_cifar_cfg(tmp_path), str(bad))
    # missing key
    with open(bad, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, f)
    _assert_data_error(_cifar_cfg(tmp_path), str(bad))
    # wrong shape
    _write_batch(bad, np.zeros((2, 1000), np.uint8), [0, 1])
    _assert_data_error(_cifar_cfg(tmp_path), str(bad))
    # wrong dtype
    _write_batch(bad, np.zeros((2, 3072), np.float32), [0, 1])
    _assert_data_error(_cifar_cfg(tmp_path), str(bad))
    # label count mismatch
    _write_batch(bad, np.zeros((2, 3072), np.uint8), [0])
    _assert_data_error(_cifar_cfg(tmp_path), str(bad))
    # not a dict
    with open(bad, "wb") as f:
        pickle.dump([1, 2, 3], f)
    _assert_data_error(_cifar_cfg(tmp_path), str(bad))
    # a pickle that would run code is refused
    with open(bad, "wb") as f:
        pickle.dump({b"data": Path("x"), b"labels": []}, f)
    _assert_data_error(_cifar_cfg(tmp_path), str(bad))
    # preset that does not fit CIFAR
    _assert_data_error(DataConfig(name="cifar10", root=str(tmp_path), image_size=8, channels=1), "3x32")


# --- image folders --------------------------------------------------------------------------


def _img(path: Path, size=(6, 6), mode="RGB", value=0, fmt=None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
    Image.fromarray(arr, mode).save(path, format=fmt)
    return arr


def test_folder_with_subfolders_labels_ids_resize(tmp_path):
    a = _img(tmp_path / "cat" / "b.png", value=1)
    _img(tmp_path / "cat" / "a.bmp", value=2)
    _img(tmp_path / "dog" / "x" / "c.jpg", size=(10, 7), value=3)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "z.png").write_bytes(b"junk")
    ds = load_dataset(DataConfig(name="folder", root=str(tmp_path), image_size=6, channels=3, levels=256))
    assert ds.ids == ["cat/a.bmp", "cat/b.png", "dog/x/c.jpg"]
    assert ds.class_names == ["cat", "dog"]
    assert ds.labels.tolist() == [0, 0, 1]
    assert ds.images.shape == (3, 3, 6, 6)
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    # an image already at the target size is unchanged (lossless PNG), in (C, H, W) order
    assert np.allclose(ds.images[1].numpy(), a.transpose(2, 0, 1) / 255 * 2 - 1, atol=1e-6)
    grey = load_dataset(DataConfig(name="folder", root=str(tmp_path), image_size=4, channels=1, levels=17))
    assert grey.images.shape == (3, 1, 4, 4)
    k = (grey.images + 1) / 2 * 16  # snapped to the 17-level grid
    assert torch.allclose(k, k.round(), atol=1e-5)


def test_folder_flat_has_no_labels_and_native_size(tmp_path):
    _img(tmp_path / "one.png", size=(5, 5), mode="L", value=1)
    cfg = DataConfig(name="folder", root=str(tmp_path), image_size=None, channels=1, levels=256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a flat folder is unlabelled by design: no warning
        assert load_dataset(cfg).labels is None
    _img(tmp_path / "sub" / "two.png", size=(5, 5), mode="L", value=2)
    # one image beside a folder: unlabelled, and the user is told why (it silently dropped every label)
    with pytest.warns(UserWarning, match=r"1 of 2 images \(e\.g\. one\.png\) are not inside a class folder"):
        ds = load_dataset(cfg)
    assert ds.labels is None and ds.class_names is None
    assert ds.ids == ["one.png", "sub/two.png"]
    assert ds.images.shape == (2, 1, 5, 5)
    # a format the folder set does not read is named, not dropped silently (QA 33: a .webp went unseen)
    (tmp_path / "one.png").rename(tmp_path / "sub" / "one.png")
    from PIL import Image

    Image.new("L", (5, 5)).save(tmp_path / "sub" / "three.webp")
    with pytest.warns(UserWarning, match=r"1 image file\(s\) in a format the folder data set does not read were "
                                         r"skipped \(sub/three\.webp\)"):
        ds = load_dataset(cfg)
    assert ds.ids == ["sub/one.png", "sub/two.png"]


def test_a_folder_of_another_size_than_the_model_takes_says_it_is_resized(tmp_path):
    """QA 45 #4: a 16x16 diffusers UNet on a folder of 32x32 images was accepted without a word (diffusers weights
    name no data, so the wrong UNet for a folder is a likely mistake); the images are still resized, as documented,
    and a warning names the files' size and the model's (also when the pixels come from the decoded-folder cache,
    which keeps each file's own size)."""
    for i in range(2):
        _img(tmp_path / "a" / f"{i}.png", size=(32, 32), value=i)
    cfg = DataConfig(name="folder", root=str(tmp_path), image_size=16, channels=3, levels=256)
    for _ in range(2):  # decoded, then from the cache (in a new process: the warning is said once per process)
        data_files._resize_said.clear()
        with pytest.warns(UserWarning, match=r"none of the 2 images is 16x16 \(32x32; e\.g\. a/0\.png\); each is resized "
                                             r"to 16x16, the size the model takes"):
            assert load_dataset(cfg).images.shape == (2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once in a process; the model's own size or no size asked: nothing
        load_dataset(cfg)
        load_dataset(DataConfig(name="folder", root=str(tmp_path), image_size=32, channels=3, levels=256))
        load_dataset(DataConfig(name="folder", root=str(tmp_path), image_size=None, channels=3, levels=256))


def test_a_folder_of_colour_or_grey_images_says_when_they_are_converted_to_the_models_channels(tmp_path):
    """QA 54 F7: a grayscale UNet (in_channels 1) with an RGB folder and no preset made every image grey and
    answered without a word; one warning line now says so, and the reverse (grey images, a 3-channel model).
    Nothing for matching folders, nor for RGB files of grey pictures (nothing is lost), and once per folder."""
    from PIL import Image

    for i in range(3):
        _img(tmp_path / "rgb" / "a" / f"{i}.png", value=i)
        _img(tmp_path / "grey" / "a" / f"{i}.png", mode="L", value=i)
        flat = _img(tmp_path / "unused" / f"{i}.png", mode="L", value=i)
        (tmp_path / "rgbgrey" / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.stack([flat] * 3, axis=-1), "RGB").save(tmp_path / "rgbgrey" / "a" / f"{i}.png")

    def cfg(name: str, channels: int) -> DataConfig:
        return DataConfig(name="folder", root=str(tmp_path / name), image_size=None, channels=channels, levels=256)

    data_files._channels_said.clear()
    with pytest.warns(UserWarning, match=r"rgb: its images are colour \(e\.g\. a/0\.png, RGB\); each is converted "
                                         r"to grey, the model's 1 channel"):
        assert load_dataset(cfg("rgb", 1)).images.shape == (3, 1, 6, 6)
    with pytest.warns(UserWarning, match=r"grey: its images are grey \(e\.g\. a/0\.png\); each is converted to RGB "
                                         r"\(its grey in all 3 channels\), the model's 3 channels"):
        assert load_dataset(cfg("grey", 3)).images.shape == (3, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset(cfg("rgb", 3))
        load_dataset(cfg("grey", 1))
        load_dataset(cfg("rgbgrey", 1))
        load_dataset(cfg("rgb", 1))  # said once per folder in a process


@pytest.mark.parametrize("cached", [False, True], ids=["decoded", "from-cache"])
def test_a_mixed_size_folder_says_how_many_images_are_resized_whatever_its_first_file(tmp_path, monkeypatch, cached):
    """QA 46 #2: the warning read the first file's header only, so a folder whose first image had the model's size
    and 19 others did not was resized without a word, and one whose first image alone was odd said "images such as
    ..." of all.  Every file's own size counts now, from the decode or from the decoded-folder cache."""
    from engine.model import folder_cache

    monkeypatch.setenv(folder_cache.CACHE_ENV, str(tmp_path / "cache") if cached else "off")
    monkeypatch.setattr(folder_cache, "SETTLE_NS", 0)  # the files are seconds old; the cache must take them
    fits, odd = tmp_path / "fits_first", tmp_path / "odd_first"
    _img(fits / "a" / "0.png", size=(16, 16), value=0)  # the model's size first, then 3 that are not, the rarer
    for i, wh in enumerate([(20, 16), (40, 36), (40, 36)], start=1):  # size first (the example is of the commonest)
        _img(fits / "a" / f"{i}.png", size=wh, value=i)
    _img(odd / "a" / "0.png", size=(40, 36), value=0)  # one odd file first, then 3 of the model's size
    for i in range(1, 4):
        _img(odd / "a" / f"{i}.png", size=(16, 16), value=i)
    for _ in range(2 if cached else 1):  # with the cache: written, then read back
        data_files._resize_said.clear()
        with pytest.warns(UserWarning, match=r"fits_first: 3 of 4 images are not 16x16 \(40x36, 20x16; e\.g\. "
                                             r"a/2\.png\); each is resized to 16x16"):
            load_dataset(DataConfig(name="folder", root=str(fits), image_size=16, channels=3, levels=256))
        with pytest.warns(UserWarning, match=r"odd_first: 1 of 4 images is not 16x16 \(40x36; e\.g\. a/0\.png\)"):
            load_dataset(DataConfig(name="folder", root=str(odd), image_size=16, channels=3, levels=256))
    assert (len(list((tmp_path / "cache").glob("*.npz"))) == 2) == cached


def test_folder_bad_inputs_name_the_file(tmp_path):
    cfg = dict(name="folder", image_size=8, channels=3, levels=256)
    _assert_data_error(DataConfig(root=str(tmp_path / "missing"), **cfg), "missing")
    (tmp_path / "empty").mkdir()
    _assert_data_error(DataConfig(root=str(tmp_path / "empty"), **cfg), "empty")
    _img(tmp_path / "imgs" / "ok.png")
    broken = tmp_path / "imgs" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _assert_data_error(DataConfig(root=str(tmp_path / "imgs"), **cfg), "broken.png")
    broken.unlink()
    _img(tmp_path / "imgs" / "zbig.png", size=(9, 9))
    _assert_data_error(
        DataConfig(root=str(tmp_path / "imgs"), name="folder", image_size=None, channels=3), "zbig.png"
    )
    _assert_data_error(DataConfig(root=None, **cfg), "--data-root")
    _assert_data_error(DataConfig(name="nonsense"), "nonsense")


@pytest.mark.parametrize("channels,levels", [(3, 256), (1, 17)])
def test_a_training_file_given_as_a_query_is_its_own_training_row(tmp_path, channels, levels):
    """QA round 12: queries centre-cropped and composited the alpha while the folder loader squashed and
    dropped it, so ``image:<a training file>`` (5x40, RGBA, palette) did not find itself among its 3
    nearest.  Queries on folder data now go through the loader's own preparation: equal rows."""
    from types import SimpleNamespace

    from engine.attribution.query import QuerySources
    from engine.config import Preset

    rng = np.random.default_rng(0)
    files = {"a/tall.png": ((5, 40), "RGB"), "a/wide_rgba.png": ((32, 20), "RGBA"),
             "b/pal.png": ((12, 9), "P"), "b/square.png": ((8, 8), "L")}
    for rel, (size, mode) in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, size=(size[1], size[0], 4), dtype=np.uint8)
        Image.fromarray(arr, "RGBA").convert(mode).save(path)
    cfg = DataConfig(name="folder", root=str(tmp_path), image_size=8, channels=channels, levels=levels)
    ds = load_dataset(cfg)
    preset = Preset(name="f", data=cfg).replace(model={"image_size": 8, "in_channels": channels})
    sources = QuerySources(preset, None, SimpleNamespace(T=10), ds, torch.device("cpu"), tmp_path, "assets")
    for i, rel in enumerate(ds.ids):
        q = sources.parse(f"image:{tmp_path / rel}")
        assert torch.equal(q.image, ds.images[i]), rel


def test_an_image_folder_cache_key_is_a_portable_folder_name(tmp_path):
    """The set is named ``folder:<name>``; its cache folder must not carry the colon (or a space) onto disk."""
    from engine.attribution.store import data_key

    root = tmp_path / "my photos"
    _img(root / "a.png", value=1)
    _img(root / "b.png", value=2)
    ds = load_dataset(DataConfig(name="folder", root=str(root), image_size=4, channels=1, levels=256))
    assert ds.name == "folder:my photos"
    key = data_key(ds)
    assert key.startswith("folder_my_photos-n2-")
    assert all(ch.isalnum() or ch in "._-" for ch in key)
    _img(root / "c.png", value=3)  # other content under the same name: another key
    assert data_key(load_dataset(DataConfig(name="folder", root=str(root), image_size=4, channels=1, levels=256))) != key


def test_a_data_folder_given_to_the_bundled_digits_is_refused(tmp_path, capsys):
    """``train --data-root F`` with the digits preset trained on scikit-learn's digits while its config.json
    recorded F as the data's folder (QA 16): the folder is refused, before any training."""
    from engine.cli import main

    with pytest.raises(DataError, match="reads no folder"):
        load_dataset(DataConfig(name="digits", root=str(tmp_path)))
    assert len(load_dataset(DataConfig(name="digits"))) == 1797
    out = tmp_path / "run"
    assert main(["train", "--data-root", str(tmp_path), "--out", str(out), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the digits data set") and str(tmp_path) in err and not out.exists()


def test_a_relative_data_folder_is_made_absolute_against_the_folder_it_was_given_in(tmp_path, monkeypatch):
    """A run records its preset's data folder; recorded as ``data/x`` it was read later against whatever folder
    the next command ran in (the app, from the repository): "image folder data/x does not exist" (QA 26 #4)."""
    import json

    from engine.config import get_preset

    (tmp_path / "data" / "x").mkdir(parents=True)
    (tmp_path / "mine.json").write_text(json.dumps({"base": "digits", "data": {"name": "folder", "root": "data/x"}}))
    monkeypatch.chdir(tmp_path)
    assert get_preset("mine.json").data.root == str(tmp_path / "data" / "x")
    assert get_preset("digits", "data/x").data.root == str(tmp_path / "data" / "x")  # --data-root likewise
    assert get_preset("digits").data.root is None  # no folder: none invented
    assert get_preset("digits", str(tmp_path)).data.root == str(tmp_path)


def test_the_cli_shows_the_engines_data_warnings_as_one_line(tmp_path):
    """As the CLI's other warnings: ``warning: ...``, not Python's "data_files.py:95: UserWarning" with the
    source line under it (QA 26 #7)."""
    import subprocess
    import sys
    from pathlib import Path

    _img(tmp_path / "d" / "one.png", size=(5, 5), mode="L", value=1)
    _img(tmp_path / "d" / "sub" / "two.png", size=(5, 5), mode="L", value=2)
    code = (
        "from engine.cli.parser import engine_warnings_on_stderr\n"
        "from engine.config import DataConfig\n"
        "from engine.model.data import load_dataset\n"
        "engine_warnings_on_stderr()\n"
        f"load_dataset(DataConfig(name='folder', root={str(tmp_path / 'd')!r}, image_size=None, channels=1, "
        "levels=256))\n"
        "import warnings; warnings.warn('from elsewhere')\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith(f"warning: {tmp_path / 'd'}: 1 of 2 images (e.g. one.png) are not inside"), lines
    assert "UserWarning: from elsewhere" in done.stderr  # another package's (here: the caller's) keeps its form
    assert "data_files.py" not in done.stderr
