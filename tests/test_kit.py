"""The AWS scripts, without AWS: the requests they would send, as botocore would send them.

The scripts run here in-process with the SageMaker Python SDK (the `kit` extra, in the test venv)
on a session whose boto3 clients answer from botocore's Stubber. Every request still goes through
botocore's own parameter validation against the SageMaker service model before the stub answers, and
the tests read each request back and check what matters: the image or algorithm, the metric
definitions, spot training with checkpoints, the channels, the tuning objective and ranges, the
model, endpoint and invocation.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import boto3
import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")

import aws_deploy  # noqa: E402
import aws_kit  # noqa: E402
import aws_register_algorithm  # noqa: E402
import aws_train  # noqa: E402
import aws_tune  # noqa: E402

REGION = "us-east-1"
ACCOUNT = "123456789012"
IMAGE = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/efficientnet-train:0.1.0"
ALGORITHM_ARN = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:algorithm/efficientnet-image-classifier"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/SageMakerRole"
S3 = "s3://my-bucket/hymenoptera_data"
OUTPUT = "s3://my-bucket/efficientnet"
NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)


@functools.lru_cache(maxsize=1)
def _boto_session():
    """One boto3 session for all tests: it loads each service model once (seconds each otherwise)."""
    return boto3.Session(region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing")


class FakeAWS:
    """An SDK session whose sagemaker and sagemaker-runtime clients answer from Stubbers and keep the requests."""

    def __init__(self):
        import sagemaker

        boto = _boto_session()
        self.sm, self.runtime = boto.client("sagemaker"), boto.client("sagemaker-runtime")
        self.requests: list[tuple[str, dict]] = []
        for client in (self.sm, self.runtime):
            # Seen before botocore validates the parameters: a request it rejects fails the test.
            client.meta.events.register("provide-client-params.*.*", self._keep)
        self.sm_stub, self.runtime_stub = Stubber(self.sm), Stubber(self.runtime)
        self.session = sagemaker.Session(boto_session=boto, sagemaker_client=self.sm,
                                         sagemaker_runtime_client=self.runtime)

    def _keep(self, params, model, **_):
        self.requests.append((model.name, copy.deepcopy(params)))

    def answer(self, operation: str, response: dict, runtime: bool = False):
        (self.runtime_stub if runtime else self.sm_stub).add_response(operation, response)

    def request(self, operation: str) -> dict:
        found = [params for name, params in self.requests if name == operation]
        assert len(found) == 1, f"{operation} sent {len(found)} times; requests: {[n for n, _ in self.requests]}"
        return found[0]

    def __enter__(self):
        self.sm_stub.activate()
        self.runtime_stub.activate()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.sm_stub.assert_no_pending_responses()
            self.runtime_stub.assert_no_pending_responses()
        self.sm_stub.deactivate()
        self.runtime_stub.deactivate()


@pytest.fixture(autouse=True)
def offline_sdk(monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # the SDK polls every 5-30 s
    # The SDK reports each fit/deploy to an AWS telemetry URL: not from tests. (Opting out in an SDK
    # config instead costs a second of JSON-schema validation per config lookup, dozens per test.)
    monkeypatch.setattr("sagemaker.telemetry.telemetry_logging._send_telemetry_request", lambda *a, **k: None)


def described_algorithm() -> dict:
    spec = aws_kit.fill_spec(aws_kit.load_spec(), IMAGE)
    return {"AlgorithmName": spec["AlgorithmName"], "AlgorithmArn": ALGORITHM_ARN, "CreationTime": NOW,
            "TrainingSpecification": spec["TrainingSpecification"],
            "InferenceSpecification": spec["InferenceSpecification"], "AlgorithmStatus": "Completed",
            "AlgorithmStatusDetails": {}}


def common_train_args(*extra) -> list[str]:
    return ["--role", ROLE, "--train", f"{S3}/train", "--val", f"{S3}/val", "--output", OUTPUT, *extra]


def channels(request: dict) -> dict[str, dict]:
    return {c["ChannelName"]: c for c in request["InputDataConfig"]}


# ---- push and register ------------------------------------------------------------------


def test_push_script_parses_and_its_dry_run_prints_the_ecr_commands():
    script = REPO / "scripts" / "aws_push_image.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    out = subprocess.run(["bash", str(script), "efficientnet-train:latest", "1.2.3"], check=True, text=True,
                         capture_output=True, env={**os.environ, "DRY_RUN": "1", "REGION": "eu-west-1",
                                                   "ACCOUNT": ACCOUNT, "ENGINE": "docker"}).stdout
    registry = f"{ACCOUNT}.dkr.ecr.eu-west-1.amazonaws.com"
    assert "aws ecr create-repository --region eu-west-1 --repository-name efficientnet-train" in out
    assert f"aws ecr get-login-password --region eu-west-1 | docker login --username AWS --password-stdin {registry}" in out
    assert f"docker tag efficientnet-train:latest {registry}/efficientnet-train:1.2.3" in out
    assert f"docker push {registry}/efficientnet-train:1.2.3" in out


VALIDATION = (ROLE, "s3://my-bucket/hymenoptera_data/", "s3://my-bucket/validation")


def test_register_sends_the_spec_with_its_placeholders_filled_in(capsys):
    spec = aws_kit.load_spec()
    expected = aws_kit.fill_spec(spec, IMAGE, validation=VALIDATION)
    assert expected["TrainingSpecification"]["TrainingImage"] == IMAGE
    assert expected["InferenceSpecification"]["Containers"] == [{"Image": IMAGE}]
    assert expected["ValidationSpecification"]["ValidationRole"] == ROLE
    assert expected["CertifyForMarketplace"] is True
    # everything but the placeholders is the committed spec
    text = json.dumps(spec)
    for placeholder, value in zip((aws_kit.TRAINING_IMAGE_PLACEHOLDER, aws_kit.INFERENCE_IMAGE_PLACEHOLDER,
                                   *aws_kit.VALIDATION_PLACEHOLDERS), (IMAGE, IMAGE, *VALIDATION)):
        text = text.replace(placeholder, value.rstrip("/"))
    assert json.loads(text) == expected

    client = boto3.client("sagemaker", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(client) as stub:
        stub.add_response("create_algorithm", {"AlgorithmArn": ALGORITHM_ARN}, expected_params=expected)
        stub.add_response("describe_algorithm", {**described_algorithm(), "AlgorithmStatus": "InProgress"},
                          expected_params={"AlgorithmName": spec["AlgorithmName"]})
        stub.add_response("describe_algorithm", {**described_algorithm(), "AlgorithmStatusDetails": {
            "ValidationStatuses": [{"Name": "one-epoch-then-batch-transform", "Status": "Completed"}]}},
            expected_params={"AlgorithmName": spec["AlgorithmName"]})
        assert aws_register_algorithm.main(
            ["--training-image", IMAGE, "--validation-role", VALIDATION[0], "--validation-data", VALIDATION[1],
             "--validation-output", VALIDATION[2], "--wait"], client=client) == 0
        stub.assert_no_pending_responses()
    out = capsys.readouterr().out
    assert "AlgorithmStatus: Completed" in out and "validation one-epoch-then-batch-transform: Completed" in out

    # as a program, the way a seller runs it; without validation: for the seller's own account only
    printed = json.loads(subprocess.run(
        [sys.executable, str(REPO / "scripts" / "aws_register_algorithm.py"), "--training-image", IMAGE,
         "--inference-image", IMAGE + "-serve", "--dry-run"], check=True, capture_output=True, text=True).stdout)
    assert printed["InferenceSpecification"]["Containers"] == [{"Image": IMAGE + "-serve"}]
    assert printed["TrainingSpecification"] == expected["TrainingSpecification"]
    assert "ValidationSpecification" not in printed and printed["CertifyForMarketplace"] is False
    with pytest.raises(SystemExit):
        aws_register_algorithm.parse_args(["--training-image", IMAGE, "--validation-role", ROLE])


# ---- training -----------------------------------------------------------------------------


def test_train_on_the_image_sends_spot_checkpoints_metrics_and_both_channels(capsys):
    with FakeAWS() as aws:
        aws.answer("create_training_job", {"TrainingJobArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/j1"})
        aws_train.main(["--image-uri", IMAGE, *common_train_args("--job-name", "j1", "--input-mode", "FastFile"),
                        "epochs=30", "lr=0.008"], session=aws.session)
    job = aws.request("CreateTrainingJob")
    algorithm = job["AlgorithmSpecification"]
    assert algorithm["TrainingImage"] == IMAGE and "AlgorithmName" not in algorithm
    assert algorithm["MetricDefinitions"] == aws_kit.metric_definitions()
    assert {m["Name"] for m in algorithm["MetricDefinitions"]} == {
        "train:loss", "validation:loss", "validation:acc_1", "validation:acc_5", "validation:mAP"}
    assert job["HyperParameters"] == {"epochs": "30", "lr": "0.008"}
    assert job["EnableManagedSpotTraining"] is True
    assert job["CheckpointConfig"] == {"S3Uri": f"{OUTPUT}/j1/checkpoints"}
    assert job["StoppingCondition"]["MaxWaitTimeInSeconds"] >= job["StoppingCondition"]["MaxRuntimeInSeconds"]
    assert job["EnableNetworkIsolation"] is True  # as the Marketplace runs it
    assert "DebugHookConfig" not in job and job["ProfilerConfig"] == {"DisableProfiler": True}
    assert job["OutputDataConfig"]["S3OutputPath"] == OUTPUT
    assert job["ResourceConfig"]["InstanceCount"] == 1
    found = channels(job)
    assert set(found) == {"train", "val"}
    assert found["train"]["DataSource"]["S3DataSource"]["S3Uri"] == f"{S3}/train"
    assert found["val"]["DataSource"]["S3DataSource"]["S3Uri"] == f"{S3}/val"
    assert found["train"]["InputMode"] == found["val"]["InputMode"] == "FastFile"
    assert "Training job: j1" in capsys.readouterr().out


def test_train_from_ground_truth_manifests_streams_them_in_pipe_mode():
    with FakeAWS() as aws:
        aws.answer("create_training_job", {"TrainingJobArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/j3"})
        aws_train.main(["--image-uri", IMAGE, "--role", ROLE, "--train", f"{S3}/gt/output.manifest", "--output", OUTPUT,
                        "--job-name", "j3", "--label-attribute", "animal"], session=aws.session)
    train = channels(aws.request("CreateTrainingJob"))["train"]
    assert train["InputMode"] == "Pipe" and train["RecordWrapperType"] == "RecordIO"
    assert train["ContentType"] == "application/x-recordio"
    source = train["DataSource"]["S3DataSource"]
    assert source["S3DataType"] == "AugmentedManifestFile" and source["S3Uri"] == f"{S3}/gt/output.manifest"
    assert source["AttributeNames"] == ["source-ref", "animal", "animal-metadata"]


def test_train_on_a_marketplace_subscription_uses_the_algorithm_and_its_defaults():
    with FakeAWS() as aws:
        aws.answer("describe_algorithm", described_algorithm())
        aws.answer("create_training_job", {"TrainingJobArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/j2"})
        aws_train.main(["--algorithm-arn", ALGORITHM_ARN, *common_train_args(
            "--job-name", "j2", "--model", f"{OUTPUT}/j1/output/model.tar.gz", "--instance-type", "ml.p3.2xlarge",
            "--instance-count", "2"),
            "epochs=30", "opt=AdamW"], session=aws.session)  # SageMaker compares categories exactly
    assert aws.request("DescribeAlgorithm") == {"AlgorithmName": ALGORITHM_ARN}
    job = aws.request("CreateTrainingJob")
    algorithm = job["AlgorithmSpecification"]
    assert algorithm["AlgorithmName"] == ALGORITHM_ARN and "TrainingImage" not in algorithm
    assert algorithm["TrainingInputMode"] == "File"
    assert "MetricDefinitions" not in algorithm  # the algorithm's own apply
    # AlgorithmEstimator sends every hyperparameter: ours, and the spec's defaults for the others
    specs = aws_kit.hyperparameter_specs()
    assert set(job["HyperParameters"]) == {name for name, spec in specs.items() if "DefaultValue" in spec}
    assert "img_size" not in job["HyperParameters"]  # no default in the spec: the job's 0, the model's own
    assert job["HyperParameters"]["epochs"] == "30" and job["HyperParameters"]["opt"] == "adamw"
    assert job["HyperParameters"]["model"] == specs["model"]["DefaultValue"]
    assert job["EnableManagedSpotTraining"] is True
    assert job["CheckpointConfig"] == {"S3Uri": f"{OUTPUT}/j2/checkpoints"}
    assert job["StoppingCondition"]["MaxWaitTimeInSeconds"] == 2 * job["StoppingCondition"]["MaxRuntimeInSeconds"]
    assert job["ResourceConfig"]["InstanceType"] == "ml.p3.2xlarge"
    assert job["ResourceConfig"]["InstanceCount"] == 2  # the SDK allows it: the spec declares distributed training
    assert "DebugHookConfig" not in job and job["ProfilerConfig"] == {"DisableProfiler": True}
    assert set(channels(job)) == {"train", "val", "model"}


def test_train_without_val_and_with_own_weights_sends_train_and_pretrained_only():
    """The SDK checks the channels against the algorithm's spec: val is optional there, pretrained declared."""
    with FakeAWS() as aws:
        aws.answer("describe_algorithm", described_algorithm())
        aws.answer("create_training_job", {"TrainingJobArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/j3"})
        aws_train.main(["--algorithm-arn", ALGORITHM_ARN, "--role", ROLE, "--train", f"{S3}/train", "--output",
                        OUTPUT, "--job-name", "j3", "--pretrained", f"{S3}/weights/efficientnet_b0.pth",
                        "model=efficientnet_b0"], session=aws.session)
    job = aws.request("CreateTrainingJob")
    assert set(channels(job)) == {"train", "pretrained"}
    assert channels(job)["pretrained"]["DataSource"]["S3DataSource"]["S3Uri"] == f"{S3}/weights/efficientnet_b0.pth"


