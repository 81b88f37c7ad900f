"""Benchmark of `gpuctl serve` (issue 11): POST /api/v1/<type>/jobs under 1, 10 and 50 concurrent clients, and
the AWS requests each accepted job costs, against moto on 127.0.0.1.

Run:  .venv/bin/pip install -e '.[dev,bench]' && .venv/bin/python bench/bench_serve.py [--quick]
      (--profile DIR: yappi CPU profiles of both servers, after `pip install yappi`)

The server runs as a real process (`python -m gpuctl serve`), pointed at a moto server in a process of its own: moto's
WSGI app served by waitress (keep-alive connections, as AWS keeps them; werkzeug's dev server, `--moto-wsgi
werkzeug`, closes every connection and starts a thread for the next), wrapped by a counter: every AWS request the
server sends is counted by service and operation (from the SigV4 credential scope, the X-Amz-Target header or the
Action parameter). A stand-in adapter in a third process takes the messages off the queue as they arrive (its
requests are not counted, its CPU in moto is), so moto's queue holds what is in flight, as a polled queue does,
not every message of the run: moto's SendMessage scans its whole queue (about 40 µs per message held), real SQS
does not. Clients are threads with one keep-alive `http.client` connection each; each request is timed from send to
the full response. Inputs are https:// URLs with a public IP literal host (no DNS lookup on this machine, which has
no resolver), so the input check costs no AWS request. Three states of the instance:

* adapter polling: the activity marker says an adapter reported `running` within 60 s: EC2 is never asked;
* running, no adapter report: a stop was fenced since, so each submit asks EC2 (StartInstances, idempotent);
* stopped: the first submit starts it (measured once).

Prints a Markdown table for BENCHMARKS.md, with the load average after each level. Nothing here runs in the test
suite.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
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
_SCOPE = re.compile(r"Credential=([^/]+)/[^/]+/[^/]+/([^/]+)/aws4_request")
#: The access key of the bench's stand-in adapter: its requests are not the server's, so they are not counted.
DRAINER_KEY = "bench-adapter"


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
            if scope and scope.group(1) != DRAINER_KEY:  # an AWS request (not moto's own API, not the drainer)
                service = scope.group(2)
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


@contextmanager
def yappi_profile(out: str | None) -> Iterator[None]:
    """CPU-clock profile of every thread of this process, saved as pstats to ``out`` at the end (if asked for)."""
    if not out:
        yield
        return
    import yappi  # not a dependency: `pip install yappi` to profile

    yappi.set_clock_type("cpu")
    yappi.start(builtins=False)
    try:
        yield
    finally:
        yappi.stop()
        yappi.get_func_stats().save(out, type="pstat")


def run_serve_profiled(out: str, argv: list[str]) -> None:
    """``python -m gpuctl serve …`` under :func:`yappi_profile` (uvicorn returns after its SIGTERM shutdown)."""
    from gpuctl.__main__ import main as gpuctl_main

    sys.argv = ["gpuctl", *argv]
    with yappi_profile(out), contextlib.suppress(SystemExit):
        gpuctl_main()


def run_moto(port: int, profile: str | None = None, wsgi: str = "waitress") -> None:
    """The counting moto server, in the foreground (its own process: it must not share a GIL with the clients)."""
    import logging

    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = CountingMoto().wrap(DomainDispatcherApplication(create_backend_app))

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with yappi_profile(profile), contextlib.suppress(KeyboardInterrupt):
        if wsgi == "werkzeug":
            make_server("127.0.0.1", port, app, threaded=True).serve_forever()
        else:
            import waitress

            waitress.serve(app, host="127.0.0.1", port=port, threads=8, _quiet=True)


#: The instance states a level runs in (--states).
STATES = {"polling": "adapter polling", "running": "running, no adapter report"}
MOTO_PID: list[int] = []
PROFILE: list[Path] = []  # --profile DIR
MOTO_WSGI = ["waitress"]  # --moto-wsgi
SERVE_PID: list[int] = []


@contextmanager
def moto_server() -> Iterator[str]:

    port = _free_port()
    profile = ["--profile", str(PROFILE[0] / "moto.pstat")] if PROFILE else []
    proc = subprocess.Popen([sys.executable, __file__, "--moto", str(port), "--moto-wsgi", MOTO_WSGI[0], *profile],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    _wait_for(url + "/_bench/take", proc)
    MOTO_PID[:] = [proc.pid]
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def drain(endpoint: str, queue_url: str, receivers: int = 4, idle: float = 0.25) -> None:
    """The stand-in adapter: take the messages off the queue as they come, 10 a ReceiveMessage and one
    DeleteMessageBatch each, so moto's queue holds what is in flight, not every message ever sent (moto's SendMessage
    and ReceiveMessage scan the whole queue; real SQS does not). Several receivers, each resting ``idle`` seconds
    after an empty answer: while the servers keep moto busy, each request waits its turn behind theirs."""
    import boto3

    sqs = boto3.session.Session(aws_access_key_id=DRAINER_KEY, aws_secret_access_key="bench",
                                region_name=REGION).client("sqs", endpoint_url=endpoint)

    def receiver() -> None:
        while True:
            messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                           VisibilityTimeout=300).get("Messages", [])
            if not messages:
                time.sleep(idle)
                continue
            sqs.delete_message_batch(QueueUrl=queue_url, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)])

    threads = [threading.Thread(target=receiver, daemon=True) for _ in range(receivers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@contextmanager
def drainer(endpoint: str, queue_url: str) -> Iterator[None]:
    """:func:`drain` in a process of its own (its CPU is not the clients' nor the server's)."""
    proc = subprocess.Popen([sys.executable, __file__, "--drain", endpoint, queue_url], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        yield
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
    command = ["serve", "--port", str(port)]
    if PROFILE:
        command = [__file__, "--serve-profiled", str(PROFILE[0] / "serve.pstat"), "--", *command]
    else:
        command = ["-m", "gpuctl", *command]
    proc = subprocess.Popen([sys.executable, *command], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    _wait_for(f"{url}/", proc)
    SERVE_PID[:] = [proc.pid]
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(90)  # a graceful shutdown: up to 25 s for requests in flight, then the last note
        log.close()


def _gateways(res: Resources) -> Any:
    from gpuctl.services.context import Gateways
    from gpuctl.settings import Settings

    return Gateways(Settings(**res.settings_kwargs()))


def load(url: str, clients: int, requests: int) -> tuple[list[float], Counter[int], float]:
    """``requests`` POSTs spread over ``clients`` threads; returns the latencies, status counts and wall time.

    Each client is a thread with one keep-alive ``http.client`` connection: a quarter of httpx's CPU per request
    (0.34 vs 1.43 ms measured), which the clients would otherwise take from the two servers on this machine.
    """
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(url)
    body = json.dumps({"image_url": IMAGE, "steps": 8}).encode()
    headers = {"Content-Type": "application/json"}
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    per_client = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]
    start_gate = threading.Barrier(clients + 1)

    def client(n: int) -> None:
        conn = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port, timeout=60)
        conn.request("GET", "/")  # connect before the clock starts
        conn.getresponse().read()
        start_gate.wait()
        for _ in range(n):
            started = time.perf_counter()
            try:
                conn.request("POST", "/api/v1/camera-angle/jobs", body=body, headers=headers)
                response = conn.getresponse()
                response.read()  # the whole answer
                code = response.status
            except (OSError, http.client.HTTPException):
                conn.close()  # reconnects on the next request
                code = 0
            took = time.perf_counter() - started
            with lock:
                latencies.append(took)
                statuses[code] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in per_client]
    for t in threads:
        t.start()
    start_gate.wait()
    wall_start = time.perf_counter()
    for t in threads:
        t.join()
    return latencies, statuses, time.perf_counter() - wall_start


def _depth(gw: Any) -> str:
    """Messages moto's queue holds now (visible + in flight): what its SendMessage scans."""
    stats = gw.queue.attributes()
    return str(sum(int(stats.get(f"ApproximateNumberOf{kind}", 0)) for kind in ("Messages", "MessagesNotVisible")))


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
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="profile both servers' CPU with yappi (pstats files in DIR; needs `pip install yappi`)")
    parser.add_argument("--moto-wsgi", choices=("waitress", "werkzeug"), default="waitress",
                        help="the WSGI server that serves moto (default: waitress, which keeps connections alive)")
    parser.add_argument("--states", type=lambda v: v.split(","), default=list(STATES),
                        help="the instance states to load, comma-separated: polling, running (default: both)")
    parser.add_argument("--no-drain", action="store_true",
                        help="no stand-in adapter: every message stays in moto's queue (as the bench did before)")
    parser.add_argument("--moto", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--drain", nargs=2, metavar=("ENDPOINT", "QUEUE_URL"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-profiled", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.moto:
        run_moto(args.moto, str(args.profile) if args.profile else None, args.moto_wsgi)
        return
    if args.drain:
        drain(*args.drain)
        return
    if args.serve_profiled:
        run_serve_profiled(args.serve_profiled, args.rest)
        return
    MOTO_WSGI[:] = [args.moto_wsgi]
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        PROFILE[:] = [args.profile.resolve()]
    levels = [(1, 40), (10, 150), (50, 300)] if args.quick else [(1, 100), (10, 400), (50, 800)]
    import boto3

    rows: list[tuple[str, ...]] = []
    with tempfile.TemporaryDirectory() as tmp, moto_server() as endpoint:
        session = boto3.session.Session(aws_access_key_id="bench", aws_secret_access_key="bench", region_name=REGION)
        res = create_resources(session, endpoint)
        gw = _gateways(res)
        consumer = contextlib.nullcontext() if args.no_drain else drainer(endpoint, res.queue_url)
        with consumer, serve_process(res, Path(tmp)) as url:
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
                         f"{took * 1000:.0f} ms", "", "", _describe(take(endpoint), 1), "", ""))
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
                         f"{len(direct) / sum(direct):.0f}", "", _describe(take(endpoint), len(direct)), "", ""))
            for state in [STATES[s] for s in args.states]:
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
                                 _describe(take(endpoint), accepted), _depth(gw),
                                 f"{os.getloadavg()[0]:.1f}"))
    load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nRun on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, load average "
          f"before/after the run ≈ {load_avg} (1/5/15 min)\n")
    print("| instance | clients | accepted | p50 / p99 latency | jobs/s | CPU ms per job: serve / moto "
          "| AWS requests per accepted job | messages in the queue after | load (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
