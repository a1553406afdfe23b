"""Write scikit-learn's handwritten digits (1,797 real 8x8 scans, shipped inside the package) as
`train/<digit>/*.png` and `val/<digit>/*.png`: a small real data set for the demo.

    python scripts/digits_folders.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(out_dir: Path, val_fraction: float = 0.2, size: int = 64) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    n_val = int(len(order) * val_fraction)
    for rank, index in enumerate(order):
        split = "val" if rank < n_val else "train"
        folder = out_dir / split / str(digits.target[index])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[index] * (255 / 16)).astype(np.uint8)  # values are 0..16
        Image.fromarray(pixels).resize((size, size), Image.BICUBIC).save(folder / f"{index:04d}.png")
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(write_digits(Path(sys.argv[1])))
