"""Checks on job inputs, written once: the CLI runs them before it writes anything, the adapter before it
sends anything to ComfyUI, so both refuse the same inputs with the same sentence.

* **Images** (:func:`inspect_image`): a format gpuctl accepts, at most ``max_image_mb`` bytes,
  ``max_image_megapixels`` pixels and ``max_image_side`` on the longest side (:class:`ImageLimits`). The
  dimensions are read from the header and checked *before* anything is decoded, so a decompression bomb (a
  100 KB PNG of 10000×10000) is refused in one sentence instead of a Pillow warning with a site-packages path.
* **https:// URLs** (:func:`check_https_url`): https only, no user name or password, a well-formed host name,
  and every address the host resolves to public: no loopback, private, link-local (the instance metadata
  service at 169.254.169.254), shared, multicast or reserved ranges. A host that does not resolve is refused;
  a resolver that answers "try again" is :class:`InputUnavailable` (transient).
* **Messages** never echo a secret: :func:`redact_url` drops the user info and the query string (a presigned
  URL's signature, credential and session token live there) and escapes invisible characters.

Errors: :class:`InputRejected` (a :class:`~gpuctl.errors.UsageError`, exit 2; permanent in the adapter) and
:class:`InputUnavailable` (exit 4; transient in the adapter).
"""

from __future__ import annotations

import io
import ipaddress
import re
import socket
import unicodedata
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from gpuctl.errors import EXIT_AWS, GpuctlError, UsageError

if TYPE_CHECKING:
    from gpuctl.settings import Settings

__all__ = [
    "FORMATS",
    "HEADER_BYTES",
    "ImageInfo",
    "ImageLimits",
    "InputRejected",
    "InputUnavailable",
    "Resolver",
    "check_https_url",
    "check_size",
    "display",
    "inspect_image",
    "redact_url",
]

#: Pillow format → (content type, file extension) of every image format a job may take.
FORMATS: dict[str, tuple[str, str]] = {
    "JPEG": ("image/jpeg", "jpg"),
    "MPO": ("image/jpeg", "jpg"),
    "PNG": ("image/png", "png"),
    "WEBP": ("image/webp", "webp"),
    "BMP": ("image/bmp", "bmp"),
    "GIF": ("image/gif", "gif"),
    "TIFF": ("image/tiff", "tiff"),
}
_FORMAT_NAMES = "JPEG, PNG, WebP, BMP, GIF or TIFF"
#: How much of a remote object is enough to read an image's header (format and dimensions).
HEADER_BYTES = 64 * 1024

Resolver = Callable[[str, int], list[str]]


class InputRejected(UsageError):
    """An input that can never be used as given (exit 2; the adapter fails the job at once)."""


class InputUnavailable(GpuctlError):
    """An input that cannot be checked right now (a resolver that says "try again"): exit 4, transient."""

    exit_code = EXIT_AWS


@dataclass(frozen=True)
class ImageLimits:
    """The largest image a job may take, in bytes, pixels and pixels along the longest side."""

    max_bytes: int
    max_pixels: int
    max_side: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        return cls(
            max_bytes=int(settings.max_image_mb * 1024 * 1024),
            max_pixels=int(settings.max_image_megapixels * 1_000_000),
            max_side=int(settings.max_image_side),
        )


@dataclass(frozen=True)
class ImageInfo:
    """What the header says: Pillow's format name, the dimensions, and the size in bytes (0: unknown)."""

    format: str
    width: int
    height: int
    size: int

    @property
    def content_type(self) -> str:
        return FORMATS[self.format][0]

    @property
    def extension(self) -> str:
        return FORMATS[self.format][1]


# --- display ---------------------------------------------------------------------------------------

