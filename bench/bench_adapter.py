"""Benchmarks for the adapter daemon (issue 3): added latency, backlog, AWS requests per job, resident memory.

Run:  .venv/bin/python bench/bench_adapter.py            (full: 100 / 50 / 50 / 1,000 jobs, about 6 minutes)
      .venv/bin/python bench/bench_adapter.py --quick    (20 / 10 / 10 / 200 jobs, about 1 minute)

Everything runs on 127.0.0.1: moto's server and the ComfyUI stand-in in this process (threads), the adapter
as ``python -m adapter`` in a subprocess (latency, backlog, memory) or in this process (requests per job, so
botocore's event hooks can count its calls). Results are printed as a Markdown table for BENCHMARKS.md.

Where the timestamps come from (one machine, one wall clock):

* the stand-in's own: the ``timestamp`` (epoch ms) ComfyUI puts on each ``status.messages`` entry of a history
  entry (``execution_start``, ``execution_success``). The adapter deletes the history entry as soon as it has
  fetched the output, so instead of racing it over HTTP this script reads the entry in memory at the moment
  the stand-in logs ``standin.prompt_done`` (synchronously, right after it wrote the entry). Nothing is added
  to the stand-in.
* the adapter's own: the record's ``updated_at`` written with ``processing → completed``. The gateway takes it
  (epoch s, ms precision) when it builds that UpdateItem, after the result upload, so it is the moment the
  record starts to read ``completed`` minus that one request's round trip (reported separately).
  ``finished_at`` is taken a few statements earlier, before the same call.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_cli import RequestCounter, _base_env, moto_server  # noqa: E402
from tests.helpers import REGION, Resources, create_resources, make_image  # noqa: E402

FINISHED = ("completed", "failed")
POLL = 0.05  # how often this script looks at the table; it never enters a measured interval


# --- the stand-in and its clock ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class StandinRun:
    """One prompt as the stand-in ran it (epoch seconds, from its own history timestamps)."""

    start: float
    end: float
    success: bool


class StandinClock(logging.Handler):
    """Keeps the stand-in's execution_start / execution_success timestamps of every prompt it finishes."""

    def __init__(self, server: Any) -> None:
        super().__init__(logging.INFO)
        self._server = server
        self._lock = threading.Lock()
        self.runs: dict[str, StandinRun] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg != "standin.prompt_done":
            return
        prompt_id = str(getattr(record, "prompt_id", ""))
        # Runs on the stand-in's event loop right after it wrote the history entry: the adapter cannot
        # have deleted it yet.
        entry = self._server.standin.history.get(prompt_id)
        if entry is None:
            return
        stamps = {name: data.get("timestamp") for name, data in entry["status"]["messages"]}
        end = stamps.get("execution_success") or stamps.get("execution_error") or stamps.get("execution_interrupted")
        if stamps.get("execution_start") is None or end is None:
            return
        with self._lock:
            self.runs[prompt_id] = StandinRun(stamps["execution_start"] / 1000, end / 1000,
                                              bool(entry["status"].get("completed")))

    def get(self, prompt_id: str) -> StandinRun | None:
        with self._lock:
            return self.runs.get(prompt_id)


@contextmanager
def standin(seconds_per_job: float) -> Iterator[tuple[Any, StandinClock]]:
    from gpuctl.local.comfyui_standin import StandinConfig, StandinServer

    server = StandinServer(StandinConfig(port=0, seconds_per_job=seconds_per_job))
    server.start()
    clock = StandinClock(server)
    standin_log = logging.getLogger("gpuctl.local.comfyui_standin")
    standin_log.setLevel(logging.INFO)
    standin_log.addHandler(clock)
    try:
        yield server, clock
    finally:
        standin_log.removeHandler(clock)
        server.stop()


# --- AWS side: submitting and watching jobs ---------------------------------------------------------------------

@dataclass(frozen=True)
class Done:
    task_id: str
    status: str
    updated_at: float
    finished_at: float | None
    comfy_job_id: str | None
    error: str | None


