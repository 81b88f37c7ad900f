"""Backends run one job and hand back its result: ComfyUI's native API, or the seed's unified API.

A backend is driven by the handler through :class:`JobControl`, which carries the stop signals
(cancellation noticed by the heartbeat, the per-job deadline, a hard shutdown) and receives progress.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

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
    "Readiness",
    "make_backend",
    "poll_until_ready",
    "wait_until_ready",
]


class BackendNotReady(Exception):
    """The backend did not become usable before the readiness deadline (or cannot ever be)."""

    def __init__(self, message: str, report: Readiness | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Readiness:
    """One readiness check of the backend: what ``gpuctl adapter check`` prints and the daemon waits for.

    ``problems`` make it not ready (each one sentence); ``warnings`` do not. ``final`` means waiting will not
    help (a node class that is not installed: ComfyUI registers its nodes before it listens).
    """

    backend: str
    url: str
    ready: bool
    version: str | None = None
    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    checked: tuple[str, ...] = ()
    final: bool = False

    def summary(self) -> str:
        return "; ".join(self.problems) if self.problems else "ready"

    def to_dict(self) -> dict[str, Any]:
        return {"ready": self.ready, "backend": self.backend, "url": self.url, "version": self.version,
                "problems": list(self.problems), "warnings": list(self.warnings), "checked": list(self.checked)}


@dataclass(frozen=True)
class BackendJob:
    """One attempt at a job: ``token`` names this attempt (its files, its result key); a backend job an earlier
    attempt started is ``previous_backend_job_id`` (the record's ``comfy_job_id``)."""

    task_id: str
    message: JobMessage
    request: JobRequest
    token: str = "a"
    previous_backend_job_id: str | None = None


@dataclass(frozen=True)
class BackendResult:
    """Either PNG bytes to upload (ComfyUI) or a URL where the result already is (unified API)."""

    backend_job_id: str
    image: bytes | None = None
    result_uri: str | None = None


class JobControl:
    """What a running job listens to: stop requests, its deadline; and where it reports progress."""

    def __init__(self, timeout_s: float, on_progress: Callable[[float], None] | None = None,
                 on_backend_job: Callable[[str], None] | None = None) -> None:
        self.timeout_s = timeout_s
        self._deadline = time.monotonic() + timeout_s
        self._reason: StopReason | None = None
        self._wake = threading.Event()
        self._notified = threading.Event()
        self._on_progress = on_progress
        self._on_backend_job = on_backend_job
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
        self._notified.set()
        self._wake.set()

    def wait_notified(self, seconds: float) -> None:
        """Sleep up to ``seconds`` or until the next notification, stop requests notwithstanding (a stopped
        job waiting for ComfyUI to confirm the stop)."""
        self._notified.wait(seconds)
        self._notified.clear()

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``; return early on a stop request, a notification or the deadline."""
        remaining = max(0.0, self._deadline - time.monotonic())
        self._wake.wait(min(seconds, remaining))
        if self._reason is None:
            self._wake.clear()

    def progress(self, value: float) -> None:
        if self._on_progress is not None:
            self._on_progress(min(1.0, max(0.0, value)))

    def backend_job(self, job_id: str) -> None:
        """Record the backend's id for this job before waiting on it (a retry then finds it, not a new one).

        Raises:
            JobInterrupted: the record is no longer this attempt's.
        """
        if self._on_backend_job is not None:
            self._on_backend_job(job_id)


class Backend(Protocol):
    def check(self) -> Readiness:
        """Check once, completely, whether the backend can take jobs (never raises)."""

    def alive(self) -> str | None:
        """A cheap liveness probe for outage decisions: None when it answers, else the problem."""

    def run(self, job: BackendJob, control: JobControl) -> BackendResult:
        """Run one job to its end.

        Raises:
            PermanentJobError, TransientJobError, JobInterrupted, httpx.HTTPError, GpuctlError.
        """

    def close(self) -> None: ...


def make_backend(settings: AdapterSettings, store: ObjectStore | None) -> Backend:
    """The backend the settings name, with its HTTP client open (close it with ``close()``); without a
    ``store`` it can only be checked, not run jobs reading s3:// inputs."""
    from adapter.settings import BackendKind

    if settings.backend is BackendKind.UNIFIED:
        from adapter.backends.unified import UnifiedBackend

        return UnifiedBackend(settings, store)
    from adapter.backends.comfyui import ComfyBackend
    from adapter.workflow import load_templates

    return ComfyBackend(settings, store, load_templates(settings.workflows_dir))


def wait_until_ready(backend: Backend, stop: threading.Event, *, what: str, timeout: float,
                     log_event: str) -> Readiness:
    """Check ``backend`` with a growing delay until it is ready; return the report that said so.

    Raises:
        BackendNotReady: not ready within ``timeout`` (math.inf: no limit), a final problem, or ``stop``.
    """
    last: list[Readiness] = []

    def probe() -> str | None:
        report = backend.check()
        last[:] = [report]
        if report.final:
            raise BackendNotReady(f"{report.url}: {report.summary()}", report)
        return None if report.ready else report.summary()

    try:
        poll_until_ready(probe, what=what, timeout=timeout, stop=stop, log_event=log_event)
    except BackendNotReady as exc:
        raise BackendNotReady(str(exc), exc.report or (last[0] if last else None)) from None
    return last[0]


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
