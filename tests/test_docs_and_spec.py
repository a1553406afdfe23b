"""The README table and container/algorithm-spec.json are generated from the schema and stay in step."""

from __future__ import annotations

import json
import re
from pathlib import Path

from efficientnet_train import hyperparameters, metrics, spec

REPO = Path(__file__).resolve().parent.parent


def test_committed_spec_is_what_the_schema_generates():
    committed = (REPO / "container" / "algorithm-spec.json").read_text()
    assert committed == spec.render(), "regenerate: python -m efficientnet_train.spec > container/algorithm-spec.json"


def test_spec_declares_every_hyperparameter_and_metric():
    training = json.loads(spec.render())["TrainingSpecification"]
    assert [h["Name"] for h in training["SupportedHyperParameters"]] == [h.name for h in hyperparameters.SCHEMA]
    assert [m["Name"] for m in training["MetricDefinitions"]] == list(metrics.METRIC_NAMES)
    assert training["SupportedTuningJobObjectiveMetrics"] == [{"Type": "Maximize", "MetricName": "validation:acc_1"}]
    assert {c["Name"]: c["IsRequired"] for c in training["TrainingChannels"]} == {"train": True, "val": True, "model": False}


def test_metric_regexes_take_plain_decimals_only():
    line = metrics.metric_line({name: value for name, value in zip(metrics.METRIC_NAMES, (0.00001, 2.5, 91.5, 100))})
    assert "e-" not in line
    for definition in metrics.metric_definitions():
        match = re.search(definition["Regex"], line)
        assert match and float(match.group(1)) >= 0


def test_readme_hyperparameter_table_is_the_generated_one():
    readme = (REPO / "README.md").read_text()
    assert hyperparameters.markdown_table() in readme, \
        "regenerate: python -m efficientnet_train.hyperparameters --markdown"


def test_readme_starts_with_the_two_fresh_machine_commands():
    commands = re.findall(r"^(bash scripts/\S+)", (REPO / "README.md").read_text(), flags=re.M)
    assert commands[:2] == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()
