"""Jobs after submission: look one up, list them by status, cancel, retry, fetch the result."""

from __future__ import annotations

import heapq
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from gpuctl.errors import Conflict, UsageError
from gpuctl.models import CANCEL_MESSAGE, JobRecord, JobStatus, JobType, parse_request

if TYPE_CHECKING:
    from gpuctl.services.context import Gateways
    from gpuctl.services.submit import SubmitResult

__all__ = [
    "CANCEL_MESSAGE",
    "CancelOutcome",
    "ResultFile",
    "cancel_job",
    "download_result",
    "get_job",
    "list_jobs",
    "parse_job_id",
    "parse_since",
    "parse_status",
    "result_url",
    "retry_job",
]

_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

DownloadProgress = Callable[[int, int], None]  # (bytes so far, total bytes)


def parse_job_id(value: str) -> str:
    """The canonical form of a job id (a UUID).

    Raises:
        UsageError: ``value`` is not a UUID.
    """
    try:
        return str(uuid.UUID(value.strip()))
    except ValueError:
        raise UsageError(
            f"{value!r} is not a job id: job ids are UUIDs such as 3f2b8c1e-4d5a-4b6c-8d7e-9f0a1b2c3d4e."
        ) from None


def parse_status(value: str | None) -> JobStatus | None:
    """A ``--status`` value, case-insensitive.

    Raises:
        UsageError: not one of the statuses.
    """
    if value is None:
        return None
    try:
        return JobStatus(value.strip().lower())
    except ValueError:
        names = ", ".join(s.value for s in JobStatus)
        raise UsageError(f"Unknown status {value!r}; choose one of: {names}.") from None


def parse_duration(value: str, *, option: str = "--since") -> float:
    """A duration such as ``30m``, ``1h``, ``2d`` (s, m, h, d or w) in seconds.

    Raises:
        UsageError: not a number followed by a unit; the message names ``option``.
    """
    match = _SINCE.match(value)
    if not match:
        raise UsageError(f"{option} {value!r} is not a duration: use a number and a unit, e.g. 30m, 1h, 2d.")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]


def parse_since(value: str | None, *, now: float | None = None) -> float | None:
    """A ``--since`` age such as ``30m``, ``1h``, ``2d`` as an epoch-seconds lower bound.

    Raises:
        UsageError: not a number followed by s, m, h, d or w.
    """
    if value is None:
        return None
    return (time.time() if now is None else now) - parse_duration(value)


def get_job(gw: Gateways, job_id: str) -> JobRecord:
    """The job's record, read consistently.

    Raises:
        UsageError: ``job_id`` is not a UUID.
        NotFound: there is no such job.
    """
    return gw.table.get(parse_job_id(job_id))


def list_jobs(
    gw: Gateways, *, status: str | None = None, since: str | None = None, limit: int = 50
) -> list[JobRecord]:
    """Jobs newest first from the status GSI (never a scan).

    Without a status every status is queried, each for at most ``limit`` items, and the lists are
    merged: the newest ``limit`` overall are among the newest ``limit`` of each status.

    Raises:
        UsageError: a bad status, age or limit.
    """
    if limit < 1:
        raise UsageError(f"--limit must be at least 1 (got {limit}).")
    wanted = parse_status(status)
    lower = parse_since(since)
    statuses: Iterable[JobStatus] = [wanted] if wanted else list(JobStatus)
    streams = [gw.table.query_status(s, since=lower, limit=limit) for s in statuses]
    merged = heapq.merge(*streams, key=lambda r: r.created_at, reverse=True)
    return [record for _, record in zip(range(limit), merged, strict=False)]


@dataclass(frozen=True)
class CancelOutcome:
    """``action`` is ``cancelled`` (a pending job ended failed) or ``cancel-requested`` (processing)."""

    record: JobRecord
    action: str


