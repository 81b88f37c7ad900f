"""The domain model, written once: job types, request models, statuses, and the record/message codecs.

Everything that reads or writes a job (the CLI, the adapter; the Lambda keeps the same field names)
goes through this module, so the contracts of SPEC.md §3 live in exactly one place:

* the SQS message body ``{"task_id", "api_path", "request_body"}`` (extra keys allowed both ways);
* the DynamoDB item of table ``task_store`` (``task_id``, ``status``, ``job_type`` = the api_path,
  ``created_at``/``updated_at`` epoch seconds, ``result_s3_uri``, ``error_message``, ``comfy_job_id``,
  plus gpuctl's own attributes);
* the job status document ``{"job_id", "status", "result_s3_uri", "error"}``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gpuctl.errors import UsageError
from gpuctl.times import stamp

__all__ = [
    "ACTIVITY_TASK_ID",
    "CANCEL_MESSAGE",
    "FINISHED",
    "GPU_API_PATHS",
    "GSI_STATUS_CREATED",
    "CameraAngleRequest",
    "JobMessage",
    "JobRecord",
    "JobRequest",
    "JobStatus",
    "JobType",
    "QwenImageEditRequest",
    "allowed_sources",
    "build_camera_prompt",
    "can_transition",
    "from_dynamo_value",
    "is_gpu_job",
    "new_task_id",
    "parse_request",
    "task_id_for_key",
    "to_dynamo_value",
    "validation_message",
]

GSI_STATUS_CREATED = "status-created_at-index"
# Long enough for any real instruction, short enough to keep messages and records small.
MAX_PROMPT_CHARS = 2000
#: The error a cancelled job ends with (status stays ``failed``); "cancelled" is the word clients look for.
CANCEL_MESSAGE = "cancelled by user"
#: The key of the one activity-marker item in the job table (see gpuctl.aws.dynamo.Activity). It has no
#: ``status`` attribute, so it never appears in the status index, and it is not a UUID, so no job id names it.
ACTIVITY_TASK_ID = "gpuctl#activity"


class JobStatus(StrEnum):
    """A job's lifecycle. Status only moves forward (SPEC §3)."""

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def is_finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset({JobStatus.COMPLETED, JobStatus.FAILED})

_ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.PENDING: frozenset({JobStatus.PROCESSING, JobStatus.FAILED}),
    JobStatus.PROCESSING: frozenset({JobStatus.COMPLETED, JobStatus.FAILED}),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset(),
}


def can_transition(current: JobStatus, target: JobStatus) -> bool:
    """True when a job in ``current`` may move to ``target``."""
    return target in _ALLOWED[current]


def allowed_sources(target: JobStatus) -> frozenset[JobStatus]:
    """The statuses from which ``target`` may be reached (for conditional updates)."""
    return frozenset(s for s, targets in _ALLOWED.items() if target in targets)


class JobType(StrEnum):
    """The job types the GPU instance runs; the value is the CLI name."""

    CAMERA_ANGLE = "camera-angle"
    QWEN_IMAGE_EDIT = "qwen-image-edit"

    @property
    def api_path(self) -> str:
        return f"/api/v1/{self.value}/jobs"

    @property
    def request_model(self) -> type[JobRequest]:
        return CameraAngleRequest if self is JobType.CAMERA_ANGLE else QwenImageEditRequest

    @classmethod
    def from_api_path(cls, api_path: str) -> JobType:
        for job_type in cls:
            if job_type.api_path == api_path.rstrip("/"):
                return job_type
        raise UsageError(f"Unknown api_path {api_path!r}; expected one of {', '.join(_api_paths())}.")

    @classmethod
    def parse(cls, name: str) -> JobType:
        try:
            return cls(name)
        except ValueError:
            names = ", ".join(t.value for t in cls)
            raise UsageError(f"Unknown job type {name!r}; choose one of: {names}.") from None


def _api_paths() -> list[str]:
    return [t.api_path for t in JobType]


