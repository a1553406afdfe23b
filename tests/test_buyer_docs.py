"""The programs of docs/buyers.md's "Without this repository" section, run against botocore's Stubber.

Each Python block of that section runs as a buyer would paste it, with its placeholders (ARN, role, bucket)
filled in, on boto3's default session: its sagemaker, sagemaker-runtime and logs clients answer from
Stubbers, and any other client's call fails. botocore validates every request against SageMaker's service
model before the stub answers; the tests then check each request's operation and the parameters that matter.
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import boto3
import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber

from test_kit import ACCOUNT, ALGORITHM_ARN, NOW, REGION, ROLE, FakeAWS, _boto_session, aws_kit, described_algorithm

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Without this repository: the SageMaker SDK or boto3 alone"
BUCKET = "s3://my-bucket"
PLACEHOLDERS = {"arn:aws:sagemaker:REGION:ACCOUNT:algorithm/NAME": ALGORITHM_ARN,
                "arn:aws:iam::ACCOUNT:role/ROLE": ROLE, "s3://BUCKET": BUCKET}
ARN = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}"
MODEL_DATA = f"{BUCKET}/efficientnet/job/output/model.tar.gz"
PRODUCT = "prod-abc123"  # a subscribed Marketplace product's algorithm and packages name it
JPEG = b"\xff\xd8\xff\xe0 a jpeg"
SPEC = aws_kit.load_spec()
INFERENCE = SPEC["InferenceSpecification"]


def section() -> str:
    text = (REPO / "docs" / "buyers.md").read_text()
    assert SECTION in text
    return text.split(SECTION, 1)[1].split("\n## ", 1)[0]


def program(name: str) -> str:
    """The block after `<!-- buyer example: NAME ... -->`, its placeholders filled in."""
    found = re.search(rf"<!-- buyer example: {name};[^\n]*-->\n```python\n(.*?)```", section(), flags=re.S)
    assert found, name
    code = found.group(1)
    for placeholder, value in PLACEHOLDERS.items():
        assert placeholder in code, placeholder
        code = code.replace(placeholder, value)
    return code


def run(code: str, name: str):
    exec(compile(code, f"docs/buyers.md ({name})", "exec"), {"__name__": "__buyer__"})


def body(answer: dict) -> StreamingBody:
    data = json.dumps(answer).encode()
    return StreamingBody(io.BytesIO(data), len(data))


class BuyerAWS(FakeAWS):
    """FakeAWS, with a stubbed logs client too (the SDK prints a job's log as it waits for it)."""

    def __init__(self):
        super().__init__()
        self.logs = _boto_session().client("logs")
        self.logs.meta.events.register("provide-client-params.*.*", self._keep)
        self.logs_stub = Stubber(self.logs)

    def answer_logs(self, operation: str, response: dict):
        self.logs_stub.add_response(operation, response)

    def client(self, service_name: str, *args, **kwargs):
        """boto3.Session.client for the code under test: a stubbed client, or one that fails on any call."""
        stubbed = {"sagemaker": self.sm, "sagemaker-runtime": self.runtime, "runtime.sagemaker": self.runtime,
                   "logs": self.logs}
        if service_name in stubbed:
            return stubbed[service_name]
        other = boto3.Session.client(_boto_session(), service_name, *args, **kwargs)  # not this method
        Stubber(other).activate()  # no answers: any call fails the test
        return other

    def __enter__(self):
        self.logs_stub.activate()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            if exc[0] is None:
                self.logs_stub.assert_no_pending_responses()
        finally:
            self.logs_stub.deactivate()
            super().__exit__(*exc)


@pytest.fixture
def aws(monkeypatch, tmp_path):
    """boto3's default session, whose clients answer from stubs, in a folder holding bee.jpg."""
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # the SDK's and botocore's waiters poll
    monkeypatch.setattr("sagemaker.telemetry.telemetry_logging._send_telemetry_request", lambda *a, **k: None)
    for variable, value in (("AWS_DEFAULT_REGION", REGION), ("AWS_ACCESS_KEY_ID", "testing"),
                            ("AWS_SECRET_ACCESS_KEY", "testing")):
        monkeypatch.setenv(variable, value)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bee.jpg").write_bytes(JPEG)
    fake = BuyerAWS()
    session = _boto_session()
    monkeypatch.setattr(session, "client", fake.client)  # boto3.client() and sagemaker.Session() use it
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", session)
    with fake:
        yield fake


def test_the_section_runs_every_python_block_it_has():
    blocks = re.findall(r"^```python\n", section(), flags=re.M)
    marked = re.findall(r"<!-- buyer example: \w+;[^\n]*-->\n```python\n", section())
    assert len(blocks) == len(marked) == 2
    assert "scripts/" in section().split("```")[0]  # says where the convenience scripts come from


def described_job(name: str = "job", status: str = "Completed") -> dict:
    return {"TrainingJobName": name, "TrainingJobArn": f"{ARN}:training-job/{name}", "TrainingJobStatus": status,
            "SecondaryStatus": status, "CreationTime": NOW, "ModelArtifacts": {"S3ModelArtifacts": MODEL_DATA},
            "AlgorithmSpecification": {"AlgorithmName": ALGORITHM_ARN, "TrainingInputMode": "File"},
            "ResourceConfig": {"InstanceType": "ml.g4dn.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30},
            "StoppingCondition": {"MaxRuntimeInSeconds": 86400}, "TrainingTimeInSeconds": 600,
            "BillableTimeInSeconds": 600}


def described_package(status: str = "Completed") -> dict:
    return {"ModelPackageName": "p", "ModelPackageArn": f"{ARN}:model-package/p", "CreationTime": NOW,
            "ModelPackageStatus": status, "ModelPackageStatusDetails": {"ValidationStatuses": []},
            "InferenceSpecification": {"Containers": [{"Image": "image", "ProductId": PRODUCT}],
                                       "SupportedContentTypes": ["image/jpeg"],
                                       "SupportedResponseMIMETypes": ["application/json"]}}


def described_endpoint(name: str = "ep", status: str = "InService") -> dict:
    return {"EndpointName": name, "EndpointArn": f"{ARN}:endpoint/{name}", "EndpointConfigName": name,
            "EndpointStatus": status, "CreationTime": NOW, "LastModifiedTime": NOW}


def described_transform(name: str = "t", status: str = "Completed") -> dict:
    return {"TransformJobName": name, "TransformJobArn": f"{ARN}:transform-job/{name}",
            "TransformJobStatus": status, "ModelName": "m", "CreationTime": NOW,
            "TransformInput": {"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": BUCKET}}},
            "TransformResources": {"InstanceType": "ml.m5.xlarge", "InstanceCount": 1}}


