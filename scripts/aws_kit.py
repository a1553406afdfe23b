"""What the AWS scripts share: the CreateAlgorithm spec, its metrics, hyperparameters and tuning ranges.

The scripts (aws_register_algorithm.py, aws_train.py, aws_tune.py, aws_deploy.py) run with the
SageMaker Python SDK v2, e.g. `pip install 'sagemaker==2.257.7'` in any venv (v3 has no
`sagemaker.estimator`); the project's .venv has it too (the `kit` extra). This module needs only the
standard library: everything it knows comes from `container/algorithm-spec.json`, the file that is
registered, so the scripts cannot disagree with the algorithm buyers subscribe to.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPEC_PATH = REPO / "container" / "algorithm-spec.json"
# The placeholders of efficientnet_train/spec.py (this module does not import the package).
TRAINING_IMAGE_PLACEHOLDER = "<TRAINING_IMAGE_URI>"
INFERENCE_IMAGE_PLACEHOLDER = "<INFERENCE_IMAGE_URI>"
VALIDATION_PLACEHOLDERS = ("<VALIDATION_ROLE_ARN>", "<VALIDATION_DATA_S3_URI>", "<VALIDATION_OUTPUT_S3_URI>")
OBJECTIVE_METRIC = "validation:acc_1"
OBJECTIVE_METRICS = (OBJECTIVE_METRIC, "validation:mAP")  # the spec's SupportedTuningJobObjectiveMetrics
DEFAULT_TRAINING_INSTANCE = "ml.g4dn.xlarge"
DEFAULT_ENDPOINT_INSTANCE = "ml.m5.xlarge"

# What aws_tune.py searches unless told otherwise: the settings that moved accuracy most in this
# project's measurements (README "Defaults that fine-tune"), each inside the spec's allowed range.
# name: ("Continuous" | "Integer", min, max, scaling) or ("Categorical", [values]).
DEFAULT_TUNING_RANGES = {
    "lr": ("Continuous", 0.016, 0.256, "Logarithmic"),       # per 256 images; auto's 0.064 (sgd) is the middle
    "layer_decay": ("Continuous", 0.7, 1.0, "Linear"),
    "decay_epochs": ("Continuous", 1.0, 10.0, "Linear"),
    "drop": ("Continuous", 0.1, 0.5, "Linear"),
}


def load_spec(path: Path = SPEC_PATH) -> dict:
    return json.loads(Path(path).read_text())


def fill_spec(spec: dict, training_image: str, inference_image: str | None = None,
              validation: tuple[str, str, str] | None = None) -> dict:
    """The CreateAlgorithm request: the spec with its placeholders replaced.

    validation is (role ARN, S3 prefix of sample data holding train/ and val/, S3 output prefix): AWS
    runs the spec's validation profile with them, and only a validated algorithm can be listed on the
    Marketplace. Without it the request has no ValidationSpecification and is not certified for the
    Marketplace: an algorithm for the seller's own account, e.g. to try the listing's experience first.
    """
    filled = copy.deepcopy(spec)
    filled["TrainingSpecification"]["TrainingImage"] = training_image
    for container in filled["InferenceSpecification"]["Containers"]:
        container["Image"] = inference_image or training_image
    if validation is None:
        filled.pop("ValidationSpecification", None)
        filled["CertifyForMarketplace"] = False
    else:
        text = json.dumps(filled)
        for placeholder, value in zip(VALIDATION_PLACEHOLDERS, validation):
            text = text.replace(placeholder, value.rstrip("/"))
        filled = json.loads(text)
    left = [p for p in (TRAINING_IMAGE_PLACEHOLDER, INFERENCE_IMAGE_PLACEHOLDER, *VALIDATION_PLACEHOLDERS)
            if p in json.dumps(filled)]
    if left:
        raise ValueError(f"placeholders left in the spec: {', '.join(left)}")
    return filled


def metric_definitions(spec: dict | None = None) -> list[dict]:
    return (spec or load_spec())["TrainingSpecification"]["MetricDefinitions"]


def hyperparameter_specs(spec: dict | None = None) -> dict[str, dict]:
    return {h["Name"]: h for h in (spec or load_spec())["TrainingSpecification"]["SupportedHyperParameters"]}


def parse_key_values(pairs: list[str], spec: dict | None = None) -> dict[str, str]:
    """`key=value` words into hyperparameters (strings, as SageMaker passes them), checked against the spec.

    The container checks everything again and explains; this only catches what would waste a job.
    """
    specs = hyperparameter_specs(spec)
    values, problems = {}, []
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            problems.append(f"not key=value: {pair!r}")
        elif name not in specs:
            problems.append(f"unknown hyperparameter {name!r} (known: {', '.join(specs)})")
        else:
            value = _canonical(specs[name], value)
            problem = _out_of_range(specs[name], value)
            if problem:
                problems.append(f"{name}={value}: {problem}")
            values[name] = value
    if problems:
        raise ValueError("; ".join(problems))
    return values


def _canonical(spec: dict, value: str) -> str:
    """SageMaker compares categories exactly, the job ignoring case: opt=AdamW goes out as the spec's adamw."""
    allowed = spec.get("Range", {}).get("CategoricalParameterRangeSpecification", {}).get("Values", ())
    return next((choice for choice in allowed if choice.lower() == value.lower()), value)


