"""Where does fine-tuning lose the linear probe it starts from? One row per difference between the probe's
view of the training images and fine-tuning's, for one data set.

The job fits its new classifier on frozen features taken in evaluation mode from the evaluation transform
(epoch 0). Fine-tuning then trains in training mode on the training transform. This script fits the same
probe (the package's own code, Lite0's ImageNet weights) and scores that head, with no weight changed, on:

- the clean training images, evaluation mode: what the probe was fitted on;
- the same images with BatchNorm on batch statistics, as every training step computes them;
- the training crops (and flips), evaluation mode, without and with RandAugment and random erasing;
- full training mode (batch statistics, dropout, drop-connect) on the full training transform;
- the val set after one epoch of training-mode forward passes that only update BatchNorm's running
  averages: what epoch 1's validation would see if the weights had not moved at all.

    python benchmarks/diagnose_probe_start.py /tmp/panel/digits30 img_size=64 hflip=0
    python benchmarks/diagnose_probe_start.py /tmp/panel/hymenoptera

FOLDER holds train/ and val/ (or validation/) class folders; "loss" is the training loss (label smoothing
included). Extra key=value pairs are the job's
hyperparameters (img_size, hflip, aa, reprob, drop, drop_connect, smoothing, batch_size).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import torch

from local_job import lite_weights

MODEL = "tf_efficientnet_lite0"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--weights-dir", type=Path, default=Path(tempfile.gettempdir()) / "lite0-weights")
    parser.add_argument("hyperparameters", nargs="*", help="job hyperparameters as key=value")
    options = parser.parse_intermixed_args()

    from efficientnet_train import hyperparameters as schema
    from efficientnet_train.channels import scan_channel
    from efficientnet_train.data import ModelInput, dataset_of, eval_transform, resolve_data_config, train_transform
    from efficientnet_train.linear_probe import fit_linear_probe
    from efficientnet_train.model import create_model, set_batchnorm_training
    from efficientnet_train.recipe import recipe_for

    hp, _ = schema.parse({"model": MODEL, **dict(item.split("=", 1) for item in options.hyperparameters)})
    torch.manual_seed(hp.seed)
    val_folder = next(options.folder / name for name in ("val", "validation") if (options.folder / name).is_dir())
    train = scan_channel("train", options.folder / "train")
    val = scan_channel("validation", val_folder, train.classes)
    weights = lite_weights(options.weights_dir, 0)
    listing = recipe_for(hp)  # what the job measures its parts from
    model = create_model(MODEL, train.classes, str(weights), listing.drop, listing.drop_connect)
    config = resolve_data_config(model, hp.img_size, hp.eval_img_size)
    cpu = torch.device("cpu")
    clean, val_images = dataset_of(train, eval_transform(config)), dataset_of(val, eval_transform(config))
    crops = dataset_of(train, train_transform(config, "none", listing.hflip, listing.crop_scale))
    augmented = dataset_of(train, train_transform(config, listing.aa, listing.hflip, listing.crop_scale))
    plain, erasing = ModelInput(config, cpu), ModelInput(config, cpu, listing.reprob, hp.remode)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=hp.smoothing)

    def loader(images, shuffle: bool = True):
        return torch.utils.data.DataLoader(images, batch_size=hp.batch_size, shuffle=shuffle, drop_last=shuffle)

    fit_linear_probe(model, loader(clean, shuffle=False), plain, contextlib.nullcontext, len(train.classes), loss_fn)
    probed = {name: value.clone() for name, value in model.state_dict().items()}

    def score(images, to_input, batch_statistics: bool, dropout: bool, shuffle: bool = True) -> str:
        model.load_state_dict(probed)
        model.train(dropout)
        set_batchnorm_training(model, batch_statistics)
        loss = right = seen = 0
        with torch.no_grad():
            for batch, targets in loader(images, shuffle):
                logits = model(to_input(batch))
                loss += float(loss_fn(logits, targets)) * len(targets)
                right += int((logits.argmax(1) == targets).sum())
                seen += len(targets)
        return f"{100 * right / seen:5.1f}% | {loss / seen:.3f}"

    rows = [("clean training images, evaluation mode (what the probe was fitted on)", clean, plain, False, False),
            ("clean training images, BatchNorm on batch statistics", clean, plain, True, False),
            ("training crops and flips, evaluation mode", crops, plain, False, False),
            (f"training crops + aa={listing.aa} + reprob={listing.reprob}, evaluation mode", augmented, erasing, False, False),
            ("full training mode on the full training transform", augmented, erasing, True, True)]
    print(f"{options.folder}: {len(train.samples)} training images, {len(train.classes)} classes, "
          f"{config['train_input_size'][-1]} px, batch {hp.batch_size}\n")
    print("| the probe's head on | top-1 | loss |\n|---|---|---|")
    for title, images, to_input, batch_statistics, dropout in rows:
        print(f"| {title} | {score(images, to_input, batch_statistics, dropout)} |", flush=True)
    print(f"| val images, evaluation mode (the job's epoch 0) | {score(val_images, plain, False, False, False)} |")
    # One epoch of training-mode forward passes: only BatchNorm's running averages change.
    model.load_state_dict(probed)
    model.train()
    with torch.no_grad():
        for batch, _ in loader(augmented):
            model(erasing(batch))
    probed = {name: value.clone() for name, value in model.state_dict().items()}
    print(f"| val images, evaluation mode, after one epoch of training-mode passes that moved BatchNorm's running "
          f"averages and no weight | {score(val_images, plain, False, False, False)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
