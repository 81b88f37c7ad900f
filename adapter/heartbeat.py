"""One thread that keeps every running job alive and watched: message visibility, ``heartbeat_at``, ``progress``,
cancel requests; and the adapter's own entry in the activity marker.

Each tick (at most a second apart) it looks at the jobs in hand:

* a job whose heartbeat is due gets its message's visibility extended and ``heartbeat_at`` refreshed;
* otherwise, a job whose progress changed gets it written, at most every ``cancel_check_interval``;
* otherwise, a job whose record nobody read for ``cancel_check_interval`` gets it read (one GetItem).

Every write is conditional on the record still belonging to this attempt (``attempt_token``), and the record
each of these returns is how a cancel request (``cancel_requested``, set by ``gpuctl jobs cancel``) or a lost
claim is noticed: the job's :class:`JobControl` is interrupted. A job shorter than ``cancel_check_interval``
costs no request here at all; a longer one costs one every ``cancel_check_interval`` seconds (see BENCHMARKS.md).

The activity marker (:class:`ActivityReporter`) is written from the same thread, never on a job's path: at most
every ``activity_interval`` seconds while the adapter polls, as soon as that allows after a job ends and nothing
is in hand (carrying ``last_finished_at``), and at once for ``draining`` and ``stopped``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from adapter.errors import StopReason
from gpuctl.aws.dynamo import TransitionRefused
from gpuctl.errors import GpuctlError, NotFound
from gpuctl.models import JobStatus

if TYPE_CHECKING:
    from adapter.fleet import FleetMember
    from adapter.settings import AdapterSettings
    from gpuctl.aws.dynamo import JobTable
    from gpuctl.aws.sqs import JobQueue
    from gpuctl.models import JobRecord

__all__ = ["ActiveJob", "ActivityReporter", "Heartbeat", "now"]

log = logging.getLogger(__name__)


def now() -> float:
    """Epoch seconds, rounded as gpuctl's gateways write them (so conditions on them compare equal)."""
    return round(time.time(), 3)


class ActiveJob:
    """A job in hand: its message, this attempt's token, its control and the progress waiting to be written."""

    def __init__(self, task_id: str, receipt_handle: str, timeout_s: float, token: str,
                 on_backend_job: Callable[[str], None] | None = None) -> None:
        from adapter.backends import JobControl

        self.task_id = task_id
        self.receipt_handle = receipt_handle
        self.token = token
        self.control: JobControl = JobControl(timeout_s, on_progress=self.set_progress,
                                              on_backend_job=on_backend_job)
        self.progress = 0.0
        self.written_progress = 0.0
        mono = time.monotonic()
        self.last_record = mono  # the claim itself read the record
        self.last_heartbeat = mono
        self.finished_elsewhere = False

    def set_progress(self, value: float) -> None:
        self.progress = max(self.progress, round(value, 3))


class ActivityReporter:
    """The adapter's part of the activity marker, coalesced: see the module docstring."""

    def __init__(self, settings: AdapterSettings, table: JobTable) -> None:
        self._settings = settings
        self._table = table
        self._lock = threading.Lock()
        self._in_hand = 0
        self._finished_at: float | None = None
        self._last_write = float("-inf")
        self._state = "running"

    def job_started(self) -> None:
        with self._lock:
            self._in_hand += 1

    def job_ended(self, finished_at: float | None) -> None:
        with self._lock:
            self._in_hand = max(0, self._in_hand - 1)
            if finished_at is not None:
                self._finished_at = max(finished_at, self._finished_at or 0.0)

    def tick(self) -> None:
        """Write ``running`` (jobs in hand, the latest finish) when ``activity_interval`` has passed."""
        with self._lock:
            if self._state != "running" or time.monotonic() - self._last_write < self._settings.activity_interval:
                return
            self._last_write = time.monotonic()
            in_hand, finished = self._in_hand, self._finished_at
        self._write("running", in_hand, finished)

    def report(self, state: str) -> None:
        """Write ``draining`` or ``stopped`` now (each once; ``running`` is never written again after them)."""
        with self._lock:
            if self._state == state:
                return
            self._state = state
            self._last_write = time.monotonic()
            in_hand, finished = self._in_hand, self._finished_at
        self._write(state, in_hand, finished)

    def _write(self, state: str, in_hand: int, finished_at: float | None) -> None:
        try:
            self._table.note_adapter(self._settings.worker_id, state=state, jobs_in_hand=in_hand,
                                     finished_at=finished_at)
        except GpuctlError as exc:  # liveness only: the next tick tries again
            log.warning("adapter.activity_failed", extra={"error": str(exc)})
            with self._lock:
                self._last_write = float("-inf") if state == "running" else self._last_write


