"""`gpuctl result` for results that are not in the configured bucket: an https:// result URL (the running
system's CDN) downloaded as it is, over verified TLS from a real server (a test CA), and an s3:// result in
another bucket read from that bucket."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from gpuctl.models import JobRecord, JobStatus, JobType
from tests.helpers import REGION, HttpsFiles, Resources, run_cli

pytestmark = pytest.mark.server

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 400  # ~100 kB


def _client(res: Resources, service: str) -> Any:
    return boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing").client(
        service, region_name=REGION, endpoint_url=res.endpoint_url
    )


def completed(res: Resources, result: str) -> JobRecord:
    """A job the running system finished, its result URL as that system recorded it."""
    from gpuctl.aws.dynamo import JobTable

    now = time.time()
    record = JobRecord(task_id=str(uuid.uuid4()), status=JobStatus.COMPLETED,
                       job_type=JobType.QWEN_IMAGE_EDIT.api_path, job_kind="qwen-image-edit", created_at=now,
                       updated_at=now, request={"image_url": "s3://x/inputs/a.png", "prompt": "p"},
                       result_s3_uri=result)
    JobTable(_client(res, "dynamodb"), res.table_name).create(record)
    return record


@pytest.fixture(scope="module")
def _cdn_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpsFiles]:
    with HttpsFiles(tmp_path_factory.mktemp("cdn")) as server:
        yield server


@pytest.fixture
def cdn(_cdn_server: HttpsFiles) -> HttpsFiles:
    """A real HTTPS server standing for the running system's CDN (one per module, emptied for each test)."""
    _cdn_server.files.clear()
    _cdn_server.requests.clear()
    return _cdn_server


def test_cdn_result_of_another_system_downloads_as_it_is(server_aws: Resources, cdn: HttpsFiles,
                                                         tmp_path: Path) -> None:
    """An https:// result (another system's CDN and bucket) is fetched from that URL, not the configured bucket."""
    # GIVEN a job finished by the running system: its CDN URL, a key the configured bucket does not hold
    path = "/images/comfyui-results/qwen-image-edit/job-1.png"
    cdn.files[path] = PNG
    job = completed(server_aws, cdn.base_url + path)
    env = {**server_aws.env(), "SSL_CERT_FILE": str(cdn.ca_file)}
    # WHEN its result is downloaded into a folder
    saved = run_cli(["result", job.task_id, "-o", str(tmp_path), "--output", "json"], env)
    # THEN the file holds the CDN's bytes, named after the job
    assert saved.returncode == 0, saved.stderr
    doc = json.loads(saved.stdout)
    assert doc == {"job_id": job.task_id, "path": str(tmp_path / f"{job.task_id}.png"), "bytes": len(PNG),
                   "source": cdn.base_url + path}
    assert (tmp_path / f"{job.task_id}.png").read_bytes() == PNG
    assert not list(tmp_path.glob("*.part"))
    assert cdn.requests == [path]


def test_cdn_result_over_an_untrusted_certificate_is_refused(server_aws: Resources, cdn: HttpsFiles,
                                                            tmp_path: Path) -> None:
    """Certificates are verified: without the CA the download fails with exit 4 and writes nothing."""
    cdn.files["/results/r.png"] = PNG
    job = completed(server_aws, cdn.base_url + "/results/r.png")
    proc = run_cli(["result", job.task_id, "-o", str(tmp_path / "r.png")], server_aws.env())
    assert proc.returncode == 4, proc.stderr
    assert "Cannot download the result" in proc.stderr and "CERTIFICATE_VERIFY_FAILED" in proc.stderr
    assert list(tmp_path.glob("r.png*")) == []


def test_s3_result_in_another_bucket_is_read_from_that_bucket(server_aws: Resources, tmp_path: Path) -> None:
    """An s3:// result naming another bucket is downloaded from that bucket."""
    s3 = _client(server_aws, "s3")
    s3.create_bucket(Bucket="the-other-system")
    s3.put_object(Bucket="the-other-system", Key="results/q/out.png", Body=PNG)
    job = completed(server_aws, "s3://the-other-system/results/q/out.png")
    proc = run_cli(["result", job.task_id, "-o", str(tmp_path)], server_aws.env())
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / f"{job.task_id}.png").read_bytes() == PNG


