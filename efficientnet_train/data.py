"""A scanned channel in, batches out: the dataset, the sampler and the transforms.

`eval_transform` and `ModelInput` are the one definition of evaluation preprocessing:
validation uses them during training and serving rebuilds them from the `data_config`
stored in the checkpoint.
"""

from __future__ import annotations

import logging
import math
import multiprocessing.util
import os
import random
import weakref
from itertools import islice
from typing import Iterator

import numpy as np
import torch

from .channels import Channel, examples
from .decoding import DECODE_MIN_SIDE, UnreadableImage, load_image
from .errors import JobError
from .model import MEMORY_FORMAT
from .multilabel import multi_hot
from .stopping import ignore_stop_signals, stop_signals_held
from .untrusted import shown

log = logging.getLogger("efficientnet_train")
LOGGED_DECODE_FAILURES = 20  # per dataset; more are counted, not logged one by one
# Random-resized crops make objects look bigger in training than in a whole image, so evaluating a
# little larger matches them again (FixRes; timm's test_input_size does the same for some models).
EVAL_SIZE_RATIO = 1.15


class UnusableData(JobError):
    """Too many images, or every image of a class, failed while training read them."""


class ImageDataset(torch.utils.data.Dataset):
    """Images and their labels.

    A file found broken only when training reads it (damaged past its header, deleted or unreadable
    mid-run) does not stop the job: the next image of its class takes its place, the file is logged once
    and counted, and more than `allowed_failures` of them fail the job, naming some.
    """

    def __init__(self, samples: list[tuple[str, int]], transform, channel: str = "", classes: list[str] | None = None,
                 allowed_failures: int | None = None, workers: int = 0, min_side: int = DECODE_MIN_SIDE,
                 multi_label: bool = False):
        self.samples, self.transform, self.channel, self.min_side = samples, transform, channel, min_side
        self.classes, self.allowed_failures, self.multi_label = classes, allowed_failures, multi_label
        # Images of the same label stand in for each other; in a multi-label set, those of the same set of labels.
        groups_of: dict = {}
        self.group = np.array([groups_of.setdefault(label, len(groups_of)) if multi_label else label
                               for _, label in samples], dtype=np.int64)
        order = np.argsort(self.group, kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(self.group[order])) + 1) if len(order) else []
        self.members = {int(self.group[group[0]]): group for group in groups}  # each group's sample indices
        self.position = np.empty(len(samples), dtype=np.int64)  # each sample's place among its group's
        for group in groups:
            self.position[group] = np.arange(len(group))
        # Shared with the loader's worker processes: which files failed, and which each worker is reading
        # (pid, index), so that a worker killed mid-file can be blamed on that file.
        self.failed = torch.zeros(len(samples), dtype=torch.uint8).share_memory_()
        self.reading = torch.full((max(workers, 1), 2), -1, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, float]):
        """An image and its label; a key (index, grown) also tells a GrowingCrop how far its crops have grown."""
        index, grown = key if isinstance(key, tuple) else (key, None)
        label = self.samples[index][1]
        for candidate in self._same_class(index, int(self.group[index])):
            image = self._load(candidate, grown)
            if image is not None:
                return image, multi_hot(label, len(self.classes)) if self.multi_label else label
        raise UnusableData(f"Every image of class {self._class_name(label)} in the '{self.channel}' channel failed "
                           f"to load during training (e.g. {shown(self.samples[index][0])}; the log lists "
                           f"them). Replace those files with readable JPEG or PNG images.")

    def _same_class(self, index: int, label: int) -> Iterator[int]:
        group, start = self.members[label], int(self.position[index])
        for offset in range(len(group)):
            candidate = int(group[(start + offset) % len(group)])
            if not self.failed[candidate]:
                yield candidate

    def _load(self, index: int, grown: float | None = None):
        info = torch.utils.data.get_worker_info()
        slot = (info.id if info else 0) % len(self.reading)
        self.reading[slot] = torch.tensor([os.getpid(), index])
        try:
            image = load_image(self.samples[index][0], self.min_side)
            return self.transform(image) if grown is None else self.transform(image, grown)
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with one file, the others can train
            self._record_failure(index, exc)
            return None
        finally:
            self.reading[slot, 1] = -1

    def _record_failure(self, index: int, exc: Exception) -> None:
        self.failed[index] = 1
        failures = int(self.failed.sum())
        path = shown(self.samples[index][0])
        why = str(exc.__cause__) if isinstance(exc, UnreadableImage) and exc.__cause__ else \
            f"{type(exc).__name__}: {exc}"
        if failures <= LOGGED_DECODE_FAILURES:
            log.warning("'%s' channel: %s cannot be used (%s); the next image of its class takes its place%s",
                        self.channel, path, why, "" if failures < LOGGED_DECODE_FAILURES else
                        ". Further such files are counted, not logged one by one.")
        if self.allowed_failures is not None and failures > self.allowed_failures:
            others = [p for p in self.failed_files() if p != path]
            raise UnusableData(f"{failures} image files of the '{self.channel}' channel failed to load during "
                               f"training, more than max_unusable_fraction allows with the files skipped before "
                               f"it. For example: {path} ({why[:200]}); {examples(others, 3)}. Replace or remove "
                               f"those files, or raise max_unusable_fraction to train on the rest.")

    def _class_name(self, label) -> str:
        if self.multi_label:
            return "+".join(self.classes[one] for one in label) or "(no label)"
        return repr(self.classes[label]) if self.classes else str(label)

    def failed_files(self) -> list[str]:
        return [shown(self.samples[i][0]) for i in torch.nonzero(self.failed).flatten().tolist()]

    def being_read(self, pids: list[int]) -> list[str]:
        """The files the data-loading workers with these process ids (any, if none given) were reading."""
        return [shown(self.samples[index][0]) for pid, index in self.reading.tolist()
                if index >= 0 and (not pids or pid in pids)]


