"""Bad input: every kind of file a buyer's folders hold is used correctly or skipped with a reason, a broken
tree or hyperparameter set fails in seconds saying how to fix it, and failures destroy nothing.

Every file is made here, at test time. Most checks call the scanner, decoder and dataset in-process (fast);
a few run `train` end to end.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageFile

from conftest import failure_reason, make_job, run_train, write_files, write_images
from efficientnet_train import data, failures, hyperparameters, resources, train
from efficientnet_train.channels import (Skip, check_channels_differ, copies_across, scan_channel,
                                         warn_about_copies, warn_about_thin_classes)
from efficientnet_train.data import ImageDataset, UnusableData, dataset_of, report_load_failures
from efficientnet_train.decoding import check_image, decode_image
from efficientnet_train.errors import JobError
from efficientnet_train.metrics import metric_definitions

RED, BLUE = (220, 30, 30), (30, 30, 220)


# ---- files, made at test time ------------------------------------------------------------------------

def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise_jpeg(size: int = 200) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    return encoded(Image.fromarray(pixels), "JPEG")


def png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few bytes whose header claims width x height pixels: a decompression bomb's disguise."""
    data = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def rgba_with_transparent_half() -> Image.Image:
    image = Image.new("RGBA", (20, 20), (*RED, 255))
    image.paste((0, 0, 0, 0), (0, 0, 10, 20))  # left half: transparent black
    return image


def palette_with_transparent_background() -> bytes:
    image = Image.new("P", (20, 20), 0)
    image.putpalette([0, 0, 0, *RED] + [0] * 762)
    image.paste(1, (10, 0, 20, 20))  # right half red, left half index 0: transparent
    return encoded(image, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (20, 20), RED), Image.new("RGB", (20, 20), BLUE)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def rotated_by_exif() -> bytes:
    """Stored 40 wide and 20 high, red on the left; EXIF orientation 6 says: turn 90 degrees clockwise."""
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(image, "JPEG", exif=exif.tobytes(), quality=95)


