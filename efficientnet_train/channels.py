"""A channel's image folders: the scan that finds each class's images, checks every file's header and says what
it skipped and why, and the checks across channels (thin classes, validation images that are training images).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .decoding import CHECK_THREADS, Unusable, check_images
from .errors import JobError
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


class Skip(Unusable):
    """Why a file is not used, as the log and args.yml count them: unusable (decoding.Unusable), or not meant to be."""

    NOT_AN_IMAGE = "not an image file"  # by its extension (.txt, .csv, ...): the only reason that is not "unusable"
    OUTSIDE_CLASSES = "not in a class folder"
    MISSING = "not found"  # named by a manifest, not in the channel


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
    """One input channel: its images, their labels and what was found there. An image's label is a class index, or
    in a multi-label channel a tuple of them (any number, none included)."""

    name: str
    root: Path
    classes: list[str]
    samples: list[tuple[str, int | tuple[int, ...]]] = field(default_factory=list)
    multi_label: bool = False
    skipped: list[SkippedFile] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # hidden and system files and folders, relative to root

    def images_per_class(self) -> dict[str, int]:
        counts = Counter(one for _, label in self.samples for one in (label if self.multi_label else (label,)))
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


def is_image_name(name: str) -> bool:
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
    channel.skipped += [SkippedFile(shown(file), None, Skip.OUTSIDE_CLASSES if is_image_name(file)
                                    else Skip.NOT_AN_IMAGE) for file in loose]
    candidates = []
    label_index = {label: index for index, label in enumerate(classes)}
    walked: dict[tuple[int, int], str] = {}
    for label in folders:
        files, hidden = _files_under(root / label, label, walked)
        channel.ignored += [shown(os.path.join(label, n)) for n in hidden]
        for path in files:
            if is_image_name(path):
                candidates.append((path, label))
            else:
                reason = Skip.UNSUPPORTED if path.lower().endswith(UNSUPPORTED_IMAGE_EXTENSIONS) else Skip.NOT_AN_IMAGE
                channel.skipped.append(SkippedFile(shown(os.path.relpath(path, root)), label, reason,
                                                   "convert it to JPEG or PNG" if reason == Skip.UNSUPPORTED else ""))
    for (path, label), problem in zip(candidates, check_images([path for path, _ in candidates])):
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
                       f"folder named after its label: {name}/<label>/<image>.jpg, or label them in a manifest "
                       f"at the channel's root ({name}/labels.jsonl, one JSON line an image: "
                       f"{{\"source-ref\": \"<image>.jpg\", \"label\": \"<label>\"}}).")
    return folders, loose, ignored


def _refuse_nesting_one_level_too_deep(name: str, root: Path, folders: list[str], loose: list[str],
                                       classes: list[str] | None) -> None:
    """`train/train/ants/...` or `train/photos/ants/...`: the commonest upload mistake, a folder too many."""
    if len(folders) != 1 or any(is_image_name(file) for file in loose):
        return
    only = root / folders[0]
    inner_folders, inner_files, _ = _listing(only)
    if not inner_folders or any(is_image_name(file) for file in inner_files):
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
                   f"{max_fraction:g} allows ({reasons}). For example: {examples(unusable)}. Replace or remove "
                   f"those files (re-save them as JPEG or PNG), or raise max_unusable_fraction to train on the rest.")


def examples(items, count: int = 4, width: int = 120) -> str:
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
        why = (f": {len(skipped)} files skipped" + (f", e.g. {examples(meant, 2, 100)}" if meant else
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
        with ThreadPoolExecutor(max_workers=CHECK_THREADS) as pool:
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