def test_train_refuses_what_would_waste_a_job(capsys):
    for bad in (["learning_rate=0.1"], ["epochs=0"], ["opt=adam-w"]):
        with pytest.raises(SystemExit):
            aws_train.parse_args(["--image-uri", IMAGE, *common_train_args(), *bad])
        assert bad[0].split("=")[0] in capsys.readouterr().err
    # the SDK checks the instance type against the algorithm before sending anything
    with FakeAWS() as aws:
        aws.answer("describe_algorithm", described_algorithm())
        with pytest.raises(ValueError, match="instance_type"):
            aws_train.main(["--algorithm-arn", ALGORITHM_ARN, *common_train_args("--instance-type", "ml.t3.medium")],
                           session=aws.session)
    assert [name for name, _ in aws.requests] == ["DescribeAlgorithm"]


# ---- tuning -------------------------------------------------------------------------------


def check_ranges_against_the_spec(ranges: dict) -> set[str]:
    specs = aws_kit.hyperparameter_specs()
    names = set()
    for kind in ("ContinuousParameterRanges", "IntegerParameterRanges"):
        for r in ranges.get(kind, []):
            spec = specs[r["Name"]]
            allowed = spec["Range"][f"{spec['Type']}ParameterRangeSpecification"]
            assert spec["IsTunable"] and kind.startswith(spec["Type"])
            assert float(allowed["MinValue"]) <= float(r["MinValue"]) < float(r["MaxValue"]) <= float(allowed["MaxValue"])
            names.add(r["Name"])
    for r in ranges.get("CategoricalParameterRanges", []):
        spec = specs[r["Name"]]
        assert spec["IsTunable"] and set(r["Values"]) <= set(spec["Range"]["CategoricalParameterRangeSpecification"]["Values"])
        names.add(r["Name"])
    return names


