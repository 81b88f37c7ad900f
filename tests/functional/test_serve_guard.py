"""`gpuctl serve` attacked, as a real process: an unhealthy backend, SIGTERM with a request in flight, bad settings,
an error that escapes; and jobs submitted over HTTP run by the real adapter and read back."""

from __future__ import annotations

import json
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.functional import test_adapter as harness
from tests.helpers import Resources, emulator_counts, run_cli
from tests.serve_process import README_HOST, ServeProcess

pytestmark = pytest.mark.server

# The daemon test harness of test_adapter.py (stand-ins, adapter processes, gateways, an input image).
standin_factory = harness.standin_factory
standin = harness.standin
adapter_factory = harness.adapter_factory
gw = harness.gw
input_url = harness.input_url

IMAGE = f"https://{README_HOST}/images/input.jpg"


@pytest.fixture
def serve(server_aws: Resources, tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Start `gpuctl serve` processes against the moto server; each is stopped at the end."""
    procs: list[ServeProcess] = []

    def start(*args: str, **env: str) -> ServeProcess:
        proc = ServeProcess({**server_aws.env(), **env}, tmp_path / f"serve-{len(procs)}.log", free_port(),
                            list(args))
        procs.append(proc)
        return proc.start()

    yield start
    for proc in procs:
        proc.stop()


def submit(api: ServeProcess, body: Any = None, **kw: Any) -> httpx.Response:
    return httpx.post(f"{api.base_url}/api/v1/camera-angle/jobs", json={"image_url": IMAGE} if body is None else body,
                      timeout=30, **kw)


def test_an_unreachable_table_makes_health_503_and_no_traceback_anywhere(serve):
    """A table that does not exist: /health is 503 naming it; a submit fails in one sentence, never a traceback."""
    # GIVEN a server pointed at a table that is not there
    api = serve(GPUCTL_TABLE_NAME="no-such-table")
    # WHEN health is checked and a job submitted
    health = httpx.get(f"{api.base_url}/health", timeout=30)
    submitted = submit(api)
    # THEN health says which component is down
    assert health.status_code == 503
    body = health.json()
    assert body["status"] == "unhealthy" and body["message"] == "Orchestrator has issues"
    assert body["components"]["dynamodb"].startswith("unhealthy: ") and body["components"]["sqs"] == "healthy"
    # AND the submit is refused with a sentence, no stack trace
    assert submitted.status_code >= 400 and isinstance(submitted.json()["detail"], str)
    assert "Traceback" not in submitted.text and "botocore" not in submitted.text


def test_sigterm_lets_a_submit_in_flight_finish_then_exits_0(serve, server_aws):
    """SIGTERM while a POST body is still arriving: that job is answered 202 and queued, then the server exits 0."""
    # GIVEN a server and a submit whose body arrives in two parts
    api = serve()
    first_part_sent, go_on = threading.Event(), threading.Event()
    body = json.dumps({"image_url": IMAGE, "prompt": "in flight"}).encode()

    def parts() -> Iterator[bytes]:
        yield body[:20]
        first_part_sent.set()
        go_on.wait(30)
        yield body[20:]

    result: dict[str, Any] = {}

    def send() -> None:
        result["response"] = httpx.post(f"{api.base_url}/api/v1/camera-angle/jobs", content=parts(), timeout=60,
                                        headers={"Content-Type": "application/json"})

    sender = threading.Thread(target=send)
    sender.start()
    assert first_part_sent.wait(30)
    time.sleep(0.5)
    # WHEN SIGTERM arrives mid-request, and the rest of the body after it
    assert api.proc is not None
    api.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    go_on.set()
    sender.join(60)
    # THEN the request was served, its job recorded and queued, and the server stopped cleanly
    response = result["response"]
    assert response.status_code == 202, response.text
    assert api.proc.wait(30) == 0
    counts = emulator_counts(server_aws)
    assert (counts.records, counts.messages) == (1, 1)
    assert any(e.get("event") == "serve.stopped" for e in api.log_lines())


def test_sigterm_writes_the_activity_note_still_due(serve, gw):
    """While an adapter polls, the server notes its stream of submits on the activity marker in coalesced writes;
    SIGTERM right after a burst still writes the note that covers its last jobs before the server exits."""
    # GIVEN a server and an adapter polling
    api = serve()
    gw.table.note_adapter("gpu-1:7", state="running", jobs_in_hand=0)
    # WHEN a burst of jobs is accepted and the server is stopped at once
    ids = [submit(api).json()["job_id"] for _ in range(6)]
    assert api.proc is not None
    api.proc.send_signal(signal.SIGTERM)
    # THEN it exits 0 and the marker's last submit is no older than the newest job
    assert api.proc.wait(30) == 0
    newest = max(gw.table.get(job_id).created_at for job_id in ids)
    noted = gw.table.read_activity().last_submit_at
    assert noted is not None and noted >= newest
    assert not any(e.get("event") == "submit.activity_not_noted" for e in api.log_lines())


def test_concurrent_submits_reuse_their_aws_connections_on_the_fast_http_stack(serve, gw):
    """30 clients at once: every submit is accepted, no AWS connection is opened past the clients' pools and dropped
    (botocore keeps 10 by default; the server has 40 worker threads), and the server runs on httptools and uvloop."""
    from gpuctl.serve.server import implementations

    # GIVEN a server and an adapter polling (each submit: PutItem and SendMessage, from the worker threads)
    api = serve()
    gw.table.note_adapter("gpu-1:7", state="running", jobs_in_hand=0)
    # WHEN 30 clients submit 90 jobs at once
    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=30)) as http, \
            ThreadPoolExecutor(30) as pool:
        codes = list(pool.map(lambda _: http.post(f"{api.base_url}/api/v1/camera-angle/jobs",
                                                  json={"image_url": IMAGE}).status_code, range(90)))
    # THEN every one is accepted and urllib3 never had to drop a connection for want of room in the pool
    assert codes == [202] * 90
    lines = api.log_lines()
    assert not [e for e in lines if "Connection pool is full" in str(e.get("event"))]
    # AND the server says which HTTP parser and event loop it runs: the serve extra's C ones on CPython/Linux
    starting = next(e for e in lines if e.get("event") == "serve.starting")
    assert (starting["http"], starting["loop"]) == implementations()
    if sys.platform == "linux" and platform.python_implementation() == "CPython":
        assert implementations() == ("httptools", "uvloop")


def test_the_worker_threads_are_anyio_s_default_limiter():
    """The AWS connection pools are sized for WORKER_THREADS: anyio's default limiter, which runs the routes."""
    import anyio
    import anyio.to_thread

    from gpuctl.serve.server import AWS_CONNECTIONS, WORKER_THREADS

    async def tokens() -> float:
        return anyio.to_thread.current_default_thread_limiter().total_tokens

    assert anyio.run(tokens) == WORKER_THREADS
    assert AWS_CONNECTIONS > WORKER_THREADS  # and one for the coalesced activity notes


@pytest.mark.parametrize(("args", "env", "words"), [
    pytest.param([], {"GPUCTL_TABLE_NAME": ""}, "DynamoDB table name", id="no-table"),
    pytest.param([], {"GPUCTL_API_KEYS": "short"}, "at least 16", id="short-key"),
    pytest.param(["--api-keys-file", "/nonexistent/keys"], {}, "Cannot read the API key file", id="no-key-file"),
])
def test_bad_settings_exit_2_in_one_sentence(server_aws, args, env, words):
    """A missing table setting, a short key or an unreadable key file: exit 2, one sentence, nothing served."""
    proc = run_cli(["serve", "--port", str(free_port()), *args], {**server_aws.env(), **env}, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("Error: ")


def test_a_job_submitted_over_http_is_run_by_the_adapter_and_read_back(serve, standin, adapter_factory, input_url,
                                                                       server_aws):
    """HTTP submit → the real adapter and the ComfyUI stand-in → completed, read over HTTP and by the CLI alike."""
    # GIVEN the server and a running adapter
    api = serve()
    adapter_factory(standin).start()
    # WHEN a job is submitted over HTTP with an s3:// input
    response = submit(api, {"image_url": input_url, "prompt": "turn left", "steps": 2})
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    # THEN polling the API sees it complete, with the result under both keys
    deadline, doc = time.monotonic() + 90, {}
    while time.monotonic() < deadline:
        doc = httpx.get(f"{api.base_url}/api/v1/jobs/{job_id}", timeout=30).json()
        if doc["status"] in ("completed", "failed"):
            break
        time.sleep(0.3)
    assert doc["status"] == "completed", doc
    assert doc["result_s3_uri"] and doc["result_url"] == doc["result_s3_uri"]
    assert doc["result_s3_uri"].startswith(f"s3://{server_aws.bucket}/results/camera-angle/{job_id}/")
    # AND the CLI reads the same document
    cli = run_cli(["status", job_id, "--output", "json"], server_aws.env())
    assert cli.returncode == 0 and json.loads(cli.stdout) == doc


def test_an_unexpected_error_is_a_500_without_a_traceback(caplog):
    """Whatever escapes a route becomes 500 {"detail": "Internal server error"}; the traceback is logged only."""
    import asyncio

    from gpuctl.serve.guard import Guard

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("secret internals at /srv/app.py line 12")

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=Guard(broken, max_body_bytes=1024))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await client.get("/api/v1/jobs")

    # GIVEN the guard around an app that raises
    # WHEN a request reaches it
    response = asyncio.run(call())
    # THEN the body is the generic sentence, with a request id, and the log has the traceback
    assert response.status_code == 500 and response.json() == {"detail": "Internal server error"}
    assert "secret" not in response.text and response.headers["x-request-id"]
    assert any(r.exc_info and "secret internals" in str(r.exc_info[1]) for r in caplog.records)
