"""Submitting jobs: check → upload → record ``pending`` → enqueue → note the activity → make sure the instance runs.

Nothing is half-written:

* Every setting a submit needs, every option and every input is checked before the first write; remote inputs
  too, with the network (one HeadObject for ``s3://``, the adapter's address rules for ``https://``), so a job
  that cannot run never starts the GPU.
* A record is written only together with its message: the pair is a critical section (a :class:`WriteGuard`
  defers Ctrl-C/SIGTERM until both are done). A record whose message could not be queued is marked ``failed``
  with the reason, so no ``pending`` job is left that no worker will ever see, and no message is queued
  without its record.
* Uploaded inputs that no record refers to (the record could not be written) are deleted again. An input of a
  job recorded as failed stays, so ``gpuctl jobs retry`` can run it.
* ``submit --from`` writes chunk by chunk (the records of a chunk, then its messages) and stops between chunks
  when interrupted: rows not reached are never written.

After the message is queued, one UpdateItem on the activity marker records the arrival and returns the marker:
when an adapter reported itself polling within a minute (and no stop was fenced since), the instance is running
and EC2 is not asked at all (no EC2 client is even built); otherwise ``ensure_running`` starts it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from gpuctl.errors import GpuctlError, InstanceNotStarted, Interrupted, UsageError
from gpuctl.inputs import ImageLimits, display
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
from gpuctl.services.images import ImageRef, RemoteChecks, input_key, resolve_image
from gpuctl.services.instance import STOPPING_WAIT_SECONDS, StartOutcome, ensure_running

if TYPE_CHECKING:
    from gpuctl.services.context import Gateways
    from gpuctl.services.notes import SubmitNotes

__all__ = [
    "CHUNK_ROWS",
    "INTERRUPTED_MESSAGE",
    "NO_GUARD",
    "BatchResult",
    "JobDraft",
    "RowError",
    "SubmitResult",
    "WriteGuard",
    "draft_job",
    "instance_document",
    "read_batch_file",
    "start_for_work",
    "submit_batch",
    "submit_draft",
    "submit_request",
]

log = logging.getLogger(__name__)

# Request fields that hold image references, in the order they are uploaded.
_IMAGE_FIELDS = ("image_url", "image2_url", "image3_url")
#: Rows per chunk of `submit --from`: two BatchWriteItem (25 each) and five SendMessageBatch (10 each), the
#: fewest requests per job the batch APIs allow (0.14), and a short critical section to wait for on Ctrl-C.
CHUNK_ROWS = 50
#: The most messages SendMessageBatch takes at once.
SEND_BATCH_MAX = 10
#: The magnitudes of a non-zero float request field that a DynamoDB number holds (with room to spare).
_STORABLE = (1e-100, 1e100)
#: The error a recorded job gets when an interrupt stopped the submit before its message was queued.
INTERRUPTED_MESSAGE = "interrupted before it was queued"

Progress = Callable[[str, int, int], None]  # (file name, bytes so far, total bytes)


class WriteGuard(Protocol):
    """Keeps interrupts out of the writes that must happen together (a record and its message).

    ``pending`` is true once an interrupt was asked for; ``deferred()`` is a section in which an interrupt only
    sets ``pending``. The CLI's implementation handles SIGINT/SIGTERM; an HTTP API has none.
    """

    @property
    def pending(self) -> bool: ...

    def deferred(self) -> AbstractContextManager[None]: ...


class _NoGuard:
    pending = False

    def deferred(self) -> AbstractContextManager[None]:
        return nullcontext()


NO_GUARD: WriteGuard = _NoGuard()


@dataclass(frozen=True)
class JobDraft:
    """A validated job that has not touched AWS yet: its request (local images still as paths)."""

    job_type: JobType
    fields: dict[str, Any]
    images: dict[str, ImageRef]

    @property
    def local_images(self) -> dict[str, ImageRef]:
        return {name: ref for name, ref in self.images.items() if ref.is_local}

    @property
    def remote_urls(self) -> list[str]:
        return [ref.url for ref in self.images.values() if ref.url]


@dataclass(frozen=True)
class SubmitResult:
    record: JobRecord
    instance: StartOutcome | None
    reused: bool = False  # an idempotency key matched an existing job; nothing new was queued
    adapter_polling: bool = False  # the activity marker said an adapter is polling: EC2 was not asked
    instance_error: GpuctlError | None = None  # --require-instance, and the instance was not started
    interrupted: bool = False  # queued, then interrupted: the instance step was skipped

    def document(self) -> dict[str, Any]:
        """The submitted job as ``submit --output json`` and ``POST /api/v1/<type>/jobs`` print it."""
        return {**self.record.status_document(), "reused": self.reused,
                "instance": instance_document(self.instance, self.adapter_polling)}


def instance_document(outcome: StartOutcome | None, polling: bool) -> dict[str, Any] | None:
    """What the submit did about the instance, as JSON (None: it was not asked to start it)."""
    if outcome is None:
        return None
    return {"action": outcome.action, "state": outcome.state, "warning": outcome.warning, "adapter_polling": polling}


@dataclass(frozen=True)
class RowError:
    row: int  # 1-based line/row number in the file
    message: str


@dataclass
class BatchResult:
    """Per row: the job id, or None when the row's job was not queued (see ``failures`` and ``unsubmitted``)."""

    job_ids: list[str | None] = field(default_factory=list)
    failures: list[RowError] = field(default_factory=list)
    instance: StartOutcome | None = None
    adapter_polling: bool = False
    instance_error: GpuctlError | None = None
    interrupted: bool = False
    unsubmitted: int = 0  # rows never written because the submit was interrupted or stopped early

    @property
    def queued(self) -> int:
        return sum(1 for job_id in self.job_ids if job_id)