@pytest.mark.parametrize("source", ["image", "algorithm"])
def test_tuning_maximises_validation_acc_1_over_ranges_inside_the_spec(source):
    with FakeAWS() as aws:
        if source == "algorithm":
            aws.answer("describe_algorithm", described_algorithm())
        aws.answer("create_hyper_parameter_tuning_job",
                   {"HyperParameterTuningJobArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:hyper-parameter-tuning-job/t1"})
        args = ["--image-uri", IMAGE] if source == "image" else ["--algorithm-arn", ALGORITHM_ARN]
        aws_tune.main([*args, *common_train_args("--job-name", "t1"), "--max-jobs", "8", "epochs=20"],
                      session=aws.session)
    request = aws.request("CreateHyperParameterTuningJob")
    config = request["HyperParameterTuningJobConfig"]
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Maximize", "MetricName": "validation:acc_1"}
    assert config["ResourceLimits"]["MaxNumberOfTrainingJobs"] == 8
    assert config["TrainingJobEarlyStoppingType"] == "Auto"
    assert check_ranges_against_the_spec(config["ParameterRanges"]) == set(aws_kit.DEFAULT_TUNING_RANGES)
    lr = next(r for r in config["ParameterRanges"]["ContinuousParameterRanges"] if r["Name"] == "lr")
    assert lr["ScalingType"] == "Logarithmic"
    definition = request["TrainingJobDefinition"]
    assert definition["StaticHyperParameters"]["epochs"] == "20"
    assert not set(definition["StaticHyperParameters"]) & set(aws_kit.DEFAULT_TUNING_RANGES)
    assert definition["EnableManagedSpotTraining"] is True and "CheckpointConfig" not in definition
    assert set(channels(definition)) == {"train", "val"}
    algorithm = definition["AlgorithmSpecification"]
    if source == "image":
        assert algorithm["TrainingImage"] == IMAGE
        assert algorithm["MetricDefinitions"] == aws_kit.metric_definitions()
    else:
        assert algorithm["AlgorithmName"] == ALGORITHM_ARN


