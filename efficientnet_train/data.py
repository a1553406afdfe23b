"""Image folders in, batches out: channel scanning, the dataset and the transforms.

`eval_transform` and `ModelInput` are the one definition of evaluation preprocessing:
validation uses them during training and serving rebuilds them from the `data_config`
stored in the checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import stat
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .decoding import DECODE_MIN_SIDE, IMAGE_FORMATS, UnreadableImage, decode_problem, load_image
from .errors import JobError
from .model import MEMORY_FORMAT
from .untrusted import LABEL_RULE, is_label, listed, shown

log = logging.getLogger("efficientnet_train")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
# Images all the same, in formats this image does not read: unusable data, not stray files.
UNSUPPORTED_IMAGE_EXTENSIONS = (".heic", ".heif", ".avif", ".svg", ".psd", ".raw", ".cr2", ".nef", ".dng", ".arw",
                                ".orf", ".jp2", ".ico", ".eps")
# Left behind by operating systems and archivers; ignored like hidden (dot) files and folders.
SYSTEM_FILES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "__macosx", "$recycle.bin",
                          "system volume information", "@eadir", "icon\r"})
SMALL_CLASS = 5  # fewer training images than this: the class trains, with a warning
PROBE_THREADS = 32  # header reads wait on the disk, or on S3 under FastFile: many at once
LOGGED_DECODE_FAILURES = 20  # per dataset; more are counted, not logged one by one
# Random-resized crops make objects look bigger in training than in a whole image, so evaluating a
# little larger matches them again (FixRes; timm's test_input_size does the same for some models).
EVAL_SIZE_RATIO = 1.15


class Skip:
    """Why a file is not used, as the log and args.yml count them."""

    NOT_AN_IMAGE = "not an image file"  # by its extension (.txt, .csv, ...): the only reason that is not "unusable"
    OUTSIDE_CLASSES = "not in a class folder"
    EMPTY = "empty"
    UNREADABLE = "cannot be read"
    UNSUPPORTED = "unsupported format"
    CORRUPT = "truncated or corrupt"
    TOO_LARGE = "too large"


@dataclass(frozen=True)
class SkippedFile:
    path: str  # relative to the channel's root, as the log shows it (untrusted.shown)
    label: str | None  # its class folder; None in the channel's root
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.path} ({self.reason}{': ' + self.detail if self.detail else ''})"


@dataclass
class Channel:
    """One input channel: its images, their labels and what was found there."""

    name: str
    root: Path
    classes: list[str]
    samples: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # hidden and system files and folders, relative to root

    def images_per_class(self) -> dict[str, int]:
        counts = Counter(label for _, label in self.samples)
        return {name: counts[index] for index, name in enumerate(self.classes)}

    def formats(self) -> dict[str, int]:
        return dict(sorted(Counter(Path(path).suffix.lower().lstrip(".") for path, _ in self.samples).items()))

    def unusable(self) -> list[SkippedFile]:
        """Files meant as images that cannot be used; max_unusable_fraction limits their share."""
        return [skipped for skipped in self.skipped if skipped.reason != Skip.NOT_AN_IMAGE]

    def image_files(self) -> int:
        return len(self.samples) + len(self.unusable())

    def skipped_summary(self) -> dict:
        """The args.yml record: counts by reason and by class, and the first files."""
        return {"count": len(self.skipped), "unusable": len(self.unusable()),
                "by_reason": dict(Counter(s.reason for s in self.skipped).most_common()),
                "per_class": dict(Counter(s.label or "(channel root)" for s in self.skipped).most_common()),
                "examples": [str(s) for s in self.skipped[:10]],
                "ignored_hidden_or_system": len(self.ignored)}

    def inventory(self) -> str:
        present = {name: count for name, count in self.images_per_class().items() if count}
        per_class = listed(f"{name}: {count}" for name, count in present.items())
        formats = ", ".join(f"{fmt}: {count}" for fmt, count in self.formats().items())
        lines = [f"channel '{self.name}' ({self.root}): {len(self.samples)} images in {len(present)} classes "
                 f"[{per_class}]; formats [{formats}]"]
        if self.skipped:
            summary = self.skipped_summary()
            reasons = ", ".join(f"{count} {reason}" for reason, count in summary["by_reason"].items())
            classes = listed(f"{label}: {count}" for label, count in summary["per_class"].items())
            lines.append(f"channel '{self.name}': skipped {len(self.skipped)} files ({reasons}) [{classes}], "
                         f"e.g. {'; '.join(str(s) for s in self.skipped[:5])}")
        if self.ignored:
            lines.append(f"channel '{self.name}': ignored {len(self.ignored)} hidden or system files and folders "
                         f"({', '.join(self.ignored[:5])}{', ...' if len(self.ignored) > 5 else ''})")
        return "\n".join(lines)


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_FILES


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links: SageMaker's FastFile mode and local mocks use them
    except OSError:
        return False  # a broken link: scanned as a file, and reported as unreadable


def _listing(folder: Path) -> tuple[list[str], list[str], list[str]]:
    """Sorted (sub-folder names, file names, ignored names) directly in `folder`."""
    folders, files, ignored = [], [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if _ignored(entry.name):
            ignored.append(entry.name)
        elif _is_folder(entry):
            folders.append(entry.name)
        else:
            files.append(entry.name)
    return folders, files, ignored


def class_folders(root: Path) -> list[str]:
    # Sorted like torchvision's ImageFolder, so label indices mean the same as there.
    return _listing(root)[0]


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _files_under(folder: Path, label: str, walked: dict[tuple[int, int], str]) -> tuple[list[str], list[str]]:
    """Every file below `folder` in sorted depth-first order, and the ignored names (relative to `folder`).

    Links are followed, but each real folder is walked once per channel (`walked`: the class each was found
    under), so a link loop cannot hang the scan, and a folder reached from two classes, whose images would get
    two labels, is refused."""
    files, ignored, stack = [], [], [str(folder)]
    while stack:
        current = stack.pop()
        try:
            status = os.stat(current)
            seen_under = walked.get((status.st_dev, status.st_ino))
            if seen_under is not None and seen_under != label:
                raise JobError(f"The class folders '{shown(seen_under)}' and '{shown(label)}' both lead to the "
                               f"folder {shown(os.path.realpath(current))} (through a link): its images would get "
                               f"two labels. Give each image one class folder; remove the link.")
            if seen_under is not None:
                log.warning("Not scanning %s again: it is a link to a folder already scanned (a link loop?)",
                            shown(current))
                continue
            walked[(status.st_dev, status.st_ino)] = label
            folders, names, hidden = _listing(Path(current))
        except OSError as exc:
            log.warning("Cannot list the folder %s (%s); its files are left out", shown(current), exc.strerror)
            continue
        files += [os.path.join(current, name) for name in names]
        ignored += [os.path.relpath(os.path.join(current, name), folder) for name in hidden]
        stack += [os.path.join(current, name) for name in reversed(folders)]
    return files, ignored


def scan_channel(name: str, root: Path, classes: list[str] | None = None,
                 max_unusable_fraction: float | None = None) -> Channel:
    """Find `root/<class>/**/<image>` and check each image's header; `classes` fixes the label order (the
    train channel's). Fails if the channel's layout is wrong, a class has no usable image, or more than
    `max_unusable_fraction` of its image files cannot be used."""
    folders, loose, ignored = _channel_layout(name, root)
    _refuse_nesting_one_level_too_deep(name, root, folders, loose, classes)
    classes = _classes_of(name, folders, classes)
    channel = Channel(name, root, list(classes), ignored=[shown(n) for n in ignored])
    channel.skipped += [SkippedFile(shown(file), None, Skip.OUTSIDE_CLASSES if _is_image_name(file)
                                    else Skip.NOT_AN_IMAGE) for file in loose]
    candidates = []
    label_index = {label: index for index, label in enumerate(classes)}
    walked: dict[tuple[int, int], str] = {}
    for label in folders:
        files, hidden = _files_under(root / label, label, walked)
        channel.ignored += [shown(os.path.join(label, n)) for n in hidden]
        for path in files:
            if _is_image_name(path):
                candidates.append((path, label))
            else:
                reason = Skip.UNSUPPORTED if path.lower().endswith(UNSUPPORTED_IMAGE_EXTENSIONS) else Skip.NOT_AN_IMAGE
                channel.skipped.append(SkippedFile(shown(os.path.relpath(path, root)), label, reason,
                                                   "convert it to JPEG or PNG" if reason == Skip.UNSUPPORTED else ""))
    for (path, label), problem in zip(candidates, probe_images([path for path, _ in candidates])):
        if problem is None:
            channel.samples.append((path, label_index[label]))
        else:
            channel.skipped.append(SkippedFile(shown(os.path.relpath(path, root)), label, *problem))
    # Files meant as images first: the examples in the log and args.yml should show what needs fixing.
    channel.skipped.sort(key=lambda skipped: (skipped.reason == Skip.NOT_AN_IMAGE, skipped.path))
    check_unusable_share(channel, max_unusable_fraction)
    _refuse_classes_without_images(channel, folders)
    return channel


def _channel_layout(name: str, root: Path) -> tuple[list[str], list[str], list[str]]:
    if not root.is_dir():
        what = "a file, not a folder, is" if root.exists() else "no folder"
        raise JobError(f"The '{name}' channel is missing: {what} at {root}. Give the training job a "
                       f"'{name}' input channel whose S3 prefix holds one folder per class "
                       f"({name}/<label>/<image>.jpg).")
    folders, loose, ignored = _listing(root)
    if not folders:
        where = f"it holds only files ({', '.join(shown(f) for f in loose[:3])}...)" if loose else "it is empty"
        raise JobError(f"The '{name}' channel at {root} has no class folders: {where}. Put each image in a "
                       f"folder named after its label: {name}/<label>/<image>.jpg.")
    return folders, loose, ignored


def _refuse_nesting_one_level_too_deep(name: str, root: Path, folders: list[str], loose: list[str],
                                       classes: list[str] | None) -> None:
    """`train/train/ants/...` or `train/photos/ants/...`: the commonest upload mistake, a folder too many."""
    if len(folders) != 1 or any(_is_image_name(file) for file in loose):
        return
    only = root / folders[0]
    inner_folders, inner_files, _ = _listing(only)
    if not inner_folders or any(_is_image_name(file) for file in inner_files):
        return
    if classes is not None and (folders[0] in classes or not set(inner_folders) & set(classes)):
        return  # a validation channel that holds one class, in sub-folders
    inner = ", ".join(shown(f) for f in inner_folders[:5]) + (", ..." if len(inner_folders) > 5 else "")
    raise JobError(f"The '{name}' channel is nested one level too deep: its only folder, {shown(str(only))}, "
                   f"holds the folders {inner} instead of images. Move the class folders up one level, so that "
                   f"they sit directly in the channel ({name}/{shown(inner_folders[0])}/<image>.jpg, not "
                   f"{name}/{shown(folders[0])}/{shown(inner_folders[0])}/<image>.jpg); a classifier "
                   f"needs at least two class folders there.")


def _classes_of(name: str, folders: list[str], classes: list[str] | None) -> list[str]:
    refused = [shown(folder) for folder in folders if not is_label(folder)]
    if refused:
        raise JobError(f"The '{name}' channel has class folder names that cannot be labels: {', '.join(refused[:5])}"
                       f"{', ...' if len(refused) > 5 else ''}. {LABEL_RULE} Rename those folders.")
    if classes is None:
        return folders
    unknown = [folder for folder in folders if folder not in classes]
    if unknown:
        raise JobError(f"The '{name}' channel has classes that are not in 'train': {', '.join(unknown)}. "
                       f"The model can only learn labels it is trained on; add images of "
                       f"{', '.join(unknown)} to train/, or remove those folders from {name}/.")
    return classes


def check_unusable_share(channel: Channel, max_fraction: float | None) -> None:
    unusable, total = channel.unusable(), channel.image_files()
    if max_fraction is None or len(unusable) <= max_fraction * total:
        return
    reasons = ", ".join(f"{count} {reason}" for reason, count in Counter(s.reason for s in unusable).most_common())
    raise JobError(f"{len(unusable)} of the {total} image files in the '{channel.name}' channel "
                   f"({len(unusable) / total:.0%}) cannot be used, more than max_unusable_fraction="
                   f"{max_fraction:g} allows ({reasons}). For example: {_examples(unusable)}. Replace or remove "
                   f"those files (re-save them as JPEG or PNG), or raise max_unusable_fraction to train on the rest.")


def _examples(items, count: int = 4, width: int = 120) -> str:
    examples = [str(item) if len(str(item)) <= width else str(item)[:width - 3] + "..." for item in items[:count]]
    return "; ".join(examples) + ("; ..." if len(items) > count else "")


def _refuse_classes_without_images(channel: Channel, folders: list[str]) -> None:
    empty = [label for label, count in channel.images_per_class().items() if label in folders and not count]
    if not empty:
        return
    described = []
    for label in empty:
        skipped = [s for s in channel.skipped if s.label == label]
        # Only files named as images are named: a folder linked elsewhere by mistake must not list its contents.
        meant = [s for s in skipped if s.reason != Skip.NOT_AN_IMAGE]
        why = (f": {len(skipped)} files skipped" + (f", e.g. {_examples(meant, 2, 100)}" if meant else
                                                    ", none of them named as an image")) if skipped else ""
        described.append(f"{shown(str(channel.root / label))}{why}")
    if len(empty) == 1:
        head = f"The class folder {described[0]} in the '{channel.name}' channel holds no images"
    else:
        head = (f"{len(empty)} class folders in the '{channel.name}' channel hold no usable images: "
                f"{' | '.join(described[:5])}")
    raise JobError(f"{head} ({', '.join(e.lower() for e in IMAGE_EXTENSIONS)}). Add images to each, or delete "
                   f"the folder.")


def warn_about_thin_classes(train: Channel, val: Channel) -> None:
    """Classes that train but learn little, or that validation never measures: warnings, not failures."""
    thin = {label: count for label, count in train.images_per_class().items() if count < SMALL_CLASS}
    if thin:
        log.warning("Classes with fewer than %d training images: %s. The model learns them poorly; add images "
                    "if they matter.", SMALL_CLASS, listed(f"{label} ({count})" for label, count in thin.items()))
    unmeasured = [label for label, count in val.images_per_class().items() if not count]
    if unmeasured:
        log.warning("The 'val' channel has no images of %d of the %d classes (%s): the validation accuracy, which "
                    "picks the best model, does not measure them.", len(unmeasured), len(val.classes),
                    ", ".join(unmeasured[:10]) + (", ..." if len(unmeasured) > 10 else ""))


def copies_across(train: Channel, val: Channel) -> list[tuple[str, str]]:
    """(val image, train image) for each validation image whose bytes are a training image's, cheaply: a stat of
    each file, then a hash of those whose size some file of the other channel shares."""
    def each(function, paths: list[str]) -> list:
        with ThreadPoolExecutor(max_workers=PROBE_THREADS) as pool:
            return list(pool.map(function, paths))

    train_paths, val_paths = [path for path, _ in train.samples], [path for path, _ in val.samples]
    train_by_size: dict[int, list[str]] = {}
    for path, size in zip(train_paths, each(_size, train_paths)):
        train_by_size.setdefault(size, []).append(path)
    candidates = [(path, size) for path, size in zip(val_paths, each(_size, val_paths)) if size in train_by_size]
    if not candidates:
        return []
    others = sorted({path for size in {size for _, size in candidates} for path in train_by_size[size]})
    train_by_digest = dict(zip(each(_digest, others), others))
    train_by_digest.pop(None, None)
    paths = [path for path, _ in candidates]
    return [(path, train_by_digest[digest]) for path, digest in zip(paths, each(_digest, paths))
            if digest in train_by_digest]


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _digest(path: str) -> bytes | None:
    try:
        digest = hashlib.blake2b()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest.digest()
    except OSError:
        return None


SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing", "eval"})


def check_channels_differ(train: Channel, val: Channel, copies: list[tuple[str, str]]) -> None:
    """Refuse what can only be a layout mistake: both channels pointed at a data set's root (their classes are its
    split folders), or a validation set made of training images. Narrow on purpose: one class named like a split
    (a real class `test`) trains."""
    splits = sorted(name for name in train.classes if name.lower() in SPLIT_NAMES and name in val.classes)
    if len(splits) >= 2:
        training = next((name for name in splits if name.lower() in ("train", "training")), splits[0])
        held_out = next(name for name in splits if name != training)
        channels = ("The 'train' and 'val' channels both hold" if val.name == "val"
                    else "The 'train' channel holds")  # validation held out of train: no 'val' channel
        raise JobError(
            f"{channels} class folders named like data splits "
            f"({', '.join(shown(name, 40) for name in splits)}): they point at the data set's root "
            f"({shown(train.root, 200)}) instead of its split folders, and would train a model that tells the splits "
            f"apart. Point 'train' at {shown(train.root / training, 200)} and 'val' at "
            f"{shown(val.root / held_out, 200)} (on SageMaker: the S3 prefixes ending in {shown(training, 40)}/ and "
            f"{shown(held_out, 40)}/). If these "
            f"really are class names, rename all but one of those folders (e.g. '{shown(training, 40)}_images').")
    if copies and len(copies) == len(val.samples):
        raise JobError(f"Every one of the {len(val.samples)} images of the 'val' channel is a training image (the same "
                       f"file or a byte-identical copy; e.g. {shown(copies[0][0], 200)} = {shown(copies[0][1], 200)}): "
                       f"validation would score only what training has seen, so the accuracy, the best epoch and "
                       f"early stopping would mean nothing. Give 'val' images of its own (a held-out share of each "
                       f"class).")


def warn_about_copies(copies: list[tuple[str, str]], train: Channel, val: Channel) -> None:
    if copies:
        examples = ", ".join(f"{shown(os.path.relpath(v, val.root), 80)} = {shown(os.path.relpath(t, train.root), 80)}"
                             for v, t in copies[:5])
        log.warning("%d of the %d validation images are byte-identical copies of training images (val = train: %s%s). "
                    "Validation then scores images training has seen, which inflates the validation accuracy and "
                    "misleads the choice of the best epoch, early stopping and a tuning job's objective; remove "
                    "the copies from one channel.", len(copies), len(val.samples), examples,
                    ", ..." if len(copies) > 5 else "")


# ---- reading images ---------------------------------------------------------------------------------


def probe_images(paths: list[str]) -> list[tuple[str, str] | None]:
    """`probe_image` of each path, many at once: 100,000 files take seconds, not minutes."""
    chunks = [paths[start:start + 256] for start in range(0, len(paths), 256)]
    if len(chunks) <= 1:
        return [probe_image(path) for path in paths]
    with ThreadPoolExecutor(max_workers=PROBE_THREADS) as pool:
        return [problem for chunk in pool.map(lambda chunk: [probe_image(p) for p in chunk], chunks)
                for problem in chunk]


def probe_image(path: str) -> tuple[str, str] | None:
    """Why a file can't be used as a training image, or None: from its header and last bytes alone; only a
    file whose end looks cut short is decoded, to tell a truncated file from one with bytes after its end."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # opening a named pipe would wait for a writer forever
            return Skip.UNREADABLE, "not a regular file (a named pipe, socket or device)"
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return Skip.EMPTY, "0 bytes"
            head = f.read(16)
            f.seek(0)
            problem, image_format = _header_problem(f, head)
            if problem or _ends_completely(f, size, image_format, head):
                return problem
    except OSError as exc:  # a broken link, no permission, an I/O error of a network file system
        return Skip.UNREADABLE, exc.strerror or str(exc)
    try:
        load_image(path)
    except (UnreadableImage, OSError) as exc:
        return Skip.CORRUPT, str(exc.__cause__ or exc)
    except Exception as exc:  # noqa: BLE001 - a decoder tripping over odd bytes: the file is the problem
        return Skip.CORRUPT, f"{type(exc).__name__}: {exc}"
    return None


