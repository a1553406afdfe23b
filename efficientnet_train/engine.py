"""The epoch loop and evaluation: one pass of training over the loader, one update, and the validation pass that
scores every candidate model at once."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed, hyperparameters, multilabel, report
from .checkpoints import Progress
from .stopping import Interrupted, StopRequest
from .data import Loader, ModelInput
from .errors import JobError
from .model import predict_label_logits, predict_log_probabilities, set_batchnorm
from .optimisation import clip_gradients
from .resources import SlowDataWarning

log = logging.getLogger("efficientnet_train")


PROGRESS_EVERY_S = 60  # a line within long epochs too, so a buyer sees the job is alive and how fast it goes


def train_one_epoch(model, loader, to_input: ModelInput, loss_fn, optimizer, scheduler, ema, scaler, autocast,
                    progress: Progress, stop: StopRequest, startup: report.StartUp | None = None,
                    slow_data: SlowDataWarning | None = None, frozen_batchnorm: float = 0.0, clip_grad: float = 0.0,
                    clip_mode: str = "agc") -> tuple[float, float]:
    """Train the rest of `progress.epoch` (all of it unless resuming), counting batches in `progress`;
    given the job's start-up so far, say where the time to the first step went. Returns the mean training
    loss and the seconds spent waiting for the loader's next batch (beyond the first; the longest wait of any
    process, as the others wait for the slowest at every step): more than a small share of the epoch means the
    GPU waits on JPEG decoding and augmentation."""
    if startup is not None:
        startup.done("setting up training")
    model.train()
    # The frozen share normalises as the pretrained network did (BatchNorm's scales and shifts still train).
    set_batchnorm(model, frozen_batchnorm)
    loader.batch_sampler.start_epoch(progress.epoch, skip_batches=progress.step)
    device = to_input.device
    loss_sum = torch.tensor(progress.loss_sum, device=device)  # no .item() per step: a sync would stall the GPU
    started, first_step, last_report = time.monotonic(), progress.step, time.monotonic()
    data_wait, asked = 0.0, None  # from the second batch on: the first one waits for the workers to (re)start
    for images, targets in loader:
        if asked is not None:
            data_wait += time.monotonic() - asked
        elif startup is not None:
            startup.done("first batch (the loader's workers starting)")
        images, targets = to_input(images), targets.to(device, non_blocking=True)
        loss = train_step(model, images, targets, loss_fn, optimizer, scaler, autocast, clip_grad, clip_mode)
        progress.step += 1
        num_updates = (progress.epoch - 1) * len(loader) + progress.step
        if ema is not None:
            ema.update(model, step=num_updates)
        scheduler.step_update(num_updates)
        loss_sum += loss.detach() * len(targets)
        progress.seen += len(targets)
        if startup is not None:
            loss.item()  # waits for the GPU, once
            startup.done("first step (CUDA loading and cuDNN timing the kernels)" if device.type == "cuda"
                         else "first step")
            log.info(startup.line())
            startup = None
        if time.monotonic() - last_report >= PROGRESS_EVERY_S:
            last_report = time.monotonic()
            rate = (progress.step - first_step) * len(targets) / (last_report - started)
            log.info("epoch %d: %d/%d batches, %.1f images/s, waiting for data %.0f%% of the time, epoch's training "
                     "done in ~%s", progress.epoch, progress.step, len(loader), rate,
                     100 * data_wait / (last_report - started),
                     report.duration((len(loader) - progress.step) * len(targets) / max(rate, 1e-6)))
            if slow_data is not None:
                slow_data.check(data_wait, last_report - started, f"epoch {progress.epoch} so far")
        if stop:  # before the next batch is loaded, so a resumed run draws the same random numbers
            progress.loss_sum = loss_sum.item()
            raise Interrupted
        asked = time.monotonic()
    progress.loss_sum = loss_sum.item()
    totals = distributed.sum_over_ranks(torch.tensor([progress.loss_sum, progress.seen], dtype=torch.float64,
                                                     device=device))
    mean_loss = (totals[0] / totals[1].clamp(min=1)).item()
    data_wait = distributed.max_over_ranks(torch.tensor([data_wait], dtype=torch.float64, device=device)).item()
    if not np.isfinite(mean_loss):
        raise JobError(f"Training diverged in epoch {progress.epoch}: the training loss is {mean_loss}. Lower lr "
                       f"(it is scaled to the batch size from a batch of {hyperparameters.LR_REFERENCE_BATCH}) "
                       f"or raise warmup_epochs.")
    return mean_loss, data_wait


def train_step(model, images, targets, loss_fn, optimizer, scaler, autocast, clip_grad: float = 0.0,
               clip_mode: str = "agc") -> torch.Tensor:
    """One update of the weights on one batch, its gradient clipped first if `clip_grad`; the loss stays on the
    device (reading it would wait for it)."""
    with autocast():
        loss = loss_fn(model(images), targets)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:  # float16: scaled so that small gradients do not underflow
        scaler.scale(loss).backward()
        if clip_grad:
            scaler.unscale_(optimizer)  # clipped as they are, not as scaled
            clip_gradients(model.parameters(), clip_grad, clip_mode)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if clip_grad:
            clip_gradients(model.parameters(), clip_grad, clip_mode)
        optimizer.step()
    return loss


@torch.no_grad()
def evaluate(models: dict[str, torch.nn.Module], loader, to_input: ModelInput, autocast, num_classes: int,
             mirror: bool, stop: StopRequest | None = None, multi_label: bool = False) -> dict[str, Evaluation]:
    """Loss, top-1/top-5 accuracy, confusion matrix and log probabilities of each model on the whole val set (of
    all processes); for several labels an image, loss, mAP and the logits. One pass over the images for all the
    models: decoding them is often the slow part."""
    from timm.utils import accuracy

    device = to_input.device
    top_k = min(5, num_classes)  # top-5 over fewer than 5 classes would fail; it is then over all of them
    for model in models.values():
        model.eval()
    # Per model: loss, top-1 and top-k summed over images, and true x predicted counts; one sync at the end.
    sums = {name: torch.zeros(3, device=device) for name in models}
    confusion = {name: torch.zeros(num_classes * num_classes, dtype=torch.long, device=device) for name in models}
    answers = {name: [torch.zeros(0, num_classes, device=device)] for name in models}  # for calibration
    labels = [torch.zeros(0, num_classes, device=device) if multi_label else torch.zeros(0, dtype=torch.long,
                                                                                          device=device)]
    for images, targets in distributed.stoppable(loader, stop):
        images, targets = to_input(images), targets.to(device, non_blocking=True)
        labels.append(targets)
        for name, model in models.items():
            with autocast():
                if multi_label:
                    answers[name].append(predict_label_logits(model, images, mirror))
                    continue
                log_probabilities = predict_log_probabilities(model, images, mirror)
            answers[name].append(log_probabilities)
            top1, topk = accuracy(log_probabilities, targets, topk=(1, top_k))  # percentages of this batch
            sums[name] += torch.stack([F.nll_loss(log_probabilities, targets, reduction="sum"),
                                       top1 * len(targets), topk * len(targets)])
            confusion[name] += torch.bincount(targets * num_classes + log_probabilities.argmax(dim=1),
                                              minlength=num_classes * num_classes)
    targets = distributed.rows_of_all(torch.cat(labels), loader.dataset).cpu()
    if multi_label:  # every row on every process: the metrics from them, not from sums
        return {name: _multi_label_evaluation(distributed.rows_of_all(torch.cat(answers[name]), loader.dataset).cpu(),
                                              targets) for name in models}
    return {name: _evaluation(distributed.sum_over_ranks(sums[name]), distributed.sum_over_ranks(confusion[name]),
                              num_classes, distributed.rows_of_all(torch.cat(answers[name]), loader.dataset).cpu(),
                              targets) for name in models}


@dataclass(frozen=True)
class Evaluation:
    """One model's results on the whole val set: its loss, top-1 and top-5 (%), top-1 of each class (None for a
    class without images), true x predicted counts, and its log probabilities and the labels, for calibration.
    For several labels an image: top-1 is multilabel.hits' share, top5 and the counts None, per class each label's
    average precision, `mean_ap` their mean, and the logits and multi-hot labels instead."""
    loss: float
    top1: float
    top5: float | None
    per_class: list
    confusion: list | None
    log_probabilities: torch.Tensor
    targets: torch.Tensor
    mean_ap: float | None = None

    @property
    def score(self) -> float:
        """What the best model is chosen by: top-1, or for several labels an image mAP."""
        return self.top1 if self.mean_ap is None else self.mean_ap


def _evaluation(sums: torch.Tensor, confusion: torch.Tensor, num_classes: int, log_probabilities: torch.Tensor,
                targets: torch.Tensor) -> Evaluation:
    loss, top1, top5 = (sums / confusion.sum()).tolist()  # over every image of the val set, once
    confusion = confusion.view(num_classes, num_classes).tolist()
    per_class = [100 * row[index] / sum(row) if sum(row) else None for index, row in enumerate(confusion)]
    return Evaluation(loss=loss, top1=top1, top5=top5, per_class=per_class, confusion=confusion,
                      log_probabilities=log_probabilities, targets=targets)


def _multi_label_evaluation(logits: torch.Tensor, targets: torch.Tensor) -> Evaluation:
    per_label = multilabel.average_precisions(logits, targets)
    images = max(len(targets), 1)
    return Evaluation(loss=float(multilabel.loss_function()(logits, targets)) if len(targets) else 0.0,
                      top1=100 * float(multilabel.hits(logits, targets)) / images, top5=None, per_class=per_label,
                      confusion=None, log_probabilities=logits, targets=targets, mean_ap=multilabel.mean_ap(per_label))


def data_loader(dataset, workers: int, device: torch.device, seed: int, **batching) -> Loader:
    """The job's loaders: pinned memory for the GPU, workers kept from epoch to epoch, and a random generator
    of their own (drawing from the global one would shift it, and a resumed run would differ). The workers leave
    a stop signal sent to the whole process group to the job."""
    return Loader(dataset, num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                  generator=torch.Generator().manual_seed(seed), **batching)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

