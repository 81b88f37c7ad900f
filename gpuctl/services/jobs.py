"""Jobs after submission: look one up, list them by status, cancel, retry, fetch the result."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from gpuctl.errors import AwsError, Conflict, NotFound, UsageError
from gpuctl.inputs import display
from gpuctl.models import CANCEL_MESSAGE, JobRecord, JobStatus, JobType, parse_request

if TYPE_CHECKING:
    from gpuctl.aws.dynamo import JobTable
    from gpuctl.services.context import Gateways
    from gpuctl.services.submit import SubmitResult

__all__ = [
    "CANCEL_MESSAGE",
    "HTTP_LISTING",
    "MAX_LIMIT",
    "CancelOutcome",
    "DownloadTarget",
    "JobPage",
    "ListingNames",
    "ResultFile",
    "cancel_job",
    "download_result",
    "download_target",
    "get_job",
    "list_jobs",
    "parse_job_id",
    "parse_since",
    "parse_status",
    "result_url",
    "retry_job",
]

log = logging.getLogger(__name__)

#: The largest page `jobs list` returns at once; --next-token continues it.
MAX_LIMIT = 1000

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
    task_id = parse_job_id(job_id)  # before the table: a bad id costs no AWS client
    return gw.table.get(task_id)


@dataclass(frozen=True)
class JobPage:
    """One page of a listing, and the token that continues it (None: this was the last page)."""

    records: list[JobRecord]
    next_token: str | None


class _Stream:
    """One status's jobs from the index, newest first, read page by page only as the merge needs them."""

    def __init__(self, table: JobTable, status: JobStatus, since: float | None, position: Any) -> None:
        self.table, self.status, self.since = table, status, since
        self.done = position == "done"
        start = (str(position[0]), str(position[1])) if isinstance(position, list) else None
        self.shown_after = start  # the last job shown: where a next page starts
        self._fetch_after = start  # the last job read: where the next Query starts
        self.buffer: deque[tuple[JobRecord, tuple[str, str]]] = deque()
        self.read = 0

    @property
    def head(self) -> JobRecord:
        return self.buffer[0][0]

    def fill(self, size: int) -> None:
        if self.buffer or self.done:
            return
        jobs, more = self.table.query_page(self.status, limit=max(1, size), since=self.since,
                                           after=self._fetch_after)
        self.read += len(jobs)
        self.buffer.extend(jobs)
        if jobs:
            self._fetch_after = jobs[-1][1]
        self.done = not more or not jobs

    def pop(self) -> JobRecord:
        record, position = self.buffer.popleft()
        self.shown_after = position
        return record

    def position(self) -> Any:
        """Where the next page starts: after the last job shown (None: from the top), or "done"."""
        if self.done and not self.buffer:
            return "done"
        return list(self.shown_after) if self.shown_after else None


@dataclass(frozen=True)
class ListingNames:
    """How the caller spells the listing's inputs, for error messages (the CLI's options by default)."""

    status: str = "--status"
    since: str = "--since"
    limit: str = "--limit"
    next_token: str = "--next-token"
    origin: str = "`gpuctl jobs list`"


#: The HTTP API's query parameters (``GET /api/v1/jobs``).
HTTP_LISTING = ListingNames("status", "since", "limit", "next_token", "GET /api/v1/jobs")


