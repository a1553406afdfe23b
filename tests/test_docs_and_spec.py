"""The README table and container/algorithm-spec.json are generated from the schema and stay in step."""

from __future__ import annotations

import json
import re
import subprocess
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
    assert training["SupportedTuningJobObjectiveMetrics"] == [{"Type": "Maximize", "MetricName": "validation:acc_1"},
                                                             {"Type": "Maximize", "MetricName": "validation:mAP"}]
    assert {c["Name"]: c["IsRequired"] for c in training["TrainingChannels"]} == {"train": True, "val": False, "model": False,
                                                                                   "pretrained": False}


def test_metric_regexes_take_plain_decimals_only():
    line = metrics.metric_line({name: value for name, value in zip(metrics.METRIC_NAMES, (0.00001, 2.5, 91.5, 100, 88.25))})
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


# ---- the spec against AWS's own request shape (botocore's SageMaker service model) ----------------

ECR_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/efficientnet-train:0.1.0"


def filled_spec() -> dict:
    """The spec as the registering script fills it: plausible image URIs, role and S3 locations."""
    text = spec.render()
    for placeholder, value in ((spec.TRAINING_IMAGE_PLACEHOLDER, ECR_IMAGE), (spec.INFERENCE_IMAGE_PLACEHOLDER, ECR_IMAGE),
                               (spec.VALIDATION_ROLE_PLACEHOLDER, "arn:aws:iam::123456789012:role/SageMakerRole"),
                               (spec.VALIDATION_DATA_PLACEHOLDER, "s3://my-bucket/hymenoptera_data"),
                               (spec.VALIDATION_OUTPUT_PLACEHOLDER, "s3://my-bucket/validation")):
        assert placeholder in text
        text = text.replace(placeholder, value)
    assert not re.search(r'"<[A-Z_]+>|<[A-Z_]+_URI>', text), "a placeholder is left"
    return json.loads(text)


def create_algorithm_shape():
    import botocore.session

    return botocore.session.get_session().get_service_model("sagemaker").operation_model("CreateAlgorithm").input_shape


def test_spec_passes_botocores_parameter_validation():
    from botocore.validate import ParamValidator

    report = ParamValidator().validate(filled_spec(), create_algorithm_shape())
    assert not report.has_errors(), report.generate_report()
    # the validator is live: a spec that breaks the shape is reported
    broken = filled_spec()
    broken["TrainingSpecification"]["SupportedHyperParameters"][0]["IsTunable"] = "yes"
    del broken["TrainingSpecification"]["TrainingChannels"][0]["SupportedInputModes"]
    report = ParamValidator().validate(broken, create_algorithm_shape()).generate_report()
    assert "IsTunable" in report and "SupportedInputModes" in report


def shape_problems(value, shape, path="") -> list[str]:
    """The service model's limits that botocore's validator leaves to the service: maximum lengths and
    counts, enums, and patterns (those Python's re can read; the \\p{...} ones allow any printable text)."""
    problems = []
    limit = shape.metadata.get("max")
    if shape.type_name == "structure":
        for name, member in shape.members.items():
            if name in value:
                problems += shape_problems(value[name], member, f"{path}.{name}")
    elif shape.type_name == "list":
        if limit is not None and len(value) > limit:
            problems.append(f"{path}: {len(value)} items, at most {limit}")
        for i, item in enumerate(value):
            problems += shape_problems(item, shape.member, f"{path}[{i}]")
    elif shape.type_name == "string":
        if limit is not None and len(value) > limit:
            problems.append(f"{path}: {len(value)} characters, at most {limit}")
        if shape.enum and value not in shape.enum:
            problems.append(f"{path}: {value!r} is not one of the model's values")
        pattern = shape.metadata.get("pattern")
        if pattern and "\\p{" not in pattern and not re.fullmatch(pattern, value):
            problems.append(f"{path}: {value!r} does not match {pattern}")
    return problems


def test_spec_keeps_the_limits_that_botocore_leaves_to_the_service():
    body = filled_spec()
    assert shape_problems(body, create_algorithm_shape()) == []
    # the walker reads the model's limits (100 hyperparameters, 40 metrics, 30 values, 500-character regexes)
    training = create_algorithm_shape().members["TrainingSpecification"]
    assert training.members["SupportedHyperParameters"].metadata["max"] == 100
    assert training.members["MetricDefinitions"].metadata["max"] == 40
    assert training.members["MetricDefinitions"].member.members["Regex"].metadata["max"] == 500
    bad = filled_spec()
    bad["AlgorithmName"] = "efficientnet_image_classifier"
    bad["TrainingSpecification"]["SupportedTrainingInstanceTypes"].append("ml.x9.huge")
    opt = next(h for h in bad["TrainingSpecification"]["SupportedHyperParameters"] if h["Name"] == "opt")
    opt["Range"]["CategoricalParameterRangeSpecification"]["Values"] = [f"opt{i}" for i in range(31)]
    assert len(shape_problems(bad, create_algorithm_shape())) == 3


