"""Submitting jobs: validate → upload → record ``pending`` → enqueue → make sure the instance runs.

Nothing is half-written: every input is checked before the first write; a record whose message could
not be queued is marked ``failed`` with the reason, so no ``pending`` job is left that no worker will
ever see, and no message is queued without its record.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpuctl.errors import GpuctlError, UsageError
from gpuctl.inputs import ImageLimits
from gpuctl.models import (
    JobMessage,
    JobRecord,
    JobRequest,
    JobStatus,
    JobType,
    new_task_id,
    parse_request,
    task_id_for_key,
)
from gpuctl.services.images import ImageRef, input_key, resolve_image
from gpuctl.services.instance import StartOutcome, ensure_running

if TYPE_CHECKING:
    from gpuctl.services.context import Gateways

__all__ = [
    "BatchResult",
    "JobDraft",
    "RowError",
    "SubmitResult",
    "draft_job",
    "read_batch_file",
    "submit_batch",
    "submit_draft",
    "submit_request",
]

# Request fields that hold image references, in the order they are uploaded.
_IMAGE_FIELDS = ("image_url", "image2_url", "image3_url")

Progress = Callable[[str, int, int], None]  # (file name, bytes so far, total bytes)


@dataclass(frozen=True)
class JobDraft:
    """A validated job that has not touched AWS yet: its request (local images still as paths)."""

    job_type: JobType
    fields: dict[str, Any]
    images: dict[str, ImageRef]

    @property
    def local_images(self) -> dict[str, ImageRef]:
        return {name: ref for name, ref in self.images.items() if ref.is_local}


@dataclass(frozen=True)
class SubmitResult:
    record: JobRecord
    instance: StartOutcome | None
    reused: bool = False  # an idempotency key matched an existing job; nothing new was queued


@dataclass(frozen=True)
class RowError:
    row: int  # 1-based line/row number in the file
    message: str


@dataclass
class BatchResult:
    """Per row: the job id, or why the row's job was not accepted."""

    job_ids: list[str | None] = field(default_factory=list)
    failures: list[RowError] = field(default_factory=list)
    instance: StartOutcome | None = None


def draft_job(job_type: JobType, image: str, fields: Mapping[str, Any], *, limits: ImageLimits,
              extra_images: Mapping[str, str] | None = None) -> JobDraft:
    """Check everything about one job without any network call.

    Raises:
        UsageError: a bad image reference or file, or a request field out of range.
    """
    refs: dict[str, ImageRef] = {"image_url": resolve_image(image, limits=limits)}
    for name, reference in (extra_images or {}).items():
        if name not in _IMAGE_FIELDS[1:]:
            raise UsageError(f"{name} is not an image field of {job_type.value}.")
        if job_type is not JobType.QWEN_IMAGE_EDIT:
            raise UsageError(f"{job_type.value} takes one image only.")
        refs[name] = resolve_image(reference, limits=limits)
    body = {k: v for k, v in fields.items() if v is not None}
    # Validate the request with stand-in URLs for local files; the real s3:// URIs come after upload.
    body.update({name: ref.url or f"s3://local-file/{name}" for name, ref in refs.items()})
    parse_request(job_type, body)
    return JobDraft(job_type, {k: v for k, v in fields.items() if v is not None}, refs)


def _upload_inputs(
    gw: Gateways, draft: JobDraft, task_id: str, on_progress: Progress | None
) -> dict[str, str]:
    urls: dict[str, str] = {}
    local = draft.local_images
    if local:
        bucket = gw.settings.require("bucket")
        for index, (name, ref) in enumerate(local.items(), start=1):
            assert ref.path is not None
            key = input_key(gw.settings.inputs_prefix, task_id, ref.path, index)
            callback = None
            if on_progress is not None:
                sent = 0
                fname, total = ref.path.name, ref.size

                def callback(n: int, _f: str = fname, _t: int = total) -> None:
                    nonlocal sent
                    sent += n
                    on_progress(_f, sent, _t)

            urls[name] = gw.store.upload_file(ref.path, bucket, key, content_type=ref.content_type,
                                              on_progress=callback)
    for name, ref in draft.images.items():
        if ref.url:
            urls[name] = ref.url
    return urls


def _new_record(gw: Gateways, task_id: str, request: JobRequest, now: float, *,
                idempotency_key: str | None = None, retry_of: str | None = None) -> JobRecord:
    return JobRecord(
        task_id=task_id,
        status=JobStatus.PENDING,
        job_type=request.job_type.api_path,
        job_kind=request.job_type.value,
        created_at=now,
        updated_at=now,
        request=request.to_body(),
        expires_at=int(now + gw.settings.job_ttl_days * 86400),
        idempotency_key=idempotency_key,
        retry_of=retry_of,
    )


