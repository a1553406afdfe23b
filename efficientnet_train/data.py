"""Image folders in, batches out: channel scanning, the dataset and the transforms.

`eval_transform` is the one definition of evaluation preprocessing: validation uses
it during training and serving rebuilds it from the `data_config` stored in the
checkpoint.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import BinaryIO

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import JobError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
# Random-resized crops keep at least a quarter of the image, not ImageNet's 8%: a fine-tune is short and
# a small crop of a photo often misses the object (hymenoptera, Lite2: 95.4 -> 96.1% val top-1).
TRAIN_CROP_SCALE = (0.25, 1.0)
# Random-resized crops make objects look bigger in training than in a whole image, so evaluating a
# little larger matches them again (FixRes; timm's test_input_size does the same for some models).
EVAL_SIZE_RATIO = 1.15


@dataclass
class Channel:
    """One input channel: its images, their labels and what was found there."""

    name: str
    root: Path
    classes: list[str]
    samples: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # files that are not images, relative to root

    def images_per_class(self) -> dict[str, int]:
        counts = Counter(label for _, label in self.samples)
        return {name: counts[index] for index, name in enumerate(self.classes)}

    def formats(self) -> dict[str, int]:
        return dict(sorted(Counter(Path(path).suffix.lower().lstrip(".") for path, _ in self.samples).items()))

    def inventory(self) -> str:
        present = {name: count for name, count in self.images_per_class().items() if count}
        per_class = ", ".join(f"{name}: {count}" for name, count in present.items())
        formats = ", ".join(f"{fmt}: {count}" for fmt, count in self.formats().items())
        lines = [f"channel '{self.name}' ({self.root}): {len(self.samples)} images in {len(present)} classes "
                 f"[{per_class}]; formats [{formats}]"]
        if self.skipped:
            lines.append(f"channel '{self.name}': skipped {len(self.skipped)} files that are not images "
                         f"(e.g. {', '.join(self.skipped[:5])})")
        return "\n".join(lines)


def _visible(name: str) -> bool:
    return not name.startswith(".")


def class_folders(root: Path) -> list[str]:
    # Sorted like torchvision's ImageFolder, so label indices mean the same as there.
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and _visible(entry.name))


def scan_channel(name: str, root: Path, classes: list[str] | None = None) -> Channel:
    """Find `root/<class>/**/<image>`; `classes` fixes the label order (the train channel's)."""
    if not root.is_dir():
        raise JobError(f"The '{name}' channel is missing: no folder at {root}. Give the training job a "
                       f"'{name}' input channel whose S3 prefix holds one folder per class "
                       f"({name}/<label>/<image>.jpg).")
    found = class_folders(root)
    if not found:
        loose = [entry.name for entry in os.scandir(root) if entry.is_file() and _visible(entry.name)]
        where = f"it holds only files ({', '.join(sorted(loose)[:3])}...)" if loose else "it is empty"
        raise JobError(f"The '{name}' channel at {root} has no class folders: {where}. Put each image in a "
                       f"folder named after its label: {name}/<label>/<image>.jpg.")
    if classes is None:
        classes = found
    else:
        unknown = [folder for folder in found if folder not in classes]
        if unknown:
            raise JobError(f"The '{name}' channel has classes that are not in 'train': {', '.join(unknown)}. "
                           f"The model can only learn labels it is trained on; add images of "
                           f"{', '.join(unknown)} to train/, or remove those folders from {name}/.")
    channel = Channel(name, root, list(classes))
    label_index = {label: index for index, label in enumerate(classes)}
    for label in found:
        class_dir = root / label
        before = len(channel.samples)
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if _visible(d))
            for filename in sorted(filenames):
                if not _visible(filename):
                    continue
                path = os.path.join(dirpath, filename)
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    channel.samples.append((path, label_index[label]))
                else:
                    channel.skipped.append(os.path.relpath(path, root))
        if len(channel.samples) == before:
            raise JobError(f"The class folder {class_dir} in the '{name}' channel holds no images "
                           f"({', '.join(e.lower() for e in IMAGE_EXTENSIONS)}). Add images to it or delete it.")
    return channel


class UnreadableImage(ValueError):
    """Bytes that are not a whole, reasonably sized image; the message says which of those."""