def draft_job(job_type: JobType, image: str, fields: Mapping[str, Any], *, limits: ImageLimits,
              extra_images: Mapping[str, str] | None = None) -> JobDraft:
    """Check everything about one job that needs no network call.

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
    for name, value in body.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"Invalid {job_type.value} request: {name} must be a finite number (got {value}).")
        if isinstance(value, float) and value != 0 and not _STORABLE[0] <= abs(value) <= _STORABLE[1]:
            # DynamoDB numbers span 1e-130 … 1e126; a value outside cannot be recorded (boto3 raises Underflow).
            raise UsageError(f"Invalid {job_type.value} request: {name} is too close to zero or too large "
                             f"(got {value}).")
    # Validate the request with stand-in URLs for local files; the real s3:// URIs come after upload.
    body.update({name: ref.url or f"s3://local-file/{name}" for name, ref in refs.items()})
    parse_request(job_type, body)
    return JobDraft(job_type, {k: v for k, v in fields.items() if v is not None}, refs)


# --- before the first write ------------------------------------------------------------------------

def _check_settings(gw: Gateways, *, uploads: bool, instance: bool) -> None:
    """Every setting the writes will need, before the first one (a missing one would strand the earlier ones)."""
    gw.settings.require("table_name")
    gw.settings.require("queue_url")
    if uploads:
        gw.settings.require("bucket")
    if instance:
        gw.settings.require("instance_id")


def _check_instance_options(start_instance: bool, require_instance: bool) -> None:
    if require_instance and not start_instance:
        raise UsageError("--require-instance and --no-start contradict each other; give one of them.")


def _remote_checks(gw: Gateways) -> RemoteChecks:
    return RemoteChecks(lambda: gw.store, ImageLimits.from_settings(gw.settings))


# --- uploads ---------------------------------------------------------------------------------------

class _Uploads:
    """Inputs uploaded for one submit, so they can be deleted again if their record is never written."""

    def __init__(self, gw: Gateways) -> None:
        self._gw = gw
        self.keys: dict[str, list[str]] = {}  # task_id → keys

    def upload(self, draft: JobDraft, task_id: str, on_progress: Progress | None) -> dict[str, str]:
        """The draft's local images uploaded under ``task_id``; returns every image field's URL."""
        urls: dict[str, str] = {}
        local = draft.local_images
        if local:
            bucket = self._gw.settings.require("bucket")
            for index, (name, ref) in enumerate(local.items(), start=1):
                assert ref.path is not None
                key = input_key(self._gw.settings.inputs_prefix, task_id, ref.path, index)
                # Recorded before the upload: an upload cut short by Ctrl-C may still have created the object.
                self.keys.setdefault(task_id, []).append(key)
                urls[name] = self._gw.store.upload_file(ref.path, bucket, key, content_type=ref.content_type,
                                                        on_progress=_file_progress(ref, on_progress))
        for name, ref in draft.images.items():
            if ref.url:
                urls[name] = ref.url
        return urls

    def discard(self, task_ids: Sequence[str] | None = None) -> None:
        """Delete the uploads of ``task_ids`` (default: all), best effort: the original error is the one to tell."""
        bucket = self._gw.settings.bucket
        for task_id in list(self.keys if task_ids is None else task_ids):
            for key in self.keys.pop(task_id, []):
                if bucket:
                    try:
                        self._gw.store.delete(bucket, key)
                    except (GpuctlError, KeyboardInterrupt):
                        log.warning("submit.upload_not_deleted", extra={"key": key})


def _file_progress(ref: ImageRef, on_progress: Progress | None) -> Callable[[int], None] | None:
    if on_progress is None or ref.path is None:
        return None
    sent = 0
    name, total = ref.path.name, ref.size

    def callback(n: int) -> None:
        nonlocal sent
        sent += n
        on_progress(name, sent, total)

    return callback


# --- records and messages --------------------------------------------------------------------------

def _new_record(gw: Gateways, task_id: str, request: JobRequest, now: float, *,
                idempotency_key: str | None = None, retry_of: str | None = None, canary: bool = False) -> JobRecord:
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
        canary=canary,
    )


def _fail_unqueued(gw: Gateways, task_id: str, reason: str) -> bool:
    """Mark a recorded job failed because its message was not queued (conditional: only a pending job).

    Best effort: if even this fails the record stays pending (`gpuctl jobs cancel` ends it); the original error
    is the one worth reporting. Returns False when the table could not be reached, so a caller stops trying.
    """
    from gpuctl.errors import AwsError

    try:
        gw.table.transition(task_id, JobStatus.FAILED, fields={"error_message": reason, "finished_at": time.time()},
                            expected={JobStatus.PENDING})
    except AwsError:
        return False
    except GpuctlError:
        pass  # never written (NotFound), or already claimed by a worker (TransitionRefused): nothing to undo
    return True


def _fail_all(gw: Gateways, task_ids: Sequence[str], reason: str) -> None:
    for task_id in task_ids:
        try:
            if not _fail_unqueued(gw, task_id, reason):
                return
        except KeyboardInterrupt:
            return


def _queue_failure(exc: BaseException) -> str:
    return INTERRUPTED_MESSAGE if isinstance(exc, KeyboardInterrupt) else f"Failed to queue the job: {exc}"


def submit_request(
    gw: Gateways,
    request: JobRequest,
    *,
    task_id: str | None = None,
    idempotency_key: str | None = None,
    retry_of: str | None = None,
    start_instance: bool = True,
    require_instance: bool = False,
    guard: WriteGuard = NO_GUARD,
    stopping_wait: float = STOPPING_WAIT_SECONDS,
    notes: SubmitNotes | None = None,
    canary: bool = False,
) -> SubmitResult:
    """Record a validated request as ``pending``, queue it, note the activity and make sure the instance runs.

    ``notes``: a long-lived caller's coalesced marker notes. While they say an adapter polls, the submit ends
    once its message is queued (two AWS requests) and the note is left to them (see :mod:`gpuctl.services.notes`).
    ``canary`` marks the record as `gpuctl doctor --canary`'s test job.

    Raises:
        ConfigError: a setting the submit needs is missing (nothing was written).
        GpuctlError: the record could not be written, or the message not queued (the record is then marked
            failed with the reason).
    """
    _check_instance_options(start_instance, require_instance)
    _check_settings(gw, uploads=False, instance=require_instance)
    task_id = task_id or new_task_id()
    now = round(time.time(), 3)
    record = _new_record(gw, task_id, request, now, idempotency_key=idempotency_key, retry_of=retry_of,
                         canary=canary)
    body = JobMessage.for_request(task_id, request, submitted_at=now).to_json()
    with guard.deferred():
        try:
            gw.table.create(record)
        except KeyboardInterrupt:
            # A second Ctrl-C while the PutItem was in flight: it may have been written.
            _fail_all(gw, [task_id], INTERRUPTED_MESSAGE)
            raise
        try:
            gw.queue.send(body)
        except (GpuctlError, KeyboardInterrupt) as exc:
            _fail_all(gw, [task_id], _queue_failure(exc))
            if isinstance(exc, GpuctlError):
                # Say which job: it is recorded (failed, with this reason), and `gpuctl jobs retry` can run it.
                exc.message = f"Job {task_id} could not be queued and is recorded as failed: {exc.message}"
            raise
    if guard.pending:
        return SubmitResult(record, None, interrupted=True)
    polling = notes.polling(time.time()) if notes is not None else None
    if notes is not None and polling is not None:
        notes.queued()
        log.info("submit.adapter_polling", extra={"worker": polling.adapter_worker, "noted": "coalesced"})
        return SubmitResult(record, StartOutcome("already-running", "running") if start_instance else None,
                            adapter_polling=True)
    try:
        return _after_queued(gw, record, 1, start_instance=start_instance, require_instance=require_instance,
                             stopping_wait=stopping_wait, notes=notes)
    except KeyboardInterrupt:
        return SubmitResult(record, None, interrupted=True)


def _after_queued(gw: Gateways, record: JobRecord, jobs: int, *, start_instance: bool,
                  require_instance: bool, stopping_wait: float = STOPPING_WAIT_SECONDS,
                  notes: SubmitNotes | None = None) -> SubmitResult:
    outcome, polling = _make_sure_it_runs(gw, start_instance, stopping_wait, notes)
    return SubmitResult(record, outcome, adapter_polling=polling,
                        instance_error=_instance_error(outcome, [record.task_id], jobs) if require_instance else None)


def _make_sure_it_runs(gw: Gateways, start_instance: bool, stopping_wait: float = STOPPING_WAIT_SECONDS,
                       notes: SubmitNotes | None = None) -> tuple[StartOutcome | None, bool]:
    """Record the arrival on the activity marker; start the instance unless an adapter is known to be polling."""
    try:
        activity = gw.table.note_submit()
    except GpuctlError as exc:
        # The job is queued; the marker is an optimisation and a hint for the scheduler, never a reason to fail.
        log.warning("submit.activity_not_noted", extra={"error": str(exc)})
        activity = None
    if notes is not None:
        notes.observe(activity)
    if activity is not None and activity.adapter_fresh(time.time()):
        log.info("submit.adapter_polling", extra={"worker": activity.adapter_worker})
        return (StartOutcome("already-running", "running") if start_instance else None), True
    if not start_instance:
        return None, False
    return start_for_work(gw, stopping_wait=stopping_wait), False


def start_for_work(gw: Gateways, *, stopping_wait: float = STOPPING_WAIT_SECONDS) -> StartOutcome:
    """Make sure a GPU will take queued work: start the instance, or raise a fleet from 0 to 1 (never raises for
    instance trouble; the outcome says what happened)."""
    if gw.settings.fleet_group:
        from gpuctl.services.fleet import ensure_capacity

        return ensure_capacity(gw)  # fleet mode: 0 -> 1; the scheduler sizes it from the backlog
    if not gw.settings.instance_id:
        return StartOutcome("skipped", warning="no GPU instance id is configured (GPU_INSTANCE_ID); the job is "
                                               "queued but nothing was started")
    return ensure_running(gw, stopping_wait=stopping_wait)


def _instance_error(outcome: StartOutcome | None, task_ids: Sequence[str], jobs: int) -> GpuctlError | None:
    if outcome is None or outcome.action not in ("failed", "skipped"):
        return None
    what = f"Job {task_ids[0]} is queued" if jobs == 1 else f"{jobs} jobs are queued"
    reason = str(outcome.error) if outcome.error is not None else (outcome.warning or "it was not started")
    return InstanceNotStarted(f"{what}, but the GPU instance was not started (--require-instance): "
                              f"{reason.rstrip('.')}.")


def submit_draft(
    gw: Gateways,
    draft: JobDraft,
    *,
    idempotency_key: str | None = None,
    start_instance: bool = True,
    require_instance: bool = False,
    on_progress: Progress | None = None,
    guard: WriteGuard = NO_GUARD,
    stopping_wait: float = STOPPING_WAIT_SECONDS,
    notes: SubmitNotes | None = None,
    canary: bool = False,
) -> SubmitResult:
    """Check the draft's remote inputs, upload its local images, then :func:`submit_request`.

    With an idempotency key the task id is derived from the key; a job that already exists under it
    is returned as it is and nothing is uploaded or queued again. ``stopping_wait``: how long to wait for a
    ``stopping`` instance before starting it again (0: do not wait; the scheduler starts it).

    Raises:
        UsageError: a remote input that does not exist, is too large or is not an image (nothing was written).
        Interrupted: interrupted before anything was written.
    """
    from gpuctl.aws.dynamo import JobAlreadyExists
    from gpuctl.errors import NotFound

    _check_instance_options(start_instance, require_instance)
    _check_settings(gw, uploads=bool(draft.local_images), instance=require_instance)
    task_id = task_id_for_key(idempotency_key) if idempotency_key else new_task_id()
    if idempotency_key:
        try:
            return SubmitResult(gw.table.get(task_id), None, reused=True)
        except NotFound:
            pass
    _remote_checks(gw).check(draft.remote_urls)
    if guard.pending:
        raise Interrupted("Interrupted: nothing was submitted.")
    uploads = _Uploads(gw)
    try:
        urls = uploads.upload(draft, task_id, on_progress)
        request = parse_request(draft.job_type, {**draft.fields, **urls})
        result = submit_request(gw, request, task_id=task_id, idempotency_key=idempotency_key,
                                start_instance=start_instance, require_instance=require_instance, guard=guard,
                                stopping_wait=stopping_wait, notes=notes, canary=canary)
    except JobAlreadyExists:
        # Two submits with one key raced; the other one recorded and queued the job.
        uploads.discard()
        return SubmitResult(gw.table.get(task_id), None, reused=True)
    except BaseException:
        if not _recorded(gw, task_id):
            uploads.discard()
        raise
    if guard.pending and not result.interrupted:
        return SubmitResult(result.record, result.instance, adapter_polling=result.adapter_polling,
                            instance_error=result.instance_error, interrupted=True)
    return result


def _recorded(gw: Gateways, task_id: str) -> bool:
    """Whether a record exists for ``task_id`` (its inputs must then stay); unknown counts as recorded."""
    from gpuctl.errors import NotFound

    try:
        gw.table.get(task_id)
    except NotFound:
        return False
    except (GpuctlError, KeyboardInterrupt):
        return True
    return True


# --- batch submit ---------------------------------------------------------------------------------

_NUMERIC = {"vertical": int, "horizontal": int, "zoom": int, "seed": int, "steps": int,
            "cfg": float, "denoise": float}
_ROW_IMAGE_KEYS = {"image": "image_url", "image_url": "image_url", "image2": "image2_url",
                   "image2_url": "image2_url", "image3": "image3_url", "image3_url": "image3_url"}
_MAX_ROWS_LISTED = 20


def read_batch_file(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Rows of a JSONL or CSV job file as ``(row number, fields)``; the format follows the extension.

    Raises:
        UsageError: the file is missing, unreadable, not UTF-8, or has no jobs in it.
    """
    shown = display(str(path))
    try:
        if path.is_dir():
            raise UsageError(f"Job file {shown} is a directory, not a file.")
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"Job file {shown} does not exist.") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"Job file {shown} is not UTF-8 text (byte {exc.start + 1} is not valid UTF-8).") from None
    except OSError as exc:
        raise UsageError(f"Cannot read job file {shown} ({display(exc.strerror or str(exc))}).") from None
    if "\x00" in text:
        raise UsageError(f"Job file {shown} is not a text file (it contains NUL bytes).")
    rows = _csv_rows(text, shown) if path.suffix.lower() == ".csv" else _jsonl_rows(text)
    if not rows:
        raise UsageError(f"Job file {shown} has no jobs in it.")
    return rows


