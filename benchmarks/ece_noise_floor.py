"""The expected calibration error that a perfectly calibrated model shows on a validation set of N images, from
sampling alone: how small an ECE a set of that size can resolve.

Each draw gives N images confidences from Beta(A, 1) (mean A / (A + 1): 6 gives 86%, about the panel's top-1), makes
each answer right with exactly its confidence, and measures the job's own top-label ECE (calibration.py: 10
equal-width bins).

    python benchmarks/ece_noise_floor.py 57 153 240 500
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from efficientnet_train.calibration import top_label_ece

CLASSES = 1000  # the rest of each image's probability spread thinly over the others: the top label is class 0


def ece(confidence: np.ndarray, right: np.ndarray) -> float:
    probabilities = np.repeat(((1 - confidence) / (CLASSES - 1))[:, None], CLASSES, axis=1)
    probabilities[:, 0] = confidence
    return top_label_ece(torch.from_numpy(probabilities).log(), torch.from_numpy((~right).astype(np.int64)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sizes", type=int, nargs="+")
    parser.add_argument("--alpha", type=float, default=6.0)
    parser.add_argument("--draws", type=int, default=4000)
    options = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| validation images | mean ECE of a calibrated model | 90th percentile |\n|---|---|---|")
    for n in options.sizes:
        draws = []
        for _ in range(options.draws):
            confidence = np.maximum(rng.beta(options.alpha, 1.0, size=n), 2 / CLASSES)
            draws.append(ece(confidence, rng.random(n) < confidence))
        print(f"| {n} | {np.mean(draws):.3f} | {np.quantile(draws, 0.9):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
