"""The adapter daemon as a real process: moto's server for AWS, the ComfyUI stand-in on loopback."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpuctl.local.comfyui_standin import StandinConfig, StandinServer
from gpuctl.models import JobRecord, JobStatus, JobType, parse_request
from tests.helpers import Resources, make_image

pytestmark = pytest.mark.server

FINISHED = {JobStatus.COMPLETED, JobStatus.FAILED}


class AdapterProcess:
    """``python -m adapter`` in a subprocess; its JSON log lines go to a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, **extra_env: str) -> AdapterProcess:
        env = {**os.environ, **self.env, **extra_env}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "adapter"], env=env, stdout=log, stderr=log)
        log.close()
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


@pytest.fixture
def standin_factory() -> Iterator[Callable[..., StandinServer]]:
    """Start ComfyUI stand-ins with a given config; all are stopped at the end."""
    servers: list[StandinServer] = []

    def start(**config: Any) -> StandinServer:
        config.setdefault("seconds_per_job", 0.4)
        server = StandinServer(StandinConfig(port=0, **config))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def standin(standin_factory: Callable[..., StandinServer]) -> StandinServer:
    return standin_factory()


@pytest.fixture
def adapter_factory(server_aws: Resources, tmp_path: Path) -> Iterator[Callable[..., AdapterProcess]]:
    """Adapter processes pointed at the moto server and a stand-in; each is stopped at the end."""
    procs: list[AdapterProcess] = []

    def make(standin: StandinServer, **overrides: str) -> AdapterProcess:
        env = {
            **server_aws.env(),
            "GPUCTL_BACKEND_URL": standin.base_url,
            "GPUCTL_POLL_WAIT": "1",
            "GPUCTL_HEARTBEAT_INTERVAL": "0.5",
            "GPUCTL_HEARTBEAT_STALE_AFTER": "3",
            "GPUCTL_VISIBILITY_EXTENSION": "3",
            "GPUCTL_RELEASE_DELAY": "1",
            "GPUCTL_HISTORY_POLL_INTERVAL": "0.3",
            "GPUCTL_BACKEND_DOWN_GRACE": "15",
            "GPUCTL_READY_TIMEOUT": "20",
            "GPUCTL_JOB_TIMEOUT": "60",
            "GPUCTL_SHUTDOWN_GRACE": "10",
            "GPUCTL_LOG_LEVEL": "INFO",
            "GPUCTL_HTTP_RETRY_ATTEMPTS": "2",
            "GPUCTL_CANCEL_CHECK_INTERVAL": "0.5",
            "GPUCTL_ACTIVITY_INTERVAL": "1",
            "GPUCTL_INTERRUPT_CONFIRM_TIMEOUT": "4",
            "GPUCTL_COMFYUI_DIR": str(standin.input_dir.parent),
            **overrides,
        }
        proc = AdapterProcess(env, tmp_path / f"adapter-{len(procs)}.log")
        procs.append(proc)
        return proc

    yield make
    for proc in procs:
        proc.stop()


@pytest.fixture
def gw(server_aws: Resources) -> Any:
    from gpuctl.services.context import Gateways
    from gpuctl.settings import Settings

    return Gateways(Settings(**server_aws.settings_kwargs()))


@pytest.fixture
def input_url(gw: Any, server_aws: Resources, tmp_path: Path) -> str:
    """A small real PNG in the bucket."""
    path = make_image(tmp_path / "in.png")
    return gw.store.upload_file(path, server_aws.bucket, "inputs/test/in.png", content_type="image/png")


def submit(gw: Any, job_type: JobType, body: dict[str, Any]) -> str:
    from gpuctl.services.submit import submit_request

    return submit_request(gw, parse_request(job_type, body), start_instance=False).record.task_id


def wait_for(gw: Any, task_id: str, statuses: set[JobStatus] = FINISHED, timeout: float = 30.0,
             check: Callable[[JobRecord], bool] | None = None) -> JobRecord:
    deadline = time.monotonic() + timeout
    record = gw.table.get(task_id)
    while time.monotonic() < deadline:
        record = gw.table.get(task_id)
        if record.status in statuses and (check is None or check(record)):
            return record
        time.sleep(0.2)
    raise AssertionError(f"job {task_id} still {record.status.value} after {timeout} s: {record!r}")


