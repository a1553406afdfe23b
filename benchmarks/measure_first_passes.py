"""What the first pass of each input shape costs on this machine's device, with cuDNN's benchmark mode (the job's
setting) and without it: the probe phase's passes in the job's order and shapes, on synthetic images, each timed
the first time and again. It splits the probe phase's start-up on a GPU (tens of seconds before the first step)
into the device's one-time costs of new shapes and the rest (loading, the probe's arithmetic), which the job's own
log times as a whole.

    python benchmarks/measure_first_passes.py                  # efficientnet_b3's shapes (batch 32 at 320 px)
    python benchmarks/measure_first_passes.py --train-size 288 # a job with no BatchNorm layer frozen
    python benchmarks/measure_first_passes.py --quick          # a tiny model and size: try it on a CPU

The job trains at its evaluation size whenever any BatchNorm layer stays frozen (hymenoptera's default share is
0.64), so the training step is timed at 320 px unless told. Each setting runs in a process of its own (cuDNN keeps
what it timed for the life of a process), after one small convolution and product that pay the process's own
start-up (handles, the allocator's first blocks); a first pass's excess over the next still includes loading its
kernels. Results are printed and saved as each setting finishes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

# The probe phase's passes, in the job's order (linear_probe.py, then the first training step): name, BatchNorm on
# batch statistics, images, the batch's size factor (2: validation's image and its mirror), evaluation size or
# training size, backward (the whole model in training mode).
PASSES = (("features of the probe's images (evaluation view)", False, "probe", 1, "eval", False),
          ("BatchNorm measurement (batch statistics)", True, "measured", 1, "eval", False),
          ("view measurements (evaluation size)", False, "measured", 1, "eval", False),
          ("validation (image and mirror)", False, "val", 2, "eval", False),
          ("first training step", True, "step", 1, "train", True))


def run_passes(o) -> dict:
    from timm import create_model

    from efficientnet_train.model import MEMORY_FORMAT, autocast_for, batchnorm_layers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = o.cudnn == "on"
    model = create_model(o.model, num_classes=2, drop_rate=0.3, drop_path_rate=0.2)  # the listing's regularisers
    model = model.to(device).to(memory_format=MEMORY_FORMAT)
    images = {"probe": o.probe_images, "measured": o.measured_images, "val": o.val_images, "step": o.batch_size}
    sizes = {"eval": o.eval_size, "train": o.train_size}
    autocast, _ = autocast_for(device)  # the job's precision on this device

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def one_pass(training: bool, count: int, factor: int, size: int, backward: bool) -> float:
        model.train(backward)  # measuring batch statistics: BatchNorm alone in training mode, as the job does
        for layer in batchnorm_layers(model) if training and not backward else ():
            layer.train()
        synchronize()
        started = time.perf_counter()
        for start in range(0, count, o.batch_size):  # full batches, then the remainder: a shape of its own
            batch = torch.randn(factor * min(o.batch_size, count - start), 3, size, size, device=device)
            with autocast(), torch.set_grad_enabled(backward):
                out = model(batch.to(memory_format=MEMORY_FORMAT))
            if backward:
                out.float().logsumexp(dim=1).mean().backward()
        synchronize()
        return time.perf_counter() - started

    warm = torch.randn(2, 3, 8, 8, device=device)
    torch.nn.functional.conv2d(warm, torch.randn(4, 3, 3, 3, device=device)).sum().item()
    (warm.flatten(1) @ warm.flatten(1).T).sum().item()

    rows = []
    for name, training, which, factor, size, backward in PASSES:
        first = one_pass(training, images[which], factor, sizes[size], backward)
        again = one_pass(training, images[which], factor, sizes[size], backward)
        rows.append({"pass": name, "first_s": first, "again_s": again})
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "cudnn_benchmark": o.cudnn,
            "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "model": o.model,
            "batch_size": o.batch_size, "eval_size": o.eval_size, "train_size": o.train_size, "images": images,
            "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_b3")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-size", type=int, default=320)
    parser.add_argument("--train-size", type=int, default=320, help="the evaluation size (any BatchNorm layer "
                        "frozen) or 288 (none)")
    parser.add_argument("--probe-images", type=int, default=400, help="the job's probe sample at 2 classes")
    parser.add_argument("--measured-images", type=int, default=128)
    parser.add_argument("--val-images", type=int, default=153, help="hymenoptera's")
    parser.add_argument("--quick", action="store_true", help="tf_efficientnet_lite0 at 64/48 px, batch 4, few images")
    parser.add_argument("--cudnn", choices=("on", "off"), help="one setting, in this process (else both, each in "
                        "a process of its own)")
    parser.add_argument("--json", help="also write the results here")
    o = parser.parse_args()
    if o.quick:
        o.model, o.batch_size, o.eval_size, o.train_size = "tf_efficientnet_lite0", 4, 64, 48
        o.probe_images, o.measured_images, o.val_images = 10, 8, 6
    if o.cudnn:
        print(json.dumps(run_passes(o)))
        return 0
    results = []
    for setting in ("on", "off"):
        argv = [f"--{name.replace('_', '-')}={getattr(o, name)}" for name in (
            "model", "batch_size", "eval_size", "train_size", "probe_images", "measured_images", "val_images")]
        done = subprocess.run([sys.executable, __file__, *argv, "--cudnn", setting], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"the passes with cuDNN's benchmark {setting} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        result = results[-1]
        print(f"{result['device']}, {o.model}, cuDNN's benchmark mode {setting}: seconds, the first pass of each "
              f"shape and the same pass again\n| pass | first | again |\n|---|---|---|", flush=True)
        for row in result["rows"]:
            print(f"| {row['pass']} | {row['first_s']:.2f} | {row['again_s']:.2f} |")
        print(f"| all | {sum(r['first_s'] for r in result['rows']):.2f} | "
              f"{sum(r['again_s'] for r in result['rows']):.2f} |\n", flush=True)
        if o.json:  # saved as each setting finishes: a time limit may end the next
            with open(o.json, "w") as f:
                json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
