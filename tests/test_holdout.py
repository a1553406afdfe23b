"""A job without a 'val' channel holds out a seeded, stratified share of each class of 'train'."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import failure_reason, make_job, run_train
from efficientnet_train.channels import Channel
from efficientnet_train.errors import JobError
from efficientnet_train.holdout import hold_out


def channel(counts: dict[str, int]) -> Channel:
    classes = sorted(counts)
    samples = [(f"/data/train/{name}/{i:03d}.jpg", label) for label, name in enumerate(classes)
               for i in range(counts[name])]
    return Channel("train", Path("/data/train"), classes, samples=samples)


def test_each_class_gives_its_share_at_least_one_and_keeps_one():
    train, val = hold_out(channel({"a": 100, "b": 10, "c": 2, "d": 3}), 0.2, seed=42)
    assert val.images_per_class() == {"a": 20, "b": 2, "c": 1, "d": 1}
    assert train.images_per_class() == {"a": 80, "b": 8, "c": 1, "d": 2}
    assert not {path for path, _ in train.samples} & {path for path, _ in val.samples}
    assert all(path.split("/")[3] == val.classes[label] for path, label in val.samples)  # labels kept
    assert hold_out(channel({"a": 100, "b": 10, "c": 2, "d": 3}), 0.2, seed=42)[1].samples == val.samples
    other = hold_out(channel({"a": 100, "b": 10, "c": 2, "d": 3}), 0.2, seed=7)[1].samples
    assert other != val.samples and len(other) == len(val.samples)
    # A class's draw does not move when another class gains images.
    grown = hold_out(channel({"a": 100, "b": 10, "c": 2, "d": 30}), 0.2, seed=42)[1]
    assert [s for s in grown.samples if s[1] == 0] == [s for s in val.samples if s[1] == 0]


def test_a_class_of_one_image_cannot_be_split_and_the_reason_names_it():
    with pytest.raises(JobError) as info:
        hold_out(channel({"ants": 5, "lonely bee": 1}), 0.2, seed=42)
    assert "lonely bee (1)" in str(info.value) and "give a 'val' channel" in str(info.value)


def test_a_job_without_val_trains_and_says_what_it_held_out(tmp_path, tiny_hyperparameters):
    base = make_job(tmp_path, {**tiny_hyperparameters, "val_fraction": "0.25"})
    shutil.rmtree(base / "input" / "data" / "val")
    result = run_train(base)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("No 'val' channel: 9 of the 36 training images (val_fraction=0.25 of each class, chosen by seed 42) "
            "are held out for validation and not trained on; held_out_validation.csv lists them.") in result.stdout
    with open(base / "model" / "held_out_validation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and sorted({row["label"] for row in rows}) == ["ants", "bees", "wasps"]
    assert all((base / "input" / "data" / "train" / row["image"]).is_file() for row in rows)
    args = yaml.safe_load((base / "model" / "args.yml").read_text())
    assert args["val_held_out_of_train"] is True and args["train_images"] == 27 and args["val_images"] == 9
    assert args["effective_balance_classes"] == 0  # held out of train: the training set's shares by construction
    import tarfile

    with tarfile.open(base / "model" / "model.tar.gz") as tar:
        assert "held_out_validation.csv" in tar.getnames()
    one = make_job(tmp_path / "one", tiny_hyperparameters)
    shutil.rmtree(one / "input" / "data" / "val")
    for image in sorted((one / "input" / "data" / "train" / "wasps").iterdir())[1:]:
        image.unlink()
    assert run_train(one).returncode == 1
    assert "1 class(es) have a single image" in failure_reason(one) and "wasps (1)" in failure_reason(one)


def test_train_pointed_at_the_data_sets_root_without_val_is_the_same_layout_mistake():
    from efficientnet_train.channels import check_channels_differ

    train, val = hold_out(channel({"train": 10, "val": 5}), 0.2, seed=42)
    with pytest.raises(JobError) as info:
        check_channels_differ(train, val, [])
    assert str(info.value).startswith("The 'train' channel holds class folders named like data splits (train, val)")
