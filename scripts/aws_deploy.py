#!/usr/bin/env python3
"""Deploy a trained model to a real-time SageMaker endpoint, send it images, print the top labels.

    python scripts/aws_deploy.py --training-job JOB --role ROLE_ARN --image bee.jpg [--image ant.png]
        [--instance-type ml.m5.xlarge] [--endpoint-name NAME] [--top-k 3] [--delete]
    python scripts/aws_deploy.py --model-data s3://.../model.tar.gz (--algorithm-arn ARN | --image-uri URI) --role ...
    python scripts/aws_deploy.py --endpoint-name NAME --image bee.jpg          # query a running endpoint
    python scripts/aws_deploy.py --endpoint-name NAME --delete                 # remove it

--training-job takes the model and the algorithm (or image) from that job. A job of a Marketplace
algorithm is deployed the way the SDK's AlgorithmEstimator.deploy does it: a model package made from
the algorithm and the model, then a model, an endpoint configuration and the endpoint; an image job
becomes a model on the image (started with `serve`). Both run with network isolation, as on the
Marketplace. Each --image is sent as it is (image/jpeg, image/png, ... from its extension) and the
answer's labels and probabilities are printed, likeliest first. An endpoint is billed by the hour
until it is deleted: --delete removes the endpoint, its configuration and its model at the end.

Runs with the SageMaker Python SDK v2 (see aws_train.py).
"""

from __future__ import annotations

import argparse
import mimetypes
import sys
from pathlib import Path

import aws_kit


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--training-job", help="a completed training job whose model to deploy")
    parser.add_argument("--model-data", help="S3 URI of a model.tar.gz (instead of --training-job)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--algorithm-arn", help="with --model-data: the algorithm that trained it")
    source.add_argument("--image-uri", help="with --model-data: the image to serve it with")
    parser.add_argument("--role", help="IAM role ARN that SageMaker assumes for the model (needed to deploy)")
    parser.add_argument("--instance-type", default=aws_kit.DEFAULT_ENDPOINT_INSTANCE)
    parser.add_argument("--endpoint-name", help="default: efficientnet-<timestamp> when deploying")
    parser.add_argument("--image", action="append", default=[], type=Path, dest="images",
                        help="an image file to classify (repeat for more)")
    parser.add_argument("--top-k", type=int, default=3, help="labels to print per image")
    parser.add_argument("--verbose", action="store_true",
                        help="ask for every label's probability and the predicted label (Accept: application/json;"
                             "verbose, the answer SageMaker JumpStart's image classifiers give)")
    parser.add_argument("--delete", action="store_true", help="delete the endpoint and its model at the end")
    parser.add_argument("--region", help="AWS region (default: your AWS configuration's)")
    args = parser.parse_args(argv)
    deploying = bool(args.training_job or args.model_data)
    if args.training_job and args.model_data:
        parser.error("give --training-job or --model-data, not both")
    if args.model_data and not (args.algorithm_arn or args.image_uri):
        parser.error("--model-data needs --algorithm-arn or --image-uri")
    if deploying and not args.role:
        parser.error("deploying needs --role")
    if not deploying and not args.endpoint_name:
        parser.error("give --training-job or --model-data to deploy, or --endpoint-name of a running endpoint")
    for image in args.images:
        if not image.is_file():
            parser.error(f"--image {image}: no such file")
    return args


def model_source(args, session) -> tuple[str, str | None, str | None]:
    """(model data, algorithm ARN, image URI) of what to deploy."""
    if args.model_data:
        return args.model_data, args.algorithm_arn, args.image_uri
    job = session.sagemaker_client.describe_training_job(TrainingJobName=args.training_job)
    if job["TrainingJobStatus"] != "Completed":
        raise SystemExit(f"Training job {args.training_job} is {job['TrainingJobStatus']}, not Completed: "
                         f"{job.get('FailureReason', 'no model to deploy yet')}")
    algorithm = job["AlgorithmSpecification"]
    return (job["ModelArtifacts"]["S3ModelArtifacts"], algorithm.get("AlgorithmName"),
            None if algorithm.get("AlgorithmName") else algorithm["TrainingImage"])


def deploy(args, session, endpoint_name: str):
    from sagemaker.model import Model, ModelPackage
    from sagemaker.predictor import Predictor

    model_data, algorithm_arn, image_uri = model_source(args, session)
    if algorithm_arn:
        model = ModelPackage(role=args.role, model_data=model_data, algorithm_arn=algorithm_arn,
                             predictor_cls=Predictor, sagemaker_session=session)
    else:
        model = Model(image_uri=image_uri, model_data=model_data, role=args.role, predictor_cls=Predictor,
                      enable_network_isolation=True, sagemaker_session=session)
    print(f"Deploying {model_data} to endpoint {endpoint_name} on {args.instance_type} (several minutes)")
    model.deploy(initial_instance_count=1, instance_type=args.instance_type, endpoint_name=endpoint_name)


def predictor(endpoint_name: str, session):
    from sagemaker.deserializers import JSONDeserializer
    from sagemaker.predictor import Predictor
    from sagemaker.serializers import IdentitySerializer

    return Predictor(endpoint_name, sagemaker_session=session,
                     serializer=IdentitySerializer("image/jpeg"), deserializer=JSONDeserializer())


def classify(pred, image: Path, top_k: int, verbose: bool = False) -> dict:
    content_type = mimetypes.guess_type(image.name)[0] or "application/x-image"
    if verbose:
        answer = pred.predict(image.read_bytes(), initial_args={"ContentType": content_type,
                                                                "Accept": "application/json;verbose"})
        ranked = sorted(zip(answer["labels"], answer["probabilities"]), key=lambda pair: -pair[1])[:top_k]
        print(f"{image}: {answer['predicted_label']} (" + ", ".join(f"{label} {p:.3f}" for label, p in ranked) + ")")
        return answer
    answer = pred.predict(image.read_bytes(), initial_args={"ContentType": content_type, "Accept": "application/json"},
                          custom_attributes=f"top_k={top_k}")
    best = answer["predictions"][0]
    print(f"{image}: " + ", ".join(f"{label} {p:.3f}" for label, p in zip(best["labels"], best["probabilities"])))
    return answer


def main(argv=None, session=None) -> int:
    args = parse_args(argv)
    session = session or aws_kit.sagemaker_session(args.region)
    endpoint_name = args.endpoint_name
    if args.training_job or args.model_data:
        from sagemaker.utils import name_from_base

        endpoint_name = endpoint_name or name_from_base("efficientnet")
        deploy(args, session, endpoint_name)
        print(f"Endpoint {endpoint_name} is in service")
    pred = predictor(endpoint_name, session)
    for image in args.images:
        classify(pred, image, args.top_k, args.verbose)
    if args.delete:
        pred.delete_model()
        pred.delete_endpoint(delete_endpoint_config=True)
        print(f"Deleted endpoint {endpoint_name}, its configuration and its model")
    elif args.training_job or args.model_data:
        print(f"Billed until deleted: python scripts/aws_deploy.py --endpoint-name {endpoint_name} --delete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
