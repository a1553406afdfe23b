"""Judge the multi-label defaults: a set of several labels an image built from real photos, the job at pure defaults
beside an honest baseline, one-vs-rest logistic regression on the same frozen features.

The set: each image a 2 x 2 grid of 112-pixel tiles, one to three of them real photos of different classes (the
hymenoptera ants and bees, and the panel's handwritten digits 0-9: 12 labels), the rest grey; its labels are the
classes shown. Train and val tiles come from the sources' own train and val images. The labels go in a manifest
beside the images, as a buyer gives them. The baseline: scikit-learn's LogisticRegression (max_iter=2000, default
C), one per label, on the frozen tf_efficientnet_lite0 features of every training image through the job's
evaluation preprocessing; both scored by mAP over the labels on val (the job's own measure).

    python benchmarks/benchmark_multilabel.py --work /tmp/multilabel
    python benchmarks/benchmark_multilabel.py --work /tmp/multilabel --skip-job
    python benchmarks/benchmark_multilabel.py --work /tmp/multilabel --calibration MODEL_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from local_job import HYMENOPTERA, lite_weights, remove_big_files, run_train
from panel_datasets import locate

MODEL = "tf_efficientnet_lite0"
TILE = 112
SIZES = {"train": 480, "val": 240}


def sources(data: Path) -> dict[str, dict[str, list[Path]]]:
    """split -> class -> image paths: hymenoptera's ants and bees, and the panel's digits."""
    hymenoptera = HYMENOPTERA
    digits = locate("digits", data)
    found: dict[str, dict[str, list[Path]]] = {}
    for split in SIZES:
        found[split] = {name: sorted((hymenoptera / split / name).iterdir()) for name in ("ants", "bees")}
        found[split].update({f"digit_{name}": sorted((digits / split / name).iterdir())
                             for name in sorted(os.listdir(digits / split))})
    return found


def build(out: Path, data: Path, seed: int = 0) -> Path:
    """The composite set under `out`: <split>/images/*.jpg and <split>/labels.jsonl."""
    from PIL import Image

    rng = random.Random(seed)
    for split, pools in sources(data).items():
        folder = out / split / "images"
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for index in range(SIZES[split]):
            chosen = rng.sample(sorted(pools), rng.choice([1, 2, 3]))
            canvas = Image.new("RGB", (2 * TILE, 2 * TILE), (128, 128, 128))
            for quarter, name in zip(rng.sample(range(4), len(chosen)), chosen):
                with Image.open(rng.choice(pools[name])) as photo:
                    tile = photo.convert("RGB").resize((TILE, TILE))
                canvas.paste(tile, ((quarter % 2) * TILE, (quarter // 2) * TILE))
            canvas.save(folder / f"{index:04d}.jpg", quality=92)
            lines.append({"source-ref": f"images/{index:04d}.jpg", "labels": sorted(chosen)})
        (out / split / "labels.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return out


def linear_probe(folder: Path, weights: Path) -> dict:
    """mAP (%) on val of one logistic regression a label on the frozen features of train."""
    import timm
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    from efficientnet_train import multilabel
    from efficientnet_train.data import ModelInput, dataset_of, decode_side, eval_transform, resolve_data_config
    from efficientnet_train.label_manifest import scan

    started = time.monotonic()
    model = timm.create_model(MODEL, num_classes=0)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict({name: value for name, value in state.items() if not name.startswith("classifier.")})
    model = model.eval().to(memory_format=torch.channels_last)
    config = resolve_data_config(model, 0, 0)
    to_input = ModelInput(config, torch.device("cpu"))
    train = scan("train", folder / "train")
    val = scan("val", folder / "val", train.classes, multi_label=True)

    def features(channel) -> tuple[np.ndarray, np.ndarray]:
        dataset = dataset_of(channel, eval_transform(config), min_side=decode_side(config, training=False))
        rows, targets = [], []
        with torch.no_grad():
            for images, labels in torch.utils.data.DataLoader(dataset, batch_size=64):
                rows.append(model(to_input(images)).float().numpy())
                targets.append(labels.numpy())
        return np.concatenate(rows), np.concatenate(targets)

    train_x, train_y = features(train)
    val_x, val_y = features(val)
    fitted = OneVsRestClassifier(LogisticRegression(max_iter=2000)).fit(train_x, train_y)
    scores = torch.from_numpy(fitted.predict_proba(val_x))
    per_label = multilabel.average_precisions(scores, torch.from_numpy(val_y))
    return {"map": multilabel.mean_ap(per_label), "seconds": time.monotonic() - started, "labels": len(train.classes)}


def temperatures(model_dir: Path, folder: Path) -> dict[str, tuple[float, float]]:
    """One temperature for every label (the job's), one a label, or none: the ECE over every label's probability and
    the binary cross-entropy on one half of val with temperatures fitted on the other, both ways, averaged."""
    import torch
    import torch.nn.functional as F

    from efficientnet_train import multilabel
    from efficientnet_train.data import dataset_of
    from efficientnet_train.inference import Classifier
    from efficientnet_train.label_manifest import scan
    from efficientnet_train.model import predict_label_logits

    classifier = Classifier(model_dir, torch.device("cpu"))
    val = scan("val", folder / "val", classifier.labels, multi_label=True)
    logits, targets = [], []
    with torch.no_grad():
        for images, labels in torch.utils.data.DataLoader(
                dataset_of(val, classifier.transform, min_side=classifier.decode_side), batch_size=32):
            logits.append(predict_label_logits(classifier.model, classifier.to_input(images), classifier.mirror))
            targets.append(labels)
    logits, targets = torch.cat(logits), torch.cat(targets)
    half = len(targets) // 2
    folds = [(slice(0, half), slice(half, None)), (slice(half, None), slice(0, half))]
    scores: dict[str, list[tuple[float, float]]] = {"none": [], "one": [], "per label": []}
    for fit, test in folds:
        one = multilabel.fit_temperature(logits[fit], targets[fit])
        per_label = torch.tensor([multilabel.fit_temperature(logits[fit][:, [j]], targets[fit][:, [j]])
                                  for j in range(targets.shape[1])])
        for name, temperature in (("none", 1.0), ("one", one), ("per label", per_label)):
            p = (logits[test] / temperature).sigmoid()
            scores[name].append((multilabel.label_ece(p, targets[test]),
                                 float(F.binary_cross_entropy(p, targets[test], reduction="sum")) / len(p)))
    return {name: tuple(float(np.mean(values)) for values in zip(*pairs)) for name, pairs in scores.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "panel",
                        help="where panel_datasets.py wrote the digits set (built there if missing)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "multilabel")
    parser.add_argument("--skip-job", action="store_true", help="the baseline only")
    parser.add_argument("--calibration", type=Path, metavar="MODEL_DIR",
                        help="only compare one temperature with one a label for this job's model (model_best.pth.tar, "
                             "labels.json) on the set's val")
    parser.add_argument("hyperparameters", nargs="*", help="more hyperparameters as key=value")
    options = parser.parse_args()
    folder = options.work / "set"
    if not (folder / "val" / "labels.jsonl").exists():
        build(folder, options.data)
    if options.calibration:
        for name, (ece, loss) in temperatures(options.calibration, folder).items():
            print(f"temperature {name}: ECE over every label's probability {ece:.4f}, BCE summed over labels "
                  f"{loss:.4f} (fitted on one half of val, measured on the other, both ways)")
        return 0
    weights = lite_weights(options.work / "weights", 0)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; set in {folder}", flush=True)
    probe = linear_probe(folder, weights)
    print(f"one-vs-rest linear probe: mAP {probe['map']:.2f}% over {probe['labels']} labels "
          f"({probe['seconds']:.0f} s)", flush=True)
    if options.skip_job:
        return 0
    base = options.work / "opt_ml"
    (base / "input" / "config").mkdir(parents=True, exist_ok=True)
    (base / "input" / "data").mkdir(parents=True, exist_ok=True)
    for split in SIZES:
        link = base / "input" / "data" / split
        if not link.exists():
            link.symlink_to(folder / split)
    hyperparameters = {"model": MODEL, "pretrained_path": str(weights),
                       **dict(item.split("=", 1) for item in options.hyperparameters)}
    job = run_train(options.work, base, hyperparameters)
    remove_big_files(base)
    if job.returncode:
        print(job.log[-3000:])
        return 1
    by_epoch = ", ".join(f"{float(row['eval_map']):.1f}" for row in job.rows)
    print(f"job: best mAP {job.args['best_map']:.2f}% at epoch {job.args['best_epoch']} ({job.args['stop_reason']}, "
          f"{job.wall:.0f} s); its own probe (epoch 0) and each epoch's mAP: {by_epoch}; micro F1 "
          f"{job.args['best_micro_f1']:.1f}%, macro F1 {job.args['best_macro_f1']:.1f}%; ECE "
          f"{job.args['calibration']['ece_before']:.4f} -> {job.args['calibration']['ece_after']:.4f}")
    print(f"job - probe: {job.args['best_map'] - probe['map']:+.2f} points of mAP")
    return 0


if __name__ == "__main__":
    sys.exit(main())