# --- the service, in-process ---------------------------------------------------------------------------

def _record(gateways: Any, result: str) -> JobRecord:
    now = time.time()
    record = JobRecord(task_id=str(uuid.uuid4()), status=JobStatus.COMPLETED,
                       job_type=JobType.CAMERA_ANGLE.api_path, created_at=now, updated_at=now, result_s3_uri=result)
    gateways.table.create(record)
    return record


def test_https_download_reports_progress_up_to_the_size(gateways: Any, cdn: HttpsFiles, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The https download feeds the same progress callback as the S3 one: growing, ending at the size."""
    from gpuctl.services.jobs import download_result

    monkeypatch.setenv("SSL_CERT_FILE", str(cdn.ca_file))
    cdn.files["/results/j/out.png"] = PNG
    job = _record(gateways, cdn.base_url + "/results/j/out.png")
    progress: list[tuple[int, int]] = []
    saved = download_result(gateways, job.task_id, tmp_path, on_progress=lambda d, t: progress.append((d, t)))
    assert saved.path.read_bytes() == PNG and saved.size == len(PNG)
    assert progress[-1] == (len(PNG), len(PNG))
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)


def test_s3_result_in_a_bucket_the_credentials_may_not_read_names_it(gateways: Any, aws: Resources,
                                                                     tmp_path: Path) -> None:
    """A 403 on another bucket's result says which bucket, that it is not the profile's, and leaves no file.

    moto does not enforce bucket policies, so the 403 of HeadObject comes from botocore's Stubber."""
    from botocore.stub import Stubber

    from gpuctl.errors import EXIT_AWS, AwsError
    from gpuctl.services.jobs import download_result

    job = _record(gateways, "s3://their-bucket/results/q/out.png")
    with Stubber(gateways.clients.s3) as stub:
        stub.add_client_error("head_object", service_error_code="403", service_message="Forbidden",
                              http_status_code=403)
        with pytest.raises(AwsError) as caught:
            download_result(gateways, job.task_id, tmp_path)
    assert caught.value.exit_code == EXIT_AWS
    assert str(caught.value) == (
        "Access denied to the result s3://their-bucket/results/q/out.png (403): it is in the bucket their-bucket, "
        f"not this profile's bucket {aws.bucket}, and your credentials may not read it (s3:GetObject on "
        "their-bucket).")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("entry", "limit_mb", "error", "message"), [
    (404, None, "NotFound", "answered HTTP 404: it is not there"),
    (503, None, "AwsError", "answered HTTP 503; try again shortly"),
    (PNG, 0.05, "UsageError", "is larger than max_result_mb (0.05 MB)"),
    (("chunked", PNG), 0.05, "UsageError", "is larger than max_result_mb (0.05 MB)"),
    (("redirect", "http://localhost:9/x.png"), None, "UsageError", "redirects to http://"),
], ids=["gone", "unavailable", "too-large", "too-large-unannounced", "redirect-to-http"])
def test_https_result_that_cannot_be_downloaded_is_one_sentence_and_no_file(
        aws: Resources, cdn: HttpsFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: Any,
        limit_mb: float | None, error: str, message: str) -> None:
    """A missing, failing, oversized or downgraded https result: its error (exit 1, 4, 2), no file at all."""
    from gpuctl import errors
    from gpuctl.services.context import Gateways
    from gpuctl.services.jobs import download_result
    from gpuctl.settings import Settings

    # GIVEN a completed job whose CDN answers badly
    monkeypatch.setenv("SSL_CERT_FILE", str(cdn.ca_file))
    limits = {"max_result_mb": limit_mb} if limit_mb else {}
    gateways = Gateways(Settings(**aws.settings_kwargs(), **limits))
    cdn.files["/results/r.png"] = entry
    job = _record(gateways, cdn.base_url + "/results/r.png")
    # WHEN the result is downloaded
    with pytest.raises(errors.GpuctlError) as caught:
        download_result(gateways, job.task_id, tmp_path / "out" / "r.png")
    # THEN one sentence of the expected kind, and nothing written (no half file either)
    assert type(caught.value).__name__ == error and message in str(caught.value), caught.value
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