#: The api_paths (``job_type`` values) of the GPU's work. Other services share the table (SPEC §11): their
#: rows (``/api/v1/face-mask/tasks`` …) are listed but never start, keep up or block stopping the GPU.
GPU_API_PATHS: frozenset[str] = frozenset(_api_paths())


def is_gpu_job(job_type: str | None) -> bool:
    """True when a record's ``job_type`` (the api_path) is one of the GPU job types."""
    return job_type is not None and job_type.rstrip("/") in GPU_API_PATHS


def _check_image_url(value: str | None) -> str | None:
    if value is None:
        return None
    if value.startswith("s3://"):
        bucket, _, key = value[5:].partition("/")
        if bucket and key:
            return value
    elif value.startswith("https://") and len(value) > len("https://"):
        return value
    raise ValueError("must be an s3://bucket/key URI or an https:// URL")


class JobRequest(BaseModel):
    """Fields common to every job type's request body.

    Types are strict (``true`` is not a number, ``"8"`` is not an integer; an integer is a valid float), unknown
    fields are ignored, and ``null`` for any field means "not given": the default, as the running service
    treats it.
    """

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True, defer_build=True)
    job_type: ClassVar[JobType]

    image_url: str
    seed: Annotated[int, Field(ge=0, le=2**64 - 1)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            return {k: v for k, v in data.items() if v is not None}
        return data

    @field_validator("image_url")
    @classmethod
    def _image_url(cls, value: str) -> str:
        checked = _check_image_url(value)
        assert checked is not None
        return checked

    def to_body(self) -> dict[str, Any]:
        """The request_body of the SQS message: defaults included, unset optionals left out."""
        return self.model_dump(mode="json", exclude_none=True)

    def image_urls(self) -> list[str]:
        return [self.image_url]


class CameraAngleRequest(JobRequest):
    """``camera-angle``: re-shoot the picture from another camera position."""

    job_type: ClassVar[JobType] = JobType.CAMERA_ANGLE

    prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None = None
    vertical: Annotated[int, Field(ge=-2, le=2)] = 0
    horizontal: Annotated[int, Field(ge=-2, le=2)] = 0
    zoom: Annotated[int, Field(ge=-1, le=1)] = 0
    steps: Annotated[int, Field(ge=1, le=100)] = 8

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            return None
        return value

    def effective_prompt(self) -> str:
        """The prompt given, or the one the knobs build."""
        return self.prompt or build_camera_prompt(self.vertical, self.horizontal, self.zoom)


class QwenImageEditRequest(JobRequest):
    """``qwen-image-edit``: edit the picture as the prompt says, with up to two reference images."""

    job_type: ClassVar[JobType] = JobType.QWEN_IMAGE_EDIT

    prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
    image2_url: str | None = None
    image3_url: str | None = None
    steps: Annotated[int, Field(ge=1, le=100)] = 4
    cfg: Annotated[float, Field(ge=0.0, le=100.0)] = 1.0
    sampler_name: Annotated[str, Field(min_length=1)] = "sa_solver"
    scheduler: Annotated[str, Field(min_length=1)] = "beta"
    denoise: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("image2_url", "image3_url")
    @classmethod
    def _extra_images(cls, value: str | None) -> str | None:
        return _check_image_url(value)

    def image_urls(self) -> list[str]:
        return [u for u in (self.image_url, self.image2_url, self.image3_url) if u]


# The camera-angle LoRA is trained on short Chinese instructions; these are the ones it knows.
_HORIZONTAL = {
    -2: "将镜头向左旋转90度",
    -1: "将镜头向左旋转45度",
    1: "将镜头向右旋转45度",
    2: "将镜头向右旋转90度",
}
_VERTICAL = {-2: "将镜头转为仰视", -1: "将镜头稍微向下移动", 1: "将镜头稍微向上移动", 2: "将镜头转为俯视"}
_ZOOM = {-1: "将镜头转为广角镜头", 1: "将镜头转为特写镜头"}


def build_camera_prompt(vertical: int, horizontal: int, zoom: int) -> str:
    """The camera-angle instruction for the knobs (all zero: keep the camera where it is)."""
    parts = [_HORIZONTAL.get(horizontal), _VERTICAL.get(vertical), _ZOOM.get(zoom)]
    words = [p for p in parts if p]
    return "，".join(words) if words else "保持镜头不变"


def validation_message(exc: ValidationError, *, subject: str) -> str:
    """One sentence describing the first problem of a pydantic validation error."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "request"
    msg = first["msg"].removeprefix("Value error, ").removeprefix("Input ")
    if first["type"] == "missing":
        return f"{subject}: {where} is required."
    value = first.get("input")
    shown = f" (got {_short_repr(value)})" if value is not None and not isinstance(value, dict | list) else ""
    return f"{subject}: {where} {msg[0].lower()}{msg[1:]}{shown}."


def _short_repr(value: Any) -> str:
    from gpuctl.inputs import display

    return display(repr(value), limit=60)


def parse_request(job_type: JobType, body: Mapping[str, Any]) -> JobRequest:
    """Validate a request body for ``job_type``; raise UsageError with one sentence otherwise."""
    try:
        return job_type.request_model.model_validate(dict(body))
    except RecursionError:
        raise UsageError(f"Invalid {job_type.value} request: it is nested too deeply.") from None
    except ValidationError as exc:
        raise UsageError(validation_message(exc, subject=f"Invalid {job_type.value} request")) from None


def new_task_id() -> str:
    return str(uuid.uuid4())


_IDEMPOTENCY_NAMESPACE = uuid.UUID("6d1f3f8e-2a4b-4f1e-9c55-0b9a3c1d7e21")


def task_id_for_key(idempotency_key: str) -> str:
    """A stable task id for an idempotency key, so that a repeated submit hits the same record."""
    return str(uuid.uuid5(_IDEMPOTENCY_NAMESPACE, idempotency_key))


class JobMessage(BaseModel):
    """The SQS message body. Only the first three fields are the contract; the rest are hints."""

    model_config = ConfigDict(extra="ignore", frozen=True, defer_build=True)

    task_id: Annotated[str, Field(min_length=1)]
    api_path: str
    request_body: dict[str, Any]
    job_kind: str | None = None
    submitted_at: float | None = None

    @property
    def job_type(self) -> JobType:
        return JobType.from_api_path(self.api_path)

    def request(self) -> JobRequest:
        return parse_request(self.job_type, self.request_body)

    @classmethod
    def for_request(cls, task_id: str, request: JobRequest, *, submitted_at: float) -> JobMessage:
        return cls(
            task_id=task_id,
            api_path=request.job_type.api_path,
            request_body=request.to_body(),
            job_kind=request.job_type.value,
            submitted_at=submitted_at,
        )

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), ensure_ascii=False)

    @classmethod
    def from_json(cls, body: str) -> JobMessage:
        """Decode a message body; raise UsageError (a poison message) when it is not one of ours."""
        try:
            data = json.loads(body)
        except RecursionError:
            raise UsageError("Message body is nested too deeply to be a job message.") from None
        except ValueError:
            raise UsageError("Message body is not JSON.") from None
        if not isinstance(data, dict):
            raise UsageError("Message body is not a JSON object.")
        try:
            message = cls.model_validate(data)
        except RecursionError:
            raise UsageError("Message body is nested too deeply to be a job message.") from None
        except ValidationError as exc:
            raise UsageError(validation_message(exc, subject="Invalid job message")) from None
        message.job_type  # noqa: B018 - validates the api_path, raising UsageError
        return message


class JobRecord(BaseModel):
    """A job as stored in DynamoDB."""

    model_config = ConfigDict(extra="ignore", defer_build=True)

    task_id: str
    status: JobStatus
    job_type: str  # the api_path, as the running system writes it
    created_at: float
    updated_at: float
    result_s3_uri: str | None = None
    error_message: str | None = None
    comfy_job_id: str | None = None
    request: dict[str, Any] | None = None
    job_kind: str | None = None
    attempts: int = 0
    worker: str | None = None
    heartbeat_at: float | None = None
    progress: float | None = None
    cancel_requested: bool = False
    expires_at: int | None = None
    idempotency_key: str | None = None
    retry_of: str | None = None
    finished_at: float | None = None
    #: When the adapter's (last) attempt claimed the job: its GPU time runs from here to finished_at.
    started_at: float | None = None
    #: When the backend returned this attempt's result: publishing (upload, completed) runs from here to finished_at.
    executed_at: float | None = None
    #: A job `gpuctl doctor --canary` submitted to test the pipeline (not the team's work).
    canary: bool = False
    queued: bool | None = None
    #: Fleet mode: the EC2 instance whose adapter claimed the job (its last attempt).
    instance_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _other_writers(cls, data: Any) -> Any:
        """Records of other writers: the running service's status read takes ``result_url`` for a missing
        ``result_s3_uri`` and ``error`` for a missing ``error_message`` (SPEC §10); so does gpuctl."""
        if isinstance(data, Mapping):
            aliases = {"result_s3_uri": "result_url", "error_message": "error"}
            missing = {name: data[other] for name, other in aliases.items()
                       if data.get(name) is None and isinstance(data.get(other), str)}
            if missing:
                return {**data, **missing}
        return data

    @property
    def kind(self) -> str:
        """The CLI name of the job type, or the raw api_path for one we do not know."""
        if self.job_kind:
            return self.job_kind
        try:
            return JobType.from_api_path(self.job_type).value
        except UsageError:
            return self.job_type

    @property
    def cancelled(self) -> bool:
        """A job that ended because someone cancelled it (its status is ``failed``, for old clients)."""
        return self.status is JobStatus.FAILED and (self.error_message or "").startswith(CANCEL_MESSAGE)

    @property
    def is_gpu_job(self) -> bool:
        return is_gpu_job(self.job_type)

    def status_document(self) -> dict[str, Any]:
        """The job status document of SPEC §3 with gpuctl's extra keys.

        ``result_url`` repeats ``result_s3_uri`` (the running service's code returns one, its README the other);
        times follow gpuctl.times (epoch seconds plus ``_iso``); ``cancelled`` tells a cancel from a failure.
        """
        return {
            "job_id": self.task_id,
            "status": self.status.value,
            "result_s3_uri": self.result_s3_uri,
            "result_url": self.result_s3_uri,
            "error": self.error_message,
            "cancelled": self.cancelled,
            "job_type": self.kind,
            **stamp("created_at", self.created_at),
            **stamp("updated_at", self.updated_at),
            **stamp("finished_at", self.finished_at),
            "progress": self.progress,
            "attempts": self.attempts,
            "worker": self.worker,
            "instance_id": self.instance_id,
            "retry_of": self.retry_of,
            "canary": self.canary,
        }

    # --- DynamoDB codec (boto3's TypeSerializer/TypeDeserializer shapes) ---------------------------

    def to_item(self) -> dict[str, Any]:
        """Plain python values for boto3's TypeSerializer: numbers as Decimal, None left out."""
        data = self.model_dump(mode="json", exclude_none=True)
        for flag in ("cancel_requested", "canary"):
            if not data.get(flag):
                data.pop(flag, None)
        return {k: to_dynamo_value(v) for k, v in data.items()}

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> JobRecord:
        """Decode a deserialized DynamoDB item (Decimals become int/float)."""
        return cls.model_validate({k: from_dynamo_value(v) for k, v in item.items()})


def to_dynamo_value(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return Decimal(str(value))
    if isinstance(value, dict):
        return {k: to_dynamo_value(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [to_dynamo_value(v) for v in value]
    return value


def from_dynamo_value(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: from_dynamo_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_dynamo_value(v) for v in value]
    return value