def _csv_rows(text: str, shown: str) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text))
    try:
        if not reader.fieldnames:
            raise UsageError(f"Job file {shown} has no header row.")
        rows: list[tuple[int, dict[str, Any]]] = []
        for row in reader:
            fields: dict[str, Any] = {}
            for key, value in row.items():
                if key is None:  # more cells than the header has columns
                    fields["__error__"] = "has more cells than the header row has columns"
                elif isinstance(value, str) and value.strip():
                    fields[key.strip()] = value.strip()
            rows.append((reader.line_num, fields))
    except csv.Error as exc:
        raise UsageError(f"Job file {shown} is not valid CSV (line {reader.line_num}: {exc}).") from None
    return rows


def _jsonl_rows(text: str) -> list[tuple[int, dict[str, Any]]]:
    rows: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            value = json.loads(line)
        except RecursionError:
            rows.append((number, {"__error__": "is nested too deeply"}))
            continue
        except ValueError:
            rows.append((number, {"__error__": "is not valid JSON"}))
            continue
        rows.append((number, value if isinstance(value, dict) else {"__error__": "is not a JSON object"}))
    return rows


def _draft_row(fields: dict[str, Any], *, base: Path, limits: ImageLimits) -> JobDraft:
    if "__error__" in fields:
        raise UsageError(f"the line {fields['__error__']}")
    fields = dict(fields)
    kind = fields.pop("job_type", None) or fields.pop("type", None)
    if not kind:
        raise UsageError("job_type is missing (camera-angle or qwen-image-edit)")
    if not isinstance(kind, str):
        raise UsageError(f"job_type must be a string (got {display(repr(kind), limit=40)})")
    job_type = JobType.parse(kind)
    images: dict[str, str] = {}
    for key in list(fields):
        if key in _ROW_IMAGE_KEYS:
            value = fields.pop(key)
            if value is None:
                continue
            if not isinstance(value, str):
                raise UsageError(f"{key} must be a string: a path, an s3:// URI or an https:// URL")
            if "://" not in value and not Path(value).is_absolute():
                value = str(base / value)
            images[_ROW_IMAGE_KEYS[key]] = value
    if "image_url" not in images:
        raise UsageError("image is missing")
    for key, kind_of in _NUMERIC.items():
        if isinstance(fields.get(key), str):
            try:
                fields[key] = kind_of(fields[key])
            except ValueError:
                raise UsageError(f"{key} must be a number (got {display(repr(fields[key]), limit=40)})") from None
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


