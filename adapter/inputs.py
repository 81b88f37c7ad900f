"""Fetching a job's input images: s3:// through boto3, https:// through httpx, nothing else.

An https URL comes from whoever submitted the job, and the adapter runs inside the VPC next to the
instance metadata service, so every host is resolved first and refused unless all its addresses are
public (no loopback, private, link-local — 169.254.169.254 —, multicast or reserved ranges). Redirects
are followed by hand, a few hops at most, each hop checked the same way.
"""

from __future__ import annotations

import io
import ipaddress
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

import httpx
import stamina

from adapter.errors import PermanentJobError, is_transient_http

if TYPE_CHECKING:
    from gpuctl.aws.s3 import ObjectStore

__all__ = ["check_image", "check_url", "fetch_input"]

Resolver = Callable[[str, int], list[str]]
_MAX_REDIRECTS = 3
_FORMATS = {"PNG": "png", "JPEG": "jpg", "MPO": "jpg", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff"}


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise PermanentJobError(f"cannot resolve the image host {host!r}: {exc.strerror}") from None
    return sorted({str(info[4][0]) for info in infos})


def check_url(url: str, *, resolve: Resolver = _resolve) -> None:
    """Refuse a URL the adapter must not fetch.

    Raises:
        PermanentJobError: not https, no host, or a host with a non-public address.
    """
    parts = urlsplit(url)
    if parts.scheme != "https":
        raise PermanentJobError(f"image URL {url!r} is not https:// or s3://")
    host = parts.hostname
    if not host:
        raise PermanentJobError(f"image URL {url!r} has no host")
    if parts.username or parts.password:
        raise PermanentJobError(f"image URL {url!r} carries credentials; refused")
    try:
        port = parts.port or 443
    except ValueError:
        raise PermanentJobError(f"image URL {url!r} has an invalid port") from None
    for address in resolve(host, port):
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_link_local or ip.is_loopback:
            raise PermanentJobError(
                f"image URL {url!r} resolves to {ip}, a non-public address; refused"
            )


def fetch_input(url: str, *, store: ObjectStore, http: httpx.Client, max_bytes: int,
                resolve: Resolver = _resolve) -> bytes:
    """The bytes of an input image.

    Raises:
        PermanentJobError: a refused URL, a missing object, or one larger than ``max_bytes``.
        NotFound / UsageError / AwsError: from the S3 gateway (classified by adapter.errors).
        httpx.HTTPError: a transient https failure that outlived the retries.
    """
    if url.startswith("s3://"):
        from gpuctl.aws.s3 import parse_s3_uri

        bucket, key = parse_s3_uri(url)
        return store.get_bytes(bucket, key, max_bytes=max_bytes)
    return _fetch_https(url, http=http, max_bytes=max_bytes, resolve=resolve)


@stamina.retry(on=is_transient_http, attempts=4, timeout=60.0)
def _fetch_https(url: str, *, http: httpx.Client, max_bytes: int, resolve: Resolver) -> bytes:
    current = url
    for _ in range(_MAX_REDIRECTS + 1):
        check_url(current, resolve=resolve)
        with http.stream("GET", current, follow_redirects=False) as response:
            if response.is_redirect and "location" in response.headers:
                current = urljoin(current, response.headers["location"])
                continue
            if response.status_code in (404, 410, 401, 403):
                raise PermanentJobError(f"image URL {url!r} answered HTTP {response.status_code}")
            response.raise_for_status()
            length = response.headers.get("content-length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise PermanentJobError(f"image at {url!r} is larger than {max_bytes} bytes")
            buf = bytearray()
            for chunk in response.iter_bytes():
                buf.extend(chunk)
                if len(buf) > max_bytes:
                    raise PermanentJobError(f"image at {url!r} is larger than {max_bytes} bytes")
            return bytes(buf)
    raise PermanentJobError(f"image URL {url!r} redirects more than {_MAX_REDIRECTS} times")


def check_image(data: bytes, url: str) -> str:
    """The file extension for an input image's bytes.

    Raises:
        PermanentJobError: the bytes are not an image Pillow can read.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise PermanentJobError(f"input {url} is not a readable image") from None
    if fmt not in _FORMATS:
        raise PermanentJobError(f"input {url} is a {fmt or 'unknown'} image; use PNG, JPEG or WebP")
    return _FORMATS[fmt]
