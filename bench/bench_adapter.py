"""Benchmarks for the adapter daemon (issues 3 and 9): added latency, backlog, AWS requests per job, the cost of
fast cancels, the unified backend against the running service's shape, resident memory and ComfyUI disk use.

Run:  .venv/bin/python bench/bench_adapter.py            (full: about 25 minutes, 5,000 jobs for memory/disk)
      .venv/bin/python bench/bench_adapter.py --quick    (small N everywhere, a few minutes)

Everything runs on 127.0.0.1: moto's server in this process (a thread); the ComfyUI stand-in in its own process
(``python -m gpuctl.local.comfyui_standin``, so that it does not share a GIL with moto and the pollers); the
adapter as ``python -m adapter`` (latency, backlog, memory, disk) or in this process (requests per job, so
botocore's event hooks can count its calls). Results are printed as a Markdown table for BENCHMARKS.md.

Where the timestamps come from (one machine, one wall clock):

* the stand-in's own: the epoch-ms ``execution_start`` and end-event timestamps of each prompt, which it logs
  with ``standin.prompt_done`` (``started_ms``/``ended_ms``, the same values its history entry carries). The
  unified API's job documents carry ``finished_at`` (the moment the service marked the job completed).
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


# --- the stand-in (its own process) and its clock --------------------------------------------------------------

@dataclass(frozen=True)
class StandinRun:
    """One prompt as the stand-in ran it (epoch seconds, from its own clock)."""

    start: float
    end: float
    success: bool


class StandinProcess:
    """``python -m gpuctl.local.comfyui_standin`` on a free port; its log gives each prompt's run times."""

    def __init__(self, seconds_per_job: float, *extra: str) -> None:
        import socket

        self.root = Path(tempfile.mkdtemp(prefix="gpuctl-bench-comfyui-"))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.root / "standin.log"
        self._cmd = [sys.executable, "-m", "gpuctl.local.comfyui_standin", "--port", str(self.port),
                     "--seconds-per-job", str(seconds_per_job), "--input-dir", str(self.root / "input"),
                     "--output-dir", str(self.root / "output"), *extra]
        self._runs: dict[str, StandinRun] = {}
        self._read = 0
        self.start()

    def start(self) -> None:
        """Start (or restart, on the same port and folders) the stand-in and wait until it answers."""
        import httpx

        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self._cmd, cwd=ROOT, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.base_url}/system_stats", timeout=1).raise_for_status()
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise SystemExit("the stand-in process did not start")

    def kill(self) -> None:
        """SIGKILL: ComfyUI crashing (its queue and history are lost; a restart starts empty)."""
        self.proc.kill()
        self.proc.wait(10)

    def runs(self) -> dict[str, StandinRun]:
        """Every prompt the stand-in finished so far, by prompt id."""
        text = self.log_path.read_text(errors="replace")
        for line in text[self._read:].splitlines():
            if "standin.prompt_done" not in line:
                continue
            fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
            try:
                self._runs[fields["prompt_id"]] = StandinRun(int(fields["started_ms"]) / 1000,
                                                             int(fields["ended_ms"]) / 1000,
                                                             fields.get("success") == "True")
            except (KeyError, ValueError):
                continue
        self._read = len(text)
        return self._runs

    def get(self, prompt_id: str) -> StandinRun | None:
        return self.runs().get(prompt_id)

    def disk_kib(self) -> int:
        """Bytes in the stand-in's input and output folders (what the box would keep), in KiB."""
        total = sum(p.stat().st_size for d in ("input", "output") for p in (self.root / d).rglob("*") if p.is_file())
        return total // 1024

    def stop(self) -> None:
        _terminate(self.proc)


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 20 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def standin(seconds_per_job: float, *extra: str) -> Iterator[StandinProcess]:
    server = StandinProcess(seconds_per_job, *extra)
    try:
        yield server
    finally:
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

    def __init__(self, res: Resources, backend_url: str, comfyui_dir: Path | None = None, **overrides: str) -> None:
        self.log_path = Path(tempfile.mkdtemp(prefix="gpuctl-bench-adapter-")) / "adapter.log"
        env = _base_env()
        env.update(res.env())
        env.update(GPUCTL_BACKEND_URL=backend_url, GPUCTL_LOG_LEVEL="INFO", GPUCTL_READY_TIMEOUT="30",
                   GPUCTL_SHUTDOWN_GRACE="10")
        if comfyui_dir is not None:
            env["GPUCTL_COMFYUI_DIR"] = str(comfyui_dir)
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
        _terminate(self.proc)


