"""Which BatchNorm layers' batch statistics cost the linear probe its answers? The job's probe (the package's own
code, Lite0's ImageNet weights) is fitted on the clean training images; then its top-1 on those images is measured
with a share of the BatchNorm layers normalising each shuffled batch by its own statistics and the rest frozen,
the share taken from the input side (the first layers on batch statistics) or from the classifier's side:

    python benchmarks/diagnose_batchnorm_layers.py /tmp/panel/photos
    python benchmarks/diagnose_batchnorm_layers.py /tmp/panel/stamps --images 256 --shares 0.5 0.625 0.75 0.875 1

It prints, for each share, the top-1 with the first layers on batch statistics and with the last ones.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from local_job import fitted_lite0_probe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a folder with train/ and val/ class folders")
    parser.add_argument("--images", type=int, default=0, help="fit and measure on this many training images "
                        "(a seeded sample); 0 = all")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="shares of the BatchNorm layers on batch statistics")
    parser.add_argument("--weights-dir", type=Path, default=Path(tempfile.gettempdir()) / "lite0-weights")
    options = parser.parse_args()

    from efficientnet_train.model import batchnorm_layers

    parts = fitted_lite0_probe(options.folder, options.weights_dir, options.images)
    hp, model, to_input, images, loader, probe = (parts.hp, parts.model, parts.to_input, parts.clean, parts.loader,
                                                  parts.probe)
    layers = batchnorm_layers(model)  # in the order set_batchnorm counts them
    fitted = {name: value.clone() for name, value in model.state_dict().items()}

    @torch.no_grad()
    def top1(on_batch_statistics: set[int]) -> float:
        model.load_state_dict(fitted)  # the running averages as fitted, whatever the last measurement moved
        model.eval()
        for i, layer in enumerate(layers):
            layer.train(i in on_batch_statistics)
        right = seen = 0
        for batch, targets in loader(images, shuffle=True, generator=torch.Generator().manual_seed(0)):
            if len(targets) > 1:  # batch statistics need two images
                right += int((model(to_input(batch)).argmax(1) == targets).sum())
                seen += len(targets)
        return 100 * right / seen

    print(f"{options.folder}: {len(images)} training images, {len(layers)} BatchNorm layers, batch "
          f"{hp.batch_size}; the probe answers {probe.top1:.1f}% of them right as fitted", flush=True)
    for share in options.shares:
        count = round(share * len(layers))
        first, last = set(range(count)), set(range(len(layers) - count, len(layers)))
        print(f"{share:g} of the layers ({count}) on batch statistics: the first ones {top1(first):.1f}%, "
              f"the last ones {top1(last):.1f}%", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
