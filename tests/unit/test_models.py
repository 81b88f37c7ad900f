"""The domain model: seed compatibility of the message both ways, request defaults and ranges, transitions."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from gpuctl.errors import UsageError
from gpuctl.models import (
    CameraAngleRequest,
    JobMessage,
    JobRecord,
    JobStatus,
    JobType,
    QwenImageEditRequest,
    allowed_sources,
    build_camera_prompt,
    can_transition,
    parse_request,
)

SEED_BODY = {"task_id": "0b7c8f5e-1a2b-4c3d-9e8f-001122334455", "api_path": "/api/v1/camera-angle/jobs",
             "request_body": {"image_url": "s3://bucket/in.jpg", "vertical": 1}}


def test_seed_message_with_only_three_fields_decodes() -> None:
    """A message the running system writes (task_id, api_path, request_body only) decodes and validates."""
    message = JobMessage.from_json(json.dumps(SEED_BODY))
    assert message.job_type is JobType.CAMERA_ANGLE
    request = message.request()
    assert isinstance(request, CameraAngleRequest)
    assert (request.vertical, request.horizontal, request.zoom, request.steps) == (1, 0, 0, 8)


def test_our_message_carries_the_three_seed_fields() -> None:
    """A message gpuctl writes has task_id/api_path/request_body for an adapter that reads only those."""
    request = parse_request(JobType.QWEN_IMAGE_EDIT, {"image_url": "https://x.example/a.png", "prompt": "p"})
    body = json.loads(JobMessage.for_request("t-1", request, submitted_at=1.5).to_json())
    assert body["task_id"] == "t-1"
    assert body["api_path"] == "/api/v1/qwen-image-edit/jobs"
    assert body["request_body"] == {"image_url": "https://x.example/a.png", "prompt": "p", "steps": 4,
                                    "cfg": 1.0, "sampler_name": "sa_solver", "scheduler": "beta", "denoise": 1.0}
    # A seed-style reader that ignores the extras sees a complete job.
    assert JobMessage.from_json(json.dumps({k: body[k] for k in ("task_id", "api_path", "request_body")}))


def test_unknown_extra_keys_are_ignored_both_ways() -> None:
    """Extra keys in the message or the request body do not break decoding."""
    body = {**SEED_BODY, "future_field": 1, "request_body": {**SEED_BODY["request_body"], "new_knob": True}}
    assert JobMessage.from_json(json.dumps(body)).request().image_url == "s3://bucket/in.jpg"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param("not json", "not JSON", id="not-json"),
        pytest.param("[1, 2]", "not a JSON object", id="array"),
        pytest.param(json.dumps({"api_path": "/api/v1/camera-angle/jobs", "request_body": {}}), "task_id",
                     id="no-task-id"),
        pytest.param(json.dumps({**SEED_BODY, "api_path": "/api/v1/unknown/jobs"}), "Unknown api_path",
                     id="unknown-path"),
    ],
)
def test_poison_messages_raise_usage_error(body: str, message: str) -> None:
    """Malformed messages raise UsageError with a readable reason (the adapter dead-letters them)."""
    with pytest.raises(UsageError, match=message):
        JobMessage.from_json(body)


@pytest.mark.parametrize(
    ("job_type", "fields", "problem"),
    [
        (JobType.CAMERA_ANGLE, {"vertical": 3}, "vertical"),
        (JobType.CAMERA_ANGLE, {"horizontal": -3}, "horizontal"),
        (JobType.CAMERA_ANGLE, {"zoom": 2}, "zoom"),
        (JobType.CAMERA_ANGLE, {"image_url": "http://insecure/x.png"}, "image_url"),
        (JobType.QWEN_IMAGE_EDIT, {"prompt": "   "}, "prompt"),
        (JobType.QWEN_IMAGE_EDIT, {"prompt": "p", "denoise": 1.5}, "denoise"),
        (JobType.QWEN_IMAGE_EDIT, {}, "prompt is required"),
    ],
)
def test_out_of_range_requests_name_the_field(job_type: JobType, fields: dict[str, object], problem: str) -> None:
    """Each knob's range from SPEC §3 is enforced with a sentence naming the field."""
    with pytest.raises(UsageError, match=problem):
        parse_request(job_type, {"image_url": "s3://b/k.png", **fields})


def test_defaults_match_the_seed() -> None:
    """Defaults: camera-angle steps 8; qwen steps 4, cfg 1.0, sa_solver, beta, denoise 1.0."""
    camera = CameraAngleRequest(image_url="s3://b/k")
    edit = QwenImageEditRequest(image_url="s3://b/k", prompt="p")
    assert (camera.steps, camera.prompt, camera.effective_prompt()) == (8, None, build_camera_prompt(0, 0, 0))
    assert (edit.steps, edit.cfg, edit.sampler_name, edit.scheduler, edit.denoise) == (4, 1.0, "sa_solver",
                                                                                      "beta", 1.0)


@pytest.mark.parametrize(
    ("current", "target", "allowed"),
    [
        (JobStatus.PENDING, JobStatus.PROCESSING, True),
        (JobStatus.PENDING, JobStatus.FAILED, True),
        (JobStatus.PROCESSING, JobStatus.COMPLETED, True),
        (JobStatus.PROCESSING, JobStatus.FAILED, True),
        (JobStatus.PENDING, JobStatus.COMPLETED, False),
        (JobStatus.PROCESSING, JobStatus.PENDING, False),
        (JobStatus.COMPLETED, JobStatus.PROCESSING, False),
        (JobStatus.FAILED, JobStatus.PROCESSING, False),
        (JobStatus.COMPLETED, JobStatus.FAILED, False),
    ],
)
def test_status_only_moves_forward(current: JobStatus, target: JobStatus, allowed: bool) -> None:
    """Transitions follow SPEC §3: pending → processing → completed|failed, pending → failed."""
    assert can_transition(current, target) is allowed
    assert (current in allowed_sources(target)) is allowed


