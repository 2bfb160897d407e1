"""Opening uploaded images with bounded memory (issue 14, finding 2).

A PNG of 13,300 x 13,300 RGBA is 687 KB on disk (a flat colour compresses ~1000x) but 707 MB
decoded, and compositing its alpha and converting it used to take 2.8 GB, all to make an 8 x 8
query.  Pillow's own limit (179 megapixels) lets it through.  Here:

1. the declared size is read from the header (``Image.open`` decodes nothing yet) and checked
   against our own limits before any pixel is decoded: ``MAX_PIXELS`` (16.8 MP, 4096^2; at most
   64 MiB decoded as RGBA) for formats that must be decoded in full, ``MAX_JPEG_PIXELS`` (100 MP)
   for JPEG, which is decoded at 1/2..1/8 scale (``Image.draft``, DCT scaling) straight to a size
   near what the query needs;
2. after decoding, the image is shrunk by an integer factor (``Image.reduce``, box filter) to at
   most ``REDUCE_TO`` x the model's side before alpha compositing or colour conversion, so those
   copies are small.

Peak memory of the worst accepted upload (a 4096 x 4096 RGBA PNG) is measured by
``tests/test_faults_upload.py`` (RSS of a subprocess) and reported in the README.
"""

from __future__ import annotations

import io
from typing import Any

MAX_PIXELS = 4096 * 4096
MAX_JPEG_PIXELS = 100_000_000
REDUCE_TO = 8  # keep at least 8x the model's side before the final resize (the antialiasing has data)
FORMATS = ("PNG", "JPEG", "MPO", "BMP", "GIF", "WEBP", "TIFF")


class UploadError(ValueError):
    """An upload that is not an image we read, or too large; the message says what and the limit."""


def open_bounded(data: bytes, what: str, target_side: int) -> Any:
    """Decode ``data`` into a PIL image no larger than needed for a ``target_side`` square query.

    Raises ``UploadError`` (a ValueError) naming ``what`` for unreadable, unsupported or oversized
    images; never decodes more than ``MAX_PIXELS`` pixels (JPEG: its draft size).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        raise UploadError(
            f"{what} is not a readable image: its content is not an image file PIL can read "
            "(upload a PNG or JPEG image)"
        ) from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UploadError(f"{what} is not a readable PNG or JPEG image ({_describe(e)})") from None
    if img.format not in FORMATS:
        raise UploadError(f"{what} is a {img.format} file; upload a PNG or JPEG image")
    w, h = img.size
    if w < 1 or h < 1:
        raise UploadError(f"{what} has no pixels ({w}x{h})")
    is_jpeg = img.format in ("JPEG", "MPO")
    limit = MAX_JPEG_PIXELS if is_jpeg else MAX_PIXELS
    if w * h > limit:
        raise UploadError(
            f"{what} is {w}x{h} pixels ({w * h / 1e6:.0f} megapixels); the limit for {img.format} is "
            f"{limit / 1e6:.1f} megapixels (the model takes {target_side}x{target_side}): downscale it first"
        )
    want = max(1, target_side * REDUCE_TO)
    if is_jpeg and img.mode in ("L", "RGB", "CMYK", "YCbCr"):
        img.draft(img.mode if img.mode == "L" else "RGB", (want, want))  # decode at 1/2..1/8 scale
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UploadError(f"{what} is not a readable image: the {img.format} file is damaged or cut short "
                          f"({_describe(e)})") from None
    factor = min(img.size) // want
    if factor >= 2:
        img = reducible(img).reduce(factor)
    if img.size != (w, h):
        img.info["original_size"] = (w, h)  # for the notes shown with the query
    return img


def reducible(img: Any) -> Any:
    """``img`` in a mode Pillow's ``reduce`` averages correctly, with the same content.

    Why: ``reduce`` refuses 16-bit grey ("I;16": "image has wrong mode"), palette and 1-bit images,
    and would average a "PA" image's palette indices.  16-bit becomes 32-bit "I" (values kept:
    ``query.image_to_model`` scales them by 65535), palette images RGB or RGBA (transparency kept),
    1-bit L.  ``info["source_mode"]`` keeps the uploaded mode for the notes shown with the query."""
    mode = img.mode
    if mode.startswith("I;16"):
        out = img.convert("I")
    elif mode in ("P", "PA"):
        out = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
    elif mode == "1":
        out = img.convert("L")
    else:
        return img
    out.info["source_mode"] = mode
    return out


def _describe(e: BaseException) -> str:
    """An exception's message without object reprs (``<_io.BytesIO object at 0x...>``)."""
    import re

    text = re.sub(r"<[^<>]* object at 0x[0-9a-fA-F]+>", "the data", str(e))
    return text or type(e).__name__
