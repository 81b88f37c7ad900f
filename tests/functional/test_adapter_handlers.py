"""The per-message logic against moto in-process, with a small scripted backend (no ComfyUI)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from adapter.backends import BackendJob, BackendResult, JobControl
from adapter.errors import TransientJobError
from adapter.handlers import Deps, MessageHandler
from adapter.heartbeat import Heartbeat
from adapter.settings import AdapterSettings
from gpuctl.models import JobMessage, JobStatus, JobType, parse_request
from tests.helpers import Resources

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


class ScriptedBackend:
    """Returns a fixed PNG, or raises the exception it was given; records the jobs it ran."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.ran: list[str] = []

    def wait_ready(self, stop: Any) -> None:
        return None

    def run(self, job: BackendJob, control: JobControl) -> BackendResult:
        self.ran.append(job.task_id)
        if self.error is not None:
            raise self.error
        return BackendResult(backend_job_id="prompt-1", image=PNG)

    def close(self) -> None:
        return None


def make_handler(aws: Resources, backend: ScriptedBackend, worker: str = "w-test") -> MessageHandler:
    from gpuctl.services.context import Gateways

    settings = AdapterSettings(**aws.settings_kwargs(), worker_id=worker, heartbeat_interval=1,
                               heartbeat_stale_after=5, visibility_extension=10, release_delay=0)
    gw = Gateways(settings)
    deps = Deps(settings=settings, table=gw.table, queue=gw.queue, store=gw.store, backend=backend)
    return MessageHandler(deps, Heartbeat(settings, gw.table, gw.queue))


def submit(gateways: Any, body: dict[str, Any] | None = None) -> str:
    from gpuctl.services.submit import submit_request

    request = parse_request(JobType.CAMERA_ANGLE, body or {"image_url": "s3://b/in.png"})
    return submit_request(gateways, request, start_instance=False).record.task_id


def receive_one(gateways: Any) -> Any:
    messages = gateways.queue.receive(max_messages=1, wait_seconds=0, visibility_timeout=0)
    assert len(messages) == 1
    return messages[0]


def test_pending_job_is_claimed_run_and_completed(aws, gateways):
    """pending → processing → completed; the result is uploaded and the message deleted."""
    # GIVEN a pending job
    task_id = submit(gateways)
    backend = ScriptedBackend()
    # WHEN its message is handled
    outcome = make_handler(aws, backend).handle(receive_one(gateways))
    # THEN it completed with its result in S3
    record = gateways.table.get(task_id)
    assert outcome == "completed" and backend.ran == [task_id]
    assert record.status is JobStatus.COMPLETED and record.worker == "w-test" and record.attempts == 1
    assert record.result_s3_uri == f"s3://{aws.bucket}/results/camera-angle/{task_id}.png"
    assert gateways.store.get_bytes(aws.bucket, f"results/camera-angle/{task_id}.png") == PNG
    assert gateways.queue.stats(include_dlq=False).visible == 0


def test_fresh_claim_by_another_worker_is_left_alone(aws, gateways):
    """A processing job with a live heartbeat is not run again and its message is not deleted."""
    # GIVEN a job another worker claimed a moment ago
    task_id = submit(gateways)
    gateways.table.transition(task_id, JobStatus.PROCESSING,
                              fields={"worker": "other", "heartbeat_at": time.time(), "attempts": 1})
    backend = ScriptedBackend()
    # WHEN its message is delivered here too
    outcome = make_handler(aws, backend).handle(receive_one(gateways))
    # THEN nothing runs and the message still exists
    assert outcome == "held-elsewhere" and backend.ran == []
    assert gateways.table.get(task_id).worker == "other"
    stats = gateways.queue.stats(include_dlq=False)
    assert stats.visible + stats.in_flight == 1


def test_stale_claim_is_taken_over_by_exactly_one_worker(aws, gateways):
    """Two workers holding the same stale snapshot: the conditional takeover lets only one win."""
    # GIVEN a job whose worker stopped heartbeating long ago
    task_id = submit(gateways)
    gateways.table.transition(task_id, JobStatus.PROCESSING,
                              fields={"worker": "dead", "heartbeat_at": time.time() - 600, "attempts": 1})
    stale = gateways.table.get(task_id)
    message = receive_one(gateways)
    first, second = make_handler(aws, ScriptedBackend(), "w1"), make_handler(aws, ScriptedBackend(), "w2")
    # WHEN both try to take it over from the same snapshot
    won = first._claim(message, stale)
    lost = second._claim(message, stale)
    # THEN the first owns it (attempt 2) and the second backs off
    assert not isinstance(won, str) and won.worker == "w1" and won.attempts == 2
    assert lost == "held-elsewhere"
    assert gateways.table.get(task_id).worker == "w1"


def test_finished_job_message_is_deleted_without_running(aws, gateways):
    """A late or duplicate delivery of a finished job only deletes the message."""
    task_id = submit(gateways)
    gateways.table.transition(task_id, JobStatus.FAILED, fields={"error_message": "cancelled"})
    backend = ScriptedBackend()
    outcome = make_handler(aws, backend).handle(receive_one(gateways))
    assert outcome == "already-finished" and backend.ran == []
    assert gateways.table.get(task_id).status is JobStatus.FAILED
    assert gateways.queue.stats(include_dlq=False).visible == 0


def test_bad_parameters_fail_the_job_at_once(aws, gateways):
    """A message whose request_body does not validate fails its job with the reason, first time."""
    # GIVEN a pending job whose queued body is out of range (written by some other producer)
    task_id = submit(gateways)
    gateways.queue.purge()
    gateways.queue.send(JobMessage(task_id=task_id, api_path=JobType.CAMERA_ANGLE.api_path,
                                   request_body={"image_url": "s3://b/k", "steps": 1000}).to_json())
    backend = ScriptedBackend()
    # WHEN it is handled
    outcome = make_handler(aws, backend).handle(receive_one(gateways))
    # THEN the job failed with the validation sentence and nothing ran
    record = gateways.table.get(task_id)
    assert outcome == "failed" and backend.ran == []
    assert record.status is JobStatus.FAILED and "steps" in (record.error_message or "")


def test_message_without_a_record_goes_to_the_dlq(aws, gateways):
    """A well-formed message naming no job record is poison: copied to the DLQ and deleted."""
    gateways.queue.send(JobMessage(task_id="no-such-job", api_path=JobType.CAMERA_ANGLE.api_path,
                                   request_body={"image_url": "s3://b/k"}).to_json())
    outcome = make_handler(aws, ScriptedBackend()).handle(receive_one(gateways))
    assert outcome == "poison"
    assert gateways.queue.stats().dlq_visible == 1


@pytest.mark.parametrize(("receive_count", "expected"), [(1, "released"), (3, "failed")])
def test_transient_error_releases_until_the_last_receive(aws, gateways, receive_count, expected):
    """A transient failure releases the message, except on the queue's last allowed receive."""
    import dataclasses

    # GIVEN a backend that is down, and a message on its Nth receive (the queue allows 3)
    task_id = submit(gateways)
    message = dataclasses.replace(receive_one(gateways), receive_count=receive_count)
    # WHEN it is handled
    outcome = make_handler(aws, ScriptedBackend(TransientJobError("ComfyUI unreachable"))).handle(message)
    # THEN it is released (processing, stale heartbeat) or failed with the last error
    record = gateways.table.get(task_id)
    assert outcome == expected
    if expected == "released":
        assert record.status is JobStatus.PROCESSING and record.heartbeat_at == 0
    else:
        assert record.status is JobStatus.FAILED
        assert record.error_message == "ComfyUI unreachable (gave up after 3 attempts)"
