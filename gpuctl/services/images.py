"""Image references: a local file (checked with Pillow, uploaded), an s3:// URI, or an https:// URL.

Local files are checked without the network (:func:`resolve_image`); remote references are checked with the
network before anything is written (:func:`check_remote_image`): an ``s3://`` object with one HeadObject (and
a ranged GET of its header when its content type does not say which image format it is), an ``https://`` URL
with the rules the adapter applies before it fetches one (:func:`gpuctl.inputs.check_https_url`). So a job whose
input cannot be read is refused at submit time, instead of starting the GPU and failing there minutes later.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from gpuctl.errors import NotFound, UsageError
from gpuctl.inputs import (
    FORMATS,
    HEADER_BYTES,
    ImageLimits,
    InputRejected,
    Resolver,
    check_https_url,
    check_size,
    display,
    inspect_image,
    redact_url,
)

if TYPE_CHECKING:
    from gpuctl.aws.s3 import ObjectStore

__all__ = ["ImageRef", "RemoteChecks", "check_local_image", "check_remote_image", "input_key", "resolve_image"]

#: Content types that name a format gpuctl takes; any other type is checked by reading the image's header.
_IMAGE_TYPES = frozenset(content_type for content_type, _ in FORMATS.values())


@dataclass(frozen=True)
class ImageRef:
    """An image the job reads: ``url`` is set for remote ones, ``path`` for a local file to upload."""

    url: str | None = None
    path: Path | None = None
    content_type: str | None = None
    size: int = 0

    @property
    def is_local(self) -> bool:
        return self.path is not None


def check_local_image(path: Path, *, limits: ImageLimits) -> ImageRef:
    """Check that ``path`` is a readable image within ``limits``.

    Raises:
        InputRejected: one sentence saying what is wrong with the file.
    """
    shown = display(str(path))
    try:
        if not path.exists():
            raise InputRejected(f"Image file {shown} does not exist.")
        if path.is_dir():
            raise InputRejected(f"{shown} is a directory, not an image file.")
        if not path.is_file():
            raise InputRejected(f"{shown} is not a regular file.")
        size = path.stat().st_size
    except OSError as exc:  # a name too long, a loop of symlinks, a folder we may not enter
        raise InputRejected(f"Image file {shown} cannot be read ({display(exc.strerror or str(exc))}).") from None
    if size == 0:
        raise InputRejected(f"Image file {shown} is empty.")
    info = inspect_image(path, name=f"Image file {shown}", limits=limits, size=size)
    return ImageRef(path=path, content_type=info.content_type, size=size)


def resolve_image(reference: str, *, limits: ImageLimits) -> ImageRef:
    """Classify an IMAGE argument and check what can be checked without the network.

    Raises:
        UsageError: a bad URL or a bad local file.
    """
    if "\x00" in reference:
        raise InputRejected(f"The image reference {display(reference)} contains a NUL character.")
    if reference.startswith("s3://"):
        bucket, _, key = reference[5:].partition("/")
        if not bucket or not key:
            raise InputRejected(f"{display(reference)!r} needs both a bucket and a key (s3://bucket/key).")
        return ImageRef(url=reference)
    if reference.startswith("https://"):
        if len(reference) <= len("https://"):
            raise InputRejected(f"{display(reference)!r} is not a valid https:// URL.")
        return ImageRef(url=reference)
    scheme, sep, _ = reference.partition("://")
    if sep and scheme and scheme.isascii() and scheme.replace("+", "").replace("-", "").isalnum():
        # Never echo the rest: it may carry a user name and password.
        raise InputRejected(f"{display(scheme.lower(), limit=20)}:// image URLs are not accepted; use https://, "
                            "s3:// or a local file.")
    return check_local_image(Path(reference).expanduser(), limits=limits)


def check_remote_image(store: Callable[[], ObjectStore], url: str, *, limits: ImageLimits,
                       resolve: Resolver | None = None) -> None:
    """Check that a remote image can be read by the adapter, with as few requests as possible.

    ``s3://``: one HeadObject (it exists, it is not empty or above ``max_image_mb``); when its content type is not
    one of the image formats gpuctl takes, a ranged GET of its first :data:`~gpuctl.inputs.HEADER_BYTES` bytes,
    read as an image header (format, dimensions within the limits). ``https://``: the adapter's rules for what it
    may fetch (:func:`~gpuctl.inputs.check_https_url`). ``store`` builds the S3 gateway only when it is needed.

    Raises:
        InputRejected: the image does not exist, is empty, too large, not an image, or may not be fetched.
        InputUnavailable: the name server did not answer (transient, exit 4).
        AwsError: S3 refused the request (access denied, throttled, unreachable: exit 4).
    """
    if url.startswith("https://"):
        check_https_url(url, resolve=resolve)
        return
    from gpuctl.aws.s3 import parse_s3_uri

    bucket, key = parse_s3_uri(url)
    name = f"The image {redact_url(url)}"
    gateway = store()
    try:
        head = gateway.head(bucket, key)
    except NotFound:
        raise InputRejected(f"{name} does not exist.") from None
    if head.size == 0:
        raise InputRejected(f"{name} is empty.")
    check_size(name, head.size, limits)
    if (head.content_type or "").split(";")[0].strip().lower() in _IMAGE_TYPES:
        return
    try:
        header = gateway.get_range(bucket, key, HEADER_BYTES)
    except NotFound:
        raise InputRejected(f"{name} does not exist.") from None
    inspect_image(header, name=name, limits=limits, verify=False, size=head.size)


class RemoteChecks:
    """Checks each distinct remote image once (a batch names the same input on many rows)."""

    def __init__(self, store: Callable[[], ObjectStore], limits: ImageLimits, resolve: Resolver | None = None) -> None:
        self._store = store
        self._limits = limits
        self._resolve = resolve
        self._seen: dict[str, UsageError | None] = {}

    def check(self, urls: Iterable[str]) -> None:
        """Raises the first problem of ``urls``: UsageError for the input, GpuctlError for AWS or DNS trouble."""
        for url in urls:
            if url not in self._seen:
                try:
                    check_remote_image(self._store, url, limits=self._limits, resolve=self._resolve)
                    self._seen[url] = None
                except UsageError as exc:
                    self._seen[url] = exc
            problem = self._seen[url]
            if problem is not None:
                raise problem


def input_key(prefix: str, task_id: str, path: Path, index: int) -> str:
    """Where a local input is uploaded: ``<inputs prefix><task_id>/<n>-<file name>``."""
    name = PurePosixPath(path.name).name or "image"
    return f"{prefix}{task_id}/{index}-{name}"
