"""The adapter as a daemon against what goes wrong on a GPU box: paused and killed workers, ComfyUI outages,
cancels, missing models, hostile inputs, a slow unified API. Real processes: moto's server, the stand-in,
``python -m adapter``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpuctl.models import JobStatus, JobType
from tests.conftest import free_port
from tests.functional import test_adapter as harness
from tests.functional.test_adapter import (
    assert_comfyui_clean,
    assert_png_result,
    events_named,
    queue_counts,
    submit,
    wait_for,
    wait_until,
)
from tests.helpers import MAX_RECEIVE, Resources, make_image, run_cli

pytestmark = pytest.mark.server

# The daemon test harness of test_adapter.py (stand-ins, adapter processes, gateways, an input image).
standin_factory = harness.standin_factory
standin = harness.standin
adapter_factory = harness.adapter_factory
gw = harness.gw
input_url = harness.input_url

FAST_TAKEOVER = {"GPUCTL_VISIBILITY_EXTENSION": "2", "GPUCTL_HEARTBEAT_STALE_AFTER": "2"}


def _dlq(gw: Any, server_aws: Resources) -> list[dict[str, Any]]:
    return gw.clients.sqs.receive_message(QueueUrl=server_aws.dlq_url, MaxNumberOfMessages=10,
                                          MessageAttributeNames=["All"], WaitTimeSeconds=1).get("Messages", [])


# --- one published result -------------------------------------------------------------------------------------

def test_paused_worker_never_replaces_the_published_result(standin_factory, adapter_factory, gw, input_url,
                                                           server_aws):
    """SIGSTOP the holder past the stale window, another worker completes, SIGCONT: one object, one version."""
    # GIVEN a versioned results bucket and a job running on worker A
    s3 = gw.clients.s3
    s3.put_bucket_versioning(Bucket=server_aws.bucket, VersioningConfiguration={"Status": "Enabled"})
    standin = standin_factory(seconds_per_job=3.0)
    first = adapter_factory(standin, GPUCTL_WORKER_ID="worker-a", **FAST_TAKEOVER).start()
    task_id = submit(gw, JobType.CAMERA_ANGLE, {"image_url": input_url})
    wait_for(gw, task_id, {JobStatus.PROCESSING}, check=lambda r: (r.progress or 0) > 0)
    # WHEN A is frozen, B takes the job over and completes it, and then A wakes up
    first.signal(signal.SIGSTOP)
    try:
        second = adapter_factory(standin, GPUCTL_WORKER_ID="worker-b", **FAST_TAKEOVER).start()
        record = wait_for(gw, task_id, timeout=45)
    finally:
        first.signal(signal.SIGCONT)
    assert record.status is JobStatus.COMPLETED and record.worker == "worker-b", record
    wait_until(lambda: len(events_named(first, "adapter.message_done")) == 1, 30, "worker A to give up")
    # THEN the record still names B's result, which is the only current object under the job, with one version
    after = gw.table.get(task_id)
    assert after.status is JobStatus.COMPLETED and after.result_s3_uri == record.result_s3_uri
    assert after.worker == "worker-b" and after.attempts == 2
    assert_png_result(gw, after, server_aws)
    prefix = f"results/camera-angle/{task_id}/"
    listing = s3.list_object_versions(Bucket=server_aws.bucket, Prefix=prefix)
    published = after.result_s3_uri.split(f"s3://{server_aws.bucket}/", 1)[1]
    versions = [v for v in listing.get("Versions", []) if v["Key"] == published]
    assert len(versions) == 1 and versions[0]["IsLatest"]
    assert not [m for m in listing.get("DeleteMarkers", []) if m["Key"] == published]
    current = s3.list_objects_v2(Bucket=server_aws.bucket, Prefix=prefix).get("Contents", [])
    assert [o["Key"] for o in current] == [published]
    assert len(events_named(second, "adapter.job_completed")) == 1
    assert events_named(first, "adapter.job_completed") == []


# --- poison jobs end ---------------------------------------------------------------------------------------------

def test_job_whose_worker_dies_every_time_is_failed_and_dead_lettered(standin_factory, adapter_factory, gw,
                                                                      input_url, server_aws):
    """Kill the holder on every receive: on the last allowed receive the job is failed with the reason."""
    # GIVEN a job that never finishes on ComfyUI, and a queue that allows 3 receives
    standin = standin_factory(seconds_per_job=60.0)
    task_id = submit(gw, JobType.CAMERA_ANGLE, {"image_url": input_url})
    # WHEN its holder is killed every time it has claimed the job
    for attempt in range(1, MAX_RECEIVE):
        holder = adapter_factory(standin, **FAST_TAKEOVER).start()
        wait_for(gw, task_id, {JobStatus.PROCESSING}, timeout=30, check=lambda r, n=attempt: r.attempts == n)
        holder.signal(signal.SIGKILL)
        holder.wait(10)
    last = adapter_factory(standin, **FAST_TAKEOVER).start()
    # THEN the next receive, the queue's last, fails it instead of taking it over again
    record = wait_for(gw, task_id, timeout=30)
    assert record.status is JobStatus.FAILED
    assert record.error_message == f"the adapter stopped {MAX_RECEIVE - 1} times while running this job"
    # (logged just after the record turns failed and the message is dead-lettered: wait for the line)
    wait_until(lambda: len(events_named(last, "adapter.job_stopped_too_often")) == 1, 10, "the log line")
    # AND its message is in the dead-letter queue with that reason, and gone from the queue
    dlq = _dlq(gw, server_aws)
    assert [m["MessageAttributes"]["gpuctl_poison_reason"]["StringValue"] for m in dlq] == [record.error_message]
    assert json.loads(dlq[0]["Body"])["task_id"] == task_id
    wait_until(lambda: queue_counts(gw) == (0, 0), 10, "an empty queue")


def test_undecodable_and_ill_typed_messages_are_dead_lettered_at_the_first_receive(standin, adapter_factory, gw,
                                                                                   server_aws):
    """A 3000-deep body and "steps": true are poison at once: DLQ with the reason, the pending job failed."""
    # GIVEN a message nested 3000 levels deep and a job whose body says "steps": true
    task_id = submit(gw, JobType.CAMERA_ANGLE, {"image_url": "s3://b/in.png"})
    gw.queue.purge()
    gw.queue.send('{"task_id": "x", "api_path": "/api/v1/camera-angle/jobs", "request_body": '
                  + "[" * 3000 + "]" * 3000 + "}")
    gw.queue.send(json.dumps({"task_id": task_id, "api_path": JobType.CAMERA_ANGLE.api_path,
                              "request_body": {"image_url": "s3://b/in.png", "steps": True}}))
    # WHEN the adapter receives them
    adapter = adapter_factory(standin).start()
    # THEN the job is failed with the reason, both messages are dead-lettered at their first receive
    record = wait_for(gw, task_id)
    assert record.status is JobStatus.FAILED and "steps" in (record.error_message or "")
    wait_until(lambda: len(events_named(adapter, "adapter.poison_message")) == 2, 10, "two poison messages")
    dlq = _dlq(gw, server_aws)
    reasons = sorted(m["MessageAttributes"]["gpuctl_poison_reason"]["StringValue"] for m in dlq)
    assert len(reasons) == 2 and any("nested too deeply" in r for r in reasons)
    assert events_named(adapter, "adapter.message_error") == []  # no traceback, no retry
    assert not standin.standin.history and record.attempts == 0


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``×``height`` (a decompression bomb's shape, without its data)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_oversized_and_refused_inputs_fail_before_anything_reaches_comfyui(standin, adapter_factory, gw,
                                                                           server_aws, tmp_path):
    """A 10000×10000 bomb, a 40000×4 strip and a right-to-left-override host fail at once; ComfyUI sees nothing."""
    # GIVEN three jobs whose inputs break the shared limits (gpuctl.inputs)
    gw.store.put_bytes(_png_header(10000, 10000), server_aws.bucket, "inputs/bomb.png")
    strip = make_image(tmp_path / "strip.png", size=(40000, 4))
    gw.store.upload_file(strip, server_aws.bucket, "inputs/strip.png")
    bomb = submit(gw, JobType.CAMERA_ANGLE, {"image_url": f"s3://{server_aws.bucket}/inputs/bomb.png"})
    wide = submit(gw, JobType.CAMERA_ANGLE, {"image_url": f"s3://{server_aws.bucket}/inputs/strip.png"})
    rlo = submit(gw, JobType.CAMERA_ANGLE, {"image_url": "https://exa\u202emple.com/in.png"})
    # WHEN the adapter runs them
    adapter_factory(standin).start()
    # THEN each fails on its first attempt with one sentence, and ComfyUI got no upload and no prompt
    records = {t: wait_for(gw, t) for t in (bomb, wide, rlo)}
    assert all(r.status is JobStatus.FAILED and r.attempts == 1 for r in records.values()), records
    assert "megapixel" in (records[bomb].error_message or "")
    assert "longest side" in (records[wide].error_message or "")
    assert "not a valid host name" in (records[rlo].error_message or "")
    assert "\u202e" not in (records[rlo].error_message or "")
    assert not list(standin.input_dir.rglob("*.*")) and standin.standin.number == 0


# --- outages pause -----------------------------------------------------------------------------------------------

class StandinProcess:
    """The stand-in in its own process (``python -m gpuctl.local.comfyui_standin``), killable for real."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.base_url = f"http://127.0.0.1:{port}"
        self.input_dir, self.output_dir = root / "input", root / "output"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StandinProcess:
        import httpx

        cmd = [sys.executable, "-m", "gpuctl.local.comfyui_standin", "--port", str(self.port), "--seconds-per-job",
               "0.3", "--input-dir", str(self.input_dir), "--output-dir", str(self.output_dir),
               # its own temp folder too, as local mode gives it: this stand-in is SIGKILLed on purpose
               "--temp-dir", str(self.root / "temp")]
        self.root.mkdir(parents=True, exist_ok=True)
        log = (self.root / "standin.log").open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.base_url}/system_stats", timeout=1).raise_for_status()
                return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("the stand-in process did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def standin_process(tmp_path: Path) -> Iterator[StandinProcess]:
    root = tmp_path / "comfyui"
    proc = StandinProcess(root, free_port())
    yield proc.start()
    proc.kill()


def test_comfyui_outage_pauses_the_adapter_and_fails_no_job(standin_process, adapter_factory, gw, input_url):
    """20 queued jobs, ComfyUI killed for longer than every retry budget, restarted: 20 completed, none failed."""
    # GIVEN 20 queued jobs and an adapter with small retry budgets
    adapter = adapter_factory(standin_process, GPUCTL_BACKEND_DOWN_GRACE="1", GPUCTL_HTTP_RETRY_TIMEOUT="2",
                              GPUCTL_RELEASE_DELAY="0").start()
    task_ids = [submit(gw, JobType.CAMERA_ANGLE, {"image_url": input_url}) for _ in range(20)]
    wait_until(lambda: sum(gw.table.get(t).status is JobStatus.COMPLETED for t in task_ids) >= 3, 120,
               "a few jobs done")
    # WHEN ComfyUI is killed, stays down well past the budgets, and comes back
    standin_process.kill()
    wait_until(lambda: bool(events_named(adapter, "adapter.paused")), 30, "the adapter to pause")
    time.sleep(4)
    standin_process.start()
    # THEN every job completes, none failed, and the jobs in hand were handed back without counting the attempt
    records = [wait_for(gw, t, timeout=120) for t in task_ids]
    assert [r.status for r in records] == [JobStatus.COMPLETED] * 20, [r.error_message for r in records]
    assert events_named(adapter, "adapter.outage") and events_named(adapter, "adapter.resumed")
    # (a job whose failure raced the restart — the probe already answering — may count one attempt)
    assert max(r.attempts for r in records) <= 2, [r.attempts for r in records]


# --- cancel and timeout -----------------------------------------------------------------------------------------

def test_cancel_reaches_a_queued_and_a_running_prompt_within_five_seconds(standin_factory, adapter_factory, gw,
                                                                          input_url):
    """A prompt waiting in ComfyUI's queue is deleted, a running one interrupted; both end "cancelled by user"."""
    # GIVEN two long jobs in hand: the first running on ComfyUI (a 0.4 s sampler step), the second queued behind it
    standin = standin_factory(seconds_per_job=20.0, steps=40)
    adapter = adapter_factory(standin).start()
    running = submit(gw, JobType.CAMERA_ANGLE, {"image_url": input_url})
    wait_for(gw, running, {JobStatus.PROCESSING}, check=lambda r: (r.progress or 0) > 0)
    queued = submit(gw, JobType.CAMERA_ANGLE, {"image_url": input_url, "seed": 5})
    wait_until(lambda: len(standin.standin.pending) == 1, 20, "the second prompt queued on ComfyUI")
    # WHEN each is cancelled, as `gpuctl jobs cancel` does
    for task_id in (queued, running):
        asked = time.monotonic()
        gw.table.update_fields(task_id, {"cancel_requested": True}, only_if=[JobStatus.PROCESSING])
        record = wait_for(gw, task_id, timeout=10)
        # THEN it ends failed "cancelled by user" within 5 s, confirmed by ComfyUI
        assert record.status is JobStatus.FAILED and record.error_message == "cancelled by user"
        assert time.monotonic() - asked < 5
    # confirmed: the queued prompt by its absence (deleted from the queue), the running one by its end event or,
    # if /queue answered first, by its history entry
    confirmed = {e["task_id"]: e["confirmed_by"] for e in events_named(adapter, "comfyui.prompt_stopped")}
    assert confirmed[queued] == "unknown" and confirmed[running] in ("event", "done"), confirmed
    assert not standin.standin.pending and standin.standin.running is None
    assert_comfyui_clean(standin)


def test_a_prompt_that_ignores_the_interrupt_is_ended_after_the_bounded_escalation(standin_factory,
                                                                                   adapter_factory, gw, input_url):
    """A node that never reaches an interrupt check: re-sent, sent globally, then the job ends anyway."""
    # GIVEN a ComfyUI that honours interrupts only 60 s after they are asked for (a long node without progress)
    standin = standin_factory(seconds_per_job=20.0)
    standin.set_faults(interrupt_lag_s=60.0)
    adapter = adapter_factory(standin, GPUCTL_INTERRUPT_CONFIRM_TIMEOUT="2").start()
    task_id = submit(gw, JobType.CAMERA_ANGLE, {"image_url": input_url})
    wait_for(gw, task_id, {JobStatus.PROCESSING}, check=lambda r: (r.progress or 0) > 0)
    # WHEN it is cancelled
    asked = time.monotonic()
    gw.table.update_fields(task_id, {"cancel_requested": True}, only_if=[JobStatus.PROCESSING])
    record = wait_for(gw, task_id, timeout=10)
    # THEN the job ends within the bound, after escalating, and says so in the log
    assert record.status is JobStatus.FAILED and record.error_message == "cancelled by user"
    assert time.monotonic() - asked < 5
    assert len(events_named(adapter, "comfyui.interrupt_escalated")) == 1
    assert [e["confirmed_by"] for e in events_named(adapter, "comfyui.prompt_stopped")] == ["unconfirmed"]


# --- readiness includes models ------------------------------------------------------------------------------------

def test_adapter_check_reports_missing_model_files_and_exits_1(standin_factory, tmp_path):
    """`gpuctl adapter check`: 0 and "ready" with every model; 1 naming the file when a LoRA is missing."""
    from gpuctl.local.standin_nodes import DEFAULT_MODELS

    # GIVEN one ComfyUI with all the models, one without the camera LoRA
    complete = standin_factory()
    models = {k: [m for m in v if m != "镜头转换.safetensors"] for k, v in DEFAULT_MODELS.items()}
    lacking = standin_factory(models=models)
    env = {"GPUCTL_COMFYUI_DIR": str(complete.input_dir.parent)}
    # WHEN the operator checks each
    ok = run_cli(["adapter", "check", "--backend-url", complete.base_url], env)
    bad = run_cli(["-o", "json", "adapter", "check", "--backend-url", lacking.base_url], env)
    # THEN the first is ready (exit 0), the second is not (exit 1) and names the missing file
    assert ok.returncode == 0, ok.stderr
    assert "yes" in ok.stdout and "0.3.64" in ok.stdout
    assert bad.returncode == 1, bad.stderr
    report = json.loads(bad.stdout)
    assert report["ready"] is False
    assert any("镜头转换.safetensors" in p and "camera-angle" in p for p in report["problems"])


def test_daemon_waits_for_missing_models_and_gives_up_naming_them(standin_factory, adapter_factory):
    """The daemon is not ready while a model file is missing: it exits 1 after the ready timeout, naming it."""
    from gpuctl.local.standin_nodes import DEFAULT_MODELS

    models = {k: [m for m in v if m != "qwen_image_vae.safetensors"] for k, v in DEFAULT_MODELS.items()}
    lacking = standin_factory(models=models)
    adapter = adapter_factory(lacking, GPUCTL_READY_TIMEOUT="2").start()
    assert adapter.wait(30) == 1
    (event,) = events_named(adapter, "adapter.backend_not_ready")
    assert any("qwen_image_vae.safetensors" in p for p in event["problems"])


# --- unified backend ---------------------------------------------------------------------------------------------

def _unified_jobs(standin: Any) -> Any:
    from gpuctl.local.standin_unified import UNIFIED_KEY

    return standin._app[UNIFIED_KEY]


def test_unified_service_that_blocks_while_running_gets_one_post(standin_factory, adapter_factory, gw, input_url,
                                                                 server_aws):
    """A status read blocked past its timeout is "still running": the job completes after exactly one POST."""
    # GIVEN the running service's shape: status reads answer nothing while a 4 s job executes (timeout 1 s)
    standin = standin_factory(seconds_per_job=4.0, unified_blocking=True, output_bucket=server_aws.bucket,
                              s3_endpoint_url=server_aws.endpoint_url)
    adapter = adapter_factory(standin, GPUCTL_BACKEND="unified", GPUCTL_UNIFIED_STATUS_TIMEOUT="1").start()
    # WHEN a job runs
    task_id = submit(gw, JobType.CAMERA_ANGLE, {"image_url": input_url})
    record = wait_for(gw, task_id, timeout=40)
    # THEN it completed once, its backend id recorded, the service saw one POST
    assert record.status is JobStatus.COMPLETED, record.error_message
    jobs = _unified_jobs(standin)
    assert jobs.submitted == 1 and record.comfy_job_id in jobs.jobs
    assert events_named(adapter, "adapter.job_retry_later") == []


def test_unified_takeover_polls_the_existing_job_instead_of_posting_again(standin_factory, adapter_factory, gw,
                                                                          input_url, server_aws):
    """The backend job id is in the record before polling: a takeover follows it, no second POST."""
    # GIVEN a unified job whose holder is killed once the service has it
    standin = standin_factory(seconds_per_job=4.0, output_bucket=server_aws.bucket,
                              s3_endpoint_url=server_aws.endpoint_url)
    first = adapter_factory(standin, GPUCTL_BACKEND="unified", **FAST_TAKEOVER).start()
    task_id = submit(gw, JobType.CAMERA_ANGLE, {"image_url": input_url})
    wait_for(gw, task_id, {JobStatus.PROCESSING}, check=lambda r: bool(r.comfy_job_id))
    first.signal(signal.SIGKILL)
    first.wait(10)
    # WHEN another adapter takes it over
    # (it takes a stale job over after 2 s, but extends its own message as a real adapter does: with a 2 s
    # extension too, a loaded machine that delays its heartbeat lets it receive its own job again)
    second = adapter_factory(standin, GPUCTL_BACKEND="unified", GPUCTL_HEARTBEAT_STALE_AFTER="2").start()
    record = wait_for(gw, task_id, timeout=40)
    # THEN it completes from the same service job
    assert record.status is JobStatus.COMPLETED, record.error_message
    assert _unified_jobs(standin).submitted == 1
    assert len(events_named(second, "unified.job_resumed")) == 1


def test_unified_input_beyond_the_limits_is_refused_before_the_post(standin_factory, adapter_factory, gw,
                                                                    server_aws):
    """The unified backend checks the inputs' headers with the shared limits before it POSTs anything."""
    standin = standin_factory()
    gw.store.put_bytes(_png_header(20000, 20000), server_aws.bucket, "inputs/bomb.png")
    task_id = submit(gw, JobType.CAMERA_ANGLE, {"image_url": f"s3://{server_aws.bucket}/inputs/bomb.png"})
    adapter_factory(standin, GPUCTL_BACKEND="unified").start()
    record = wait_for(gw, task_id)
    assert record.status is JobStatus.FAILED and "pixels" in (record.error_message or "")
    assert _unified_jobs(standin).submitted == 0
