#!/usr/bin/env python3
"""Seller: register the algorithm (CreateAlgorithm) from container/algorithm-spec.json.

    python scripts/aws_register_algorithm.py --training-image ACCOUNT.dkr.ecr.REGION.amazonaws.com/efficientnet-train:1.0.0
        --validation-role ROLE_ARN --validation-data s3://BUCKET/sample --validation-output s3://BUCKET/validation
        [--inference-image URI] [--name NAME] [--region REGION] [--dry-run] [--wait]

The spec is sent as it is, with its placeholders filled in (the inference image defaults to the
training image: the same image answers `serve`). AWS lists only an algorithm that passed its
validation: a one-epoch training job on --validation-data (train/<label>/ and val/<label>/, e.g.
hymenoptera) and a batch transform of its val images, run with --validation-role, results under
--validation-output. Without the three --validation-* options the algorithm is registered for your
own account only (no validation, CertifyForMarketplace false), which is enough to try it with
aws_train.py --algorithm-arn. --dry-run prints the request and sends
nothing; --wait polls DescribeAlgorithm until SageMaker has validated the algorithm and prints its
status. Push the image first (scripts/aws_push_image.sh), in the region you register in.

Needs boto3 (the SageMaker SDK's venv has it: /work/sagemaker-venv/bin/python here, or any venv with
`pip install 'sagemaker==2.257.7'`) and AWS credentials allowed to call sagemaker:CreateAlgorithm.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import aws_kit


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--training-image", required=True, help="ECR URI of the image SageMaker runs with `train`")
    parser.add_argument("--inference-image", help="ECR URI of the image run with `serve` (default: the training image)")
    parser.add_argument("--validation-role", help="IAM role ARN that SageMaker assumes for the validation jobs")
    parser.add_argument("--validation-data", help="S3 prefix of sample data: train/<label>/... and val/<label>/...")
    parser.add_argument("--validation-output", help="S3 prefix for the validation jobs' outputs")
    parser.add_argument("--name", help="AlgorithmName (default: the spec's); a new version needs a new name")
    parser.add_argument("--region", help="AWS region (default: your AWS configuration's)")
    parser.add_argument("--dry-run", action="store_true", help="print the request, send nothing")
    parser.add_argument("--wait", action="store_true", help="wait until the algorithm's status is final")
    args = parser.parse_args(argv)
    validation = (args.validation_role, args.validation_data, args.validation_output)
    if any(validation) and not all(validation):
        parser.error("give all three of --validation-role, --validation-data and --validation-output, or none")
    args.validation = validation if all(validation) else None
    return args


def request(args) -> dict:
    body = aws_kit.fill_spec(aws_kit.load_spec(), args.training_image, args.inference_image, args.validation)
    if args.name:
        body["AlgorithmName"] = args.name
    return body


def main(argv=None, client=None, poll_seconds: float = 30) -> int:
    args = parse_args(argv)
    body = request(args)
    if args.dry_run:
        print(json.dumps(body, indent=2))
        return 0
    if client is None:
        import boto3

        client = boto3.client("sagemaker", region_name=args.region)
    arn = client.create_algorithm(**body)["AlgorithmArn"]
    print(f"Registered {arn}")
    if args.validation is None:
        print("Not certified for the Marketplace (no --validation-*): usable from this account only")
    if not args.wait:
        print(f"Status: aws sagemaker describe-algorithm --algorithm-name {body['AlgorithmName']}")
        return 0
    while True:
        described = client.describe_algorithm(AlgorithmName=body["AlgorithmName"])
        status = described["AlgorithmStatus"]
        if status not in ("Pending", "InProgress"):
            break
        time.sleep(poll_seconds)
    print(f"AlgorithmStatus: {status}")
    for item in described.get("AlgorithmStatusDetails", {}).get("ValidationStatuses", []):
        print(f"  validation {item['Name']}: {item['Status']} {item.get('FailureReason', '')}".rstrip())
    return 0 if status == "Completed" else 1


if __name__ == "__main__":
    sys.exit(main())
