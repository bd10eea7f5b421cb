"""What the perimeter costs: a site's Fleet API calls through nginx against the same
calls straight to the SuperLink, side by side in one run.

    python -m benchmarks.perimeter [--requests N] [--payload-mib M] [--no-record]

It starts `fedlora coordinator start` (a real flower-superlink on loopback, its
SuperExec and nginx in front) on a fresh PKI, then times, for each path in turn and
interleaved in rounds so that drift hits both alike, N small Fleet requests (a
heartbeat; the SuperLink answers an unregistered node 401 after running its whole
middleware stack) and a few large ones (a push-object body of M MiB, the size of a big
adapter update) over one keep-alive HTTPS connection, as a SuperNode's client does.
Printed: median and p95 per request, the ratio through nginx / direct, and the extra
milliseconds per round for a site making ``--requests-per-round`` calls of each kind.
Written to benchmarks/results.json under ``perimeter``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from benchmarks.results import report
from common import pki
from common.cli import configure_logging
from common.processes import executable

HEARTBEAT = "/v1/fleet/send-node-heartbeat"
PUSH_OBJECT = "/v1/fleet/push-object"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def coordinator(root: Path) -> Iterator[tuple[int, int, Path]]:
    """A running `fedlora coordinator start`: (nginx port, SuperLink port, CA file)."""
    certs = root / "certs"
    pki.init_pki(certs, ["127.0.0.1"])
    port, upstream = _free_port(), _free_port()
    log = (root / "coordinator.log").open("w")
    process = subprocess.Popen(
        [executable("fedlora"), "coordinator", "start", "--certs", str(certs),
         "--state-dir", str(root / "state"), "--port", str(port),
         "--superlink-port", str(upstream)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "site(s) registered" not in (root / "coordinator.log").read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((root / "coordinator.log").read_text()[-3000:])
            time.sleep(0.5)
        yield port, upstream, certs / pki.CA_CERT
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def _timed(client: httpx.Client, url: str, body: bytes) -> float:
    began = time.perf_counter()
    response = client.post(url, content=body, headers={"Content-Type": "application/protobuf"})
    elapsed = time.perf_counter() - began
    if response.status_code not in (400, 401):  # answered by the SuperLink, not nginx
        raise RuntimeError(f"{url}: unexpected {response.status_code} {response.text[:200]}")
    return elapsed


def measure(
    ports: dict[str, int], ca: Path, requests: int, payload_mib: float
) -> dict[str, dict[str, list[float]]]:
    """Seconds per request, per path ("nginx", "direct") and kind ("small", "large")."""
    payload = os.urandom(int(payload_mib * 2**20))
    times: dict[str, dict[str, list[float]]] = {path: {"small": [], "large": []} for path in ports}
    clients = {
        path: httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=str(ca), timeout=120)
        for path, port in ports.items()
    }
    with contextlib.ExitStack() as stack:
        for client in clients.values():
            stack.enter_context(client)
            for _ in range(10):  # warm-up: connection, TLS session, the app's caches
                _timed(client, HEARTBEAT, b"")
        large_every = max(1, requests // 10)
        for index in range(requests):
            for path, client in clients.items():
                times[path]["small"].append(_timed(client, HEARTBEAT, b""))
                if index % large_every == 0:
                    times[path]["large"].append(_timed(client, PUSH_OBJECT, payload))
    return times


def summarise(times: dict[str, dict[str, list[float]]], requests_per_round: int) -> dict[str, Any]:
    """Median and p95 in ms, ratios through nginx / direct, extra ms per site-round."""
    figures: dict[str, Any] = {}
    extra_per_round = 0.0
    for kind in ("small", "large"):
        medians = {}
        for path in ("direct", "nginx"):
            values = sorted(times[path][kind])
            medians[path] = statistics.median(values)
            figures[f"{kind}_{path}_median_ms"] = round(1000 * medians[path], 3)
            figures[f"{kind}_{path}_p95_ms"] = round(
                1000 * values[min(len(values) - 1, int(0.95 * len(values)))], 3
            )
        figures[f"{kind}_ratio"] = round(medians["nginx"] / medians["direct"], 3)
        extra = medians["nginx"] - medians["direct"]
        figures[f"{kind}_extra_ms"] = round(1000 * extra, 3)
        calls = requests_per_round if kind == "small" else 2  # an update up, an adapter down
        extra_per_round += calls * extra
    figures["requests_per_round"] = requests_per_round
    figures["extra_ms_per_site_round"] = round(1000 * extra_per_round, 1)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.perimeter",
        description="Fleet API calls through the coordinator's nginx perimeter against "
        "the same calls straight to the SuperLink, in one run.",
    )
    parser.add_argument("--requests", type=int, default=300, help="Small requests per path.")
    parser.add_argument(
        "--payload-mib", type=float, default=8.0, help="Body of each large request (MiB)."
    )
    parser.add_argument(
        "--requests-per-round",
        type=int,
        default=72,
        help="Fleet calls a site makes per round, to turn the per-request cost into a "
        "per-round one (default: as counted in nginx's access log of the e2e deployment "
        "test: 754 calls for 21 messages answered, ~36 per message, and a round is a "
        "train and an evaluate message).",
    )
    parser.add_argument(
        "--no-record", action="store_true", help="Do not write benchmarks/results.json."
    )
    arguments = parser.parse_args(argv)
    configure_logging(False)
    with (
        tempfile.TemporaryDirectory(prefix="fedlora-perimeter-") as folder,
        coordinator(Path(folder)) as (port, upstream, ca),
    ):
        times = measure(
            {"direct": upstream, "nginx": port}, ca, arguments.requests, arguments.payload_mib
        )
    figures = {
        "requests": arguments.requests,
        "payload_mib": arguments.payload_mib,
        **summarise(times, arguments.requests_per_round),
    }
    report("perimeter", figures, keep=not arguments.no_record)


if __name__ == "__main__":
    main()
