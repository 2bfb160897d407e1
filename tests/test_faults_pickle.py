"""Fault injection: a malicious pickle fed to every loader never runs code (issue 14, finding 1).

Each test writes a file whose unpickling would create a marker file (``os.system('touch ...')``
through ``__reduce__``), hands it to the loader, and checks that the loader refuses it with a
message naming the file and saying what to do, and that the marker was never created.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.attribution.store import StaleCacheError, Store
from engine.config import DataConfig
from engine.evaluation.lds_run import lds_queries
from engine.evaluation.setup import RunSetup
from engine.model.data import DataError
from engine.model.data_files import load_cifar10
from engine.model.train import STATE, train
from engine.safe_load import UnsafeFileError


class Evil:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_torch_file(path: Path, marker: Path, key: str = "model") -> None:
    torch.save({key: Evil(marker), "step": 1}, path)


def test_train_resume_refuses_a_malicious_train_state(tmp_path, tiny_preset, digits_small):
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "PWNED"
    _evil_torch_file(run / STATE, marker)
    with pytest.raises(UnsafeFileError) as e:
        train(tiny_preset.replace(train={"steps": 1}), run, dataset=digits_small, progress=False)
    assert not marker.exists()
    msg = str(e.value)
    assert str(run / STATE) in msg and "Delete it" in msg and "could run code" in msg


def test_train_resume_still_reads_its_own_state(tmp_path, tiny_preset, digits_small):
    """The state train() writes (weights, AdamW, RNG, log) is plain tensors and values: weights_only loads it."""

    class Stop(Exception):
        pass

    def stop_at(step, total, loss):
        if step == 21:
            raise Stop

    preset = tiny_preset.replace(train={"steps": 30, "checkpoint_every": 20})
    with pytest.raises(Stop):
        train(preset, tmp_path / "a", dataset=digits_small, progress=stop_at)
    assert (tmp_path / "a" / STATE).is_file()
    resumed = train(preset, tmp_path / "a", dataset=digits_small, progress=False)
    straight = train(preset, tmp_path / "b", dataset=digits_small, progress=False)
    assert (resumed / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()


def test_lds_refuses_a_malicious_queries_file(tmp_path, tiny_preset, digits_small):
    marker = tmp_path / "PWNED"
    out = tmp_path / "lds"
    out.mkdir()
    torch.save({"images": Evil(marker), "source": "x"}, out / "queries.pt")
    setup = RunSetup(tiny_preset, tmp_path / "ckpt", digits_small, out, tmp_path / "res", "cpu", True)
    with pytest.raises(UnsafeFileError) as e:
        lds_queries(setup, 2)
    assert not marker.exists()
    assert str(out / "queries.pt") in str(e.value) and "rm " in str(e.value)


def test_lds_ablation_refuses_a_malicious_queries_file_of_the_run(tmp_path, tiny_preset, digits_small):
    """lds-ablation reads the LDS run's queries.pt like the LDS itself: no unpickling of code (it used
    torch.load(weights_only=False))."""
    from engine.evaluation.lds_ablation import run_queries

    marker = tmp_path / "PWNED"
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"images": Evil(marker), "source": "x"}, run / "queries.pt")
    setup = RunSetup(tiny_preset, tmp_path / "ckpt", digits_small, tmp_path / "out", tmp_path / "res", "cpu", True)
    with pytest.raises(UnsafeFileError):
        run_queries(run, setup, 2)
    assert not marker.exists()


def test_lds_reads_plain_queries_file(tmp_path, tiny_preset, digits_small):
    out = tmp_path / "lds"
    out.mkdir()
    images = torch.randn(3, 1, 8, 8)
    torch.save({"images": images, "source": "test"}, out / "queries.pt")
    setup = RunSetup(tiny_preset, tmp_path / "ckpt", digits_small, out, tmp_path / "res", "cpu", True)
    got, source = lds_queries(setup, 2)
    assert torch.equal(got, images[:2]) and source == "test"


def _cifar_root(tmp_path: Path, dump) -> Path:
    root = tmp_path / "cifar"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        d = {b"batch_label": b"b", b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
             b"labels": [i % 10] * 4, b"filenames": [b"f"] * 4}
        with open(root / f"data_batch_{i}", "wb") as f:
            dump(d, f)
    meta = {b"label_names": [b"c%d" % k for k in range(10)], b"num_cases_per_batch": 4}
    with open(root / "batches.meta", "wb") as f:
        dump(meta, f)
    return root


def test_cifar_pickles_resaved_by_python3_with_protocol_2_load(tmp_path):
    root = _cifar_root(tmp_path, lambda d, f: pickle.dump(d, f, protocol=2))
    ds = load_cifar10(DataConfig(name="cifar10", root=str(root), image_size=32, channels=3, levels=256))
    assert len(ds) == 20


def test_cifar_codecs_global_is_latin1_only(tmp_path):
    root = _cifar_root(tmp_path, lambda d, f: pickle.dump(d, f, protocol=2))

    class ZlibBytes:
        def __reduce__(self):
            import _codecs

            return (_codecs.encode, ("x", "zlib_codec"))

    with open(root / "data_batch_2", "wb") as f:
        pickle.dump({b"data": ZlibBytes(), b"labels": []}, f, protocol=2)
    with pytest.raises(DataError, match="data_batch_2"):
        load_cifar10(DataConfig(name="cifar10", root=str(root), image_size=32, channels=3, levels=256))


def test_cifar_refuses_code(tmp_path):
    marker = tmp_path / "PWNED"
    root = _cifar_root(tmp_path, pickle.dump)
    with open(root / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(marker), b"labels": []}, f)
    with pytest.raises(DataError, match="data_batch_1"):
        load_cifar10(DataConfig(name="cifar10", root=str(root), image_size=32, channels=3, levels=256))
    assert not marker.exists()


def _object_npy(path: Path, marker: Path) -> None:
    arr = np.empty(1, dtype=object)
    arr[0] = Evil(marker)
    np.save(path, arr, allow_pickle=True)


def test_cache_array_holding_a_pickle_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    store = Store(tmp_path / "cache", "ckpt", "data")
    folder = store.save_arrays("feat", {"a": 1}, {"x": np.zeros(3, np.float32)})
    _object_npy(folder / "x.npy", marker)
    with pytest.raises(StaleCacheError, match="x.npy"):
        store.load_arrays("feat", {"a": 1})
    assert not marker.exists()


def test_gallery_and_indices_with_pickles_are_refused(tmp_path):
    from engine.cli.model import _read_indices

    marker = tmp_path / "PWNED"
    _object_npy(tmp_path / "idx.npy", marker)
    with pytest.raises(ValueError):
        _read_indices(str(tmp_path / "idx.npy"), "--indices")
    buf = io.BytesIO()
    arr = np.empty(1, dtype=object)
    arr[0] = Evil(marker)
    np.savez(buf, images=arr)
    (tmp_path / "gallery.npz").write_bytes(buf.getvalue())
    from engine.evaluation.runs import load_queries_npz

    with pytest.raises(ValueError):
        load_queries_npz(tmp_path / "gallery.npz")
    assert not marker.exists()


def test_a_malicious_factor_pass_checkpoint_is_ignored_and_runs_nothing(tmp_path):
    """The K-FAC factor pass's resumable state (``PassCheckpoint``) is read weights-only: a pickle in its
    place is treated as a damaged checkpoint (the pass starts over) and its code never runs."""
    from engine.attribution.pass_checkpoint import PassCheckpoint

    marker = tmp_path / "PWNED"
    ckpt = PassCheckpoint(tmp_path / "factors.pt", {"rows": 48})
    torch.save({"signature": ckpt.signature, "state": {"rows": Evil(marker)}}, ckpt.path)
    assert ckpt.load() is None
    assert not marker.exists()
    ckpt.save({"rows": 16, "a": torch.ones(2)})  # a plain state still round-trips
    assert ckpt.load()["rows"] == 16
