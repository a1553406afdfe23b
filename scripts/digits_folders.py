"""Write scikit-learn's handwritten digits (1,797 real 8x8 scans, shipped inside the package) as
`train/<digit>/*.png` and `val/<digit>/*.png`: a small real data set for the demo.

    python scripts/digits_folders.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def load_digits():
    """The scans and their labels, and an order of them fixed by seed 0 that every split here draws from."""
    from sklearn.datasets import load_digits as load

    digits = load()
    return digits.images, digits.target, np.random.default_rng(0).permutation(len(digits.target))


def save_digits(out_dir: Path, images: np.ndarray, labels: np.ndarray, split: dict[int, str],
                size: int = 64) -> Path:
    """Each scan `index` in `split` as `out_dir/<split[index]>/<label>/<index>.png`, `size` pixels square."""
    for index, part in split.items():
        folder = out_dir / part / str(labels[index])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (images[index] * (255 / 16)).astype(np.uint8)  # values are 0..16
        Image.fromarray(pixels).resize((size, size), Image.BICUBIC).save(folder / f"{index:04d}.png")
    return out_dir


def write_digits(out_dir: Path, val_fraction: float = 0.2, size: int = 64) -> Path:
    images, labels, order = load_digits()
    n_val = int(len(order) * val_fraction)
    split = {int(index): "val" if rank < n_val else "train" for rank, index in enumerate(order)}
    return save_digits(out_dir, images, labels, split, size)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(write_digits(Path(sys.argv[1])))
