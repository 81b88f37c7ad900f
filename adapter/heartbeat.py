"""One thread that keeps every running job alive: message visibility, ``heartbeat_at``, ``progress``.

Each tick it looks at the jobs in hand. A job whose heartbeat is due gets its message's visibility
extended and ``heartbeat_at`` refreshed; a job whose progress changed gets it written, at most once a
second. Every write is conditional on the record still being ``processing`` under this worker, and the
record it returns is how a cancel request (``cancel_requested``, set by ``gpuctl jobs cancel``) or a lost
claim is noticed: the job's :class:`JobControl` is interrupted.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from adapter.errors import StopReason
from gpuctl.aws.dynamo import TransitionRefused
from gpuctl.errors import GpuctlError
from gpuctl.models import JobStatus

if TYPE_CHECKING:
    from adapter.settings import AdapterSettings
    from gpuctl.aws.dynamo import JobTable
    from gpuctl.aws.sqs import JobQueue

__all__ = ["ActiveJob", "Heartbeat", "now"]

log = logging.getLogger(__name__)
_PROGRESS_MIN_INTERVAL = 1.0


def now() -> float:
    """Epoch seconds, rounded as gpuctl's gateways write them (so conditions on them compare equal)."""
    return round(time.time(), 3)


class ActiveJob:
    """A job in hand: its message, its control and the progress waiting to be written."""

    def __init__(self, task_id: str, receipt_handle: str, timeout_s: float) -> None:
        from adapter.backends import JobControl

        self.task_id = task_id
        self.receipt_handle = receipt_handle
        self.control: JobControl = JobControl(timeout_s, on_progress=self.set_progress)
        self.progress = 0.0
        self.written_progress = 0.0
        self.last_write = 0.0
        self.last_heartbeat = time.monotonic()
        self.finished_elsewhere = False

    def set_progress(self, value: float) -> None:
        self.progress = max(self.progress, round(value, 3))


class Heartbeat(threading.Thread):
    """The heartbeat thread (start it once; ``stop()`` at shutdown)."""

    def __init__(self, settings: AdapterSettings, table: JobTable, queue: JobQueue) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self._settings = settings
        self._table = table
        self._queue = queue
        self._jobs: dict[str, ActiveJob] = {}
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def register(self, job: ActiveJob) -> None:
        with self._lock:
            self._jobs[job.task_id] = job

    def unregister(self, task_id: str) -> None:
        with self._lock:
            self._jobs.pop(task_id, None)

    def active(self) -> list[ActiveJob]:
        with self._lock:
            return list(self._jobs.values())

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        tick = min(_PROGRESS_MIN_INTERVAL, self._settings.heartbeat_interval / 2)
        while not self._halt.wait(tick):
            for job in self.active():
                try:
                    self.beat(job)
                except Exception:  # the heartbeat must outlive any one bad beat; the next tick retries
                    log.exception("adapter.heartbeat_error", extra={"task_id": job.task_id})

    def beat(self, job: ActiveJob) -> None:
        """Extend visibility and write the heartbeat/progress of one job, when due."""
        mono = time.monotonic()
        heartbeat_due = mono - job.last_heartbeat >= self._settings.heartbeat_interval
        progress = job.progress
        progress_due = progress != job.written_progress and mono - job.last_write >= _PROGRESS_MIN_INTERVAL
        if not (heartbeat_due or progress_due):
            return
        if heartbeat_due:
            try:
                self._queue.change_visibility(job.receipt_handle, self._settings.visibility_extension)
            except GpuctlError as exc:
                log.warning("adapter.visibility_extend_failed", extra={"task_id": job.task_id, "error": str(exc)})
        try:
            record = self._table.transition(
                job.task_id, JobStatus.PROCESSING,
                fields={"heartbeat_at": now(), "progress": progress},
                expected=[JobStatus.PROCESSING],
                condition="worker = :me", condition_values={":me": self._settings.worker_id},
            )
        except TransitionRefused as exc:
            with self._lock:
                still_ours = self._jobs.get(job.task_id) is job
            if not still_ours:
                # The job thread finished and unregistered it between our snapshot and this write:
                # the refusal is our own completion, not a lost claim.
                return
            current = exc.current
            job.finished_elsewhere = current is None or current.status.is_finished
            log.warning("adapter.claim_lost", extra={
                "task_id": job.task_id, "status": current.status.value if current else None,
                "worker": current.worker if current else None})
            job.control.interrupt(StopReason.LOST)
            return
        except GpuctlError as exc:
            log.warning("adapter.heartbeat_failed", extra={"task_id": job.task_id, "error": str(exc)})
            return
        job.written_progress = progress
        job.last_write = mono
        if heartbeat_due:
            job.last_heartbeat = mono
        if record.cancel_requested:
            log.info("adapter.cancel_noticed", extra={"task_id": job.task_id})
            job.control.interrupt(StopReason.CANCELLED)
