"""Run the `train` command as SageMaker would, on a mocked /opt/ml tree, and read what it left behind: what
the benchmark scripts share.

    from local_job import lite_weights, mock_opt_ml, run_train, remove_big_files
    run = run_train(work, mock_opt_ml(work / "opt_ml", data), {"model": ..., "pretrained_path": ...})
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import yaml

# The demo's builders of real weights and digit folders live with the demo, in scripts/: every benchmark imports
# this module first, so this is the one place that finds them.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from lite_weights import convert  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# The listing's example data set (ants and bees photos, from PyTorch's transfer-learning tutorial).
HYMENOPTERA = Path(os.environ.get("HYMENOPTERA_DATA", REPO / "data" / "hymenoptera_data"))
HYMENOPTERA_HOW = ("curl -LO https://download.pytorch.org/tutorial/hymenoptera_data.zip && unzip -d data "
                   "hymenoptera_data.zip (or set HYMENOPTERA_DATA to the folder holding its train/ and val/)")
BIG_MODEL_FILES = ("model.tar.gz", "model_best.pth.tar")


def lite_weights(folder: Path, variant: int = 0) -> Path:
    """Real ImageNet weights of tf_efficientnet_lite{variant} as a timm file in `folder`, converted once."""
    weights = folder / f"tf_efficientnet_lite{variant}.pth"
    return weights if weights.exists() else convert(variant, weights)


def lite0_probe_parts(folder: Path, weights_dir: Path) -> SimpleNamespace:
    """What the investigations start from, on a folder with train/ and val/ class folders: the job's hyperparameters
    at pure defaults for Lite0's real weights (`hp`), the channels (`train`, `val`), the model with its new
    classifier (`model`), its data config (`config`), the CPU's input step (`to_input`) and the job's own training
    loss (`loss_fn`)."""
    import torch

    from efficientnet_train import hyperparameters as schema
    from efficientnet_train.channels import scan_channel
    from efficientnet_train.data import ModelInput, resolve_data_config
    from efficientnet_train.model import create_model
    from efficientnet_train.optimisation import balance_share, loss_function

    model_name = "tf_efficientnet_lite0"
    weights = lite_weights(weights_dir, 0)
    hp, _ = schema.parse({"model": model_name, "pretrained_path": str(weights)})
    val_folder = next(folder / name for name in ("val", "validation") if (folder / name).is_dir())
    train = scan_channel("train", folder / "train")
    val = scan_channel("validation", val_folder, train.classes)
    model = create_model(model_name, train.classes, str(weights), 0.0, 0.0)
    config = resolve_data_config(model, hp.img_size, hp.eval_img_size)
    return SimpleNamespace(hp=hp, train=train, val=val, model=model, config=config,
                           to_input=ModelInput(config, torch.device("cpu")),
                           loss_fn=loss_function(train, hp, balance_share(hp, train, val, held_out=False)))


def fitted_lite0_probe(folder: Path, weights_dir: Path, images: int = 0) -> SimpleNamespace:
    """lite0_probe_parts with the job's probe fitted on the clean training images (a seeded sample of `images` of
    them; 0 = all): adds `clean` (those images in evaluation's view), `loader(dataset, **shuffling)` at the job's
    batch size and `probe` (linear_probe.fit_linear_probe's result)."""
    import contextlib
    import random

    import torch

    from efficientnet_train.data import dataset_of, decode_side, eval_transform
    from efficientnet_train.linear_probe import fit_linear_probe

    parts = lite0_probe_parts(folder, weights_dir)
    clean = dataset_of(parts.train, eval_transform(parts.config), None, 0, decode_side(parts.config, training=False))
    if images:
        order = list(range(len(clean)))
        random.Random(0).shuffle(order)
        clean = torch.utils.data.Subset(clean, order[:images])

    def loader(dataset, **shuffling):
        return torch.utils.data.DataLoader(dataset, batch_size=parts.hp.batch_size, **shuffling)

    probe = fit_linear_probe(parts.model, loader(clean), parts.to_input, contextlib.nullcontext,
                             len(parts.train.classes), parts.loss_fn)
    return SimpleNamespace(**vars(parts), clean=clean, loader=loader, probe=probe)


def mock_opt_ml(base: Path, data: Path, limits: dict[str, int] | None = None) -> Path:
    """`base` as SageMaker's /opt/ml with `data`'s train/ and val/ as channels: class folders linked, nothing
    copied; a class in `limits` gets only its first N training images (linked one by one)."""
    limits = limits or {}
    (base / "input" / "config").mkdir(parents=True, exist_ok=True)
    (base / "input" / "data").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        for class_dir in sorted((data / split).resolve().iterdir()):
            link = base / "input" / "data" / split / class_dir.name
            if link.exists():
                continue
            if split == "train" and class_dir.name in limits:
                link.mkdir(parents=True)
                for image in sorted(class_dir.iterdir())[:limits[class_dir.name]]:
                    (link / image.name).symlink_to(image)
            else:
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(class_dir, target_is_directory=True)
    return base


@dataclass
class JobRun:
    returncode: int
    wall: float  # seconds, with start-up
    log_path: Path
    rows: list[dict]  # model/summary.csv; epoch 0 is the linear probe where the job fits one
    args: dict  # model/args.yml

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def best_row(self) -> dict | None:
        """The summary row of the epoch whose model the job kept."""
        best = self.args.get("best_epoch")
        return next((row for row in self.rows if int(row["epoch"]) == best), None)

    def epochs(self) -> int:
        return self.args.get("epochs_completed", sum(int(row["epoch"]) > 0 for row in self.rows))


def run_train(work: Path, base: Path, hyperparameters: dict, stop_after: int | None = None) -> JobRun:
    """Run `train` on the mocked tree `base` with these hyperparameters, its log in `work/train.log`; with
    `stop_after`, stop it (SIGTERM, as SageMaker stops a job) once that epoch's line is logged, the schedule being
    that of the whole run."""
    (base / "input" / "config" / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    train = Path(sys.executable).with_name("train")
    log_path = work / "train.log"
    started = time.monotonic()
    with open(log_path, "w") as log_file:  # written as it goes, to follow with tail -f
        job = subprocess.Popen([str(train)], env={**os.environ, "SAGEMAKER_BASE_DIR": str(base)},
                               stdout=log_file, stderr=subprocess.STDOUT)
        while job.poll() is None:
            time.sleep(1)
            if stop_after is not None and re.search(rf"\bepoch {stop_after}/\d+ ", log_path.read_text()):
                job.terminate()
                job.wait()
    wall = time.monotonic() - started
    rows, args = [], {}
    if (base / "model" / "summary.csv").exists():
        with open(base / "model" / "summary.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    if (base / "model" / "args.yml").exists():
        args = yaml.safe_load((base / "model" / "args.yml").read_text()) or {}
    return JobRun(job.returncode, wall, log_path, rows, args)


def remove_big_files(base: Path, keep_model: bool = False) -> None:
    """The resume checkpoints and, unless kept, the model (~250 MB a run); the log and the summary files stay."""
    shutil.rmtree(base / "checkpoints", ignore_errors=True)
    for model_file in () if keep_model else BIG_MODEL_FILES:
        (base / "model" / model_file).unlink(missing_ok=True)
