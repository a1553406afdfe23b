"""The new classifier's first weights: a logistic regression on the frozen pretrained features (LP-FT).

Fine-tuning from a zero (or random) head spends its first updates learning the head while the
backbone's gradients come from a head that knows nothing, and those early gradients distort the
pretrained features (Kumar et al., "Fine-Tuning can Distort Pretrained Features", ICLR 2022). Fitting the
head first on the frozen features, as a linear probe, and then fine-tuning everything avoids that;
and a job validated from that head on can never end worse than its own linear probe.
"""

from __future__ import annotations

import logging
import math
import time
from types import SimpleNamespace

import torch

from . import distributed
from .checkpoints import stop_here
from .model import set_batchnorm_training

log = logging.getLogger("efficientnet_train")

# At most this many training images a class, and this many in all, go through the network for the probe:
# logistic regression on 1280-1536 features gains little beyond a few hundred a class, and on a set of
# 100,000 images the pass costs a small share of one epoch.
PROBE_IMAGES_PER_CLASS = 200
PROBE_MAX_IMAGES = 10_000
# The measurements after the probe (recipe.py) each score its head on this many of its images, a like number a
# class (one each of as many classes where there are more): each costs a forward pass (two passes over
# hymenoptera's 245 images took 26 s of a 5-epoch run's 245 s on the 2-core CPU), and ~128 images resolve
# 'nine in ten answers kept' to a few points.
MEASURED_IMAGES = 128
LBFGS_ITERATIONS = 300


def probe_sample(samples: list[tuple[str, int]], num_classes: int, seed: int,
                 max_images: int = PROBE_MAX_IMAGES) -> list[int]:
    """Indices of the training images the probe uses (of `samples`): every image of a class up to its quota, else a
    random quota of them, at least one a class but `max_images` in all; the same on every process."""
    quota = max(1, min(PROBE_IMAGES_PER_CLASS, max_images // num_classes))
    by_class: dict[int, list[int]] = {}
    for index, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(index)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for members in by_class.values():
        if len(members) > quota:
            members = [members[i] for i in torch.randperm(len(members), generator=generator)[:quota].tolist()]
        chosen += members
    if len(chosen) > max_images:  # more classes than images allowed: one image of as many classes
        chosen = [chosen[i] for i in torch.randperm(len(chosen), generator=generator)[:max_images].tolist()]
    return sorted(chosen)


@torch.no_grad()
def features_of(model: torch.nn.Module, loader, to_input, autocast, stop=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (what the classifier sees) and labels of every image of the Subset that `loader`'s
    processes share among them, on each process. Interrupted between batches once `stop` is asked for."""
    model.eval()
    device = next(model.parameters()).device
    features = [torch.zeros(0, model.get_classifier().in_features, device=device)]
    labels = [torch.zeros(0, dtype=torch.long, device=device)]
    for images, targets in loader:
        stop_here(stop)
        with autocast():
            features.append(model.forward_head(model.forward_features(to_input(images)), pre_logits=True).float())
        labels.append(targets.to(device))
    return (distributed.rows_of_all(torch.cat(features), loader.dataset),
            distributed.rows_of_all(torch.cat(labels), loader.dataset))


def fit_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, loss_fn, stop=None) -> SimpleNamespace:
    """Multinomial logistic regression by full-batch LBFGS: the training loss (label smoothing and class weights
    included, so fine-tuning starts at its own optimum for the head) plus an L2 penalty of 1/n, as
    scikit-learn's LogisticRegression (C=1) regularises, on the features as the network makes them. Not
    standardised: a feature with little spread in the probe's images would get a weight that fine-tuning
    blows up as soon as it varies (timm's tiny test model overflowed in its first epoch)."""
    features, labels = features.float(), labels.long()
    mean = features.mean(dim=0)  # centred, for LBFGS's sake only: the unpenalised bias takes the mean back
    centred = features - mean
    weight = torch.zeros(num_classes, features.shape[1], device=features.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=features.device, requires_grad=True)
    l2 = 1.0 / len(labels)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=LBFGS_ITERATIONS, history_size=20,
                                  line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        stop_here(stop)  # each of up to LBFGS_ITERATIONS evaluations: seconds at 1,000 classes on a CPU
        optimizer.zero_grad()
        loss = loss_fn(centred @ weight.T + bias, labels) + l2 / 2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    with torch.no_grad():
        weight, bias = weight.detach(), bias.detach() - weight.detach() @ mean
        loss = float(loss_fn(features @ weight.T + bias, labels))
    if not math.isfinite(loss):  # never the case with finite features; a zero head is then the safe start
        weight.zero_(), bias.zero_()
    return SimpleNamespace(weight=weight, bias=bias, loss=loss)


def fit_linear_probe(model: torch.nn.Module, loader, to_input, autocast, num_classes: int, loss_fn,
                     stop=None, stop_by_batch=None) -> SimpleNamespace:
    """Put a linear probe in `model`'s classifier, the same on every process; returns its training loss, its
    top-1 (%) on the images it was fitted on, how many they were and the time it took. Interrupted within a batch
    or an LBFGS step by `stop_by_batch`, between the phases by `stop` (one that all processes agree on)."""
    started = time.monotonic()
    features, labels = features_of(model, loader, to_input, autocast, stop_by_batch)
    stop_here(stop)
    extracted = time.monotonic()
    log.info("Linear probe: fitting the classifier on %d features of %d images (logistic regression)",
             features.shape[1], len(labels))
    head = fit_head(features, labels, num_classes, loss_fn, stop_by_batch)
    stop_here(stop)
    classifier = model.get_classifier()
    with torch.no_grad():
        classifier.weight.copy_(head.weight)
        classifier.bias.copy_(head.bias)
    distributed.broadcast_tensors([classifier.weight, classifier.bias])  # LBFGS may round apart on other GPUs
    fitted_top1 = 100 * float((classifier(features).argmax(dim=1) == labels).float().mean())
    return SimpleNamespace(loss=head.loss, top1=fitted_top1, images=len(labels), features=features.shape[1],
                           extract_seconds=extracted - started, fit_seconds=time.monotonic() - extracted)


@torch.no_grad()
def probe_top1(model: torch.nn.Module, loader, to_input, autocast, batch_statistics: bool = False,
               dropout: bool = False, stop=None) -> float | None:
    """Top-1 (%) of `model` on `loader`'s images (over every process), in evaluation mode, or with BatchNorm
    normalising each batch by its own statistics, or with dropout and drop-connect on, as a training step does;
    BatchNorm's running averages are left as they were. None if no batch had the two images BatchNorm on batch
    statistics needs."""
    saved = [buffer.clone() for buffer in model.buffers()]
    model.train(dropout)
    set_batchnorm_training(model, batch_statistics)
    device = next(model.parameters()).device
    counts = torch.zeros(2, device=device)
    for images, targets in loader:
        stop_here(stop)  # the model's state is restored only by finishing: a stopped job saves nothing of it
        if len(targets) > 1 or not batch_statistics:
            with autocast():
                logits = model(to_input(images))
            counts[0] += (logits.argmax(dim=1) == targets.to(device)).sum()
            counts[1] += len(targets)
    for buffer, value in zip(model.buffers(), saved):
        buffer.copy_(value)
    model.eval()
    right, seen = distributed.sum_over_ranks(counts).tolist()
    return 100 * right / seen if seen else None


