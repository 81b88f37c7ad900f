"""What the adapter does with one SQS message (SPEC §5), from decoding it to deleting it.

1. Decode. A poison message (not JSON, not an object, unknown ``api_path``, missing fields) is copied to
   the dead-letter queue with the reason as a message attribute and deleted here, so the loop never sees
   it again and an operator still can; when it names a job that is still open, the job is failed with that
   reason. Without a dead-letter queue it is logged and deleted.
2. Claim, conditionally: ``pending → processing`` (``worker``, ``attempts`` + 1, ``heartbeat_at``). A
   finished job: delete the message (a duplicate or late delivery). A second copy of a message whose job
   is in hand in this process, or processing under another worker's live heartbeat: leave the message
   (it comes back once that holder would have gone stale, by which time it has finished or died).
   Processing under a stale heartbeat: that worker crashed; take it over with an update conditional on
   the stale ``heartbeat_at`` value, so only one taker wins.
3. Run on the backend while the heartbeat thread keeps the message invisible and the record fresh.
4. Publish: upload the PNG to ``s3://<bucket>/<results_prefix><job-type>/<task_id>.png``; the URL is the
   CDN URL when one is configured. ``processing → completed`` (conditional on this worker), delete.
5. Failures: permanent → ``failed`` with the reason at once; transient → the message is released after a
   short delay, or, on its last allowed receive (the queue's ``maxReceiveCount``), ``failed`` with the
   last error; cancelled / timed out → ``failed`` "cancelled by user" / "timed out after N s"; shutdown → the
   message is released at once and the record keeps ``processing`` with ``heartbeat_at`` = 0, i.e. stale,
   so the next receiver takes it over immediately.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapter.backends import BackendJob
from adapter.errors import JobInterrupted, StopReason, classify
from adapter.heartbeat import ActiveJob, now
from gpuctl.aws.dynamo import TransitionRefused
from gpuctl.errors import GpuctlError, NotFound, UsageError
from gpuctl.models import JobMessage, JobRecord, JobStatus

if TYPE_CHECKING:
    from adapter.backends import Backend
    from adapter.heartbeat import Heartbeat
    from adapter.settings import AdapterSettings
    from gpuctl.aws.dynamo import JobTable
    from gpuctl.aws.s3 import ObjectStore
    from gpuctl.aws.sqs import JobQueue, ReceivedMessage

__all__ = ["Deps", "MessageHandler", "result_key"]

log = logging.getLogger(__name__)
_CLAIM_TRIES = 3


@dataclass(frozen=True)
class Deps:
    """Everything the handler talks to, built once in ``adapter.__main__``."""

    settings: AdapterSettings
    table: JobTable
    queue: JobQueue
    store: ObjectStore
    backend: Backend


def result_key(results_prefix: str, job_kind: str, task_id: str) -> str:
    return f"{results_prefix}{job_kind}/{task_id}.png"


class MessageHandler:
    """Handles one message at a time per calling thread; safe to call from several threads."""

    def __init__(self, deps: Deps, heartbeat: Heartbeat) -> None:
        self._d = deps
        self._s = deps.settings
        self._heartbeat = heartbeat
        self._max_receives: int | None = None
        self._in_hand: set[str] = set()
        self._lock = threading.Lock()

    # --- entry point ---------------------------------------------------------------------------
    def handle(self, msg: ReceivedMessage) -> str:
        """Process one message; return what happened (for logs and tests). Never raises."""
        started = time.monotonic()
        try:
            outcome = self._handle(msg)
        except Exception as exc:  # the loop must go on; the message comes back after its visibility timeout
            log.exception("adapter.message_error", extra={"message_id": msg.message_id, "error": repr(exc)})
            outcome = "error"
        log.info("adapter.message_done", extra={
            "message_id": msg.message_id, "outcome": outcome,
            "duration_ms": round((time.monotonic() - started) * 1000)})
        return outcome

    def _handle(self, msg: ReceivedMessage) -> str:
        try:
            message = JobMessage.from_json(msg.body)
        except UsageError as exc:
            return self._poison(msg, str(exc))
        # Right away: the queue's own visibility timeout may be shorter than the claim takes.
        self._d.queue.change_visibility(msg.receipt_handle, self._s.visibility_extension)
        try:
            record = self._d.table.get(message.task_id)
        except NotFound:
            return self._poison(msg, f"No job record {message.task_id} in the table.")
        # Reserve the task in this process before claiming it, so a second copy of the message handled
        # by another job thread here cannot mistake our fresh claim for a previous life's.
        with self._lock:
            duplicate = message.task_id in self._in_hand
            self._in_hand.add(message.task_id)
        if duplicate:
            return self._leave(msg, record)
        try:
            claimed = self._claim(msg, record)
            if not isinstance(claimed, JobRecord):
                return claimed
            return self._run(msg, message, claimed)
        finally:
            with self._lock:
                self._in_hand.discard(message.task_id)

    # --- poison --------------------------------------------------------------------------------
    def _poison(self, msg: ReceivedMessage, reason: str) -> str:
        task_id = _task_id_of(msg.body)
        if task_id:
            self._fail_open_job(task_id, reason)
        dlq_id = self._d.queue.send_to_dlq(msg.body, reason=reason)
        self._d.queue.delete(msg.receipt_handle)
        log.warning("adapter.poison_message", extra={
            "message_id": msg.message_id, "reason": reason, "task_id": task_id, "dlq_message_id": dlq_id})
        return "poison"

    def _fail_open_job(self, task_id: str, reason: str) -> None:
        # Only a pending job: a processing one is in the hands of a worker with a valid message.
        with contextlib.suppress(TransitionRefused, NotFound):  # nothing open to fail
            self._d.table.transition(task_id, JobStatus.FAILED, expected=[JobStatus.PENDING],
                                     fields={"error_message": reason, "finished_at": now()})

    # --- claim ---------------------------------------------------------------------------------
    def _claim(self, msg: ReceivedMessage, record: JobRecord) -> JobRecord | str:
        me = self._s.worker_id
        for _ in range(_CLAIM_TRIES):
            if record.status.is_finished:
                self._d.queue.delete(msg.receipt_handle)
                log.info("adapter.already_finished", extra={"task_id": record.task_id,
                                                            "status": record.status.value})
                return "already-finished"
            fields = {"worker": me, "attempts": record.attempts + 1, "heartbeat_at": now(), "progress": 0.0}
            try:
                if record.status is JobStatus.PENDING:
                    return self._d.table.transition(record.task_id, JobStatus.PROCESSING, fields=fields,
                                                    expected=[JobStatus.PENDING])
                if self._held_elsewhere(record):
                    return self._leave(msg, record)
                if record.heartbeat_at is None:
                    condition, values = "attribute_not_exists(heartbeat_at)", {}
                else:
                    condition, values = "heartbeat_at = :stale", {":stale": record.heartbeat_at}
                taken = self._d.table.transition(record.task_id, JobStatus.PROCESSING, fields=fields,
                                                 expected=[JobStatus.PROCESSING], condition=condition,
                                                 condition_values=values)
                log.warning("adapter.takeover", extra={"task_id": record.task_id, "from_worker": record.worker,
                                                       "stale_heartbeat_at": record.heartbeat_at})
                return taken
            except TransitionRefused as exc:
                if exc.current is None:
                    return self._poison(msg, f"No job record {record.task_id} in the table.")
                record = exc.current
        return "claim-contended"

    def _leave(self, msg: ReceivedMessage, record: JobRecord) -> str:
        """Leave a job to its holder; look at the message again once that holder would have gone stale."""
        self._d.queue.change_visibility(msg.receipt_handle, int(self._s.heartbeat_stale_after) + 1)
        log.info("adapter.held_elsewhere", extra={"task_id": record.task_id, "worker": record.worker})
        return "held-elsewhere"

    def _held_elsewhere(self, record: JobRecord) -> bool:
        if record.worker == self._s.worker_id:
            # Ours but not in hand here (in-hand duplicates never get this far): a previous life of ours,
            # e.g. a restart that reused the pid.
            return False
        if record.heartbeat_at is None:
            return False
        return time.time() - record.heartbeat_at < self._s.heartbeat_stale_after

    # --- run -----------------------------------------------------------------------------------
    def _run(self, msg: ReceivedMessage, message: JobMessage, record: JobRecord) -> str:
        task_id = record.task_id
        active = ActiveJob(task_id, msg.receipt_handle, self._s.job_timeout)
        control = active.control
        log.info("adapter.job_started", extra={"task_id": task_id, "job_type": message.job_type.value,
                                               "attempt": record.attempts, "receive_count": msg.receive_count})
        if record.cancel_requested:
            return self._finish_failed(msg, task_id, _cancel_message(), None)
        self._heartbeat.register(active)
        try:
            try:
                request = message.request()
                result = self._d.backend.run(BackendJob(task_id, message, request), control)
                if result.image is not None:
                    bucket = self._s.require("bucket")
                    key = result_key(self._s.results_prefix, message.job_type.value, task_id)
                    self._d.store.put_bytes(result.image, bucket, key, content_type="image/png")
                    url = self._s.result_url(bucket, key)
                else:
                    url = result.result_uri or ""
            finally:
                self._heartbeat.unregister(task_id)
        except JobInterrupted as exc:
            return self._interrupted(msg, active, exc)
        except Exception as exc:
            return self._failed(msg, task_id, exc)
        return self._finish(msg, task_id, JobStatus.COMPLETED, {
            "result_s3_uri": url, "comfy_job_id": result.backend_job_id, "finished_at": now(),
            "progress": 1.0,
        }, outcome="completed")

    def _interrupted(self, msg: ReceivedMessage, active: ActiveJob, exc: JobInterrupted) -> str:
        task_id = active.task_id
        if exc.reason is StopReason.CANCELLED:
            return self._finish_failed(msg, task_id, _cancel_message(), exc.backend_job_id)
        if exc.reason is StopReason.TIMED_OUT:
            return self._finish_failed(msg, task_id, f"timed out after {self._s.job_timeout:g} s",
                                       exc.backend_job_id)
        if exc.reason is StopReason.LOST:
            if active.finished_elsewhere:
                self._d.queue.delete(msg.receipt_handle)
            log.warning("adapter.job_abandoned", extra={"task_id": task_id,
                                                        "finished_elsewhere": active.finished_elsewhere})
            return "abandoned"
        # Shutdown: hand the job to the next worker now rather than after the heartbeat goes stale.
        self._release(msg, task_id, delay=0)
        return "released-shutdown"

    def _failed(self, msg: ReceivedMessage, task_id: str, exc: Exception) -> str:
        reason = str(exc) or type(exc).__name__
        if classify(exc) == "permanent":
            return self._finish_failed(msg, task_id, reason, None)
        limit = self._max_receive_count()
        if msg.receive_count >= limit:
            return self._finish_failed(msg, task_id, f"{reason} (gave up after {msg.receive_count} attempts)",
                                       None)
        log.warning("adapter.job_retry_later", extra={"task_id": task_id, "error": reason,
                                                      "receive_count": msg.receive_count, "limit": limit})
        self._release(msg, task_id, delay=self._s.release_delay)
        return "released"

    def _max_receive_count(self) -> int:
        if self._max_receives is None:
            try:
                self._max_receives = self._d.queue.max_receive_count() or self._s.max_receives_fallback
            except GpuctlError:
                return self._s.max_receives_fallback
        return self._max_receives

    def _release(self, msg: ReceivedMessage, task_id: str, *, delay: int) -> None:
        with contextlib.suppress(TransitionRefused):  # no longer ours: nothing to hand over
            self._d.table.transition(task_id, JobStatus.PROCESSING, fields={"heartbeat_at": 0},
                                     expected=[JobStatus.PROCESSING], condition="worker = :me",
                                     condition_values={":me": self._s.worker_id})
        self._d.queue.change_visibility(msg.receipt_handle, delay)
        log.info("adapter.message_released", extra={"task_id": task_id, "delay_s": delay})

    def _finish_failed(self, msg: ReceivedMessage, task_id: str, reason: str, backend_job_id: str | None) -> str:
        fields: dict[str, Any] = {"error_message": reason, "finished_at": now()}
        if backend_job_id:
            fields["comfy_job_id"] = backend_job_id
        return self._finish(msg, task_id, JobStatus.FAILED, fields, outcome="failed")

    def _finish(self, msg: ReceivedMessage, task_id: str, target: JobStatus, fields: dict[str, Any],
                *, outcome: str) -> str:
        try:
            self._d.table.transition(task_id, target, fields=fields, expected=[JobStatus.PROCESSING],
                                     condition="worker = :me", condition_values={":me": self._s.worker_id})
        except TransitionRefused as exc:
            current = exc.current
            if current is not None and current.status is JobStatus.PROCESSING:
                # Another worker took it over while we were slow: it owns the message now.
                log.warning("adapter.finish_refused", extra={"task_id": task_id, "worker": current.worker})
                return "abandoned"
            log.info("adapter.finish_refused", extra={
                "task_id": task_id, "status": current.status.value if current else None})
            self._d.queue.delete(msg.receipt_handle)
            return "already-finished"
        self._d.queue.delete(msg.receipt_handle)
        level = logging.INFO if target is JobStatus.COMPLETED else logging.WARNING
        log.log(level, f"adapter.job_{target.value}", extra={"task_id": task_id, **fields})
        return outcome


def _cancel_message() -> str:
    """The same words `gpuctl jobs cancel` writes for a pending job ("cancelled" is what clients look for)."""
    from gpuctl.models import CANCEL_MESSAGE

    return CANCEL_MESSAGE


def _task_id_of(body: str) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    task_id = data.get("task_id") if isinstance(data, dict) else None
    return task_id if isinstance(task_id, str) and task_id else None
