"""Following jobs to the end: poll their records, report each change, stop when all finish or time runs out.

A CLI client has no push channel, so this polls the record with a consistent GetItem. The interval starts
small (1 s) and grows gently while nothing changes (capped), so a long job costs a few requests a minute;
a change snaps it back. It is a watch loop bounded by a deadline, not a retry loop: AWS errors propagate
(botocore's standard retries already ran).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpuctl.errors import UsageError
from gpuctl.models import JobRecord, JobStatus

if TYPE_CHECKING:
    from gpuctl.aws.dynamo import JobTable

__all__ = ["WatchResult", "check_wait_options", "watch_jobs"]

_GROWTH = 1.5


@dataclass(frozen=True)
class WatchResult:
    """The last record seen of each job (in the order asked), and whether time ran out first."""

    records: list[JobRecord]
    timed_out: bool
    elapsed: float

    @property
    def cancelled(self) -> list[JobRecord]:
        return [r for r in self.records if r.cancelled]

    @property
    def failed(self) -> list[JobRecord]:
        return [r for r in self.records if r.status is JobStatus.FAILED]

    @property
    def unfinished(self) -> list[JobRecord]:
        return [r for r in self.records if not r.status.is_finished]


def _signature(record: JobRecord) -> tuple[Any, ...]:
    # What a watcher cares about; heartbeats alone (updated_at) are not a change.
    return (record.status, record.progress, record.result_s3_uri, record.error_message,
            record.cancel_requested)


def check_wait_options(timeout: float | None, interval: float = 1.0, max_interval: float = 5.0) -> None:
    """``--timeout`` and ``--interval`` as a wait needs them: positive, finite numbers.

    Raises:
        UsageError: naming the option.
    """
    if not math.isfinite(interval) or interval <= 0 or max_interval < interval:
        raise UsageError(f"--interval must be a positive number of seconds, at most {max_interval:g}.")
    if timeout is not None and (not math.isfinite(timeout) or timeout <= 0):
        raise UsageError("--timeout must be a positive number of seconds.")


def watch_jobs(
    table: JobTable,
    job_ids: Sequence[str],
    *,
    on_change: Callable[[JobRecord], None],
    on_poll: Callable[[], None] | None = None,
    timeout: float | None = None,
    interval: float = 1.0,
    max_interval: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> WatchResult:
    """Poll each unfinished job until all have finished or ``timeout`` seconds have passed.

    ``on_change`` is called with the first record of every job, then whenever its status, progress,
    result or error changes; ``on_poll`` (if given) after every round of reads that leaves a job unfinished.

    Raises:
        UsageError: a malformed job id, a non-positive interval or timeout.
        NotFound: a job does not exist (checked on the first poll).
    """
    from gpuctl.services.jobs import parse_job_id

    check_wait_options(timeout, interval, max_interval)
    ids = list(dict.fromkeys(parse_job_id(j) for j in job_ids))
    start = clock()
    deadline = None if timeout is None else start + timeout
    seen: dict[str, tuple[Any, ...]] = {}
    latest: dict[str, JobRecord] = {}
    wait = interval
    while True:
        changed = False
        for task_id in ids:
            if task_id in latest and latest[task_id].status.is_finished:
                continue
            record = table.get(task_id)
            latest[task_id] = record
            signature = _signature(record)
            if seen.get(task_id) != signature:
                seen[task_id] = signature
                changed = True
                on_change(record)
        now = clock()
        if all(r.status.is_finished for r in latest.values()):
            return WatchResult([latest[i] for i in ids], False, now - start)
        if deadline is not None and now >= deadline:
            return WatchResult([latest[i] for i in ids], True, now - start)
        if on_poll is not None:
            on_poll()
        wait = interval if changed else min(wait * _GROWTH, max_interval)
        sleep(wait if deadline is None else max(0.0, min(wait, deadline - now)))