class Jobs:
    """Submits jobs with gpuctl's submit service and waits for their records to finish (uncounted clients)."""

    def __init__(self, res: Resources) -> None:
        from gpuctl.services.context import Gateways
        from gpuctl.settings import Settings

        self.res = res
        self.gw = Gateways(Settings(**res.settings_kwargs()))
        path = make_image(Path(tempfile.mkdtemp(prefix="gpuctl-bench-")) / "in.png", size=(96, 64))
        self.input_url = self.gw.store.upload_file(path, res.bucket, "inputs/bench/in.png", content_type="image/png")

    def submit(self, count: int) -> list[str]:
        from gpuctl.models import JobType, parse_request
        from gpuctl.services.submit import submit_request

        ids = []
        for i in range(count):
            request = parse_request(JobType.QWEN_IMAGE_EDIT, {"image_url": self.input_url,
                                                              "prompt": f"make it a sketch ({i})"})
            ids.append(submit_request(self.gw, request, start_instance=False).record.task_id)
        return ids

    def wait(self, task_ids: list[str], timeout: float) -> list[Done]:
        """Every job finished (any order), read with BatchGetItem every POLL seconds; raise after ``timeout``."""
        deadline = time.monotonic() + timeout
        open_ids = list(task_ids)
        done: dict[str, Done] = {}
        while open_ids:
            for chunk in range(0, len(open_ids), 100):
                for item in self._batch_get(open_ids[chunk:chunk + 100]):
                    if item["status"]["S"] in FINISHED:
                        task_id = item["task_id"]["S"]
                        done[task_id] = Done(
                            task_id, item["status"]["S"], float(item["updated_at"]["N"]),
                            float(item["finished_at"]["N"]) if "finished_at" in item else None,
                            item.get("comfy_job_id", {}).get("S"), item.get("error_message", {}).get("S"))
            open_ids = [t for t in open_ids if t not in done]
            if not open_ids:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{len(open_ids)} of {len(task_ids)} jobs not finished after {timeout:.0f} s "
                                 f"(e.g. {open_ids[0]})")
            time.sleep(POLL)
        failed = [d for d in done.values() if d.status != "completed"]
        if failed:
            raise SystemExit(f"{len(failed)} job(s) failed, e.g. {failed[0].task_id}: {failed[0].error}")
        return [done[t] for t in task_ids]

    def _batch_get(self, keys: list[str]) -> list[dict[str, Any]]:
        client = self.gw.clients.dynamodb
        table = self.res.table_name
        request: dict[str, Any] = {table: {"Keys": [{"task_id": {"S": k}} for k in keys], "ConsistentRead": True}}
        items: list[dict[str, Any]] = []
        for _ in range(20):
            response = client.batch_get_item(RequestItems=request)
            items += response.get("Responses", {}).get(table, [])
            request = response.get("UnprocessedKeys") or {}
            if not request:
                break
        return items


# --- the adapter as a process -----------------------------------------------------------------------------------

