"""The schema: SageMaker's string values in, checked values or a buyer-readable error out."""

from __future__ import annotations

import re

import pytest

from efficientnet_train import hyperparameters
from efficientnet_train.errors import JobError
from efficientnet_train.hyperparameters import SCHEMA, parse

LISTING_DEFAULTS = {  # the Marketplace listing's names and defaults, as published
    "epochs": 250, "batch_size": 32, "aa": "rand-m9-mstd0.5", "decay_epochs": 2.4, "decay_rate": 0.1,
    "drop": 0.3, "drop_connect": 0.2, "lr": 0.016, "model_ema": True, "model_ema_decay": 0.9999,
    "opt": "rmsproptf", "opt_eps": 0.001, "remode": "pixel", "reprob": 0.2, "sched": "step",
    "warmup_lr": 1e-6, "weight_decay": 1e-5}
# Not kept: the listing's workers=1 starves a GPU; -1 takes them from the CPU count (workers=1 still works).
# auto: opt is sgd (fine-tuning from the linear probe's classifier) and lr goes with it; aa, reprob, drop and
# drop_connect are chosen after the probe, starting from the listing's values (recipe.py).
AUTO_DEFAULTS = ("opt", "lr", "aa", "reprob", "drop", "drop_connect")


def error_of(raw: dict) -> str:
    with pytest.raises(JobError) as info:
        parse(raw)
    return str(info.value)


def test_listing_hyperparameters_keep_their_names_and_defaults():
    resolved, ignored = parse({})
    assert {name: getattr(resolved, name) for name in LISTING_DEFAULTS} == \
        {**LISTING_DEFAULTS, **{name: "auto" for name in AUTO_DEFAULTS}}
    from efficientnet_train.recipe import LISTING

    assert {name: LISTING[name] for name in ("aa", "reprob", "drop", "drop_connect")} == \
        {name: LISTING_DEFAULTS[name] for name in ("aa", "reprob", "drop", "drop_connect")}  # where auto starts
    assert resolved.model == "efficientnet_b3" and resolved.pretrained_path == "" and resolved.img_size == 0
    assert resolved.workers == -1 and parse({"workers": "1"})[0].workers == 1
    assert ignored == []


def test_listing_choices_are_accepted():
    for raw in ({"opt": "sgd"}, {"opt": "rmsproptf"}, {"aa": "v0"}, {"aa": "original"},
                {"aa": "rand-m9-mstd0.5"}, {"aa": "none"}, {"aa": "auto"}, {"remode": "const"}, {"remode": "pixel"},
                {"sched": "step"}):
        parse(raw)


def test_strings_as_sagemaker_sends_them():
    resolved, _ = parse({"epochs": "32", "lr": "1e-5", "model_ema": "false", "drop": "0", "img_size": "64.0",
                         "opt": '"sgd"', "aa": '"rand-m7-mstd0.5"', "batch_size": " 16 "})
    assert (resolved.epochs, resolved.lr, resolved.model_ema, resolved.drop) == (32, 1e-5, False, 0.0)
    assert (resolved.img_size, resolved.opt, resolved.aa, resolved.batch_size) == (64, "sgd", "rand-m7-mstd0.5", 16)


def test_json_typed_values_from_a_hand_written_file():
    resolved, _ = parse({"epochs": 3, "model_ema": False, "lr": 0.5})
    assert (resolved.epochs, resolved.model_ema, resolved.lr) == (3, False, 0.5)


@pytest.mark.parametrize("word, value", [("true", True), ("True", True), ("1", True), ("yes", True),
                                         ("false", False), ("FALSE", False), ("0", False), ("no", False)])
def test_boolean_spellings(word, value):
    assert parse({"model_ema": word})[0].model_ema is value


def test_sagemaker_keys_are_ignored_not_rejected():
    resolved, ignored = parse({"_tuning_objective_metric": "validation:acc_1", "sagemaker_region": '"us-east-1"',
                               "sagemaker_container_log_level": "20"})
    assert sorted(ignored) == ["_tuning_objective_metric", "sagemaker_container_log_level", "sagemaker_region"]


