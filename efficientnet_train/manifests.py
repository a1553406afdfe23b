"""Data labelled with SageMaker Ground Truth, streamed in Pipe mode: an augmented manifest's records, read once from
the channel's FIFO and spooled to the instance's storage as class folders (for a multi-label job, its images and a
manifest of their labels), which the job then scans and trains from like any other channel (random access, every
epoch, the same checks).

SageMaker streams each manifest line's attributes, in the channel's `AttributeNames` order, as MXNet RecordIO
records: for `source-ref` the image's bytes, for the label attribute its JSON value (a class index; a list of
them for a multi-label job), and for `<label attribute>-metadata`, if named, its JSON object, whose `class-name`
names the index (`class-map` the indices of a list). So an image is one record followed by its label's and,
optionally, its metadata's.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import struct
import time
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import JobError
from .sagemaker import SageMakerEnvironment
from .untrusted import LABEL_RULE, is_label, shown

log = logging.getLogger("efficientnet_train")

RECORDIO_MAGIC = 0xCED7230A
MAX_RECORD_BYTES = 64 << 20  # an image a record: larger is no training image (training decodes at most 768 MB)
MAX_JSON_RECORD_BYTES = 1 << 20  # a label or its metadata
MAX_CLASS_NAME_BYTES = 200  # a folder name on every file system
PROGRESS_EVERY_S = 30
IMAGE_SIGNATURES = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"), (b"GIF87a", ".gif"),
                    (b"GIF89a", ".gif"), (b"BM", ".bmp"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))
ATTRIBUTES_HOW = ('the channel\'s AttributeNames must be ["source-ref", "LABEL"] or ["source-ref", "LABEL", '
                  '"LABEL-metadata"], in that order, with RecordWrapperType RecordIO')


def records(stream: BinaryIO, where: str) -> Iterator[bytes]:
    """The records of an MXNet RecordIO stream, whole: a record split around the magic number its data held (the
    writer's continuation flags 1, 2, 3) is joined again with it."""
    parts: list[bytes] = []
    number = 0
    while True:
        head = _read_exactly(stream, 8, where, allow_end=not parts)
        if head is None:
            return
        magic, word = struct.unpack("<II", head)
        if magic != RECORDIO_MAGIC:
            raise JobError(f"{where}: record {number + 1} does not start with RecordIO's magic number (0x{magic:08x}); "
                           f"{ATTRIBUTES_HOW}.")
        flag, length = word >> 29, word & ((1 << 29) - 1)
        if length + sum(map(len, parts)) > MAX_RECORD_BYTES:
            raise JobError(f"{where}: record {number + 1} holds more than {MAX_RECORD_BYTES >> 20} MB, more than any "
                           f"training image may. Resize the images the manifest points to.")
        data = _read_exactly(stream, length, where)
        _read_exactly(stream, -length % 4, where)  # padding to a 4-byte boundary
        if flag == 0:
            number += 1
            yield data
        elif flag in (1, 2):
            parts.append(data)
        else:
            number += 1
            yield struct.pack("<I", RECORDIO_MAGIC).join(parts + [data])
            parts = []


def _read_exactly(stream: BinaryIO, count: int, where: str, allow_end: bool = False) -> bytes | None:
    data = stream.read(count) if count else b""
    if allow_end and not data:
        return None
    if len(data) != count:
        raise JobError(f"{where} ended in the middle of a record ({len(data)} of {count} bytes): the stream was cut "
                       f"short, or it is not RecordIO; {ATTRIBUTES_HOW}.")
    return data


def image_suffix(data: bytes) -> str | None:
    """The file name suffix of an image's bytes, from their signature; None if they are no image this job reads."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((suffix for signature, suffix in IMAGE_SIGNATURES if data.startswith(signature)), None)


def spool(stream: BinaryIO, where: str, target: Path) -> dict[str, int]:
    """Write the images of a Ground Truth stream into `target/<class name>/`, numbered in the stream's order; return
    how many images each class got. Class names come from the metadata records (`class-name`), else are the class
    indices, with a warning. A multi-label stream (each label a list of class indices, named by the metadata's
    `class-map`) is written as `target/images/` and the manifest `target/labels.jsonl` (label_manifest.py)."""
    names: dict[int, str] = {}
    counts: dict[int, int] = {}
    started = said = time.monotonic()
    images = 0
    pending: tuple[bytes, str] | None = None  # an image waiting for its label, and its file name suffix
    labelled: int | None = None  # the class of the image just labelled, whose metadata may come next
    multi: list[tuple[str, list[int]]] | None = None  # a multi-label stream's (image file, its class indices)
    number = 0
    for number, data in enumerate(records(stream, where), 1):
        suffix = image_suffix(data)
        if suffix is not None:
            if pending is not None:
                raise JobError(f"{where}: image {images + 1} (record {number - 1}) has no label record after it; "
                               f"{ATTRIBUTES_HOW}.")
            pending, labelled = (data, suffix), None
            continue
        value = _json(data, where, number)
        if pending is not None and (isinstance(value, list) or multi is not None):  # several labels an image
            if multi is None and images:
                raise JobError(f"{where}: image {images + 1}'s label (record {number}) is a list of classes, the "
                               f"images before it had one: give one labelling job's output.")
            multi = [] if multi is None else multi
            indices = [_class_index(one, where, number, images + 1) for one in _listed(value, where, number)]
            images += 1
            name = f"images/{images:08d}{pending[1]}"
            (target / "images").mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(pending[0])
            multi.append((name, indices))
            for index in indices:
                counts[index] = counts.get(index, 0) + 1
            pending, labelled = None, -1
        elif pending is not None:  # the label of the image before it
            labelled = _class_index(value, where, number, images + 1)
            counts[labelled] = counts.get(labelled, 0) + 1
            images += 1
            folder = target / f".class-{labelled}"  # named when the stream has said every class's name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{images:08d}{pending[1]}").write_bytes(pending[0])
            pending = None
        elif labelled == -1 and isinstance(value, dict) and isinstance(value.get("class-map"), dict):
            for index, class_name in value["class-map"].items():
                _name_class(names, _class_index(index, where, number, images), class_name, where, number)
            labelled = None
        elif labelled is not None and labelled >= 0 and isinstance(value, dict) and "class-name" in value:
            _name_class(names, labelled, value["class-name"], where, number)
            labelled = None
        else:
            raise JobError(f"{where}: record {number} is {_described(value)} where an image (the bytes of "
                           f"source-ref) was expected; {ATTRIBUTES_HOW}.")
        if time.monotonic() - said >= PROGRESS_EVERY_S:
            said = time.monotonic()
            log.info("%s: %d images spooled in %.0f s", where, images, said - started)
    if pending is not None:
        raise JobError(f"{where}: the last image (record {number}) has no label record after it; {ATTRIBUTES_HOW}.")
    if not images:
        raise JobError(f"{where} held no images: the manifest is empty, or {ATTRIBUTES_HOW}.")
    if names and set(counts) - set(names):
        unnamed = sorted(set(counts) - set(names))
        raise JobError(f"{where}: classes {unnamed[:10]} have no class-name in any metadata record; stream every "
                       f"image's metadata ({ATTRIBUTES_HOW}).")
    if not names:
        log.warning("%s streamed no label metadata: the classes are named by their indices (%s). Add the label "
                    "attribute's '-metadata' to AttributeNames to name them as the labelling job did.", where,
                    ", ".join(map(str, sorted(counts))))
    if multi is not None:
        lines = [{"source-ref": name, "labels": [names.get(index, str(index)) for index in indices]}
                 for name, indices in multi]
        (target / MULTI_LABEL_MANIFEST).write_text("".join(json.dumps(line, ensure_ascii=False) + "\n"
                                                           for line in lines), encoding="utf-8")
        log.info("%s: %d images with several labels each, of %d classes, spooled to %s in %.0f s", where, images,
                 len(counts), target, time.monotonic() - started)
        return {names.get(index, str(index)): count for index, count in sorted(counts.items())}
    spooled = {}
    for index in sorted(counts):
        name = names.get(index, str(index))
        (target / f".class-{index}").rename(target / name)
        spooled[name] = counts[index]
    log.info("%s: %d images of %d classes spooled to %s in %.0f s", where, images, len(counts), target,
             time.monotonic() - started)
    return spooled


def _json(data: bytes, where: str, number: int):
    if len(data) > MAX_JSON_RECORD_BYTES:
        raise JobError(f"{where}: record {number} is neither an image this job reads (JPEG, PNG, GIF, BMP, WebP, "
                       f"TIFF) nor a label; {ATTRIBUTES_HOW}.")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise JobError(f"{where}: record {number} is neither an image this job reads (JPEG, PNG, GIF, BMP, WebP, "
                       f"TIFF) nor a label's JSON (it starts {shown(data[:16], 80)}); {ATTRIBUTES_HOW}.") from None


def _listed(value, where: str, number: int) -> list:
    if not isinstance(value, list):
        raise JobError(f"{where}: record {number} is {_described(value)} where the images before it had lists of "
                       f"classes: give one labelling job's output.")
    return value


def _class_index(value, where: str, number: int, image: int) -> int:
    if isinstance(value, str) and value.strip().isdigit():  # written as "1" by some tools
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 100_000:
        raise JobError(f"{where}: image {image}'s label (record {number}) is {_described(value)}, not a class index "
                       f"(0, 1, 2, ...) as an image classification labelling job writes it; {ATTRIBUTES_HOW}.")
    return value


def _name_class(names: dict[int, str], index: int, name, where: str, number: int) -> None:
    if not isinstance(name, str) or not _is_folder_name(name):
        raise JobError(f"{where}: record {number} names class {index} '{shown(name, 100)}', which cannot be a class "
                       f"name. {LABEL_RULE} It may not be '.', '..' or hold '/', and at most "
                       f"{MAX_CLASS_NAME_BYTES} bytes. Rename the class in the labelling job's output manifest.")
    known = names.setdefault(index, name)
    if known != name:
        raise JobError(f"{where}: record {number} names class {index} '{shown(name, 100)}', earlier records "
                       f"'{shown(known, 100)}': the manifest mixes the outputs of labelling jobs with different "
                       f"class lists. Give one job's output, or relabel.")
    if list(names.values()).count(name) > 1:
        raise JobError(f"{where}: two class indices are both named '{shown(name, 100)}' (record {number}). Give one "
                       f"labelling job's output.")


def _is_folder_name(name: str) -> bool:
    return (is_label(name) and name not in (".", "..") and "/" not in name and not name.startswith(".")
            and len(name.encode("utf-8")) <= MAX_CLASS_NAME_BYTES)


def _described(value) -> str:
    return f"a JSON {type(value).__name__} ({shown(value, 80)})"


SPOOL_MARK = ".efficientnet-train-spool"  # a spool folder this job wrote, and may write again
MULTI_LABEL_MANIFEST = "labels.jsonl"  # a multi-label stream's labels, beside its images in the spool


def images_folder(env: SageMakerEnvironment, channel: str) -> Path:
    """The folder of a channel's images: the channel's own, or for a Pipe-mode channel (a Ground Truth manifest
    streamed as RecordIO) the spool its stream is first read into, once."""
    if env.input_mode(channel) != "Pipe":
        return env.channel_dir(channel)
    target = env.spool_dir(channel)
    if target.exists():
        if not (target / SPOOL_MARK).exists():
            raise JobError(f"{target}, where the '{channel}' channel's stream would be spooled, already holds files "
                           f"this job did not write. Move them elsewhere.")
        shutil.rmtree(target)  # an earlier run's spool, on a machine that ran the job before
    target.mkdir(parents=True)
    (target / SPOOL_MARK).touch()
    where = f"the '{channel}' channel (Pipe mode, {env.pipe(channel)})"
    log.info("Reading %s into %s", where, target)
    try:
        with open(env.pipe(channel), "rb") as stream:
            spool(stream, where, target)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise JobError(f"The training volume filled up while {where} was spooled to {target}: the images need "
                       f"the room of the data set itself. Give the job more storage: a larger VolumeSizeInGB "
                       f"(volume_size in the SDK) on instance types with EBS volumes (ml.p3, ml.c5, ml.m5), a larger "
                       f"instance size on those with fixed NVMe storage (ml.g4dn, ml.g5, ml.p3dn, ml.p4d).") from exc
    return target
