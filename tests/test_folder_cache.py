"""The decoded-image-folder cache (engine.model.folder_cache, QA 33 #8): a second load of an unchanged folder reads
one file instead of decoding every image, gives the same data set byte for byte, and any change misses.

Each behaviour test first shows a hit (the decoder made to raise), so it fails where no cache exists."""

from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import DataConfig
from engine.model import data_files, folder_cache
from engine.model.data import load_dataset


def _img(path: Path, size=(7, 5), mode="RGB", value=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(path)


def _later(path: Path, seconds: int = 5) -> None:
    """Stamp ``path`` as modified ``seconds`` later, as an edit made later would be: a rewrite inside the
    same clock tick is the racy case that ``SETTLE_NS`` covers, not what these tests are about."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(folder_cache.CACHE_ENV, str(folder))
    monkeypatch.setattr(folder_cache, "SETTLE_NS", 0)  # the files are seconds old at most; test_racy_files checks it
    monkeypatch.setattr(folder_cache, "_warned", set())
    return folder


@pytest.fixture
def data(tmp_path) -> Path:
    root = tmp_path / "data"
    for i, name in enumerate(["cat/a.png", "cat/b.bmp", "dog/c.png", "dog/deep/d.jpg"]):
        _img(root / name, size=(7 + i, 5), value=i)
    return root


class Decoder:
    """Counts ``_read_image`` calls; ``refuse()`` makes the next ones raise, which proves a load read the cache."""

    def __init__(self, monkeypatch) -> None:
        self.calls, self.refusing = 0, False
        real = data_files._read_image

        def read(path, channels, size):
            if self.refusing:
                raise AssertionError(f"decoded {path} although the cache should have served it")
            self.calls += 1
            return real(path, channels, size)

        monkeypatch.setattr(data_files, "_read_image", read)

    def refuse(self) -> None:
        self.refusing = True

    def allow(self) -> int:
        """Decode again; the number of files decoded so far."""
        self.refusing = False
        return self.calls


@pytest.fixture
def decoder(monkeypatch) -> Decoder:
    return Decoder(monkeypatch)


def _cfg(root: Path, image_size=6, channels=3, levels=256) -> DataConfig:
    return DataConfig(name="folder", root=str(root), image_size=image_size, channels=channels, levels=levels)


def _assert_same(a, b) -> None:
    assert a.name == b.name and a.levels == b.levels
    assert a.images.dtype == b.images.dtype == torch.float32
    assert torch.equal(a.images, b.images)
    assert (a.labels is None and b.labels is None) or torch.equal(a.labels, b.labels)
    assert a.ids == b.ids and a.class_names == b.class_names
    assert a.content_digest() == b.content_digest()


def _uncached(cfg: DataConfig, monkeypatch) -> object:
    with monkeypatch.context() as m:
        m.setenv(folder_cache.CACHE_ENV, "off")
        return load_dataset(cfg)


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.npz")) if cache.exists() else []


@pytest.mark.parametrize("image_size,channels,levels", [(6, 3, 256), (4, 1, 17)])
def test_a_second_load_reads_the_cache_and_is_the_same_data_set(cache, data, decoder, monkeypatch,
                                                                 image_size, channels, levels):
    cfg = _cfg(data, image_size, channels, levels)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    first = load_dataset(cfg)
    assert decoder.calls == 4 and len(_entries(cache)) == 1
    decoder.refuse()
    second = load_dataset(cfg)
    _assert_same(first, second)
    assert second.ids == ["cat/a.png", "cat/b.bmp", "dog/c.png", "dog/deep/d.jpg"]
    assert second.class_names == ["cat", "dog"] and second.labels.tolist() == [0, 0, 1, 1]
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # nothing written into the data folder
    decoder.allow()
    _assert_same(second, _uncached(cfg, monkeypatch))  # the digest a checkpoint records (data_sha) is the cache's too


def test_native_size_folders_are_cached_too(cache, tmp_path, decoder):
    root = tmp_path / "flat"
    for i in range(3):
        _img(root / f"{i}.png", size=(5, 4), mode="L", value=i)
    cfg = _cfg(root, image_size=None, channels=1)
    first = load_dataset(cfg)
    decoder.refuse()
    second = load_dataset(cfg)
    _assert_same(first, second)
    assert second.images.shape == (3, 1, 4, 5) and second.labels is None


def test_a_hit_still_gives_the_listings_warnings(cache, data, decoder):
    """The unread-format and loose-image warnings come from the listing, which a hit makes as well."""
    Image.new("RGB", (5, 5)).save(data / "cat" / "e.webp")
    _img(data / "loose.png", value=9)
    cfg = _cfg(data)
    for _ in range(2):
        with pytest.warns(UserWarning) as record:
            ds = load_dataset(cfg)
        text = " | ".join(str(w.message) for w in record)
        assert "format the folder data set does not read" in text and "cat/e.webp" in text
        assert "1 of 5 images (e.g. loose.png) are not inside a class folder" in text
        assert ds.labels is None
        decoder.refuse()
    assert decoder.allow() == 5


def _change_touch(root: Path) -> None:
    _later(root / "cat" / "a.png")


def _change_replace(root: Path) -> None:
    _img(root / "cat" / "a.png", size=(7, 5), value=42)  # same size in pixels, other pixels
    _later(root / "cat" / "a.png")


def _change_add(root: Path) -> None:
    _img(root / "dog" / "e.png", value=7)


def _change_remove(root: Path) -> None:
    (root / "dog" / "c.png").unlink()


def _change_rename(root: Path) -> None:
    (root / "dog" / "c.png").rename(root / "cat" / "c.png")


@pytest.mark.parametrize("change", [_change_touch, _change_replace, _change_add, _change_remove, _change_rename],
                         ids=["touch", "replace", "add", "remove", "move"])
def test_a_changed_file_misses(cache, data, decoder, monkeypatch, change):
    cfg = _cfg(data)
    load_dataset(cfg)
    decoder.refuse()
    load_dataset(cfg)  # unchanged: a hit
    change(data)
    decoder.allow()
    calls = decoder.calls
    changed = load_dataset(cfg)
    assert decoder.calls > calls  # decoded again
    _assert_same(changed, _uncached(cfg, monkeypatch))
    assert len(_entries(cache)) == 1  # the folder's entry was replaced, not joined by a second
    decoder.refuse()
    _assert_same(load_dataset(cfg), changed)  # and the new state is cached


@pytest.mark.parametrize("other", [dict(image_size=5), dict(channels=1), dict(image_size=None)])
def test_other_decoding_settings_miss(cache, tmp_path, decoder, monkeypatch, other):
    root = tmp_path / "same"
    for i in range(3):
        _img(root / "c" / f"{i}.png", size=(6, 6), value=i)
    cfg = _cfg(root, image_size=6, channels=3)
    load_dataset(cfg)
    decoder.refuse()
    load_dataset(cfg)
    decoder.allow()
    calls = decoder.calls
    cfg2 = _cfg(root, **{"image_size": 6, "channels": 3, **other})
    ds = load_dataset(cfg2)
    assert decoder.calls == calls + 3
    _assert_same(ds, _uncached(cfg2, monkeypatch))
    decoder.refuse()
    _assert_same(load_dataset(cfg), load_dataset(cfg))  # each setting keeps its own entry
    _assert_same(load_dataset(cfg2), ds)


def test_a_new_decoder_version_misses(cache, data, decoder, monkeypatch):
    cfg = _cfg(data)
    load_dataset(cfg)
    monkeypatch.setattr(data_files, "FOLDER_DECODE_VERSION", data_files.FOLDER_DECODE_VERSION + 1)
    calls = decoder.calls
    load_dataset(cfg)
    assert decoder.calls == calls + 4


def _cut(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size=path.stat().st_size, dtype=np.uint8).tobytes())


def _flipped_pixel(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside the images array: the zip's CRC catches it
    path.write_bytes(bytes(raw))


def _wrong_shape(path: Path) -> None:
    with folder_cache.load_npz(path) as z:
        key, x, sizes = z["key"], z["images"], z["sizes"]
    np.savez(path, images=x[:-1], sizes=sizes, key=key)  # its own key, one image short


def _other_dtype(path: Path) -> None:
    with folder_cache.load_npz(path) as z:
        key, x, sizes = z["key"], z["images"], z["sizes"]
    np.savez(path, images=x.astype(np.int16), sizes=sizes, key=key)


def _other_key(path: Path) -> None:
    with folder_cache.load_npz(path) as z:
        x, sizes = z["images"], z["sizes"]
    np.savez(path, images=np.zeros_like(x), sizes=sizes, key=np.array("0" * 64))


def _sizes_short(path: Path) -> None:
    with folder_cache.load_npz(path) as z:
        key, x, sizes = z["key"], z["images"], z["sizes"]
    np.savez(path, images=x, sizes=sizes[:-1], key=key)  # its own key, one file's size missing


@pytest.mark.parametrize("damage", [_cut, _garbage, _flipped_pixel, _wrong_shape, _other_dtype, _other_key,
                                    _sizes_short],
                         ids=["truncated", "garbage", "flipped-byte", "wrong-shape", "wrong-dtype", "other-key",
                              "sizes-short"])
def test_a_damaged_entry_is_a_miss_and_rewritten(cache, data, decoder, monkeypatch, damage):
    cfg = _cfg(data)
    first = load_dataset(cfg)
    decoder.refuse()
    load_dataset(cfg)
    (entry,) = _entries(cache)
    damage(entry)
    decoder.allow()
    calls = decoder.calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning, no traceback: a damaged cache is only a miss
        again = load_dataset(cfg)
    assert decoder.calls == calls + 4
    _assert_same(again, first)
    decoder.refuse()
    _assert_same(load_dataset(cfg), first)  # rewritten whole
    assert _entries(cache) == [entry]


@pytest.mark.parametrize("where,said", [
    ("a-file", r"the decoded-image cache \S*a-file is a file, not a folder; the cache is off for this run"),
    ("a-file/cache", r"cannot make the decoded-image cache folder \S*a-file/cache: \S*a-file is a file, not a folder; "
                     r"the cache is off for this run"),
], ids=["the-folder", "a-parent"])
def test_a_cache_path_that_is_a_file_is_said_once_and_the_load_goes_on_uncached(tmp_path, data, decoder, monkeypatch,
                                                                               where, said):
    """A file where the cache folder should be (mkdir under a file fails for root too, unlike a chmod) said only
    "[Errno 17] File exists", after the decode, without saying the cache was off."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(folder_cache.CACHE_ENV, str(tmp_path / where))
    monkeypatch.setattr(folder_cache, "SETTLE_NS", 0)
    monkeypatch.setattr(folder_cache, "_warned", set())
    cfg = _cfg(data)
    with pytest.warns(UserWarning) as record:
        first = load_dataset(cfg)
    (said_once,) = [str(w.message) for w in record if "decoded-image cache" in str(w.message)]
    assert re.search(said + r".*Set ATTRIBUTION_DATA_CACHE to a writable folder", said_once), said_once
    assert "Errno" not in said_once
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        second = load_dataset(cfg)
    assert decoder.calls == 8
    _assert_same(first, second)
    _assert_same(first, _uncached(cfg, monkeypatch))
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_cache_folder_is_only_a_warning(cache, data, decoder):
    cache.mkdir()
    cache.chmod(0o555)
    try:
        with pytest.warns(UserWarning, match="cannot write the decoded-image cache"):
            load_dataset(_cfg(data))
    finally:
        cache.chmod(0o755)


@pytest.mark.parametrize("value", ["off", "OFF", "0"])
def test_off_decodes_every_time_and_writes_nothing(cache, tmp_path, data, decoder, monkeypatch, value):
    cfg = _cfg(data)
    load_dataset(cfg)
    decoder.refuse()
    load_dataset(cfg)  # on, it hits
    decoder.allow()
    for p in _entries(cache):
        p.unlink()
    monkeypatch.setenv(folder_cache.CACHE_ENV, value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    calls = decoder.calls
    first, second = load_dataset(cfg), load_dataset(cfg)
    assert decoder.calls == calls + 8
    _assert_same(first, second)
    assert _entries(cache) == [] and not (tmp_path / "xdg").exists() and not (tmp_path / "home").exists()


def test_racy_files_are_decoded_but_not_cached(cache, data, decoder, monkeypatch):
    """A file stamped within SETTLE_NS of the listing could change again in the same clock tick with the same
    size and stamps; such a folder is not cached until its files have settled."""
    monkeypatch.setattr(folder_cache, "SETTLE_NS", 3600 * 10**9)  # every file here is younger than an hour
    cfg = _cfg(data)
    load_dataset(cfg)
    load_dataset(cfg)
    assert decoder.calls == 8 and _entries(cache) == []
    monkeypatch.setattr(folder_cache, "SETTLE_NS", 0)  # settled
    load_dataset(cfg)
    decoder.refuse()
    load_dataset(cfg)
    assert len(_entries(cache)) == 1


def test_where_the_cache_lives(tmp_path):
    home = Path.home()
    assert folder_cache.cache_dir({}) == home / ".cache" / "diffusion-attribution" / "folders"
    assert folder_cache.cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "diffusion-attribution" / "folders"
    assert folder_cache.cache_dir({"XDG_CACHE_HOME": "relative"}) == home / ".cache" / "diffusion-attribution" / "folders"
    chosen = {folder_cache.CACHE_ENV: str(tmp_path / "mine"), "XDG_CACHE_HOME": "/elsewhere"}
    assert folder_cache.cache_dir(chosen) == tmp_path / "mine"
    assert folder_cache.cache_dir({folder_cache.CACHE_ENV: "off"}) is None


def test_a_killed_writers_temporary_files_are_removed_later(cache, data, monkeypatch):
    load_dataset(_cfg(data))
    (entry,) = _entries(cache)
    old, new = cache / f".{entry.name}.abc.tmp", cache / f".{entry.name}.def.tmp"
    old.write_bytes(b"half an entry")
    new.write_bytes(b"a writer at work")
    os.utime(old, (1, 1))
    _later(data / "cat" / "a.png")
    load_dataset(_cfg(data))  # a miss: rewritten
    assert not old.exists() and new.exists()
    assert _entries(cache) == [entry]
    # QA 36 #4: after a kill mid-write, the rerun writes the entry and every later load is a hit that writes nothing,
    # so a sweep only at a write left the killed writer's 100 MB temporary for good; a hit sweeps too
    os.utime(new, (1, 1))
    decoder = Decoder(monkeypatch)
    decoder.refuse()
    load_dataset(_cfg(data))
    assert not new.exists() and _entries(cache) == [entry]


def test_a_large_or_slow_decode_draws_a_bar_and_a_small_one_does_not(cache, data, capsys, monkeypatch):
    monkeypatch.setenv(folder_cache.CACHE_ENV, "off")
    load_dataset(_cfg(data))
    assert "decoding images" not in capsys.readouterr().err
    monkeypatch.setattr(data_files, "BAR_FILES", 3)
    load_dataset(_cfg(data))
    assert "decoding images in data" in capsys.readouterr().err
    monkeypatch.setattr(data_files, "BAR_FILES", 10**6)
    monkeypatch.setattr(data_files, "BAR_AFTER_S", 0.0)  # a slow decode: the bar starts after the first image
    load_dataset(_cfg(data))
    assert "4/4" in capsys.readouterr().err
    # TQDM_DISABLE=1, which the README offers to silence the bars, disables it (QA 37 #1: the clock's adjustment then
    # raised AttributeError on a disabled bar, which has none)
    from functools import partial

    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", partial(tqdm.auto.tqdm, disable=True))
    assert len(load_dataset(_cfg(data))) == 4 and "decoding images" not in capsys.readouterr().err


class _Clock:
    """``data_files``'s ``time`` module with a monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


def test_the_bars_first_line_counts_the_decode_from_its_start(capsys, monkeypatch):
    """The bar opens after the first image (or after BAR_AFTER_S): its first line must say the time the decode has
    taken and the mean speed over it, not 00:00 and '?' (the constructor drew before the clock was set back), nor,
    after a Ctrl-C just after it opened, the speed of one image (the images before it opened were its ``initial``,
    which tqdm leaves out of the rate)."""
    clock = _Clock()
    monkeypatch.setattr(data_files, "time", clock)
    monkeypatch.setattr(data_files, "BAR_FILES", 1)
    with data_files._DecodeBar(4, Path("/data/pictures")) as bar:
        clock.now += 5.0  # the first image took 5 s
        bar.step()
        first = bar.bar.format_dict
        lines = [line for line in capsys.readouterr().err.split("\r") if line.strip()]
        assert lines and "1/4" in lines[0] and "00:05" in lines[0] and "5.00s/img" in lines[0], lines
        assert first["initial"] == 0 and first["n"] == 1 and 4.9 < first["elapsed"] < 6.0
        clock.now += 1.0
        bar.step()  # a Ctrl-C now: the final line's speed is the decode's, about 2 images in 6 s
    final = capsys.readouterr().err.split("\r")[-1]
    assert "2/4" in final and ("00:05" in final or "00:06" in final), final
    rate = bar.bar.format_dict["rate"] or 2 / bar.bar.format_dict["elapsed"]
    assert 0.2 < rate < 0.5, (rate, final)


# --- pruning: entries of folders no longer used go, and the cache keeps under its cap --------------------------------

DAY = 86400


def _fake_entry(cache: Path, name: str, days_unused: float, size: int = 1000) -> Path:
    """A file named as an entry (``entry_path``'s pattern), last used ``days_unused`` ago: a renamed or deleted
    folder's entry, which no load reads any more."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{name}-c3-s6-{'0123456789abcdef0123'}.npz"
    path.write_bytes(b"x" * size)
    t = time.time() - days_unused * DAY
    os.utime(path, (t, t))
    return path


def test_a_hit_marks_its_entry_used(cache, data, decoder):
    load_dataset(_cfg(data))
    (entry,) = _entries(cache)
    long_ago = time.time() - 40 * DAY
    os.utime(entry, (long_ago, long_ago))
    decoder.refuse()
    load_dataset(_cfg(data))  # a hit
    assert entry.stat().st_mtime > time.time() - 60  # so pruning sees it used today


def test_entries_unused_for_30_days_are_removed_at_a_write(cache, data, decoder):
    """A renamed or deleted folder's entry stayed for good; now a write removes entries unused for 30 days (a hit
    counts as a use, above), and never a file that is not an entry: the folder may be one the user shares."""
    gone = _fake_entry(cache, "renamed", days_unused=31)
    recent = _fake_entry(cache, "other", days_unused=29)
    theirs = [cache / "notes.npz", cache / "results-c3-s6-x.npz", cache / "readme.txt"]
    for p in theirs:
        p.write_bytes(b"not ours")
        os.utime(p, (1, 1))
    stale_tmp = cache / f".{gone.name}.k3j4.tmp"  # a killed writer's temporary of a folder never loaded again
    stale_tmp.write_bytes(b"half")
    os.utime(stale_tmp, (1, 1))
    load_dataset(_cfg(data))  # a miss: written, then the cache pruned
    written = [p for p in _entries(cache) if p.name.startswith("data-")]
    assert len(written) == 1
    assert not gone.exists() and not stale_tmp.exists()
    assert recent.exists() and all(p.exists() for p in theirs)
    decoder.refuse()
    load_dataset(_cfg(data))


def test_the_cache_keeps_under_its_cap_removing_the_least_recently_used_first(cache, data, decoder, monkeypatch):
    load_dataset(_cfg(data))
    (entry,) = _entries(cache)
    size = entry.stat().st_size
    oldest = _fake_entry(cache, "oldest", days_unused=3)
    middle = _fake_entry(cache, "middle", days_unused=2)
    newest = _fake_entry(cache, "newest", days_unused=1)
    monkeypatch.setenv(folder_cache.MAX_GB_ENV, repr((size + 2500) / 2**30))  # room for the entry and two others
    _later(data / "cat" / "a.png")
    load_dataset(_cfg(data))  # rewritten: 3000 bytes of others with it is over the cap
    assert not oldest.exists() and middle.exists() and newest.exists() and entry.exists()
    # a cap below the entry being written: every other entry goes, never that one (it is the one in use)
    monkeypatch.setenv(folder_cache.MAX_GB_ENV, "0")
    _later(data / "dog" / "c.png")
    load_dataset(_cfg(data))
    assert _entries(cache) == [entry]
    decoder.refuse()
    load_dataset(_cfg(data))  # and it is still read


@pytest.mark.parametrize("value", ["lots", "-1", "nan"])
def test_a_cap_that_is_not_a_size_is_said_once_and_the_default_kept(cache, monkeypatch, value):
    monkeypatch.setenv(folder_cache.MAX_GB_ENV, value)
    with pytest.warns(UserWarning, match=rf"ATTRIBUTION_DATA_CACHE_MAX_GB='{value}' is not a size in GiB.*4 GiB"):
        assert folder_cache.max_bytes() == 4 * 2**30
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert folder_cache.max_bytes() == 4 * 2**30
    assert folder_cache.max_bytes({folder_cache.MAX_GB_ENV: "0.5"}) == 2**29
    assert folder_cache.max_bytes({}) == 4 * 2**30


def test_another_process_pruning_or_using_entries_meanwhile_is_no_error(cache, data, decoder, monkeypatch):
    """Processes share the cache: an entry may vanish between the key and the read (a miss, decoded again), or
    after the read, before it is marked used; a listed entry may vanish before it is removed, or be used again
    (its mtime moved), which keeps it."""
    cfg = _cfg(data)
    load_dataset(cfg)
    (entry,) = _entries(cache)
    real_key, real_read = folder_cache.folder_key, folder_cache.read_entry

    def key_then_removed(*a, **k):
        out = real_key(*a, **k)
        entry.unlink()  # another process pruned it just now
        return out

    monkeypatch.setattr(folder_cache, "folder_key", key_then_removed)
    calls = decoder.calls
    load_dataset(cfg)
    assert decoder.calls == calls + 4 and entry.exists()  # a miss, rewritten
    monkeypatch.setattr(folder_cache, "folder_key", real_key)

    def read_then_removed(path, *a, **k):
        out = real_read(path, *a, **k)
        path.unlink()
        return out

    monkeypatch.setattr(folder_cache, "read_entry", read_then_removed)
    decoder.refuse()
    load_dataset(cfg)  # read whole, then removed before it was marked used: no error
    monkeypatch.setattr(folder_cache, "read_entry", real_read)
    decoder.allow()

    vanished = _fake_entry(cache, "vanishing", days_unused=40)
    used_again = _fake_entry(cache, "used-again", days_unused=40)
    real_listed = folder_cache._listed

    def listed_then_changed(folder, name):
        out = real_listed(folder, name)
        if name is folder_cache._ENTRY_NAME:
            vanished.unlink(missing_ok=True)
            if used_again.exists():
                os.utime(used_again)
        return out

    monkeypatch.setattr(folder_cache, "_listed", listed_then_changed)
    _later(data / "cat" / "a.png")
    load_dataset(cfg)  # a write, then a prune that finds one entry gone and one used since the listing
    assert not vanished.exists() and used_again.exists()