# name -> (bytes, expected decoded size, (pixel, expected colour) or None)
USABLE = {
    "photo.jpg": (encoded(Image.new("RGB", (30, 20), RED), "JPEG"), (30, 20), ((5, 5), RED)),
    "upper.JPG": (encoded(Image.new("RGB", (20, 20), RED), "JPEG"), (20, 20), ((5, 5), RED)),
    "windows.jfif": (encoded(Image.new("RGB", (20, 20), RED), "JPEG"), (20, 20), None),
    "cmyk.jpeg": (encoded(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG"), (20, 20), ((5, 5), (255, 0, 0))),
    "alpha.png": (encoded(rgba_with_transparent_half(), "PNG"), (20, 20), ((2, 5), (255, 255, 255))),
    "palette.PNG": (palette_with_transparent_background(), (20, 20), ((2, 5), (255, 255, 255))),
    "sixteen_bit.png": (encoded(Image.fromarray(np.full((20, 20), 32896, dtype=np.uint16)), "PNG"), (20, 20),
                        ((5, 5), (128, 128, 128))),
    "grey.png": (encoded(Image.new("L", (20, 20), 77), "PNG"), (20, 20), ((5, 5), (77, 77, 77))),
    "animated.gif": (animated_gif(), (20, 20), ((5, 5), RED)),  # the first frame
    "lossless.webp": (encoded(Image.new("RGB", (20, 20), RED), "WEBP", lossless=True), (20, 20), ((5, 5), RED)),
    "bitmap.bmp": (encoded(Image.new("RGB", (20, 20), RED), "BMP"), (20, 20), ((5, 5), RED)),
    "scan.tiff": (encoded(Image.new("RGB", (20, 20), RED), "TIFF"), (20, 20), ((5, 5), RED)),
    "scan.TIF": (encoded(Image.new("RGB", (20, 20), RED), "TIFF", compression="tiff_lzw"), (20, 20), None),
    "phone.jpg": (rotated_by_exif(), (20, 40), ((10, 5), RED)),  # now 20 wide, 40 high, red on top
    "dot.png": (encoded(Image.new("RGB", (1, 1), RED), "PNG"), (1, 1), ((0, 0), RED)),
    "png_named.jpg": (encoded(Image.new("RGB", (20, 20), RED), "PNG"), (20, 20), ((5, 5), RED)),
}
# name -> (bytes, the reason it is skipped); all count as unusable
UNUSABLE = {
    "cut.jpg": (noise_jpeg()[:6000], Skip.CORRUPT),
    "empty.jpg": (b"", Skip.EMPTY),
    "bomb.png": (png_claiming(30000, 30000), Skip.TOO_LARGE),
    "page.jpg": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", Skip.UNSUPPORTED),
    "garbage.png": (bytes(range(256)) * 4, Skip.UNSUPPORTED),
    "iphone.heic": (b"\0\0\0\x18ftypheic" + b"\0" * 64, Skip.UNSUPPORTED),
}
NOT_IMAGES = {"notes.txt": b"a note", "labels.csv": b"file,label\n"}
SYSTEM_JUNK = {".DS_Store": b"\0\0\0\1Bud1", "Thumbs.db": b"\xd0\xcf\x11\xe0", "desktop.ini": b"[.ShellClassInfo]"}


# ---- decoding: each kind of image, used correctly -----------------------------------------------------

@pytest.mark.parametrize("name", USABLE)
def test_each_kind_of_image_decodes_to_the_right_rgb_picture(name):
    content, size, probe = USABLE[name]
    image = decode_image(content)
    assert image.mode == "RGB" and image.size == size
    if probe:
        point, colour = probe
        assert np.abs(np.subtract(image.getpixel(point), colour)).max() <= 12, image.getpixel(point)


def test_exif_rotation_is_applied_not_just_the_size():
    image = decode_image(rotated_by_exif())
    top, bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
    assert top[0] > 180 > top[2] and bottom[2] > 180 > bottom[0]  # red above blue


def test_a_very_large_jpeg_decodes_reduced_but_still_large():
    image = decode_image(encoded(Image.new("RGB", (8400, 4200), RED), "JPEG"))
    assert image.size == (4200, 2100) and image.getpixel((100, 100))[0] > 200  # half scale, >= 2048 a side


def test_a_bomb_is_refused_from_its_header_and_never_decoded(tmp_path, monkeypatch):
    def no_decoding(self):
        raise AssertionError("a decompression bomb was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    (tmp_path / "bomb.png").write_bytes(png_claiming(30000, 30000))
    started = time.monotonic()
    assert check_image(str(tmp_path / "bomb.png"))[0] == Skip.TOO_LARGE
    with pytest.raises(data.UnreadableImage, match="too large"):
        decode_image(png_claiming(30000, 30000))
    assert time.monotonic() - started < 1


# ---- scanning a channel: what is used, skipped and ignored ----------------------------------------------

# A file name that, printed as it is, would add an epoch line with a forged objective, in colour, read backwards.
FORGED_NAME = ("forged\n2026-11-28 09:00:00,000 INFO epoch 9 train:loss=0.000001 validation:acc_1=99.999999 "
               "\u202ecod\x1b[0m.jpg")


def messy_channel(root: Path) -> Path:
    """Two classes with non-ASCII, space-containing names, every usable kind of image, unusable files,
    stray files, system junk, hidden files and folders, links and a link loop."""
    ants, bees = root / "fourmis rouges", root / "abeilles à miel"
    write_files(ants, USABLE)
    write_files(ants / "more" / "deeper", {"nested.png": USABLE["dot.png"]})
    write_files(ants, UNUSABLE)
    write_files(ants, NOT_IMAGES)
    write_files(ants, SYSTEM_JUNK)
    write_files(ants / ".thumbnails", {"hidden.jpg": USABLE["photo.jpg"]})
    write_files(ants / "__MACOSX", {"._photo.jpg": b"\0\5\26\7"})
    write_files(bees, {f"b{i}.png": USABLE["grey.png"] for i in range(60)})
    os.symlink(bees / "b0.png", ants / "linked.png")
    os.symlink(ants, ants / "more" / "loop")  # a link back up: the scan must not go round forever
    os.symlink(root / "nowhere.jpg", ants / "broken_link.jpg")
    write_files(root, {"stray.jpg": USABLE["photo.jpg"], "README.txt": b"hello"})
    return root


def test_scan_uses_every_readable_kind_and_names_why_the_rest_is_skipped(tmp_path):
    started = time.monotonic()
    channel = scan_channel("train", messy_channel(tmp_path / "train"))
    assert time.monotonic() - started < 10
    assert channel.classes == ["abeilles à miel", "fourmis rouges"]
    ants = sorted(os.path.relpath(path, tmp_path / "train" / "fourmis rouges")
                  for path, label in channel.samples if label == 1)
    assert ants == sorted([*USABLE, "linked.png", os.path.join("more", "deeper", "nested.png")])
    reasons = {skipped.path: skipped.reason for skipped in channel.skipped}
    assert reasons == {**{f"fourmis rouges/{name}": reason for name, (_, reason) in UNUSABLE.items()},
                       **{f"fourmis rouges/{name}": Skip.NOT_AN_IMAGE for name in NOT_IMAGES},
                       "fourmis rouges/broken_link.jpg": Skip.UNREADABLE,
                       "stray.jpg": Skip.OUTSIDE_CLASSES, "README.txt": Skip.NOT_AN_IMAGE}
    assert sorted(channel.ignored) == sorted(f"fourmis rouges/{name}" for name in
                                             [*SYSTEM_JUNK, ".thumbnails", "__MACOSX"])
    summary = channel.skipped_summary()
    assert summary["count"] == 11 and summary["unusable"] == 8  # .txt and .csv are not meant as images
    assert summary["per_class"] == {"fourmis rouges": 9, "(channel root)": 2}
    assert summary["by_reason"][Skip.UNSUPPORTED] == 3 and summary["ignored_hidden_or_system"] == 5
    inventory = channel.inventory()
    assert "skipped 11 files (" in inventory and "3 unsupported format" in inventory
    assert "fourmis rouges/cut.jpg (truncated or corrupt" in inventory
    assert "ignored 5 hidden or system files and folders" in inventory


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # refused all the same
def test_unreadable_files_say_why(tmp_path):
    write_files(tmp_path, {**UNUSABLE, "iphone.jpg": UNUSABLE["iphone.heic"]})
    assert "HEIC/HEIF or AVIF data (phone photos): convert it to JPEG" in check_image(str(tmp_path / "iphone.jpg"))[1]
    assert "HTML" in check_image(str(tmp_path / "page.jpg"))[1]
    assert "truncated" in check_image(str(tmp_path / "cut.jpg"))[1]
    assert "not decoded" in check_image(str(tmp_path / "bomb.png"))[1]
    (tmp_path / "big.png").write_bytes(png_claiming(10000, 10000))  # over the limit, under twice it
    assert "10000x10000 pixels" in check_image(str(tmp_path / "big.png"))[1]


def test_heic_files_are_unsupported_images_that_count(tmp_path):
    write_images(tmp_path / "train" / "ants", RED, 3, seed=0)
    write_images(tmp_path / "train" / "bees", BLUE, 3, seed=1)
    write_files(tmp_path / "train" / "bees", {"IMG_0001.HEIC": UNUSABLE["iphone.heic"]})
    channel = scan_channel("train", tmp_path / "train")
    assert [str(s) for s in channel.unusable()] == ["bees/IMG_0001.HEIC (unsupported format: convert it to JPEG "
                                                    "or PNG)"]


def two_classes(root: Path, per_class: int = 10) -> Path:
    write_images(root / "ants", RED, per_class, seed=0)
    write_images(root / "bees", BLUE, per_class, seed=1)
    return root


def test_more_than_the_allowed_share_unusable_fails_naming_examples(tmp_path):
    root = two_classes(tmp_path / "train")
    write_files(root / "ants", {f"cut{i}.jpg": UNUSABLE["cut.jpg"] for i in range(3)})  # 3 of 23: 13%
    with pytest.raises(JobError) as info:
        scan_channel("train", root, max_unusable_fraction=0.1)
    reason = str(info.value)
    assert "3 of the 23 image files in the 'train' channel (13%) cannot be used" in reason
    assert "max_unusable_fraction=0.1" in reason and "ants/cut0.jpg (truncated or corrupt" in reason
    assert len(scan_channel("train", root, max_unusable_fraction=0.15).samples) == 20
    assert len(scan_channel("train", root, max_unusable_fraction=1).unusable()) == 3
    with pytest.raises(JobError):
        scan_channel("train", root, max_unusable_fraction=0)


@pytest.mark.parametrize("layout", ["train/train", "train/photos"])
def test_a_channel_nested_one_level_too_deep_says_move_the_folders_up(tmp_path, layout):
    inner = tmp_path / layout
    two_classes(inner, per_class=2)
    with pytest.raises(JobError) as info:
        scan_channel("train", tmp_path / "train")
    reason = str(info.value)
    assert "nested one level too deep" in reason and str(inner) in reason
    assert "Move the class folders up one level" in reason and "ants, bees" in reason


def test_a_nested_val_channel_is_caught_but_a_val_of_one_class_in_sub_folders_is_fine(tmp_path):
    two_classes(tmp_path / "val" / "val", per_class=2)
    with pytest.raises(JobError, match="nested one level too deep"):
        scan_channel("val", tmp_path / "val", classes=["ants", "bees"])
    write_images(tmp_path / "val2" / "ants" / "batch1", RED, 2, seed=3)
    assert len(scan_channel("val", tmp_path / "val2", classes=["ants", "bees"]).samples) == 2


def test_every_class_without_usable_images_is_named(tmp_path):
    root = two_classes(tmp_path / "train", per_class=2)
    (root / "hornets").mkdir()
    write_files(root / "wasps", {"a.jpg": b"", "b.txt": b"x"})
    with pytest.raises(JobError) as info:
        scan_channel("train", root)
    reason = str(info.value)
    assert "2 class folders in the 'train' channel hold no usable images" in reason
    assert str(root / "hornets") in reason and "wasps/a.jpg (empty" in reason


def test_thin_classes_and_classes_missing_from_val_are_warnings(tmp_path, caplog):
    train_root = two_classes(tmp_path / "train", per_class=6)
    write_images(train_root / "wasps", RED, 1, seed=2)  # one image: trains, poorly
    write_images(tmp_path / "val" / "ants", RED, 1, seed=3)
    train_channel = scan_channel("train", train_root)
    warn_about_thin_classes(train_channel, scan_channel("val", tmp_path / "val", classes=train_channel.classes))
    assert "fewer than 5 training images: wasps (1)" in caplog.text
    assert "no images of 2 of the 3 classes (bees, wasps)" in caplog.text


def test_validation_images_copied_from_training_are_counted_and_named(tmp_path, caplog):
    train_root = two_classes(tmp_path / "train", per_class=6)
    copied = sorted((train_root / "ants").iterdir())[:2]
    (tmp_path / "val" / "ants").mkdir(parents=True)
    for index, source in enumerate(copied):
        shutil.copyfile(source, tmp_path / "val" / "ants" / f"copy{index}{source.suffix}")
    same_size = bytearray(copied[0].read_bytes())  # same size as a training image, other bytes: not a copy
    same_size[-3] ^= 0xFF
    (tmp_path / "val" / "ants" / f"near{copied[0].suffix}").write_bytes(bytes(same_size))
    write_images(tmp_path / "val" / "bees", RED, 2, seed=9)
    train_channel = scan_channel("train", train_root)
    val_channel = scan_channel("val", tmp_path / "val", classes=train_channel.classes)
    copies = copies_across(train_channel, val_channel)
    assert sorted((Path(v).name, Path(t).name) for v, t in copies) == sorted(
        (f"copy{i}{p.suffix}", p.name) for i, p in enumerate(copied))
    warn_about_copies(copies, train_channel, val_channel)
    assert "2 of the 5 validation images are byte-identical copies of training images" in caplog.text
    assert f"ants/copy0{copied[0].suffix} = ants/{copied[0].name}" in caplog.text


def test_both_channels_pointed_at_the_data_set_root_or_at_one_folder_fail_with_the_fix(tmp_path):
    """train = val = hymenoptera_data/ (holding train/ and val/) trained 'train' against 'val' and billed 100%."""
    root = tmp_path / "hymenoptera_data"
    two_classes(root / "train", per_class=4)
    two_classes(root / "val", per_class=2)
    train_channel = scan_channel("train", root)
    val_channel = scan_channel("val", root, classes=train_channel.classes)
    with pytest.raises(JobError, match=r"both hold class folders named like data splits \(train, val\)") as info:
        check_channels_differ(train_channel, val_channel, copies_across(train_channel, val_channel))
    assert f"Point 'train' at {root / 'train'} and 'val' at {root / 'val'}" in str(info.value)
    assert "rename all but one" in str(info.value)
    same = scan_channel("val", root / "train", classes=scan_channel("train", root / "train").classes)
    train_only = scan_channel("train", root / "train")
    with pytest.raises(JobError, match="Every one of the 8 images of the 'val' channel is a training image"):
        check_channels_differ(train_only, same, copies_across(train_only, same))
    # one real class named like a split trains
    write_images(tmp_path / "real" / "train" / "test", RED, 3, seed=4)
    write_images(tmp_path / "real" / "train" / "wasps", BLUE, 3, seed=5)
    write_images(tmp_path / "real" / "val" / "test", RED, 2, seed=6)
    train_channel = scan_channel("train", tmp_path / "real" / "train")
    val_channel = scan_channel("val", tmp_path / "real" / "val", classes=train_channel.classes)
    check_channels_differ(train_channel, val_channel, copies_across(train_channel, val_channel))


def test_scan_of_many_files_takes_seconds(tmp_path):
    jpeg = encoded(Image.new("RGB", (64, 48), RED), "JPEG")
    for label in ("ants", "bees"):
        write_files(tmp_path / label, {f"{i:05d}.jpg": jpeg for i in range(2500)})
    started = time.monotonic()
    assert len(scan_channel("train", tmp_path).samples) == 5000
    assert time.monotonic() - started < 10  # measured: under 1 s on 2 busy cores


# ---- files that break while training reads them ---------------------------------------------------------

def dataset_with_a_broken_file(root: Path, **options) -> tuple[ImageDataset, int]:
    channel = scan_channel("train", two_classes(root, per_class=3))
    dataset = dataset_of(channel, lambda image: torch.tensor(image.getpixel((0, 0))), **options)
    broken = next(i for i, (path, _) in enumerate(channel.samples) if path.endswith("img001.png"))
    Path(channel.samples[broken][0]).write_bytes(noise_jpeg()[:3000])  # damaged after the scan
    return dataset, broken


def test_a_file_broken_at_decode_time_is_replaced_by_its_class_and_logged_once(tmp_path, caplog):
    dataset, broken = dataset_with_a_broken_file(tmp_path)
    image, label = dataset[broken]
    assert label == 0 and torch.equal(image, dataset[broken + 1][0])  # the next ant stands in
    dataset[broken]
    assert caplog.text.count("img001.png cannot be used") == 1 and "truncated" in caplog.text
    assert dataset.failed_files() == [dataset.samples[broken][0]]
    assert report_load_failures(1, [dataset]) == {"train": {"count": 1, "examples": [dataset.samples[broken][0]]}}
    assert "After epoch 1: 1 files of the 'train' channel failed to load" in caplog.text


def test_too_many_files_broken_at_decode_time_fail_naming_them(tmp_path):
    dataset, broken = dataset_with_a_broken_file(tmp_path, max_unusable_fraction=0.1)  # 0 of 6 may fail
    with pytest.raises(UnusableData, match=r"1 image files of the 'train' channel failed to load during training.*"
                                           r"img001.png \(the image is truncated"):
        dataset[broken]


def test_a_class_whose_every_file_breaks_fails(tmp_path):
    dataset, _ = dataset_with_a_broken_file(tmp_path)
    for path, label in dataset.samples:
        if label == 1:
            Path(path).unlink()  # gone mid-run (a FastFile hiccup, a cleanup script)
    with pytest.raises(UnusableData, match="Every image of class 'bees' in the 'train' channel failed"):
        dataset[len(dataset) - 1]


def test_an_error_in_a_loader_worker_reaches_the_buyer_without_the_traceback(tmp_path):
    dataset, broken = dataset_with_a_broken_file(tmp_path, max_unusable_fraction=0.0, workers=1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=6, num_workers=1)
    with pytest.raises(UnusableData) as info:
        next(iter(loader))
    assert "Traceback" in str(info.value)  # how torch re-raises it
    reason = str(failures.explained(info.value, 6, 1, [dataset]))
    assert reason.startswith("1 image files of the 'train' channel") and "img001.png" in reason
    assert "Traceback" not in reason


def test_a_loader_worker_killed_by_a_signal_names_the_file_and_the_fix(tmp_path):
    two_classes(tmp_path, per_class=3)
    # The first file read: the worker dies before it has handed over a batch, which would race with its death.
    write_files(tmp_path / "ants", {"a_poison.png": encoded(Image.new("RGB", (13, 13)), "PNG")})
    channel = scan_channel("train", tmp_path)

    def transform(image):
        if image.size == (13, 13):
            os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does
        return torch.zeros(1)

    dataset = dataset_of(channel, transform, workers=1)
    # torch says "is killed by signal: Killed" or "exited unexpectedly", whichever it notices first
    with pytest.raises(RuntimeError, match="DataLoader worker") as info:
        list(torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1))
    reason = str(failures.explained(info.value, 2, 1, [dataset]))
    assert "while reading" in reason and "ants/a_poison.png" in reason
    assert "lower workers (now 1)" in reason
    reset = str(failures.explained(ConnectionResetError(104, "Connection reset by peer"), 2, 1, [dataset]))
    assert reset.startswith("A data-loading worker process died") and "lower workers" in reset


# ---- the environment: memory, disk, GPU -------------------------------------------------------------

def evaluate():  # named like engine.evaluate: the reason says the failure was in validation
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def train_one_epoch():
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("step, phase", [(evaluate, "validation"), (train_one_epoch, "training")])
def test_out_of_memory_says_which_batch_size_failed_and_what_to_try(step, phase):
    with pytest.raises(torch.cuda.OutOfMemoryError) as info:
        step()
    reason = str(failures.explained(info.value, 64, 1, []))
    assert f"Out of GPU memory in {phase} with batch_size=64" in reason and "Set batch_size to 32" in reason
    assert "batch_size=1" not in reason
    assert "Not even one image fits" in str(failures.explained(info.value, 1, 1, []))


def test_atomic_write_on_a_full_disk_keeps_the_old_file_and_names_the_folder(tmp_path):
    from efficientnet_train.outputs import atomic_write

    target = tmp_path / "checkpoints" / "checkpoint-00001-0000000.pth.tar"
    target.parent.mkdir()
    target.write_bytes(b"the previous good checkpoint")
    os.symlink("/dev/full", target.with_name(f".{target.name}.tmp"))  # every write: ENOSPC
    with pytest.raises(JobError) as info:
        atomic_write(target, lambda f: torch.save({"weights": torch.zeros(10000)}, f))
    reason = str(info.value)
    assert "The disk is full" in reason and str(target.parent) in reason and "VolumeSizeInGB" in reason
    assert target.read_bytes() == b"the previous good checkpoint"
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # the temporary file is gone


# ---- hyperparameters -------------------------------------------------------------------------------------

@pytest.mark.parametrize("word, value", [("true", True), ("True", True), ("TRUE", True), ("1", True),
                                         ("yes", True), (" on ", True), ('"true"', True), ("false", False),
                                         ("False", False), ("0", False), ("no", False), ("Off", False)])
def test_booleans_accept_the_usual_spellings(word, value):
    assert hyperparameters.parse({"eval_hflip": word})[0].eval_hflip is value


@pytest.mark.parametrize("name, raw, allowed", [
    ("batch_size", "8.5", "an integer from 2 to 4096"), ("batch_size", "", "an integer from 2 to 4096"),
    ("batch_size", None, "an integer"), ("batch_size", "0", "an integer from 2 to 4096"),
    ("lr", "fast", "auto, or a number from 0.000001 to 10"), ("lr", "inf", "auto, or a number from 0.000001 to 10"),
    ("model_ema", "2", "true or false"),
    ("max_unusable_fraction", "1.5", "a number from 0 to 1"), ("max_unusable_fraction", "-0.1", "from 0 to 1"),
    ("img_size", "2000", "an integer from 32 to 1024; unset (or 0, outside SageMaker) = automatic"),
    ("img_size", "31", "from 32 to 1024"),
    ("opt", ["sgd"], "one of auto, sgd"), ("sched", "plateau", "one of step, cosine, tanh, poly;"),
])
def test_wrong_types_and_ranges_name_the_key_the_value_and_what_is_allowed(name, raw, allowed):
    with pytest.raises(JobError) as info:
        hyperparameters.parse({name: raw})
    reason = str(info.value)
    assert f"'{name}' = {raw!r} is invalid" in reason and allowed in reason


def test_batch_size_larger_than_the_training_set_trains_with_the_largest_that_fits(caplog):
    assert resources.fitted_batch_size(64, 38) == 38 and resources.fitted_batch_size(38, 38) == 38
    assert "batch_size=64 is larger than the training set (38 usable images in 'train'): training with batches " \
           "of 38" in caplog.text
    with pytest.raises(JobError, match="too small to train on: 1 usable images"):
        resources.fitted_batch_size(32, 1)


# ---- end to end: `train` on broken trees ---------------------------------------------------------------

def file_digests(base: Path) -> dict[str, str]:
    return {str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in ("model", "checkpoints") for p in sorted((base / folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def messy_job(tmp_path_factory, tiny_weights):
    """A complete run on a train channel of every usable kind of image plus junk, with non-ASCII labels."""
    base = tmp_path_factory.mktemp("messy")
    make_job(base, {"epochs": "1", "batch_size": "8", "model": "test_efficientnet", "img_size": "32",
                    "workers": "1", "pretrained_path": str(tiny_weights["pth"])}, with_data=False)
    train_root = base / "input" / "data" / "train"
    write_files(train_root / "fourmis rouges", USABLE)
    write_files(train_root / "fourmis rouges", {name: UNUSABLE[name] for name in ("cut.jpg", "empty.jpg")})
    write_files(train_root / "fourmis rouges", {**NOT_IMAGES, **SYSTEM_JUNK})
    write_files(train_root / "fourmis rouges", {FORGED_NAME: UNUSABLE["cut.jpg"]})
    write_images(train_root / "abeilles à miel", BLUE, 18, seed=1)  # 2 unusable of 36 image files: 5.6%
    write_images(base / "input" / "data" / "val" / "fourmis rouges", RED, 3, seed=2)
    write_images(base / "input" / "data" / "val" / "abeilles à miel", BLUE, 3, seed=3)
    result = run_train(base)
    assert result.returncode == 0, result.stdout + result.stderr
    return base, result.stdout + result.stderr


def test_a_messy_channel_trains_and_logs_what_it_skipped(messy_job):
    base, log = messy_job
    assert "channel 'train'" in log and "34 images in 2 classes" in log
    assert "skipped 5 files (" in log and "fourmis rouges/cut.jpg (truncated or corrupt" in log
    assert "ignored 3 hidden or system files and folders (fourmis rouges/.DS_Store, fourmis rouges/Thumbs.db" in log
    assert "No GPU found" in log and "training on the CPU" in log
    args = yaml.safe_load((base / "model" / "args.yml").read_text(encoding="utf-8"))
    skipped = args["skipped_files"]["train"]
    assert skipped["count"] == 5 and skipped["unusable"] == 3
    assert skipped["by_reason"] == {Skip.CORRUPT: 2, Skip.EMPTY: 1, Skip.NOT_AN_IMAGE: 2}
    assert skipped["per_class"] == {"fourmis rouges": 5}
    labels = json.loads((base / "model" / "labels.json").read_text(encoding="utf-8"))
    assert labels == {"0": "abeilles à miel", "1": "fourmis rouges"}


def test_a_file_name_cannot_forge_a_metric_or_a_log_line(messy_job):
    """SageMaker reads metrics with `validation:acc_1=([0-9]+\\.[0-9]+)` from every log line."""
    _, log = messy_job
    metric_lines = [line for line in log.splitlines()
                    if any(re.search(d["Regex"], line) for d in metric_definitions())]
    assert metric_lines and all(re.match(r"\S+ \S+ INFO epoch \d+/\d+ train:loss=", line) for line in metric_lines)
    assert "forged\\n2026-11-28 09:00:00,000 INFO epoch 9 train:loss\\x3d0.000001 validation:acc_1\\x3d99.999999" \
           " \\u202ecod\\x1b[0m.jpg" in log
    assert "\u202e" not in log and "\x1b" not in log


def test_a_broken_tree_fails_in_seconds_and_destroys_nothing(messy_job, tmp_path):
    base = tmp_path / "opt_ml"
    shutil.copytree(messy_job[0], base, symlinks=True)
    before = file_digests(base)
    assert any(name.startswith("checkpoints/") for name in before) and "model/model_best.pth.tar" in before
    ants = base / "input" / "data" / "train" / "fourmis rouges"
    write_files(ants, {f"download{i}.jpg": UNUSABLE["page.jpg"] for i in range(5)})
    started = time.monotonic()
    result = run_train(base, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    reason = failure_reason(base)
    assert "8 of the 42 image files in the 'train' channel (19%) cannot be used" in reason
    assert "fourmis rouges/" in reason and "max_unusable_fraction" in reason and len(reason) <= 1025
    console = result.stdout + result.stderr
    assert "Training failed: 8 of the 42 image files" in console and "Traceback" not in console  # the reason alone
    assert file_digests(base) == before
    assert elapsed < 30, elapsed  # importing torch is most of it


def test_a_batch_size_larger_than_the_set_trains_with_what_there_is(tmp_path, tiny_hyperparameters):
    """A small first set with the default batch_size (12 images, 32) failed the job: the most common first try."""
    base = make_job(tmp_path, {**tiny_hyperparameters, "batch_size": "64"})  # 36 training images
    result = run_train(base, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "batch_size=64 is larger than the training set (36 usable images in 'train'): training with batches " \
           "of 36" in result.stdout
    assert yaml.safe_load((base / "model" / "args.yml").read_text())["batch_size"] == 36


def test_a_full_disk_while_writing_the_model_keeps_the_previous_one(messy_job, tmp_path):
    base = tmp_path / "opt_ml"
    shutil.copytree(messy_job[0], base, symlinks=True)
    before = file_digests(base)
    # The same job again: it finds its finished checkpoint and writes model/ again, onto a full disk.
    os.symlink("/dev/full", base / "model" / ".model_best.pth.tar.tmp")
    result = run_train(base, timeout=120)
    assert result.returncode != 0
    reason = failure_reason(base)
    assert reason.startswith(f"The disk is full: writing model_best.pth.tar to {base / 'model'} failed")
    assert "VolumeSizeInGB" in reason and "volume_size" in reason
    assert file_digests(base)["model/model_best.pth.tar"] == before["model/model_best.pth.tar"]
    assert not (base / "model" / ".model_best.pth.tar.tmp").exists()


def test_the_disk_space_estimate_matches_the_real_checkpoints(messy_job):
    from efficientnet_train.checkpoints import KEEP, room_for_checkpoints

    base = messy_job[0]
    hp, _ = hyperparameters.parse({"model": "test_efficientnet"})  # the messy job's optimizer and EMA: defaults
    model_bytes, checkpoint_bytes = resources.output_sizes(hp, 2)
    # Within 10% for this tiny model, where each tensor's few hundred bytes of file format weigh more than they
    # do in efficientnet_b3 (there the estimate is 0.4% short of a real checkpoint's 216 MB).
    assert model_bytes == pytest.approx((base / "model" / "model_best.pth.tar").stat().st_size, rel=0.1)
    held = list((base / "checkpoints").iterdir())
    assert checkpoint_bytes == pytest.approx(max(path.stat().st_size for path in held), rel=0.1)
    assert KEEP == 2 and room_for_checkpoints(base / "empty", checkpoint_bytes) == (3 * checkpoint_bytes,
                                                                                   "3 checkpoints of 1.6 MB")
    # A resumed job already holds some of its checkpoints: the disk needs room for the rest only.
    # The probe's epoch 0 and epoch 1: room for the one written before the older goes.
    assert len(held) == 2 and room_for_checkpoints(base / "checkpoints", checkpoint_bytes)[0] == checkpoint_bytes


@pytest.mark.parametrize("opt", hyperparameters.OPTIMIZERS)
def test_each_optimizers_state_is_sized_by_a_real_step(opt):
    hp, _ = hyperparameters.parse({"model": "test_efficientnet", "opt": opt})
    model_bytes, checkpoint_bytes = resources.output_sizes(hp, 2)
    # The weights, their average and the best model; then 0 to 3 weight-sized buffers of the optimizer's own.
    buffers = checkpoint_bytes / model_bytes - 3
    assert -0.1 < buffers < 3.1
    expected = {"sgd": 1, "momentum": 1, "rmsproptf": 2, "adamw": 2, "madgrad": 3}
    if opt in expected:  # slightly less: BatchNorm's running statistics are weights without optimizer state
        assert buffers == pytest.approx(expected[opt], abs=0.15)
    no_ema, _ = hyperparameters.parse({"model": "test_efficientnet", "opt": opt, "model_ema": "false"})
    assert resources.output_sizes(no_ema, 2) == (model_bytes, checkpoint_bytes - model_bytes)


def test_too_little_disk_space_fails_before_the_model_is_built_and_says_how_much_is_needed(
        tmp_path, tiny_hyperparameters, in_process, monkeypatch):
    base = make_job(tmp_path, tiny_hyperparameters)
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=120_000))
    started = time.monotonic()
    assert in_process(base) == 1
    reason = failure_reason(base)
    # model/ and checkpoints/ do not exist yet: both are on base's disk, their needs added up.
    assert reason.startswith(f"Not enough disk space: the disk holding {base} has 0.1 MB free, and this job will "
                             f"need about 5.7 MB there: the best model (0.4 MB) and the copy replacing it in "
                             f"{base / 'model'}; 3 checkpoints of 1.6 MB in {base / 'checkpoints'}. Give the job "
                             f"more storage: a larger VolumeSizeInGB")
    assert "a larger instance size on those with fixed NVMe storage (ml.g4dn, ml.g5, ml.p3dn, ml.p4d)" in reason
    assert "FastFile input mode" in reason and len(reason) < 900
    assert "volume_size" in reason
    assert not (base / "model").exists() and not (base / "checkpoints").exists()
    assert time.monotonic() - started < 20


def test_folders_on_different_disks_are_checked_each_against_its_own_free_space(tmp_path, monkeypatch):
    from efficientnet_train.outputs import check_room

    roomy, cramped = tmp_path / "roomy", tmp_path / "cramped"
    roomy.mkdir(), cramped.mkdir()
    real_stat, real_usage = os.stat, shutil.disk_usage
    devices = {str(roomy): 1, str(cramped): 2}
    monkeypatch.setattr(os, "stat", lambda path, **kw: os.stat_result(
        tuple(real_stat(path, **kw))[:2] + (devices.get(str(path), 0),) + tuple(real_stat(path, **kw))[3:]))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(
        free={str(roomy): 10**9, str(cramped): 3 * 10**6}[str(path)]))
    check_room({roomy: (900 * 10**6, "a lot"), cramped / "new" / "folder": (2 * 10**6, "a little")})
    with pytest.raises(JobError) as info:
        check_room({roomy: (900 * 10**6, "a lot"), cramped / "new": (4 * 10**6, "four checkpoints")})
    assert str(info.value).startswith(f"Not enough disk space: the disk holding {cramped} has 3.0 MB free, and this "
                                      f"job will need about 4.0 MB there: four checkpoints in {cramped / 'new'}.")


def test_a_model_folder_linked_to_nowhere_is_named_with_its_target(tmp_path):
    from efficientnet_train.outputs import check_room

    (tmp_path / "model").symlink_to(tmp_path / "volume" / "model")
    with pytest.raises(JobError) as info:
        check_room({tmp_path / "model": (1, "the best model")})
    assert str(info.value) == (f"{tmp_path / 'model'} is a symbolic link to {tmp_path / 'volume' / 'model'}, which "
                               f"does not exist. Create that folder, or remove the link.")


@pytest.mark.parametrize("fake, phase", [(train_one_epoch, "training"), (evaluate, "validation")])
def test_cuda_out_of_memory_in_a_job_names_the_batch_size_and_half_of_it(tmp_path, tiny_hyperparameters,
                                                                          in_process, monkeypatch, fake, phase):
    """The real job, scan to failure file, with the training or validation step replaced by one that runs
    out of GPU memory."""
    monkeypatch.setattr(train, fake.__name__, lambda *args, **kwargs: fake())
    base = make_job(tmp_path, tiny_hyperparameters)
    assert in_process(base) == 1
    reason = failure_reason(base)
    assert reason.startswith(f"Out of GPU memory in {phase} with batch_size=8")
    assert "Set batch_size to 4 (half of 8) or lower" in reason


def test_a_phone_photo_decodes_at_the_scale_its_smallest_crop_needs():
    from efficientnet_train.data import decode_side

    config = {"train_input_size": [3, 300, 300], "input_size": [3, 320, 320], "crop_pct": 1.0}
    side = decode_side(config, training=True, crop_scale=0.25)
    assert side == 693  # a crop of a quarter of the area at aspect 3/4 is still 300 pixels on its short side
    assert decode_side(config, training=True, crop_scale=1.0) == 300  # no random crop: evaluation's, at 300
    photo = encoded(Image.new("RGB", (4032, 3024), RED), "JPEG")
    assert decode_image(photo, side).size == (1008, 756)  # 1/4 scale: 1/8 would be 378 < 693
    assert decode_image(photo, decode_side(config, training=False)).size == (504, 378)  # resized to 320 anyway
    assert decode_image(encoded(Image.new("RGB", (1300, 1000), RED), "JPEG"), side).size == (1300, 1000)
