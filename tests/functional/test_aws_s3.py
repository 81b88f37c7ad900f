"""ObjectStore against moto in-process: upload, size, download, presigned GET, missing objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gpuctl.aws.s3 import parse_s3_uri
from gpuctl.errors import NotFound, UsageError
from tests.helpers import Resources, make_image


def test_upload_then_download_round_trip_with_progress(gateways: Any, aws: Resources, tmp_path: Path) -> None:
    """An uploaded file downloads byte-identical; progress callbacks add up to the size."""
    source = make_image(tmp_path / "in.png", size=(300, 200))
    uri = gateways.store.upload_file(source, aws.bucket, "inputs/t/1-in.png", content_type="image/png")
    assert uri == f"s3://{aws.bucket}/inputs/t/1-in.png"
    size = gateways.store.size(*parse_s3_uri(uri))
    assert size == source.stat().st_size
    seen: list[int] = []
    dest = gateways.store.download_file(aws.bucket, "inputs/t/1-in.png", tmp_path / "out" / "x.png",
                                        on_progress=seen.append)
    assert dest.read_bytes() == source.read_bytes()
    assert sum(seen) == size
    assert not (tmp_path / "out" / "x.png.part").exists()


def test_missing_object_is_not_found_and_leaves_no_partial_file(gateways: Any, aws: Resources,
                                                                 tmp_path: Path) -> None:
    """Downloading or sizing a missing key raises NotFound; no .part file is left behind."""
    with pytest.raises(NotFound, match="does not exist"):
        gateways.store.download_file(aws.bucket, "results/none.png", tmp_path / "none.png")
    with pytest.raises(NotFound):
        gateways.store.size(aws.bucket, "results/none.png")
    assert list(tmp_path.iterdir()) == []


def test_presigned_get_names_the_object(gateways: Any, aws: Resources) -> None:
    """A presigned GET URL points at the key and carries a signature and expiry."""
    url = gateways.store.presign_get(aws.bucket, "results/a b.png", expires=600)
    assert "results/a%20b.png" in url and ("Signature=" in url or "X-Amz-Signature=" in url)


@pytest.mark.parametrize("bad", ["https://x/y", "s3://bucket-only", "s3:///key"])
def test_parse_s3_uri_rejects_incomplete_uris(bad: str) -> None:
    """parse_s3_uri needs the s3:// scheme, a bucket and a key."""
    with pytest.raises(UsageError):
        parse_s3_uri(bad)
