"""The per-epoch metric line, and the regexes SageMaker uses to read it from the log."""

from __future__ import annotations

import re

TRAIN_LOSS, VAL_LOSS, VAL_ACC_1, VAL_ACC_5 = "train:loss", "validation:loss", "validation:acc_1", "validation:acc_5"
VAL_MAP = "validation:mAP"  # several labels an image: mean average precision, instead of acc_1 and acc_5
METRIC_NAMES = (TRAIN_LOSS, VAL_LOSS, VAL_ACC_1, VAL_ACC_5, VAL_MAP)
# SageMaker takes the regex's first group as the value: it must be a plain decimal, never 1e-05.
NUMBER = r"([0-9]+\.[0-9]+)"


def metric_line(values: dict[str, float]) -> str:
    return " ".join(f"{name}={values[name]:.6f}" for name in METRIC_NAMES if name in values)


def metric_definitions() -> list[dict[str, str]]:
    """MetricDefinitions of the CreateAlgorithm request (and of an Estimator)."""
    return [{"Name": name, "Regex": re.escape(name) + "=" + NUMBER} for name in METRIC_NAMES]
