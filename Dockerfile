# The SageMaker training image: fine-tunes a timm EfficientNet on folders of labelled images.
# Started with `serve` instead, the same image hosts the trained model (endpoint or batch transform).
#
# SageMaker runs `docker run IMAGE train` (and `IMAGE serve` for endpoints), so the console
# scripts are plain commands on PATH (/opt/venv/bin) and there is no ENTRYPOINT to swallow that
# argument: `train` runs as the container's process itself and receives SIGTERM directly.
#
# Build (scripts/build_image.sh picks docker or podman and passes the local wheel mounts):
#   docker build -t efficientnet-train .
#   docker build --build-arg PRETRAINED_MODELS="efficientnet_b3 efficientnet_b0" -t efficientnet-train .
#   docker build --build-arg BASE_IMAGE=localhost/efficientnet-base:bookworm --build-arg PRETRAINED_MODELS= ...
#
# BASE_IMAGE needs python3 (>= 3.10) with the venv module, at the same path in both stages. No
# CUDA base is needed: PyPI's Linux torch wheels bring their own CUDA runtime libraries
# (nvidia-* wheels), and the GPU driver is mounted by the NVIDIA container toolkit at run time.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Where pip finds packages. Empty in the cloud (PyPI); scripts/build_image.sh points them at
# local wheel directories mounted into the build (and at the host's CA bundle) where it can.
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_FIND_LINKS=""
ARG PIP_CERT=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /src

# Dependencies first, at the versions in constraints.txt, so that code changes rebuild only the
# last small layer. Empty PIP_* build args are unset: pip would read an empty index URL literally.
COPY pyproject.toml constraints.txt ./
RUN for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CERT; do \
        [ -n "${!var}" ] || unset "$var"; \
    done; \
    python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
        print("\n".join(p["dependencies"] + p["optional-dependencies"]["export"]))' \
        > /tmp/requirements.txt; \
    pip install -c constraints.txt -r /tmp/requirements.txt

COPY README.md ./
COPY efficientnet_train ./efficientnet_train
# --no-build-isolation: the venv's setuptools (a torch dependency) builds it, nothing is fetched.
RUN pip install --no-deps --no-build-isolation -c constraints.txt . \
    && pip check \
    && pip freeze --all > /opt/venv/requirements.lock

# ImageNet weights baked into the Hugging Face cache (HF_HOME, where hyperparameters.shipped_weights() and
# timm look at run time), one timm model name per word; empty bakes none (no hub reachable).
ARG PRETRAINED_MODELS="efficientnet_b3"
ENV HF_HOME=/opt/hf TORCH_HOME=/opt/hf/torch
RUN mkdir -p "$HF_HOME"; \
    for name in ${PRETRAINED_MODELS//,/ }; do \
        echo "Baking ImageNet weights of $name"; \
        HF_HUB_OFFLINE=0 python -c 'import sys, timm; timm.create_model(sys.argv[1], pretrained=True)' "$name" || exit 1; \
        HF_HUB_OFFLINE=1 python -c 'import sys, timm; timm.create_model(sys.argv[1], pretrained=True)' "$name" || exit 1; \
    done; \
    rm -rf "$HF_HOME/xet" "$HF_HOME/token" "$HF_HOME/stored_tokens"; \
    python -c 'from efficientnet_train.hyperparameters import shipped_weights; print("Shipped weights:", shipped_weights())'


FROM ${BASE_IMAGE}
ARG PRETRAINED_MODELS="efficientnet_b3"
LABEL org.opencontainers.image.title="efficientnet-train" \
      org.opencontainers.image.description="SageMaker training container: fine-tune a timm EfficientNet on folders of labelled images" \
      com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true \
      efficientnet-train.pretrained-models="${PRETRAINED_MODELS}"
# Caches and the working directory live outside /opt/ml, which SageMaker mounts over at run time.
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    HF_HOME=/opt/hf \
    TORCH_HOME=/opt/hf/torch \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/hf /opt/hf
WORKDIR /opt/program
# `serve` listens here unless SageMaker passes SAGEMAKER_BIND_TO_PORT (allowed by the label above).
EXPOSE 8080
# `train` when no command is given; SageMaker's `train` / `serve` argument replaces it.
CMD ["train"]