class AdapterProcess:
    """``python -m adapter`` pointed at moto and the stand-in; JSON log lines go to a file."""

    def __init__(self, res: Resources, backend_url: str, **overrides: str) -> None:
        self.log_path = Path(tempfile.mkdtemp(prefix="gpuctl-bench-adapter-")) / "adapter.log"
        env = _base_env()
        env.update(res.env())
        env.update(GPUCTL_BACKEND_URL=backend_url, GPUCTL_LOG_LEVEL="INFO", GPUCTL_READY_TIMEOUT="30",
                   GPUCTL_SHUTDOWN_GRACE="10")
        env.update(overrides)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "adapter"], env=env, cwd=ROOT,
                                         stdout=log, stderr=log)

    def wait_started(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the adapter exited with {self.proc.returncode}: {self.tail()}")
            if '"adapter.started"' in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise SystemExit(f"the adapter did not start within {timeout:.0f} s: {self.tail()}")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise SystemExit("no VmRSS in /proc/<pid>/status")

    def tail(self, lines: int = 5) -> str:
        return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextmanager
def adapter_process(res: Resources, backend_url: str, **overrides: str) -> Iterator[AdapterProcess]:
    proc = AdapterProcess(res, backend_url, **overrides)
    try:
        proc.wait_started()
        yield proc
    finally:
        proc.stop()


def fresh_resources(endpoint: str) -> Resources:
    import boto3
    import httpx

    httpx.post(f"{endpoint}/moto-api/reset", timeout=10).raise_for_status()
    session = boto3.session.Session(aws_access_key_id="bench", aws_secret_access_key="bench")
    return create_resources(session, endpoint)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


# --- 1. added latency -------------------------------------------------------------------------------------------

def bench_latency(endpoint: str, jobs_count: int, seconds_per_job: float) -> list[tuple[str, str]]:
    res = fresh_resources(endpoint)
    jobs = Jobs(res)
    added: list[float] = []
    added_finished: list[float] = []
    with standin(seconds_per_job) as (server, clock), adapter_process(res, server.base_url):
        jobs.wait(jobs.submit(1), timeout=60)  # warm-up: first WebSocket, connection pools, moto caches
        for _ in range(jobs_count):
            (done,) = jobs.wait(jobs.submit(1), timeout=60)
            run = clock.get(done.comfy_job_id or "")
            if run is None:
                raise SystemExit(f"the stand-in has no run for {done.task_id} (prompt {done.comfy_job_id})")
            added.append(done.updated_at - run.end)
            if done.finished_at is not None:
                added_finished.append(done.finished_at - run.end)
    p50, p95 = statistics.median(added), _pct(added, 0.95)
    verdict = "met" if p50 <= 0.100 else "MISSED"
    return [
        (f"Added latency, stand-in `execution_success` → record `completed` (`updated_at`), {len(added)} jobs "
         f"of {seconds_per_job:g} s one after another",
         f"p50 {_ms(p50)}, p95 {_ms(p95)}, max {_ms(max(added))} — goal p50 ≤ 100 ms: {verdict}"),
        ("… same, to `finished_at` (taken just before the completing UpdateItem)",
         f"p50 {_ms(statistics.median(added_finished))}, p95 {_ms(_pct(added_finished, 0.95))}"),
    ]


# --- 2. backlog -------------------------------------------------------------------------------------------------

def bench_backlog(endpoint: str, jobs_count: int, seconds_per_job: float) -> list[tuple[str, str]]:
    res = fresh_resources(endpoint)
    jobs = Jobs(res)
    with standin(seconds_per_job) as (server, clock):
        task_ids = jobs.submit(jobs_count)  # all queued before the adapter starts
        with adapter_process(res, server.base_url):
            done = jobs.wait(task_ids, timeout=jobs_count * seconds_per_job * 3 + 60)
        runs = [clock.get(d.comfy_job_id or "") for d in done]
    if any(r is None for r in runs):
        raise SystemExit("the stand-in has no run for some backlog jobs")
    started = min(r.start for r in runs if r)
    wall = max(d.updated_at for d in done) - started
    busy = sum(r.end - r.start for r in runs if r)
    goal = 1.1 * jobs_count * seconds_per_job
    verdict = "met" if wall <= goal and busy / wall >= 0.9 else "MISSED"
    return [(f"Backlog: {jobs_count} queued jobs of {seconds_per_job:g} s, one-at-a-time stand-in, in-flight 2",
             f"{wall:.2f} s from the first job starting to the last `completed` (goal ≤ {goal:.1f} s); "
             f"GPU busy {busy / wall:.1%} (stand-in execution {busy:.2f} s, {busy / jobs_count:.3f} s a job) "
             f"— {verdict}")]


# --- 3. AWS requests per job ------------------------------------------------------------------------------------

def _role() -> str:
    name = threading.current_thread().name
    if name.startswith("job"):
        return "job thread"
    if name == "heartbeat":
        return "heartbeat thread"
    if name == "adapter-loop":
        return "loop"
    return name


class RoleRequestCounter(RequestCounter):
    """RequestCounter that also keeps which adapter thread sent each request, and UpdateItem round trips."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.by_role: dict[tuple[str, str], int] = {}
        self.update_item_s: list[float] = []
        self._sent: dict[int, float] = {}

    def attach(self, client: Any) -> None:
        super().attach(client)
        client.meta.events.register("after-call.dynamodb.UpdateItem", self._update_done)

    def _before(self, model: Any, **_: Any) -> None:
        key = (model.name, _role())
        with self._lock:
            self.by_operation[model.name] = self.by_operation.get(model.name, 0) + 1
            self.by_role[key] = self.by_role.get(key, 0) + 1
            self._sent[threading.get_ident()] = time.perf_counter()

    def _update_done(self, **_: Any) -> None:
        with self._lock:
            sent = self._sent.pop(threading.get_ident(), None)
            if sent is not None:
                self.update_item_s.append(time.perf_counter() - sent)

    def reset(self) -> None:
        with self._lock:
            self.by_operation.clear()
            self.by_role.clear()


_MEANING = {
    ("ReceiveMessage", "loop"): "receive (long poll, up to the free in-flight slots)",
    ("ChangeMessageVisibility", "job thread"): "visibility extended on receipt, before the claim",
    ("GetItem", "job thread"): "read the record before the claim",
    ("UpdateItem", "job thread"): "transitions `pending → processing`, `processing → completed`",
    ("UpdateItem", "heartbeat thread"): "progress / `heartbeat_at` writes (at most 1/s a job; heartbeat every "
                                        "`GPUCTL_HEARTBEAT_INTERVAL`)",
    ("ChangeMessageVisibility", "heartbeat thread"): "visibility extended by the heartbeat",
    ("DeleteMessage", "job thread"): "delete the message",
    ("GetObject", "job thread"): "input image download (s3://)",
    ("PutObject", "job thread"): "result upload",
}


def _in_process_adapter(res: Resources, backend_url: str, counter: RoleRequestCounter,
                        **overrides: Any) -> tuple[threading.Event, threading.Thread, Any]:
    """The adapter's own objects, wired as ``adapter.__main__.run_daemon`` wires them, with counted clients."""
    from adapter.backends import make_backend
    from adapter.handlers import Deps
    from adapter.loop import run
    from adapter.settings import AdapterSettings
    from gpuctl.services.context import Gateways

    settings = AdapterSettings(**res.settings_kwargs(), backend_url=backend_url, **overrides)
    gateways = Gateways(settings)
    for name in ("sqs", "dynamodb", "s3"):
        counter.attach(getattr(gateways.clients, name))
    backend = make_backend(settings, gateways.store)
    deps = Deps(settings=settings, table=gateways.table, queue=gateways.queue, store=gateways.store, backend=backend)
    stop = threading.Event()
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(run(deps, stop)), name="adapter-loop", daemon=True)
    thread.start()
    return stop, thread, backend


