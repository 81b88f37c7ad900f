"""What the adapter does with one SQS message (SPEC §5), from decoding it to deleting it.

1. Decode the body and validate its request (strict types, the same model as the CLI). Anything that fails —
   not JSON, nested too deeply, not an object, unknown ``api_path``, missing fields, a bad request — is poison:
   copied to the dead-letter queue with the reason as a message attribute and deleted, at the first receive;
   a job that is still ``pending`` is failed with that reason.
2. Claim, conditionally and without reading first: ``pending → processing`` (``worker``, ``attempt_token``,
   ``attempts`` + 1, ``heartbeat_at``). A refused claim returns the record as it is, which decides the rest: a
   finished job's message is deleted (a duplicate or late delivery); a job held under a live heartbeat (by
   another worker, or by another thread here) is left to its holder; a ``processing`` job whose heartbeat went
   stale is taken over with an update conditional on that stale value, so only one taker wins.
3. Run on the backend while the heartbeat thread keeps the message invisible, the record fresh and an eye on
   cancel requests.
4. Publish: each attempt uploads its PNG under its own key, ``<results_prefix><job type>/<task_id>/<attempt
   token>.png``, and the ``processing → completed`` transition conditional on that attempt's token is what
   publishes it. An attempt that lost the job (a paused worker that wakes up after another one finished it)
   deletes its own object and nothing else: no attempt can replace or delete a published result. A completing
   write that fails without an answer (it may have landed) is read back and finished for a few seconds before the
   attempt is given up, so a result the GPU made is not thrown away for a brief table outage.
5. Failures: permanent → ``failed`` with the reason at once; cancelled / timed out → ``failed`` "cancelled by
   user" / "timed out after N s" once the backend confirmed the stop; transient → released for another try
   after ``release_delay``, until the job has used ``maxReceiveCount`` attempts, when it is ``failed`` with the
   last error. A transient failure while the backend is down is an outage, not the job's fault: the job is
   released without counting the attempt and the adapter pauses (see ``adapter.loop``). Shutdown releases
   uncounted too, with the record left ``processing`` under ``heartbeat_at`` = 0, so the next receiver takes it
   over at once.

SQS counts every receive against ``maxReceiveCount``. So that the count means one thing — how many times a
worker stopped (crashed, was killed) while holding the message — every hand-back that is not such a stop
(a retry later, an outage, a shutdown, a job held elsewhere) sends a fresh copy of the body (with the delay it
wants) and deletes the received one. On the receive that reaches ``maxReceiveCount``, a job whose holder died is
failed "the adapter stopped N times while running this job" and dead-lettered with that reason, instead of
being taken over again (a worker dying on it once more would leave it ``processing`` for ever, keeping the GPU
up); any other job on such a receive gets a fresh copy first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapter.backends import BackendJob
from adapter.errors import JobInterrupted, StopReason, classify
from adapter.heartbeat import ActiveJob, now
from gpuctl.aws.dynamo import TransitionRefused
from gpuctl.errors import GpuctlError, NotFound, UsageError
from gpuctl.models import CANCEL_MESSAGE, JobMessage, JobRecord, JobRequest, JobStatus

if TYPE_CHECKING:
    from adapter.backends import Backend, BackendResult
    from adapter.heartbeat import Heartbeat
    from adapter.settings import AdapterSettings
    from gpuctl.aws.dynamo import JobTable
    from gpuctl.aws.s3 import ObjectStore
    from gpuctl.aws.sqs import JobQueue, ReceivedMessage

__all__ = ["Claim", "Deps", "MessageHandler", "result_key"]

log = logging.getLogger(__name__)
_CLAIM_TRIES = 3
_MAX_DELAY = 900  # SQS's longest DelaySeconds
#: After the completing write failed without an answer (botocore's own retries spent): look and try again after
#: these pauses, so a result the GPU already made is not thrown away (and the job run again) for a brief outage.
_PUBLISH_RETRY_DELAYS = (0.5, 2.0, 5.0)


@dataclass(frozen=True)
class Deps:
    """Everything the handler talks to, built once in ``adapter.__main__``."""

    settings: AdapterSettings
    table: JobTable
    queue: JobQueue
    store: ObjectStore
    backend: Backend


@dataclass(frozen=True)
class Claim:
    """This attempt's hold on a job: the record as the claim left it, and the attempt's token."""

    record: JobRecord
    token: str


def result_key(results_prefix: str, job_kind: str, task_id: str, token: str) -> str:
    return f"{results_prefix}{job_kind}/{task_id}/{token}.png"


class MessageHandler:
    """Handles one message at a time per calling thread; safe to call from several threads."""

    def __init__(self, deps: Deps, heartbeat: Heartbeat) -> None:
        self._d = deps
        self._s = deps.settings
        self._heartbeat = heartbeat
        self._activity = heartbeat.activity
        self._max_receives: int | None = None
        self._in_hand: set[str] = set()
        self._lock = threading.Lock()
        #: Set when a job found the backend down: the loop stops receiving until it is ready again.
        self.outage = threading.Event()
        self.outage_reason = ""

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

    def hand_back(self, msg: ReceivedMessage) -> None:
        """Give back a message received but not started (shutting down): a fresh copy, uncounted."""
        self._renew(msg, 0)

    def _handle(self, msg: ReceivedMessage) -> str:
        try:
            message = JobMessage.from_json(msg.body)
            request = message.request()
        except UsageError as exc:
            return self._poison(msg, str(exc))
        if self.outage.is_set():
            # Received while the backend is down: hand it back untouched, uncounted.
            self._renew(msg, 0)
            return "released-outage"
        # Reserve the task in this process before claiming it, so a second copy of the message handled
        # by another job thread here cannot mistake our fresh claim for a previous life's.
        with self._lock:
            duplicate = message.task_id in self._in_hand
            self._in_hand.add(message.task_id)
        if duplicate:
            return self._leave(msg, message.task_id, None)
        try:
            claimed = self._claim(msg, message.task_id)
            if not isinstance(claimed, Claim):
                return claimed
            return self._run(msg, message, request, claimed)
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
    def _claim(self, msg: ReceivedMessage, task_id: str) -> Claim | str:
        limit = self._max_receive_count()
        token = secrets.token_hex(4)
        claimed_at = now()
        # started_at: when this attempt took the job (gpuctl cost report measures GPU time from it).
        fields = {"worker": self._s.worker_id, "attempt_token": token, "heartbeat_at": claimed_at,
                  "started_at": claimed_at, "progress": 0.0}
        if self._s.fleet_group and self._s.instance_id:
            fields["instance_id"] = self._s.instance_id  # fleet mode: which instance runs it (adapter.fleet)
        if msg.receive_count >= limit:
            # The last receive SQS allows: never run on it (see the module docstring).
            try:
                return self._last_receive(msg, self._d.table.get(task_id))
            except NotFound:
                return self._poison(msg, f"No job record {task_id} in the table.")
        try:
            record = self._d.table.transition(task_id, JobStatus.PROCESSING, fields=fields,
                                              expected=[JobStatus.PENDING], add={"attempts": 1})
            return Claim(record, token)
        except NotFound:
            return self._poison(msg, f"No job record {task_id} in the table.")
        except TransitionRefused as exc:
            current = exc.current
        for _ in range(_CLAIM_TRIES):
            if current is None:
                return self._poison(msg, f"No job record {task_id} in the table.")
            if current.status.is_finished:
                self._delete(msg)
                log.info("adapter.already_finished", extra={"task_id": task_id, "status": current.status.value})
                return "already-finished"
            if current.status is JobStatus.PENDING:
                expected, condition, values = [JobStatus.PENDING], None, None
            else:
                if self._held_elsewhere(current):
                    return self._leave(msg, task_id, current.worker)
                if _died(current) and current.attempts >= limit:
                    return self._stopped_too_often(msg, current, (
                        f"the adapter stopped while running this job on its last allowed attempt "
                        f"({current.attempts} attempts)"))
                expected = [JobStatus.PROCESSING]
                if current.heartbeat_at is None:
                    condition, values = "attribute_not_exists(heartbeat_at)", {}
                else:
                    condition, values = "heartbeat_at = :stale", {":stale": current.heartbeat_at}
            try:
                record = self._d.table.transition(task_id, JobStatus.PROCESSING, fields=fields, expected=expected,
                                                  condition=condition, condition_values=values,
                                                  add={"attempts": 1})
            except TransitionRefused as exc:
                current = exc.current
                continue
            if current.status is JobStatus.PROCESSING:
                log.warning("adapter.takeover", extra={"task_id": task_id, "from_worker": current.worker,
                                                       "stale_heartbeat_at": current.heartbeat_at,
                                                       "holder_died": _died(current)})
            return Claim(record, token)
        return "claim-contended"

    def _last_receive(self, msg: ReceivedMessage, record: JobRecord) -> str:
        if record.status.is_finished:
            self._delete(msg)
            return "already-finished"
        if record.status is JobStatus.PROCESSING:
            if self._held_elsewhere(record):
                return self._leave(msg, record.task_id, record.worker)
            if _died(record):
                stops = max(1, msg.receive_count - 1)
                return self._stopped_too_often(msg, record, (
                    f"the adapter stopped {stops} time{'s' if stops != 1 else ''} while running this job"))
        self._renew(msg, 0)
        log.info("adapter.message_renewed", extra={"task_id": record.task_id, "receive_count": msg.receive_count})
        return "renewed"

    def _stopped_too_often(self, msg: ReceivedMessage, record: JobRecord, reason: str) -> str:
        """The job's holder died on it again and again: fail it and dead-letter its message, with the reason."""
        try:
            self._d.table.transition(record.task_id, JobStatus.FAILED, expected=[JobStatus.PROCESSING],
                                     condition="heartbeat_at = :stale",
                                     condition_values={":stale": record.heartbeat_at},
                                     fields={"error_message": reason, "finished_at": now()})
        except TransitionRefused as exc:
            current = exc.current  # someone else moved it first (took it over, or finished it)
            if current is not None and current.status.is_finished:
                self._delete(msg)
                return "already-finished"
            return self._leave(msg, record.task_id, current.worker if current else None)
        dlq_id = self._d.queue.send_to_dlq(msg.body, reason=reason)
        self._delete(msg)
        log.warning("adapter.job_stopped_too_often", extra={
            "task_id": record.task_id, "reason": reason, "receive_count": msg.receive_count,
            "attempts": record.attempts, "dlq_message_id": dlq_id})
        return "failed-stopped"

    def _leave(self, msg: ReceivedMessage, task_id: str, worker: str | None) -> str:
        """Leave a job to its holder; look at it again once that holder would have gone stale."""
        self._renew(msg, min(_MAX_DELAY, int(self._s.heartbeat_stale_after) + 1))
        log.info("adapter.held_elsewhere", extra={"task_id": task_id, "worker": worker})
        return "held-elsewhere"

    def _held_elsewhere(self, record: JobRecord) -> bool:
        if record.worker == self._s.worker_id:
            # Ours but not in hand here (in-hand duplicates never get this far): a previous life of ours,
            # e.g. a restart that reused the pid.
            return False
        if not record.heartbeat_at:
            return False
        return time.time() - record.heartbeat_at < self._s.heartbeat_stale_after

    # --- run -----------------------------------------------------------------------------------
    def _run(self, msg: ReceivedMessage, message: JobMessage, request: JobRequest, claim: Claim) -> str:
        task_id = claim.record.task_id
        active = ActiveJob(task_id, msg.receipt_handle, self._s.job_timeout, claim.token,
                           on_backend_job=lambda job_id: self._note_backend_job(claim, job_id))
        log.info("adapter.job_started", extra={"task_id": task_id, "job_type": message.job_type.value,
                                               "attempt": claim.record.attempts, "receive_count": msg.receive_count})
        if claim.record.cancel_requested:
            return self._finish_failed(msg, claim, CANCEL_MESSAGE, None)
        if self._activity is not None:
            self._activity.job_started()
        finished_at: list[float] = []
        try:
            return self._run_backend(msg, message, request, claim, active, finished_at)
        finally:
            if self._activity is not None:
                self._activity.job_ended(finished_at[0] if finished_at else None)

    def _run_backend(self, msg: ReceivedMessage, message: JobMessage, request: JobRequest, claim: Claim,
                     active: ActiveJob, finished_at: list[float]) -> str:
        task_id = claim.record.task_id
        self._heartbeat.register(active)
        key: str | None = None
        try:
            try:
                job = BackendJob(task_id, message, request, claim.token, claim.record.comfy_job_id)
                result = self._d.backend.run(job, active.control)
                executed_at = now()
                if result.image is not None:
                    bucket = self._s.require("bucket")
                    key = result_key(self._s.results_prefix, message.job_type.value, task_id, claim.token)
                    self._d.store.put_bytes(result.image, bucket, key, content_type="image/png")
                    url = self._s.result_url(bucket, key)
                else:
                    url = result.result_uri or ""
            finally:
                self._heartbeat.unregister(task_id)
        except JobInterrupted as exc:
            return self._interrupted(msg, claim, active, exc, finished_at)
        except Exception as exc:
            return self._failed(msg, claim, exc, finished_at)
        return self._publish(msg, claim, url, key, result, finished_at, executed_at)

    def _note_backend_job(self, claim: Claim, job_id: str) -> None:
        try:
            self._d.table.transition(claim.record.task_id, JobStatus.PROCESSING, fields={"comfy_job_id": job_id},
                                     expected=[JobStatus.PROCESSING], condition="attempt_token = :t",
                                     condition_values={":t": claim.token})
        except TransitionRefused:
            raise JobInterrupted(StopReason.LOST, job_id) from None

    def _publish(self, msg: ReceivedMessage, claim: Claim, url: str, key: str | None, result: BackendResult,
                 finished_at: list[float], executed_at: float) -> str:
        """``processing → completed`` under this attempt's token publishes ``url``; a loser deletes its object.

        ``executed_at`` (the backend returned) to ``finished_at`` is the publish stage `gpuctl doctor --canary` shows.
        """
        finished_at.append(now())
        fields = {"result_s3_uri": url, "comfy_job_id": result.backend_job_id, "finished_at": finished_at[0],
                  "executed_at": executed_at, "progress": 1.0}
        try:
            outcome = self._finish(msg, claim, JobStatus.COMPLETED, fields, outcome="completed")
        except GpuctlError as exc:
            recovered = self._publish_again(msg, claim, url, fields, exc)
            if recovered is None:
                # Still unknown whether the write landed: keep the object only if the record names it.
                with contextlib.suppress(GpuctlError):
                    if key is not None and self._d.table.get(claim.record.task_id).result_s3_uri != url:
                        self._delete_object(key)
                raise
            outcome = recovered
        if outcome != "completed":
            finished_at.clear()
            if key is not None:
                self._delete_object(key)
        return outcome

    def _publish_again(self, msg: ReceivedMessage, claim: Claim, url: str, fields: dict[str, Any],
                       error: GpuctlError) -> str | None:
        """The completing write failed without an answer: it may have landed, or not. Read the record and finish
        what is ours; None when it still cannot be known (the message then comes back for another attempt)."""
        task_id = claim.record.task_id
        for delay in _PUBLISH_RETRY_DELAYS:
            log.warning("adapter.publish_retry", extra={"task_id": task_id, "error": str(error), "retry_in_s": delay})
            time.sleep(delay)
            try:
                current = self._d.table.get(task_id)
                if current.status is JobStatus.COMPLETED and current.result_s3_uri == url:
                    # Our write landed; only its answer was lost.
                    self._delete(msg)
                    log.info("adapter.job_completed", extra={"task_id": task_id, **fields, "recovered": True})
                    return "completed"
                return self._finish(msg, claim, JobStatus.COMPLETED, fields, outcome="completed")
            except GpuctlError as exc:
                error = exc
        return None

    def _delete_object(self, key: str) -> None:
        bucket = self._s.require("bucket")
        try:
            self._d.store.delete(bucket, key)
            log.info("adapter.result_withdrawn", extra={"key": key})
        except GpuctlError as exc:
            log.warning("adapter.result_delete_failed", extra={"key": key, "error": str(exc)})

    def _interrupted(self, msg: ReceivedMessage, claim: Claim, active: ActiveJob, exc: JobInterrupted,
                     finished_at: list[float]) -> str:
        task_id = claim.record.task_id
        if exc.reason is StopReason.CANCELLED:
            return self._finish_failed(msg, claim, CANCEL_MESSAGE, exc.backend_job_id, finished_at)
        if exc.reason is StopReason.TIMED_OUT:
            return self._finish_failed(msg, claim, f"timed out after {self._s.job_timeout:g} s",
                                       exc.backend_job_id, finished_at)
        if exc.reason is StopReason.LOST:
            if active.finished_elsewhere:
                self._delete(msg)
            log.warning("adapter.job_abandoned", extra={"task_id": task_id,
                                                        "finished_elsewhere": active.finished_elsewhere})
            return "abandoned"
        # Shutdown: hand the job to the next worker now rather than after the heartbeat goes stale.
        self._release(msg, claim, delay=0, counted=False)
        return "released-shutdown"

    def _failed(self, msg: ReceivedMessage, claim: Claim, exc: Exception, finished_at: list[float]) -> str:
        task_id = claim.record.task_id
        reason = str(exc) or type(exc).__name__
        if classify(exc) == "permanent":
            return self._finish_failed(msg, claim, reason, None, finished_at)
        problem = self._d.backend.alive()
        if problem is not None:
            # Not this job's fault: the backend is down. Hand the job back uncounted and pause.
            self.outage_reason = problem
            self.outage.set()
            log.warning("adapter.outage", extra={"task_id": task_id, "error": reason, "probe": problem})
            self._release(msg, claim, delay=0, counted=False)
            return "released-outage"
        limit = self._max_receive_count()
        if claim.record.attempts >= limit:
            return self._finish_failed(msg, claim, f"{reason} (gave up after {claim.record.attempts} attempts)",
                                       None, finished_at)
        log.warning("adapter.job_retry_later", extra={"task_id": task_id, "error": reason,
                                                      "attempt": claim.record.attempts, "limit": limit})
        self._release(msg, claim, delay=self._s.release_delay, counted=True)
        return "released"

    def _max_receive_count(self) -> int:
        if self._max_receives is None:
            try:
                self._max_receives = self._d.queue.max_receive_count() or self._s.max_receives_fallback
            except GpuctlError:
                return self._s.max_receives_fallback
        return self._max_receives

    def _release(self, msg: ReceivedMessage, claim: Claim, *, delay: int, counted: bool) -> None:
        """Hand the job back: ``heartbeat_at`` = 0 (so the next receiver takes it over at once) and a fresh copy
        of the message; an uncounted release also takes its attempt back."""
        task_id = claim.record.task_id
        try:
            self._d.table.transition(task_id, JobStatus.PROCESSING, fields={"heartbeat_at": 0},
                                     expected=[JobStatus.PROCESSING], condition="attempt_token = :t",
                                     condition_values={":t": claim.token},
                                     add=None if counted else {"attempts": -1})
        except TransitionRefused as exc:
            # No longer ours: another worker holds it (and its message), or it finished.
            if exc.current is not None and exc.current.status.is_finished:
                self._delete(msg)
            log.info("adapter.release_refused", extra={"task_id": task_id})
            return
        self._renew(msg, delay)
        log.info("adapter.message_released", extra={"task_id": task_id, "delay_s": delay, "counted": counted})

    def _renew(self, msg: ReceivedMessage, delay: int) -> None:
        """Replace the received message by a fresh copy (receive count 0), visible after ``delay`` seconds."""
        self._d.queue.send(msg.body, delay_seconds=max(0, min(_MAX_DELAY, delay)))
        self._delete(msg)

    def _delete(self, msg: ReceivedMessage) -> None:
        try:
            self._d.queue.delete(msg.receipt_handle)
        except GpuctlError as exc:  # e.g. a receipt handle made stale by a copy another worker renewed
            log.warning("adapter.delete_failed", extra={"message_id": msg.message_id, "error": str(exc)})

    def _finish_failed(self, msg: ReceivedMessage, claim: Claim, reason: str, backend_job_id: str | None,
                       finished_at: list[float] | None = None) -> str:
        at = now()
        fields: dict[str, Any] = {"error_message": reason, "finished_at": at}
        if backend_job_id:
            fields["comfy_job_id"] = backend_job_id
        outcome = self._finish(msg, claim, JobStatus.FAILED, fields, outcome="failed")
        if finished_at is not None and outcome == "failed":
            finished_at.append(at)
        return outcome

    def _finish(self, msg: ReceivedMessage, claim: Claim, target: JobStatus, fields: dict[str, Any],
                *, outcome: str) -> str:
        task_id = claim.record.task_id
        try:
            self._d.table.transition(task_id, target, fields=fields, expected=[JobStatus.PROCESSING],
                                     condition="attempt_token = :t", condition_values={":t": claim.token})
        except TransitionRefused as exc:
            current = exc.current
            if current is not None and current.status is JobStatus.PROCESSING:
                # Another worker took it over while we were slow: it owns the message now.
                log.warning("adapter.finish_refused", extra={"task_id": task_id, "worker": current.worker})
                return "abandoned"
            log.info("adapter.finish_refused", extra={
                "task_id": task_id, "status": current.status.value if current else None})
            self._delete(msg)
            return "already-finished"
        self._delete(msg)
        level = logging.INFO if target is JobStatus.COMPLETED else logging.WARNING
        log.log(level, f"adapter.job_{target.value}", extra={"task_id": task_id, **fields})
        return outcome


def _died(record: JobRecord) -> bool:
    """A processing record whose worker stopped without handing it back (a release writes ``heartbeat_at`` 0)."""
    return bool(record.heartbeat_at)


def _task_id_of(body: str) -> str | None:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    task_id = data.get("task_id") if isinstance(data, dict) else None
    return task_id if isinstance(task_id, str) and task_id else None