def dataset_of(channel: Channel, transform, max_unusable_fraction: float | None = None,
               workers: int = 0, min_side: int = DECODE_MIN_SIDE) -> ImageDataset:
    """The channel's dataset, allowed as many failures while training as the scan left room for."""
    allowed = None if max_unusable_fraction is None else \
        int(max_unusable_fraction * channel.image_files()) - len(channel.unusable())
    return ImageDataset(channel.samples, transform, channel=channel.name, classes=channel.classes,
                        allowed_failures=allowed, workers=workers, min_side=min_side, multi_label=channel.multi_label)


def report_load_failures(epoch: int, datasets: list[ImageDataset]) -> dict:
    """A log line per channel whose files failed while training; their count and first names, for args.yml."""
    report = {}
    for dataset in datasets:
        failed = dataset.failed_files()
        if failed:
            log.warning("After epoch %d: %d files of the '%s' channel failed to load and were replaced by other "
                        "images of their class: %s", epoch, len(failed), dataset.channel, examples(failed, 5))
            report[dataset.channel] = {"count": len(failed), "examples": failed[:10]}
    return report


class Loader(torch.utils.data.DataLoader):
    """A DataLoader whose worker processes leave a stop sent to the whole process group (Ctrl-C in a terminal,
    `timeout`, `kill -- -PGID`) to the main process, from their first instant."""

    def __init__(self, dataset, **options) -> None:
        super().__init__(dataset, worker_init_fn=ignore_stop_signals, **options)
        LIVE_LOADERS.add(self)

    def __iter__(self):
        with stop_signals_held():  # workers start here (or on the first iteration, if persistent)
            return super().__iter__()


LIVE_LOADERS: weakref.WeakSet = weakref.WeakSet()


def shut_down_workers() -> None:
    """At exit, end every persistent worker still running. A loader still referenced then (a reference cycle not yet
    collected) keeps its workers, and multiprocessing's exit hook would SIGTERM them, which they ignore, and then wait
    for them forever: a finished job that never exits. torch's own shutdown does nothing once Python is exiting, and
    the workers are idle by then, so SIGKILL."""
    from torch.utils.data._utils.signal_handling import _remove_worker_pids

    for loader in list(LIVE_LOADERS):
        iterator = loader._iterator  # kept by the loader only while persistent workers run
        if iterator is None:
            continue
        if iterator._worker_pids_set:  # else torch's SIGCHLD handler calls the kill a failure
            _remove_worker_pids(id(iterator))
            iterator._worker_pids_set = False
        for worker in iterator._workers:
            if worker.is_alive():
                worker.kill()


# Run by multiprocessing's exit hook before it stops and joins the worker processes.
multiprocessing.util.Finalize(None, shut_down_workers, exitpriority=100)