def _fail_unqueued(gw: Gateways, task_id: str, exc: GpuctlError) -> None:
    """Mark a recorded job failed because its message could not be queued (best effort)."""
    # If even this fails the record stays pending (`gpuctl jobs cancel` ends it); the original error
    # is the one worth reporting.
    with contextlib.suppress(GpuctlError):
        gw.table.transition(task_id, JobStatus.FAILED,
                            fields={"error_message": f"Failed to queue the job: {exc}",
                                    "finished_at": time.time()},
                            expected={JobStatus.PENDING})


def submit_request(
    gw: Gateways,
    request: JobRequest,
    *,
    task_id: str | None = None,
    idempotency_key: str | None = None,
    retry_of: str | None = None,
    start_instance: bool = True,
    require_instance: bool = False,
) -> SubmitResult:
    """Record a validated request as ``pending``, queue it, and make sure the instance runs.

    Raises:
        GpuctlError: the record could not be written or the message not queued (the record is then
            marked failed); with ``require_instance``, the instance could not be started.
    """
    task_id = task_id or new_task_id()
    now = round(time.time(), 3)
    record = _new_record(gw, task_id, request, now, idempotency_key=idempotency_key, retry_of=retry_of)
    gw.table.create(record)
    try:
        gw.queue.send(JobMessage.for_request(task_id, request, submitted_at=now).to_json())
    except GpuctlError as exc:
        _fail_unqueued(gw, task_id, exc)
        raise
    return SubmitResult(record, _start(gw, start_instance, require_instance))


def _start(gw: Gateways, start_instance: bool, require_instance: bool) -> StartOutcome | None:
    if not start_instance:
        return None
    if not gw.settings.instance_id:
        outcome = StartOutcome("skipped", warning="no GPU instance id is configured (GPU_INSTANCE_ID); "
                               "the job is queued but nothing was started")
    else:
        outcome = ensure_running(gw)
    if require_instance and outcome.action in ("failed", "skipped"):
        if outcome.error is not None:
            raise outcome.error
        gw.settings.require("instance_id")
    return outcome


def submit_draft(
    gw: Gateways,
    draft: JobDraft,
    *,
    idempotency_key: str | None = None,
    start_instance: bool = True,
    require_instance: bool = False,
    on_progress: Progress | None = None,
) -> SubmitResult:
    """Upload a draft's local images, then :func:`submit_request`.

    With an idempotency key the task id is derived from the key; a job that already exists under it
    is returned as it is and nothing is uploaded or queued again.
    """
    from gpuctl.aws.dynamo import JobAlreadyExists
    from gpuctl.errors import NotFound

    task_id = task_id_for_key(idempotency_key) if idempotency_key else new_task_id()
    if idempotency_key:
        try:
            return SubmitResult(gw.table.get(task_id), None, reused=True)
        except NotFound:
            pass
    urls = _upload_inputs(gw, draft, task_id, on_progress)
    request = parse_request(draft.job_type, {**draft.fields, **urls})
    try:
        return submit_request(gw, request, task_id=task_id, idempotency_key=idempotency_key,
                              start_instance=start_instance, require_instance=require_instance)
    except JobAlreadyExists:
        # Two submits with one key raced; the other one recorded and queued the job.
        return SubmitResult(gw.table.get(task_id), None, reused=True)


# --- batch submit ---------------------------------------------------------------------------------

_NUMERIC = {"vertical": int, "horizontal": int, "zoom": int, "seed": int, "steps": int,
            "cfg": float, "denoise": float}
_ROW_IMAGE_KEYS = {"image": "image_url", "image_url": "image_url", "image2": "image2_url",
                   "image2_url": "image2_url", "image3": "image3_url", "image3_url": "image3_url"}


