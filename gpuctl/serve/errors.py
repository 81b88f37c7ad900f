"""The one place gpuctl's error hierarchy (gpuctl/errors.py) becomes HTTP: status code and body.

=====================================  ======  =====================================================
error                                  status  body
=====================================  ======  =====================================================
RequestInvalid (a field is wrong)      422     ``{"detail": [{"loc", "msg", "type"}, …]}`` (FastAPI's)
UsageError (InputRejected, a bad       422     the same shape, one entry with gpuctl's sentence
token, an input that cannot be used)
ConfigError (the server lacks a        503     ``{"detail": sentence}``: the operator's to fix
setting)
InputUnavailable (DNS said "try        503     ``{"detail": sentence}``, ``Retry-After``
again")
NotFound                               404     ``{"detail": "Job not found"}`` for a job (as today)
Conflict                               409     ``{"detail": sentence}``
AwsError                               503     ``{"detail": sentence}``, ``Retry-After``
WaitTimeout                            504     ``{"detail": sentence}``
any other GpuctlError                  500     ``{"detail": sentence}``
anything else                          500     ``{"detail": "Internal server error"}`` (gpuctl.serve.guard)
=====================================  ======  =====================================================

No traceback, no exception type and no AWS request id is ever in a body: only gpuctl's one-sentence messages,
which never carry a secret (URLs are shown redacted).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gpuctl.errors import AwsError, ConfigError, Conflict, GpuctlError, NotFound, UsageError, WaitTimeout
from gpuctl.inputs import InputUnavailable

__all__ = ["INTERNAL_ERROR", "JOB_NOT_FOUND", "RETRY_AFTER_SECONDS", "RequestInvalid", "http_error"]

#: The running service's 404 body for a job id it does not know.
JOB_NOT_FOUND = "Job not found"
INTERNAL_ERROR = "Internal server error"
#: What a client should wait before trying again after a 503.
RETRY_AFTER_SECONDS = 5


class RequestInvalid(UsageError):
    """A request whose fields are wrong, with every field error in FastAPI's shape (``loc``, ``msg``, ``type``)."""

    def __init__(self, errors: Sequence[dict[str, Any]]) -> None:
        first = errors[0] if errors else {"msg": "invalid request"}
        super().__init__(f"Invalid request: {first['msg']}.")
        self.errors = list(errors)


def http_error(exc: GpuctlError, *, job_route: bool = False) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The status code, JSON body and extra headers for ``exc``; ``job_route``: the path names one job."""
    if isinstance(exc, RequestInvalid):
        return 422, {"detail": exc.errors}, {}
    if isinstance(exc, ConfigError):
        return 503, {"detail": exc.message}, {}
    if isinstance(exc, UsageError):
        return 422, {"detail": [{"loc": ["body"], "msg": exc.message, "type": "value_error"}]}, {}
    if isinstance(exc, NotFound):
        return 404, {"detail": JOB_NOT_FOUND if job_route else exc.message}, {}
    if isinstance(exc, Conflict):
        return 409, {"detail": exc.message}, {}
    if isinstance(exc, AwsError | InputUnavailable):
        return 503, {"detail": exc.message}, {"Retry-After": str(RETRY_AFTER_SECONDS)}
    if isinstance(exc, WaitTimeout):
        return 504, {"detail": exc.message}, {}
    return 500, {"detail": exc.message}, {}
