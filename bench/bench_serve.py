"""Benchmark of `gpuctl serve` (issue 11): POST /api/v1/<type>/jobs under 1, 10 and 50 concurrent clients, and
the AWS requests each accepted job costs, against moto on 127.0.0.1.

Run:  .venv/bin/pip install -e '.[dev]' && .venv/bin/python bench/bench_serve.py [--quick]

The server runs as a real process (`python -m gpuctl serve`), pointed at a moto server in a process of its own, whose
WSGI app is wrapped by a counter: every AWS request the server sends is counted by service and operation (from the
SigV4 credential scope, the X-Amz-Target header or the Action parameter). Clients are threads with one keep-alive
httpx connection each; each request is timed from send to the full response. Inputs are https:// URLs with a
public IP literal host (no DNS lookup on this machine, which has no resolver), so the input check costs no AWS
request. Three states of the instance:

* adapter polling: the activity marker says an adapter reported `running` within 60 s: EC2 is never asked;
* running, no adapter report: a stop was fenced since, so each submit asks EC2 (StartInstances, idempotent);
* stopped: the first submit starts it (measured once).

Prints a Markdown table for BENCHMARKS.md. Nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import REGION, Resources, create_resources  # noqa: E402

IMAGE = "https://93.184.216.34/images/input.jpg"
_SCOPE = re.compile(r"Credential=[^/]+/[^/]+/[^/]+/([^/]+)/aws4_request")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CountingMoto:
    """moto's server app behind a WSGI wrapper that counts requests by ``service.Operation``."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def wrap(self, app: Callable[..., Any]) -> Callable[..., Any]:
        def counted(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            if environ.get("PATH_INFO") == "/_bench/take":  # the bench's own: the counts so far, then zero
                body = json.dumps(self.take()).encode()
                start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
                return [body]
            auth = environ.get("HTTP_AUTHORIZATION", "")
            scope = _SCOPE.search(auth)
            if scope:  # an AWS request (not moto's own API)
                service = scope.group(1)
                target = environ.get("HTTP_X_AMZ_TARGET")
                if target:
                    operation = target.rsplit(".", 1)[-1]
                elif service == "s3":
                    operation = f"{environ['REQUEST_METHOD']} object"
                else:
                    length = int(environ.get("CONTENT_LENGTH") or 0)
                    body = environ["wsgi.input"].read(length) if length else b""
                    environ["wsgi.input"] = io.BytesIO(body)
                    text = body.decode("latin-1") + "&" + environ.get("QUERY_STRING", "")
                    match = re.search(r"(?:^|&)Action=([A-Za-z]+)", text)
                    operation = match.group(1) if match else "?"
                with self._lock:
                    self.counts[f"{service}.{operation}"] += 1
            return app(environ, start_response)

        return counted

    def take(self) -> Counter[str]:
        with self._lock:
            taken, self.counts = self.counts, Counter()
        return taken


def run_moto(port: int) -> None:
    """The counting moto server, in the foreground (its own process: it must not share a GIL with the clients)."""
    import logging

    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = CountingMoto().wrap(DomainDispatcherApplication(create_backend_app))
    make_server("127.0.0.1", port, app, threaded=True).serve_forever()


MOTO_PID: list[int] = []
SERVE_PID: list[int] = []


@contextmanager
def moto_server() -> Iterator[str]:

    port = _free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--moto", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    _wait_for(url + "/_bench/take", proc)
    MOTO_PID[:] = [proc.pid]
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def _wait_for(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer")


def take(endpoint: str) -> Counter[str]:
    import httpx

    return Counter(httpx.get(f"{endpoint}/_bench/take", timeout=30).json())


@contextmanager
def serve_process(res: Resources, folder: Path) -> Iterator[str]:

    port = _free_port()
    env = {**os.environ, **res.env(), "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "GPUCTL_CONFIG_DIR": str(folder / "config")}
    log = (folder / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "gpuctl", "serve", "--port", str(port)], env=env, stdout=log,
                            stderr=log)
    url = f"http://127.0.0.1:{port}"
    _wait_for(f"{url}/", proc)
    SERVE_PID[:] = [proc.pid]
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _gateways(res: Resources) -> Any:
    from gpuctl.services.context import Gateways
    from gpuctl.settings import Settings

    return Gateways(Settings(**res.settings_kwargs()))


def load(url: str, clients: int, requests: int) -> tuple[list[float], Counter[int], float]:
    """``requests`` POSTs spread over ``clients`` threads; returns the latencies, status counts and wall time."""
    import httpx

    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    per_client = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]
    start_gate = threading.Barrier(clients + 1)

    def client(n: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            http.get("/")  # connect before the clock starts
            start_gate.wait()
            for _ in range(n):
                started = time.perf_counter()
                try:
                    code = http.post("/api/v1/camera-angle/jobs", json={"image_url": IMAGE, "steps": 8}).status_code
                except httpx.HTTPError:
                    code = 0
                took = time.perf_counter() - started
                with lock:
                    latencies.append(took)
                    statuses[code] += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in per_client]
    for t in threads:
        t.start()
    start_gate.wait()
    wall_start = time.perf_counter()
    for t in threads:
        t.join()
    return latencies, statuses, time.perf_counter() - wall_start


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _describe(counts: Counter[str], jobs: int) -> str:
    total = sum(counts.values())
    ops = ", ".join(f"{k.split('.', 1)[1]} {v}" for k, v in sorted(counts.items()))
    return f"**{total / jobs:.2f}** ({ops})" if jobs else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per level")
    parser.add_argument("--moto", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.moto:
        run_moto(args.moto)
        return
    levels = [(1, 40), (10, 150), (50, 300)] if args.quick else [(1, 100), (10, 400), (50, 800)]
    import boto3

    rows: list[tuple[str, ...]] = []
    with tempfile.TemporaryDirectory() as tmp, moto_server() as endpoint:
        session = boto3.session.Session(aws_access_key_id="bench", aws_secret_access_key="bench", region_name=REGION)
        res = create_resources(session, endpoint)
        gw = _gateways(res)
        with serve_process(res, Path(tmp)) as url:
            import httpx

            # The stopped instance: the first submit starts it.
            httpx.post(f"{url}/api/v1/camera-angle/jobs", json={"image_url": IMAGE}, timeout=60)  # warm-up
            gw.instance.stop()
            gw.table.note_stop()
            take(endpoint)
            started = time.perf_counter()
            first = httpx.post(f"{url}/api/v1/camera-angle/jobs", json={"image_url": IMAGE}, timeout=60)
            took = time.perf_counter() - started
            rows.append(("stopped: the submit that starts it", "1", f"{first.status_code}",
                         f"{took * 1000:.0f} ms", "", "", _describe(take(endpoint), 1)))
            # The floor: the same three writes a submit makes, called straight from one thread of this process.
            from gpuctl.models import JobType, parse_request
            from gpuctl.services.submit import submit_request

            request = parse_request(JobType.CAMERA_ANGLE, {"image_url": IMAGE, "steps": 8})
            gw.table.note_adapter("bench-worker", state="running", jobs_in_hand=0)
            take(endpoint)
            direct = []
            for _ in range(levels[0][1]):
                started = time.perf_counter()
                submit_request(gw, request)
                direct.append(time.perf_counter() - started)
            rows.append(("adapter polling: `submit_request` called in-process, no HTTP", "1", f"{len(direct)}",
                         f"{_pct(direct, 0.5) * 1000:.0f} / {_pct(direct, 0.99) * 1000:.0f} ms",
                         f"{len(direct) / sum(direct):.0f}", "", _describe(take(endpoint), len(direct))))
            for state in ("adapter polling", "running, no adapter report"):
                for clients, requests in levels:
                    if state == "adapter polling":
                        gw.table.note_adapter("bench-worker", state="running", jobs_in_hand=0)
                    else:
                        gw.table.note_stop()
                    take(endpoint)
                    cpu = [cpu_seconds(SERVE_PID[0]), cpu_seconds(MOTO_PID[0])]
                    latencies, statuses, wall = load(url, clients, requests)
                    used = [cpu_seconds(SERVE_PID[0]) - cpu[0], cpu_seconds(MOTO_PID[0]) - cpu[1]]
                    accepted = statuses.get(202, 0)
                    errors = sum(v for k, v in statuses.items() if k != 202)
                    rows.append((state, str(clients), f"{accepted}/{requests} (errors {errors})",
                                 f"{_pct(latencies, 0.5) * 1000:.0f} / {_pct(latencies, 0.99) * 1000:.0f} ms",
                                 f"{accepted / wall:.0f}",
                                 " / ".join(f"{u * 1000 / max(1, accepted):.1f}" for u in used),
                                 _describe(take(endpoint), accepted)))
    load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nRun on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, load average "
          f"before/after the run ≈ {load_avg} (1/5/15 min)\n")
    print("| instance | clients | accepted | p50 / p99 latency | jobs/s | CPU ms per job: serve / moto "
          "| AWS requests per accepted job |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