ANSWER = {"predictions": [{"labels": ["bees", "ants"], "probabilities": [0.981, 0.019]}]}
VERBOSE = {"labels": ["ants", "bees"], "probabilities": [0.019, 0.981], "predicted_label": "bees"}


def requests(fake: FakeAWS, operation: str) -> list[dict]:
    return [params for name, params in fake.requests if name == operation]


def check_training_job(job: dict):
    assert job["AlgorithmSpecification"]["AlgorithmName"] == ALGORITHM_ARN
    assert "TrainingImage" not in job["AlgorithmSpecification"]
    assert job["RoleArn"] == ROLE
    assert job["EnableNetworkIsolation"] is True  # as the SDK sends it for a Marketplace algorithm
    assert job["HyperParameters"]["epochs"] == "30"
    assert set(job["HyperParameters"]) <= set(aws_kit.hyperparameter_specs())
    assert job["ResourceConfig"]["InstanceType"] in SPEC["TrainingSpecification"]["SupportedTrainingInstanceTypes"]
    assert job["OutputDataConfig"]["S3OutputPath"] == f"{BUCKET}/efficientnet"
    found = {c["ChannelName"]: c["DataSource"]["S3DataSource"] for c in job["InputDataConfig"]}
    assert set(found) == {"train", "val"}
    for channel, source in found.items():
        assert source["S3Uri"] == f"{BUCKET}/hymenoptera_data/{channel}" and source["S3DataType"] == "S3Prefix"


def check_model(package: dict, model: dict):
    """A model package made from the algorithm and the job's model, and a model on that package."""
    assert package["SourceAlgorithmSpecification"] == {
        "SourceAlgorithms": [{"AlgorithmName": ALGORITHM_ARN, "ModelDataUrl": MODEL_DATA}]}
    assert model["Containers"] == [{"ModelPackageName": package["ModelPackageName"]}]
    assert "PrimaryContainer" not in model
    assert model["ExecutionRoleArn"] == ROLE and model["EnableNetworkIsolation"] is True


def check_endpoint(fake: FakeAWS, model: dict):
    (variant,) = fake.request("CreateEndpointConfig")["ProductionVariants"]
    assert variant["ModelName"] == model["ModelName"] and variant["InitialInstanceCount"] == 1
    assert variant["InstanceType"] in INFERENCE["SupportedRealtimeInferenceInstanceTypes"]
    config = fake.request("CreateEndpointConfig")["EndpointConfigName"]
    assert fake.request("CreateEndpoint")["EndpointConfigName"] == config


