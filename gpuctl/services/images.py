"""Image references: a local file (checked with Pillow, uploaded), an s3:// URI, or an https:// URL."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from gpuctl.errors import UsageError

__all__ = ["ImageRef", "check_local_image", "resolve_image"]

_CONTENT_TYPES = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "GIF": "image/gif",
    "TIFF": "image/tiff",
}
_MAX_SIDE = 16384


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


def check_local_image(path: Path, *, max_bytes: int) -> ImageRef:
    """Check that ``path`` is a readable image no larger than ``max_bytes``.

    Raises:
        UsageError: one sentence saying what is wrong with the file.
    """
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise UsageError(f"Image file {path} does not exist.")
    if not path.is_file():
        raise UsageError(f"{path} is not a file.")
    size = path.stat().st_size
    if size == 0:
        raise UsageError(f"Image file {path} is empty.")
    if size > max_bytes:
        raise UsageError(
            f"Image file {path} is {size / 1e6:.1f} MB, larger than the {max_bytes / 1e6:.0f} MB limit "
            "(GPUCTL_MAX_IMAGE_MB)."
        )
    try:
        with Image.open(path) as img:
            fmt = img.format or ""
            width, height = img.size
            img.verify()
    except PermissionError:
        raise UsageError(f"Image file {path} is not readable (permission denied).") from None
    except UnidentifiedImageError:
        raise UsageError(f"{path} is not an image Pillow can read (JPEG, PNG, WebP …).") from None
    except Image.DecompressionBombError:
        raise UsageError(f"{path} has too many pixels to be a safe input image.") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UsageError(f"{path} is not a valid image: {exc}.") from None
    if fmt not in _CONTENT_TYPES:
        raise UsageError(f"{path} is a {fmt or 'unknown'} image; use JPEG, PNG, WebP, BMP, GIF or TIFF.")
    if max(width, height) > _MAX_SIDE:
        raise UsageError(f"{path} is {width}x{height}; the largest side may be at most {_MAX_SIDE} pixels.")
    return ImageRef(path=path, content_type=_CONTENT_TYPES[fmt], size=size)


def resolve_image(reference: str, *, max_bytes: int) -> ImageRef:
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
    return check_local_image(Path(reference).expanduser(), max_bytes=max_bytes)


def input_key(prefix: str, task_id: str, path: Path, index: int) -> str:
    """Where a local input is uploaded: ``<inputs prefix><task_id>/<n>-<file name>``."""
    name = PurePosixPath(path.name).name or "image"
    return f"{prefix}{task_id}/{index}-{name}"
