"""Fault injection on the upload path (issue 14, findings 2 and 9): oversized and odd images.

Memory is measured as the growth of a subprocess's peak RSS (``ru_maxrss``) while it turns the
upload into a query image, because Pillow's pixel buffers are C allocations that ``tracemalloc``
does not see.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.attribution.query import QueryError, image_to_model
from engine.attribution.query import open_image as _open_image
from engine.attribution.upload_guard import MAX_PIXELS

REPO = Path(__file__).resolve().parents[1]


def _flat_png(width: int, height: int, rgba=(255, 255, 255, 0)) -> bytes:
    """An RGBA PNG of one colour written row by row (never holds the decoded image in memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + bytes(rgba) * width
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _to_query(data: bytes, channels: int = 1, size: int = 8):
    img = _open_image(data, "upload 'x.png'", size)
    return image_to_model(img, channels, size, 17, True)


def _peak_rss_growth_mib(path: Path) -> dict:
    code = f"""
import json, resource, sys
sys.path.insert(0, {str(REPO)!r})
import numpy, torch, PIL.Image
from engine.attribution.query import image_to_model, open_image as _open_image
data = open({str(path)!r}, "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
img = _open_image(data, "upload", 8)
x, notes = image_to_model(img, 1, 8, 17, True)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"growth_mib": (after - before) / 1024, "peak_mib": after / 1024, "notes": notes,
                   "shape": list(x.shape)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_oversized_png_under_pillows_limit_is_refused_before_decoding():
    data = _flat_png(9000, 9000)  # 81 MP: under Pillow's 179 MP limit, 324 MB decoded
    assert len(data) < 2_000_000
    with pytest.raises(QueryError) as e:
        _to_query(data)
    msg = str(e.value)
    assert "9000x9000" in msg and "megapixels" in msg and "x.png" in msg and "object at 0x" not in msg


def test_worst_accepted_png_peak_memory_is_bounded(tmp_path):
    side = int(MAX_PIXELS**0.5)
    path = tmp_path / "worst.png"
    path.write_bytes(_flat_png(side, side))  # the largest PNG accepted, RGBA: alpha compositing path
    r = _peak_rss_growth_mib(path)
    assert r["shape"] == [1, 8, 8]
    assert any("decoded" in n and "reduced size" in n for n in r["notes"]), r["notes"]
    # 64 MiB for the decoded RGBA buffer plus the PNG decoder's and allocator's working memory (112 MiB
    # measured); the old path composited and converted at full size (2.8 GB for 13,300^2)
    assert r["growth_mib"] < 160, r
    print(f"worst accepted PNG {side}x{side} RGBA: peak RSS growth {r['growth_mib']:.0f} MiB")


@pytest.mark.slow  # encodes a 36 MP JPEG
def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (6000, 6000), (200, 30, 30)).save(path, quality=80)
    r = _peak_rss_growth_mib(path)
    assert r["growth_mib"] < 40, r  # 1/8-scale decode: 750x750, not 108 MB
    assert r["shape"] == [1, 8, 8]


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_odd_images_become_valid_queries():
    odd = {
        "strip 1x3000": Image.new("L", (1, 3000), 200),
        "strip 3000x2": Image.new("RGB", (3000, 2), (10, 20, 30)),
        "16-bit grey": Image.fromarray(np.full((20, 20), 40000, np.uint16)),
        "1-bit": Image.new("1", (16, 16), 1),
        "palette with transparency": Image.new("P", (12, 12), 3),
        "LA": Image.new("LA", (10, 10), (128, 100)),
    }
    odd["palette with transparency"].info["transparency"] = 3
    for name, img in odd.items():
        x, notes = _to_query(_encode(img))
        assert tuple(x.shape) == (1, 8, 8) and bool(x.isfinite().all()), name
        assert float(x.min()) >= -1 and float(x.max()) <= 1, name
    x, _ = _to_query(_encode(odd["16-bit grey"]))
    assert float(x.mean()) < 0.5  # 40000/65535 grey, inverted on the light border: not clipped to white
    cmyk = _encode(Image.new("CMYK", (40, 40), (0, 0, 0, 0)), "JPEG")
    x, _ = _to_query(cmyk, channels=3)
    assert tuple(x.shape) == (3, 8, 8)
    frames = [Image.new("P", (9, 9), i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert tuple(_to_query(buf.getvalue())[0].shape) == (1, 8, 8)


@pytest.mark.parametrize(
    "data",
    [b"", b"GIF89a" + b"\x00" * 5, b"%PDF-1.4 not a picture", None],
    ids=["empty", "truncated-gif", "pdf", "truncated-png"],
)
def test_unreadable_uploads_give_a_clean_message(data):
    if data is None:
        data = _encode(Image.new("RGB", (64, 64), (1, 2, 3)))[:60]
    with pytest.raises(QueryError) as e:
        _to_query(data)
    msg = str(e.value)
    assert "x.png" in msg and "object at 0x" not in msg and "BytesIO" not in msg, msg


def test_deep_palette_and_bilevel_uploads_match_their_8bit_grey_version():
    """Large 16-bit, 32-bit, float, palette and 1-bit uploads go through the shrinking step (Pillow's
    ``reduce`` refused "I;16": "image has wrong mode") and come out as the same query as the 8-bit grey
    image they show (a float TIFF in [0, 1] used to come out black)."""
    yy, xx = np.mgrid[:512, :512]
    ring = np.abs(np.hypot(yy - 256, xx - 256) - 150) < 40  # a light "0" on black, like the digits
    grey = np.where(ring, 255, 0).astype(np.uint8)
    want, _ = _to_query(_encode(Image.fromarray(grey)))
    uploads = {
        "16-bit PNG": _encode(Image.fromarray(grey.astype(np.uint16) * 257)),
        "32-bit TIFF": _encode(Image.fromarray(grey.astype(np.int32)), "TIFF"),
        "float TIFF": _encode(Image.fromarray(grey.astype(np.float32) / 255), "TIFF"),
        "palette PNG": _encode(Image.fromarray(grey).convert("P")),
        "1-bit PNG": _encode(Image.fromarray(grey).convert("1", dither=Image.Dither.NONE)),
        "grey+alpha PNG": _encode(Image.fromarray(grey).convert("LA")),
    }
    for name, data in uploads.items():
        x, notes = _to_query(data)
        assert any("reduced size" in n for n in notes), name  # the shrinking step ran
        assert float((x - want).abs().max()) <= 0.126, (name, notes)  # at most one of the 17 grey levels


def test_a_file_that_is_no_image_says_so():
    with pytest.raises(QueryError, match="upload 'x.png' is not a readable image: .*not an image file PIL can read"):
        _to_query(b"hello, this is a text file named x.png")