@contextmanager
def adapter_process(res: Resources, server: StandinProcess, **overrides: str) -> Iterator[AdapterProcess]:
    proc = AdapterProcess(res, server.base_url, server.root, **overrides)
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
    with standin(seconds_per_job) as server, adapter_process(res, server):
        jobs.wait(jobs.submit(1), timeout=60)  # warm-up: first WebSocket, connection pools, moto caches
        for _ in range(jobs_count):
            (done,) = jobs.wait(jobs.submit(1), timeout=60)
            run = server.get(done.comfy_job_id or "")
            if run is None:
                raise SystemExit(f"the stand-in has no run for {done.task_id} (prompt {done.comfy_job_id})")
            added.append(done.updated_at - run.end)
            if done.finished_at is not None:
                added_finished.append(done.finished_at - run.end)
    p50, p95 = statistics.median(added), _pct(added, 0.95)
    verdict = "met" if p95 <= 0.030 else "MISSED"
    return [
        (f"Added latency, native: stand-in end of run → record `completed` (`updated_at`), {len(added)} jobs "
         f"of {seconds_per_job:g} s one after another",
         f"p50 {_ms(p50)}, p95 {_ms(p95)}, max {_ms(max(added))} — goal p95 ≤ 30 ms: {verdict}"),
        ("… same, to `finished_at` (taken just before the completing UpdateItem)",
         f"p50 {_ms(statistics.median(added_finished))}, p95 {_ms(_pct(added_finished, 0.95))}"),
    ]


# --- 2. backlog -------------------------------------------------------------------------------------------------

def bench_backlog(endpoint: str, jobs_count: int, seconds_per_job: float) -> list[tuple[str, str]]:
    res = fresh_resources(endpoint)
    jobs = Jobs(res)
    with standin(seconds_per_job) as server:
        task_ids = jobs.submit(jobs_count)  # all queued before the adapter starts
        with adapter_process(res, server):
            done = jobs.wait(task_ids, timeout=jobs_count * seconds_per_job * 3 + 60)
        runs = [server.get(d.comfy_job_id or "") for d in done]
    if any(r is None for r in runs):
        raise SystemExit("the stand-in has no run for some backlog jobs")
    started = min(r.start for r in runs if r)
    wall = max(d.updated_at for d in done) - started
    busy = sum(r.end - r.start for r in runs if r)
    verdict = "met" if busy / wall >= 0.99 else "MISSED"
    return [(f"Backlog: {jobs_count} queued jobs of {seconds_per_job:g} s, stand-in in its own process, in-flight 2",
             f"{wall:.2f} s from the first job starting to the last `completed`; GPU busy **{busy / wall:.2%}** "
             f"(stand-in execution {busy:.2f} s, {busy / jobs_count:.3f} s a job; idle {wall - busy:.2f} s) — "
             f"goal ≥ 99%: {verdict}")]


# --- 2b. unified backend against the running service's shape ---------------------------------------------------

def bench_unified_latency(endpoint: str, jobs_count: int, seconds_per_job: float) -> list[tuple[str, str]]:
    import httpx

    res = fresh_resources(endpoint)
    jobs = Jobs(res)
    added: list[float] = []
    with (standin(seconds_per_job, "--unified-blocking", "--output-bucket", res.bucket, "--s3-endpoint-url",
                  endpoint) as server,
          adapter_process(res, server, GPUCTL_BACKEND="unified")):
        jobs.wait(jobs.submit(1), timeout=120)
        for _ in range(jobs_count):
            (done,) = jobs.wait(jobs.submit(1), timeout=120)
            doc = httpx.get(f"{server.base_url}/api/v1/jobs/{done.comfy_job_id}", timeout=60).json()
            added.append(done.updated_at - float(doc["finished_at"]))
    p95 = _pct(added, 0.95)
    return [(f"Added latency, unified, service answering nothing while a job runs: {jobs_count} jobs of "
             f"{seconds_per_job:g} s", f"p50 {_ms(statistics.median(added))}, **p95 {_ms(p95)}**, max "
             f"{_ms(max(added))} — goal p95 ≤ 500 ms: {'met' if p95 <= 0.5 else 'MISSED'}")]


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
    ("GetItem", "heartbeat thread"): "cancel check: the record read when nothing else read it for "
                                      "`cancel_check_interval` (2 s)",
    ("SendMessage", "job thread"): "a fresh copy of a message handed back",
    ("UpdateItem", "job thread"): "transitions `pending → processing`, `processing → completed`",
    ("UpdateItem", "heartbeat thread"): "progress / `heartbeat_at` writes (progress at most every "
                                        "`cancel_check_interval`) and the activity marker (at most every 15 s)",
    ("UpdateItem", "loop"): "activity marker: `draining`, `stopped`",
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
                   label: str, *, unified: bool = False, **overrides: Any) -> list[tuple[str, str]]:
    res = fresh_resources(endpoint)
    jobs = Jobs(res)
    counter = RoleRequestCounter()
    extra = ("--unified-blocking", "--output-bucket", res.bucket, "--s3-endpoint-url", endpoint) if unified else ()
    with standin(seconds_per_job, *extra) as server:
        if unified:
            overrides["backend"] = "unified"
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
    if label.startswith("native, 1 s"):
        rows[0] = (rows[0][0], rows[0][1] + f" — goal ≤ 6: {'met' if total / jobs_count <= 6 else 'MISSED'}")
    for (op, role), count in sorted(by_role.items(), key=lambda kv: -kv[1]):
        meaning = _MEANING.get((op, role), "")
        rows.append((f"… {op} [{role}]", f"{count / jobs_count:.2f} — {meaning}".rstrip(" —")))
    if update_rtt:
        rows.append(("… UpdateItem round trip to moto (in-process, shares the GIL with moto)",
                     f"p50 {_ms(statistics.median(update_rtt))}, p95 {_ms(_pct(update_rtt, 0.95))}"))
    return rows


