"""Build the panel of small real-image data sets that defaults are judged on, as image folders
`OUT_DIR/<set>/{train,val}/<class>/<image>.png`; every set is the same on every run (fixed seeds).

    python benchmarks/panel_datasets.py /tmp/panel
    python benchmarks/panel_datasets.py /tmp/panel --sets digits30,stamps

The sets and where their images come from:

- `digits30`: scikit-learn's handwritten digits (`sklearn.datasets.load_digits`: 1,797 8x8 grey scans of
  digits written by 43 people, from the UCI "Optical Recognition of Handwritten Digits" data set, shipped
  inside scikit-learn), upscaled to 64x64 PNG as `digits_folders.py` writes them: 30 training images a class
  and 50 validation images a class (500: validating all ~1,500 others took a minute an epoch on a 2-core CPU).
  Few images a class.
- `digits`: the same scans split 80/20 exactly as `digits_folders.py` splits them (1,438 train, 359 val).
- `digits_imbalanced`: digits' validation set, and a long-tailed subset of its training set: class k keeps
  round(100 * 0.6**k) images, at least 5 (100, 60, 36, 22, 13, 8, 5, 5, 5, 5).
- `stamps`: drawings from the Tux Paint project's stamp collection, Debian's `tuxpaint-stamps-default`
  (GPL-2; built and checked with 2022.06.04-1, whose 802 PNGs `apt-get install tuxpaint-stamps-default`
  puts under /usr/share/tuxpaint/stamps/<category>/...). 25 classes, each a folder of that tree with its
  sub-folders (STAMP_CLASSES), leaving out the `_mirror` copies of stamps: 11 to 67 images a class, so
  naturally imbalanced. Transparency on white, short side at most 256 px; 75/25 per class, at least 3
  validation images a class.
- `photos` (10 classes of photographs, 163 train / 57 val) and `many_classes` (120 classes of CJK characters in
  15 typefaces, 8 train / 2 val a class): from Debian packages, panel_debian_sets.py says which and how; so
  are the sets built only on request, `thousand_classes` and the held-out `paintings`.
- `hymenoptera` (not built here): the listing's own example set, ants and bees photos, read where it lies
  (local_job.hymenoptera_data(): $HYMENOPTERA_DATA, else data/hymenoptera_data in the repository).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

import panel_debian_sets
from local_job import HYMENOPTERA, HYMENOPTERA_HOW  # first: it finds scripts/, where digits_folders lives
from digits_folders import load_digits, save_digits, write_digits  # noqa: E402

STAMPS = Path("/usr/share/tuxpaint/stamps")
# Folders of Tux Paint's tree with 11 or more stamps, each a class with its sub-folders: a folder's cartoon/
# versions, or upper and lower case of one letter style, are one kind of picture, not classes to tell apart.
STAMP_CLASSES = {
    "birds": "animals/birds", "fish": "animals/fish", "insects": "animals/insects", "mammals": "animals/mammals",
    "clothes": "clothes", "fruit": "food/fruit", "vegetables": "food/vegetables", "instruments": "hobbies/music",
    "tools": "household/tools", "flowers": "plants/flowers", "christmas": "seasonal/christmas",
    "easter": "seasonal/easter", "halloween": "seasonal/halloween", "space": "space", "sports": "sports",
    "sign_language": "symbols/alphabets/asl", "letters_filled": "symbols/alphabets/english/filled",
    "letters_outlined": "symbols/alphabets/english/outlined", "chess": "symbols/chess", "math": "symbols/math",
    "money": "symbols/money", "music_notation": "symbols/music", "houses": "town/houses",
    "road_signs": "town/roadsigns", "vehicles": "vehicles",
}
STAMP_MAX_SIDE = 256
DIGITS_FEW, DIGITS_FEW_VAL = 30, 50


def _digits30(out: Path) -> None:
    images, labels, order = load_digits()
    taken: dict[int, int] = {}
    split = {}
    for index in map(int, order):
        taken[labels[index]] = taken.get(labels[index], 0) + 1
        if taken[labels[index]] <= DIGITS_FEW + DIGITS_FEW_VAL:
            split[index] = "train" if taken[labels[index]] <= DIGITS_FEW else "val"
    save_digits(out, images, labels, split)


def _digits(out: Path) -> None:
    write_digits(out)


def _digits_imbalanced(out: Path) -> None:
    images, labels, order = load_digits()
    n_val = int(len(order) * 0.2)  # digits_folders' split: its validation set, and its training set thinned
    split = {int(index): "val" for index in order[:n_val]}
    kept: dict[int, int] = {}
    for index in map(int, order[n_val:]):
        label = int(labels[index])
        kept[label] = kept.get(label, 0) + 1
        if kept[label] <= max(5, round(100 * 0.6 ** label)):
            split[index] = "train"
    save_digits(out, images, labels, split)


def _stamps(out: Path) -> None:
    from efficientnet_train.decoding import load_image  # the job's decoding: transparency shown on white

    if not STAMPS.is_dir():
        sys.exit(f"The 'stamps' set needs Tux Paint's stamps, and {STAMPS} is missing. Install them with "
                 f"`apt-get update && apt-get install -y tuxpaint-stamps-default` (Debian or Ubuntu, as root).")
    rng = np.random.default_rng(0)
    for name, folder in STAMP_CLASSES.items():
        # A `_mirror` stamp is another's left-right copy: in val beside its original in train it would be no test.
        files = sorted(path for path in (STAMPS / folder).rglob("*.png") if not path.stem.endswith("_mirror"))
        n_val = max(3, round(0.25 * len(files)))
        for rank, position in enumerate(rng.permutation(len(files))):
            source = files[position]
            image = load_image(str(source))
            scale = STAMP_MAX_SIDE / min(image.size)
            if scale < 1:
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
            target = out / ("val" if rank < n_val else "train") / name
            target.mkdir(parents=True, exist_ok=True)
            # The path within the class folder, as cartoon/ sub-folders reuse the names of their parents' stamps.
            image.save(target / "_".join(source.relative_to(STAMPS / folder).parts))


BUILDERS: dict[str, Callable[[Path], None]] = {
    "digits30": _digits30, "digits": _digits, "digits_imbalanced": _digits_imbalanced, "stamps": _stamps,
    "photos": panel_debian_sets.photos, "many_classes": panel_debian_sets.many_classes,
    "thousand_classes": panel_debian_sets.thousand_classes, "paintings": panel_debian_sets.paintings}
# Built on request only: thousand_classes times the probe phase (its epochs are long on a CPU); paintings is held
# out, a check of the defaults on a set none of them was chosen on.
EXTRA = ("thousand_classes", "paintings")
# What every default is judged on.
PANEL = (*(name for name in BUILDERS if name not in EXTRA), "hymenoptera")


def build(name: str, out_dir: Path) -> Path:
    """Write the set `name` as `out_dir/name`, replacing what is there; built aside first, so that an
    interrupted build never looks like a finished set."""
    partial = out_dir / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    BUILDERS[name](partial)
    shutil.rmtree(out_dir / name, ignore_errors=True)
    partial.rename(out_dir / name)
    return out_dir / name


def locate(name: str, out_dir: Path) -> Path:
    """The folder of the set `name` (holding train/ and val/), built in `out_dir` if it is not there yet."""
    if name == "hymenoptera":
        if not (HYMENOPTERA / "train").is_dir():
            sys.exit(f"hymenoptera is not at {HYMENOPTERA} (train/ and val/ expected there): {HYMENOPTERA_HOW}")
        return HYMENOPTERA
    if name not in BUILDERS:
        sys.exit(f"unknown set {name!r}; the panel: {', '.join(PANEL)}; on request: {', '.join(EXTRA)}")
    return out_dir / name if (out_dir / name / "train").is_dir() else build(name, out_dir)


def counts(folder: Path) -> dict[str, dict[str, int]]:
    """Images a class in each split: {"train": {class: n}, "val": {...}}."""
    return {split: {c.name: sum(1 for f in c.rglob("*") if f.is_file())
                    for c in sorted((folder / split).iterdir()) if c.is_dir()} for split in ("train", "val")}


def describe(name: str, folder: Path) -> str:
    per_class = counts(folder)
    train, val = per_class["train"], per_class["val"]
    return (f"{name}: {len(train)} classes, {sum(train.values())} train ({min(train.values())}-"
            f"{max(train.values())} a class), {sum(val.values())} val ({min(val.values())}-{max(val.values())} "
            f"a class) in {folder}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--sets", default=",".join(BUILDERS), help=f"comma-separated, of {', '.join(BUILDERS)}")
    options = parser.parse_args()
    options.out_dir.mkdir(parents=True, exist_ok=True)
    for name in options.sets.split(","):
        if name not in BUILDERS:
            parser.error(f"unknown set {name!r}; choose from {', '.join(BUILDERS)}")
        print(describe(name, build(name, options.out_dir)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
