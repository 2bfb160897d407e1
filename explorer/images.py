"""Image helpers for display: tensors in [-1, 1] -> uint8 arrays, nearest-neighbour upscaling, PNG sheets.

Why nearest-neighbour: the digits are 8x8; any smoothing filter turns them into blurs,
while repeating pixels keeps what the model actually sees.  No Streamlit here, so the
helpers are testable and reusable by scripts.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

if TYPE_CHECKING:  # images are tensors or arrays; this module needs only numpy
    import torch


def to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(C,H,W) or (H,W) tensor/array in [-1, 1] -> (H,W) or (H,W,3) uint8."""
    x = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        if x.shape[0] == 1:
            x = x[0]
        else:
            x = np.transpose(x, (1, 2, 0))
    x = np.clip((x + 1.0) * 0.5, 0.0, 1.0)
    return (x * 255.0 + 0.5).astype(np.uint8)


def upscale(array: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour upscale so the longer side is at least ``size`` pixels (integer factor)."""
    h, w = array.shape[:2]
    factor = max(1, int(np.ceil(size / max(h, w))))
    return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def display(image: torch.Tensor | np.ndarray, size: int = 96, border: int = 0) -> np.ndarray:
    """A tensor in [-1, 1] ready for ``st.image``: uint8, large enough to see, optionally framed in white.

    The white frame keeps dark-background thumbnails from merging into one block when
    Streamlit lays a list of images edge to edge.
    """
    out = upscale(to_uint8(image), size)
    if border > 0:
        pad = ((border, border), (border, border)) + (((0, 0),) if out.ndim == 3 else ())
        out = np.pad(out, pad, constant_values=255)
    return out


@dataclass
class SheetRow:
    """One row of a PNG sheet: a title and images with one caption line each."""

    title: str
    images: Sequence[np.ndarray]  # uint8 (H,W) or (H,W,3)
    captions: Sequence[str]


def _rgb(array: np.ndarray) -> Image.Image:
    img = Image.fromarray(array)
    return img.convert("RGB")


TITLE_PX, CAPTION_PX = 14, 12  # font sizes of the PNG sheet: readable at 100 % next to 72 px thumbnails


def sheet_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """A scalable font of ``size`` pixels, bundled with Pillow (>= 10.1, with FreeType): nothing to download.

    Why: Pillow's plain ``load_default()`` is a 10-pixel font (an 11-pixel bitmap one without FreeType),
    too small to read in a saved sheet.  Without FreeType (or on an older Pillow) the bitmap font is what
    there is: the sheet is still drawn, with small text."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 has no size; no FreeType: no scalable font
        return ImageFont.load_default()


def compose_sheet(
    rows: Sequence[SheetRow], cell: int = 72, pad: int = 6, heading: Sequence[str] = ()
) -> Image.Image:
    """Compose titled rows of captioned thumbnails into one white PNG-ready image (wide enough for every title
    and heading line).  ``heading``: lines of small text above the rows (what the scores were computed with)."""
    title_font, caption_font = sheet_font(TITLE_PX), sheet_font(CAPTION_PX)
    title_h, caption_h = TITLE_PX + 8, CAPTION_PX + 3
    ncol = max((len(r.images) for r in rows), default=1)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widest = max((probe.textlength(r.title, font=title_font) for r in rows), default=0.0)
    widest = max([widest, *(probe.textlength(line, font=caption_font) for line in heading)])
    width = max(pad + ncol * (cell + pad), 2 * pad + int(widest + 1), 200)
    row_h = title_h + cell + 2 * caption_h + pad
    head_h = len(heading) * caption_h + (pad if heading else 0)
    sheet = Image.new("RGB", (width, pad + head_h + len(rows) * row_h), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    for line in heading:
        draw.text((pad, y), line, fill=(60, 60, 60), font=caption_font)
        y += caption_h
    y += pad if heading else 0
    for row in rows:
        draw.text((pad, y), row.title, fill=(0, 0, 0), font=title_font)
        for j, (arr, cap) in enumerate(zip(row.images, row.captions, strict=False)):
            x = pad + j * (cell + pad)
            thumb = _rgb(upscale(arr, cell)).resize((cell, cell), Image.NEAREST)
            sheet.paste(thumb, (x, y + title_h))
            for k, line in enumerate(cap.split("\n")[:2]):
                draw.text((x, y + title_h + cell + 2 + k * caption_h), line, fill=(60, 60, 60), font=caption_font)
        y += row_h
    return sheet


def png_bytes(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    """PNG bytes; ``text``: key -> value stored as the PNG's text chunks (``Image.open(f).text`` reads them)."""
    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_itxt(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()
