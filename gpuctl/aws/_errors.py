"""Translating botocore errors into gpuctl's error hierarchy, by error code."""

from __future__ import annotations

from typing import Any

from gpuctl.errors import AwsError, ConfigError, GpuctlError, NotFound

__all__ = ["error_code", "translate"]

_ACCESS = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "AuthFailure",
           "InvalidClientTokenId", "UnrecognizedClientException", "ExpiredToken", "ExpiredTokenException",
           "SignatureDoesNotMatch", "InvalidAccessKeyId"}
_THROTTLE = {"Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
             "ProvisionedThroughputExceededException", "RequestThrottled", "SlowDown"}


def error_code(exc: BaseException) -> str:
    response: Any = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _sentence_start(what: str) -> str:
    """``what`` at the start of a sentence: "the queue …" → "The queue …", but a URI keeps its lower-case scheme."""
    return what if "://" in what.split(" ", 1)[0] else what[:1].upper() + what[1:]


def translate(exc: Exception, what: str) -> GpuctlError:
    """One sentence for a failed AWS call on ``what`` (e.g. "the SQS queue https://…")."""
    import botocore.exceptions as bce

    if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
        return ConfigError(
            "No AWS credentials were found: configure them (aws configure, AWS_PROFILE, or "
            "--profile), or point gpuctl at a local emulator with --endpoint-url."
        )
    if isinstance(exc, bce.EndpointConnectionError | bce.ConnectTimeoutError | bce.ReadTimeoutError):
        return AwsError(f"Cannot reach AWS for {what}: {exc}.", code="Unreachable")
    if isinstance(exc, bce.ClientError):
        code = error_code(exc)
        message = exc.response.get("Error", {}).get("Message") or code
        if code in _ACCESS:
            return AwsError(f"Access denied to {what} ({code}): check the IAM permissions of your "
                            f"credentials.", code=code)
        if code in _THROTTLE:
            return AwsError(f"AWS is throttling requests to {what} ({code}); try again shortly.", code=code)
        if code in {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist",
                    "ResourceNotFoundException", "NoSuchBucket", "InvalidInstanceID.NotFound",
                    "InvalidInstanceID.Malformed"}:
            return NotFound(f"{_sentence_start(what)} does not exist ({code}).")
        return AwsError(f"AWS rejected the request to {what}: {message.rstrip('.')} ({code}).", code=code)
    if isinstance(exc, bce.BotoCoreError):
        return AwsError(f"AWS request to {what} failed: {exc}.")
    raise exc