class Heartbeat(threading.Thread):
    """The heartbeat thread (start it once; ``stop()`` at shutdown)."""

    def __init__(self, settings: AdapterSettings, table: JobTable, queue: JobQueue,
                 activity: ActivityReporter | None = None, stopping: threading.Event | None = None,
                 member: FleetMember | None = None) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self._stopping = stopping
        self._settings = settings
        self._table = table
        self._queue = queue
        self.activity = activity
        self.member = member  # fleet mode: scale-in protection and drain (adapter.fleet)
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
        tick = min(0.5, self._settings.heartbeat_interval / 2, self._settings.cancel_check_interval / 2)
        while not self._halt.wait(tick):
            for job in self.active():
                try:
                    self.beat(job)
                except Exception:  # the heartbeat must outlive any one bad beat; the next tick retries
                    log.exception("adapter.heartbeat_error", extra={"task_id": job.task_id})
            if self.activity is not None:
                if self._stopping is not None and self._stopping.is_set():
                    self.activity.report("draining")  # at once, not after the long poll in progress returns
                self.activity.tick()
            if self.member is not None:
                self.member.tick(len(self.active()))

    def beat(self, job: ActiveJob) -> None:
        """Extend visibility, write heartbeat/progress or read the record of one job, when due."""
        mono = time.monotonic()
        settings = self._settings
        heartbeat_due = mono - job.last_heartbeat >= settings.heartbeat_interval
        record_due = mono - job.last_record >= settings.cancel_check_interval
        progress = job.progress
        if not (heartbeat_due or record_due):
            return
        if heartbeat_due:
            try:
                self._queue.change_visibility(job.receipt_handle, settings.visibility_extension)
            except GpuctlError as exc:
                log.warning("adapter.visibility_extend_failed", extra={"task_id": job.task_id, "error": str(exc)})
        try:
            if heartbeat_due or progress != job.written_progress:
                fields = {"progress": progress, **({"heartbeat_at": now()} if heartbeat_due else {})}
                record = self._table.transition(
                    job.task_id, JobStatus.PROCESSING, fields=fields, expected=[JobStatus.PROCESSING],
                    condition="attempt_token = :t", condition_values={":t": job.token},
                )
                job.written_progress = progress
            else:
                record = self._table.get(job.task_id)
                if record.status is not JobStatus.PROCESSING or record.worker != settings.worker_id:
                    raise TransitionRefused(job.task_id, JobStatus.PROCESSING, record)
        except (TransitionRefused, NotFound) as exc:
            self._lost(job, exc.current if isinstance(exc, TransitionRefused) else None)
            return
        except GpuctlError as exc:
            log.warning("adapter.heartbeat_failed", extra={"task_id": job.task_id, "error": str(exc)})
            return
        job.last_record = mono
        if heartbeat_due:
            job.last_heartbeat = mono
        if record.cancel_requested:
            log.info("adapter.cancel_noticed", extra={"task_id": job.task_id})
            job.control.interrupt(StopReason.CANCELLED)

    def _lost(self, job: ActiveJob, current: JobRecord | None) -> None:
        with self._lock:
            still_ours = self._jobs.get(job.task_id) is job
        if not still_ours:
            # The job thread finished and unregistered it between our snapshot and this write:
            # the refusal is our own completion, not a lost claim.
            return
        job.finished_elsewhere = current is None or current.status.is_finished
        log.warning("adapter.claim_lost", extra={
            "task_id": job.task_id, "status": current.status.value if current else None,
            "worker": current.worker if current else None})
        job.control.interrupt(StopReason.LOST)
