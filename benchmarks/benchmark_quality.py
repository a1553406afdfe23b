"""Judge the defaults on the panel of data sets (`panel_datasets.py`): for each set, an honest baseline and
then the training job as a buyer would run it, one Markdown table row a set.

The baseline is a linear probe: scikit-learn's LogisticRegression (max_iter=2000, default C) on the frozen
ImageNet features of the job's model (tf_efficientnet_lite0, or Lite2 with --lite 2), taken from every training
image through the job's own evaluation preprocessing (decoding, sizes with img_size and eval_img_size, crop), scored
on the val images (top-1 and top-label ECE), with the first validation images it answers wrong. The job runs as a
buyer would run it, at pure defaults: only model and pretrained_path, and anything after the options as key=value.
The table also goes to --out; the jobs' logs and summary files stay in WORK/<set>/.

    python benchmarks/benchmark_quality.py --sets digits30 --skip-job
    python benchmarks/benchmark_quality.py --sets digits30 --epochs 3
    python benchmarks/benchmark_quality.py --work /tmp/quality lr=0.004
    python benchmarks/benchmark_quality.py --lite 2 --sets hymenoptera,photos
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from local_job import JobRun, lite_weights, mock_opt_ml, remove_big_files, run_train
from efficientnet_train.untrusted import shown  # noqa: E402  (file names from the data set)
from panel_datasets import BUILDERS, EXTRA, PANEL, counts, locate

WRONG_SHOWN = 10  # the probe's wrong validation images named, the rest counted
COLUMNS = ("set", "classes", "train/val", "probe top-1", "probe ECE", "job probe top-1", "top-1 by epoch",
           "worst epoch - job probe", "best top-1", "val loss at best", "ECE before", "ECE after",
           "ECE by chance (mean / p90)", "epochs", "stop", "wall")


def linear_probe(folder: Path, weights: Path, hyperparameters: dict) -> dict:
    """Top-1 (%) and top-label ECE on val/ of a logistic regression on the frozen features of train/."""
    import timm
    import torch
    from sklearn.linear_model import LogisticRegression

    from efficientnet_train.calibration import top_label_ece
    from efficientnet_train.channels import scan_channel
    from efficientnet_train.data import ModelInput, dataset_of, decode_side, eval_transform, resolve_data_config

    started = time.monotonic()
    # The pooled features, as the job's classifier sees them.
    model = timm.create_model(hyperparameters["model"], num_classes=0)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict({name: value for name, value in state.items() if not name.startswith("classifier.")})
    model = model.eval().to(memory_format=torch.channels_last)
    # The job's own sizes for these hyperparameters, so that the probe sees what the job's validation sees.
    config = resolve_data_config(model, int(hyperparameters.get("img_size", 0)),
                                 int(hyperparameters.get("eval_img_size", 0)))
    to_input = ModelInput(config, torch.device("cpu"))  # channels-last, normalised as in the job
    train = scan_channel("train", folder / "train")
    val = scan_channel("val", folder / "val", train.classes)

    def features(channel) -> tuple[np.ndarray, np.ndarray]:
        images = dataset_of(channel, eval_transform(config), min_side=decode_side(config, training=False))
        with torch.no_grad():
            rows = [model(to_input(batch)) for batch, _ in torch.utils.data.DataLoader(images, batch_size=64)]
        return torch.cat(rows).numpy(), np.array([label for _, label in channel.samples])

    (train_x, train_y), (val_x, val_y) = features(train), features(val)
    extracted = time.monotonic()
    classifier = LogisticRegression(max_iter=2000).fit(train_x, train_y)
    probabilities = np.zeros((len(val_y), len(train.classes)))
    probabilities[:, classifier.classes_] = classifier.predict_proba(val_x)
    wrong = [str(Path(val.samples[i][0]).relative_to(folder)) for i in np.flatnonzero(probabilities.argmax(1) != val_y)]
    return {"top1": 100 * float(np.mean(probabilities.argmax(axis=1) == val_y)), "wrong": wrong,
            # The job's own measure, so that the baseline's ECE and the job's compare.
            "ece": top_label_ece(torch.from_numpy(probabilities).log(), torch.from_numpy(val_y)), "size": config["input_size"][-1],
            "features_s": extracted - started, "fit_s": time.monotonic() - extracted}


def job_cells(job: JobRun) -> list[str]:
    """The table's cells for the job, '-' for what this version of the job does not report."""
    def number(value, form: str) -> str:
        return "-" if value is None else format(float(value), form)

    best, calibration, probe = job.best_row() or {}, job.args.get("calibration") or {}, \
        job.args.get("linear_probe") or {}
    stop = job.args.get("stop_reason") or (f"failed (exit {job.returncode})" if job.returncode else "-")
    trained = [float(row["eval_top1"]) for row in job.rows if int(row["epoch"]) > 0]  # every epoch, not the best
    worst = min(trained) - probe["acc_1"] if trained and probe.get("acc_1") is not None else None
    return [number(probe.get("acc_1"), ".1f"), ", ".join(f"{top1:.1f}" for top1 in trained) or "-",
            number(worst, "+.1f"), number(job.args.get("best_acc_1"), ".1f"),
            number(best.get("eval_loss"), ".4f"), number(calibration.get("ece_before"), ".3f"),
            number(calibration.get("ece_after"), ".3f"),
            "-" if "ece_by_chance" not in calibration else
            f"{calibration['ece_by_chance']:.3f} / {calibration['ece_by_chance_p90']:.3f}",
            str(job.epochs() if job.args or job.rows else "-"),
            stop.split(" (")[0].split(", ")[0], f"{job.wall:.0f} s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default=",".join(PANEL),
                        help=f"comma-separated, of {', '.join(PANEL)}; on request: {', '.join(EXTRA)}")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "panel",
                        help="where panel_datasets.py wrote the sets; missing ones are built there")
    parser.add_argument("--work", type=Path, help="for the jobs' mocked /opt/ml trees, logs and the converted "
                        "weights, kept for the next run (default: a temp dir without the weights afterwards)")
    parser.add_argument("--epochs", help="passed to the job (default: the job's own default)")
    parser.add_argument("--lite", type=int, default=0, choices=(0, 2),
                        help="EfficientNet-Lite variant, the probe's and the job's (default 0)")
    parser.add_argument("--stop-after", type=int, help="stop each job after this epoch, its schedule unchanged")
    parser.add_argument("--skip-job", action="store_true", help="the baseline only")
    parser.add_argument("--skip-probe", action="store_true", help="the job only")
    parser.add_argument("--out", type=Path, help="the table's file (default: WORK/benchmark_quality.md)")
    parser.add_argument("--keep-model", action="store_true",
                        help="keep each job's model in WORK/<set>/opt_ml/model (for diagnose_calibration.py)")
    parser.add_argument("hyperparameters", nargs="*", help="more hyperparameters as key=value")
    options = parser.parse_args()
    sets = options.sets.split(",")
    unknown = [name for name in sets if name not in PANEL and name not in BUILDERS]
    if unknown:
        parser.error(f"unknown sets {', '.join(unknown)}; the panel: {', '.join(PANEL)}; on request: "
                     f"{', '.join(EXTRA)}")

    work = options.work or Path(tempfile.mkdtemp(prefix="quality-"))
    options.data.mkdir(parents=True, exist_ok=True)
    weights = lite_weights(work / "weights", options.lite)
    user = dict(item.split("=", 1) for item in options.hyperparameters)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; work in {work}")
    table = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    failed = 0
    for name in sets:
        folder = locate(name, options.data)
        per_class = counts(folder)
        hyperparameters = {"model": f"tf_efficientnet_lite{options.lite}", "pretrained_path": str(weights), **user}
        if options.epochs:
            hyperparameters["epochs"] = options.epochs
        row = [name, str(len(per_class["train"])),
               f"{sum(per_class['train'].values())}/{sum(per_class['val'].values())}"]
        if options.skip_probe:
            row += ["-", "-"]
        else:
            probe = linear_probe(folder, weights, hyperparameters)
            row += [f"{probe['top1']:.1f}", f"{probe['ece']:.3f}"]
            print(f"{name}: linear probe top-1 {probe['top1']:.2f}%, ECE {probe['ece']:.4f} ({probe['size']} px; "
                  f"features {probe['features_s']:.0f} s, fit {probe['fit_s']:.0f} s); it answers wrong "
                  f"{shown(', '.join(probe['wrong'][:WRONG_SHOWN]), 2000)}"
                  + (f" and {len(probe['wrong']) - WRONG_SHOWN} more" if len(probe["wrong"]) > WRONG_SHOWN else ""),
                  flush=True)
        if options.skip_job:
            row += ["-"] * (len(COLUMNS) - len(row))
        else:
            set_work = work / name
            shutil.rmtree(set_work / "opt_ml", ignore_errors=True)  # a fresh job, not a resumed one
            set_work.mkdir(parents=True, exist_ok=True)
            print(f"{name}: training with {hyperparameters}; log in {set_work / 'train.log'}", flush=True)
            job = run_train(set_work, mock_opt_ml(set_work / "opt_ml", folder), hyperparameters, options.stop_after)
            remove_big_files(set_work / "opt_ml", options.keep_model)
            if job.returncode:
                failed += 1
                print(job.log[-3000:])
            row += job_cells(job)
        table.append("| " + " | ".join(row) + " |")
        print(table[-1], flush=True)

    out = options.out or work / "benchmark_quality.md"
    out.write_text(f"`{' '.join(['python', *sys.argv])}` on {platform.machine()}, {os.cpu_count()} CPUs\n\n"
                   + "\n".join(table) + "\n")
    print("\n" + "\n".join(table) + f"\n\ntable written to {out}")
    if options.work is None:
        shutil.rmtree(work / "weights")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