def _header_problem(f: BinaryIO, head: bytes) -> tuple[tuple[str, str] | None, str]:
    try:
        with Image.open(f, formats=IMAGE_FORMATS) as image:
            image_format = image.format
            too_costly = decode_problem(image, f)  # what decoding would cost, as decode_image will judge it
    except UnidentifiedImageError:
        return (Skip.UNSUPPORTED, _what_else(head)), ""
    except Image.DecompressionBombError:
        return (Skip.TOO_LARGE, f"more than twice the {Image.MAX_IMAGE_PIXELS} pixels an image may have; not "
                                f"decoded (a decompression bomb?)"), ""
    except Exception as exc:  # noqa: BLE001 - Pillow's plugins report bad headers in many types
        return (Skip.CORRUPT, f"bad header: {type(exc).__name__}: {exc}"), ""
    if too_costly:
        return (Skip.TOO_LARGE, too_costly), ""
    return None, image_format


def _what_else(head: bytes) -> str:
    if head[4:8] == b"ftyp":
        return "HEIC/HEIF or AVIF data (phone photos): convert it to JPEG"
    if head.lstrip().startswith(b"<"):
        return "an HTML or XML page, not an image (a failed download?)"
    if head.startswith(b"%PDF"):
        return "a PDF document"
    return "the data is not JPEG, PNG, GIF, BMP, WebP or TIFF"


