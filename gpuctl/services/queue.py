"""The job queue: its counts, moving dead letters back, and emptying it."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpuctl.aws.sqs import QueueStats, RedriveResult
    from gpuctl.services.context import Gateways

__all__ = ["PURGED_MESSAGE", "purge_queue", "queue_stats", "redrive_dlq"]

log = logging.getLogger(__name__)


def queue_stats(gw: Gateways) -> QueueStats:
    """Visible, in-flight and delayed counts, the dead-letter queue's depth and the max receive count."""
    return gw.queue.stats()


def redrive_dlq(gw: Gateways) -> RedriveResult:
    """Move every message in the dead-letter queue back to the job queue.

    Raises:
        ConfigError: the queue has no dead-letter queue.
    """
    result = gw.queue.redrive()
    log.info("queue.redrive", extra={"moved": result.moved, "method": result.method})
    return result


#: The error a job gets when its message is purged; it can be retried with `gpuctl jobs retry`.
PURGED_MESSAGE = "removed from the queue by `gpuctl queue purge` before it ran"


def purge_queue(gw: Gateways) -> int:
    """Delete every message in the job queue, then end the jobs they carried as ``failed``.

    Every accepted job must end completed or failed; a pending job whose message is gone would stay
    pending forever. Only jobs created before the purge are touched, each with a conditional
    transition, so a job submitted meanwhile, or one a worker has already started, is left alone.
    Returns how many jobs were marked failed.
    """
    from gpuctl.aws.dynamo import TransitionRefused
    from gpuctl.errors import NotFound
    from gpuctl.models import JobStatus

    started = time.time()
    gw.queue.purge()
    failed = 0
    for record in list(gw.table.query_status(JobStatus.PENDING)):
        if record.created_at > started:
            continue
        try:
            gw.table.transition(record.task_id, JobStatus.FAILED, expected={JobStatus.PENDING},
                                fields={"error_message": PURGED_MESSAGE, "finished_at": round(time.time(), 3)})
            failed += 1
        except (TransitionRefused, NotFound):
            continue  # it moved on (or vanished) since the query; nothing to do
    log.info("queue.purged", extra={"queue_url": gw.queue.queue_url, "jobs_failed": failed})
    return failed
