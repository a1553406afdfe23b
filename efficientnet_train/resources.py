"""What the machine gives a job and what the job needs of it: disk for its outputs, the batch that fits the
training set, data-loading workers for its cores (and the warning when they are too few), and what the log and
args.yml say about the machine and its software."""

from __future__ import annotations

import logging
import os
import platform
import time

import numpy as np
import torch

from . import __version__, hyperparameters
from .errors import JobError
from .optimisation import create_optimizer
from .recipe import recipe_for

log = logging.getLogger("efficientnet_train")


def output_sizes(hp, num_classes: int) -> tuple[int, int]:
    """The bytes of the best model and of one checkpoint: the weights, their average (EMA), the best model and the
    optimizer's state, from the model on the meta device: no memory, 0.2 s for efficientnet_b3."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(hp.model, num_classes=num_classes)
    weights = tensor_bytes(model.state_dict().values())
    optimizer_state = tensor_bytes(model.parameters()) * optimizer_state_per_weight(hp)
    return weights, weights * (2 + hp.model_ema) + round(optimizer_state)


def optimizer_state_per_weight(hp) -> float:
    """Bytes of optimizer state per byte of weights: 1 for SGD (auto's), 2 for RMSprop and Adam, 3 for MADGRAD, ...
    Measured by one step of the real optimizer on a tiny stand-in model, as the state only exists after a step, and
    some optimizers' steps cannot run on the meta device; a step of efficientnet_l2 itself would take 8 GB."""
    import timm

    stand_in = timm.create_model("test_efficientnet", num_classes=2)
    for weight in stand_in.parameters():
        weight.grad = torch.zeros_like(weight)
    recipe = recipe_for(hp)
    optimizer = create_optimizer(stand_in, hp, hyperparameters.scaled_lr(recipe.lr, hp.batch_size), recipe.opt)
    optimizer.step()
    state = tensor_bytes(value for weight_state in optimizer.state.values() for value in weight_state.values())
    return state / tensor_bytes(stand_in.parameters())


def tensor_bytes(values) -> int:
    return sum(value.numel() * value.element_size() for value in values if torch.is_tensor(value))


def fitted_batch_size(batch_size: int, train_images: int, processes: int = 1) -> int:
    """`batch_size`, or a process's share of the training set where that is smaller: every training step takes a
    full batch in each process (a short last batch would be a noisy step), so a larger batch would never train. A
    small first set with the default batch trains with what there is, saying so; below two images a process (what
    BatchNorm needs to normalise a batch) no batch makes sense, and the job fails."""
    share = train_images // processes
    among = f", shared among {processes} training processes (one per GPU)" if processes > 1 else ""
    if share < 2:
        raise JobError(f"The training set is too small to train on: {train_images} usable images in 'train'{among} "
                       f"leave fewer than 2 a batch, and a training step needs at least 2. Add training images"
                       f"{' or use fewer GPUs' if processes > 1 else ''}.")
    if batch_size > share:
        log.warning("batch_size=%d is larger than the training set (%d usable images in 'train'%s): training with "
                    "batches of %d, the largest that fits (the learning rate scales with it).", batch_size,
                    train_images, among, share)
    return min(batch_size, share)


def data_loading_workers_for(hp, processes_on_this_host: int) -> int:
    """`workers` as given, or for -1 (the default) as many as the cores allow."""
    return hp.workers if hp.workers >= 0 else data_loading_workers(processes_on_this_host)


def data_loading_workers(processes_on_this_host: int) -> int:
    """Every CPU core this job may use, but one for each training process, shared among the processes."""
    return max(usable_cores() // processes_on_this_host - 1, 0)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class SlowDataWarning:
    """Says once, at the first progress line or epoch end that shows it, that training spends more than
    `SHARE` of its time waiting for the loaders' next batch, and what to change: on a GPU that share of the
    bill buys nothing. Within a minute of the first step, not after a long first epoch."""

    SHARE, MIN_SECONDS = 0.1, 1.0

    def __init__(self, workers: int, workers_asked: int, processes_on_this_host: int, gpu: bool, speaks: bool):
        self.workers, self.workers_asked, self.processes, self.gpu = workers, workers_asked, processes_on_this_host, gpu
        self.pending = speaks  # only rank 0 speaks: every rank's loaders are alike

    def check(self, waited: float, seconds: float, what: str) -> None:
        if self.pending and waited > max(self.SHARE * seconds, self.MIN_SECONDS):
            self.pending = False
            log.warning(self.advice(waited, seconds, what))

    def advice(self, waited: float, seconds: float, what: str) -> str:
        idle = "the GPU stood idle" if self.gpu else "training stood still"
        loaders = (f"{self.workers} data-loading worker process{'es' if self.workers > 1 else ''}" if self.workers
                   else "the training process itself (workers=0)")
        said = (f"Training waited for data {waited:.0f} s of the {seconds:.0f} s of {what} ({waited / seconds:.0%}): "
                f"{idle} while {loaders} decoded and augmented images. ")
        possible, cores = data_loading_workers(self.processes), usable_cores()
        host = f"{cores} core{'s' if cores != 1 else ''}, {self.processes} training process" + \
            ("es" if self.processes != 1 else "")
        if self.workers < possible:
            return said + (f"workers={self.workers_asked} is set; set workers=-1 (the default) to use {possible} on "
                           f"this host ({host}).")
        return said + (f"Loading already has every core but one per training process ({host}): choose "
                       f"an instance type with more vCPUs for each GPU, or make each image cheaper to load: aa=none "
                       f"(no RandAugment), a smaller img_size, or images stored nearer the training size (large "
                       f"PNGs are decoded in full; JPEGs already at a reduced scale).")


def process_started_at() -> float:
    """When this process started (its imports included), as time.time() counts."""
    try:
        with open("/proc/self/stat") as f:  # field 22: clock ticks after boot; the name may hold spaces
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.device_count()} x {torch.cuda.get_device_name(0)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    import PIL
    import timm
    import torchvision

    return {"efficientnet_train": __version__, "python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "timm": timm.__version__, "pillow": PIL.__version__,
            "numpy": np.__version__, "cuda": torch.version.cuda or "none"}