def read_batch_file(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Rows of a JSONL or CSV job file as ``(row number, fields)``; the format follows the extension.

    Raises:
        UsageError: the file is missing, unreadable, or not JSONL/CSV.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"Job file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"Cannot read job file {path}: {exc}.") from None
    rows: list[tuple[int, dict[str, Any]]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames:
            raise UsageError(f"Job file {path} has no header row.")
        for number, row in enumerate(reader, start=2):
            rows.append((number, {k.strip(): v.strip() for k, v in row.items() if k and v and v.strip()}))
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                value = json.loads(line)
            except ValueError:
                rows.append((number, {"__error__": "is not valid JSON"}))
                continue
            rows.append((number, value if isinstance(value, dict) else {"__error__": "is not a JSON object"}))
    if not rows:
        raise UsageError(f"Job file {path} has no jobs in it.")
    return rows


def _draft_row(fields: dict[str, Any], *, base: Path, limits: ImageLimits) -> JobDraft:
    if "__error__" in fields:
        raise UsageError(f"the line {fields['__error__']}")
    fields = dict(fields)
    kind = fields.pop("job_type", None) or fields.pop("type", None)
    if not kind:
        raise UsageError("job_type is missing (camera-angle or qwen-image-edit)")
    job_type = JobType.parse(str(kind))
    images: dict[str, str] = {}
    for key in list(fields):
        if key in _ROW_IMAGE_KEYS:
            value = str(fields.pop(key))
            if not value.startswith(("s3://", "https://", "http://")) and not Path(value).is_absolute():
                value = str(base / value)
            images[_ROW_IMAGE_KEYS[key]] = value
    if "image_url" not in images:
        raise UsageError("image is missing")
    for key, kind_of in _NUMERIC.items():
        if isinstance(fields.get(key), str):
            try:
                fields[key] = kind_of(fields[key])
            except ValueError:
                raise UsageError(f"{key} must be a number (got {fields[key]!r})") from None
    main = images.pop("image_url")
    return draft_job(job_type, main, fields, limits=limits, extra_images=images)


def validate_batch(rows: Sequence[tuple[int, dict[str, Any]]], *, base: Path,
                   limits: ImageLimits) -> tuple[list[JobDraft], list[RowError]]:
    """Draft every row; collect every bad row instead of stopping at the first."""
    drafts: list[JobDraft] = []
    errors: list[RowError] = []
    for number, fields in rows:
        try:
            drafts.append(_draft_row(fields, base=base, limits=limits))
        except UsageError as exc:
            errors.append(RowError(number, str(exc).rstrip(".")))
    return drafts, errors


def submit_batch(
    gw: Gateways,
    path: Path,
    *,
    start_instance: bool = True,
    require_instance: bool = False,
    on_progress: Progress | None = None,
) -> BatchResult:
    """Submit every row of a JSONL/CSV file: all rows are validated before anything is written.

    Records go in with BatchWriteItem (25 a request) and messages with SendMessageBatch (10 a
    request). A row whose record was not written is reported and never queued; a row whose message
    was not queued has its record marked ``failed`` with the reason. Rows that succeeded stay queued.

    Raises:
        UsageError: one or more rows are invalid (every bad row is listed; nothing was written).
    """
    rows = read_batch_file(path)
    drafts, errors = validate_batch(rows, base=path.parent, limits=ImageLimits.from_settings(gw.settings))
    if errors:
        lines = "; ".join(f"row {e.row}: {e.message}" for e in errors[:20])
        more = f" (and {len(errors) - 20} more)" if len(errors) > 20 else ""
        raise UsageError(f"{len(errors)} of {len(rows)} rows in {path} are invalid, nothing was submitted: "
                         f"{lines}{more}.")
    now = round(time.time(), 3)
    task_ids = [new_task_id() for _ in drafts]
    records: list[JobRecord] = []
    messages: dict[str, str] = {}
    for task_id, draft in zip(task_ids, drafts, strict=True):
        urls = _upload_inputs(gw, draft, task_id, on_progress)
        request = parse_request(draft.job_type, {**draft.fields, **urls})
        records.append(_new_record(gw, task_id, request, now))
        messages[task_id] = JobMessage.for_request(task_id, request, submitted_at=now).to_json()
    result = BatchResult()
    unwritten = set(gw.table.batch_create(records))
    to_send = [(r.task_id, messages[r.task_id]) for r in records if r.task_id not in unwritten]
    unsent = gw.queue.send_batch(to_send) if to_send else {}
    for task_id, reason in unsent.items():
        _fail_unqueued(gw, task_id, GpuctlError(reason))
    for (number, _), record in zip(rows, records, strict=True):
        if record.task_id in unwritten:
            result.failures.append(RowError(number, "the job record could not be written"))
            result.job_ids.append(None)
        elif record.task_id in unsent:
            result.failures.append(RowError(number, f"the job could not be queued: {unsent[record.task_id]}"))
            result.job_ids.append(None)
        else:
            result.job_ids.append(record.task_id)
    if any(result.job_ids):
        result.instance = _start(gw, start_instance, require_instance)
    return result

