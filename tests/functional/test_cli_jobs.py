"""`gpuctl status`, `result` and `jobs list|cancel|retry`: the CLI in a subprocess against moto's server,
and the jobs service in-process."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from gpuctl.models import JobRecord, JobStatus, JobType
from tests.helpers import REGION, Resources, run_cli

pytestmark = pytest.mark.server

REQUEST = {"image_url": "s3://gpuctl-test-bucket/inputs/a.png", "prompt": "make it blue", "steps": 4}


def _client(res: Resources, service: str) -> Any:
    return boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing").client(
        service, region_name=REGION, endpoint_url=res.endpoint_url
    )


def seed(res: Resources, status: JobStatus = JobStatus.PENDING, *, created_at: float | None = None,
         **fields: Any) -> JobRecord:
    """Write a job record straight into the table, as another client (or the adapter) would."""
    from gpuctl.aws.dynamo import JobTable

    now = created_at if created_at is not None else time.time()
    record = JobRecord(task_id=str(uuid.uuid4()), status=status, job_type=JobType.QWEN_IMAGE_EDIT.api_path,
                       job_kind="qwen-image-edit", created_at=now, updated_at=now, request=REQUEST, **fields)
    JobTable(_client(res, "dynamodb"), res.table_name).create(record)
    return record


def read(res: Resources, task_id: str) -> JobRecord:
    from gpuctl.aws.dynamo import JobTable

    return JobTable(_client(res, "dynamodb"), res.table_name).get(task_id)


# --- status ------------------------------------------------------------------------------------------

def test_status_prints_the_status_document_as_json(server_aws: Resources) -> None:
    """`status --output json` prints the SPEC §3 document and nothing else on stdout."""
    # GIVEN a completed job
    record = seed(server_aws, JobStatus.COMPLETED, result_s3_uri="s3://b/results/x.png")
    # WHEN its status is asked for as JSON
    proc = run_cli(["status", record.task_id, "--output", "json"], server_aws.env())
    # THEN the document has the contract keys
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["job_id"] == record.task_id
    assert doc["status"] == "completed"
    assert doc["result_s3_uri"] == "s3://b/results/x.png"
    assert doc["error"] is None


def test_status_text_shows_fields_and_quiet_shows_the_status(server_aws: Resources) -> None:
    """Text mode shows a table of fields; -q prints the bare status."""
    record = seed(server_aws, JobStatus.FAILED, error_message="backend exploded")
    text = run_cli(["status", record.task_id], server_aws.env())
    quiet = run_cli(["status", record.task_id, "-q"], server_aws.env())
    assert text.returncode == 0 and "backend exploded" in text.stdout and "qwen-image-edit" in text.stdout
    assert quiet.stdout == "failed\n"


# --- bad inputs ---------------------------------------------------------------------------------------

MISSING_ID = "3f2b8c1e-4d5a-4b6c-8d7e-9f0a1b2c3d4e"
# Settings that look complete but point nowhere: each bad input below must fail before any AWS call.
OFFLINE_ENV = {"GPUCTL_REGION": REGION, "GPUCTL_ENDPOINT_URL": "http://127.0.0.1:9",
               "GPUCTL_QUEUE_URL": "http://127.0.0.1:9/123456789012/q", "GPUCTL_TABLE_NAME": "t",
               "GPUCTL_INSTANCE_ID": "i-0123456789abcdef0", "GPUCTL_BUCKET": "b", "GPUCTL_MAX_ATTEMPTS": "1"}


@pytest.mark.parametrize(
    ("args", "drop", "message"),
    [
        pytest.param(["status", "not-a-uuid"], None, "'not-a-uuid' is not a job id", id="malformed-id"),
        pytest.param(["jobs", "cancel", "12345"], None, "'12345' is not a job id", id="malformed-cancel"),
        pytest.param(["queue", "stats"], "GPUCTL_QUEUE_URL", "set SQS_QUEUE_URL", id="no-queue-url"),
        pytest.param(["status", MISSING_ID], "GPUCTL_TABLE_NAME", "set DYNAMODB_TABLE", id="no-table"),
        pytest.param(["instance", "status"], "GPUCTL_INSTANCE_ID", "set GPU_INSTANCE_ID", id="no-instance"),
        pytest.param(["jobs", "list", "--status", "done"], None, "Unknown status 'done'", id="bad-status"),
        pytest.param(["jobs", "list", "--since", "3 fortnights"], None, "is not a duration", id="bad-since"),
        pytest.param(["jobs", "list", "--limit", "0"], None, "--limit must be at least 1", id="bad-limit"),
        pytest.param(["watch", MISSING_ID, "--timeout", "-1"], None, "--timeout must be a positive number",
                     id="bad-timeout"),
        pytest.param(["result", MISSING_ID, "--url", "-o", "x.png"], None, "either --url or --output-file",
                     id="url-and-file"),
    ],
)
def test_bad_input_exits_2_with_one_sentence(args: list[str], drop: str | None, message: str) -> None:
    """Each bad input or missing setting exits 2 with a one-line message, before any AWS call."""
    # GIVEN settings with one of them missing (or none)
    env = dict(OFFLINE_ENV)
    if drop:
        env[drop] = ""
    # WHEN the command runs
    proc = run_cli(args, env)
    # THEN exit 2, the sentence names the problem, and stdout carries no data
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and "Cannot reach" not in proc.stderr
    assert proc.stdout == ""


def test_unknown_job_and_missing_queue_are_clean_errors(server_aws: Resources) -> None:
    """An unknown job id and a queue that does not exist each give exit 1 and one sentence."""
    env = server_aws.env()
    unknown = run_cli(["status", MISSING_ID], env)
    nope = f"{server_aws.endpoint_url}/123456789012/nope"
    missing = run_cli(["queue", "stats"], env | {"GPUCTL_QUEUE_URL": nope})
    assert (unknown.returncode, unknown.stdout) == (1, "")
    assert f"Error: Job {MISSING_ID} does not exist." in unknown.stderr
    assert (missing.returncode, missing.stdout) == (1, "")
    assert f"The SQS queue {nope} does not exist" in missing.stderr
    assert "Traceback" not in unknown.stderr + missing.stderr


# --- jobs list -----------------------------------------------------------------------------------------

def test_jobs_list_merges_statuses_newest_first_and_applies_limit(server_aws: Resources) -> None:
    """Without --status every status is queried and merged newest first; --limit caps the merged list."""
    # GIVEN jobs in several statuses, created a second apart
    base = time.time() - 100
    records = [seed(server_aws, status, created_at=base + i)
               for i, status in enumerate([JobStatus.PENDING, JobStatus.COMPLETED, JobStatus.FAILED,
                                           JobStatus.PROCESSING, JobStatus.PENDING])]
    # WHEN listed with a limit of 3
    proc = run_cli(["jobs", "list", "--limit", "3", "--output", "json"], server_aws.env())
    # THEN the three newest come back, newest first, as status documents, with a token for the rest
    assert proc.returncode == 0, proc.stderr
    page = json.loads(proc.stdout)
    docs = page["jobs"]
    assert [d["job_id"] for d in docs] == [r.task_id for r in reversed(records)][:3]
    assert [d["status"] for d in docs] == ["pending", "processing", "failed"]
    rest = run_cli(["jobs", "list", "--limit", "3", "--next-token", page["next_token"], "-o", "json"],
                   server_aws.env())
    assert rest.returncode == 0, rest.stderr
    assert [d["job_id"] for d in json.loads(rest.stdout)["jobs"]] == [r.task_id for r in reversed(records)][3:]
    assert json.loads(rest.stdout)["next_token"] is None


def test_jobs_list_filters_by_status_and_age_and_prints_ids_quietly(server_aws: Resources) -> None:
    """--status and --since narrow the GSI query; -q prints bare ids."""
    old = seed(server_aws, JobStatus.FAILED, created_at=time.time() - 3 * 3600)
    new = seed(server_aws, JobStatus.FAILED)
    seed(server_aws, JobStatus.PENDING)
    proc = run_cli(["jobs", "list", "--status", "FAILED", "--since", "1h", "-q"], server_aws.env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [new.task_id]
    assert old.task_id not in proc.stdout


# --- jobs cancel ---------------------------------------------------------------------------------------

def test_cancel_ends_a_pending_job_failed_and_flags_a_processing_one(server_aws: Resources) -> None:
    """Pending → failed "cancelled by user"; processing → cancel_requested, status unchanged."""
    pending = seed(server_aws, JobStatus.PENDING)
    processing = seed(server_aws, JobStatus.PROCESSING)
    first = run_cli(["jobs", "cancel", pending.task_id, "--output", "json"], server_aws.env())
    second = run_cli(["jobs", "cancel", processing.task_id, "--output", "json"], server_aws.env())
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert json.loads(first.stdout)["action"] == "cancelled"
    assert json.loads(second.stdout)["action"] == "cancel-requested"
    after = read(server_aws, pending.task_id)
    assert (after.status, after.error_message) == (JobStatus.FAILED, "cancelled by user")
    flagged = read(server_aws, processing.task_id)
    assert (flagged.status, flagged.cancel_requested) == (JobStatus.PROCESSING, True)


def test_cancel_refuses_a_finished_job(server_aws: Resources) -> None:
    """A completed job cannot be cancelled: exit 1, it stays completed."""
    done = seed(server_aws, JobStatus.COMPLETED, result_s3_uri="s3://b/k.png")
    proc = run_cli(["jobs", "cancel", done.task_id], server_aws.env())
    assert proc.returncode == 1
    assert "already finished (completed)" in proc.stderr
    assert read(server_aws, done.task_id).status is JobStatus.COMPLETED


# --- jobs retry ----------------------------------------------------------------------------------------

def test_retry_submits_the_same_request_linked_to_the_old_job(server_aws: Resources) -> None:
    """retry prints a new job id whose record and queued message repeat the old request."""
    # GIVEN a failed job
    old = seed(server_aws, JobStatus.FAILED, error_message="out of memory")
    # WHEN it is retried
    proc = run_cli(["jobs", "retry", old.task_id, "-q", "--no-start"], server_aws.env())
    # THEN a new pending job points back at it, and its message carries the same request
    assert proc.returncode == 0, proc.stderr
    new_id = proc.stdout.strip()
    assert new_id != old.task_id
    new = read(server_aws, new_id)
    assert (new.status, new.retry_of, new.request) == (JobStatus.PENDING, old.task_id, REQUEST | {
        "cfg": 1.0, "sampler_name": "sa_solver", "scheduler": "beta", "denoise": 1.0})
    messages = _client(server_aws, "sqs").receive_message(QueueUrl=server_aws.queue_url, WaitTimeSeconds=0)
    body = json.loads(messages["Messages"][0]["Body"])
    assert body["task_id"] == new_id and body["api_path"] == "/api/v1/qwen-image-edit/jobs"


def test_retry_refuses_an_unfinished_job(server_aws: Resources) -> None:
    """A job still pending is not duplicated by retry (exit 1)."""
    pending = seed(server_aws, JobStatus.PENDING)
    proc = run_cli(["jobs", "retry", pending.task_id], server_aws.env())
    assert proc.returncode == 1 and "still pending" in proc.stderr


# --- result --------------------------------------------------------------------------------------------

def test_result_downloads_the_file_and_prints_a_working_url(server_aws: Resources, tmp_path: Path) -> None:
    """`result -o` writes the object's bytes; `result --url` prints a URL that serves the same bytes."""
    # GIVEN a completed job whose result is in the bucket
    payload = b"\x89PNG fake result bytes" * 100
    _client(server_aws, "s3").put_object(Bucket=server_aws.bucket, Key="results/out.png", Body=payload)
    done = seed(server_aws, JobStatus.COMPLETED, result_s3_uri=f"s3://{server_aws.bucket}/results/out.png")
    # WHEN it is downloaded and a URL is asked for
    dest = tmp_path / "got.png"
    saved = run_cli(["result", done.task_id, "-o", str(dest)], server_aws.env())
    url = run_cli(["result", done.task_id, "--url"], server_aws.env())
    # THEN the file holds the bytes, stdout names it, and the URL serves the bytes too
    assert saved.returncode == 0, saved.stderr
    assert saved.stdout.strip() == str(dest)
    assert dest.read_bytes() == payload
    assert url.returncode == 0, url.stderr
    assert httpx.get(url.stdout.strip(), timeout=10).content == payload


