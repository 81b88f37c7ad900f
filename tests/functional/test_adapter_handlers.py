"""The per-message logic against moto in-process, with a small scripted backend (no ComfyUI)."""

from __future__ import annotations

import json
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

    def __init__(self, error: Exception | None = None, down: str | None = None) -> None:
        self.error = error
        self.down = down
        self.ran: list[str] = []

    def check(self) -> Any:
        raise AssertionError("not used by the handler")

    def alive(self) -> str | None:
        return self.down

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
    key = f"results/camera-angle/{task_id}/"
    assert record.result_s3_uri and record.result_s3_uri.startswith(f"s3://{aws.bucket}/{key}")
    assert gateways.store.get_bytes(aws.bucket, record.result_s3_uri.split("/", 3)[3]) == PNG
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
    # THEN nothing runs and the message comes back (a fresh copy, delayed) once that claim would be stale
    assert outcome == "held-elsewhere" and backend.ran == []
    assert gateways.table.get(task_id).worker == "other"
    stats = gateways.queue.stats(include_dlq=False)
    assert (stats.visible, stats.in_flight, stats.delayed) == (0, 0, 1)


def test_stale_claim_is_taken_over_by_exactly_one_worker(aws, gateways):
    """Two workers taking over the same stale claim: the conditional takeover lets only one win."""
    # GIVEN a job whose worker stopped heartbeating long ago
    task_id = submit(gateways)
    gateways.table.transition(task_id, JobStatus.PROCESSING,
                              fields={"worker": "dead", "heartbeat_at": time.time() - 600, "attempts": 1})
    message = receive_one(gateways)
    first, second = make_handler(aws, ScriptedBackend(), "w1"), make_handler(aws, ScriptedBackend(), "w2")
    # WHEN both try to take it over
    won = first._claim(message, task_id)
    lost = second._claim(message, task_id)
    # THEN the first owns it (attempt 2) and the second backs off
    assert not isinstance(won, str) and won.record.worker == "w1" and won.record.attempts == 2
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
    # THEN it is poison: the job failed with the validation sentence, nothing ran, the body is dead-lettered
    record = gateways.table.get(task_id)
    assert outcome == "poison" and backend.ran == []
    assert record.status is JobStatus.FAILED and "steps" in (record.error_message or "")
    assert gateways.queue.stats().dlq_visible == 1


def test_message_without_a_record_goes_to_the_dlq(aws, gateways):
    """A well-formed message naming no job record is poison: copied to the DLQ and deleted."""
    gateways.queue.send(JobMessage(task_id="no-such-job", api_path=JobType.CAMERA_ANGLE.api_path,
                                   request_body={"image_url": "s3://b/k"}).to_json())
    outcome = make_handler(aws, ScriptedBackend()).handle(receive_one(gateways))
    assert outcome == "poison"
    assert gateways.queue.stats().dlq_visible == 1


@pytest.mark.parametrize(("attempts_before", "expected"), [(0, "released"), (2, "failed")])
def test_transient_error_releases_until_the_last_attempt(aws, gateways, attempts_before, expected):
    """A transient failure hands the job back (a fresh copy), until it has used maxReceiveCount attempts."""
    # GIVEN a backend that keeps failing while it answers, and a job with N attempts behind it (the queue allows 3)
    task_id = submit(gateways)
    if attempts_before:
        gateways.table.update_fields(task_id, {"attempts": attempts_before})
    message = receive_one(gateways)
    # WHEN it is handled
    outcome = make_handler(aws, ScriptedBackend(TransientJobError("ComfyUI said 503"))).handle(message)
    # THEN it is released (processing, stale heartbeat, a new copy queued) or failed with the last error
    record = gateways.table.get(task_id)
    assert outcome == expected
    if expected == "released":
        assert record.status is JobStatus.PROCESSING and record.heartbeat_at == 0 and record.attempts == 1
        assert gateways.queue.stats(include_dlq=False).visible == 1
    else:
        assert record.status is JobStatus.FAILED
        assert record.error_message == "ComfyUI said 503 (gave up after 3 attempts)"


def test_backend_outage_releases_the_job_uncounted_and_flags_the_pause(aws, gateways):
    """A transient failure while the backend is down: the attempt is taken back and the outage is flagged."""
    task_id = submit(gateways)
    handler = make_handler(aws, ScriptedBackend(TransientJobError("connection refused"), down="ConnectError"))
    outcome = handler.handle(receive_one(gateways))
    record = gateways.table.get(task_id)
    assert outcome == "released-outage" and handler.outage.is_set()
    assert record.status is JobStatus.PROCESSING and record.attempts == 0 and record.heartbeat_at == 0
    # AND a message received while paused goes back untouched, uncounted
    assert handler.handle(receive_one(gateways)) == "released-outage"
    assert gateways.table.get(task_id).attempts == 0


def test_last_receive_of_a_job_whose_holder_died_fails_it_with_the_reason(aws, gateways):
    """On the queue's last allowed receive, a dead holder's job is failed and dead-lettered, not taken over."""
    import dataclasses

    task_id = submit(gateways)
    gateways.table.transition(task_id, JobStatus.PROCESSING,
                              fields={"worker": "dead", "heartbeat_at": time.time() - 600, "attempts": 2})
    message = dataclasses.replace(receive_one(gateways), receive_count=3)
    backend = ScriptedBackend()
    outcome = make_handler(aws, backend).handle(message)
    record = gateways.table.get(task_id)
    assert outcome == "failed-stopped" and backend.ran == []
    assert record.status is JobStatus.FAILED
    assert record.error_message == "the adapter stopped 2 times while running this job"
    assert gateways.queue.stats().dlq_visible == 1