def check_invocation(invoke: dict, endpoint: str, accept: str = "application/json"):
    assert invoke["EndpointName"] == endpoint and invoke["Body"] == JPEG  # the file as it is
    assert invoke["ContentType"] in INFERENCE["SupportedContentTypes"]
    assert invoke["Accept"] == accept and accept in INFERENCE["SupportedResponseMIMETypes"]


def check_transform(job: dict, model: dict):
    """One image per request, as `serve` asks in /execution-parameters, answered in JSON Lines."""
    assert job["ModelName"] == model["ModelName"]
    assert job["BatchStrategy"] == "SingleRecord" and job["MaxPayloadInMB"] == 6
    inputs, outputs = job["TransformInput"], job["TransformOutput"]
    assert inputs["DataSource"]["S3DataSource"] == {"S3DataType": "S3Prefix", "S3Uri": f"{BUCKET}/photos"}
    assert inputs["ContentType"] == "application/x-image" and inputs["SplitType"] == "None"
    assert inputs["ContentType"] in INFERENCE["SupportedContentTypes"]
    assert outputs == {"S3OutputPath": f"{BUCKET}/efficientnet/transform", "Accept": "application/jsonlines",
                       "AssembleWith": "Line"}
    assert job["TransformResources"]["InstanceType"] in INFERENCE["SupportedTransformInstanceTypes"]


def answer_packaged_model(aws, package: str, model: str) -> None:
    """The SDK's way from a training job of an algorithm to a model: the job's model location, a model package
    (waited for, then looked up twice), a model."""
    aws.answer("describe_training_job", described_job())
    aws.answer("create_model_package", {"ModelPackageArn": f"{ARN}:model-package/{package}"})
    for _ in range(3):
        aws.answer("describe_model_package", described_package())
    aws.answer("create_model", {"ModelArn": f"{ARN}:model/{model}"})


def test_the_sdk_program_trains_deploys_classifies_and_transforms(aws, capsys):
    aws.answer("describe_algorithm", {**described_algorithm(), "ProductId": PRODUCT})  # a subscription
    aws.answer("create_training_job", {"TrainingJobArn": f"{ARN}:training-job/job"})
    aws.answer("describe_training_job", described_job())  # fit() waits, then prints the log
    aws.answer_logs("describe_log_streams", {"logStreams": []})
    aws.answer("describe_training_job", described_job())  # est.model_data
    answer_packaged_model(aws, "p", "m")  # deploy(): then the endpoint
    aws.answer("create_endpoint_config", {"EndpointConfigArn": f"{ARN}:endpoint-config/ep"})
    aws.answer("create_endpoint", {"EndpointArn": f"{ARN}:endpoint/ep"})
    aws.answer("describe_endpoint", described_endpoint())
    aws.answer("invoke_endpoint", {"Body": body(ANSWER), "ContentType": "application/json"}, runtime=True)
    aws.answer("invoke_endpoint", {"Body": body(VERBOSE), "ContentType": "application/json"}, runtime=True)
    # delete_model() finds the model through the endpoint's configuration; delete_endpoint() removes both
    aws.answer("describe_endpoint", described_endpoint())
    aws.answer("describe_endpoint_config", {
        "EndpointConfigName": "ep", "EndpointConfigArn": f"{ARN}:endpoint-config/ep", "CreationTime": NOW,
        "ProductionVariants": [{"VariantName": "AllTraffic", "ModelName": "m"}]})
    aws.answer("delete_model", {})
    aws.answer("delete_endpoint_config", {})
    aws.answer("delete_endpoint", {})
    answer_packaged_model(aws, "p2", "m2")  # transformer(): a package and a model of its own
    # transform() waits, then prints the log
    aws.answer("create_transform_job", {"TransformJobArn": f"{ARN}:transform-job/t"})
    aws.answer("describe_transform_job", described_transform())
    aws.answer_logs("describe_log_streams", {"logStreams": []})

    run(program("sdk"), "sdk")

    assert aws.request("DescribeAlgorithm") == {"AlgorithmName": ALGORITHM_ARN}
    job = aws.request("CreateTrainingJob")
    check_training_job(job)
    assert job["AlgorithmSpecification"]["TrainingInputMode"] == "File"
    assert "EnableManagedSpotTraining" not in job
    packages, models = requests(aws, "CreateModelPackage"), requests(aws, "CreateModel")
    assert len(packages) == len(models) == 2
    for package, model in zip(packages, models):
        check_model(package, model)
    check_endpoint(aws, models[0])
    endpoint = aws.request("CreateEndpoint")["EndpointName"]
    plain, verbose = requests(aws, "InvokeEndpoint")
    check_invocation(plain, endpoint)
    assert plain["CustomAttributes"] == "top_k=3"
    check_invocation(verbose, endpoint, accept="application/json;verbose")
    assert aws.request("DeleteModel") == {"ModelName": "m"}
    assert aws.request("DeleteEndpoint") == {"EndpointName": endpoint}
    check_transform(aws.request("CreateTransformJob"), models[1])
    out = capsys.readouterr().out
    assert f"{MODEL_DATA}\n" in out and f"{ANSWER}\n{VERBOSE}\n" in out  # among the SDK's progress dots