def _refuse(errors: Sequence[RowError], total: int, path: Path, what: str) -> UsageError:
    lines = "; ".join(f"row {e.row}: {e.message}" for e in errors[:_MAX_ROWS_LISTED])
    more = f" (and {len(errors) - _MAX_ROWS_LISTED} more)" if len(errors) > _MAX_ROWS_LISTED else ""
    return UsageError(f"{len(errors)} of {total} rows in {display(str(path))} {what}, nothing was submitted: "
                      f"{lines}{more}.")


def submit_batch(
    gw: Gateways,
    path: Path,
    *,
    start_instance: bool = True,
    require_instance: bool = False,
    on_progress: Progress | None = None,
    guard: WriteGuard = NO_GUARD,
    chunk_rows: int = CHUNK_ROWS,
) -> BatchResult:
    """Submit every row of a JSONL/CSV file: every row, and every remote input, is checked before anything is
    written; then the rows go in chunk by chunk, each chunk's records (BatchWriteItem, 25 a request) before its
    messages (SendMessageBatch, 10 a request).

    A row whose record was not written is reported and never queued; a row whose message was not queued has its
    record marked ``failed`` with the reason. Rows that succeeded stay queued. When ``guard`` reports an
    interrupt, the chunk being written is finished and the rest of the file is never written
    (``BatchResult.interrupted``); after a request fails as a whole, the rest is not written either.

    Raises:
        UsageError: one or more rows are invalid or name an input that cannot be read (every bad row is listed;
            nothing was written).
        GpuctlError: the first chunk could not be written at all (nothing is queued).
    """
    rows = read_batch_file(path)
    limits = ImageLimits.from_settings(gw.settings)
    drafts, errors = validate_batch(rows, base=path.parent, limits=limits)
    if errors:
        raise _refuse(errors, len(rows), path, "are invalid")
    _check_instance_options(start_instance, require_instance)
    _check_settings(gw, uploads=any(d.local_images for d in drafts), instance=require_instance)
    checks = _remote_checks(gw)
    for (number, _), draft in zip(rows, drafts, strict=True):
        try:
            checks.check(draft.remote_urls)
        except UsageError as exc:
            errors.append(RowError(number, str(exc).rstrip(".")))
    if errors:
        raise _refuse(errors, len(rows), path, "name an input that cannot be used")
    result = BatchResult(job_ids=[None] * len(rows))
    if guard.pending:
        result.interrupted, result.unsubmitted = True, len(rows)
        return result
    now = round(time.time(), 3)
    writer = _ChunkWriter(gw, now, guard, on_progress)
    for start in range(0, len(rows), chunk_rows):
        if guard.pending:
            break
        part = list(range(start, min(start + chunk_rows, len(rows))))
        try:
            writer.write([rows[i][0] for i in part], [drafts[i] for i in part], result, part)
        except (_Stopped, KeyboardInterrupt):
            # The chunk being written cleaned up after itself; what earlier chunks queued stays queued.
            result.interrupted = True
            break
        except _ChunkFailed as failed:
            if not result.queued:
                raise failed.error from None
            # Later chunks would most likely fail the same way: they are not tried (nor written).
            result.unsubmitted = len(rows) - part[-1] - 1
            break
    if result.queued and not (result.interrupted or guard.pending):
        try:
            outcome, polling = _make_sure_it_runs(gw, start_instance)
        except KeyboardInterrupt:
            result.interrupted = True
        else:
            result.instance, result.adapter_polling = outcome, polling
            if require_instance:
                ids = [j for j in result.job_ids if j]
                result.instance_error = _instance_error(outcome, ids, len(ids))
    elif result.queued:
        # Interrupted: record the arrival (one request), but do not wait on EC2; the scheduler starts it.
        with contextlib.suppress(GpuctlError, KeyboardInterrupt):
            gw.table.note_submit()
    if result.interrupted or guard.pending:
        result.interrupted = True
        done = {i for i, job_id in enumerate(result.job_ids) if job_id}
        result.unsubmitted = len(rows) - len(done | writer.attempted)
    return result


