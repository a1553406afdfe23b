"""Where a trained model's calibration error comes from: its top-label ECE at a range of temperatures around the
one it was fitted (is the miss in the temperature's fit, or in which answers the model is sure of?), what a
perfectly calibrated model with the same confidences shows by chance on as many images, and the reliability
table (each of the 10 bins: images, right, mean confidence).

    python benchmarks/diagnose_calibration.py /opt/ml/model /data/val

MODEL is a `train` job's model folder or model.tar.gz; VAL a folder of class folders named as the model's labels
(images of other names are left out).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import torch

from efficientnet_train.calibration import ECE_BINS, calibrated, ece_by_chance, top_label_ece
from efficientnet_train.decoding import load_image
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
    fitted, classifier.temperature = classifier.temperature, 1.0
    paths = sorted(p for p in options.val.glob("*/*") if p.parent.name in classifier.labels and p.is_file())
    if not paths:
        sys.exit(f"no images under {shown(str(options.val))} in folders named as the model's labels")
    targets = torch.tensor([classifier.labels.index(p.parent.name) for p in paths])
    images = (classifier.preprocess(load_image(str(p), classifier.decode_side)) for p in paths)
    log_probabilities = torch.cat([classifier.probabilities(torch.stack(batch)).log()
                                   for batch in iter(lambda: list(itertools.islice(images, 32)), [])])
    print(f"{len(paths)} images, top-1 {100 * float((log_probabilities.argmax(1) == targets).float().mean()):.1f}%, "
          f"temperature fitted in training {fitted:.4f}")
    print("| temperature | top-label ECE | validation loss | mean confidence |\n|---|---|---|---|")
    for scale in SCALES:
        scaled = calibrated(log_probabilities, fitted * scale)
        print(f"| {fitted * scale:.3f}{' (fitted)' if scale == 1.0 else ''} | {top_label_ece(scaled, targets):.3f} | "
              f"{float(torch.nn.functional.nll_loss(scaled, targets)):.3f} | "
              f"{float(scaled.exp().max(1).values.mean()):.3f} |")
    confidence, predicted = calibrated(log_probabilities, fitted).exp().max(1)
    mean, p90 = ece_by_chance(confidence)
    print(f"\nA perfectly calibrated model with these confidences, on {len(paths)} images, by chance: ECE {mean:.3f} "
          f"on average, {p90:.3f} at the 90th percentile")
    right = (predicted == targets).float()
    which = (confidence * ECE_BINS).long().clamp(max=ECE_BINS - 1)
    print("\n| confidence bin | images | right | mean confidence |\n|---|---|---|---|")
    for b in range(ECE_BINS):
        inside = which == b
        if inside.any():
            print(f"| {b / ECE_BINS:.1f}-{(b + 1) / ECE_BINS:.1f} | {int(inside.sum())} | {int(right[inside].sum())} | "
                  f"{float(confidence[inside].mean()):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
