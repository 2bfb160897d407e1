"""How large the Explore page's thumbnails are, so that each method's grid shows several per row.

Why: the server never learns the browser's width, and Streamlit lays a list of images out as a wrapping
row with a fixed 16 px gap.  At 1280 px with the sidebar open, five bordered method columns are about
118 px wide inside, so the 72 px thumbnails (8x8 digits at 8x, framed) stood one per row: a method's
top-k was a tall single column and the page was very long (QA round 15, A3).  The grid is therefore
sized for the narrowest window the explorer is demoed in (``DESIGN_WIDTH``): when the full thumbnails
(captioned "#index · label · score") would stand fewer than ``MIN_PER_ROW`` to a row there, they shrink
and their captions shorten to the training index, which fits their width (the scores move to a table
under the grids).  Wider windows fit more per row on their own (the row wraps in the browser).

The figures below are Streamlit's wide layout, measured in Chromium (``st.columns(border=True)``).
No Streamlit import here: the geometry is testable without a server.
"""

from __future__ import annotations

from dataclasses import dataclass

DESIGN_WIDTH = 1280  # the narrowest window the grids are laid out for (a laptop demo)
SIDEBAR = 300  # the open sidebar
PAGE_PAD = 80  # the main block's padding on each side (wide layout)
SCROLLBAR = 15  # a classic (non-overlay) vertical scrollbar: the page is always taller than the window
GAP = 16  # between columns (gap "small") and between the images of one st.image list
COLUMN_PAD = 15  # inside a bordered column, each side
FRAME = 4  # the white frame around each thumbnail (images.display(..., border=FRAME))
CELL = 64  # the full thumbnail's image side: a whole multiple of the data's side near this
MIN_PER_ROW = 2
# the narrowest thumbnail whose full caption wraps between its fields, not inside the score: "#1372 · 1 ·" and
# "+4.05e-02" are each 57 px in the caption's 14 px font
FULL_CAPTION = 60
# a label's letters in the caption's 14 px font, with room to spare: "automobil" filled the 72 px CIFAR cell and
# "automobile" broke inside the word, "automobil / e", in every column (QA 54 F8)
LABEL_CHAR_PX = 8


def label_chars(width: int) -> int:
    """How many characters of a label a full caption's line holds in a cell ``width`` px wide (``_caption``
    shortens a longer one with an ellipsis, rather than let the browser break it inside the word)."""
    return max(3, int(width // LABEL_CHAR_PX))


def cell_size(side: int) -> int:
    """Full thumbnail side: a whole multiple of the image side near CELL, so browsers never resample
    (8x8: 64 px; 28x28 MNIST: 56 px; 32x32: 64 px)."""
    return side * max(1, CELL // side)


def column_inner_width(n_columns: int, window: int = DESIGN_WIDTH) -> float:
    """The width inside one of ``n_columns`` bordered columns side by side in a window ``window`` px wide."""
    content = window - SIDEBAR - 2 * PAGE_PAD - SCROLLBAR
    return (content - GAP * (n_columns - 1)) / n_columns - 2 * COLUMN_PAD


def per_row(inner: float, width: int) -> int:
    """How many images ``width`` px wide one wrapping st.image row holds in ``inner`` px."""
    return max(1, int((inner + GAP) // (width + GAP)))


@dataclass(frozen=True)
class Thumbnails:
    """The size of the method grids' thumbnails: ``image`` px of picture (upscaled from the data), ``width``
    px on the page with its frame (what st.image is given), and whether the captions are the short ones."""

    image: int
    width: int
    compact: bool

    def per_row(self, n_methods: int, window: int = DESIGN_WIDTH) -> int:
        """Thumbnails per row in each of ``n_methods`` columns in a window ``window`` px wide."""
        return per_row(column_inner_width(n_methods, window), self.width)


def thumbnails(n_methods: int, side: int, window: int = DESIGN_WIDTH) -> Thumbnails:
    """The thumbnails for ``n_methods`` columns of images ``side`` px on a side: the full ones when
    ``MIN_PER_ROW`` fit a row at ``window``, else the largest that do, with short captions when the full
    ones would not fit their width.

    A smaller image keeps a whole multiple of ``side`` when one is near the size that fits (8x8 digits:
    40 px, each pixel 5 px); otherwise (28x28 at 43 px) the browser scales the next larger multiple down,
    which blurs less than stretching a small one up."""
    full = cell_size(side)
    inner = column_inner_width(n_methods, window)
    if per_row(inner, full + 2 * FRAME) >= MIN_PER_ROW:
        return Thumbnails(full, full + 2 * FRAME, False)
    fits = int((inner - GAP * (MIN_PER_ROW - 1)) // MIN_PER_ROW) - 2 * FRAME
    whole = side * (fits // side)
    image = max(whole if whole >= 0.75 * fits else fits, 16)  # ten columns would not fit two anyway
    return Thumbnails(image, image + 2 * FRAME, image + 2 * FRAME < FULL_CAPTION)
