"""Several labels an image (a channel labelled by a manifest whose labels are lists): what differs from one label
an image, in one place.

Each label is its own yes/no question: independent sigmoid outputs, trained with binary cross-entropy summed over
the labels (timm's BinaryCrossEntropy; a mean over labels would shrink every gradient by the number of labels, and
the learning rates measured for one label an image would barely move a 1,000-label head). A model is judged by
mean average precision over the labels (mAP, threshold-free, what multi-label benchmarks report) and, at each
label's threshold (the one that maximises its F1 on validation, stored in the model), by micro and macro F1.
Calibration is one temperature dividing every label's logit, fitted on validation as for one label an image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import report
from .calibration import ECE_BINS, binned_ece, minimising_temperature, no_surer_than


def loss_function(pos_weight: torch.Tensor | None = None) -> torch.nn.Module:
    from timm.loss import BinaryCrossEntropy

    return BinaryCrossEntropy(smoothing=0.0, reduction="none", sum_classes=True, pos_weight=pos_weight)


def positive_weights(positives: torch.Tensor, images: int) -> torch.Tensor:
    """balance_classes=true: each label's positives weighted by its negatives per positive (at least 1, at most 100: a
    label of a few images would otherwise dominate the loss), as BCEWithLogitsLoss's pos_weight."""
    return ((images - positives) / positives.clamp(min=1)).clamp(1.0, 100.0)


def multi_hot(labels: tuple[int, ...], num_classes: int) -> torch.Tensor:
    target = torch.zeros(num_classes)
    target[list(labels)] = 1.0
    return target


def hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """How many answers are right, summed over the batch: for each image, the share of its labels among its k
    highest outputs, k its number of labels (for one label an image, top-1); an image without labels is right
    when no output says yes. The probe's measurements keep this, as they keep top-1 for one label an image (a
    class index a row: top-1 itself)."""
    if targets.dim() == 1:
        return (logits.argmax(dim=1) == targets).sum().float()
    counts = targets.sum(dim=1)
    ranked = logits.float().argsort(dim=1, descending=True).argsort(dim=1)  # each output's rank
    among_top = ((ranked < counts[:, None]) & (targets > 0.5)).sum(dim=1).float()
    return torch.where(counts > 0, among_top / counts.clamp(min=1), (logits <= 0).all(dim=1).float()).sum()


def average_precisions(scores: torch.Tensor, targets: torch.Tensor) -> list[float | None]:
    """Each label's average precision (%): the mean, over its positive images, of the precision among the images
    scored at least as high; None for a label without positives, which AP cannot measure."""
    result = []
    for column, truth in zip(scores.float().T, targets.T > 0.5):
        positives = int(truth.sum())
        if not positives:
            result.append(None)
            continue
        order = column.argsort(descending=True)
        hit = truth[order].float()
        precision = hit.cumsum(0) / torch.arange(1, len(hit) + 1)
        result.append(100 * float((precision * hit).sum() / positives))
    return result


def mean_ap(per_label: list[float | None]) -> float:
    measured = [value for value in per_label if value is not None]
    return sum(measured) / len(measured) if measured else 0.0


def thresholds(probabilities: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Each label's threshold: the probability at or above which an answer says yes that maximises the label's F1
    on these images (halfway to the next lower probability, so a slightly lower score still counts); 0.5 for a
    label without positives."""
    chosen = []
    for column, truth in zip(probabilities.float().T, targets.T > 0.5):
        positives = int(truth.sum())
        if not positives:
            chosen.append(0.5)
            continue
        order = column.argsort(descending=True)
        sorted_scores, hit = column[order], truth[order].float()
        true_positives = hit.cumsum(0)
        f1 = 2 * true_positives / (torch.arange(1, len(hit) + 1) + positives)
        best = int(f1.argmax())
        below = float(sorted_scores[best + 1]) if best + 1 < len(sorted_scores) else 0.0
        chosen.append((float(sorted_scores[best]) + below) / 2)
    return chosen


def label_scores(probabilities: torch.Tensor, targets: torch.Tensor, cut: list[float]) -> list[dict]:
    """Each label's precision, recall and F1 (%, None where undefined) and support at thresholds `cut`."""
    said = probabilities.float() >= torch.tensor(cut)
    truth = targets > 0.5
    scores = []
    for answered, actual in zip(said.T, truth.T):
        tp, predicted, support = int((answered & actual).sum()), int(answered.sum()), int(actual.sum())
        precision = 100 * tp / predicted if predicted else None
        recall = 100 * tp / support if support else None
        f1 = 200 * tp / (predicted + support) if predicted + support else None
        scores.append({"precision": precision, "recall": recall, "f1": f1, "support": support})
    return scores


def micro_f1(probabilities: torch.Tensor, targets: torch.Tensor, cut: list[float]) -> float:
    said, truth = probabilities.float() >= torch.tensor(cut), targets > 0.5
    tp = int((said & truth).sum())
    return 200 * tp / max(int(said.sum()) + int(truth.sum()), 1)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature dividing every logit that minimises the binary cross-entropy on these images, no surer on
    average of each yes or no than the share of them it gets right allows (calibration.no_surer_than)."""
    logits, targets = logits.detach().float().cpu(), targets.detach().float().cpu()
    if len(targets) == 0:
        return 1.0
    temperature = minimising_temperature(lambda t: F.binary_cross_entropy_with_logits(logits / t, targets))
    right = int(((logits > 0) == (targets > 0.5)).sum())

    def mean_confidence(t: float) -> float:
        p = (logits / t).sigmoid()
        return float(torch.maximum(p, 1 - p).mean())

    return no_surer_than(temperature, right, targets.numel(), mean_confidence)


def label_ece(probabilities: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error over every (image, label) probability: in equal-width bins, the share of them
    times the gap between how often the label is there and the mean probability said."""
    return binned_ece(probabilities.float().flatten().cpu(), targets.float().flatten().cpu(), bins)


def calibrate(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """The temperature, the thresholds on the calibrated probabilities, and what they give: plain numbers, for
    args.yml and the checkpoint."""
    temperature = fit_temperature(logits, targets)
    before, after = logits.float().sigmoid(), (logits.float() / temperature).sigmoid()
    cut = thresholds(after, targets)
    scores = label_scores(after, targets, cut)
    return {"temperature": temperature, "ece_before": label_ece(before, targets),
            "ece_after": label_ece(after, targets),
            "loss_after": float(loss_function()(logits.float() / temperature, targets.float()))
            if len(targets) else float("nan"),
            "thresholds": cut, "per_label": scores, "micro_f1": micro_f1(after, targets, cut),
            "macro_f1": report.macro_f1([score for score in scores if score["support"]])}
