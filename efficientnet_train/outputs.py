"""The files of `model/` (the artifact SageMaker packs into model.tar.gz), written safely."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
import shutil
import tarfile
from pathlib import Path
from typing import BinaryIO, Callable

import yaml

from .errors import JobError
from .untrusted import csv_cell, shown

ARGS_FILE, LABELS_FILE, BEST_MODEL_FILE, SUMMARY_FILE = "args.yml", "labels.json", "model_best.pth.tar", "summary.csv"
METRICS_PLOT_FILE, CONFUSION_FILE = "metrics.png", "confusion_matrix.csv"
MODEL_FILES = (ARGS_FILE, LABELS_FILE, BEST_MODEL_FILE, SUMMARY_FILE, METRICS_PLOT_FILE, CONFUSION_FILE)
HELD_OUT_FILE = "held_out_validation.csv"  # only where a job without a 'val' channel held images out of 'train'
ARCHIVE_FILE = "model.tar.gz"
SUMMARY_COLUMNS = ("epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr")
MULTI_LABEL_SUMMARY_COLUMNS = ("epoch", "train_loss", "eval_loss", "eval_map", "lr")


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Readers see the old file or the new one, never half of one; a full disk fails the job saying so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    f = None
    try:
        with open(tmp, "wb") as raw:
            f = _WriteErrorMemo(raw)
            write(f)
            f.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        full = next((e for e in (exc, exc.__context__, f and f.error) if _disk_full(e)), None)
        if full is not None:
            raise JobError(disk_full_reason(path, full)) from exc
        raise
    _fsync_dir(path.parent)  # the rename itself must reach the disk before we count on it


def check_output_file(path: Path, option: str, example: str) -> None:
    """Refuse, before any work is spent, an output a command was given (`option`) that is a link, a folder or not
    a regular file: nothing is written through links or over what is not a file. Makes its folder."""
    if path.is_symlink():
        raise JobError(f"{option} {path} is a symbolic link (to {shown(os.readlink(path), 200)}); nothing is written "
                       f"through links. Give the file's own path, or another name.")
    if path.is_dir():
        raise JobError(f"{option} {path} is a folder; give a file name, such as {path / example}.")
    if path.exists() and not path.is_file():
        raise JobError(f"{option} {path} is not a regular file (a named pipe, socket or device); give a file name.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise JobError(f"{option} {path}: its folder cannot be made ({exc.strerror}: {exc.filename}).") from exc


def remove_leftover_temporaries(folder: Path, names: re.Pattern) -> list[str]:
    """Delete the half-written `.<name>.tmp` files that a killed atomic_write of this job left in `folder`, for
    the names `names` matches: SageMaker would sync or pack them, and the disk check would not count them.
    Only regular files of exactly that form: a link or anything else a user put there is left alone."""
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        if (path.name.startswith(".") and path.name.endswith(".tmp") and names.fullmatch(path.name[1:-4])
                and path.is_file() and not path.is_symlink()):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return sorted(removed)


MODEL_OUTPUT_NAMES = re.compile("|".join(re.escape(name) for name in (*MODEL_FILES, HELD_OUT_FILE, ARCHIVE_FILE)))


class _WriteErrorMemo:
    """A file that remembers the OSError of a failed write: torch.save reports a full disk as a bare
    RuntimeError ("unexpected pos ..."), which would hide the cause."""

    def __init__(self, f: BinaryIO):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def _disk_full(exc: BaseException | None) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_reason(path: Path, exc: OSError) -> str:
    what = "over its disk quota" if exc.errno == errno.EDQUOT else "full"
    return (f"The disk is {what}: writing {path.name} to {path.parent} failed ({os.strerror(exc.errno)}); the "
            f"files already there are kept. {MORE_ROOM}, or free space in {path.parent}.")


# VolumeSizeInGB only sizes EBS volumes: the NVMe families' storage is fixed by the instance size.
MORE_ROOM = ("Give the job more storage: a larger VolumeSizeInGB (volume_size in the SageMaker Python SDK's "
             "Estimator) on instance types with EBS volumes (ml.p3, ml.c5, ml.m5); a larger instance size on those "
             "with fixed NVMe storage (ml.g4dn, ml.g5, ml.p3dn, ml.p4d), where that setting is ignored; or FastFile "
             "input mode, which streams the data from S3 instead of copying it there")


def check_room(needs: dict[Path, tuple[int, str]]) -> None:
    """Fail in seconds, not at the first checkpoint an epoch later, when a disk can't hold what the job will
    write to these folders (bytes, and what they are). Folders on one file system share its free space: in
    SageMaker's File mode the data set was copied onto the same volume as model/ and checkpoints/."""
    by_disk: dict[int, list] = {}
    for folder, (size, what) in needs.items():
        if folder.is_symlink() and not folder.exists():
            raise JobError(f"{folder} is a symbolic link to {shown(os.readlink(folder), 200)}, which does not exist. "
                           f"Create that folder, or remove the link.")
        existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
        disk = by_disk.setdefault(os.stat(existing).st_dev, [existing, 0, []])
        disk[1] += size
        disk[2].append(f"{what} in {folder}")
    for existing, size, writes in by_disk.values():
        free = shutil.disk_usage(existing).free
        if free < size:
            raise JobError(f"Not enough disk space: the disk holding {existing} has {megabytes(free)} free, and this "
                           f"job will need about {megabytes(size)} there: {'; '.join(writes)}. {MORE_ROOM}, or "
                           f"free space on that disk.")


def megabytes(size: int) -> str:
    return f"{size / 1e6:,.{1 if size < 10e6 else 0}f} MB"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some file systems (and Windows) can't open folders; the data itself is synced
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_held_out(model_dir: Path, rows: list[tuple[str, str]]) -> None:
    """The validation images a job held out of 'train': path relative to the channel, and label."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "label"])
    writer.writerows([csv_cell(path), csv_cell(label)] for path, label in rows)
    write_text(model_dir / HELD_OUT_FILE, buffer.getvalue())


def write_labels(model_dir: Path, classes: list[str]) -> None:
    write_text(model_dir / LABELS_FILE,
               json.dumps({str(i): name for i, name in enumerate(classes)}, indent=2, ensure_ascii=False) + "\n")


def write_args(model_dir: Path, args: dict) -> str:
    text = yaml.safe_dump(args, sort_keys=False, allow_unicode=True)
    write_text(model_dir / ARGS_FILE, text)
    return text


def write_summary(model_dir: Path, rows: list[dict]) -> None:
    """The whole table each epoch: tiny, and a rewrite can't leave a torn row."""
    buffer = io.StringIO()
    columns = MULTI_LABEL_SUMMARY_COLUMNS if rows and "eval_map" in rows[0] else SUMMARY_COLUMNS
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(model_dir / SUMMARY_FILE, buffer.getvalue())


def pack_model(model_dir: Path) -> Path:
    """model.tar.gz as SageMaker would make it, for runs outside SageMaker."""
    archive = model_dir / ARCHIVE_FILE

    def write(f: BinaryIO) -> None:
        with tarfile.open(fileobj=f, mode="w:gz") as tar:
            for name in (*MODEL_FILES, HELD_OUT_FILE):
                if name not in (HELD_OUT_FILE, CONFUSION_FILE) or (model_dir / name).exists():  # not always made
                    tar.add(model_dir / name, arcname=name)

    atomic_write(archive, write)
    return archive
