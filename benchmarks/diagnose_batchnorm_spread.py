"""How far does one batch-statistics measurement move? The job's probe (the package's own code, Lite0's ImageNet
weights) is fitted on all the clean training images; then its top-1 with every BatchNorm layer on batch
statistics, the measurement behind freeze_batchnorm=auto, is taken on several seeded samples of the job's
measured size (128 images), each in several batch orders:

    python benchmarks/diagnose_batchnorm_spread.py /tmp/panel/photos --samples 4 --shuffles 6

It prints each sample's measurements, then the spread within a sample (the batch order's) and between the
samples' means (which images are measured).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from local_job import lite0_probe_parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a folder with train/ and val/ class folders")
    parser.add_argument("--samples", type=int, default=4, help="seeded samples of the training images")
    parser.add_argument("--shuffles", type=int, default=6, help="seeded batch orders of each sample")
    parser.add_argument("--weights-dir", type=Path, default=Path(tempfile.gettempdir()) / "lite0-weights")
    options = parser.parse_args()
    if options.samples < 2 or options.shuffles < 2:
        parser.error("--samples and --shuffles need at least 2 each for a spread")

    from efficientnet_train.data import dataset_of, decode_side, eval_transform
    from efficientnet_train.linear_probe import MEASURED_IMAGES, fit_linear_probe, probe_top1

    parts = lite0_probe_parts(options.folder, options.weights_dir)
    hp, model, config, to_input = parts.hp, parts.model, parts.config, parts.to_input
    images = dataset_of(parts.train, eval_transform(config), None, 0, decode_side(config, training=False))

    def loader(dataset, **shuffling):
        return torch.utils.data.DataLoader(dataset, batch_size=hp.batch_size, **shuffling)

    probe = fit_linear_probe(model, loader(images), to_input, contextlib.nullcontext, len(parts.train.classes),
                             parts.loss_fn)
    print(f"{options.folder}: {len(images)} training images, batch {hp.batch_size}; the probe answers "
          f"{probe.top1:.1f}% of them right as fitted; every BatchNorm layer on batch statistics:", flush=True)
    samples = []
    for sample_seed in range(options.samples):
        order = list(range(len(images)))
        random.Random(sample_seed).shuffle(order)
        sample = torch.utils.data.Subset(images, order[:MEASURED_IMAGES])
        top1 = [probe_top1(model, loader(sample, shuffle=True, generator=torch.Generator().manual_seed(seed)),
                           to_input, contextlib.nullcontext, frozen_batchnorm=0.0) for seed in range(options.shuffles)]
        samples.append(top1)
        print(f"sample {sample_seed} ({len(sample)} images): {', '.join(f'{value:.1f}' for value in top1)}%; "
              f"mean {statistics.mean(top1):.1f}", flush=True)
    within = statistics.mean(statistics.variance(top1) for top1 in samples) ** 0.5
    between = statistics.stdev(statistics.mean(top1) for top1 in samples)
    print(f"standard deviation within a sample (the batch order) {within:.1f} points; between the samples' "
          f"means {between:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