@pytest.mark.parametrize("raw, expected", [
    ({"learning_rate": "0.1"}, "unknown hyperparameter 'learning_rate' = '0.1': did you mean 'lr'?"),
    ({"epoch": "5"}, "did you mean 'epochs'?"),
    ({"zzz": "1"}, "valid names are: epochs, batch_size"),
    ({"epochs": "ten"}, "'epochs' = 'ten' is invalid (not an integer); allowed: an integer from 1 to 10000; "
                        "default 250"),
    ({"epochs": "2.5"}, "(not an integer)"),
    ({"epochs": "0"}, "(out of range); allowed: an integer from 1 to 10000"),
    ({"lr": "-0.1"}, "'lr' = '-0.1' is invalid (out of range); allowed: auto, or a number from 0.000001 to 10"),
    ({"lr": "0"}, "(out of range)"),
    ({"lr": "nan"}, "(not a finite number)"),
    ({"drop": "1"}, "a number from 0 to 0.95"),
    ({"batch_size": "1"}, "an integer from 2 to 4096"),  # BatchNorm cannot train on one image
    ({"epochs": 2.5}, "(not an integer)"),  # a JSON number, not truncated to 2
    ({"model_ema": "maybe"}, "'model_ema' = 'maybe' is invalid (not true or false)"),
    ({"opt": "adamm"}, "'opt' = 'adamm' is invalid (not one of the choices; did you mean adam?); allowed: one of auto, sgd,"),
    ({"sched": "cosin"}, "one of step, cosine"),
    ({"remode": "zero"}, "one of const, rand, pixel"),
    ({"model": "efficientnet_b33"}, "(not a timm EfficientNet model; did you mean efficientnet_b3"),
    ({"model": "resnet50"}, "not a timm EfficientNet model"),
    ({"aa": "rand-foo"}, "timm would ignore the part(s) foo of this policy"),
    ({"aa": "v1"}, "timm cannot parse this augmentation policy"),
    ({"img_size": "16"}, "(out of range); allowed: an integer from 32 to 1024; unset (or 0, outside SageMaker)"),
    ({"pretrained_path": "/weights/b3.onnx"}, "the path of a .pth, .pt, .bin or .safetensors file"),
    ({"freeze_batchnorm": "1.5"}, "'freeze_batchnorm' = '1.5' is invalid (not auto, true, false or a number from 0 "
                                  "to 1); allowed: auto, true, false, or a number from 0 to 1"),
    ({"freeze_batchnorm": "nan"}, "(not auto, true, false or a number from 0 to 1)"),
    ({"freeze_batchnorm": "half"}, "(not auto, true, false or a number from 0 to 1)"),
])
def test_bad_values_name_the_key_the_value_and_what_is_allowed(raw, expected):
    assert expected in error_of(raw)


def test_every_problem_is_reported_at_once():
    message = error_of({"epochs": "x", "lr": "y", "typo_key": "z"})
    assert "'epochs'" in message and "'lr'" in message and "'typo_key'" in message


def test_defaults_pass_their_own_checks():
    for spec in SCHEMA:
        assert spec.parse(hyperparameters.format_value(spec.default)) == spec.default, spec.name


def test_numbers_are_written_as_plain_decimals():
    assert hyperparameters.format_value(1e-6) == "0.000001" and hyperparameters.format_value(1e-5) == "0.00001"
    assert hyperparameters.format_value(0.016) == "0.016" and hyperparameters.format_value(True) == "true"
    for spec in hyperparameters.sagemaker_hyperparameter_specs():
        assert not re.search(r"\de-?\d", spec.get("DefaultValue", "")), spec


def test_choices_ignore_case_as_people_write_optimizer_names():
    resolved, _ = parse({"opt": "AdamW", "sched": "Cosine", "remode": "PIXEL"})
    assert (resolved.opt, resolved.sched, resolved.remode) == ("adamw", "cosine", "pixel")


def test_every_value_the_algorithm_spec_allows_the_job_accepts():
    """SageMaker and the SDK check values against the spec only: a value inside it that the job refused would be
    a launched, paid job (or tuning trial) failing at start-up."""
    for spec in hyperparameters.sagemaker_hyperparameter_specs():
        hp = hyperparameters.BY_NAME[spec["Name"]]
        if spec["Type"] == "Categorical":
            values = spec["Range"]["CategoricalParameterRangeSpecification"]["Values"]
        elif spec["Type"] == "Integer":
            allowed = spec["Range"]["IntegerParameterRangeSpecification"]
            low, high = int(allowed["MinValue"]), int(allowed["MaxValue"])
            values = [str(v) for v in (low, low + 1, (low + high) // 2, high - 1, high)]
        elif spec["Type"] == "Continuous":
            allowed = spec["Range"]["ContinuousParameterRangeSpecification"]
            values = [allowed["MinValue"], allowed["MaxValue"]]
        else:
            continue
        for value in values:
            hp.parse(value)  # raises if refused


@pytest.mark.parametrize("raw, lr", [
    ({}, 0.064),  # sgd with adaptive clipping: the rate measured for fine-tuning from the probe
    ({"opt": "sgd"}, 0.064), ({"opt": "rmsproptf"}, 0.016), ({"opt": "adamw"}, 0.016),
    ({"clip_grad": "0"}, 0.016), ({"clip_mode": "norm"}, 0.016), ({"lr": "0.5"}, 0.5), ({"lr": "auto"}, 0.064)])
def test_lr_auto_goes_with_the_optimizer_and_its_clipping(raw, lr):
    from efficientnet_train.recipe import recipe_for

    resolved, _ = parse(raw)
    recipe = recipe_for(resolved)
    assert recipe.lr == lr and recipe.record()["lr_per_256"] == lr
    assert recipe_for(resolved, {"opt": "sgd", "lr": 9.0}).lr == lr  # one rule, whatever a record says


def test_freeze_batchnorm_is_kept_in_one_spelling_so_a_resumed_job_compares_settings_not_spellings():
    for raw, kept in (("True", "true"), ("1", "true"), ("1.0", "true"), ("-0", "false"), ("FALSE", "false"),
                      (" 0.50 ", "0.5"), (0.5, "0.5"), (True, "true"), ("AUTO", "auto")):
        assert hyperparameters.parse({"freeze_batchnorm": raw})[0].freeze_batchnorm == kept
