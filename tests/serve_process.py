"""``gpuctl serve`` as a real process for the tests: ``python -m gpuctl serve`` on a free port of 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

FAKE_DNS = Path(__file__).resolve().parent / "fake_dns"
#: The old README, verbatim (tests/functional/test_serve.py checks it still matches the seed's copy).
OLD_README = Path(__file__).resolve().parent / "data" / "orchestrator-README.md"
#: The old README's image host, answered with a public address (this machine has no DNS).
README_HOST = "short-drama-assets.s3.amazonaws.com"
README_HOST_ADDRESS = "52.216.8.1"


class ServeProcess:
    """One ``gpuctl serve`` process; its JSON log lines (stderr) and stdout go to a file."""

    def __init__(self, env: dict[str, str], log_path: Path, port: int, args: list[str] | None = None) -> None:
        self.env, self.log_path, self.port, self.args = env, log_path, port, args or []
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> ServeProcess:
        path = os.pathsep.join(filter(None, [str(FAKE_DNS), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, "GPUCTL_TEST_HOSTS": f"{README_HOST}={README_HOST_ADDRESS}",
               **self.env}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "gpuctl", "serve", "--port", str(self.port),
                                          *self.args], env=env, stdout=log, stderr=log)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Until the port answers (the process takes a few seconds to import on a loaded machine)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gpuctl serve exited {self.proc.returncode}: {self.log_path.read_text()}")
            try:
                httpx.get(f"{self.base_url}/", timeout=2)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(f"gpuctl serve did not answer within {timeout} s: {self.log_path.read_text()}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                out.append(entry)
        return out

    def access_lines(self) -> list[dict[str, Any]]:
        return [e for e in self.log_lines() if e.get("event") == "http.request"]

    def access_line(self, request_id: str, timeout: float = 15.0) -> dict[str, Any]:
        """The access line of one request (written just after its response went out, so it may lag a little)."""
        deadline = time.monotonic() + timeout
        while True:
            for entry in self.access_lines():
                if entry.get("request_id") == request_id:
                    return entry
            if time.monotonic() > deadline:
                raise AssertionError(f"no access line for request {request_id}")
            time.sleep(0.05)


class FakeWorker:
    """Plays the adapter for the old README's polling loops (whose inputs cannot be fetched here): the first
    pending qwen-image-edit job created after it started moves to processing, then, ``delay`` seconds later, to
    completed with a CDN result URL, through the same table gateway the adapter uses."""

    RESULT = "https://d3bg7alr1qwred.cloudfront.net/images/comfyui-results/qwen-image-edit/{}.png"

    def __init__(self, gw: Any, *, delay: float = 1.0) -> None:
        self.gw, self.delay = gw, delay
        self.since = time.time()
        self.task_id: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakeWorker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        from gpuctl.models import JobStatus

        while not self._stop.is_set() and self.task_id is None:
            for record, _ in self.gw.table.query_page(JobStatus.PENDING, limit=20, since=self.since)[0]:
                if record.kind == "qwen-image-edit":
                    self.task_id = record.task_id
                    break
            if self.task_id is None:
                time.sleep(0.1)
        if self.task_id is None:
            return
        self.gw.table.transition(self.task_id, JobStatus.PROCESSING, fields={"worker": "fake-worker"})
        if self._stop.wait(self.delay):
            return
        self.gw.table.transition(self.task_id, JobStatus.COMPLETED,
                                 fields={"result_s3_uri": self.RESULT.format(self.task_id)})


def fresh_world(moto_server: str, folder: Path, env: dict[str, str], args: list[str] | None = None) -> tuple[Any, Any]:
    """For a module's one server: the moto server reset, the resources created, `gpuctl serve` started with the
    running system's own environment variables (AWS_DEFAULT_REGION, SQS_QUEUE_URL, DYNAMODB_TABLE,
    GPU_INSTANCE_ID) plus ``env``. Returns (resources, server); stop the server when done."""
    import boto3

    from tests.conftest import free_port
    from tests.helpers import REGION, create_resources

    httpx.post(f"{moto_server}/moto-api/reset", timeout=10).raise_for_status()
    res = create_resources(boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing"),
                           moto_server)
    old_env = {"AWS_DEFAULT_REGION": REGION, "SQS_QUEUE_URL": res.queue_url, "DYNAMODB_TABLE": res.table_name,
               "GPU_INSTANCE_ID": res.instance_id, "GPUCTL_ENDPOINT_URL": moto_server,
               "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "GPUCTL_CONFIG_DIR": str(folder / "config"), "NO_COLOR": "1"}
    api = ServeProcess({**old_env, **env}, folder / "serve.log", free_port(), args).start()
    return res, api
