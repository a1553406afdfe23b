"""The expected calibration error that a perfectly calibrated model shows on a validation set of N images, from
sampling alone: how small an ECE a set of that size can resolve.

Confidences are drawn from Beta(A, 1) (mean A / (A + 1): 6 gives 86%, about the panel's top-1), a new set of them
every 100 draws; each answer is right with exactly its confidence, and the job's own top-label ECE is measured
(calibration.chance_eces, which the job runs on its own model's confidences: its `ece_by_chance`).

    python benchmarks/ece_noise_floor.py 57 153 240 500
"""

from __future__ import annotations

import argparse
import sys

import torch

from efficientnet_train.calibration import chance_eces

PER_CONFIDENCES = 100  # answers drawn for each set of confidences


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sizes", type=int, nargs="+")
    parser.add_argument("--alpha", type=float, default=6.0)
    parser.add_argument("--draws", type=int, default=4000)
    options = parser.parse_args()
    beta = torch.distributions.Beta(torch.tensor(options.alpha), torch.tensor(1.0))
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)  # one stream for every draw: each set of confidences new answers
    print("| validation images | mean ECE of a calibrated model | 90th percentile |\n|---|---|---|")
    for n in options.sizes:
        draws = torch.cat([chance_eces(beta.sample((n,)), draws=PER_CONFIDENCES, generator=generator)
                           for _ in range(max(1, options.draws // PER_CONFIDENCES))])
        print(f"| {n} | {float(draws.mean()):.3f} | {float(draws.quantile(0.9)):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
