"""Probabilities a buyer can threshold on: temperature scaling and its measure, top-label ECE.

A fine-tuned network's softmax is rarely calibrated: label smoothing makes it under-confident, a
long fine-tune over-confident. Temperature scaling (Guo et al., ICML 2017) divides the log
probabilities by one number fitted on the validation set; it is monotone within each image's row,
so no prediction changes, only how sure it says it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ECE_BINS = 10
# A fitted temperature outside these says the validation set is degenerate (every answer right, or one
# image), not that the model needs it.
TEMPERATURE_RANGE = (0.01, 100.0)
CHANCE_DRAWS = 1000  # draws of ece_by_chance: its 90th percentile to about +-0.005 on 57 images
CHANCE_WORK = 2 * 10**7  # answers drawn in all: 1,000 draws up to 20,000 images, fewer (never under 100) above
CHANCE_CHUNK = 10**7  # answers drawn at once (one draw at a time above this many images)


def calibrated(log_probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log probabilities at a temperature: each row's log probabilities divided by it, normalised again.
    For a plain softmax that is softmax(logits / T); for a mirror-averaged prediction it scales the average,
    so the argmax stays the average's."""
    if temperature == 1.0:
        return log_probabilities
    return (log_probabilities.float() / temperature).log_softmax(dim=1)


def fit_temperature(log_probabilities: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature that minimises the negative log likelihood of `targets`, by LBFGS on its logarithm."""
    log_probabilities, targets = log_probabilities.detach().float().cpu(), targets.detach().cpu()
    if len(targets) == 0:
        return 1.0
    temperature = minimising_temperature(lambda t: F.nll_loss((log_probabilities / t).log_softmax(dim=1), targets))
    right = int((log_probabilities.argmax(dim=1) == targets).sum())
    return no_surer_than(temperature, right, len(targets),
                         lambda t: float((log_probabilities / t).softmax(dim=1).max(dim=1).values.mean()))


def no_surer_than(temperature: float, right: int, answers: int, mean_confidence) -> float:
    """With every validation answer right the likelihood wants certainty (T -> 0); claim no more than Laplace's
    rule of succession allows for `right` of `answers`, (k + 1) / (n + 2), as the mean confidence
    (`mean_confidence(t)`, falling as t rises): the lowest temperature that keeps to it, if `temperature` does not."""
    most = (right + 1) / (answers + 2)
    if mean_confidence(temperature) <= most:
        return temperature
    sharper, softer = temperature, TEMPERATURE_RANGE[1]
    for _ in range(40):
        middle = (sharper * softer) ** 0.5
        sharper, softer = (middle, softer) if mean_confidence(middle) > most else (sharper, middle)
    return softer


def minimising_temperature(loss_at) -> float:
    """The temperature in TEMPERATURE_RANGE that minimises `loss_at(temperature)`, by LBFGS on its logarithm; 1 if
    the loss is not finite."""
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = loss_at(log_t.exp())
        value.backward()
        return value

    optimizer.step(loss)
    temperature = float(log_t.detach().exp().clamp(*TEMPERATURE_RANGE))
    return temperature if torch.isfinite(torch.tensor(temperature)) else 1.0


def top_label(log_probabilities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's top probability (float32, on the CPU) and its class."""
    return log_probabilities.detach().float().cpu().exp().max(dim=1)


def bin_of(confidence: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """Each confidence's equal-width bin, the top one closed: the ECEs' bins."""
    return (confidence.float() * bins).long().clamp(max=bins - 1)


def top_label_ece(log_probabilities: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top label: over `bins` equal-width bins of the top probability, the
    share of images in each bin times the gap between their accuracy and their mean top probability."""
    confidence, predicted = top_label(log_probabilities)
    return binned_ece(confidence, (predicted == targets.cpu()).float(), bins)


def binned_ece(probability: torch.Tensor, outcome: torch.Tensor, bins: int = ECE_BINS) -> float:
    """The expected calibration error of probabilities said for 0/1 outcomes: over equal-width bins of the
    probability, the share of them in each bin times the gap between how often the outcome is 1 and their mean."""
    which = bin_of(probability, bins)
    gap = torch.bincount(which, weights=outcome.float() - probability.float(), minlength=bins)
    return float(gap.abs().sum() / max(len(probability), 1))


def calibrate(log_probabilities: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict:
    """The temperature that calibrates a model's validation answers, and what it changes: plain numbers, for
    args.yml and the checkpoint."""
    temperature = fit_temperature(log_probabilities, targets)
    scaled = calibrated(log_probabilities, temperature)
    confidence = top_label(scaled)[0]
    per_class = torch.bincount(targets, weights=confidence, minlength=num_classes) / \
        torch.bincount(targets, minlength=num_classes).clamp(min=1)
    chance_mean, chance_p90 = ece_by_chance(confidence)
    return {"temperature": temperature, "ece_before": top_label_ece(log_probabilities, targets),
            "ece_after": top_label_ece(scaled, targets), "ece_by_chance": chance_mean, "ece_by_chance_p90": chance_p90,
            "loss_after": float(F.nll_loss(scaled, targets)) if len(targets) else float("nan"),
            "per_class_confidence": per_class.tolist()}


def ece_by_chance(confidence: torch.Tensor) -> tuple[float, float]:
    """The top-label ECE that a perfectly calibrated model with these (calibrated) top-label confidences shows on as
    many images by chance: the mean and the 90th percentile of chance_eces. A measured ECE under the 90th
    percentile cannot be told from sampling on this validation set (which does not show that the model is
    calibrated, only that these images cannot show otherwise)."""
    eces = chance_eces(confidence)
    return (float(eces.mean()), float(eces.quantile(0.9))) if len(eces) else (0.0, 0.0)


def chance_eces(confidence: torch.Tensor, bins: int = ECE_BINS, draws: int = CHANCE_DRAWS,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Consistency resampling (Broecker and Smith 2007): in each draw every answer is right with exactly its
    confidence; each draw's top-label ECE, in top_label_ece's bins. Seeded unless given a generator: the same
    confidences, the same draws. Empty for no images."""
    confidence = confidence.detach().float().cpu()
    n = len(confidence)
    if n == 0:
        return torch.zeros(0)
    which = bin_of(confidence, bins)
    generator = generator or torch.Generator().manual_seed(0)
    draws = max(100, min(draws, CHANCE_WORK // n))
    per_chunk = max(1, CHANCE_CHUNK // n)
    eces = []
    for start in range(0, draws, per_chunk):
        gaps = (torch.rand(min(per_chunk, draws - start), n, generator=generator) < confidence).float() - confidence
        eces.append(torch.zeros(len(gaps), bins).index_add_(1, which, gaps).abs().sum(dim=1) / n)
    return torch.cat(eces)
