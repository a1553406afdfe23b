#!/usr/bin/env bash
# Installs what building and running the image takes on a Debian bookworm machine without a
# Docker engine (GUIDE.md §5): podman with runc (crun fails on hybrid cgroups), debootstrap for
# a locally made base image, and the classic docker-compose client the SageMaker SDK's local
# mode drives. Writes /etc/containers/containers.conf so that plain `podman run`/`podman build`
# (and podman's Docker-compatible API) use runc and explicit ulimits. Run as root; safe to rerun.
#
#   sudo bash scripts/install_podman.sh
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
PACKAGES=(podman runc debootstrap docker-compose)

missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

CONF=/etc/containers/containers.conf
WANT='[engine]
runtime = "runc"

[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]'
if [ "$(cat "$CONF" 2>/dev/null)" != "$WANT" ]; then
    if [ -s "$CONF" ]; then
        $SUDO cp "$CONF" "$CONF.bak.$(date +%s)"
    fi
    $SUDO mkdir -p /etc/containers
    printf '%s\n' "$WANT" | $SUDO tee "$CONF" >/dev/null
fi

podman --version
runc --version | sed -n 1p
docker-compose --version