def test_tuning_ranges_are_checked_against_the_spec():
    name, wanted = aws_kit.parse_range("opt=rmsproptf,adamw")
    assert aws_kit.tuning_ranges({name: wanted}) == {"opt": ("Categorical", ["rmsproptf", "adamw"])}
    assert aws_kit.tuning_ranges(dict([aws_kit.parse_range("epochs=5:40")]))["epochs"] == ("Integer", 5, 40, "Linear")
    for text, problem in (("lr=0:20:log", "not inside"), ("seed=1:5", "not a tunable"), ("opt=adam-w", "not among"),
                          ("workers=1:4", "not a tunable"), ("model_ema=true,false", "not a tunable")):
        with pytest.raises(ValueError, match=problem):
            aws_kit.tuning_ranges(dict([aws_kit.parse_range(text)]))


# ---- deploy and invoke ----------------------------------------------------------------------


def described_job(name: str, algorithm: dict) -> dict:
    return {"TrainingJobName": name, "TrainingJobArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/{name}",
            "ModelArtifacts": {"S3ModelArtifacts": f"{OUTPUT}/{name}/output/model.tar.gz"},
            "TrainingJobStatus": "Completed", "SecondaryStatus": "Completed", "CreationTime": NOW,
            "StoppingCondition": {"MaxRuntimeInSeconds": 86400},
            "AlgorithmSpecification": {"TrainingInputMode": "File", **algorithm}}


