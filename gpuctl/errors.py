"""The one error hierarchy of gpuctl, and the exit codes it maps to.

    GpuctlError (exit 1)                      anything gpuctl reports in one sentence
    ├── UsageError (exit 2)                   bad input from the user: a flag, a file, a job id format
    │   ├── ConfigError (exit 2)              a missing or invalid setting
    │   └── Cancelled (exit 2)                the user declined a confirmation; nothing was changed
    ├── NotFound (exit 1)                     a job, queue, table, bucket or instance that is not there
    ├── Conflict (exit 1)                     a state transition that is not allowed right now
    ├── PartialFailure (exit 1)               some items of a batch were done, the others were not
    ├── AwsError (exit 4)                     an AWS call that failed (access denied, throttled, unreachable)
    │   └── InstanceNotStarted (exit 4)       --require-instance: the job is queued, the instance did not start
    ├── JobFailed (exit 1)                    a watched job ended `failed` (or was cancelled)
    ├── WaitTimeout (exit 3)                  a wait ran out of time
    └── Interrupted (exit 130)                Ctrl-C or SIGTERM; what was done so far has been printed

The CLI's entry point is the only place that turns these into stderr text and an exit code; everything
below it raises. Every message is written for a person: one sentence that says what is wrong and, where
there is one, what to do about it.
"""

from __future__ import annotations

# Exit codes, documented in README.md ("Exit codes"). Click/Typer usage errors are 2 as well.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_AWS = 4
EXIT_INTERRUPTED = 130

__all__ = [
    "EXIT_AWS",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "AwsError",
    "Cancelled",
    "ConfigError",
    "Conflict",
    "GpuctlError",
    "InstanceNotStarted",
    "Interrupted",
    "JobFailed",
    "NotFound",
    "PartialFailure",
    "UsageError",
    "WaitTimeout",
]


class GpuctlError(Exception):
    """An error gpuctl explains to the user in one sentence."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(GpuctlError):
    """Bad input: a file that is not an image, a knob out of range, a malformed id."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A setting that is missing or invalid."""


class Cancelled(UsageError):
    """The user answered "no" to a confirmation (or there was no answer): nothing was changed."""


class NotFound(GpuctlError):
    """Something the user named does not exist."""


class Conflict(GpuctlError):
    """The thing exists but is in a state that does not allow the request."""


class AwsError(GpuctlError):
    """An AWS call failed for a reason other than the user's input."""

    exit_code = EXIT_AWS

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class PartialFailure(GpuctlError):
    """A batch of which only some items were done (each failed item was reported on its own)."""


class InstanceNotStarted(AwsError):
    """``--require-instance``: the job is queued, but the GPU instance could not be started."""


class JobFailed(GpuctlError):
    """A job the user waited for ended `failed` (a cancelled job too: it did not complete)."""


class WaitTimeout(GpuctlError):
    """A wait ran out of time before the thing waited for happened."""

    exit_code = EXIT_TIMEOUT


class Interrupted(GpuctlError):
    """Ctrl-C (SIGINT) or SIGTERM stopped the command; whatever it had done is printed before this is raised."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, message: str = "Interrupted.") -> None:
        super().__init__(message)