def bench_requests(endpoint: str, jobs_count: int, seconds_per_job: float,
                   label: str, **overrides: Any) -> list[tuple[str, str]]:
    res = fresh_resources(endpoint)
    jobs = Jobs(res)
    counter = RoleRequestCounter()
    with standin(seconds_per_job) as (server, _clock):
        stop, thread, backend = _in_process_adapter(res, server.base_url, counter, **overrides)
        try:
            jobs.wait(jobs.submit(3), timeout=120)  # warm-up, not counted
            counter.reset()
            jobs.wait(jobs.submit(jobs_count), timeout=jobs_count * (seconds_per_job + 2) + 60)
            with counter._lock:
                by_role = dict(counter.by_role)
                update_rtt = list(counter.update_item_s)
        finally:
            stop.set()
            jobs.gw.queue.send("{}")  # ends the 20 s long poll now; received after stop, it is released unread
            thread.join(30)
            backend.close()
    total = sum(by_role.values())
    rows = [(f"AWS requests per job, steady state ({label})",
             f"**{total / jobs_count:.2f}** ({total} requests / {jobs_count} jobs)")]
    for (op, role), count in sorted(by_role.items(), key=lambda kv: -kv[1]):
        meaning = _MEANING.get((op, role), "")
        rows.append((f"… {op} [{role}]", f"{count / jobs_count:.2f} — {meaning}".rstrip(" —")))
    if update_rtt:
        rows.append(("… UpdateItem round trip to moto (in-process, shares the GIL with moto)",
                     f"p50 {_ms(statistics.median(update_rtt))}, p95 {_ms(_pct(update_rtt, 0.95))}"))
    return rows