def test_record_round_trips_through_the_dynamo_item() -> None:
    """A record survives to_item/from_item; numbers become Decimal; seed attributes keep their names."""
    record = JobRecord(task_id="t", status=JobStatus.PROCESSING, job_type="/api/v1/camera-angle/jobs",
                       created_at=1700000000.25, updated_at=1700000001, progress=0.5,
                       request={"image_url": "s3://b/k", "vertical": 1})
    item = record.to_item()
    assert item["created_at"] == Decimal("1700000000.25") and item["status"] == "processing"
    assert "cancel_requested" not in item and "result_s3_uri" not in item
    assert JobRecord.from_item(item) == record
    assert record.kind == "camera-angle"
    assert set(record.status_document()) >= {"job_id", "status", "result_s3_uri", "error"}


# --- strict types, null means default, the status document -----------------------------------------


@pytest.mark.parametrize(("body", "message"), [
    ({"image_url": "s3://b/k", "steps": True}, "steps should be a valid integer"),
    ({"image_url": "s3://b/k", "steps": "8"}, "steps should be a valid integer"),
    ({"image_url": "s3://b/k", "seed": 1.5}, "seed should be a valid integer"),
    ({"image_url": 5}, "image_url should be a valid string"),
])
def test_request_types_are_strict(body: dict, message: str) -> None:
    """`true` is not a number and `"8"` is not an integer."""
    with pytest.raises(UsageError, match=message):
        parse_request(JobType.CAMERA_ANGLE, body)


def test_null_means_the_default_and_unknown_fields_are_ignored() -> None:
    """Every optional field may be null (the running service's clients send that); extra keys are ignored."""
    request = parse_request(JobType.QWEN_IMAGE_EDIT, {
        "image_url": "s3://b/k", "prompt": "sketch", "image2_url": None, "image3_url": None, "seed": None,
        "steps": None, "cfg": None, "sampler_name": None, "scheduler": None, "denoise": None, "colour": "red"})
    assert request.to_body() == {"image_url": "s3://b/k", "prompt": "sketch", "steps": 4, "cfg": 1.0,
                                 "sampler_name": "sa_solver", "scheduler": "beta", "denoise": 1.0}
    assert parse_request(JobType.QWEN_IMAGE_EDIT, {"image_url": "s3://b/k", "prompt": "p", "cfg": 2}).cfg == 2.0
    with pytest.raises(UsageError, match="prompt is required"):
        parse_request(JobType.QWEN_IMAGE_EDIT, {"image_url": "s3://b/k", "prompt": None})


def test_deeply_nested_message_is_a_clean_poison_error() -> None:
    """A 3000-level nested body is refused as a message, not a RecursionError."""
    body = '{"task_id": "t", "api_path": "/api/v1/camera-angle/jobs", "request_body": ' + "[" * 3000 + "]" * 3000 + "}"
    with pytest.raises(UsageError, match="nested too deeply"):
        JobMessage.from_json(body)


def test_status_document_has_both_result_keys_epoch_and_iso_times_and_cancelled() -> None:
    from gpuctl.models import CANCEL_MESSAGE, JobRecord, JobStatus

    record = JobRecord(task_id="t", status=JobStatus.FAILED, job_type="/api/v1/camera-angle/jobs",
                       created_at=1796112745.0, updated_at=1796112750.5, error_message=CANCEL_MESSAGE)
    doc = record.status_document()
    assert doc["result_s3_uri"] is None and "result_url" in doc
    assert doc["created_at"] == 1796112745 and doc["created_at_iso"] == "2026-12-01T08:12:25Z"
    assert doc["updated_at"] == 1796112750.5 and doc["finished_at"] is None
    assert doc["cancelled"] is True and doc["status"] == "failed"


def test_only_gpu_job_types_are_gpu_work() -> None:
    from gpuctl.models import is_gpu_job

    assert is_gpu_job("/api/v1/camera-angle/jobs") and is_gpu_job("/api/v1/qwen-image-edit/jobs/")
    assert not is_gpu_job("/api/v1/face-mask/tasks") and not is_gpu_job(None)


def test_records_of_other_writers_read_result_url_and_error_as_the_running_service_does():
    """A record with result_url / error (and no result_s3_uri / error_message) reads as SPEC §10's status read."""
    # GIVEN records written by another writer
    base = {"task_id": "t", "status": "completed", "job_type": "/api/v1/camera-angle/jobs", "created_at": 1,
            "updated_at": 2}
    other = JobRecord.from_item({**base, "result_url": "https://cdn/x.png", "error": "boom"})
    ours = JobRecord.from_item({**base, "result_s3_uri": "s3://b/k.png", "result_url": "https://cdn/x.png"})
    # THEN the document takes the other names when ours are missing, and ours when both are there
    assert other.status_document()["result_s3_uri"] == other.status_document()["result_url"] == "https://cdn/x.png"
    assert other.status_document()["error"] == "boom"
    assert ours.status_document()["result_s3_uri"] == "s3://b/k.png"