def cancel_job(gw: Gateways, job_id: str) -> CancelOutcome:
    """Cancel a job that has not finished.

    A pending job moves to ``failed`` with :data:`CANCEL_MESSAGE` (its queued message is then skipped
    by the adapter, which only starts pending jobs). A processing job gets ``cancel_requested``, which
    the adapter checks while it works. Both writes are conditional, so a job that moves on meanwhile is
    never clobbered.

    Raises:
        NotFound: there is no such job.
        Conflict: the job has already finished.
    """
    from gpuctl.aws.dynamo import TransitionRefused

    task_id = parse_job_id(job_id)
    try:
        record = gw.table.transition(
            task_id, JobStatus.FAILED, expected={JobStatus.PENDING},
            fields={"error_message": CANCEL_MESSAGE, "finished_at": round(time.time(), 3)},
        )
        return CancelOutcome(record, "cancelled")
    except TransitionRefused as exc:
        current = exc.current
    if current is not None and current.status is JobStatus.PROCESSING:
        try:
            record = gw.table.update_fields(task_id, {"cancel_requested": True},
                                            only_if={JobStatus.PROCESSING})
            return CancelOutcome(record, "cancel-requested")
        except TransitionRefused as exc:
            current = exc.current  # it finished between the two writes
    state = current.status.value if current else "gone"
    raise Conflict(f"Job {task_id} has already finished ({state}); there is nothing to cancel.")


def retry_job(gw: Gateways, job_id: str, *, start_instance: bool = True) -> SubmitResult:
    """Submit a new job with the same request as a finished one, linked to it by ``retry_of``.

    Raises:
        NotFound: there is no such job.
        Conflict: the job has not finished, or its record holds no request to repeat.
    """
    from gpuctl.services.submit import submit_request

    record = get_job(gw, job_id)
    if not record.status.is_finished:
        raise Conflict(f"Job {record.task_id} is still {record.status.value}; retry it once it has "
                       "finished, or cancel it first (`gpuctl jobs cancel`).")
    if not record.request:
        raise Conflict(f"Job {record.task_id} has no stored request (it was submitted by another "
                       "client), so it cannot be repeated.")
    request = parse_request(JobType.from_api_path(record.job_type), record.request)
    return submit_request(gw, request, retry_of=record.task_id, start_instance=start_instance)


# --- results ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResultFile:
    job_id: str
    source: str  # the record's result URL
    path: Path
    size: int


def _completed(gw: Gateways, job_id: str) -> JobRecord:
    record = get_job(gw, job_id)
    if record.status is JobStatus.FAILED:
        reason = record.error_message or "no reason recorded"
        raise Conflict(f"Job {record.task_id} failed, so it has no result: {reason}.")
    if record.status is not JobStatus.COMPLETED:
        raise Conflict(f"Job {record.task_id} is {record.status.value} and has no result yet; "
                       f"`gpuctl watch {record.task_id}` follows it to the end.")
    if not record.result_s3_uri:
        raise Conflict(f"Job {record.task_id} completed without a result URL.")
    return record


def _result_object(gw: Gateways, record: JobRecord) -> tuple[str, str]:
    """The bucket and key behind a result URL: an s3:// URI, or a CDN URL over the results bucket."""
    from gpuctl.aws.s3 import parse_s3_uri

    url = record.result_s3_uri or ""
    if url.startswith("s3://"):
        return parse_s3_uri(url)
    parsed = urlparse(url)
    key = unquote(parsed.path).lstrip("/")
    if parsed.scheme != "https" or not key:
        raise Conflict(f"Job {record.task_id} has a result URL gpuctl cannot fetch: {url!r}.")
    # The CDN serves the results bucket at its root (Settings.result_url), so the path is the key.
    return gw.settings.require("bucket"), key


def download_result(
    gw: Gateways, job_id: str, dest: Path | None = None, *, on_progress: DownloadProgress | None = None
) -> ResultFile:
    """Download a completed job's result to ``dest`` (a file, or a folder to put it in; default ``.``).

    Raises:
        NotFound: no such job, or its result object is gone.
        Conflict: the job has not completed.
    """
    record = _completed(gw, job_id)
    bucket, key = _result_object(gw, record)
    name = PurePosixPath(key).name or f"{record.task_id}.png"
    target = dest if dest is not None else Path.cwd()
    if target.is_dir():
        target = target / name
    size = gw.store.size(bucket, key)
    callback = None
    if on_progress is not None:
        done = 0

        def callback(n: int) -> None:
            nonlocal done
            done += n
            on_progress(done, size)

    gw.store.download_file(bucket, key, target, on_progress=callback)
    return ResultFile(record.task_id, record.result_s3_uri or "", target, size)


def result_url(gw: Gateways, job_id: str) -> str:
    """A URL anyone can GET the result from: the CDN URL as recorded, else a presigned S3 URL.

    Raises:
        NotFound: there is no such job.
        Conflict: the job has not completed.
    """
    record = _completed(gw, job_id)
    url = record.result_s3_uri or ""
    if url.startswith("https://"):
        return url
    bucket, key = _result_object(gw, record)
    return gw.store.presign_get(bucket, key, expires=gw.settings.presign_seconds)