def display(text: str, *, limit: int = 200) -> str:
    """``text`` safe to print in one line: invisible and control characters (bidi overrides …) escaped, cut at
    ``limit`` characters."""
    out = []
    for char in text:
        if char.isprintable() and unicodedata.category(char) not in ("Cf", "Co", "Cn"):
            out.append(char)
        else:
            out.append(f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}")
    shown = "".join(out)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def redact_url(url: str) -> str:
    """A URL that is safe to show: no user name or password, no query string (``?…``), no fragment."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return display(url.split("?", 1)[0].split("@")[-1])
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{port}" if port is not None else "")
    return display(urlunsplit((parts.scheme, netloc, parts.path, "…" if parts.query else "", "")))


# --- images ----------------------------------------------------------------------------------------

def _megabytes(n: int) -> str:
    return f"{n / (1024 * 1024):.1f}".rstrip("0").rstrip(".")


def check_size(name: str, size: int, limits: ImageLimits) -> None:
    """Refuse an image of ``size`` bytes above ``limits.max_bytes``.

    Raises:
        InputRejected: naming the limit (max_image_mb).
    """
    if size > limits.max_bytes:
        raise InputRejected(f"{name} is {_megabytes(size)} MB, larger than the {_megabytes(limits.max_bytes)} MB "
                            "limit (max_image_mb).")


def _check_dimensions(name: str, width: int, height: int, limits: ImageLimits) -> None:
    if width <= 0 or height <= 0:
        raise InputRejected(f"{name} has no pixels ({width}×{height}).")
    if max(width, height) > limits.max_side:
        raise InputRejected(f"{name} is {width}×{height} pixels; its longest side may be at most "
                            f"{limits.max_side} pixels (max_image_side).")
    if width * height > limits.max_pixels:
        raise InputRejected(f"{name} is {width}×{height} pixels ({width * height / 1e6:.1f} megapixels), more "
                            f"than the {limits.max_pixels / 1e6:g} megapixel limit (max_image_megapixels).")


def _quiet_pillow() -> None:
    from PIL import Image

    # Pillow warns (on stderr, with its own file path) above its built-in pixel limit. gpuctl applies its own,
    # lower limit before anything is decoded and says so in one sentence, so the warning only adds noise.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def inspect_image(data: bytes | Path, *, name: str, limits: ImageLimits, verify: bool = True,
                  size: int | None = None) -> ImageInfo:
    """Read an image's header and check it against ``limits``; with ``verify``, check its structure too.

    ``data`` is the image's bytes (or its first :data:`HEADER_BYTES`, with ``verify=False`` and the real
    ``size``) or a local file. ``name`` is how the image is called in messages (a path or a redacted URL).

    Raises:
        InputRejected: too large, not an image, a format gpuctl does not take, or damaged.
    """
    from PIL import Image, UnidentifiedImageError

    _quiet_pillow()
    if size is None:
        size = len(data) if isinstance(data, bytes) else data.stat().st_size
    check_size(name, size, limits)
    source: Any = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        with Image.open(source) as img:
            fmt = img.format or ""
            width, height = img.size
            if fmt not in FORMATS:
                raise InputRejected(f"{name} is a {fmt or 'unknown'} image; use {_FORMAT_NAMES}.")
            _check_dimensions(name, width, height, limits)
            if verify:
                img.verify()
    except InputRejected:
        raise
    except Image.DecompressionBombError:
        raise InputRejected(f"{name} has more pixels than any input may have (max_image_megapixels is "
                            f"{limits.max_pixels / 1e6:g}).") from None
    except PermissionError:
        raise InputRejected(f"{name} is not readable (permission denied).") from None
    except IsADirectoryError:
        raise InputRejected(f"{name} is a directory, not an image file.") from None
    except UnidentifiedImageError:
        raise InputRejected(f"{name} is not an image gpuctl can read ({_FORMAT_NAMES}).") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        reason = display(str(exc).split("\n", 1)[0], limit=80) or type(exc).__name__
        raise InputRejected(f"{name} is not a valid image ({reason}).") from None
    return ImageInfo(fmt, width, height, size)


# --- https URLs ------------------------------------------------------------------------------------

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _default_resolver(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:
            raise InputUnavailable(f"The name server did not answer for the image host {display(host)} "
                                   "(try again shortly).") from None
        raise InputRejected(f"The image host {display(host)} does not resolve (no such host).") from None
    except (UnicodeError, OSError):
        raise InputRejected(f"The image host {display(host)} is not a valid host name.") from None
    return sorted({str(info[4][0]) for info in infos})


def _ascii_host(host: str) -> str:
    """The host as DNS sees it (IDNA), or InputRejected for a name no DNS server could hold."""
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise InputRejected(f"The image host {display(host)} is not a valid host name.") from None
    labels = ascii_host.rstrip(".").split(".")
    if not ascii_host or len(ascii_host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise InputRejected(f"The image host {display(host)} is not a valid host name.")
    return ascii_host


def _refused_address(address: str) -> str | None:
    """Why an address may not be fetched from (None: it is a public unicast address)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (the instance metadata service lives there)"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private or ip.is_reserved or ip.is_unspecified or not ip.is_global:
        return "a private or reserved address"
    return None


def check_https_url(url: str, *, resolve: Resolver | None = None) -> list[str]:
    """Refuse an image URL that must not be fetched; return the public addresses its host resolves to.

    Raises:
        InputRejected: not https, credentials in the URL, a malformed host or port, a host that does not
            resolve, or one with any non-public address.
        InputUnavailable: the resolver could not answer right now.
    """
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port or 443
    except ValueError:
        raise InputRejected(f"{shown} is not a valid URL (bad host or port).") from None
    if parts.scheme != "https":
        scheme = display(parts.scheme or "no scheme", limit=20)
        raise InputRejected(f"Image URLs must be https:// or s3:// ({scheme} given: {shown}).")
    if parts.username is not None or parts.password is not None:
        raise InputRejected(f"The image URL {shown} carries a user name or password; gpuctl refuses credentials "
                            "in URLs (use a presigned URL or s3://).")
    host = parts.hostname
    if not host:
        raise InputRejected(f"The image URL {shown} has no host.")
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        addresses = (resolve or _default_resolver)(_ascii_host(host), port)
    if not addresses:
        raise InputRejected(f"The image host {display(host)} does not resolve (no addresses).")
    for address in addresses:
        why = _refused_address(address)
        if why is not None:
            raise InputRejected(f"The image URL {shown} points at {address}, {why}; gpuctl only fetches from "
                                "public addresses.")
    return addresses
