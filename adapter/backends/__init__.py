"""Backends run one job and hand back its result: ComfyUI's native API, or the seed's unified API.

A backend is driven by the handler through :class:`JobControl`, which carries the stop signals
(cancellation noticed by the heartbeat, the per-job deadline, a hard shutdown) and receives progress.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from adapter.errors import StopReason

if TYPE_CHECKING:
    from adapter.settings import AdapterSettings
    from gpuctl.aws.s3 import ObjectStore
    from gpuctl.models import JobMessage, JobRequest

__all__ = [
    "Backend",
    "BackendJob",
    "BackendNotReady",
    "BackendResult",
    "JobControl",
    "make_backend",
    "poll_until_ready",
]


class BackendNotReady(Exception):
    """The backend did not become usable before the readiness deadline (or cannot ever be)."""


@dataclass(frozen=True)
class BackendJob:
    task_id: str
    message: JobMessage
    request: JobRequest


@dataclass(frozen=True)
class BackendResult:
    """Either PNG bytes to upload (ComfyUI) or a URL where the result already is (unified API)."""

    backend_job_id: str
    image: bytes | None = None
    result_uri: str | None = None


class JobControl:
    """What a running job listens to: stop requests, its deadline; and where it reports progress."""

    def __init__(self, timeout_s: float, on_progress: Callable[[float], None] | None = None) -> None:
        self.timeout_s = timeout_s
        self._deadline = time.monotonic() + timeout_s
        self._reason: StopReason | None = None
        self._wake = threading.Event()
        self._on_progress = on_progress
        self._lock = threading.Lock()

    def interrupt(self, reason: StopReason) -> None:
        """Ask the job to stop (the first reason wins)."""
        with self._lock:
            if self._reason is None:
                self._reason = reason
        self._wake.set()

    def stop_reason(self) -> StopReason | None:
        if self._reason is not None:
            return self._reason
        if time.monotonic() >= self._deadline:
            return StopReason.TIMED_OUT
        return None

    def notify(self) -> None:
        """Wake a waiting job early (a WebSocket event arrived)."""
        self._wake.set()

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``; return early on a stop request, a notification or the deadline."""
        remaining = max(0.0, self._deadline - time.monotonic())
        self._wake.wait(min(seconds, remaining))
        if self._reason is None:
            self._wake.clear()

    def progress(self, value: float) -> None:
        if self._on_progress is not None:
            self._on_progress(min(1.0, max(0.0, value)))


class Backend(Protocol):
    def wait_ready(self, stop: threading.Event) -> None:
        """Block until the backend can take jobs.

        Raises:
            BackendNotReady: not ready within the settings' ``ready_timeout``, or ``stop`` was set.
        """

    def run(self, job: BackendJob, control: JobControl) -> BackendResult:
        """Run one job to its end.

        Raises:
            PermanentJobError, TransientJobError, JobInterrupted, httpx.HTTPError, GpuctlError.
        """

    def close(self) -> None: ...


def make_backend(settings: AdapterSettings, store: ObjectStore) -> Backend:
    """The backend the settings name, with its HTTP client open (close it with ``close()``)."""
    from adapter.settings import BackendKind

    if settings.backend is BackendKind.UNIFIED:
        from adapter.backends.unified import UnifiedBackend

        return UnifiedBackend(settings)
    from adapter.backends.comfyui import ComfyBackend
    from adapter.workflow import load_templates

    return ComfyBackend(settings, store, load_templates(settings.workflows_dir))


def poll_until_ready(
    probe: Callable[[], str | None], *, what: str, timeout: float, stop: threading.Event, log_event: str
) -> None:
    """Call ``probe`` (None = ready, else the problem) with a growing delay until it is ready.

    A backend that is still starting (ComfyUI loading its nodes) answers nothing, or 5xx, for a while;
    there is no event to wait on, so this is a bounded wait with backoff, logged every 10 s.

    Raises:
        BackendNotReady: not ready within ``timeout`` seconds, or ``stop`` was set.
    """
    import logging

    log = logging.getLogger("adapter.backends")
    deadline = time.monotonic() + timeout
    delay, next_log = 0.5, 0.0
    while True:
        problem = probe()
        if problem is None:
            return
        now = time.monotonic()
        if now >= deadline:
            raise BackendNotReady(f"{what} is not ready after {timeout:.0f} s: {problem}")
        if now >= next_log:
            log.info(log_event, extra={"what": what, "problem": problem})
            next_log = now + 10.0
        if stop.wait(delay):
            raise BackendNotReady(f"stopped while waiting for {what}")
        delay = min(delay * 1.5, 5.0)
