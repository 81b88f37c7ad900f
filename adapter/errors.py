"""How the adapter sorts failures: fail the job now, release it for another try, or stop it on purpose.

    PermanentJobError      the job can never succeed as asked (bad workflow, unreadable image, bad
                           parameters, a node's runtime error): the record goes to ``failed`` at once
    TransientJobError      the backend or AWS is unavailable for now: retried (stamina), then the message
                           is released; on its last allowed receive the job is marked ``failed``
    JobInterrupted         we stopped the job ourselves: cancelled, timed out, shutting down, or another
                           worker owns it now

``classify`` maps any exception to "permanent" or "transient"; an unexpected exception (a bug) counts as
transient so that the queue's receive limit still ends the job ``failed`` instead of losing it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

import httpx

from gpuctl.errors import AwsError, NotFound, UsageError

__all__ = [
    "JobInterrupted",
    "PermanentJobError",
    "StopReason",
    "TransientJobError",
    "classify",
    "is_transient_http",
]


class PermanentJobError(Exception):
    """The job cannot succeed; the message is the reason recorded in ``error_message``."""


class TransientJobError(Exception):
    """Worth another try later (the backend is down, AWS is throttling)."""


class StopReason(StrEnum):
    CANCELLED = "cancelled"
    TIMED_OUT = "timed out"
    SHUTDOWN = "shutdown"
    LOST = "lost"  # the record moved on without us (another worker took over, or it was finished)


class JobInterrupted(Exception):
    """The adapter stopped the job on purpose."""

    def __init__(self, reason: StopReason, backend_job_id: str | None = None) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.backend_job_id = backend_job_id


_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


def is_transient_http(exc: Exception) -> bool:
    """The stamina predicate for backend HTTP calls: connection trouble, 5xx, 429 and 408."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in _RETRY_STATUS or exc.response.status_code >= 500
    return isinstance(exc, httpx.TransportError)


def classify(exc: BaseException) -> Literal["permanent", "transient"]:
    """Whether a job that raised ``exc`` should fail now or be tried again."""
    if isinstance(exc, PermanentJobError | UsageError | NotFound):  # NotFound: a missing input object
        return "permanent"
    if isinstance(exc, httpx.HTTPStatusError):
        return "transient" if is_transient_http(exc) else "permanent"
    if isinstance(exc, TransientJobError | httpx.TransportError | AwsError):
        return "transient"
    return "transient"