def queue_counts(gw: Any) -> tuple[int, int]:
    stats = gw.queue.stats(include_dlq=False)
    return stats.visible, stats.in_flight


def assert_png_result(gw: Any, record: JobRecord, server_aws: Resources) -> None:
    from PIL import Image

    from gpuctl.aws.s3 import parse_s3_uri

    prefix = f"s3://{server_aws.bucket}/results/{record.kind}/{record.task_id}/"
    assert record.result_s3_uri and record.result_s3_uri.startswith(prefix) and record.result_s3_uri.endswith(".png")
    bucket, key = parse_s3_uri(record.result_s3_uri)
    data = gw.store.get_bytes(bucket, key)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"


def test_camera_angle_job_completes_end_to_end(standin, adapter_factory, gw, input_url, server_aws):
    """A camera-angle job goes pending → completed with a PNG in results/camera-angle/<id>.png."""
    # GIVEN a running adapter
    adapter = adapter_factory(standin).start()
    # WHEN a job is submitted
    task_id = submit(gw, JobType.CAMERA_ANGLE, {"image_url": input_url, "horizontal": 1, "seed": 7})
    # THEN it completes with its result in S3 and the message gone
    record = wait_for(gw, task_id)
    assert record.status is JobStatus.COMPLETED, record.error_message
    assert_png_result(gw, record, server_aws)
    assert record.comfy_job_id and record.attempts == 1 and record.progress == 1.0
    assert record.worker and record.finished_at
    wait_until(lambda: queue_counts(gw) == (0, 0), 10, "an empty queue")
    wait_until(lambda: bool(events_named(adapter, "adapter.job_completed")), 10, "the job_completed line")
    # AND ComfyUI keeps nothing of it: no input, no output, no history entry
    assert_comfyui_clean(standin)
    # AND the activity marker says the adapter runs, holds nothing, and finished this job
    wait_until(lambda: gw.table.read_activity().last_finished_at == record.finished_at, 10, "the marker")
    activity = gw.table.read_activity()
    assert activity.adapter_state == "running" and activity.jobs_in_hand == 0


def job_files(standin: StandinServer) -> list[str]:
    """The adapter's files in the stand-in's input and output folders."""
    return sorted(str(p.relative_to(standin.input_dir.parent))
                  for d in (standin.input_dir, standin.output_dir) for p in (d / "gpuctl").glob("*"))


def assert_comfyui_clean(standin: StandinServer, timeout: float = 5.0) -> None:
    """No file of the adapter's and no history entry left on the stand-in (cleaned when the job ended)."""
    wait_until(lambda: not job_files(standin) and not standin.standin.history, timeout,
               f"a clean ComfyUI (files {job_files(standin)}, history {list(standin.standin.history)})")


def events_named(adapter: AdapterProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in adapter.events() if e.get("event") == name]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_qwen_image_edit_job_with_a_reference_image_completes(standin, adapter_factory, gw, input_url,
                                                              server_aws):
    """A qwen-image-edit job with image2 completes; the unused image3 node is dropped from the graph."""
    # GIVEN a running adapter
    adapter_factory(standin).start()
    # WHEN a qwen-image-edit job with a second image is submitted
    task_id = submit(gw, JobType.QWEN_IMAGE_EDIT,
                     {"image_url": input_url, "image2_url": input_url, "prompt": "make it a sketch"})
    # THEN it completes with a PNG result
    record = wait_for(gw, task_id)
    assert record.status is JobStatus.COMPLETED, record.error_message
    assert_png_result(gw, record, server_aws)


