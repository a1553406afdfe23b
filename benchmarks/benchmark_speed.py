"""How fast does training go, and what holds it back? Measurements through the product's own code:

  (a) model: forward + backward + optimizer + EMA steps on synthetic tensors already on the device, as
      train_one_epoch does them: the ceiling, no data loading at all (optionally with torch.compile too), and
      the gradient clipping's share of the step
  (b) loader: decode + augment + collate of real JPEGs through the DataLoader train.py builds, per worker count
  (c) job: the real `train` entry point on a mocked /opt/ml tree (symlinked JPEGs); its last epoch's images/s,
      (c)/(a), start-up time and peak memory of the job's process tree
  scan: scan_channel over generated trees of 10k and 100k files
  (d) loop, only when asked (--parts loop): where the real loop loses against (a), variant by variant in one
      process: the step fed a batch on the device, a pinned uint8 batch, the job's loader, the loader unpinned
  timm, only when asked (--parts timm --timm-train PATH): timm's reference train.py on (c)'s images with the
      product's resolved settings, for (c) against it (on a CPU through a shim that only points it at the CPU)

    python benchmarks/benchmark_speed.py                                   # efficientnet_b3, its own size, batch 32
    python benchmarks/benchmark_speed.py --model tf_efficientnet_lite0 --img-size 224 --train-images 256 --epochs 1
    python benchmarks/benchmark_speed.py --compile --json speed.json --hp aa=none --hp workers=4
    python benchmarks/benchmark_speed.py --parts model --compile reduce-overhead   # CUDA graphs: less launching
    python benchmarks/benchmark_speed.py --quick                           # tiny model, seconds (the test runs this)
    python benchmarks/benchmark_speed.py --parts model,loop --train-images 4096   # on a GPU: what the loop loses
    python benchmarks/benchmark_speed.py --parts job,timm --timm-train pytorch-image-models/train.py
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as the commands: nothing here may reach a hub

import torch  # noqa: E402

from efficientnet_train import hyperparameters  # noqa: E402
from efficientnet_train.channels import class_folders, scan_channel
from efficientnet_train.data import (ModelInput, TrainBatches, dataset_of, decode_side, resolve_data_config,
                                     train_transform)
from efficientnet_train.model import MEMORY_FORMAT, autocast_for, create_model  # noqa: E402
from efficientnet_train.recipe import recipe_for, training_size_config  # noqa: E402
from efficientnet_train.engine import data_loader, train_step  # noqa: E402
from efficientnet_train.optimisation import create_optimizer, training_tools  # noqa: E402
from efficientnet_train.resources import data_loading_workers_for  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# The listing's example set: https://download.pytorch.org/tutorial/hymenoptera_data.zip, unzipped into data/.
DEFAULT_DATA = Path(os.environ.get("HYMENOPTERA_DATA", REPO / "data" / "hymenoptera_data"))
# --quick: timm's own tiny EfficientNet (as the test suite uses), small everything; a smoke test, not a measurement.
QUICK = dict(model="test_efficientnet", img_size=64, batch_size=8, steps=3, warmup=1, train_images=32, epochs=1,
             scan_sizes="1000", loader_seconds=0.5, max_workers=1)


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="timm EfficientNet name (default: the product's, efficientnet_b3)")
    p.add_argument("--img-size", type=int, help="training size; 0 = the model's own, as img_size=0 (default)")
    p.add_argument("--batch-size", type=int, help="per device (default: the product's, 32)")
    p.add_argument("--steps", type=int, help="timed steps in (a) (default 50 on cuda, 10 on cpu)")
    p.add_argument("--warmup", type=int, help="untimed steps first in (a) (default 10 on cuda, 3 on cpu)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding train/ and val/ (class folders)")
    p.add_argument("--train-images", type=int, help="(c)'s training set, data/train replicated by links "
                                                     "(default 4096 on cuda, 256 on cpu)")
    p.add_argument("--epochs", type=int, help="(c)'s epochs (default 2: the first one warms up)")
    p.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", help="more hyperparameters, for all parts")
    p.add_argument("--scan-sizes", help="comma-separated file counts (default 10000,100000)")
    p.add_argument("--loader-seconds", type=float, help="(b): time each worker count at least this long (default 3)")
    p.add_argument("--max-workers", type=int, help="(b): largest worker count tried (default: the CPU count)")
    p.add_argument("--parts", default="model,loader,job,scan",
                   help="which measurements, comma-separated, of model, loader, job, scan, loop and timm")
    p.add_argument("--timm-train", type=Path, help="timm's reference train.py (pytorch-image-models), for --parts "
                                                   "timm: run on (c)'s images with the product's settings")
    p.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="(a) with torch.compile too, in this mode (default: default): compile time and throughput; "
                        "reduce-overhead replays the step's kernels as CUDA graphs, for steps bound by launching")
    p.add_argument("--cudnn-benchmark", choices=("on", "off"), default="on",
                   help="(a) and (d): cuDNN timing its kernels on the first steps (on, as the job does) or picking "
                        "them by heuristics (off): the first steps' seconds against the steady rate")
    p.add_argument("--json", type=Path, help="also write every number here")
    p.add_argument("--quick", action="store_true", help="tiny model and sizes: checks the script runs")
    o = p.parse_args(argv)
    product = hyperparameters.defaults()  # the product's own defaults, whatever they become
    defaults = QUICK if o.quick else dict(
        model=product["model"], img_size=product["img_size"], batch_size=product["batch_size"],
        steps=50 if cuda else 10, warmup=10 if cuda else 3,
        train_images=4096 if cuda else 256, epochs=2, scan_sizes="10000,100000", loader_seconds=3.0,
        max_workers=os.cpu_count() or 1)
    for key, value in defaults.items():
        if getattr(o, key) is None:
            setattr(o, key, value)
    o.extras = dict(item.split("=", 1) for item in o.hp)
    o.parts = set(o.parts.split(","))
    if "timm" in o.parts and not o.timm_train:
        p.error("--parts timm needs --timm-train PATH (pytorch-image-models' train.py)")
    return o


def product_hyperparameters(o):
    """The job's resolved hyperparameters for these options: the product's defaults unless said otherwise."""
    raw = {"model": o.model, "batch_size": str(o.batch_size), "img_size": str(o.img_size), **o.extras}
    return hyperparameters.parse(raw)[0]


def write_random_weights(name: str, path: Path) -> Path:
    """An ImageNet-shaped (1000-class) random-init weights file: create_model insists on weights (it never
    downloads, and this machine may have none), and random weights train exactly as fast as real ones."""
    import timm

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(timm.create_model(name, num_classes=1000).state_dict(), path)
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_setup(hp, weights: Path, classes: list[str], device: torch.device,
                   cudnn_benchmark: bool = True) -> SimpleNamespace:
    """The model, optimizer, EMA and loss as train.py makes them, and `step(images, targets)`: engine.train_step
    and the EMA update, as train_one_epoch runs them (less the loss sum and scheduler update, which cost next to
    nothing)."""
    autocast, amp_dtype = autocast_for(device)
    torch.backends.cudnn.benchmark = cudnn_benchmark and device.type == "cuda"  # as train.py unless told
    recipe = recipe_for(hp)  # as before the probe: its measurements need the buyer's images
    model = create_model(hp.model, classes, str(weights), recipe.drop, recipe.drop_connect).to(device).train()
    data_config = training_size_config(resolve_data_config(model, hp.img_size, hp.eval_img_size), recipe)
    optimizer = create_optimizer(model, hp, hyperparameters.scaled_lr(recipe.lr, hp.batch_size), recipe.opt)
    ema, scaler = training_tools(model, hp, amp_dtype)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=hp.smoothing).to(device)
    updates = 0

    def step(images, targets, net=model, clip=True):
        nonlocal updates
        train_step(net, images, targets, loss_fn, optimizer, scaler, autocast, hp.clip_grad if clip else 0.0,
                   hp.clip_mode)
        updates += 1
        if ema is not None:
            ema.update(model, step=updates)

    return SimpleNamespace(model=model, data_config=data_config, step=step, recipe=recipe,
                           size=data_config["train_input_size"], amp_dtype=amp_dtype)


def measure_model(o, hp, weights: Path, classes: list[str], device: torch.device) -> dict:
    """(a) The ceiling: the training step on one fixed batch already on the device: no data loading, no
    validation."""
    setup = training_setup(hp, weights, classes, device, o.cudnn_benchmark == "on")
    model, size, amp_dtype = setup.model, setup.size, setup.amp_dtype
    images = torch.randn(hp.batch_size, *size, device=device).to(memory_format=MEMORY_FORMAT)
    targets = torch.randint(len(classes), (hp.batch_size,), device=device)

    def run(net, steps: int, clip: bool = True) -> float:  # seconds for `steps` steps, the device drained
        sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            setup.step(images, targets, net, clip)
        sync(device)
        return time.perf_counter() - started

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warmup = run(model, o.warmup)  # cuDNN autotuning, allocator growth, lazy init
    seconds = run(model, o.steps)
    result = {"input_size": list(size), "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "float32",
              "steps": o.steps, "images_per_s": o.steps * hp.batch_size / seconds,
              "cudnn_benchmark": torch.backends.cudnn.benchmark, "warmup_steps": o.warmup, "warmup_s": warmup,
              "ops_per_step": dispatched_ops(lambda: setup.step(images, targets))}
    if hp.clip_grad:  # the clipping's own cost: timm's walks every parameter tensor, a few kernels each
        unclipped, clipped_again = run(model, o.steps, clip=False), run(model, o.steps)
        result["clip"] = {"mode": hp.clip_mode, "clip_grad": hp.clip_grad,
                          "unclipped_images_per_s": o.steps * hp.batch_size / unclipped,
                          "clipped_again_images_per_s": o.steps * hp.batch_size / clipped_again,
                          "share_of_step": 1 - 2 * unclipped / (seconds + clipped_again),
                          "unclipped_ops_per_step": dispatched_ops(lambda: setup.step(images, targets, clip=False))}
    if device.type == "cuda":
        result.update(peak_gpu_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                      peak_gpu_reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
    if o.compile:
        compiled = torch.compile(model, mode=o.compile)
        first = run(compiled, o.warmup)  # the first step compiles forward and backward
        steady = run(compiled, o.steps) / o.steps
        overhead = first - o.warmup * steady
        saved_per_image = 1 / result["images_per_s"] - steady / hp.batch_size
        typical = 20 * 10_000  # 20 epochs of 10k images
        result["compile"] = {"mode": o.compile, "first_steps_s": first, "compile_overhead_s": overhead,
                             "images_per_s": hp.batch_size / steady,
                             "break_even_images": overhead / saved_per_image if saved_per_image > 0 else None,
                             "net_saving_s_20_epochs_of_10k": typical * saved_per_image - overhead}
    return result


def dispatched_ops(run) -> int:
    """How many tensor operations `run` dispatches, backward included. Most launch a kernel on a GPU, and at a
    small batch the time to launch them, not the GPU's arithmetic, can set the pace (timm's RMSpropTF before
    1.0.31 updated each of efficientnet_b3's 340 tensors alone: 3,533 operations per step against 590)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    with Count() as counter:
        run()
    return counter.count