class TrainBatches(torch.utils.data.Sampler):
    """Training batches of a shuffle fixed by (seed, epoch), so that an interrupted epoch can carry on
    from the batch where it stopped and still see every image once. With `growth_updates`, each index comes with how
    far a GrowingCrop's crops have grown by its batch's update (from 0 at the first to 1 after that many): from the
    batch's place in the run, so a resumed run crops as the uninterrupted one."""

    def __init__(self, num_images: int, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0,
                 growth_updates: int = 0):
        self.shuffle = torch.utils.data.DistributedSampler(range(num_images), num_replicas=num_replicas, rank=rank,
                                                           shuffle=True, seed=seed)
        self.num_images, self.num_replicas = num_images, num_replicas
        self.batch_size, self.growth_updates, self.epoch, self.skip = batch_size, growth_updates, 1, 0

    @staticmethod
    def per_epoch(num_images: int, batch_size: int, num_replicas: int = 1) -> int:
        """The batches (updates) an epoch has: each replica's share padded to the same count, as DistributedSampler
        does; a short last batch would be a noisy step, so it is dropped."""
        return math.ceil(num_images / num_replicas) // batch_size

    def start_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Epochs count from 1, the first of fine-tuning."""
        self.shuffle.set_epoch(epoch)
        self.epoch, self.skip = epoch, skip_batches

    def __len__(self) -> int:
        return self.per_epoch(self.num_images, self.batch_size, self.num_replicas)

    def __iter__(self):
        batches = islice(enumerate(torch.utils.data.BatchSampler(self.shuffle, self.batch_size, drop_last=True)),
                         self.skip, None)
        if not self.growth_updates:
            return (batch for _, batch in batches)
        before = (self.epoch - 1) * len(self)  # the updates made before this epoch
        return ([(index, min(1.0, (before + step) / self.growth_updates)) for index in batch]
                for step, batch in batches)


def resolve_data_config(model: torch.nn.Module, img_size: int, eval_img_size: int) -> dict:
    """Sizes, interpolation, crop and normalisation: the model's own unless img_size is set.

    `input_size` is the evaluation (and serving) size, `train_input_size` the training one (which frozen BatchNorm
    changes: recipe.training_size_config).
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


def decode_side(data_config: dict, training: bool, crop_scale: float = 1.0) -> int:
    """The short side a photo must keep for the transform's smallest crop (`crop_scale` of the area, in training;
    at crop_scale 1 and in evaluation, the resize before the centre crop) to still have the model's input size in
    pixels: larger JPEGs can decode at a reduced scale, several times faster, for the same input."""
    if training and crop_scale < 1:  # the smallest crop, at the narrowest aspect ratio (3/4)
        return math.ceil(data_config["train_input_size"][-1] / math.sqrt(crop_scale * 3 / 4))
    size = data_config["train_input_size" if training else "input_size"][-1]
    return math.ceil(size / data_config["crop_pct"])  # resized, then centre-cropped


def train_transform(data_config: dict, aa: str, hflip: float, crop_scale: float):
    """Decoded image -> uint8 CHW tensor (crop, flip, RandAugment); ModelInput does the rest on the device.
    Random-resized crops keep `crop_scale` of the area or more; at 1, no random crop: evaluation's own crop (the
    central crop_pct of the short side) at the training size: what the probe was fitted on. No colour jitter:
    timm adds one where RandAugment is off, a change of view that nothing chose (docs/defaults.md says what it
    cost). The mean still matters here: RandAugment fills what rotating and shearing uncover with it."""
    from timm.data import create_transform

    size = tuple(data_config["train_input_size"])
    transform = create_transform(
        size, is_training=True, scale=(crop_scale, 1.0), hflip=hflip, color_jitter=None,
        auto_augment=None if aa.lower() in ("", "none") else aa, interpolation=data_config["interpolation"],
        mean=tuple(data_config["mean"]), std=tuple(data_config["std"]), use_prefetcher=True)
    if crop_scale >= 1:  # timm's first step is the random-resized crop; evaluation's resize and centre crop instead
        from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation

        evaluation = eval_transform({**data_config, "input_size": list(size)}).transforms
        if not (isinstance(transform.transforms[0], RandomResizedCropAndInterpolation)
                and isinstance(evaluation[-1], MaybePILToTensor)):
            raise RuntimeError("timm's transforms are no longer crop first and tensor last: update train_transform")
        transform.transforms[:1] = evaluation[:-1]
    return transform


