#!/usr/bin/env bash
# Installs what building and running the image takes on a Debian bookworm machine without a
# Docker engine (docs/container.md): podman with runc (crun fails on hybrid cgroups), debootstrap for
# a locally made base image, and the classic docker-compose client the SageMaker SDK's local
# mode drives, and CNI's dnsname plugin, without which podman's networks have no DNS: local mode
# with instance_count > 1 starts algo-1-xxxx and algo-2-xxxx on one compose network, and they only
# find each other by those names (Docker's user-defined networks resolve them; podman's CNI
# backend does not without the plugin, and `train` then waits for the names until it times out).
# Writes /etc/containers/containers.conf so that plain `podman run`/`podman build` (and podman's
# Docker-compatible API) use runc and explicit ulimits. Run as root; safe to rerun.
#
#   sudo bash scripts/install_podman.sh
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
PACKAGES=(podman runc debootstrap docker-compose golang-github-containernetworking-plugin-dnsname)

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

# A network made before the plugin was there keeps dns_enabled false: remove it, docker compose makes
# it again (with DNS) on the next job. Only when no container uses it.
NETWORK=sagemaker-local
if [ "$($SUDO podman network inspect --format '{{.DNSEnabled}}' "$NETWORK" 2>/dev/null)" = false ]; then
    if [ -z "$($SUDO podman ps -a -q --filter "network=$NETWORK")" ]; then
        $SUDO podman network rm "$NETWORK" >/dev/null && echo "Removed network $NETWORK (made without DNS)"
    else
        echo "Network $NETWORK has no DNS but containers use it: remove them, then run 'podman network rm $NETWORK'" >&2
    fi
fi

podman --version
runc --version | sed -n 1p
docker-compose --version
