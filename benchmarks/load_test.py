"""Load-test `serve` on loopback: latency percentiles, requests per second and errors per concurrency.

Each client thread keeps one connection and posts the same image back to back for the whole
run; a separate thread asks /ping four times a second, to show it stays fast under load.

    python benchmarks/load_test.py --base /tmp/serve-bench/opt_ml            # starts serve on that model
    python benchmarks/load_test.py --url http://127.0.0.1:8080 --duration 10 # a server already running
    SERVE_MAX_BATCH_SIZE=1 python benchmarks/load_test.py --base ...         # the server's settings pass through
    python benchmarks/load_test.py --base ... --concurrency 0 --slow-clients 16 --idle-clients 100 --duration 10

--slow-clients holds that many connections that sent a request's headers and 2 of its 5,000 body bytes,
--idle-clients that many that sent nothing, for each level: /ping must stay fast all the same.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
# A bee of the listing's example set (https://download.pytorch.org/tutorial/hymenoptera_data.zip, unzipped into data/).
DEFAULT_IMAGE = (Path(os.environ.get("HYMENOPTERA_DATA", REPO / "data" / "hymenoptera_data"))
                 / "val" / "bees" / "1032546534_06907fe3b3.jpg")


class Results:
    def __init__(self):
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors: list[str] = []

    def add(self, latency: float | None, error: str | None = None) -> None:
        with self.lock:
            if error:
                self.errors.append(error)
            else:
                self.latencies.append(latency)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def client(host: str, port: int, body: bytes, deadline: float, results: Results) -> None:
    connection = http.client.HTTPConnection(host, port, timeout=60)
    while time.monotonic() < deadline:
        start = time.perf_counter()
        try:
            connection.request("POST", "/invocations", body=body, headers={"Content-Type": "image/jpeg"})
            response = connection.getresponse()
            payload = response.read()
            if response.status == 200:
                results.add(time.perf_counter() - start)
            else:
                results.add(None, f"HTTP {response.status}: {payload[:200]!r}")
        except (OSError, http.client.HTTPException) as exc:
            results.add(None, f"{type(exc).__name__}: {exc}")
            connection.close()
            connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.close()


def pinger(host: str, port: int, deadline: float, results: Results) -> None:
    connection = http.client.HTTPConnection(host, port, timeout=10)
    while time.monotonic() < deadline:
        start = time.perf_counter()
        try:
            connection.request("GET", "/ping")
            response = connection.getresponse()
            response.read()
            results.add(time.perf_counter() - start, None if response.status == 200 else f"ping {response.status}")
        except (OSError, http.client.HTTPException) as exc:
            results.add(None, f"ping {type(exc).__name__}: {exc}")
            connection.close()
            connection = http.client.HTTPConnection(host, port, timeout=10)
        time.sleep(0.25)
    connection.close()


def hostile_connections(host: str, port: int, slow: int, idle: int) -> list[socket.socket]:
    """Connections a careless or hostile client leaves open: a body that never finishes, or nothing at all."""
    connections = []
    for count, first_bytes in ((slow, b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                                      b"Content-Length: 5000\r\n\r\n\x89P"), (idle, b"")):
        for _ in range(count):
            connection = socket.create_connection((host, port), timeout=10)
            if first_bytes:
                connection.sendall(first_bytes)
            connections.append(connection)
    return connections


def run(host: str, port: int, body: bytes, concurrency: int, duration: float, slow: int = 0, idle: int = 0) -> dict:
    results, pings = Results(), Results()
    hostile = hostile_connections(host, port, slow, idle)
    deadline = time.monotonic() + duration
    threads = [threading.Thread(target=client, args=(host, port, body, deadline, results)) for _ in range(concurrency)]
    threads.append(threading.Thread(target=pinger, args=(host, port, deadline, pings)))
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    for connection in hostile:
        connection.close()
    return {"concurrency": concurrency, "requests": len(results.latencies), "errors": len(results.errors),
            "rps": len(results.latencies) / elapsed, "ping_p50_ms": 1000 * percentile(pings.latencies or [0], 0.50), "p50_ms": 1000 * percentile(results.latencies, 0.50),
            "p99_ms": 1000 * percentile(results.latencies, 0.99), "ping_max_ms": 1000 * max(pings.latencies or [0]),
            "ping_errors": len(pings.errors), "first_error": (results.errors + pings.errors or [""])[0]}


def start_server(base: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = shutil.which("serve", path=str(Path(sys.executable).parent)) or "serve"
    process = subprocess.Popen([command], env={**os.environ, "SAGEMAKER_BASE_DIR": str(base),
                                               "SAGEMAKER_BIND_TO_PORT": str(port)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        if process.poll() is not None:
            sys.exit(f"serve exited with {process.returncode}; run it by hand to see why")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/ping")
            if connection.getresponse().status == 200:
                return process, port
        except OSError:
            time.sleep(0.2)
    process.terminate()
    sys.exit("serve did not become ready within two minutes")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8080")
    target.add_argument("--base", type=Path, help="start serve with SAGEMAKER_BASE_DIR=BASE (model in BASE/model)")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--duration", type=float, default=60, help="seconds per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--slow-clients", type=int, default=0, help="connections stalled in their body, per level")
    parser.add_argument("--idle-clients", type=int, default=0, help="connections that send nothing, per level")
    options = parser.parse_args()

    body = options.image.read_bytes()
    process = None
    if options.base:
        process, port = start_server(options.base)
        host = "127.0.0.1"
    else:
        parts = urlsplit(options.url)
        host, port = parts.hostname, parts.port or 80
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; image {options.image.name} ({len(body)} bytes); "
          f"{options.duration:g} s per level; SERVE_MAX_BATCH_SIZE={os.environ.get('SERVE_MAX_BATCH_SIZE', 'default')}; "
          f"{options.slow_clients} slow and {options.idle_clients} idle connections held")
    print(f"{'concurrency':>11} {'requests':>8} {'errors':>6} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'ping p50 ms':>11} {'ping max ms':>11}")
    failed = False
    try:
        for concurrency in options.concurrency:
            r = run(host, port, body, concurrency, options.duration, options.slow_clients, options.idle_clients)
            print(f"{r['concurrency']:>11} {r['requests']:>8} {r['errors'] + r['ping_errors']:>6} {r['rps']:>7.2f} "
                  f"{r['p50_ms']:>7.0f} {r['p99_ms']:>7.0f} {r['ping_p50_ms']:>11.1f} {r['ping_max_ms']:>11.0f}",
                  flush=True)
            if r["first_error"]:
                print(f"  first error: {r['first_error']}")
                failed = True
    finally:
        if process:
            process.terminate()
            process.wait(timeout=40)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