def _ends_completely(f: BinaryIO, size: int, image_format: str, head: bytes) -> bool:
    """Whether the file ends with its format's end marker; formats without one pass here, and a file cut
    short is then found when training decodes it."""
    f.seek(max(0, size - 64))
    tail = f.read()
    if image_format in ("JPEG", "MPO"):
        return b"\xff\xd9" in tail
    if image_format == "PNG":
        return b"IEND" in tail
    if image_format == "GIF":
        return tail.rstrip(b"\0").endswith(b";")
    if image_format == "WEBP":
        return size >= int.from_bytes(head[4:8], "little") + 8
    return True


class UnusableData(JobError):
    """Too many images, or every image of a class, failed while training read them."""


class ImageDataset(torch.utils.data.Dataset):
    """Images and their labels.

    A file found broken only when training reads it (damaged past its header, deleted or unreadable
    mid-run) does not stop the job: the next image of its class takes its place, the file is logged once
    and counted, and more than `allowed_failures` of them fail the job, naming some.
    """

    def __init__(self, samples: list[tuple[str, int]], transform, channel: str = "", classes: list[str] | None = None,
                 allowed_failures: int | None = None, workers: int = 0, min_side: int = DECODE_MIN_SIDE):
        self.samples, self.transform, self.channel, self.min_side = samples, transform, channel, min_side
        self.classes, self.allowed_failures = classes, allowed_failures
        labels = np.array([label for _, label in samples], dtype=np.int64)
        order = np.argsort(labels, kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(labels[order])) + 1) if len(order) else []
        self.members = {int(labels[group[0]]): group for group in groups}  # each class's sample indices
        self.position = np.empty(len(labels), dtype=np.int64)  # each sample's place among its class's
        for group in groups:
            self.position[group] = np.arange(len(group))
        # Shared with the loader's worker processes: which files failed, and which each worker is reading
        # (pid, index), so that a worker killed mid-file can be blamed on that file.
        self.failed = torch.zeros(len(samples), dtype=torch.uint8).share_memory_()
        self.reading = torch.full((max(workers, 1), 2), -1, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        label = self.samples[index][1]
        for candidate in self._same_class(index, label):
            image = self._load(candidate)
            if image is not None:
                return image, label
        raise UnusableData(f"Every image of class {self._class_name(label)} in the '{self.channel}' channel failed "
                           f"to load during training (e.g. {shown(self.samples[index][0])}; the log lists "
                           f"them). Replace those files with readable JPEG or PNG images.")

    def _same_class(self, index: int, label: int) -> Iterator[int]:
        group, start = self.members[label], int(self.position[index])
        for offset in range(len(group)):
            candidate = int(group[(start + offset) % len(group)])
            if not self.failed[candidate]:
                yield candidate

    def _load(self, index: int):
        info = torch.utils.data.get_worker_info()
        slot = (info.id if info else 0) % len(self.reading)
        self.reading[slot] = torch.tensor([os.getpid(), index])
        try:
            return self.transform(load_image(self.samples[index][0], self.min_side))
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
                               f"it. For example: {path} ({why[:200]}); {_examples(others, 3)}. Replace or remove "
                               f"those files, or raise max_unusable_fraction to train on the rest.")

    def _class_name(self, label: int) -> str:
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
                        allowed_failures=allowed, workers=workers, min_side=min_side)