# --- 4. resident memory -----------------------------------------------------------------------------------------

def bench_memory(endpoint: str, checkpoints: list[int], wave: int, seconds_per_job: float) -> list[tuple[str, str]]:
    res = fresh_resources(endpoint)
    jobs = Jobs(res)
    series: list[tuple[int, int]] = []
    started = time.monotonic()
    with standin(seconds_per_job) as (server, _clock), adapter_process(res, server.base_url) as adapter:
        series.append((0, adapter.rss_kib()))
        finished = 0
        for checkpoint in checkpoints:
            while finished < checkpoint:
                batch = min(wave, checkpoint - finished)
                jobs.wait(jobs.submit(batch), timeout=batch * 5 + 60)
                finished += batch
            series.append((finished, adapter.rss_kib()))
    elapsed = time.monotonic() - started
    text = ", ".join(f"{n}: {kib / 1024:.1f}" for n, kib in series)
    # "Flat": after the first checkpoint (imports, pools, caches warmed), growth per 1,000 jobs under 2 MiB.
    first_n, first_kib = series[1]
    last_n, last_kib = series[-1]
    per_1000 = (last_kib - first_kib) / 1024 / max(1, last_n - first_n) * 1000
    verdict = "flat" if per_1000 < 2.0 else "GROWING"
    return [(f"Adapter RSS (MiB) after N jobs of {seconds_per_job:g} s, waves of {wave} ({elapsed:.0f} s)", text),
            (f"… growth from {first_n} to {last_n} jobs",
             f"{(last_kib - first_kib) / 1024:+.1f} MiB = {per_1000:+.2f} MiB per 1,000 jobs — {verdict}")]


# --- main -------------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller N everywhere (about a minute)")
    args = parser.parse_args()
    quick = args.quick
    # The in-process adapter and the gateways read GPUCTL_*/AWS_* from the environment: only ours.
    for name in list(os.environ):
        if name.startswith(("GPUCTL_", "AWS_")):
            del os.environ[name]
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION=REGION,
                      GPUCTL_CONFIG_DIR=tempfile.mkdtemp(prefix="gpuctl-bench-config-"))
    logging.getLogger("adapter").setLevel(logging.WARNING)

    rows: list[tuple[str, str]] = []
    started = time.monotonic()
    with moto_server() as endpoint:
        rows += bench_latency(endpoint, 20 if quick else 100, 0.5)
        rows += bench_backlog(endpoint, 10 if quick else 50, 1.0)
        rows += bench_requests(endpoint, 10 if quick else 50, 1.0, "1 s jobs, default settings")
        if not quick:
            rows += bench_requests(endpoint, 10, 5.0, "5 s jobs, `heartbeat_interval` 1 s, 8 s visibility",
                                   heartbeat_interval=1.0, visibility_extension=8)
        checkpoints = [50, 100, 200] if quick else [100, 250, 500, 750, 1000]
        rows += bench_memory(endpoint, checkpoints, 50, 0.01)
    command = ".venv/bin/python bench/bench_adapter.py" + (" --quick" if quick else "")
    print(f"\nReproduce: `{command}` ({time.monotonic() - started:.0f} s; {sys.platform}, "
          f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs)\n")
    print("| measurement | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