def answer_endpoint_and_invocation(aws: FakeAWS, endpoint: str, answer: dict):
    arn = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}"
    aws.answer("create_model", {"ModelArn": f"{arn}:model/m"})
    aws.answer("create_endpoint_config", {"EndpointConfigArn": f"{arn}:endpoint-config/{endpoint}"})
    aws.answer("create_endpoint", {"EndpointArn": f"{arn}:endpoint/{endpoint}"})
    aws.answer("describe_endpoint", {"EndpointName": endpoint, "EndpointArn": f"{arn}:endpoint/{endpoint}",
                                     "EndpointStatus": "InService", "CreationTime": NOW, "LastModifiedTime": NOW})
    body = json.dumps(answer).encode()
    aws.answer("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(body), len(body)),
                                   "ContentType": "application/json"}, runtime=True)


def test_deploy_an_image_job_then_classify_an_image_and_delete(tmp_path, capsys):
    image = tmp_path / "bee.jpg"
    image.write_bytes(b"\xff\xd8\xff\xe0 a jpeg")
    answer = {"predictions": [{"labels": ["bees", "ants"], "probabilities": [0.93, 0.07]}]}
    with FakeAWS() as aws:
        aws.answer("describe_training_job", described_job("j1", {"TrainingImage": IMAGE}))
        answer_endpoint_and_invocation(aws, "ep1", answer)
        aws.answer("describe_endpoint", {"EndpointName": "ep1", "EndpointConfigName": "ep1",
                                         "EndpointArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint/ep1",
                                         "EndpointStatus": "InService", "CreationTime": NOW, "LastModifiedTime": NOW})
        aws.answer("describe_endpoint_config", {
            "EndpointConfigName": "ep1", "EndpointConfigArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint-config/ep1",
            "CreationTime": NOW, "ProductionVariants": [{"VariantName": "AllTraffic", "ModelName": "m1"}]})
        aws.answer("delete_model", {})
        aws.answer("delete_endpoint_config", {})
        aws.answer("delete_endpoint", {})
        aws_deploy.main(["--training-job", "j1", "--role", ROLE, "--endpoint-name", "ep1", "--image", str(image),
                         "--delete"], session=aws.session)
    model = aws.request("CreateModel")
    assert model["PrimaryContainer"]["Image"] == IMAGE
    assert model["PrimaryContainer"]["ModelDataUrl"] == f"{OUTPUT}/j1/output/model.tar.gz"
    assert model["EnableNetworkIsolation"] is True and model["ExecutionRoleArn"] == ROLE
    variant = aws.request("CreateEndpointConfig")["ProductionVariants"][0]
    assert variant["ModelName"] == model["ModelName"]
    assert variant["InstanceType"] == aws_kit.DEFAULT_ENDPOINT_INSTANCE
    assert variant["InstanceType"] in aws_kit.load_spec()["InferenceSpecification"]["SupportedRealtimeInferenceInstanceTypes"]
    assert aws.request("CreateEndpoint")["EndpointName"] == "ep1"
    invoke = aws.request("InvokeEndpoint")
    assert invoke["EndpointName"] == "ep1" and invoke["ContentType"] == "image/jpeg"
    assert invoke["Accept"] == "application/json" and invoke["CustomAttributes"] == "top_k=3"
    assert invoke["Body"] == image.read_bytes()  # the file as it is
    assert aws.request("DeleteEndpoint") == {"EndpointName": "ep1"}
    assert aws.request("DeleteModel") == {"ModelName": "m1"}
    assert "bees 0.930, ants 0.070" in capsys.readouterr().out


