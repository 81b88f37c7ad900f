"""The adapter's main loop (style R13): long-poll, hand messages to job threads, pause in outages, stop cleanly.

* It waits for the backend to be ready (models included, see ``gpuctl adapter check``) before the first poll.
* It never takes more messages than it has free job slots (``GPUCTL_INFLIGHT``, default 2), so a second
  job can be uploaded and queued on ComfyUI while the first one runs on the GPU. Each receive makes its messages
  invisible for ``visibility_extension`` seconds, so no separate visibility change is needed before the claim.
* Outage: when a job finds the backend down (``MessageHandler.outage``), the loop stops receiving, waits for the
  backend to be ready again — for as long as it takes — and resumes. The jobs in hand hand themselves back
  uncounted as they notice, and so does any message received meanwhile.
* ``stop`` (SIGTERM/SIGINT) ends polling; a message received after it is handed back at once. The jobs in
  hand get ``shutdown_grace`` seconds to finish; then they are interrupted and their messages released
  (see ``adapter.handlers``), and the loop returns.
* The activity marker says ``running`` while it polls, ``draining`` from SIGTERM on and ``stopped`` at the end.
* Fleet mode (``fleet_group``): scale-in protection while it holds work, and a scale-in of its instance drains it
  like SIGTERM, then completes the lifecycle action (``adapter.fleet``).
"""

from __future__ import annotations

import logging
import math
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

from adapter.backends import BackendNotReady, wait_until_ready
from adapter.errors import StopReason
from adapter.fleet import start_member
from adapter.handlers import MessageHandler
from adapter.heartbeat import ActivityReporter, Heartbeat
from gpuctl.errors import GpuctlError

if TYPE_CHECKING:
    from adapter.handlers import Deps
    from gpuctl.aws.sqs import ReceivedMessage

__all__ = ["run"]

log = logging.getLogger(__name__)
_AFTER_INTERRUPT_WAIT = 30.0
_MAX_ERROR_BACKOFF = 30.0


def run(deps: Deps, stop: threading.Event) -> int:
    """Serve the queue until ``stop`` is set; return the process exit code."""
    settings = deps.settings
    try:
        member = start_member(settings, stop)
    except GpuctlError as exc:
        log.error("adapter.config_error", extra={"error": str(exc)})
        return 2
    if member is not None and member.scaled_in_already():
        return 0  # restarted while its instance is being scaled in: no new work on an instance that is going
    what = f"the {settings.backend.value} backend at {settings.base_url}"
    try:
        report = wait_until_ready(deps.backend, stop, what=what, timeout=settings.ready_timeout,
                                  log_event="adapter.waiting_for_backend")
    except BackendNotReady as exc:
        if stop.is_set():
            return 0
        log.error("adapter.backend_not_ready", extra={
            "error": str(exc), "problems": list(exc.report.problems) if exc.report else []})
        return 1
    log.info("adapter.backend_ready", extra={**report.to_dict()})
    activity = ActivityReporter(settings, deps.table)
    heartbeat = Heartbeat(settings, deps.table, deps.queue, activity, stop, member)
    heartbeat.start()
    handler = MessageHandler(deps, heartbeat)
    log.info("adapter.started", extra={"worker": settings.worker_id, "backend": settings.backend.value,
                                       "inflight": settings.inflight, "queue_url": deps.queue.queue_url})
    jobs: set[Future[str]] = set()
    backoff = 1.0
    pool = ThreadPoolExecutor(max_workers=settings.inflight, thread_name_prefix="job")
    while not stop.is_set():
        jobs = {f for f in jobs if not f.done()}
        if handler.outage.is_set():
            _pause(deps, handler, stop, what)
            continue
        free = settings.inflight - len(jobs)
        if free <= 0:
            wait(jobs, timeout=1.0, return_when=FIRST_COMPLETED)
            continue
        try:
            messages = deps.queue.receive(max_messages=min(10, free), wait_seconds=settings.poll_wait,
                                          visibility_timeout=settings.visibility_extension)
        except GpuctlError as exc:
            log.warning("adapter.receive_failed", extra={"error": str(exc), "retry_in_s": backoff})
            stop.wait(backoff)
            backoff = min(backoff * 2, _MAX_ERROR_BACKOFF)
            continue
        backoff = 1.0
        if stop.is_set():
            _hand_back(handler, messages)
            break
        for message in messages:
            jobs.add(pool.submit(handler.handle, message))
    activity.report("draining")
    _drain(jobs, heartbeat, settings.shutdown_grace)
    # Never block on a job thread that ignored its interrupt; __main__ deals with leftovers.
    pool.shutdown(wait=False, cancel_futures=True)
    heartbeat.stop()
    if member is not None:
        member.after_drain()
    activity.report("stopped")
    log.info("adapter.stopped", extra={"worker": settings.worker_id})
    return 0


def _pause(deps: Deps, handler: MessageHandler, stop: threading.Event, what: str) -> None:
    """Receive nothing until the backend is ready again (no time limit: an outage is waited out)."""
    log.warning("adapter.paused", extra={"reason": handler.outage_reason})
    try:
        wait_until_ready(deps.backend, stop, what=what, timeout=math.inf, log_event="adapter.outage_waiting")
    except BackendNotReady as exc:
        if not stop.is_set():
            log.error("adapter.outage_not_recoverable", extra={"error": str(exc)})
            stop.set()  # e.g. node classes gone after a ComfyUI update: waiting will not help
        return
    handler.outage.clear()
    log.info("adapter.resumed")


def _hand_back(handler: MessageHandler, messages: list[ReceivedMessage]) -> None:
    for message in messages:
        try:
            handler.hand_back(message)
        except GpuctlError as exc:
            log.warning("adapter.release_failed", extra={"message_id": message.message_id, "error": str(exc)})


def _drain(jobs: set[Future[str]], heartbeat: Heartbeat, grace: float) -> None:
    """Let the jobs in hand finish within ``grace`` seconds, then interrupt them and wait for the release."""
    pending = {f for f in jobs if not f.done()}
    if not pending:
        return
    log.info("adapter.draining", extra={"jobs": len(pending), "grace_s": grace})
    _, pending = wait(pending, timeout=grace)
    if not pending:
        return
    for job in heartbeat.active():
        log.warning("adapter.interrupting", extra={"task_id": job.task_id})
        job.control.interrupt(StopReason.SHUTDOWN)
    _, pending = wait(pending, timeout=_AFTER_INTERRUPT_WAIT)
    if pending:
        log.error("adapter.jobs_stuck", extra={"jobs": len(pending)})
