#!/usr/bin/env bash
# Builds the training image from the repository's Dockerfile, with `docker` when a Docker engine
# answers, else with `podman` (runc and explicit ulimits: scripts/install_podman.sh, docs/container.md).
#
#   bash scripts/build_image.sh [TAG] [extra build options ...]
#
# TAG defaults to efficientnet-train:latest. Environment:
#   BASE_IMAGE         --build-arg BASE_IMAGE (Dockerfile default: python:3.11-slim-bookworm);
#                      here, where no registry is reachable: localhost/efficientnet-base:bookworm
#                      from scripts/make_base_image.sh
#   PRETRAINED_MODELS  --build-arg PRETRAINED_MODELS when set, even if empty (default in the
#                      Dockerfile: efficientnet_b3, fetched from the Hugging Face hub at build time)
#   ENGINE             docker or podman, to choose instead of detecting
#   LOCAL_PIP_DIRS     wheel directories (find-links) or PEP 503 trees (with simple/) that pip in the
#                      build uses before PyPI, mounted read-only into podman's build; default
#                      "/opt/wheels /opt/pypi /opt/pypi-more", those that exist
#   HOST_CA_BUNDLE     CA bundle pip in the build trusts (podman only; default: the host's
#                      /etc/ssl/certs/ca-certificates.crt, for networks whose proxy has its own CA)
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=efficientnet-train:latest
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
    TAG=$1
    shift
fi

# shellcheck source=container_engine.sh
source scripts/container_engine.sh

args=(build -t "$TAG" -f Dockerfile)
[ -z "${BASE_IMAGE:-}" ] || args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
[ -z "${PRETRAINED_MODELS+set}" ] || args+=(--build-arg "PRETRAINED_MODELS=$PRETRAINED_MODELS")

if [ "$ENGINE" = podman ]; then
    # --format docker: ECR and SageMaker take both, but Docker's format keeps every Dockerfile field.
    args+=(--format docker "${PODMAN_FLAGS[@]}")
    find_links=()
    indexes=()
    for dir in ${LOCAL_PIP_DIRS-/opt/wheels /opt/pypi /opt/pypi-more}; do
        [ -d "$dir" ] || continue
        args+=(-v "$dir:$dir:ro")
        if [ -d "$dir/simple" ]; then indexes+=("file://$dir/simple"); else find_links+=("$dir"); fi
    done
    # pip takes local files before an index's for the same version, so the multi-GB torch and
    # CUDA wheels come off the local disk; anything missing locally still comes from PyPI.
    [ ${#find_links[@]} -eq 0 ] || args+=(--build-arg "PIP_FIND_LINKS=${find_links[*]}")
    [ ${#indexes[@]} -eq 0 ] || args+=(--build-arg "PIP_EXTRA_INDEX_URL=${indexes[*]}")
    ca=${HOST_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
    if [ -n "$ca" ] && [ -f "$ca" ]; then
        args+=(-v "$ca:/etc/build-ca-bundle.crt:ro" --build-arg PIP_CERT=/etc/build-ca-bundle.crt)
    fi
fi

start=$(date +%s)
echo "+ $ENGINE ${args[*]} $* ."
"$ENGINE" "${args[@]}" "$@" .
elapsed=$(( $(date +%s) - start ))
size=$("$ENGINE" image inspect --format '{{.Size}}' "$TAG")
echo "Built $TAG with $ENGINE in ${elapsed}s; image size $(numfmt --to=iec --suffix=B "$size") ($size bytes)"
