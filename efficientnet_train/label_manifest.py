"""A channel labelled by a manifest instead of by folders: a JSON Lines file at the channel's root, as SageMaker
Ground Truth writes it (its `output.manifest`, copied beside the images), or written by hand.

Each line names an image and its labels:

    {"source-ref": "s3://bucket/photos/0001.jpg", "animals": 1, "animals-metadata": {"class-name": "dog", ...}}
    {"source-ref": "photos/0002.jpg", "animals": [0, 2], "animals-metadata": {"class-map": {"0": "cat", "2": "car"}}}
    {"source-ref": "photos/0003.jpg", "labels": ["dog", "car"]}

`source-ref` is a path relative to the channel, or an S3 URI whose key ends in one (the image copied with its
folders, or some of them); the label attribute, the line's one key besides `source-ref` and `*-metadata`, is a class
index named by the metadata's `class-name` (or `class-map`), a class name, or a list of either (a multi-label
job's output): a list makes the channel multi-label, each image with any number of the classes (multilabel.py).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

from .channels import Channel, Skip, SkippedFile, check_unusable_share, is_image_name, scan_channel
from .decoding import check_images
from .errors import JobError
from .untrusted import LABEL_RULE, is_label, listed, shown

log = logging.getLogger("efficientnet_train")

MANIFEST_SUFFIXES = (".manifest", ".jsonl")
MAX_LINE_BYTES = 1 << 20
MAX_LINES = 10_000_000
MAX_CLASSES = 100_000
MAX_KEY_PARTS = 64  # folders in a source-ref: each end of an S3 key is looked up, so a line costs at most this many


def manifest_in(root: Path) -> Path | None:
    """The channel's manifest, if it has one at its root; two are refused, since either could be meant."""
    try:
        found = sorted(entry.name for entry in os.scandir(root) if entry.is_file()
                       and entry.name.lower().endswith(MANIFEST_SUFFIXES) and not entry.name.startswith("."))
    except OSError:
        return None
    if len(found) > 1:
        names = listed(shown(f, 80) for f in found)
        raise JobError(f"The channel at {shown(root)} holds {len(found)} manifests ({names}): keep the one that "
                       f"labels its images ({', '.join(MANIFEST_SUFFIXES)}), remove the others.")
    return root / found[0] if found else None


class _Lines:
    """The manifest's lines parsed, with the label attribute and the classes' names as the lines say them."""

    def __init__(self, path: Path, channel: str):
        self.path, self.channel = path, channel
        self.attribute: str | None = None
        self.names: dict[int, str] = {}  # class index -> name, from the metadata
        self.rows: list[tuple[int, str, object]] = []  # (line number, source-ref, label value)

    def where(self, number: int) -> str:
        return f"The '{self.channel}' channel's manifest {shown(self.path.name, 100)}, line {number}"

    def read(self) -> "_Lines":
        with open(self.path, "rb") as f:
            # A line read at most one byte past its bound: a file of one endless line is not read whole into memory.
            for number, line in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
                if number > MAX_LINES:
                    raise JobError(f"{self.where(number)}: more than {MAX_LINES:,} lines; split the data set.")
                if len(line) > MAX_LINE_BYTES:
                    raise JobError(f"{self.where(number)}: longer than {MAX_LINE_BYTES >> 20} MB; a manifest line "
                                   f"names one image and its labels.")
                if line.strip():
                    self._add(number, line)
        if not self.rows:
            raise JobError(f"The '{self.channel}' channel's manifest {shown(self.path)} names no images: it is empty. "
                           f"Give one JSON line per image ({{\"source-ref\": \"photos/0001.jpg\", \"labels\": "
                           f"[\"dog\"]}}), or remove it to label by folders.")
        return self

    def _add(self, number: int, line: bytes) -> None:
        try:
            item = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise JobError(f"{self.where(number)} is not a JSON object (it starts {shown(line[:40], 60)}); a manifest "
                           f"has one per line.") from None
        if not isinstance(item, dict) or not isinstance(item.get("source-ref"), str):
            raise JobError(f"{self.where(number)} has no 'source-ref' naming its image (a path relative to the "
                           f"channel, or its S3 URI).")
        attributes = sorted(key for key in item if key != "source-ref" and not key.endswith("-metadata"))
        if len(attributes) != 1:
            what = "the label attributes " + listed(shown(a, 60) for a in attributes) if attributes else \
                "no label attribute"
            raise JobError(f"{self.where(number)} has {what}: give each line one, besides 'source-ref' and its "
                           f"'-metadata' (remove the output of "
                           f"other labelling jobs).")
        if self.attribute is None:
            self.attribute = attributes[0]
        elif attributes[0] != self.attribute:
            raise JobError(f"{self.where(number)} labels by '{shown(attributes[0], 60)}', earlier lines by "
                           f"'{shown(self.attribute, 60)}': give one labelling job's output.")
        metadata = item.get(f"{self.attribute}-metadata")
        if isinstance(metadata, dict):
            names = metadata.get("class-map") if isinstance(metadata.get("class-map"), dict) else {}
            value = item[self.attribute]
            if "class-name" in metadata and isinstance(value, int) and not isinstance(value, bool):
                names = {value: metadata["class-name"]}
            for index, name in names.items():
                self._name(number, index, name)
        self.rows.append((number, item["source-ref"], item[self.attribute]))

    def _name(self, number: int, index, name) -> None:
        try:
            index = int(index)
        except (TypeError, ValueError):
            raise JobError(f"{self.where(number)}: the metadata maps {shown(index, 40)} to a class, not a class "
                           f"index.") from None
        if not isinstance(name, str) or not is_label(name):
            raise JobError(f"{self.where(number)} names class {index} '{shown(name, 100)}', which cannot be a class "
                           f"name. {LABEL_RULE}")
        known = self.names.setdefault(index, name)
        if known != name:
            raise JobError(f"{self.where(number)} names class {index} '{shown(name, 100)}', earlier lines "
                           f"'{shown(known, 100)}': the manifest mixes labelling jobs with different class lists.")

    def labels_of(self, number: int, value) -> tuple[list[str], bool]:
        """The class names a label value gives, and whether it was a list (multi-label)."""
        listed_value = isinstance(value, list)
        names = []
        for one in value if listed_value else [value]:
            if isinstance(one, bool) or not isinstance(one, (int, str)):
                raise JobError(f"{self.where(number)}: its label {shown(json.dumps(one), 60)} is neither a class "
                               f"index nor a class name.")
            if isinstance(one, int):
                if not 0 <= one < MAX_CLASSES:
                    raise JobError(f"{self.where(number)}: class index {one} is out of range.")
                one = self.names.get(one, str(one))
            elif not is_label(one):
                raise JobError(f"{self.where(number)}: the label '{shown(one, 100)}' cannot be a class name. "
                               f"{LABEL_RULE}")
            names.append(one)
        return names, listed_value


