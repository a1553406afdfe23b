"""The job's adaptive gradient clipping (optimisation.adaptive_clip_at_once, used on a GPU) against timm's
adaptive_clip_grad, on one model's real gradients: how far apart their clipped gradients are, and the time of a
call of each on this machine's device (the GPU if there is one). The job's whole step with and without clipping is
benchmark_speed.py's (a).

    python benchmarks/measure_clipping.py                      # efficientnet_b3, batch 32 at 288 px on a GPU
    python benchmarks/measure_clipping.py --model tf_efficientnet_lite0 --batch-size 2 --img-size 64
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch


def main() -> None:
    from timm import create_model
    from timm.utils import adaptive_clip_grad

    from efficientnet_train.model import MEMORY_FORMAT
    from efficientnet_train.optimisation import adaptive_clip_at_once, at_once_groups

    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_b3")
    parser.add_argument("--batch-size", type=int, default=32 if cuda else 2)
    parser.add_argument("--img-size", type=int, default=288 if cuda else 64)
    parser.add_argument("--calls", type=int, default=30)
    o = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model = create_model(o.model, num_classes=5).to(device).to(memory_format=MEMORY_FORMAT).train()
    images = torch.randn(o.batch_size, 3, o.img_size, o.img_size, device=device).to(memory_format=MEMORY_FORMAT)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(images), torch.randint(5, (o.batch_size,), device=device))
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    saved = [p.grad.clone() for p in params]

    def clipped_by(clip) -> list[torch.Tensor]:
        clip(params, 0.01)
        result = [p.grad.clone() for p in params]
        torch._foreach_copy_([p.grad for p in params], saved)
        return result

    timms, ours = clipped_by(adaptive_clip_grad), clipped_by(adaptive_clip_at_once)
    changed = sum(not torch.equal(a, b) for a, b in zip(saved, timms))
    worst = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item() for a, b in zip(ours, timms))
    print(f"{o.model} on {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}: "
          f"{len(params)} tensors, {changed} changed by timm's clipping; the largest difference between the two "
          f"clipped gradients, as a share of the tensor's largest element: {worst:.2e}")

    def milliseconds(clip) -> float:
        for _ in range(2):
            clip(params, 0.01)
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(o.calls):
            clip(params, 0.01)
        if cuda:
            torch.cuda.synchronize()
        return 1e3 * (time.perf_counter() - started) / o.calls

    groups, rest = at_once_groups(params)
    print(f"the job clips {sum(map(len, groups))} of these {len(params)} tensors at once on this device ({len(rest)} "
          f"in timm's loop: {'a CPU launches nothing' if device.type == 'cpu' else 'their units lie apart in memory'})")
    print(f"a call: timm's adaptive_clip_grad {milliseconds(adaptive_clip_grad):.2f} ms, the job's "
          f"adaptive_clip_at_once {milliseconds(adaptive_clip_at_once):.2f} ms")
    if cuda:  # a host synchronisation would stall the step's queue of kernels
        torch.cuda.set_sync_debug_mode(1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            adaptive_clip_at_once(params, 0.01)
        torch.cuda.set_sync_debug_mode(0)
        syncs = [str(w.message)[:120] for w in caught if "Synchronization debug mode" not in str(w.message)]
        print("host synchronisations in adaptive_clip_at_once:", syncs or "none")


if __name__ == "__main__":
    main()