# --- 3b. cancel latency -----------------------------------------------------------------------------------------

def bench_cancel(endpoint: str, trials: int) -> list[tuple[str, str]]:
    """Cancel a prompt queued on ComfyUI, then the running one; time each from the request to ``failed``."""
    from gpuctl.models import JobStatus

    res = fresh_resources(endpoint)
    jobs = Jobs(res)
    latency: dict[str, list[float]] = {"queued": [], "running": []}
    with standin(20.0) as server, adapter_process(res, server):
        for _ in range(trials):
            pair = jobs.submit(2)
            # Both in hand; the one whose record shows progress runs on the stand-in, the other waits behind it.
            _until(lambda p=pair: all(_state(jobs, t) == "processing" for t in p)
                   and any((jobs.gw.table.get(t).progress or 0) > 0 for t in p), 60)
            first = jobs.gw.table.get(pair[0])
            running, queued = (pair[0], pair[1]) if (first.progress or 0) > 0 else (pair[1], pair[0])
            for name, task_id in (("queued", queued), ("running", running)):
                asked = time.monotonic()
                jobs.gw.table.update_fields(task_id, {"cancel_requested": True}, only_if=[JobStatus.PROCESSING])
                _until(lambda t=task_id: _state(jobs, t) == "failed", 30)
                latency[name].append(time.monotonic() - asked)
    return [(f"Cancel latency (`gpuctl jobs cancel` write → record `failed` \"cancelled by user\"), {trials} each",
             f"prompt queued on ComfyUI: p50 {_ms(statistics.median(latency['queued']))}, max "
             f"{_ms(max(latency['queued']))}; running: p50 {_ms(statistics.median(latency['running']))}, max "
             f"{_ms(max(latency['running']))} — goal ≤ 5 s: "
             f"{'met' if max(max(v) for v in latency.values()) <= 5 else 'MISSED'}")]


def _state(jobs: Jobs, task_id: str) -> str:
    return jobs.gw.table.get(task_id).status.value


