"""How far does one batch-statistics measurement move? The job's probe (the package's own code, Lite0's ImageNet
weights) is fitted on all the clean training images; then its top-1 with every BatchNorm layer on batch
statistics, the measurement behind freeze_batchnorm=auto, is taken on several samples drawn as the job draws its
measured images (linear_probe.probe_sample, seeds 0, 1, ...), each in several seeded batch orders:

    python benchmarks/diagnose_batchnorm_spread.py /tmp/panel/photos --samples 4 --shuffles 6

It prints each sample's measurements, then the spread within a sample (the batch order's) and between the
samples' means (which images are measured, with a little of the batch order's left in each mean).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from local_job import fitted_lite0_probe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a folder with train/ and val/ class folders")
    parser.add_argument("--samples", type=int, default=4, help="samples of the training images, seeds 0, 1, ...")
    parser.add_argument("--shuffles", type=int, default=6, help="seeded batch orders of each sample")
    parser.add_argument("--weights-dir", type=Path, default=Path(tempfile.gettempdir()) / "lite0-weights")
    options = parser.parse_args()
    if options.samples < 2 or options.shuffles < 2:
        parser.error("--samples and --shuffles need at least 2 each for a spread")

    from efficientnet_train.linear_probe import MEASURED_IMAGES, probe_sample, probe_top1

    parts = fitted_lite0_probe(options.folder, options.weights_dir)
    print(f"{options.folder}: {len(parts.clean)} training images, batch {parts.hp.batch_size}; the probe answers "
          f"{parts.probe.top1:.1f}% of them right as fitted; every BatchNorm layer on batch statistics:", flush=True)
    samples = []
    for seed in range(options.samples):
        sample = torch.utils.data.Subset(parts.clean, probe_sample(parts.train.samples, len(parts.train.classes),
                                                                    seed, MEASURED_IMAGES))
        top1 = [probe_top1(parts.model, parts.loader(sample, shuffle=True,
                                                      generator=torch.Generator().manual_seed(order)),
                           parts.to_input, contextlib.nullcontext, frozen_batchnorm=0.0)
                for order in range(options.shuffles)]
        samples.append(top1)
        print(f"sample {seed} ({len(sample)} images): {', '.join(f'{value:.1f}' for value in top1)}%; "
              f"mean {statistics.mean(top1):.1f}", flush=True)
    within = statistics.mean(statistics.variance(top1) for top1 in samples) ** 0.5
    between = statistics.stdev(statistics.mean(top1) for top1 in samples)
    print(f"standard deviation within a sample (the batch order) {within:.1f} points; between the samples' "
          f"means {between:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