class GrowingCrop:
    """A training transform whose random-resized crops grow over the warmup from evaluation's crop: each crop is
    drawn as the transform's own, then its box is moved toward evaluation's by the share of the growth still to
    come. Called with `grown` 0, every crop is evaluation's (the probe's view); with 1, the transform's own; between,
    a box between. The probe's classifier answers evaluation's view far better than half crops, and the first
    updates' gradients come from its answers (docs/quality-log.md). A transform without a random crop (crop_scale=1,
    evaluation's crop already) is applied as it is."""

    def __init__(self, transform, crop_pct: float, crop_mode: str = "center"):
        from timm.data.transforms import RandomResizedCropAndInterpolation
        from torchvision.transforms import Compose, Resize

        first = transform.transforms[0]
        if not isinstance(first, (RandomResizedCropAndInterpolation, Resize)):
            raise RuntimeError("timm's training transform no longer starts with its crop: update GrowingCrop")
        self.transform, self.crop_pct, self.crop_mode = transform, crop_pct, crop_mode
        self.crop = first if isinstance(first, RandomResizedCropAndInterpolation) else None
        self.rest = Compose(transform.transforms[1:])

    def __call__(self, image, grown: float = 1.0):
        if self.crop is None or grown >= 1:
            return self.transform(image)
        from torchvision.transforms.functional import resized_crop

        drawn = self.crop.get_params(image, self.crop.scale, self.crop.ratio)  # the random numbers timm's crop draws
        interpolation = self.crop.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        box = (round(e + grown * (d - e)) for e, d in zip(self.evaluation_box(image.size), drawn))
        return self.rest(resized_crop(image, *box, self.crop.size, interpolation))

    def evaluation_box(self, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(top, left, height, width) of what evaluation's resize and centre crop keep of an image this size, at
        the training size: the central crop_pct of its short side ('center'), or of each side ('squash'; 'border'
        pads instead, and is taken as 'squash')."""
        width, height = image_size
        size_h, size_w = self.crop.size
        if self.crop_mode == "center":
            short = min(width, height)
            crop_h = crop_w = short * size_h / math.floor(size_h / self.crop_pct)
        else:
            crop_h = height * size_h / math.floor(size_h / self.crop_pct)
            crop_w = width * size_w / math.floor(size_w / self.crop_pct)
        return round((height - crop_h) / 2), round((width - crop_w) / 2), round(crop_h), round(crop_w)


def eval_transform(data_config: dict):
    """Decoded image -> uint8 CHW tensor (resize, centre crop); ModelInput does the rest on the device."""
    from timm.data import create_transform

    return create_transform(
        tuple(data_config["input_size"]), is_training=False, interpolation=data_config["interpolation"],
        crop_pct=data_config["crop_pct"], crop_mode=data_config["crop_mode"], use_prefetcher=True)


class ModelInput:
    """A batch of uint8 images, as the transforms make them, to the model's input: on its device, in its
    memory format (channels-last), as float normalised with the model's mean and std; for training also
    randomly erased.

    The loaders' workers hand over uint8, a quarter of float32's bytes, and leave the per-pixel arithmetic to
    the device, where it costs next to nothing: what timm's GPU prefetcher does. Applied in the training loop
    rather than ahead of it, so that random erasing draws its random numbers in step order and a resumed run
    repeats an uninterrupted one."""

    def __init__(self, data_config: dict, device: torch.device, reprob: float = 0.0, remode: str = "pixel"):
        from timm.data.random_erasing import RandomErasing

        self.device = device
        self.mean = torch.tensor([255 * m for m in data_config["mean"]], device=device).view(1, -1, 1, 1)
        self.std = torch.tensor([255 * s for s in data_config["std"]], device=device).view(1, -1, 1, 1)
        self.erase = RandomErasing(probability=reprob, mode=remode, device=device) if reprob > 0 else None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:  # a float batch would be normalised twice, in the caller's tensor
            raise TypeError(f"ModelInput takes uint8 images, as the transforms make them, not {images.dtype}")
        images = images.to(self.device, non_blocking=True).to(memory_format=MEMORY_FORMAT)
        images = images.float().sub_(self.mean).div_(self.std)
        return self.erase(images) if self.erase is not None else images

