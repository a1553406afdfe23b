#!/usr/bin/env python3
"""Start a hyperparameter tuning job that maximises validation:acc_1 (--objective validation:mAP for data of several
labels an image, whose jobs log that instead).

    python scripts/aws_tune.py --algorithm-arn ARN --role ROLE_ARN \\
        --train s3://BUCKET/data/train --val s3://BUCKET/data/val --output s3://BUCKET/efficientnet \\
        [--max-jobs 12 --max-parallel-jobs 3] [--range lr=0.004:0.064:log --range opt=rmsproptf,adamw] \\
        [epochs=30 ...]

Takes every option of aws_train.py (--image-uri instead of --algorithm-arn, --instance-type,
--on-demand, ...): each training job of the tuning job is that job, with the searched
hyperparameters set by the tuner and the fixed ones (key=value) passed as they are, on spot
instances but without checkpoints (they would share one folder). Without
--range it searches aws_kit.DEFAULT_TUNING_RANGES (lr, layer_decay, decay_epochs, drop); each
--range replaces that set, and every range is checked against the spec before anything is sent:
the hyperparameter must be tunable and the range inside its allowed values. Early stopping of
poor jobs is on (--no-early-stopping turns it off). Prints the tuning job's name; the best job
is in the console or `aws sagemaker describe-hyper-parameter-tuning-job`.

Runs with the SageMaker Python SDK v2 (see aws_train.py).
"""

from __future__ import annotations

import argparse
import sys

import aws_kit
import aws_train


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Every option of aws_train.py applies too: python scripts/aws_train.py --help")
    parser.add_argument("--max-jobs", type=int, default=12, help="training jobs in all")
    parser.add_argument("--max-parallel-jobs", type=int, default=3, help="training jobs at a time")
    parser.add_argument("--range", action="append", default=[], dest="ranges", metavar="NAME=MIN:MAX[:log]|NAME=A,B",
                        help="a hyperparameter to search (repeat); replaces the default set")
    parser.add_argument("--no-early-stopping", action="store_true", help="let every training job run to its end")
    parser.add_argument("--objective", default=aws_kit.OBJECTIVE_METRIC, choices=aws_kit.OBJECTIVE_METRICS,
                        help="the metric to maximise (default %(default)s; validation:mAP for several labels an "
                             "image)")
    tune_args, train_argv = parser.parse_known_args(argv)
    try:
        overrides = dict(aws_kit.parse_range(text) for text in tune_args.ranges) or None
        tune_args.ranges = aws_kit.tuning_ranges(overrides)
    except ValueError as exc:
        parser.error(str(exc))
    train_args = aws_train.parse_args(train_argv)
    if train_args.checkpoint_s3_uri:
        parser.error("--checkpoint-s3-uri: a tuning job's training jobs would share it; tuning runs without checkpoints")
    searched = set(tune_args.ranges) & set(train_args.hyperparameters)
    if searched:
        parser.error(f"{', '.join(sorted(searched))}: both searched and fixed; drop the key=value")
    return tune_args, train_args


def main(argv=None, session=None) -> int:
    tune_args, args = parse_args(argv)
    from sagemaker.tuner import HyperparameterTuner
    from sagemaker.utils import name_from_base

    session = session or aws_kit.sagemaker_session(args.region)
    name = args.job_name or name_from_base("efficientnet-tune", max_length=32)  # tuning job names: 32 characters
    est = aws_train.estimator(args, session, job_name=name)
    # No checkpoints: the tuning job gives all its training jobs the one CheckpointConfig, and nothing here
    # shows that SageMaker keeps them apart; a job finding another's checkpoint stops ("a different run").
    # Spot still saves: an interrupted job starts over, and tuning jobs are short.
    est.checkpoint_s3_uri = None
    tuner = HyperparameterTuner(
        est,
        objective_metric_name=tune_args.objective,
        objective_type="Maximize",
        hyperparameter_ranges=aws_kit.sdk_ranges(tune_args.ranges),
        metric_definitions=None if args.algorithm_arn else aws_kit.metric_definitions(),
        max_jobs=tune_args.max_jobs,
        max_parallel_jobs=tune_args.max_parallel_jobs,
        early_stopping_type="Off" if tune_args.no_early_stopping else "Auto",
    )
    tuner.fit(aws_train.inputs(args), job_name=name, wait=args.wait)
    print(f"Tuning job: {name}, searching {', '.join(tune_args.ranges)} for the highest {tune_args.objective}")
    print(f"Follow it: aws sagemaker describe-hyper-parameter-tuning-job --hyper-parameter-tuning-job-name {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