def replicated_train_channel(o, hp):
    """data/train's images listed over and over, up to --train-images: as many as (c) trains on, so that with
    many workers an epoch is still many batches per worker (each epoch's start drains and refills the queue)."""
    channel = scan_channel("train", o.data / "train", max_unusable_fraction=hp.max_unusable_fraction)
    return dataclasses.replace(channel, samples=channel.samples * -(-o.train_images // len(channel.samples)))


def thread_ready_seconds() -> float:
    """Seconds this thread has been ready to run but waited for a core (0 where schedstat is missing)."""
    try:
        return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def measure_loop(o, hp, weights: Path, classes: list[str], device: torch.device) -> dict:
    """(d) Where the real loop loses against (a), in one process with one model, so without (c)'s start-up:
    the job's step fed (1) a normalised batch already on the device, as (a); (2) one uint8 batch in pinned host
    memory through ModelInput, as the loop does it (copy, normalise, random erasing); (3) the job's own loader, its
    crops as they are once grown (after the warmup); (4) the same loader without pinned memory. For each: images/s,
    seconds waiting for batches, and how busy the main thread was and how long it waited for a free core."""
    setup = training_setup(hp, weights, classes, device, o.cudnn_benchmark == "on")
    data_config = setup.data_config
    to_input = ModelInput(data_config, device, setup.recipe.reprob, hp.remode)
    workers = data_loading_workers_for(hp, 1)
    recipe = setup.recipe
    dataset = dataset_of(replicated_train_channel(o, hp), train_transform(data_config, recipe.aa, recipe.hflip,
                                                                          recipe.crop_scale),
                         hp.max_unusable_fraction, workers, decode_side(data_config, True, recipe.crop_scale))
    fixed = (torch.randint(0, 256, (hp.batch_size, *setup.size), dtype=torch.uint8),
             torch.randint(len(classes), (hp.batch_size,)))
    pinned = tuple(t.pin_memory() for t in fixed) if device.type == "cuda" else fixed
    on_device = (to_input(pinned[0]), pinned[1].to(device))

    def repeat(batch):
        while True:
            yield batch

    def endless(pin_device: torch.device):  # the job's loader, epoch after epoch
        sampler = TrainBatches(len(dataset), hp.batch_size, hp.seed)
        loader = data_loader(dataset, workers, pin_device, hp.seed, batch_sampler=sampler)
        epoch = 1
        while True:
            sampler.start_epoch(epoch)
            yield from loader
            epoch += 1

    def run(batches, convert, warmup: int = o.warmup) -> dict:
        for _ in range(warmup):  # workers starting, cuDNN autotuning (first variant), allocator growth
            setup.step(*convert(*next(batches)))
        sync(device)
        waited, cpu, ready, started = 0.0, time.thread_time(), thread_ready_seconds(), time.perf_counter()
        for _ in range(o.steps):
            asked = time.perf_counter()
            images, targets = next(batches)
            waited += time.perf_counter() - asked
            setup.step(*convert(images, targets))
        sync(device)
        seconds = time.perf_counter() - started
        return {"images_per_s": o.steps * hp.batch_size / seconds, "data_wait_s": waited, "seconds": seconds,
                "main_thread_cpu": (time.thread_time() - cpu) / seconds,
                "main_thread_waiting_for_a_core": (thread_ready_seconds() - ready) / seconds}

    def as_loop(images, targets):
        return to_input(images), targets.to(device, non_blocking=True)

    # The loader's workers fill their queue (2 batches each) while starting: with that many more warm-up steps a
    # loader slower than the step has drained it before the timing starts, so its rows are not flattered.
    queued = 2 * workers
    rows = {"device_batch": lambda: run(repeat(on_device), lambda images, targets: (images, targets)),
            "pinned_batch": lambda: run(repeat(pinned), as_loop),
            "loader": lambda: run(endless(device), as_loop, o.warmup + queued),
            "loader_unpinned": lambda: run(endless(torch.device("cpu")), as_loop, o.warmup + queued)}
    result = {"workers": workers, "steps": o.steps}
    for name, measure in rows.items():
        result[name] = measure()
        gc.collect()  # the loader generator's workers end with it
    return result


def measure_loader(o, hp, device: torch.device) -> dict:
    """(b) Decode + augment + collate alone, through the DataLoader train.py builds, for several worker counts."""
    import timm

    channel = replicated_train_channel(o, hp)
    # Only the model's pretrained_cfg matters here (sizes, interpolation, normalisation): no weights needed.
    recipe = recipe_for(hp)
    data_config = training_size_config(
        resolve_data_config(timm.create_model(hp.model, num_classes=2), hp.img_size, hp.eval_img_size), recipe)
    transform = train_transform(data_config, recipe.aa, recipe.hflip, recipe.crop_scale)
    counts, n = [0], 1
    while n <= o.max_workers:
        counts.append(n)
        n *= 2
    if o.max_workers not in counts:
        counts.append(o.max_workers)
    default_workers = data_loading_workers_for(hp, 1)
    counts = sorted(set(counts) | {default_workers})
    rows = []
    for workers in counts:
        dataset = dataset_of(channel, transform, hp.max_unusable_fraction, workers,
                             decode_side(data_config, True, recipe.crop_scale))
        sampler = TrainBatches(len(dataset), hp.batch_size, hp.seed)
        loader = data_loader(dataset, workers, device, hp.seed, batch_sampler=sampler)
        started, images, epoch, first = time.perf_counter(), 0, 1, None
        # Several epochs of the small set, so each count is timed for seconds; the first batch (workers starting,
        # the prefetch queue filling) is timed apart: a long job pays it once.
        timed_out = False  # a few seconds per count, even when one epoch takes minutes with few workers
        while not timed_out:
            sampler.start_epoch(epoch)
            for batch, _ in loader:
                if first is None:
                    first = time.perf_counter()
                else:
                    images += len(batch)
                timed_out = first is not None and time.perf_counter() - first >= o.loader_seconds
                if timed_out:
                    break
            epoch += 1
        rate = images / (time.perf_counter() - first)
        rows.append({"workers": workers, "default": workers == default_workers, "images_per_s": rate,
                     "per_worker_images_per_s": rate / workers if workers else rate,
                     "first_batch_s": first - started, "epochs": epoch - 1})
        del loader  # shuts the persistent workers down before the next count starts its own
    return {"train_images": len(channel.samples), "input_size": data_config["train_input_size"], "rows": rows}


def cpu_seconds(stat_path: str) -> float:
    """utime + stime of a process or thread, from its /proc stat file."""
    with open(stat_path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree_sample(root: int, with_pss: bool = True) -> tuple[int, int, int, float, float, float, float]:
    """Sums of VmRSS and of Pss (0 unless `with_pss`) over `root` and its descendants, and root's VmHWM, in
    bytes; then CPU seconds so far of root's main thread (the one that launches the GPU's work), of root as a whole and of its
    descendants (the loader workers), and the seconds root's main thread was ready to run but waited for a core
    (schedstat; 0 where the kernel does not keep it); /proc, Linux only. Forked loader workers share the parent's pages: the
    RSS sum counts those once per process, PSS splits them."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = {root}, [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier and pid not in tree]
        tree.update(children)
        frontier = children
    rss, pss, hwm, main_thread, main, others, main_thread_ready = 0, 0, 0, 0.0, 0.0, 0.0, 0.0
    for pid in tree:
        try:
            status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
            rollup = (dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
                      if with_pss else {})
        except (OSError, ValueError):
            continue
        rss += int(status.get("VmRSS", "0 kB").split()[0]) * 1024
        pss += int(rollup.get("Pss", "0 kB").split()[0]) * 1024
        try:
            if pid == root:
                hwm = int(status.get("VmHWM", "0 kB").split()[0]) * 1024
                main_thread, main = cpu_seconds(f"/proc/{pid}/task/{pid}/stat"), cpu_seconds(f"/proc/{pid}/stat")
                with open(f"/proc/{pid}/task/{pid}/schedstat") as f:  # ns running, ns waiting for a core, slices
                    main_thread_ready = int(f.read().split()[1]) / 1e9
            else:
                others += cpu_seconds(f"/proc/{pid}/stat")
        except (OSError, IndexError, ValueError):
            continue
    return rss, pss, hwm, main_thread, main, others, main_thread_ready


def build_job_tree(o, base: Path, weights: Path) -> dict:
    """A mocked /opt/ml (see sagemaker.py): train/ holds data/train's images linked round-robin up to
    --train-images, val/ links data/val's class folders."""
    data = base / "input" / "data"
    labels = class_folders(o.data / "train")
    images = {label: sorted(p for p in (o.data / "train" / label).iterdir() if not p.name.startswith("."))
              for label in labels}
    for i in range(o.train_images):  # class by class in turn, so any count keeps every class
        label = labels[i % len(labels)]
        source = images[label][(i // len(labels)) % len(images[label])]
        (data / "train" / label).mkdir(parents=True, exist_ok=True)
        (data / "train" / label / f"{i:06d}_{source.name}").symlink_to(source.resolve())
    for label in class_folders(o.data / "val"):
        (data / "val").mkdir(parents=True, exist_ok=True)
        (data / "val" / label).symlink_to((o.data / "val" / label).resolve(), target_is_directory=True)
    hp = {"model": o.model, "epochs": str(o.epochs), "batch_size": str(o.batch_size), "pretrained_path": str(weights),
          **({"img_size": str(o.img_size)} if o.img_size else {}), **o.extras}
    (base / "input" / "config").mkdir(parents=True, exist_ok=True)
    (base / "input" / "config" / "hyperparameters.json").write_text(json.dumps(hp))
    return hp


def log_time(line: str) -> float | None:
    """The epoch seconds of a log line's asctime stamp (`2025-01-01 12:00:00,123 INFO ...`)."""
    try:
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


PSS_EVERY_S = 5.0


def measure_job(o, weights: Path, work: Path, a_rate: float | None) -> dict:
    """(c) The real `train` process; its own log says how fast each epoch trained."""
    base = work / "opt_ml"
    hp = build_job_tree(o, base, weights)
    log_path, peak, cpu = work / "train.log", [0, 0, 0], []
    started = time.time()
    with open(log_path, "w") as log_file:
        job = subprocess.Popen([sys.executable, "-m", "efficientnet_train.train"], stdout=log_file,
                               stderr=subprocess.STDOUT, env={**os.environ, "SAGEMAKER_BASE_DIR": str(base)})
        last_pss = 0.0
        while job.poll() is None:  # the job's memory and CPU time, with its loader workers', every 0.2 s
            # PSS only every few seconds: reading smaps_rollup walks the job's page tables under its memory
            # lock (about 0.1 s of CPU for a 4 GiB process) and, every 0.2 s, slowed a job on 2 cores by 37%.
            with_pss = time.time() - last_pss >= PSS_EVERY_S
            last_pss = time.time() if with_pss else last_pss
            sample = process_tree_sample(job.pid, with_pss)
            peak = [max(pair) for pair in zip(peak, sample[:3])]
            cpu.append((time.time(), *sample[3:]))
            time.sleep(0.2)
    wall = time.time() - started
    log = log_path.read_text()
    if job.returncode != 0:
        sys.exit(f"{log[-3000:]}\ntrain failed (exit {job.returncode}); log in {log_path}")
    epochs = [(line, float(re.search(r"images/s=([\d.]+)", line)[1])) for line in log.splitlines()
              if re.search(r" epoch \d+/\d+ .*images/s=", line)]
    last_rate = epochs[-1][1]
    result = {"hyperparameters": hp, "wall_s": wall, "epoch_images_per_s": [rate for _, rate in epochs],
              "images_per_s": last_rate, "vs_model": last_rate / a_rate if a_rate else None,
              "peak_tree_rss_gib": peak[0] / 2**30, "peak_tree_pss_gib": peak[1] / 2**30,
              "peak_main_vmhwm_gib": peak[2] / 2**30, "log": str(log_path)}
    first_step = re.search(r"First training step done ([\d.]+) s after the job started: (.*)", log)
    if first_step:
        result["first_step_s"], result["first_step_source"] = float(first_step[1]), "log line"
        result["first_step_phases_s"] = {phase: float(seconds) for phase, seconds in
                                         re.findall(r"(?:^|, )([^,]+?) ([\d.]+) s", first_step[2])}
    else:  # the last line logged before the loop starts: a lower bound (no worker start, no first batch in it)
        settings = next((log_time(line) for line in log.splitlines() if "Resolved settings" in line), None)
        result["first_step_s"] = settings - started if settings else None
        result["first_step_source"] = "estimate: 'Resolved settings' logged (lower bound, no first batch)"
    if len(epochs) > 1:  # what the first epoch cost beyond a steady one: warm-up, cuDNN autotuning, workers starting
        first_end, last_end = log_time(epochs[0][0]), log_time(epochs[-1][0])
        previous = log_time(epochs[-2][0])
        result["first_epoch_extra_s"] = (first_end - started) - (last_end - previous) if first_end else None
    # CPU cores busy during the last epoch (training and validation): a main thread near 1.0 cannot launch
    # the GPU's work any faster; workers near the core count cannot decode any faster.
    first_step_line = next((line for line in log.splitlines() if "First training step done" in line), "")
    # One epoch only: from its first step, so that the start-up (imports, model, workers starting) is left out.
    window_start = log_time(epochs[-2][0]) if len(epochs) > 1 else (log_time(first_step_line) or started)
    window_end = log_time(epochs[-1][0]) or wall + started
    # The samples (every 0.2 s) just outside the window, so that a short epoch still has two.
    first = next((row for row in reversed(cpu) if row[0] <= window_start), cpu[0] if cpu else None)
    last = next((row for row in cpu if row[0] >= window_end), cpu[-1] if cpu else None)
    if first and last and last[0] > first[0]:
        seconds = last[0] - first[0]
        result["last_epoch_cpu_cores"] = {
            name: (last[i] - first[i]) / seconds
            for i, name in enumerate(("main_thread", "main_process", "workers", "main_thread_waiting_for_a_core"), 1)}
    wait = re.search(r" training=(\d+)s data_wait=([\d.]+)s", epochs[-1][0])
    if wait:  # the job's own measure: how long its loop waited for the loader's next batch
        result["last_epoch_training_s"], result["last_epoch_data_wait_s"] = int(wait[1]), float(wait[2])
    gpu = re.search(r"Peak GPU memory: (.*)", log)
    result["peak_gpu_memory"] = gpu[1] if gpu else "n/a (no GPU)"
    return result


# timm's train.py (2aabaef and around) has no --device: it asserts CUDA, and its train_one_epoch and validate
# default to device=cuda. On a CPU it runs unchanged through this: its parsed args say cpu, its defaults too.
TIMM_TRAIN_ON_CPU = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("timm_train", sys.argv[1])
train = importlib.util.module_from_spec(spec)
sys.argv = sys.argv[1:]
spec.loader.exec_module(train)
parse_args = train._parse_args
def parse_args_for_cpu():
    args, text = parse_args()
    args.device = "cpu"
    return args, text
train._parse_args = parse_args_for_cpu
for function in (train.train_one_epoch, train.validate):
    function.__defaults__ = tuple(torch.device("cpu") if d == torch.device("cuda") else d
                                  for d in function.__defaults__)
train.main()
"""


def timm_train_arguments(o, hp, data: Path, device: torch.device) -> list[str]:
    """timm's train.py flags for the product's resolved settings, so the two train the same way."""
    amp_dtype = autocast_for(device)[1]
    workers = data_loading_workers_for(hp, 1)
    recipe = recipe_for(hp)
    args = [str(data), "--train-split", "train", "--val-split", "val", "--model", hp.model,
            "--num-classes", str(len(class_folders(data / "train"))), "-b", str(hp.batch_size),
            "--epochs", str(o.epochs), "--opt", recipe.opt, "--opt-eps", str(hp.opt_eps),
            "--lr", str(hyperparameters.scaled_lr(recipe.lr, hp.batch_size)),
            "--weight-decay", str(hp.weight_decay), "--sched", hp.sched, "--decay-epochs", str(hp.decay_epochs),
            "--decay-rate", str(hp.decay_rate), "--warmup-epochs", f"{hp.warmup_epochs:g}",  # an int to timm
            "--warmup-lr", str(hp.warmup_lr), "--drop", str(recipe.drop), "--drop-path", str(recipe.drop_connect),
            "--smoothing", str(hp.smoothing), "--aa", recipe.aa, "--reprob", str(recipe.reprob), "--remode", hp.remode,
            "--hflip", str(recipe.hflip), "--scale", str(recipe.crop_scale), "1", "-j", str(workers), "--log-interval", "1", "--seed", str(hp.seed)]
    if hp.layer_decay < 1:
        args += ["--layer-decay", str(hp.layer_decay)]
    if hp.clip_grad:
        args += ["--clip-grad", str(hp.clip_grad), "--clip-mode", hp.clip_mode]
    if hp.model_ema:
        args += ["--model-ema", "--model-ema-decay", str(hp.model_ema_decay)]
    if hp.img_size:
        args += ["--img-size", str(hp.img_size)]
    if amp_dtype is not None:
        args += ["--amp", "--amp-dtype", str(amp_dtype).replace("torch.", "")]
    args += ["--channels-last"]  # as the job's model.MEMORY_FORMAT
    args += ["--pin-mem"] if device.type == "cuda" else ["--no-prefetcher"]  # its prefetcher is CUDA only
    return args


def measure_timm(o, hp, weights: Path, work: Path, device: torch.device, c: dict | None) -> dict:
    """timm's reference train.py on (c)'s images with the product's settings: its last epoch's images/s (its
    own running average over the epoch, loading included, validation not) against (c)'s."""
    data = work / "opt_ml" / "input" / "data"
    if not data.exists():
        build_job_tree(o, work / "opt_ml", weights)
    args = timm_train_arguments(o, hp, data, device) + ["--output", str(work / "timm")]
    command = ([sys.executable, str(o.timm_train)] if device.type == "cuda"
               else [sys.executable, "-c", TIMM_TRAIN_ON_CPU, str(o.timm_train)])
    log_path, lines, first_step_s = work / "timm_train.log", [], None
    started = time.time()
    with open(log_path, "w") as log_file:
        timm = subprocess.Popen(command + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in timm.stdout:
            log_file.write(line)
            lines.append(line)
            if first_step_s is None and re.match(r"Train: 0 \[ *0/", line):
                first_step_s = time.time() - started
    wall = time.time() - started
    if timm.wait() != 0:
        sys.exit(f"{''.join(lines[-40:])}\ntimm's train.py failed (exit {timm.returncode}); log in {log_path}")
    shutil.rmtree(work / "timm", ignore_errors=True)  # its checkpoints: hundreds of MB nobody needs
    last_epoch = [line for line in lines if line.startswith(f"Train: {o.epochs - 1} [")]
    average = re.search(r"\(([\d.]+)s, +([\d.]+)/s\).*Data: [\d.]+ \(([\d.]+)\)", last_epoch[-1])
    rate = float(average[2])
    return {"command": " ".join(command[:1] + command[-1:] + args), "through_cpu_shim": device.type != "cuda",
            "images_per_s": rate,
            "data_wait_per_step_s": float(average[3]), "first_step_s": first_step_s, "wall_s": wall,
            "job_vs_timm": c["images_per_s"] / rate if c else None, "log": str(log_path)}


def measure_scan(o, hp, work: Path) -> list[dict]:
    """scan_channel over 10 class folders of hard links to a few real JPEGs (real files, one inode each)."""
    sources = sorted(p for label in class_folders(o.data / "train") for p in (o.data / "train" / label).iterdir())[:5]
    rows = []
    for size in (int(s) for s in o.scan_sizes.split(",")):
        root = work / f"scan_{size}"
        originals = root / ".originals"  # a hidden folder: scan_channel ignores it
        originals.mkdir(parents=True)
        copies = [Path(shutil.copy(s, originals / f"{i}{s.suffix}")) for i, s in enumerate(sources)]
        for i in range(size):
            folder = root / f"class_{i % 10}"
            folder.mkdir(exist_ok=True)
            os.link(copies[i % len(copies)], folder / f"{i:07d}.jpg")
        started = time.perf_counter()
        channel = scan_channel("train", root, max_unusable_fraction=hp.max_unusable_fraction)
        seconds = time.perf_counter() - started
        rows.append({"files": size, "found": len(channel.samples), "seconds": seconds, "files_per_s": size / seconds})
        shutil.rmtree(root)
    return rows


def environment(device: torch.device) -> dict:
    import timm

    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({cpu})",
            "torch": torch.__version__, "timm": timm.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "git_commit": commit or "unknown",
            "load_average": list(os.getloadavg()), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def report(r: dict) -> None:
    e, a, b, c, d = r["environment"], r.get("model"), r.get("loader"), r.get("job"), r.get("loop")
    print(f"\nseconds per part: {r['part_seconds']}")
    print(f"\n{r['model_name']}, batch {r['batch_size']}, on {e['device']}; torch {e['torch']}, timm {e['timm']}, "
          f"{e['cpu_count']} CPUs, commit {e['git_commit']}, load average {e['load_average'][0]:.2f}")
    if a:
        print(f"(a) model step, synthetic {a['input_size']} {a['precision']}: {a['images_per_s']:.1f} images/s, "
              f"{a['ops_per_step']} operations dispatched per step; the {a['warmup_steps']} steps before took "
              f"{a['warmup_s']:.1f} s{' (cuDNN timing its kernels)' if a['cudnn_benchmark'] else ''}" +
              (f"; peak GPU {a['peak_gpu_allocated_gib']:.2f} GiB allocated, {a['peak_gpu_reserved_gib']:.2f} reserved"
               if "peak_gpu_allocated_gib" in a else ""))
        if "clip" in a:
            k = a["clip"]
            print(f"    clipping ({k['mode']} {k['clip_grad']}): {100 * k['share_of_step']:.1f}% of the step; without it "
                  f"{k['unclipped_images_per_s']:.1f} images/s, {k['unclipped_ops_per_step']} operations (clipped "
                  f"again after: {k['clipped_again_images_per_s']:.1f} images/s)")
        if "compile" in a:
            k = a["compile"]
            print(f"    torch.compile ({k['mode']}): {k['images_per_s']:.1f} images/s after {k['compile_overhead_s']:.1f} s of "
                  f"compiling; breaks even after {k['break_even_images'] or float('inf'):.0f} images; "
                  f"20 epochs of 10k images: {k['net_saving_s_20_epochs_of_10k']:+.0f} s saved")
    if b:
        print(f"(b) loader, {b['train_images']} images (data/train repeated) at {b['input_size']}:\n"
              f"    workers  images/s  per worker  first batch")
        for row in b["rows"]:
            print(f"    {row['workers']:>7}  {row['images_per_s']:8.1f}  {row['per_worker_images_per_s']:10.1f}  "
                  f"{row['first_batch_s']:9.2f}s{'  (default workers)' if row['default'] else ''}")
        if a:  # below 1, the default loader cannot keep the model busy: the job waits on JPEGs
            default = next(row for row in b["rows"] if row["default"])
            print(f"    default workers deliver {default['images_per_s'] / a['images_per_s']:.2f} x what (a) consumes")
    if c:
        ratio = f" = {c['vs_model']:.2f} x (a)" if c["vs_model"] else ""
        first = f"{c['first_step_s']:.1f} s" if c["first_step_s"] is not None else "?"
        print(f"(c) job: last epoch {c['images_per_s']:.1f} images/s{ratio} (epochs: "
              f"{', '.join(f'{x:.1f}' for x in c['epoch_images_per_s'])}); wall {c['wall_s']:.1f} s; "
              f"first step after {first} ({c['first_step_source']})" +
              (f"; first epoch's extra {c['first_epoch_extra_s']:.1f} s" if c.get("first_epoch_extra_s") else ""))
        if c.get("first_step_phases_s"):
            print("    start-up: " + ", ".join(f"{phase} {s:.1f} s" for phase, s in c["first_step_phases_s"].items()))
        print(f"    peak memory of the job and its workers: RSS sum {c['peak_tree_rss_gib']:.2f} GiB, PSS sum "
              f"{c['peak_tree_pss_gib']:.2f} GiB (shared pages once; every {PSS_EVERY_S:.0f} s); "
              f"main VmHWM {c['peak_main_vmhwm_gib']:.2f} GiB; "
              f"GPU: {c['peak_gpu_memory']}")
        if "last_epoch_cpu_cores" in c:
            k = c["last_epoch_cpu_cores"]
            print(f"    CPU cores busy in the last epoch: main thread {k['main_thread']:.2f} (1.00: the GPU waits on "
                  f"Python), main process {k['main_process']:.2f}, loader workers {k['workers']:.2f}; the main thread "
                  f"waited for a free core {100 * k['main_thread_waiting_for_a_core']:.0f}% of the time")
        if "last_epoch_data_wait_s" in c:
            print(f"    the last epoch's training loop waited {c['last_epoch_data_wait_s']:.1f} s of its "
                  f"{c['last_epoch_training_s']} s for the loader's next batch")
    if d:
        print(f"(d) the job's step, {d['steps']} steps fed by each source ({d['workers']} workers):\n"
              f"    source           images/s  waiting for data  main thread busy  waiting for a core")
        for name, row in d.items():
            if isinstance(row, dict):
                print(f"    {name:<15} {row['images_per_s']:9.1f}  {row['data_wait_s']:15.2f}s  "
                      f"{row['main_thread_cpu']:16.2f}  {100 * row['main_thread_waiting_for_a_core']:17.0f}%")
    if r.get("timm"):
        t = r["timm"]
        against = f"; (c) ran {t['job_vs_timm']:.2f} x as fast" if t["job_vs_timm"] else ""
        print(f"timm's train.py, same images and settings: last epoch {t['images_per_s']:.1f} images/s{against}; "
              f"its loop waited {t['data_wait_per_step_s']:.3f} s per step for data; first step logged after "
              f"{t['first_step_s'] or 0:.1f} s\n    {t['command']}" +
              ("\n    (through TIMM_TRAIN_ON_CPU, which only points it at the CPU)" if t["through_cpu_shim"] else ""))
    for row in r.get("scan", []):
        print(f"scan_channel {row['files']:>7} files: {row['seconds']:6.2f} s, {row['files_per_s']:8.0f} files/s")
    busiest = max(r["load_before"], e["load_average"][0])
    if busiest > 0.5 * e["cpu_count"]:  # other processes' OpenMP threads and ours fight for the cores
        print(f"WARNING: load average {busiest:.1f} on {e['cpu_count']} CPUs: other work was running, the CPU "
              f"timings are unreliable (with contention, 2 OpenMP threads on 2 cores can run 10x slower)")


def main(argv=None) -> int:
    o = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hp = product_hyperparameters(o)
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="benchmark-speed-"))
    result = {"model_name": hp.model, "batch_size": hp.batch_size, "options": {k: str(v) for k, v in vars(o).items()}}
    weights = write_random_weights(hp.model, work / "weights" / f"{hp.model}.pth")
    measurements = {"model": lambda: measure_model(o, hp, weights, class_folders(o.data / "train"), device),
                    "loader": lambda: measure_loader(o, hp, device),
                    "job": lambda: measure_job(o, weights, work, result.get("model", {}).get("images_per_s")),
                    "scan": lambda: measure_scan(o, hp, work),
                    "loop": lambda: measure_loop(o, hp, weights, class_folders(o.data / "train"), device),
                    "timm": lambda: measure_timm(o, hp, weights, work, device, result.get("job"))}
    result["part_seconds"] = {}
    for part, measure in measurements.items():
        if part in o.parts:
            started = time.perf_counter()
            result[part] = measure()
            result["part_seconds"][part] = round(time.perf_counter() - started, 1)
            # At once, and saved: a run stopped by a time limit still keeps the parts it finished.
            print(f"[{part}: {result['part_seconds'][part]} s] {json.dumps(result[part])[:600]}", flush=True)
            if o.json:
                o.json.write_text(json.dumps(result, indent=2))
            if device.type == "cuda":
                torch.cuda.empty_cache()  # (c)'s process needs the GPU memory that (a) held
    result["environment"] = environment(device)  # load average at the end: what the timings ran beside
    result["load_before"] = load_before
    report(result)
    if o.json:
        o.json.write_text(json.dumps(result, indent=2))
    for heavy in (work / "weights", work / "opt_ml"):  # random weights and a model nobody needs: ~200 MB a run
        shutil.rmtree(heavy, ignore_errors=True)
    print(f"job logs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