def test_spec_is_consistent_where_the_service_model_cannot_say():
    training = filled_spec()["TrainingSpecification"]
    names = [h["Name"] for h in training["SupportedHyperParameters"]]
    assert len(names) == len(set(names))
    metric_names = {m["Name"] for m in training["MetricDefinitions"]}
    assert {m["MetricName"] for m in training["SupportedTuningJobObjectiveMetrics"]} <= metric_names
    for metric in training["MetricDefinitions"]:
        assert re.compile(metric["Regex"]).groups == 1
    for hp in training["SupportedHyperParameters"]:
        assert not (hp["IsRequired"] and "DefaultValue" in hp), "a hyperparameter with a default cannot be required"
        ranges = hp.get("Range", {})
        if hp["Type"] == "Categorical":
            assert hp["DefaultValue"] in ranges["CategoricalParameterRangeSpecification"]["Values"], hp["Name"]
        elif hp["Type"] in ("Integer", "Continuous"):
            allowed = ranges[f"{hp['Type']}ParameterRangeSpecification"]
            # img_size's 0 (the model's own) is outside its range: the job uses it when SageMaker sends nothing.
            default = hp.get("DefaultValue", allowed["MinValue"])
            assert float(allowed["MinValue"]) <= float(default) <= float(allowed["MaxValue"]), hp["Name"]
    # the SDK refuses instance_count > 1 for an algorithm that does not declare it
    assert training["SupportsDistributedTraining"] is True
    channels = {c["Name"]: c for c in training["TrainingChannels"]}
    for name, required in (("train", True), ("val", False)):  # without val the job holds images out of train
        assert channels[name]["IsRequired"] is required
        assert set(channels[name]["SupportedInputModes"]) == {"File", "FastFile", "Pipe"}  # Pipe: Ground Truth
        assert {"image/jpeg", "application/x-recordio"} <= set(channels[name]["SupportedContentTypes"])


def test_validation_profile_fits_the_algorithm_it_validates():
    body = filled_spec()
    training, inference = body["TrainingSpecification"], body["InferenceSpecification"]
    assert body["CertifyForMarketplace"] is True  # listing needs a validation that succeeded
    (profile,) = body["ValidationSpecification"]["ValidationProfiles"]
    job = profile["TrainingJobDefinition"]
    assert job["ResourceConfig"]["InstanceType"] in training["SupportedTrainingInstanceTypes"]
    assert {c["ChannelName"] for c in job["InputDataConfig"]} == {"train", "val"}
    assert set(job["HyperParameters"]) <= {h["Name"] for h in training["SupportedHyperParameters"]}
    hyperparameters.parse(job["HyperParameters"])  # the job itself would accept them
    transform = profile["TransformJobDefinition"]
    assert transform["TransformResources"]["InstanceType"] in inference["SupportedTransformInstanceTypes"]
    assert transform["TransformInput"]["ContentType"] in inference["SupportedContentTypes"]
    assert transform["TransformOutput"]["Accept"] in inference["SupportedResponseMIMETypes"]


def test_free_text_hyperparameters_are_not_tunable():
    """A tuning job searches numeric ranges and category lists; CreateAlgorithm must not offer free text."""
    free_text = [h for h in hyperparameters.sagemaker_hyperparameter_specs() if h["Type"] == "FreeText"]
    assert free_text and not [h["Name"] for h in free_text if h["IsTunable"]]


# ---- the documents stand alone ------------------------------------------------------------------------------

def tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    return [REPO / name for name in listed.split("\0") if name and (REPO / name).is_file()]


def markdown_anchors(text: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (outside code blocks)."""
    anchors, in_code = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"#{1,6} ", line):
            heading = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", heading).replace(" ", "-"))
    return anchors


def test_no_file_points_outside_the_repository():
    outside = re.compile(r"GUIDE\.md|\.\./shared|shared/(datasets|reference)|On these machines")
    offenders = []
    for path in tracked_files():
        if path.suffix in (".png", ".jpg", ".gz", ".pth") or path.name == "test_docs_and_spec.py":
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if outside.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    assert not offenders, "\n".join(offenders)


def test_every_relative_link_in_the_markdown_resolves():
    broken = []
    for path in [p for p in tracked_files() if p.suffix == ".md"]:
        text = path.read_text()
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{path.relative_to(REPO)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in markdown_anchors(linked.read_text()):
                broken.append(f"{path.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_readme_is_short_and_every_doc_says_who_it_is_for():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250
    for doc in sorted((REPO / "docs").glob("*.md")):
        first_paragraph = doc.read_text().split("\n\n")[1]
        assert first_paragraph.startswith("For "), doc.name


def test_the_repository_map_names_every_module_and_script():
    """docs/repository.md is where a newcomer starts: a room it does not list is a room nobody finds."""
    text = (REPO / "docs" / "repository.md").read_text()
    listed = set(re.findall(r"`([\w./-]+)`", text))
    missing = [f"efficientnet_train/{p.name}" for p in (REPO / "efficientnet_train").glob("*.py")
               if p.name != "__init__.py" and f"efficientnet_train/{p.name}" not in listed and p.name not in listed]
    missing += [f"{folder}/{p.name}" for folder in ("scripts", "benchmarks") for p in (REPO / folder).iterdir()
                if p.suffix in (".py", ".sh") and p.name not in listed and not p.name.startswith("aws_")]
    assert not missing, f"docs/repository.md does not list {missing}"
    readme = (REPO / "benchmarks" / "README.md").read_text()
    assert not [p.name for p in (REPO / "benchmarks").iterdir() if p.suffix in (".py", ".sh") and p.name not in readme]