def _resolve(root: Path, reference: str) -> str | None:
    """The file in the channel that `reference` names: a relative path, or the end of an S3 key (the longest end
    that exists). None if it names none, or leads out of the channel."""
    key = reference.partition("://")[2].partition("/")[2] if "://" in reference else reference  # less the bucket
    parts = [part for part in key.split("/") if part]
    if not parts or len(parts) > MAX_KEY_PARTS or any(part in (".", "..") for part in parts):
        return None
    for start in range(len(parts)):
        candidate = root.joinpath(*parts[start:])
        if candidate.is_file():
            return str(candidate)
        if "://" not in reference:
            return None  # a relative path means that path
    return None


def scan_manifest(name: str, root: Path, manifest: Path, classes: list[str] | None = None,
                  max_unusable_fraction: float | None = None) -> Channel:
    """The channel's images and labels as its manifest gives them, each image's header checked; `classes` fixes the
    labels' order (the train channel's), else it is the sorted names, as folders would give."""
    lines = _Lines(manifest, name).read()
    log.info("The '%s' channel is labelled by its manifest %s (label attribute '%s'), not by folders", name,
             shown(manifest.name, 100), shown(lines.attribute, 60))
    labelled, multi = [], False
    for number, reference, value in lines.rows:
        names, listed_value = lines.labels_of(number, value)
        multi = multi or listed_value
        labelled.append((number, reference, names))
    found = sorted({label for _, _, names in labelled for label in names})
    if classes is None:
        classes = found
    else:
        unknown = [label for label in found if label not in classes]
        if unknown:
            raise JobError(f"The '{name}' channel's manifest has labels that are not in 'train': "
                           f"{listed(shown(u, 60) for u in unknown)}. The model can only learn labels it is trained "
                           f"on.")
    index = {label: position for position, label in enumerate(classes)}
    channel = Channel(name, root, list(classes), multi_label=multi)
    candidates = []
    for number, reference, names in labelled:
        path = _resolve(root, reference)
        if path is None:
            channel.skipped.append(SkippedFile(shown(reference), None, Skip.MISSING,
                                               f"line {number} of {shown(manifest.name, 60)}"))
        elif not is_image_name(path):
            channel.skipped.append(SkippedFile(shown(os.path.relpath(path, root)), None, Skip.NOT_AN_IMAGE))
        else:
            label = tuple(sorted({index[label] for label in names})) if multi else index[names[0]]
            candidates.append((path, label))
    for (path, label), problem in zip(candidates, check_images([path for path, _ in candidates])):
        if problem is None:
            channel.samples.append((path, label))
        else:
            channel.skipped.append(SkippedFile(shown(os.path.relpath(path, root)), None, *problem))
    empty = [label for label, count in channel.images_per_class().items() if not count and label in found]
    if empty and channel.samples:
        labels = listed(shown(e, 60) for e in empty)
        raise JobError(f"The '{name}' channel's manifest labels no usable image with {labels}: every image it "
                       f"names with that label is missing or unusable ("
                       f"{'; '.join(str(s) for s in channel.skipped[:3])}). Fix those images, or remove the label.")
    if not channel.samples:
        raise JobError(f"None of the {len(lines.rows)} images the '{name}' channel's manifest names can be used: "
                       f"e.g. {'; '.join(str(s) for s in channel.skipped[:3])}. 'source-ref' is a path relative to "
                       f"the channel ({root}), or an S3 URI whose key ends in one.")
    check_unusable_share(channel, max_unusable_fraction)
    return channel


def scan(name: str, root: Path, classes: list[str] | None = None, max_unusable_fraction: float | None = None,
         multi_label: bool = False) -> Channel:
    """A channel's images and labels: from its manifest if it has one at its root, else from its class folders.
    A validation channel of a multi-label `train` (`multi_label`) may give one label an image (folders, say)."""
    manifest = manifest_in(root) if root.is_dir() else None
    if manifest is None:
        channel = scan_channel(name, root, classes, max_unusable_fraction)
    else:
        channel = scan_manifest(name, root, manifest, classes, max_unusable_fraction)
    if multi_label and not channel.multi_label:
        return replace(channel, samples=[(path, (label,)) for path, label in channel.samples], multi_label=True)
    if channel.multi_label and classes is not None and not multi_label:
        raise JobError(f"The '{name}' channel's manifest gives images lists of labels, but 'train' gives one label an "
                       f"image: a model answers one way or the other. Label both channels the same way.")
    return channel
