"""Does a fine-tuning step keep the linear probe it starts from? The training loss of each of the first updates
after the probe, for several optimiser settings, on the clean training images (no augmentation, BatchNorm
frozen, no dropout): so that whatever the loss does, the update did, not the training view.

The script fits the job's probe (the package's own code, Lite0's ImageNet weights) on the clean training
images, then for each setting restarts from it and takes STEPS updates of batch_size images at a constant
rate (after a 5-update warmup), with the job's layer-wise rates (layer_decay) and label smoothing. Each
setting is OPT:LR[:CLIP], LR per batch of batch_size images (not per 256), CLIP the adaptive clipping
factor (clip_mode=agc) or none:

    python benchmarks/diagnose_update_stability.py /tmp/panel/digits30 sgd:0.0005 sgd:0.002:0.01 sgd:0.008:0.01

It prints how the first update's gradient compares with the weights, unit by unit, then each setting's
per-update training losses and its validation top-1 and loss after the last update.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import torch

from local_job import fitted_lite0_probe

WARMUP_UPDATES = 5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("settings", nargs="+", help="OPT:LR[:CLIP], e.g. sgd:0.002:0.01")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--weights-dir", type=Path, default=Path(tempfile.gettempdir()) / "lite0-weights")
    options = parser.parse_args()

    from timm.utils.agc import unitwise_norm

    from efficientnet_train.data import dataset_of, decode_side, eval_transform
    from efficientnet_train.model import set_batchnorm
    from efficientnet_train.engine import train_step
    from efficientnet_train.optimisation import create_optimizer

    parts = fitted_lite0_probe(options.folder, options.weights_dir)
    hp, train, model, config, to_input, loss_fn = (parts.hp, parts.train, parts.model, parts.config, parts.to_input,
                                                    parts.loss_fn)  # the job's own loss
    clean, loader, probe = parts.clean, parts.loader, parts.probe
    val_images = dataset_of(parts.val, eval_transform(config), None, 0, decode_side(config, training=False))
    probed = {name: value.clone() for name, value in model.state_dict().items()}

    @torch.no_grad()
    def validation() -> str:
        model.eval()
        right = seen = loss = 0
        for images, targets in loader(val_images):
            logits = model(to_input(images))
            right += int((logits.argmax(1) == targets).sum())
            seen += len(targets)
            loss += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        return f"validation top-1 {100 * right / seen:.1f}%, loss {loss / seen:.3f}"

    print(f"{options.folder}: {len(train.samples)} training images, {config['input_size'][-1]} px, batch "
          f"{hp.batch_size}; the probe: training loss {probe.loss:.3f}, {validation()}", flush=True)
    # The first update's gradient, unit by unit (a conv filter, a row of the classifier), against its weights.
    images, targets = next(iter(loader(clean, shuffle=True, generator=torch.Generator().manual_seed(0))))
    model.train()
    set_batchnorm(model, 1.0)
    model.zero_grad()
    loss_fn(model(to_input(images)), targets).backward()
    ratios = torch.cat([(unitwise_norm(p.grad) / unitwise_norm(p.detach()).clamp(min=1e-3)).flatten()  # as AGC
                        for p in model.parameters() if p.grad is not None and p.ndim > 1])
    print(f"first update, gradient / weights norm per unit ({len(ratios)} units of the conv and linear layers): "
          f"median {ratios.median():.2g}, 99th percentile {ratios.quantile(0.99):.2g}, largest {ratios.max():.2g}; "
          f"{(ratios > 0.01).float().mean():.1%} over 0.01", flush=True)
    for setting in options.settings:
        opt, lr, clip = (setting.split(":") + [None])[:3]
        model.load_state_dict(probed)
        optimizer = create_optimizer(model, hp, float(lr), opt)
        shuffled = torch.Generator().manual_seed(0)
        batches, losses = iter(()), []
        for step in range(options.steps):
            batch = next(batches, None)
            if batch is None:
                batches = iter(loader(clean, shuffle=True, generator=shuffled, drop_last=True))
                batch = next(batches)
            for group in optimizer.param_groups:
                group["lr"] = float(lr) * min(1.0, (step + 1) / WARMUP_UPDATES) * group.get("lr_scale", 1.0)
            model.train()
            set_batchnorm(model, 1.0)
            loss = train_step(model, to_input(batch[0]), batch[1], loss_fn, optimizer, None, contextlib.nullcontext,
                              float(clip or 0), "agc")
            losses.append(f"{loss.item():.2f}")
        print(f"{setting}: training losses {' '.join(losses)}; {validation()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