def report_load_failures(epoch: int, datasets: list[ImageDataset]) -> dict:
    """A log line per channel whose files failed while training; their count and first names, for args.yml."""
    report = {}
    for dataset in datasets:
        failed = dataset.failed_files()
        if failed:
            log.warning("After epoch %d: %d files of the '%s' channel failed to load and were replaced by other "
                        "images of their class: %s", epoch, len(failed), dataset.channel, _examples(failed, 5))
            report[dataset.channel] = {"count": len(failed), "examples": failed[:10]}
    return report


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
    """The short side a photo must keep for the transform's smallest crop (`crop_scale` of the area, in training)
    to still have the model's input size in pixels: larger JPEGs can decode at a reduced scale, several times
    faster, for the same input."""
    if training:  # the smallest crop, at the narrowest aspect ratio (3/4)
        return math.ceil(data_config["train_input_size"][-1] / math.sqrt(min(crop_scale, 1.0) * 3 / 4))
    return math.ceil(data_config["input_size"][-1] / data_config["crop_pct"])  # resized, then centre-cropped


def train_transform(data_config: dict, aa: str, hflip: float, crop_scale: float):
    """Decoded image -> uint8 CHW tensor (crop, flip, RandAugment); ModelInput does the rest on the device.
    Random-resized crops keep `crop_scale` of the area or more; at 1, the image's centre square, as evaluation sees
    it. No colour jitter: timm adds one where RandAugment is off, a change of view that nothing chose (it cost the
    probe's classifier 72 of every 100 digits it answered right). The mean still matters here: RandAugment fills
    what rotating and shearing uncover with it."""
    from timm.data import create_transform

    return create_transform(
        tuple(data_config["train_input_size"]), is_training=True, scale=(crop_scale, 1.0),
        ratio=(1.0, 1.0) if crop_scale >= 1 else (3 / 4, 4 / 3), hflip=hflip, color_jitter=None,
        auto_augment=None if aa.lower() in ("", "none") else aa, interpolation=data_config["interpolation"],
        mean=tuple(data_config["mean"]), std=tuple(data_config["std"]), use_prefetcher=True)


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
