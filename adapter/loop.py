"""The adapter's main loop (style R13): long-poll, hand messages to job threads, stop cleanly.

* It never takes more messages than it has free job slots (``GPUCTL_INFLIGHT``, default 2), so a second
  job can be uploaded and queued on ComfyUI while the first one runs on the GPU.
* ``stop`` (SIGTERM/SIGINT) ends polling; a message received after it is released at once. The jobs in
  hand get ``shutdown_grace`` seconds to finish; then they are interrupted and their messages released
  (see ``adapter.handlers``), and the loop returns.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

from adapter.backends import BackendNotReady
from adapter.errors import StopReason
from adapter.handlers import MessageHandler
from adapter.heartbeat import Heartbeat
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
        deps.backend.wait_ready(stop)
    except BackendNotReady as exc:
        if stop.is_set():
            return 0
        log.error("adapter.backend_not_ready", extra={"error": str(exc)})
        return 1
    heartbeat = Heartbeat(settings, deps.table, deps.queue)
    heartbeat.start()
    handler = MessageHandler(deps, heartbeat)
    log.info("adapter.started", extra={"worker": settings.worker_id, "backend": settings.backend.value,
                                       "inflight": settings.inflight, "queue_url": deps.queue.queue_url})
    jobs: set[Future[str]] = set()
    backoff = 1.0
    pool = ThreadPoolExecutor(max_workers=settings.inflight, thread_name_prefix="job")
    while not stop.is_set():
        jobs = {f for f in jobs if not f.done()}
        free = settings.inflight - len(jobs)
        if free <= 0:
            wait(jobs, timeout=1.0, return_when=FIRST_COMPLETED)
            continue
        try:
            messages = deps.queue.receive(max_messages=min(10, free), wait_seconds=settings.poll_wait)
        except GpuctlError as exc:
            log.warning("adapter.receive_failed", extra={"error": str(exc), "retry_in_s": backoff})
            stop.wait(backoff)
            backoff = min(backoff * 2, _MAX_ERROR_BACKOFF)
            continue
        backoff = 1.0
        if stop.is_set():
            _release_unstarted(deps, messages)
            break
        for message in messages:
            jobs.add(pool.submit(handler.handle, message))
    _drain(jobs, heartbeat, settings.shutdown_grace)
    # Never block on a job thread that ignored its interrupt; __main__ deals with leftovers.
    pool.shutdown(wait=False, cancel_futures=True)
    heartbeat.stop()
    log.info("adapter.stopped", extra={"worker": settings.worker_id})
    return 0


def _release_unstarted(deps: Deps, messages: list[ReceivedMessage]) -> None:
    for message in messages:
        try:
            deps.queue.change_visibility(message.receipt_handle, 0)
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