def test_deploy_a_marketplace_job_goes_through_a_model_package(tmp_path):
    image = tmp_path / "ant.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n a png")
    arn = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}"
    with FakeAWS() as aws:
        aws.answer("describe_training_job", described_job("j2", {"AlgorithmName": ALGORITHM_ARN}))
        aws.answer("create_model_package", {"ModelPackageArn": f"{arn}:model-package/p"})
        # a package made from a Marketplace algorithm: its container names the product
        package = {"ModelPackageName": "p", "ModelPackageArn": f"{arn}:model-package/p", "CreationTime": NOW,
                   "ModelPackageStatus": "Completed", "ModelPackageStatusDetails": {"ValidationStatuses": []},
                   "InferenceSpecification": {"Containers": [{"Image": IMAGE, "ProductId": "prod-abc123"}],
                                              "SupportedContentTypes": ["image/jpeg"],
                                              "SupportedResponseMIMETypes": ["application/json"]}}
        for _ in ("wait for it", "its ARN", "is it a Marketplace product (network isolation)"):
            aws.answer("describe_model_package", package)
        answer_endpoint_and_invocation(aws, "ep2", {"predictions": [{"labels": ["ants"], "probabilities": [0.9]}]})
        aws_deploy.main(["--training-job", "j2", "--role", ROLE, "--endpoint-name", "ep2", "--image", str(image),
                         "--instance-type", "ml.c5.xlarge"], session=aws.session)
    source = aws.request("CreateModelPackage")["SourceAlgorithmSpecification"]["SourceAlgorithms"]
    assert source == [{"AlgorithmName": ALGORITHM_ARN, "ModelDataUrl": f"{OUTPUT}/j2/output/model.tar.gz"}]
    model = aws.request("CreateModel")
    assert model["Containers"] == [{"ModelPackageName": aws.request("CreateModelPackage")["ModelPackageName"]}]
    assert model["EnableNetworkIsolation"] is True
    assert aws.request("InvokeEndpoint")["ContentType"] == "image/png"


def test_deploy_can_ask_for_jumpstarts_verbose_answer(tmp_path, capsys):
    image = tmp_path / "bee.jpg"
    image.write_bytes(b"\xff\xd8\xff\xe0 a jpeg")
    with FakeAWS() as aws:
        body = json.dumps({"labels": ["ants", "bees", "wasps"], "probabilities": [0.1, 0.85, 0.05],
                           "predicted_label": "bees"}).encode()
        aws.answer("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(body), len(body)),
                                       "ContentType": "application/json"}, runtime=True)
        aws_deploy.main(["--endpoint-name", "ep3", "--image", str(image), "--verbose", "--top-k", "2"],
                        session=aws.session)
    invoke = aws.request("InvokeEndpoint")
    assert invoke["Accept"] == "application/json;verbose" and "CustomAttributes" not in invoke
    assert "bee.jpg: bees (bees 0.850, ants 0.100)" in capsys.readouterr().out
