"""Fetching a job's input images: s3:// through boto3, https:// through httpx, nothing else.

An https URL comes from whoever submitted the job, and the adapter runs inside the VPC next to the
instance metadata service, so every host is resolved first and refused unless all its addresses are
public (no loopback, private, link-local — 169.254.169.254 —, multicast or reserved ranges). Redirects
are followed by hand, a few hops at most, each hop checked the same way. The rules and the image limits are
``gpuctl.inputs``, the same code the CLI runs before it accepts a job.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import urljoin

import httpx
import stamina

from adapter.errors import PermanentJobError, TransientJobError, is_transient_http
from gpuctl.errors import AwsError
from gpuctl.inputs import (
    HEADER_BYTES,
    ImageLimits,
    InputRejected,
    InputUnavailable,
    Resolver,
    check_https_url,
    inspect_image,
    redact_url,
)

if TYPE_CHECKING:
    from gpuctl.aws.s3 import ObjectStore

__all__ = ["check_image", "check_input_header", "check_url", "fetch_input"]

_MAX_REDIRECTS = 3


def check_url(url: str, *, resolve: Resolver | None = None) -> None:
    """Refuse a URL the adapter must not fetch (``gpuctl.inputs.check_https_url``).

    Raises:
        PermanentJobError: not https, credentials in it, a bad host, or a host with a non-public address.
        TransientJobError: the resolver could not answer right now.
    """
    try:
        check_https_url(url, resolve=resolve)
    except InputRejected as exc:
        raise PermanentJobError(str(exc).rstrip(".")) from None
    except InputUnavailable as exc:
        raise TransientJobError(str(exc).rstrip(".")) from None


def fetch_input(url: str, *, store: ObjectStore, http: httpx.Client, max_bytes: int,
                resolve: Resolver | None = None) -> bytes:
    """The bytes of an input image.

    Raises:
        PermanentJobError: a refused URL, a missing object, or one larger than ``max_bytes``.
        NotFound / UsageError / AwsError: from the S3 gateway (classified by adapter.errors).
        httpx.HTTPError: a transient https failure that outlived the retries.
    """
    if url.startswith("s3://"):
        from gpuctl.aws.s3 import parse_s3_uri

        bucket, key = parse_s3_uri(url)
        try:
            return store.get_bytes(bucket, key, max_bytes=max_bytes)
        except AwsError as exc:
            # The instance role may list only the job prefixes, so S3 answers a missing key elsewhere with
            # 403 rather than 404; either way another try cannot succeed.
            if exc.code in {"AccessDenied", "403", "AllAccessDisabled"}:
                raise PermanentJobError(f"input {url} does not exist or the instance role may not read it "
                                        f"({exc.code})") from None
            raise
    return _fetch_https(url, http=http, max_bytes=max_bytes, resolve=resolve)


@contextlib.contextmanager
def _following(url: str, *, http: httpx.Client, resolve: Resolver | None,
               headers: dict[str, str] | None = None) -> Iterator[httpx.Response]:
    """The final response of a GET of ``url``, redirects followed by hand, each hop checked first.

    Raises:
        PermanentJobError: a refused URL, a 404/410/401/403, too many redirects.
        httpx.HTTPStatusError: another error status.
    """
    current = url
    for _ in range(_MAX_REDIRECTS + 1):
        check_url(current, resolve=resolve)
        with http.stream("GET", current, follow_redirects=False, headers=headers) as response:
            if response.is_redirect and "location" in response.headers:
                current = urljoin(current, response.headers["location"])
                continue
            if response.status_code in (404, 410, 401, 403):
                raise PermanentJobError(f"image URL {redact_url(url)} answered HTTP {response.status_code}")
            response.raise_for_status()
            yield response
            return
    raise PermanentJobError(f"image URL {redact_url(url)} redirects more than {_MAX_REDIRECTS} times")


@stamina.retry(on=is_transient_http, attempts=4, timeout=60.0)
def _fetch_https(url: str, *, http: httpx.Client, max_bytes: int, resolve: Resolver | None) -> bytes:
    with _following(url, http=http, resolve=resolve) as response:
        length = response.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_bytes:
            raise PermanentJobError(f"image at {redact_url(url)} is larger than {max_bytes} bytes")
        buf = bytearray()
        for chunk in response.iter_bytes():
            buf.extend(chunk)
            if len(buf) > max_bytes:
                raise PermanentJobError(f"image at {redact_url(url)} is larger than {max_bytes} bytes")
        return bytes(buf)


def check_image(data: bytes, url: str, limits: ImageLimits | None = None) -> str:
    """The file extension for an input image's bytes, after the shared image checks.

    Raises:
        PermanentJobError: not an image gpuctl takes, damaged, or beyond ``limits`` (default: the settings'
            defaults).
    """
    if limits is None:
        from gpuctl.settings import Settings

        limits = ImageLimits.from_settings(Settings.model_construct())
    try:
        info = inspect_image(data, name=f"input {redact_url(url)}", limits=limits)
    except InputRejected as exc:
        raise PermanentJobError(str(exc).rstrip(".")) from None
    return info.extension


def check_input_header(url: str, *, store: ObjectStore, http: httpx.Client, limits: ImageLimits,
                       resolve: Resolver | None = None) -> str:
    """Check an input the adapter does not download itself (the unified API fetches it) from its header only:
    the same format, size, pixel and side limits, without reading the whole image. Returns its extension.

    Raises:
        PermanentJobError: refused (see :func:`check_image`), a refused URL, or a missing object.
        TransientJobError: the resolver could not answer.
        NotFound / AwsError / httpx.HTTPError: as :func:`fetch_input`.
    """
    if url.startswith("s3://"):
        from gpuctl.aws.s3 import parse_s3_uri

        bucket, key = parse_s3_uri(url)
        size = store.head(bucket, key).size
        head = store.get_range(bucket, key, HEADER_BYTES) if size <= limits.max_bytes else b""
    else:
        head, size = _https_header(url, http=http, resolve=resolve)
    try:
        info = inspect_image(head, name=f"input {redact_url(url)}", limits=limits, verify=False, size=size)
    except InputRejected as exc:
        raise PermanentJobError(str(exc).rstrip(".")) from None
    return info.extension


@stamina.retry(on=is_transient_http, attempts=4, timeout=60.0)
def _https_header(url: str, *, http: httpx.Client, resolve: Resolver | None) -> tuple[bytes, int]:
    with _following(url, http=http, resolve=resolve, headers={"Range": f"bytes=0-{HEADER_BYTES - 1}"}) as response:
        total = response.headers.get("content-range", "").rpartition("/")[2]
        length = response.headers.get("content-length", "")
        buf = bytearray()
        for chunk in response.iter_bytes():
            buf.extend(chunk)
            if len(buf) >= HEADER_BYTES:
                break
        size = int(total) if total.isdigit() else int(length) if length.isdigit() else len(buf)
        return bytes(buf[:HEADER_BYTES]), size
