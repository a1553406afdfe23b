"""Where a trained model's calibration error comes from: its top-label ECE at a range of temperatures around the
one it was fitted (is the miss in the temperature's fit, or in which answers the model is sure of?), beside what
a perfectly calibrated model with the same confidences shows by chance on as many images at each (its mean, its
90th percentile, and the share of chance draws at or above the measured ECE), and the reliability table at the
fitted temperature (each of the 10 bins: images, right, mean confidence). One label an image only.

    python benchmarks/diagnose_calibration.py /opt/ml/model /data/val

MODEL is a `train` job's model folder or model.tar.gz; VAL a folder of class folders named as the model's labels
(images of other names are left out).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from efficientnet_train.calibration import ECE_BINS, bin_of, calibrated, chance_eces, top_label, top_label_ece
from efficientnet_train.decoding import UnreadableImage, load_image
from efficientnet_train.inference import Classifier, model_files
from efficientnet_train.untrusted import shown

SCALES = (2.0, 1.5, 1.25, 1.1, 1.0, 0.9, 0.8, 0.67, 0.5)  # temperatures as multiples of the fitted one


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("val", type=Path)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        classifier = Classifier(model_files(options.model, Path(scratch)), torch.device("cpu"))
    if classifier.multi_label:
        sys.exit("a model of several labels an image: its calibration is each label's, not a top label's")
    fitted, classifier.temperature = classifier.temperature, 1.0
    paths = sorted(p for p in options.val.glob("*/*") if p.parent.name in classifier.labels and p.is_file())
    inputs, used = [], []
    for path in paths:
        try:
            inputs.append(classifier.preprocess(load_image(str(path), classifier.decode_side)))
            used.append(path)
        except (UnreadableImage, OSError) as exc:
            print(f"left out {shown(str(path))}: {shown(exc, 200)}", file=sys.stderr)
    if not used:
        sys.exit(f"no readable images under {shown(str(options.val))} in folders named as the model's labels")
    targets = torch.tensor([classifier.labels.index(p.parent.name) for p in used])
    log_probabilities = torch.cat([classifier.probabilities(torch.stack(inputs[i:i + 32])).log()
                                   for i in range(0, len(inputs), 32)])
    print(f"{len(used)} images ({len(paths) - len(used)} left out), top-1 "
          f"{100 * float((log_probabilities.argmax(1) == targets).float().mean()):.1f}%, temperature fitted in "
          f"training {fitted:.4f}")
    print("| temperature | top-label ECE | by chance: mean | 90th percentile | chance draws at or above it | "
          "validation loss | mean confidence |\n|---|---|---|---|---|---|---|")
    for scale in SCALES:
        scaled = calibrated(log_probabilities, fitted * scale)
        ece, chance = top_label_ece(scaled, targets), chance_eces(top_label(scaled)[0])
        print(f"| {fitted * scale:.3f}{' (fitted)' if scale == 1.0 else ''} | {ece:.3f} | {float(chance.mean()):.3f} | "
              f"{float(chance.quantile(0.9)):.3f} | {100 * float((chance >= ece).float().mean()):.1f}% | "
              f"{float(torch.nn.functional.nll_loss(scaled, targets)):.3f} | "
              f"{float(scaled.exp().max(1).values.mean()):.3f} |")
    confidence, predicted = top_label(calibrated(log_probabilities, fitted))
    right, which = (predicted == targets).float(), bin_of(confidence)
    print("\n| confidence bin (fitted temperature) | images | right | mean confidence |\n|---|---|---|---|")
    for b in range(ECE_BINS):
        inside = which == b
        if inside.any():
            print(f"| {b / ECE_BINS:.1f}-{(b + 1) / ECE_BINS:.1f} | {int(inside.sum())} | {int(right[inside].sum())} | "
                  f"{float(confidence[inside].mean()):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
