# Sourced by the image scripts: sets ENGINE (unless set) to `docker` when a Docker engine answers,
# else `podman`, and PODMAN_FLAGS to what podman needs without a Docker engine (docs/container.md;
# harmless elsewhere). Podman's Docker-compatible socket (for the SageMaker SDK's local mode) answers
# `docker info` too: podman's own CLI is used then, since it can mount the local wheels in builds.
if [ -z "${ENGINE:-}" ]; then
    ENGINE=podman
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        server=$(docker version --format '{{range .Server.Components}}{{.Name}} {{end}}' 2>/dev/null || true)
        if [[ "$server" != *Podman* ]] || ! command -v podman >/dev/null; then
            ENGINE=docker
        fi
    fi
fi
command -v "$ENGINE" >/dev/null || {
    echo "Neither a Docker engine nor podman found (scripts/install_podman.sh installs podman)" >&2
    exit 1
}
PODMAN_FLAGS=()
[ "$ENGINE" != podman ] || PODMAN_FLAGS=(--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=4096:4096)
