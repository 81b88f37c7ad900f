"""Image references: a local file (checked with Pillow, uploaded), an s3:// URI, or an https:// URL."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from gpuctl.errors import UsageError
from gpuctl.inputs import ImageLimits, InputRejected, inspect_image

__all__ = ["ImageRef", "check_local_image", "resolve_image"]

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
    if not path.exists():
        raise InputRejected(f"Image file {path} does not exist.")
    if path.is_dir():
        raise InputRejected(f"{path} is a directory, not an image file.")
    if not path.is_file():
        raise InputRejected(f"{path} is not a regular file.")
    size = path.stat().st_size
    if size == 0:
        raise InputRejected(f"Image file {path} is empty.")
    info = inspect_image(path, name=f"Image file {path}", limits=limits, size=size)
    return ImageRef(path=path, content_type=info.content_type, size=size)


def resolve_image(reference: str, *, limits: ImageLimits) -> ImageRef:
    """Classify and check an IMAGE argument without touching the network.

    Raises:
        UsageError: a bad URL or a bad local file.
    """
    if reference.startswith("s3://"):
        bucket, _, key = reference[5:].partition("/")
        if not bucket or not key:
            raise UsageError(f"{reference!r} needs both a bucket and a key (s3://bucket/key).")
        return ImageRef(url=reference)
    if reference.startswith("https://"):
        if len(reference) <= len("https://"):
            raise UsageError(f"{reference!r} is not a valid https:// URL.")
        return ImageRef(url=reference)
    if reference.startswith(("http://", "ftp://", "file://")):
        scheme = reference.split(":", 1)[0]
        raise UsageError(f"{scheme}:// image URLs are not accepted; use https://, s3:// or a local file.")
    return check_local_image(Path(reference).expanduser(), limits=limits)


def input_key(prefix: str, task_id: str, path: Path, index: int) -> str:
    """Where a local input is uploaded: ``<inputs prefix><task_id>/<n>-<file name>``."""
    name = PurePosixPath(path.name).name or "image"
    return f"{prefix}{task_id}/{index}-{name}"
