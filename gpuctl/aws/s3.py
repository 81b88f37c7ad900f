"""S3 gateway: input uploads, result downloads, presigned URLs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpuctl.aws._errors import error_code, translate
from gpuctl.errors import NotFound, UsageError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["ObjectHead", "ObjectStore", "parse_s3_uri"]

Progress = Callable[[int], None]


@dataclass(frozen=True)
class ObjectHead:
    size: int
    content_type: str | None


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` → ``(bucket, key)``.

    Raises:
        UsageError: not an s3:// URI with a bucket and a key.
    """
    if not uri.startswith("s3://"):
        raise UsageError(f"{uri!r} is not an s3:// URI.")
    bucket, _, key = uri[5:].partition("/")
    if not bucket or not key:
        raise UsageError(f"{uri!r} needs both a bucket and a key (s3://bucket/key).")
    return bucket, key


class ObjectStore:
    """Typed access to S3 objects."""

    def __init__(self, client: S3Client) -> None:
        self._client = client

    def _fail(self, exc: Exception, bucket: str, key: str) -> Exception:
        code = error_code(exc)
        if code in {"404", "NoSuchKey", "NotFound"}:
            return NotFound(f"s3://{bucket}/{key} does not exist.")
        return translate(exc, f"s3://{bucket}/{key}")

    def lifecycle_rules(self, bucket: str) -> list[dict[str, Any]]:
        """The bucket's enabled lifecycle rules (none: an empty list)."""
        import botocore.exceptions

        try:
            answer: Any = self._client.get_bucket_lifecycle_configuration(Bucket=bucket)
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) == "NoSuchLifecycleConfiguration":
                return []
            raise translate(exc, f"the bucket {bucket}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise translate(exc, f"the bucket {bucket}") from exc
        return [dict(r) for r in answer.get("Rules", []) if r.get("Status") == "Enabled"]

    def upload_file(
        self, path: Path, bucket: str, key: str, *, content_type: str | None = None,
        on_progress: Progress | None = None,
    ) -> str:
        """Upload a local file (multipart when large); return its s3:// URI."""
        import boto3.exceptions
        import botocore.exceptions

        extra: dict[str, Any] = {"ContentType": content_type} if content_type else {}
        try:
            self._client.upload_file(str(path), bucket, key, ExtraArgs=extra or None, Callback=on_progress)
        except boto3.exceptions.S3UploadFailedError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, botocore.exceptions.ClientError):
                raise self._fail(cause, bucket, key) from exc
            raise translate(botocore.exceptions.BotoCoreError(), f"s3://{bucket}/{key}") from exc
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._fail(exc, bucket, key) from exc
        return f"s3://{bucket}/{key}"

    def put_bytes(self, data: bytes, bucket: str, key: str, *, content_type: str | None = None) -> str:
        import botocore.exceptions

        try:
            self._client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type or "")
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._fail(exc, bucket, key) from exc
        return f"s3://{bucket}/{key}"

    def size(self, bucket: str, key: str) -> int:
        """The object's size in bytes.

        Raises:
            NotFound: no such object.
        """
        import botocore.exceptions

        try:
            return int(self._client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._fail(exc, bucket, key) from exc

    def head(self, bucket: str, key: str) -> ObjectHead:
        """The object's size and content type (one HeadObject).

        Raises:
            NotFound: no such object.
        """
        import botocore.exceptions

        try:
            response = self._client.head_object(Bucket=bucket, Key=key)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._fail(exc, bucket, key) from exc
        return ObjectHead(int(response["ContentLength"]), response.get("ContentType") or None)

    def get_range(self, bucket: str, key: str, length: int) -> bytes:
        """The first ``length`` bytes of the object (a ranged GET)."""
        import botocore.exceptions

        try:
            response = self._client.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{max(0, length - 1)}")
            return response["Body"].read()
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._fail(exc, bucket, key) from exc

    def delete(self, bucket: str, key: str) -> None:
        """Delete one object (deleting a missing one is not an error, as in S3)."""
        import botocore.exceptions

        try:
            self._client.delete_object(Bucket=bucket, Key=key)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._fail(exc, bucket, key) from exc

    def get_bytes(self, bucket: str, key: str, *, max_bytes: int | None = None) -> bytes:
        """Read a whole object; refuse one larger than ``max_bytes``."""
        import botocore.exceptions

        try:
            response = self._client.get_object(Bucket=bucket, Key=key)
            if max_bytes is not None and int(response.get("ContentLength", 0)) > max_bytes:
                response["Body"].close()
                raise UsageError(f"s3://{bucket}/{key} is larger than {max_bytes} bytes.")
            return response["Body"].read()
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._fail(exc, bucket, key) from exc

    def download_file(
        self, bucket: str, key: str, dest: Path, *, on_progress: Progress | None = None
    ) -> Path:
        import botocore.exceptions

        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        try:
            self._client.download_file(bucket, key, str(tmp), Callback=on_progress)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            tmp.unlink(missing_ok=True)
            raise self._fail(exc, bucket, key) from exc
        tmp.replace(dest)
        return dest

    def presign_get(self, bucket: str, key: str, *, expires: int) -> str:
        return str(self._client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires
        ))
