#!/usr/bin/env bash
# Serves Podman's Docker-compatible API on the Docker socket, so that Docker clients (the
# SageMaker SDK's local mode, docker-compose 1.29, the docker Python package) work on a machine
# without a Docker engine (docs/container.md). Idempotent: does nothing when the socket already answers.
# Run as root (the socket is /var/run/docker.sock); podman and docker-compose come from
# scripts/install_podman.sh.
#
#   bash scripts/start_podman_socket.sh
#
# Environment: SOCKET (default /var/run/docker.sock), LOG (default /tmp/podman-docker-socket.log).
# The service runs in the background with no idle timeout; stop it with
#   kill "$(cat /tmp/podman-docker-socket.pid)"
set -euo pipefail
SOCKET=${SOCKET:-/var/run/docker.sock}
LOG=${LOG:-/tmp/podman-docker-socket.log}
PIDFILE=${PIDFILE:-/tmp/podman-docker-socket.pid}

answers() {
    # GET /_ping on the Docker API answers "OK"; curl when there is one, else Python's stdlib.
    [ -S "$SOCKET" ] || return 1
    if command -v curl >/dev/null; then
        [ "$(curl -s --max-time 5 --unix-socket "$SOCKET" http://d/_ping 2>/dev/null)" = OK ]
    else
        python3 - "$SOCKET" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
    s.sendall(b"GET /_ping HTTP/1.0\r\nHost: d\r\n\r\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    sys.exit(0 if data.split(b"\r\n", 1)[0].split()[1:2] == [b"200"] else 1)
except (OSError, IndexError):
    sys.exit(1)
PY
    fi
}

if answers; then
    echo "$SOCKET already answers"
    exit 0
fi
command -v podman >/dev/null || { echo "podman is missing: run scripts/install_podman.sh" >&2; exit 1; }
# A socket file left by a dead service would make podman fail to bind.
[ ! -S "$SOCKET" ] || rm -f "$SOCKET"
mkdir -p "$(dirname "$SOCKET")"
nohup podman system service --time=0 "unix://$SOCKET" >>"$LOG" 2>&1 </dev/null &
echo $! > "$PIDFILE"
for _ in $(seq 1 50); do
    if answers; then
        echo "Podman's Docker API serves $SOCKET (pid $(cat "$PIDFILE"), log $LOG)"
        exit 0
    fi
    sleep 0.2
done
echo "Podman's service did not answer on $SOCKET within 10 s; see $LOG" >&2
exit 1