class _Stopped(Exception):
    """An interrupt arrived between two uploads of a chunk: the chunk is abandoned before any record is written."""


class _ChunkFailed(Exception):
    """A request of the chunk failed as a whole; its rows are reported, the rest of the file is not tried."""

    def __init__(self, error: GpuctlError) -> None:
        super().__init__(str(error))
        self.error = error


class _ChunkWriter:
    """Writes one chunk of a batch: uploads, then records, then messages; undoes what it must when that fails."""

    def __init__(self, gw: Gateways, now: float, guard: WriteGuard, on_progress: Progress | None) -> None:
        self._gw = gw
        self._now = now
        self._guard = guard
        self._on_progress = on_progress
        self.attempted: set[int] = set()  # row indexes whose chunk reached the writes

    def _prepare(self, drafts: Sequence[JobDraft], uploads: _Uploads) -> list[tuple[JobRecord, str]]:
        prepared = []
        for draft in drafts:
            if self._guard.pending:
                raise _Stopped
            task_id = new_task_id()
            urls = uploads.upload(draft, task_id, self._on_progress)
            request = parse_request(draft.job_type, {**draft.fields, **urls})
            record = _new_record(self._gw, task_id, request, self._now)
            prepared.append((record, JobMessage.for_request(task_id, request, submitted_at=self._now).to_json()))
        return prepared

    def write(self, numbers: Sequence[int], drafts: Sequence[JobDraft], result: BatchResult,
              indexes: Sequence[int]) -> None:
        """Write one chunk and record each row's outcome in ``result``.

        Raises:
            _Stopped: an interrupt came before the chunk's records were written (its uploads are deleted).
            _ChunkFailed: not one job of the chunk could be queued (its rows are in ``result.failures``).
            KeyboardInterrupt: a forced interrupt; whatever of the chunk may have been written is marked failed.
        """
        uploads = _Uploads(self._gw)
        try:
            prepared = self._prepare(drafts, uploads)
        except BaseException:
            uploads.discard()
            raise
        records = [record for record, _ in prepared]
        by_id = {r.task_id: (number, index) for r, number, index in zip(records, numbers, indexes, strict=True)}
        self.attempted.update(indexes)
        with self._guard.deferred():
            unwritten = self._write_records(records, uploads, result, numbers)
            written = [(r.task_id, body) for r, body in prepared if r.task_id not in unwritten]
            queued, unsent, error = self._send(written, result, by_id)
            # A record a batch request may have written after all (a timed-out request) must not stay pending.
            _fail_all(self._gw, sorted(unwritten), "the job record could not be written")
            for task_id, reason in unsent.items():
                _fail_unqueued(self._gw, task_id, f"Failed to queue the job: {reason}")
        uploads.discard(sorted(unwritten))
        for task_id in unwritten:
            result.failures.append(RowError(by_id[task_id][0], "the job record could not be written"))
        for task_id, reason in unsent.items():
            result.failures.append(RowError(by_id[task_id][0], f"the job could not be queued: {reason}"))
        if error is not None and not queued:
            raise _ChunkFailed(error)

    def _write_records(self, records: Sequence[JobRecord], uploads: _Uploads, result: BatchResult,
                       numbers: Sequence[int]) -> set[str]:
        ids = [r.task_id for r in records]
        try:
            return set(self._gw.table.batch_create(records))
        except GpuctlError as exc:
            if _maybe_written(exc):
                _fail_all(self._gw, ids, _queue_failure(exc))
            else:
                uploads.discard()
            result.failures.extend(RowError(n, f"the job record could not be written: {exc}") for n in numbers)
            raise _ChunkFailed(exc) from exc
        except KeyboardInterrupt:
            _fail_all(self._gw, ids, INTERRUPTED_MESSAGE)
            raise

    def _send(self, written: Sequence[tuple[str, str]], result: BatchResult,
              by_id: Mapping[str, tuple[int, int]]) -> tuple[int, dict[str, str], GpuctlError | None]:
        """Queue the messages one SendMessageBatch (10) at a time, so that an interrupt forced inside a request
        leaves only that request in doubt. Returns how many were queued, the others with why, the last error."""
        unsent: dict[str, str] = {}
        error: GpuctlError | None = None
        queued = 0
        for start in range(0, len(written), SEND_BATCH_MAX):
            group = written[start:start + SEND_BATCH_MAX]
            try:
                refused = self._gw.queue.send_batch(group)
            except GpuctlError as exc:
                error, refused = exc, {task_id: str(exc) for task_id, _ in group}
            except KeyboardInterrupt:
                _fail_all(self._gw, [*unsent, *(task_id for task_id, _ in written[start:])], INTERRUPTED_MESSAGE)
                raise
            unsent.update(refused)
            for task_id, _ in group:
                if task_id not in refused:
                    result.job_ids[by_id[task_id][1]] = task_id
                    queued += 1
        return queued, unsent, error


def _maybe_written(exc: GpuctlError) -> bool:
    """Whether a failed write may still have been applied (the connection broke or timed out on the way back)."""
    from gpuctl.errors import AwsError

    return isinstance(exc, AwsError) and exc.code in (None, "Unreachable")
