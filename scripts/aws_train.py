#!/usr/bin/env python3
"""Start a SageMaker training job: on the image itself (seller) or on a Marketplace subscription (buyer).

    python scripts/aws_train.py --algorithm-arn ARN --role ROLE_ARN \\
        --train s3://BUCKET/hymenoptera_data/train --val s3://BUCKET/hymenoptera_data/val \\
        --output s3://BUCKET/efficientnet [--instance-type ml.g4dn.xlarge] [epochs=30 lr=0.016 ...]
    python scripts/aws_train.py --image-uri ACCOUNT.dkr.ecr.REGION.amazonaws.com/efficientnet-train:TAG ...

With --algorithm-arn the SDK's AlgorithmEstimator reads the algorithm's spec (channels, instance
types, hyperparameter ranges) and checks the job against it before sending; with --image-uri a plain
Estimator runs the image with the spec's metric definitions and network isolation, as Marketplace
runs it. Both use managed spot training (about a third of the on-demand price) with checkpoints in
--output/JOB/checkpoints, from which an interrupted job resumes; --on-demand turns spot off.
--model s3://.../model.tar.gz adds the optional `model` channel (continue from a previous job).
The job's model ends up in --output/JOB/output/model.tar.gz. Without --wait the script returns once
the job is created; --wait streams its log until it ends.

Runs with the SageMaker Python SDK v2: /work/sagemaker-venv/bin/python here, or any venv with
`pip install 'sagemaker==2.257.7'` (the project's .venv has it). Needs AWS credentials and an IAM
role that SageMaker can assume with access to the S3 locations.
"""

from __future__ import annotations

import argparse
import sys

import aws_kit


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--algorithm-arn", help="the algorithm (your Marketplace subscription, or a registered one)")
    source.add_argument("--image-uri", help="the training image in ECR (seller testing it before registering)")
    parser.add_argument("--role", required=True, help="IAM role ARN that SageMaker assumes for the job")
    parser.add_argument("--train", required=True, help="S3 prefix holding train/<label>/<image>")
    parser.add_argument("--val", help="S3 prefix holding val/<label>/<image>; without it the job holds out "
                                      "val_fraction of each class of --train")
    parser.add_argument("--pretrained", help="S3 key of one timm weights file to start from (the 'pretrained' "
                                             "channel), for a model whose weights the image lacks")
    parser.add_argument("--model", help="optional S3 URI of a previous job's model.tar.gz (the 'model' channel)")
    parser.add_argument("--label-attribute", metavar="LABEL",
                        help="--train and --val are SageMaker Ground Truth output manifests (output.manifest) of an "
                             "image classification labelling job whose label attribute is LABEL: streamed in Pipe "
                             "mode (source-ref, LABEL, LABEL-metadata), no copying into folders")
    parser.add_argument("--output", required=True, help="S3 prefix for the job's model and checkpoints")
    parser.add_argument("--instance-type", default=aws_kit.DEFAULT_TRAINING_INSTANCE)
    parser.add_argument("--instance-count", type=int, default=1,
                        help="instances: the job trains one model on every GPU of all of them (batch_size is per GPU)")
    parser.add_argument("--volume-size", type=int, default=30,
                        help="GB of disk for the data and checkpoints, on types with EBS volumes (ml.p3, ml.c5, "
                             "ml.m5); ml.g4dn, ml.g5, ml.p3dn and ml.p4d have fixed NVMe storage and ignore it")
    parser.add_argument("--input-mode", default="File", choices=["File", "FastFile"],
                        help="File copies the data before training; FastFile streams it from S3")
    parser.add_argument("--max-run", type=int, default=24 * 3600, help="seconds of training at most")
    parser.add_argument("--max-wait", type=int, help="seconds of training plus waiting for spot capacity "
                                                     "(default twice --max-run)")
    parser.add_argument("--on-demand", action="store_true", help="no spot instances")
    parser.add_argument("--checkpoint-s3-uri", help="default: OUTPUT/JOB/checkpoints")
    parser.add_argument("--job-name", help="default: efficientnet-<timestamp>")
    parser.add_argument("--region", help="AWS region (default: your AWS configuration's)")
    parser.add_argument("--wait", action="store_true", help="stream the job's log until it ends")
    parser.add_argument("hyperparameters", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)  # key=value words may come before, between or after options
    try:
        args.hyperparameters = aws_kit.parse_key_values(args.hyperparameters)
    except ValueError as exc:
        parser.error(str(exc))
    args.output = args.output.rstrip("/")
    return args


