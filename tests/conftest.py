"""Mocked /opt/ml trees of tiny generated images, tiny model weights, and running `train` on them."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY_MODEL = "test_efficientnet"  # timm's own tiny EfficientNet: seconds per epoch on a CPU
# One colour per class so the classes are learnable; several formats and cases of extension.
COLOURS = {"ants": (200, 40, 40), "bees": (40, 200, 40), "wasps": (40, 40, 200)}
FORMATS = ("jpg", "png", "JPEG", "gif", "bmp", "webp")
TRAIN_COMMAND = shutil.which("train", path=str(Path(sys.executable).parent)) or "train"


def write_images(folder: Path, colour: tuple[int, int, int], count: int, seed: int, size: int = 40) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        noise = rng.integers(-40, 40, size=(size, size, 3))
        pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.{FORMATS[i % len(FORMATS)]}")


def write_files(folder: Path, files: dict) -> None:
    """Each name's bytes (or the bytes of a (bytes, ...) tuple) as a file in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content[0] if isinstance(content, tuple) else content)


def make_channels(data_dir: Path, classes=tuple(COLOURS), n_train: int = 12, n_val: int = 6) -> Path:
    for split, count, seed in (("train", n_train, 0), ("val", n_val, 1)):
        for index, name in enumerate(classes):
            write_images(data_dir / split / name, COLOURS[name], count, seed=seed * 100 + index)
    return data_dir


def make_job(base: Path, hyperparameters: dict[str, str], with_data: bool = True) -> Path:
    """A mocked /opt/ml tree: hyperparameters.json and (optionally) the train and val channels."""
    (base / "input" / "config").mkdir(parents=True, exist_ok=True)
    (base / "input" / "config" / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    if with_data:
        make_channels(base / "input" / "data")
    return base


def run_train(base: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items() if key != "TRAINING_JOB_NAME"}
    environ.update(SAGEMAKER_BASE_DIR=str(base), **env)
    return subprocess.run([TRAIN_COMMAND], env=environ, capture_output=True, text=True, timeout=timeout)


def read_summary(model_dir: Path) -> list[dict]:
    with open(model_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def failure_reason(base: Path) -> str:
    return (base / "output" / "failure").read_text()


@pytest.fixture
def in_process(monkeypatch):
    """Runs train.main() in this process (so that parts of it can be replaced), restoring what it changes."""
    from efficientnet_train import train

    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def run(base: Path) -> int:
        monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(base))
        return train.main()

    yield run
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> dict[str, Path]:
    """ImageNet-shaped (1000-class) weights of the tiny model, as .pth and .safetensors files."""
    import safetensors.torch
    import timm
    import torch

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    state_dict = timm.create_model(TINY_MODEL, num_classes=1000).state_dict()
    torch.save(state_dict, folder / "tiny.pth")
    safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, folder / "tiny.safetensors")
    return {"pth": folder / "tiny.pth", "safetensors": folder / "tiny.safetensors"}


@pytest.fixture
def tiny_hyperparameters(tiny_weights) -> dict[str, str]:
    """All strings, as SageMaker sends them."""
    return {"epochs": "1", "batch_size": "8", "model": TINY_MODEL, "pretrained_path": str(tiny_weights["pth"]),
            "img_size": "32", "workers": "0"}