def test_seed_format_message_is_processed(standin, adapter_factory, gw, input_url, server_aws):
    """A message with only task_id/api_path/request_body and a seed-style record completes."""
    # GIVEN a record written the way the seed orchestrator writes it, and its bare message
    task_id = "0b7e1c2a-5d1e-4c8e-9f57-3c1b2a4d5e6f"
    now = int(time.time())
    gw.clients.dynamodb.put_item(TableName=server_aws.table_name, Item={
        "task_id": {"S": task_id}, "status": {"S": "pending"}, "job_type": {"S": "/api/v1/camera-angle/jobs"},
        "created_at": {"N": str(now)}, "updated_at": {"N": str(now)}})
    gw.queue.send(json.dumps({"task_id": task_id, "api_path": "/api/v1/camera-angle/jobs",
                              "request_body": {"image_url": input_url, "prompt": "将镜头转为俯视", "steps": 8}}))
    # WHEN the adapter runs
    adapter_factory(standin).start()
    # THEN the job completes
    record = wait_for(gw, task_id)
    assert record.status is JobStatus.COMPLETED, record.error_message
    assert_png_result(gw, record, server_aws)


def test_killed_adapter_job_is_taken_over_and_completes_once(standin_factory, adapter_factory, gw, input_url,
                                                             server_aws):
    """SIGKILL mid-job, restart: the stale claim is taken over and the job completes exactly once."""
    # GIVEN a slow job running on a first adapter
    standin = standin_factory(seconds_per_job=2.5)
    fast_takeover = {"GPUCTL_VISIBILITY_EXTENSION": "2", "GPUCTL_HEARTBEAT_STALE_AFTER": "2"}
    first = adapter_factory(standin, **fast_takeover).start()
    task_id = submit(gw, JobType.CAMERA_ANGLE, {"image_url": input_url})
    wait_for(gw, task_id, {JobStatus.PROCESSING}, check=lambda r: (r.progress or 0) > 0)
    # WHEN it is killed without warning and a second adapter starts
    first.signal(signal.SIGKILL)
    first.wait(10)
    second = adapter_factory(standin, **fast_takeover).start()
    # THEN the second adapter takes the job over and completes it, once
    record = wait_for(gw, task_id, timeout=45)
    assert record.status is JobStatus.COMPLETED, record.error_message
    assert record.attempts == 2
    assert len(events_named(second, "adapter.takeover")) == 1
    assert len(events_named(second, "adapter.job_completed")) == 1
    assert_png_result(gw, record, server_aws)
    wait_until(lambda: queue_counts(gw) == (0, 0), 10, "an empty queue")


def test_job_longer_than_three_visibility_timeouts_is_processed_once(standin_factory, adapter_factory, gw,
                                                                     input_url, server_aws):
    """With a 2 s queue visibility timeout, a 7 s job is never redelivered: the heartbeat extends it."""
    # GIVEN a queue whose messages reappear after 2 s, and a 7 s job
    gw.clients.sqs.set_queue_attributes(QueueUrl=server_aws.queue_url, Attributes={"VisibilityTimeout": "2"})
    standin = standin_factory(seconds_per_job=7.0)
    adapter = adapter_factory(standin).start()
    # WHEN the job runs
    task_id = submit(gw, JobType.CAMERA_ANGLE, {"image_url": input_url})
    record = wait_for(gw, task_id, timeout=40)
    # THEN it completed on the first attempt and its message was never received a second time
    assert record.status is JobStatus.COMPLETED, record.error_message
    assert record.attempts == 1
    # adapter.message_done is logged just after the record turns completed: wait for the line, not the record.
    wait_until(lambda: len(events_named(adapter, "adapter.message_done")) >= 1, 10, "the message_done log line")
    assert events_named(adapter, "adapter.held_elsewhere") == []
    assert len(events_named(adapter, "adapter.message_done")) == 1
    wait_until(lambda: queue_counts(gw) == (0, 0), 10, "an empty queue")


