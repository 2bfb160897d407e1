"""Which query images get their classifier label called a guess (``copycheck.training_spread``).

The query note says "the classifier's label is a guess" for an image farther from every training image
than any of 256 sampled training images is from its nearest.  This prints, per preset: that bound; the
nearest-training-image distance of a blank, a white and a noise image (uploaded as PNG bytes, as the app
does) and whether each is flagged; and how many of the shipped gallery samples are flagged (none should
be: they are the model's own samples).

    python scripts/label_guess_check.py --presets digits,mnist
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's engine

from engine.attribution.copycheck import pixel_distances, training_spread  # noqa: E402
from engine.attribution.session import AttributionSession  # noqa: E402
from engine.config import get_preset  # noqa: E402
from engine.paths import default_checkpoint  # noqa: E402

GUESS = "is a guess"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="digits,mnist")
    p.add_argument("--cache-root", default="cache", help="only read (no method is built)")
    args = p.parse_args()
    from PIL import Image

    for name in args.presets.split(","):
        s = AttributionSession(get_preset(name), checkpoint=str(default_checkpoint(name)), cache_root=args.cache_root,
                               auto_build=False)
        train = s.dataset.images
        bound, sample = training_spread(train)
        n = s.preset.model.image_size
        print(f"{name}: bound {bound:.3f} (largest nearest-neighbour distance of {sample} training images)")
        uploads = {"blank": np.zeros((n, n), np.uint8), "white": np.full((n, n), 255, np.uint8),
                   "noise": np.random.default_rng(0).integers(0, 256, (n, n), dtype=np.uint8)}
        for what, arr in uploads.items():
            buf = io.BytesIO()
            Image.fromarray(arr, "L").save(buf, format="PNG")
            q = s.query_from_upload(buf.getvalue(), name=what)
            d = float(pixel_distances(q.image[None], train).min())
            print(f"  upload {what:<6} nearest {d:.3f}  label {q.label}  flagged {any(GUESS in x for x in q.notes)}")
        gallery = s.gallery()
        nearest = [float(pixel_distances(it.image[None], train).min()) for it in gallery]
        flagged, worst = sum(d > bound for d in nearest), max(nearest)
        print(f"  gallery: {flagged} of {len(gallery)} flagged (largest nearest distance {worst:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