def test_last_receive_of_a_released_job_renews_its_message(aws, gateways):
    """A job handed back on purpose is never run on the last allowed receive: its message is renewed first."""
    import dataclasses

    task_id = submit(gateways)
    gateways.table.transition(task_id, JobStatus.PROCESSING, fields={"worker": "w", "heartbeat_at": 0})
    message = dataclasses.replace(receive_one(gateways), receive_count=3)
    backend = ScriptedBackend()
    assert make_handler(aws, backend).handle(message) == "renewed" and backend.ran == []
    fresh = receive_one(gateways)
    assert fresh.receive_count == 1 and json.loads(fresh.body)["task_id"] == task_id


def test_attempt_that_lost_the_job_deletes_only_its_own_object(aws, gateways):
    """A result uploaded by an attempt whose token is no longer the record's is withdrawn; the record stands."""
    task_id = submit(gateways)

    class TakenOverMeanwhile(ScriptedBackend):
        def run(self, job: BackendJob, control: JobControl) -> BackendResult:
            gateways.table.transition(task_id, JobStatus.COMPLETED, fields={
                "attempt_token": "other", "result_s3_uri": "s3://x/published.png"})
            return super().run(job, control)

    outcome = make_handler(aws, TakenOverMeanwhile()).handle(receive_one(gateways))
    record = gateways.table.get(task_id)
    assert outcome == "already-finished" and record.result_s3_uri == "s3://x/published.png"
    listing = gateways.clients.s3.list_objects_v2(Bucket=aws.bucket, Prefix=f"results/camera-angle/{task_id}/")
    assert listing.get("KeyCount", 0) == 0


def test_activity_reporter_writes_at_most_once_per_interval(aws):
    """Ticks inside the interval write nothing; draining/stopped are written at once with the latest finish."""
    from adapter.heartbeat import ActivityReporter
    from gpuctl.services.context import Gateways

    settings = AdapterSettings(**aws.settings_kwargs(), worker_id="w", activity_interval=60)
    gw = Gateways(settings)
    reporter = ActivityReporter(settings, gw.table)
    reporter.job_started()
    reporter.tick()
    assert gw.table.read_activity().jobs_in_hand == 1
    reporter.job_ended(123.5)
    reporter.tick()  # within the interval: nothing written
    assert gw.table.read_activity().last_finished_at is None
    reporter.report("stopped")
    activity = gw.table.read_activity()
    assert (activity.adapter_state, activity.jobs_in_hand, activity.last_finished_at) == ("stopped", 0, 123.5)


def _completing(params: dict[str, Any]) -> bool:
    values = params.get("ExpressionAttributeValues", {})
    return any(v == {"S": "completed"} for v in values.values())


@pytest.mark.parametrize("landed", [False, True], ids=["write-lost", "answer-lost"])
def test_a_completing_write_without_an_answer_is_finished_not_run_again(aws, gateways, monkeypatch, landed):
    """The completing UpdateItem fails once with no answer (botocore's retries spent) — the write either never
    reached the table or landed and only its answer was lost. The adapter reads the record and finishes what is
    its own: completed once, its result kept, the message deleted, the GPU not asked to run the job again."""
    import botocore.exceptions

    from adapter import handlers

    monkeypatch.setattr(handlers, "_PUBLISH_RETRY_DELAYS", (0.05, 0.05, 0.05))
    # GIVEN a pending job and an adapter whose first completing write fails without an answer
    task_id = submit(gateways)
    backend = ScriptedBackend()
    handler = make_handler(aws, backend)
    failures: list[str] = []

    def fail_once(params: dict[str, Any], **_: Any) -> None:
        if _completing(params) and not failures:
            failures.append("failed")
            raise botocore.exceptions.ConnectionClosedError(endpoint_url="https://dynamodb.test")

    events = handler._d.table._client.meta.events
    if landed:  # the write is made, its answer never arrives
        calls: list[dict[str, Any]] = []
        events.register("before-parameter-build.dynamodb.UpdateItem", lambda params, **_: calls.append(params))

        def lose_answer(http_response: Any, parsed: Any, model: Any, **_: Any) -> None:
            if calls and _completing(calls[-1]) and not failures:
                failures.append("answer lost")
                raise botocore.exceptions.ReadTimeoutError(endpoint_url="https://dynamodb.test")

        events.register("after-call.dynamodb.UpdateItem", lose_answer)
    else:
        events.register("before-parameter-build.dynamodb.UpdateItem", fail_once)
    # WHEN its message is handled
    outcome = handler.handle(receive_one(gateways))
    # THEN the job completed once, with this attempt's result, which is still in the bucket
    record = gateways.table.get(task_id)
    assert failures and outcome == "completed" and backend.ran == [task_id]
    assert record.status is JobStatus.COMPLETED and record.attempts == 1
    assert record.result_s3_uri is not None
    assert gateways.store.get_bytes(aws.bucket, record.result_s3_uri.split("/", 3)[3]) == PNG
    assert gateways.queue.stats(include_dlq=False).visible == 0