def test_duplicate_delivery_produces_one_result(standin, adapter_factory, gw, input_url):
    """The same message delivered twice (at once and late) runs the job once; both copies are deleted."""
    # GIVEN a job whose message is queued twice more, once now and once after it finished
    adapter = adapter_factory(standin).start()
    task_id = submit(gw, JobType.CAMERA_ANGLE, {"image_url": input_url})
    body = json.dumps({"task_id": task_id, "api_path": JobType.CAMERA_ANGLE.api_path,
                       "request_body": {"image_url": input_url}})
    gw.queue.send(body)
    record = wait_for(gw, task_id)
    gw.queue.send(body)
    # THEN the job ran once and every copy is gone
    wait_until(lambda: queue_counts(gw) == (0, 0), 20, "every copy to be deleted")
    record = gw.table.get(task_id)
    assert record.status is JobStatus.COMPLETED and record.attempts == 1
    # adapter.already_finished is logged just after the late copy is deleted: wait for the line, not the queue.
    wait_until(lambda: len(events_named(adapter, "adapter.already_finished")) >= 1, 10,
               "the already_finished log line")
    assert len(events_named(adapter, "adapter.job_completed")) == 1


def test_backend_500s_are_retried_then_the_job_completes(standin, adapter_factory, gw, input_url):
    """POST /prompt failing with 500 more often than the retry budget: released, redelivered, completed."""
    # GIVEN a ComfyUI that answers the next 3 prompts with HTTP 500 (stamina gives up after 2 here)
    standin.set_faults(fail_http_500=3)
    adapter = adapter_factory(standin).start()
    # WHEN a job is submitted
    task_id = submit(gw, JobType.CAMERA_ANGLE, {"image_url": input_url})
    # THEN it is released once, then completes on the second receive
    record = wait_for(gw, task_id, timeout=45)
    assert record.status is JobStatus.COMPLETED, record.error_message
    assert record.attempts == 2
    assert len(events_named(adapter, "adapter.job_retry_later")) == 1


def test_transient_failure_on_the_last_receive_fails_the_job(standin, adapter_factory, gw, input_url):
    """A backend that keeps failing: on the queue's last allowed receive the job is failed, not lost."""
    # GIVEN a ComfyUI whose POST /prompt always fails
    standin.set_faults(fail_http_500=1000)
    adapter_factory(standin).start()
    # WHEN a job is submitted
    task_id = submit(gw, JobType.CAMERA_ANGLE, {"image_url": input_url})
    # THEN after maxReceiveCount (3) receives it is failed with the last error and the message deleted
    record = wait_for(gw, task_id, timeout=90)
    assert record.status is JobStatus.FAILED
    assert "500" in (record.error_message or "") and "gave up after 3 attempts" in (record.error_message or "")
    wait_until(lambda: queue_counts(gw) == (0, 0), 10, "an empty queue")


def test_comfyui_restart_mid_job_is_detected_and_resubmitted(standin_factory, adapter_factory, gw, input_url):
    """ComfyUI restarting halfway through forgets the prompt; the adapter resubmits it and completes."""
    # GIVEN a ComfyUI that restarts (losing queue and history) in the middle of the next job
    standin = standin_factory(seconds_per_job=1.5)
    standin.set_faults(restart=1, restart_downtime_s=1.0)
    adapter = adapter_factory(standin).start()
    # WHEN a job is submitted
    task_id = submit(gw, JobType.CAMERA_ANGLE, {"image_url": input_url})
    # THEN it completes after one resubmission
    record = wait_for(gw, task_id, timeout=45)
    assert record.status is JobStatus.COMPLETED, record.error_message
    assert record.attempts == 1
    assert len(events_named(adapter, "comfyui.prompt_lost")) == 1


def test_websocket_drop_mid_job_does_not_fail_the_job(standin_factory, adapter_factory, gw, input_url):
    """The WebSocket cut halfway through a job: history polling still sees it complete."""
    # GIVEN a ComfyUI that cuts every WebSocket in the middle of the next job
    standin = standin_factory(seconds_per_job=1.5)
    standin.set_faults(drop_websocket=1)
    adapter = adapter_factory(standin).start()
    # WHEN a job is submitted
    task_id = submit(gw, JobType.CAMERA_ANGLE, {"image_url": input_url})
    # THEN it completes, on its first submission, and the socket was reconnected
    record = wait_for(gw, task_id, timeout=30)
    assert record.status is JobStatus.COMPLETED, record.error_message
    assert events_named(adapter, "comfyui.prompt_lost") == []
    assert len(events_named(adapter, "comfyui.ws_dropped")) >= 1