def _out_of_range(spec: dict, value: str) -> str | None:
    ranges = spec.get("Range", {})
    if "CategoricalParameterRangeSpecification" in ranges:
        allowed = ranges["CategoricalParameterRangeSpecification"]["Values"]
        return None if value in allowed else f"not one of {', '.join(allowed)}"
    for key, kind in (("IntegerParameterRangeSpecification", int), ("ContinuousParameterRangeSpecification", float)):
        if key in ranges:
            try:
                number = kind(value)
            except ValueError:
                return f"not {'an integer' if kind is int else 'a number'}"
            low, high = float(ranges[key]["MinValue"]), float(ranges[key]["MaxValue"])
            return None if low <= number <= high else f"outside {ranges[key]['MinValue']}..{ranges[key]['MaxValue']}"
    return None


def parse_range(text: str) -> tuple[str, tuple]:
    """`name=min:max[:log]` (a numeric range) or `name=a,b,c` (categorical values)."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"not name=min:max[:log] or name=a,b,c: {text!r}")
    if ":" in rest:
        low, high, *scale = rest.split(":")
        scaling = "Logarithmic" if scale == ["log"] else "Linear"
        if scale not in ([], ["log"], ["linear"]):
            raise ValueError(f"scaling must be log or linear: {text!r}")
        return name, ("Numeric", float(low), float(high), scaling)
    return name, ("Categorical", rest.split(","))


def tuning_ranges(overrides: dict[str, tuple] | None = None, spec: dict | None = None) -> dict[str, tuple]:
    """The ranges to tune, checked against the spec: tunable, of its type, inside its allowed range."""
    specs = hyperparameter_specs(spec)
    ranges = dict(DEFAULT_TUNING_RANGES if overrides is None else overrides)
    checked, problems = {}, []
    for name, wanted in ranges.items():
        hp = specs.get(name)
        if hp is None or not hp["IsTunable"]:
            problems.append(f"{name} is not a tunable hyperparameter of the algorithm")
            continue
        if wanted[0] == "Categorical":
            allowed = hp.get("Range", {}).get("CategoricalParameterRangeSpecification", {}).get("Values")
            if hp["Type"] != "Categorical" or not set(wanted[1]) <= set(allowed or ()):
                problems.append(f"{name}: {wanted[1]} are not among its values {allowed}")
                continue
            checked[name] = ("Categorical", list(wanted[1]))
            continue
        if hp["Type"] not in ("Integer", "Continuous"):
            problems.append(f"{name} is {hp['Type']}, not numeric: give it as {name}=a,b,c")
            continue
        _, low, high, scaling = wanted
        allowed = hp["Range"][f"{hp['Type']}ParameterRangeSpecification"]
        if not float(allowed["MinValue"]) <= low < high <= float(allowed["MaxValue"]):
            problems.append(f"{name}: {low}..{high} is not inside {allowed['MinValue']}..{allowed['MaxValue']}")
            continue
        if scaling == "Logarithmic" and low <= 0:
            problems.append(f"{name}: a logarithmic range needs a minimum above 0")
            continue
        checked[name] = (hp["Type"], int(low) if hp["Type"] == "Integer" else low,
                         int(high) if hp["Type"] == "Integer" else high, scaling)
    if problems:
        raise ValueError("; ".join(problems))
    return checked


def sdk_ranges(ranges: dict[str, tuple]) -> dict:
    """tuning_ranges() as the SDK's parameter objects, for HyperparameterTuner."""
    from sagemaker.parameter import CategoricalParameter, ContinuousParameter, IntegerParameter

    sdk = {}
    for name, (kind, *rest) in ranges.items():
        if kind == "Categorical":
            sdk[name] = CategoricalParameter(rest[0])
        else:
            cls = IntegerParameter if kind == "Integer" else ContinuousParameter
            sdk[name] = cls(rest[0], rest[1], scaling_type=rest[2])
    return sdk


def sagemaker_session(region: str | None = None):
    """An SDK session on the default AWS credentials chain (profile, environment, instance role)."""
    import boto3
    import sagemaker

    return sagemaker.Session(boto_session=boto3.Session(region_name=region))