def test_the_boto3_program_makes_the_sdks_calls(aws, capsys):
    aws.answer("create_training_job", {"TrainingJobArn": f"{ARN}:training-job/job"})
    for status in ("InProgress", "Completed"):  # the waiter polls until the job ends
        aws.answer("describe_training_job", described_job(status=status))
    aws.answer("describe_training_job", described_job())
    aws.answer("create_model_package", {"ModelPackageArn": f"{ARN}:model-package/p"})
    for status in ("Pending", "InProgress", "Completed"):
        aws.answer("describe_model_package", described_package(status))
    aws.answer("create_model", {"ModelArn": f"{ARN}:model/m"})
    aws.answer("create_endpoint_config", {"EndpointConfigArn": f"{ARN}:endpoint-config/ep"})
    aws.answer("create_endpoint", {"EndpointArn": f"{ARN}:endpoint/ep"})
    for status in ("Creating", "InService"):
        aws.answer("describe_endpoint", described_endpoint(status=status))
    aws.answer("invoke_endpoint", {"Body": body(ANSWER), "ContentType": "application/json"}, runtime=True)
    aws.answer("delete_endpoint", {})
    aws.answer("delete_endpoint_config", {})
    aws.answer("create_transform_job", {"TransformJobArn": f"{ARN}:transform-job/t"})
    for status in ("InProgress", "Completed"):
        aws.answer("describe_transform_job", described_transform(status=status))
    aws.answer("delete_model", {})

    run(program("boto3"), "boto3")

    job = aws.request("CreateTrainingJob")
    check_training_job(job)
    name = job["TrainingJobName"]
    assert re.fullmatch(r"efficientnet-\d{8}-\d{6}", name)
    assert job["HyperParameters"] == {"epochs": "30"}
    assert job["AlgorithmSpecification"] == {"AlgorithmName": ALGORITHM_ARN, "TrainingInputMode": "File"}
    assert job["EnableManagedSpotTraining"] is True
    assert job["CheckpointConfig"] == {"S3Uri": f"{BUCKET}/efficientnet/{name}/checkpoints"}
    stopping = job["StoppingCondition"]
    assert stopping["MaxWaitTimeInSeconds"] >= stopping["MaxRuntimeInSeconds"]
    assert [params for op, params in aws.requests if op == "DescribeTrainingJob"] == [{"TrainingJobName": name}] * 3
    model = aws.request("CreateModel")
    check_model(aws.request("CreateModelPackage"), model)
    assert len(requests(aws, "DescribeModelPackage")) == 3
    check_endpoint(aws, model)
    assert aws.request("CreateEndpoint")["EndpointName"] == name
    assert len(requests(aws, "DescribeEndpoint")) == 2
    invoke = aws.request("InvokeEndpoint")
    check_invocation(invoke, name)
    assert invoke["ContentType"] == "image/jpeg" and invoke["CustomAttributes"] == "top_k=3"
    assert aws.request("DeleteEndpoint") == {"EndpointName": name}
    assert aws.request("DeleteEndpointConfig") == {"EndpointConfigName": name}
    check_transform(aws.request("CreateTransformJob"), model)
    assert len(requests(aws, "DescribeTransformJob")) == 2
    assert aws.request("DeleteModel") == {"ModelName": name}
    assert capsys.readouterr().out == f"{ANSWER}\n"


def test_a_wrong_parameter_in_the_docs_fails_the_test(monkeypatch):
    from botocore.exceptions import ParamValidationError

    sm = _boto_session().client("sagemaker")
    stub = Stubber(sm)
    stub.add_response("create_training_job", {"TrainingJobArn": f"{ARN}:training-job/job"})
    monkeypatch.setattr(boto3, "client", lambda *args, **kwargs: sm)
    broken = program("boto3").replace('"TrainingInputMode"', '"InputMode"')
    with stub, pytest.raises(ParamValidationError, match="Unknown parameter in AlgorithmSpecification: \"InputMode\""):
        run(broken, "boto3")
