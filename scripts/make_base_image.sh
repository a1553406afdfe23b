#!/usr/bin/env bash
# Makes a Debian bookworm base image from Debian's own packages, for machines that reach the
# Debian mirrors but no image registry (docs/container.md). It holds python3 and python3-venv, which
# is all the Dockerfile's stages need: build with BASE_IMAGE=<this image>. Does nothing when the
# image already exists (pass --force to remake it). Needs root, debootstrap and podman
# (scripts/install_podman.sh).
#
#   bash scripts/make_base_image.sh [IMAGE] [--force]     # IMAGE: localhost/efficientnet-base:bookworm
set -euo pipefail
IMAGE=localhost/efficientnet-base:bookworm
FORCE=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        *) IMAGE=$arg ;;
    esac
done
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [ "$FORCE" = 0 ] && podman image exists "$IMAGE"; then
    echo "$IMAGE exists: nothing to do"
    exit 0
fi
ROOT=$(mktemp -d /var/tmp/base-rootfs.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOT" "$MIRROR"
# Leave out what an image does not need: apt's package lists and caches, docs, man pages.
chroot "$ROOT" apt-get clean
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/*
tar -C "$ROOT" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$IMAGE"
podman image ls "$IMAGE"