def load_image(path: str) -> Image.Image:
    with open(path, "rb") as f:
        try:
            return decode_image(f)
        except UnreadableImage as exc:
            raise UnreadableImage(f"{path}: {exc}") from exc


def decode_image(source: bytes | BinaryIO) -> Image.Image:
    """An RGB image from encoded bytes or a binary file, upright as its EXIF says, fully decoded.

    Refuses what would cost far more memory than its size suggests (decompression bombs) and
    files cut short, instead of returning half an image.
    """
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        with Image.open(source) as image:
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; refuse there too.
            if Image.MAX_IMAGE_PIXELS and image.width * image.height > Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"Image size ({image.width * image.height} pixels) exceeds "
                                                   f"limit of {Image.MAX_IMAGE_PIXELS} pixels")
            image = ImageOps.exif_transpose(image)  # phones store rotation in EXIF, not in pixels
            return image.convert("RGB")  # decodes every pixel: a truncated file fails here, not later
    except Image.DecompressionBombError as exc:
        raise UnreadableImage(f"the image is too large to decode safely: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise UnreadableImage("the data is not an image in a format Pillow reads "
                              "(JPEG, PNG, GIF, BMP, WebP, TIFF, ...)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports a cut-short or corrupt file as OSError ("image file is truncated"), SyntaxError
        # or EOFError depending on the format.
        raise UnreadableImage(f"the image is truncated or corrupt ({exc})") from exc


class ImageDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return self.transform(load_image(path)), label


class TrainBatches(torch.utils.data.Sampler):
    """Training batches of a shuffle fixed by (seed, epoch), so that an interrupted epoch can carry on
    from the batch where it stopped and still see every image once."""

    def __init__(self, num_images: int, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0):
        self.shuffle = torch.utils.data.DistributedSampler(range(num_images), num_replicas=num_replicas, rank=rank,
                                                           shuffle=True, seed=seed)
        self.batch_size, self.skip = batch_size, 0

    def start_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.shuffle.set_epoch(epoch)
        self.skip = skip_batches

    def __len__(self) -> int:
        return len(self.shuffle) // self.batch_size  # a short last batch would be a noisy step: dropped

    def __iter__(self):
        batches = torch.utils.data.BatchSampler(self.shuffle, self.batch_size, drop_last=True)
        return islice(iter(batches), self.skip, None)


def resolve_data_config(model: torch.nn.Module, img_size: int, eval_img_size: int) -> dict:
    """Sizes, interpolation, crop and normalisation: the model's own unless img_size is set.

    `input_size` is the evaluation (and serving) size, `train_input_size` the training one.
    """
    from timm.data import resolve_data_config as timm_resolve

    config = timm_resolve({"input_size": (3, img_size, img_size)} if img_size else {}, model=model)
    train_size, crop_pct = config["input_size"][-1], config["crop_pct"]
    test_size = model.pretrained_cfg.get("test_input_size")
    if not eval_img_size and test_size and not img_size:  # timm measured this model's best test view
        eval_img_size, crop_pct = test_size[-1], model.pretrained_cfg.get("test_crop_pct", crop_pct)
    elif not eval_img_size:
        eval_img_size = round(train_size * EVAL_SIZE_RATIO)
    # Plain types only: the config is stored in the checkpoint, which must load with weights_only=True.
    return {"input_size": [3, int(eval_img_size), int(eval_img_size)], "train_input_size": [3, train_size, train_size],
            "interpolation": str(config["interpolation"]), "mean": [float(v) for v in config["mean"]],
            "std": [float(v) for v in config["std"]], "crop_pct": float(crop_pct),
            "crop_mode": str(config.get("crop_mode", "center"))}


def train_transform(data_config: dict, aa: str, reprob: float, remode: str, hflip: float):
    from timm.data import create_transform

    return create_transform(
        tuple(data_config["train_input_size"]), is_training=True, scale=TRAIN_CROP_SCALE,
        hflip=hflip, auto_augment=None if aa.lower() in ("", "none") else aa,
        interpolation=data_config["interpolation"], mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]), re_prob=reprob, re_mode=remode)


def eval_transform(data_config: dict):
    from timm.data import create_transform

    return create_transform(
        tuple(data_config["input_size"]), is_training=False, interpolation=data_config["interpolation"],
        mean=tuple(data_config["mean"]), std=tuple(data_config["std"]), crop_pct=data_config["crop_pct"],
        crop_mode=data_config["crop_mode"])