def test_execution_error_fails_the_job_with_the_node_message(standin, adapter_factory, gw, input_url):
    """A node raising during execution fails the job at once with that node's message."""
    # GIVEN a ComfyUI whose sampler fails on the next job
    standin.set_faults(execution_error=1, execution_error_message="CUDA out of memory (stand-in)")
    adapter_factory(standin).start()
    # WHEN a job is submitted
    task_id = submit(gw, JobType.CAMERA_ANGLE, {"image_url": input_url})
    # THEN it fails with the node's message, on the first attempt
    record = wait_for(gw, task_id)
    assert record.status is JobStatus.FAILED
    assert "CUDA out of memory (stand-in)" in (record.error_message or "")
    assert record.attempts == 1
    wait_until(lambda: queue_counts(gw) == (0, 0), 10, "an empty queue")
    assert_comfyui_clean(standin)


def test_poison_messages_go_to_the_dlq_and_the_loop_goes_on(standin, adapter_factory, gw, input_url,
                                                            server_aws):
    """Non-JSON, unknown api_path and missing-field messages are moved to the DLQ; a good job still runs."""
    # GIVEN three poison messages ahead of a valid job
    bad_path = json.dumps({"task_id": "t-unknown", "api_path": "/api/v1/nope/jobs", "request_body": {}})
    for body in ("this is not json", bad_path, json.dumps({"api_path": JobType.CAMERA_ANGLE.api_path})):
        gw.queue.send(body)
    task_id = submit(gw, JobType.CAMERA_ANGLE, {"image_url": input_url})
    # WHEN the adapter runs
    adapter = adapter_factory(standin).start()
    # THEN the valid job completes, the queue is empty and the DLQ holds the three with their reasons
    record = wait_for(gw, task_id)
    assert record.status is JobStatus.COMPLETED, record.error_message
    assert len(events_named(adapter, "adapter.poison_message")) == 3
    wait_until(lambda: queue_counts(gw) == (0, 0), 10, "an empty queue")
    dlq = gw.clients.sqs.receive_message(QueueUrl=server_aws.dlq_url, MaxNumberOfMessages=10,
                                         MessageAttributeNames=["All"], WaitTimeSeconds=1)["Messages"]
    assert len(dlq) == 3
    reasons = sorted(m["MessageAttributes"]["gpuctl_poison_reason"]["StringValue"] for m in dlq)
    assert any("not JSON" in r for r in reasons) and any("api_path" in r for r in reasons)


def test_cancel_while_processing_fails_the_job_as_cancelled(standin_factory, adapter_factory, gw, input_url):
    """cancel_requested on a running job interrupts ComfyUI and ends the job failed "cancelled by user"."""
    # GIVEN a long job running
    standin = standin_factory(seconds_per_job=8.0)
    adapter_factory(standin).start()
    task_id = submit(gw, JobType.CAMERA_ANGLE, {"image_url": input_url})
    wait_for(gw, task_id, {JobStatus.PROCESSING}, check=lambda r: (r.progress or 0) > 0)
    # WHEN a cancel is requested, as `gpuctl jobs cancel` does
    asked = time.monotonic()
    gw.table.update_fields(task_id, {"cancel_requested": True}, only_if=[JobStatus.PROCESSING])
    # THEN the job ends failed "cancelled" well before the job would have finished
    record = wait_for(gw, task_id, timeout=10)
    assert record.status is JobStatus.FAILED
    assert record.error_message == "cancelled by user"
    assert time.monotonic() - asked < 5
    wait_until(lambda: queue_counts(gw) == (0, 0), 10, "an empty queue")


