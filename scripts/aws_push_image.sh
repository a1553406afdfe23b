#!/usr/bin/env bash
# Seller: push a built image to Amazon ECR, where SageMaker and the Marketplace take it from.
#
#   bash scripts/aws_push_image.sh [LOCAL_IMAGE] [TAG]
#       LOCAL_IMAGE  default efficientnet-train:latest (what scripts/build_image.sh builds)
#       TAG          default the package version (efficientnet_train/__init__.py)
#   REGION (default: your AWS configuration's), ACCOUNT (default: the caller's account),
#   REPOSITORY (default efficientnet-train), ENGINE (docker or podman; default: the one that answers)
#   DRY_RUN=1 prints the commands instead of running them (nothing is sent to AWS).
#
# Creates the ECR repository if it is missing, logs the engine in to ECR, tags and pushes, and
# prints the image URI to give scripts/aws_register_algorithm.py (--training-image).
# Needs the AWS CLI v2 and credentials allowed to use ECR.
set -euo pipefail
cd "$(dirname "$0")/.."

LOCAL_IMAGE=${1:-efficientnet-train:latest}
TAG=${2:-$(sed -n 's/^__version__ = "\(.*\)"/\1/p' efficientnet_train/__init__.py)}
REPOSITORY=${REPOSITORY:-efficientnet-train}
DRY_RUN=${DRY_RUN:-}

run() {  # print the command; run it unless DRY_RUN
    echo "+ $*"
    [ -n "$DRY_RUN" ] || "$@"
}

if [ -n "$DRY_RUN" ]; then
    ENGINE=${ENGINE:-docker}
    REGION=${REGION:-us-east-1}
    ACCOUNT=${ACCOUNT:-123456789012}
else
    source scripts/container_engine.sh
    REGION=${REGION:-$(aws configure get region)}
    ACCOUNT=${ACCOUNT:-$(aws sts get-caller-identity --query Account --output text)}
fi
REGISTRY="$ACCOUNT.dkr.ecr.$REGION.amazonaws.com"
URI="$REGISTRY/$REPOSITORY:$TAG"

if [ -n "$DRY_RUN" ] || ! aws ecr describe-repositories --region "$REGION" --repository-names "$REPOSITORY" >/dev/null 2>&1; then
    run aws ecr create-repository --region "$REGION" --repository-name "$REPOSITORY" \
        --image-scanning-configuration scanOnPush=true
fi
# The password goes through a pipe, never onto a command line.
echo "+ aws ecr get-login-password --region $REGION | $ENGINE login --username AWS --password-stdin $REGISTRY"
[ -n "$DRY_RUN" ] || aws ecr get-login-password --region "$REGION" | "$ENGINE" login --username AWS --password-stdin "$REGISTRY"
run "$ENGINE" tag "$LOCAL_IMAGE" "$URI"
run "$ENGINE" push "$URI"
echo "Image URI: $URI"
echo "Next: python scripts/aws_register_algorithm.py --training-image $URI --region $REGION"