def test_result_of_an_unfinished_job_is_a_clear_error(server_aws: Resources, tmp_path: Path) -> None:
    """A processing job has no result yet: exit 1, and no file is written."""
    running = seed(server_aws, JobStatus.PROCESSING)
    proc = run_cli(["result", running.task_id, "-o", str(tmp_path / "x.png")], server_aws.env())
    assert proc.returncode == 1
    assert "is processing and has no result yet" in proc.stderr
    assert list(tmp_path.iterdir()) == []


# --- the service, in-process ---------------------------------------------------------------------------

def _local(gateways: Any, status: JobStatus, **fields: Any) -> JobRecord:
    now = time.time()
    record = JobRecord(task_id=str(uuid.uuid4()), status=status, job_type=JobType.CAMERA_ANGLE.api_path,
                       created_at=now, updated_at=now, **fields)
    gateways.table.create(record)
    return record


def test_failed_job_result_names_the_error(gateways: Any) -> None:
    """Asking for the result of a failed job says why it failed."""
    from gpuctl.errors import Conflict
    from gpuctl.services.jobs import result_url

    failed = _local(gateways, JobStatus.FAILED, error_message="cancelled by user")
    with pytest.raises(Conflict, match="failed, so it has no result: cancelled by user"):
        result_url(gateways, failed.task_id)


def test_cancel_that_races_with_completion_is_refused(gateways: Any) -> None:
    """A job that finished while cancel ran is reported finished, not overwritten."""
    from gpuctl.errors import Conflict
    from gpuctl.services.jobs import cancel_job

    done = _local(gateways, JobStatus.COMPLETED, result_s3_uri="s3://b/k")
    with pytest.raises(Conflict, match="already finished"):
        cancel_job(gateways, done.task_id)
    assert gateways.table.get(done.task_id).result_s3_uri == "s3://b/k"


@pytest.mark.parametrize(("text", "seconds"), [("30m", 1800), ("1h", 3600), ("2d", 172800), ("45s", 45),
                                               ("1.5h", 5400), (" 1W ", 604800)])
def test_since_ages(text: str, seconds: int) -> None:
    """--since accepts a number and a unit (s, m, h, d, w)."""
    from gpuctl.services.jobs import parse_since

    assert parse_since(text, now=10_000_000.0) == 10_000_000.0 - seconds