def test_job_timeout_interrupts_and_fails_the_job(standin_factory, adapter_factory, gw, input_url):
    """A job running past GPUCTL_JOB_TIMEOUT is interrupted and failed "timed out after N s"."""
    # GIVEN a 1 s job timeout and a 6 s job
    standin = standin_factory(seconds_per_job=6.0)
    adapter_factory(standin, GPUCTL_JOB_TIMEOUT="1").start()
    # WHEN the job runs
    task_id = submit(gw, JobType.CAMERA_ANGLE, {"image_url": input_url})
    # THEN it fails as timed out
    record = wait_for(gw, task_id, timeout=15)
    assert record.status is JobStatus.FAILED
    assert record.error_message == "timed out after 1 s"


def test_sigterm_releases_the_job_in_hand_for_the_next_worker(standin_factory, adapter_factory, gw, input_url):
    """SIGTERM with a job longer than the grace period: released, exit 0, the next adapter completes it."""
    # GIVEN a 3 s job on an adapter with a 1 s shutdown grace period
    standin = standin_factory(seconds_per_job=3.0)
    first = adapter_factory(standin, GPUCTL_SHUTDOWN_GRACE="1").start()
    task_id = submit(gw, JobType.CAMERA_ANGLE, {"image_url": input_url})
    wait_for(gw, task_id, {JobStatus.PROCESSING}, check=lambda r: (r.progress or 0) > 0)
    # WHEN the adapter gets SIGTERM
    first.signal(signal.SIGTERM)
    # THEN it exits 0 soon, leaving the job processing with a stale heartbeat and its message visible
    assert first.wait(20) == 0
    assert gw.table.read_activity().adapter_state == "stopped"  # its last word in the activity marker
    record = gw.table.get(task_id)
    assert record.status is JobStatus.PROCESSING and record.heartbeat_at == 0
    assert len(events_named(first, "adapter.message_released")) == 1
    # AND the next adapter takes it over at once and completes it
    standin.set_faults()  # (no faults; the stand-in keeps running)
    adapter_factory(standin).start()
    record = wait_for(gw, task_id, timeout=30)
    assert record.status is JobStatus.COMPLETED, record.error_message
    assert record.attempts == 1  # a shutdown hands the attempt back: it does not count against the job


def test_sigterm_lets_a_short_job_finish(standin_factory, adapter_factory, gw, input_url):
    """SIGTERM with a job shorter than the grace period: the job completes, then the adapter exits 0."""
    # GIVEN a 2 s job running
    standin = standin_factory(seconds_per_job=2.0)
    adapter = adapter_factory(standin, GPUCTL_SHUTDOWN_GRACE="20").start()
    task_id = submit(gw, JobType.CAMERA_ANGLE, {"image_url": input_url})
    wait_for(gw, task_id, {JobStatus.PROCESSING})
    # WHEN SIGTERM arrives
    adapter.signal(signal.SIGTERM)
    # THEN the job still completes and the adapter exits cleanly
    assert adapter.wait(30) == 0
    record = gw.table.get(task_id)
    assert record.status is JobStatus.COMPLETED, record.error_message


def test_unified_backend_records_the_services_result(standin_factory, adapter_factory, gw, input_url,
                                                     server_aws):
    """With GPUCTL_BACKEND=unified the job runs through /api/v1/... and its result URI is recorded as is."""
    # GIVEN the unified API (served by the stand-in) publishing results to the bucket
    standin = standin_factory(output_bucket=server_aws.bucket, s3_endpoint_url=server_aws.endpoint_url)
    adapter_factory(standin, GPUCTL_BACKEND="unified").start()
    # WHEN a job is submitted
    task_id = submit(gw, JobType.CAMERA_ANGLE, {"image_url": input_url})
    # THEN it completes with the service's result URI and the object is there
    record = wait_for(gw, task_id)
    assert record.status is JobStatus.COMPLETED, record.error_message
    assert record.result_s3_uri and record.result_s3_uri.startswith(f"s3://{server_aws.bucket}/")
    from gpuctl.aws.s3 import parse_s3_uri

    assert gw.store.size(*parse_s3_uri(record.result_s3_uri)) > 0
