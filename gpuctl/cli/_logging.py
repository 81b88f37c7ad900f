"""``-v`` / ``-vv``: log lines on stderr that never carry a credential, a token, a signature or a request body.

botocore's debug loggers print the signed request (``Authorization``, ``X-Amz-Security-Token``), the canonical
request and its signature, request bodies (job requests) and response bodies (which, for STS, hold
credentials). At ``-vv`` those records are reduced to what they are about (the operation, the method and
URL without its query) and every line is scrubbed once more for anything that looks like a secret, including
the secret key and session token of the environment.
"""

from __future__ import annotations

import logging
import os
import re
import sys

__all__ = ["SecretFilter", "configure", "redact"]

# Loggers whose records are only ever a signature, a canonical request or a body.
_DROP = ("botocore.auth", "botocore.parsers", "botocore.awsrequest")
_HEADERS = ("authorization", "x-amz-security-token", "x-amz-signature", "x-amz-credential",
            "x-amz-date", "x-amz-content-sha256", "cookie", "proxy-authorization")
_NAMES = "|".join(_HEADERS)
# 'Authorization': b'AWS4-HMAC-SHA256 Credential=…'  /  "X-Amz-Security-Token": "…"  /  JSON credential fields
_QUOTED = [
    re.compile(r"(?i)(['\"]?(?:" + _NAMES + r")['\"]?\s*[:=]\s*b?)(['\"]).*?\2"),
    re.compile(r"(?i)(['\"](?:SecretAccessKey|SessionToken|secret_key|token|aws_secret_access_key|"
               r"aws_session_token)['\"]\s*:\s*)(['\"]).*?\2"),
]
_BARE = [
    # a header line "x-amz-security-token:…" (a canonical request)
    re.compile(r"(?im)^(\s*(?:" + _NAMES + r")\s*:\s*).+$"),
    # query strings of presigned URLs, and AWS4 authorization parameters anywhere
    re.compile(r"(?i)((?:X-Amz-Signature|X-Amz-Security-Token|X-Amz-Credential|Signature|AWSAccessKeyId|"
               r"Credential|SessionToken|Token)=)[^&\s,'\"]+"),
]
_BODY = re.compile(r"(?s)(['\"]body['\"]\s*:\s*)b?(['\"]).*?\2(?=\s*[,}])")
_MASK = "***"


def _env_secrets() -> list[str]:
    names = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
    return sorted({v for n in names if len(v := os.environ.get(n, "")) >= 8}, key=len, reverse=True)


def redact(text: str, secrets: list[str] | None = None) -> str:
    """``text`` with headers, query parameters and fields that carry credentials masked, and bodies left out."""
    text = _BODY.sub(lambda m: f"{m.group(1)}'<body not shown>'", text)
    for pattern in _QUOTED:
        text = pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}{_MASK}{m.group(2)}", text)
    for pattern in _BARE:
        text = pattern.sub(lambda m: f"{m.group(1)}{_MASK}", text)
    for secret in secrets if secrets is not None else _env_secrets():
        text = text.replace(secret, _MASK)
    return text


class SecretFilter(logging.Filter):
    """Drops signature/body records and scrubs the rest (a handler filter: it sees every record it prints)."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets = _env_secrets()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(_DROP):
            return False
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        if record.name == "botocore.endpoint":
            message = _summarise_request(message)
        record.msg = redact(message, self._secrets)
        record.args = None
        if record.exc_info and not record.exc_text:
            # Tracebacks are for --debug; at -vv the exception's own line is enough.
            record.msg = f"{record.msg} ({record.exc_info[1]!r})"
            record.exc_info = None
        return True


_MAKING = re.compile(r"^Making request for (OperationModel\(name=[^)]*\))")
_SENDING = re.compile(r"^Sending http request: <AWSPreparedRequest .*?method=(\w+), url=([^,?\s]+)")


def _summarise_request(message: str) -> str:
    if match := _MAKING.match(message):
        return f"Making request for {match.group(1)}"
    if match := _SENDING.match(message):
        return f"Sending http request: {match.group(1)} {match.group(2)}"
    return message


def configure(verbose: int) -> None:
    """``-v``: gpuctl's INFO records; ``-vv``: DEBUG, botocore's included (scrubbed). Both on stderr.

    Without ``-v`` nothing is logged at all: a warning logged below the CLI (a tag that could not be written, a
    marker update that failed) is reported by the command itself, in its own words, or not at all; Python's
    last-resort handler would otherwise print the raw event name on stderr.
    """
    if verbose <= 0:
        root = logging.getLogger()
        if not root.handlers:
            root.addHandler(logging.NullHandler())
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    handler.addFilter(SecretFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    if verbose == 1:
        for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