def estimator(args, session, job_name: str):
    """The SDK estimator of the job: AlgorithmEstimator for an algorithm, Estimator for an image."""
    # SageMaker Debugger and its profiler are off: the image has no hooks for them, and they would add
    # their own outputs and rule jobs to a buyer's bill.
    common = dict(
        role=args.role, instance_count=args.instance_count, instance_type=args.instance_type, volume_size=args.volume_size,
        max_run=args.max_run, output_path=args.output, sagemaker_session=session,
        use_spot_instances=not args.on_demand,
        max_wait=None if args.on_demand else (args.max_wait or 2 * args.max_run),
    )
    checkpoint = args.checkpoint_s3_uri or f"{args.output}/{job_name}/checkpoints"
    if args.algorithm_arn:
        from sagemaker.algorithm import AlgorithmEstimator

        # Hyperparameters are checked against the algorithm's ranges here, before anything is paid for.
        est = AlgorithmEstimator(algorithm_arn=args.algorithm_arn, hyperparameters=args.hyperparameters, **common)
        # AlgorithmEstimator's constructor does not take these three; fit() sends them all the same.
        est.checkpoint_s3_uri = checkpoint
        est.debugger_hook_config, est.disable_profiler = False, True
        return est
    from sagemaker.estimator import Estimator

    return Estimator(image_uri=args.image_uri, hyperparameters=args.hyperparameters,
                     metric_definitions=aws_kit.metric_definitions(), checkpoint_s3_uri=checkpoint,
                     enable_network_isolation=True, debugger_hook_config=False, disable_profiler=True, **common)


def inputs(args) -> dict:
    from sagemaker.inputs import TrainingInput

    # The input mode goes on each channel: the SDK's AlgorithmEstimator refuses an estimator-wide FastFile.
    mode = None if args.input_mode == "File" else args.input_mode

    def images(uri: str) -> TrainingInput:
        if not args.label_attribute:
            return TrainingInput(uri, input_mode=mode)
        # A Ground Truth manifest: SageMaker streams each line's image, label and metadata as RecordIO records.
        return TrainingInput(uri, s3_data_type="AugmentedManifestFile", input_mode="Pipe", record_wrapping="RecordIO",
                             content_type="application/x-recordio", attribute_names=[
                                 "source-ref", args.label_attribute, f"{args.label_attribute}-metadata"])

    channels = {"train": images(args.train)}
    if args.val:
        channels["val"] = images(args.val)
    if args.model:
        channels["model"] = TrainingInput(args.model)
    if args.pretrained:
        channels["pretrained"] = TrainingInput(args.pretrained)
    return channels


def main(argv=None, session=None) -> int:
    args = parse_args(argv)
    from sagemaker.utils import name_from_base

    session = session or aws_kit.sagemaker_session(args.region)
    job_name = args.job_name or name_from_base("efficientnet")
    est = estimator(args, session, job_name)
    est.fit(inputs(args), job_name=job_name, wait=args.wait, logs=args.wait)
    print(f"Training job: {job_name}")
    print(f"Checkpoints: {est.checkpoint_s3_uri}")
    print(f"Model (when it completes): {args.output}/{job_name}/output/model.tar.gz")
    if not args.wait:
        print(f"Follow it: aws sagemaker describe-training-job --training-job-name {job_name}")
    print(f"Deploy it: python scripts/aws_deploy.py --training-job {job_name} --role {args.role} --image IMAGE.jpg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