def _until(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting in the cancel benchmark")
        time.sleep(0.02)


# --- 3c. an outage ---------------------------------------------------------------------------------------------

def bench_outage(endpoint: str, jobs_count: int, minutes: float) -> list[tuple[str, str]]:
    """Queued jobs, ComfyUI killed (SIGKILL) for ``minutes``, restarted: how many end completed, failed."""
    res = fresh_resources(endpoint)
    jobs = Jobs(res)
    with standin(0.5) as server, adapter_process(res, server) as adapter:
        task_ids = jobs.submit(jobs_count)
        _until(lambda: sum(_state(jobs, t) == "completed" for t in task_ids) >= 2, 120)
        server.kill()
        time.sleep(minutes * 60)
        server.start()
        deadline = time.monotonic() + 600
        while any(_state(jobs, t) not in FINISHED for t in task_ids) and time.monotonic() < deadline:
            time.sleep(1)
        states = [jobs.gw.table.get(t) for t in task_ids]
        log = adapter.log_path.read_text(errors="replace")
    completed = sum(r.status.value == "completed" for r in states)
    failed = sum(r.status.value == "failed" for r in states)
    return [(f"Outage: {jobs_count} queued jobs, the stand-in SIGKILLed for {minutes:g} min with default settings, "
             "then restarted", f"{completed} completed, {failed} failed, "
             f"{jobs_count - completed - failed} unfinished; attempts per job {sorted({r.attempts for r in states})}; "
             f"paused {log.count('adapter.paused')}×, resumed {log.count('adapter.resumed')}×")]


# --- 4. resident memory and ComfyUI disk use --------------------------------------------------------------------

def bench_memory(endpoint: str, checkpoints: list[int], wave: int, seconds_per_job: float) -> list[tuple[str, str]]:
    res = fresh_resources(endpoint)
    jobs = Jobs(res)
    series: list[tuple[int, int, int]] = []
    started = time.monotonic()
    with standin(seconds_per_job) as server, adapter_process(res, server) as adapter:
        series.append((0, adapter.rss_kib(), server.disk_kib()))
        finished = 0
        for checkpoint in checkpoints:
            while finished < checkpoint:
                batch = min(wave, checkpoint - finished)
                jobs.wait(jobs.submit(batch), timeout=batch * 5 + 60)
                finished += batch
            time.sleep(0.5)  # the last job's clean-up runs just after its record completes
            series.append((finished, adapter.rss_kib(), server.disk_kib()))
    elapsed = time.monotonic() - started
    rss = ", ".join(f"{n}: {kib / 1024:.1f}" for n, kib, _ in series)
    disk = ", ".join(f"{n}: {d}" for n, _, d in series)
    # "Flat": from the first checkpoint (imports, pools, caches warmed) to the last, within 2 MiB.
    first_n, first_kib, _ = series[1]
    by_n = {n: kib for n, kib, _ in series}
    rows = [(f"Adapter RSS (MiB) after N jobs of {seconds_per_job:g} s, waves of {wave} ({elapsed:.0f} s)", rss)]
    for n in (1000, 5000):
        if n in by_n:
            growth = (by_n[n] - first_kib) / 1024
            rows.append((f"… growth from {first_n} to {n} jobs",
                         f"{growth:+.1f} MiB — goal within 2 MiB: {'met' if abs(growth) <= 2 else 'MISSED'}"))
    rows.append(("ComfyUI input + output folders (KiB) after N jobs, `GPUCTL_COMFYUI_DIR` set", disk
                 + f" — {'flat' if max(d for *_, d in series) <= 64 else 'GROWING'}"))
    return rows


# --- main -------------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller N everywhere (a few minutes)")
    parser.add_argument("--only", choices=["latency", "backlog", "requests", "cancel", "unified", "memory"],
                        help="run one section only")
    parser.add_argument("--outage-minutes", type=float, default=None, metavar="M",
                        help="only the outage run: 20 queued jobs, the stand-in killed for M minutes (10 for issue 9)")
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
    if args.outage_minutes is not None:
        with moto_server() as endpoint:
            rows += bench_outage(endpoint, 20, args.outage_minutes)
        _print(rows, f".venv/bin/python bench/bench_adapter.py --outage-minutes {args.outage_minutes:g}", started)
        return 0
    only = args.only
    with moto_server() as endpoint:
        if only in (None, "latency"):
            rows += bench_latency(endpoint, 20 if quick else 100, 0.5)
        if only in (None, "backlog"):
            rows += bench_backlog(endpoint, 10 if quick else 50, 1.0)
        if only in (None, "requests"):
            rows += bench_requests(endpoint, 10 if quick else 50, 1.0, "native, 1 s jobs, default settings")
            rows += bench_requests(endpoint, 5 if quick else 10, 5.0, "native, 5 s jobs, default settings")
            rows += bench_requests(endpoint, 5 if quick else 10, 5.0,
                                   "native, 5 s jobs, cancel checks off (`cancel_check_interval` 1000 s)",
                                   cancel_check_interval=1000.0)
        if only in (None, "cancel"):
            rows += bench_cancel(endpoint, 2 if quick else 5)
        if only in (None, "unified"):
            rows += bench_requests(endpoint, 10 if quick else 50, 1.0, "unified, 1 s jobs", unified=True)
            for seconds in (1.0, 7.0):
                rows += bench_unified_latency(endpoint, 5 if quick else 20, seconds)
        if only in (None, "memory"):
            checkpoints = [50, 200] if quick else [100, 1000, 2500, 5000]
            rows += bench_memory(endpoint, checkpoints, 50, 0.01)
    command = " ".join([".venv/bin/python bench/bench_adapter.py", *(["--quick"] if quick else []),
                        *([f"--only {only}"] if only else [])])
    _print(rows, command, started)
    return 0


def _print(rows: list[tuple[str, str]], command: str, started: float) -> None:
    print(f"\nReproduce: `{command}` ({time.monotonic() - started:.0f} s; {sys.platform}, "
          f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs)\n")
    print("| measurement | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    raise SystemExit(main())