def _encode_token(status: JobStatus | None, since: float | None, positions: dict[str, Any]) -> str:
    raw = json.dumps({"v": 1, "status": status.value if status else None, "since": since, "pos": positions},
                     separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_token(token: str, names: ListingNames) -> dict[str, Any]:
    bad = UsageError(f"{names.next_token} is not a token that {names.origin} returned.")
    try:
        data = json.loads(base64.urlsafe_b64decode(token.strip() + "=" * (-len(token.strip()) % 4)))
    except (ValueError, TypeError):
        raise bad from None
    if not isinstance(data, dict) or data.get("v") != 1 or not isinstance(data.get("pos"), dict):
        raise bad
    for value in data["pos"].values():
        if not (value is None or value == "done" or (isinstance(value, list) and len(value) == 2 and
                                                      all(isinstance(v, str) for v in value))):
            raise bad
    return data


def list_jobs(
    gw: Gateways, *, status: str | None = None, since: str | None = None, limit: int = 50,
    next_token: str | None = None, names: ListingNames = ListingNames(),
) -> JobPage:
    """Jobs newest first from the status GSI (never a scan), one page at a time.

    Without a status the four statuses are merged newest first, each read page by page only as far as the merge
    needs it: the first Query per status asks for a quarter of ``limit``, later ones for a share of what is still
    missing. So a listing reads at most about twice ``limit`` items (the page shown plus one page of look-ahead
    spread over the statuses), whatever the table holds. ``next_token`` continues where an earlier page ended.

    Raises:
        UsageError: a bad status, age, limit or token (named as ``names`` spells them).
    """
    if limit < 1:
        raise UsageError(f"{names.limit} must be at least 1 (got {limit}).")
    if limit > MAX_LIMIT:
        raise UsageError(f"{names.limit} may be at most {MAX_LIMIT} (got {limit}); use {names.next_token} for more.")
    wanted = parse_status(status)
    lower = None if since is None else time.time() - parse_duration(since, option=names.since)
    positions: dict[str, Any] = {}
    if next_token:
        state = _decode_token(next_token, names)
        if status is not None and state.get("status") != (wanted.value if wanted else None):
            raise UsageError(f"{names.next_token} continues a listing with another {names.status}; "
                             f"give the same {names.status}.")
        wanted = parse_status(state.get("status"))
        lower = state.get("since")
        positions = state["pos"]
    statuses = [wanted] if wanted else list(JobStatus)
    streams = [_Stream(gw.table, s, lower, positions.get(s.value)) for s in statuses]
    share = -(-limit // len(streams))
    for stream in streams:
        stream.fill(share)
    records: list[JobRecord] = []
    while len(records) < limit:
        live = [s for s in streams if s.buffer]
        if not live:
            break
        newest = max(live, key=lambda s: s.head.created_at)
        records.append(newest.pop())
        if not newest.buffer and not newest.done and len(records) < limit:
            active = sum(1 for s in streams if not (s.done and not s.buffer))
            newest.fill(-(-(limit - len(records)) // max(1, active)))
    log.info("jobs.list", extra={"items_read": sum(s.read for s in streams), "returned": len(records)})
    if all(s.position() == "done" for s in streams):
        return JobPage(records, None)
    return JobPage(records, _encode_token(wanted, lower, {s.status.value: s.position() for s in streams}))


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


def _result_object(record: JobRecord) -> tuple[str, str]:
    """The bucket and key of an s3:// result URL (the bucket it names, whichever bucket is configured)."""
    from gpuctl.aws.s3 import parse_s3_uri

    url = record.result_s3_uri or ""
    if not url.startswith("s3://"):
        raise Conflict(f"Job {record.task_id} has a result URL gpuctl cannot fetch: {url!r} "
                       "(it fetches s3:// and https:// results).")
    try:
        return parse_s3_uri(url)
    except UsageError as exc:
        raise Conflict(f"Job {record.task_id} has a result URL gpuctl cannot fetch: {exc}") from None


@dataclass(frozen=True)
class DownloadTarget:
    """Where a result goes: a file, or a folder in which it is saved as ``<job id>.<ext>``."""

    path: Path
    folder: bool
    overwrite: bool

    def file_for(self, job_id: str, key: str) -> Path:
        if not self.folder:
            return self.path
        return self.path / f"{job_id}{PurePosixPath(key).suffix or '.png'}"


def download_target(dest: str | Path | None, *, overwrite: bool = False) -> DownloadTarget:
    """Where ``-o DEST`` saves a result: an existing folder or a path ending in ``/`` is a folder (created when
    missing), anything else is the file to write. Checked before any network call.

    Raises:
        UsageError: the file exists and ``overwrite`` is not set, or DEST is not somewhere a file can go.
    """
    raw = str(dest) if dest is not None else "."
    path = Path(raw).expanduser()
    folder = raw.endswith(("/", os.sep)) or path.is_dir()
    shown = display(str(path))
    if folder:
        if path.exists() and not path.is_dir():
            raise UsageError(f"{shown} is not a folder.")
        return DownloadTarget(path, True, overwrite)
    if path.exists() and not overwrite:
        raise UsageError(f"{shown} already exists; pass --force to overwrite it.")
    if path.parent.exists() and not path.parent.is_dir():
        raise UsageError(f"{display(str(path.parent))} is not a folder.")
    return DownloadTarget(path, False, overwrite)


def download_result(
    gw: Gateways, job_id: str, dest: DownloadTarget | str | Path | None = None, *,
    on_progress: DownloadProgress | None = None,
) -> ResultFile:
    """Download a completed job's result to ``dest`` (a file, or a folder to put ``<job id>.png`` in; default
    ``.``). A plain path overwrites an existing file; pass a :func:`download_target` to refuse that.

    An ``https://`` result URL (the running system's CDN …) is public: it is downloaded as it is. An ``s3://``
    one is read from the bucket it names. Either way at most ``max_result_mb``, written to ``<file>.part``
    first, so nothing half-written is left under the final name.

    Raises:
        NotFound: no such job, or its result object is gone.
        Conflict: the job has not completed, or its result URL is neither s3:// nor https://.
        UsageError: the file exists (a target made without ``overwrite``), or the result is larger than
            ``max_result_mb``.
        AwsError: S3 refused (access denied, with the bucket named) or the URL could not be reached.
    """
    target = dest if isinstance(dest, DownloadTarget) else download_target(dest, overwrite=True)
    record = _completed(gw, job_id)
    url = record.result_s3_uri or ""
    https = url.startswith("https://")
    bucket, key = ("", unquote(urlparse(url).path)) if https else _result_object(record)
    path = target.file_for(record.task_id, key)
    if path.exists() and not target.overwrite:
        raise UsageError(f"{display(str(path))} already exists; pass --force to overwrite it.")
    max_bytes = int(gw.settings.max_result_mb * 1024 * 1024)
    if https:
        size = _download_https(gw, url, path, max_bytes=max_bytes, on_progress=on_progress)
        return ResultFile(record.task_id, url, path, size)
    try:
        size = gw.store.size(bucket, key)
        if size > max_bytes:
            raise UsageError(_too_large(gw, url))
        callback = None
        if on_progress is not None:
            done = 0

            def callback(n: int) -> None:
                nonlocal done
                done += n
                on_progress(done, size)

        gw.store.download_file(bucket, key, path, on_progress=callback)
    except AwsError as exc:
        raise _access_denied(gw, exc, bucket, key) or exc from None
    return ResultFile(record.task_id, url, path, size)


def _too_large(gw: Gateways, url: str) -> str:
    return (f"The result {url} is larger than max_result_mb ({gw.settings.max_result_mb:g} MB); raise it with "
            "`gpuctl config set max_result_mb N` to download it.")


def _access_denied(gw: Gateways, exc: AwsError, bucket: str, key: str) -> AwsError | None:
    """The sentence for an S3 refusal, naming the bucket (None: not a refusal)."""
    if exc.code not in {"AccessDenied", "403", "AllAccessDisabled"}:
        return None
    configured = gw.settings.bucket
    where = (f"it is in the bucket {bucket}, not this profile's bucket {configured}, and "
             if configured and configured != bucket else "")
    return AwsError(f"Access denied to the result s3://{bucket}/{key} ({exc.code}): {where}your credentials "
                    f"may not read it (s3:GetObject on {bucket}).", code=exc.code)


def _download_https(gw: Gateways, url: str, target: Path, *, max_bytes: int,
                    on_progress: DownloadProgress | None) -> int:
    """Stream a public https:// result into ``target`` (through ``<target>.part``); return its size."""
    import httpx

    from gpuctl.inputs import redact_url

    shown = redact_url(url)

    def https_only(request: httpx.Request) -> None:
        if request.url.scheme != "https":  # a redirect to plain http
            raise UsageError(f"The result URL {shown} redirects to {request.url.scheme}://; gpuctl downloads "
                             "results over https only.")

    settings = gw.settings
    timeout = httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    try:
        with httpx.Client(timeout=timeout, follow_redirects=True, max_redirects=5,
                          event_hooks={"request": [https_only]}) as client, \
                client.stream("GET", url) as response:
            if response.status_code in (401, 403, 404, 410):
                raise NotFound(f"The result {shown} answered HTTP {response.status_code}: it is not there "
                               "(or no longer public).")
            if response.status_code >= 400:
                raise AwsError(f"Cannot download the result {shown}: it answered HTTP {response.status_code}; "
                               "try again shortly.", code=str(response.status_code))
            length = response.headers.get("content-length", "")
            total = int(length) if length.isdigit() else 0
            if total > max_bytes:
                raise UsageError(_too_large(gw, shown))
            done = 0
            with part.open("wb") as fh:
                for chunk in response.iter_bytes():
                    done += len(chunk)
                    if done > max_bytes:
                        raise UsageError(_too_large(gw, shown))
                    fh.write(chunk)
                    if on_progress is not None:
                        on_progress(done, max(total, done))
    except httpx.HTTPError as exc:
        part.unlink(missing_ok=True)
        reason = str(exc).split("\n", 1)[0] or type(exc).__name__
        raise AwsError(f"Cannot download the result {shown}: {reason.rstrip('.')}.", code="Unreachable") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    part.replace(target)
    return done


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
    bucket, key = _result_object(record)
    return gw.store.presign_get(bucket, key, expires=gw.settings.presign_seconds)
