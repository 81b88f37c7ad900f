"""`gpuctl queue stats|redrive|purge` against moto's server, and purge's job bookkeeping in-process."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import boto3
import pytest

from gpuctl.models import JobRecord, JobStatus
from tests.helpers import MAX_RECEIVE, REGION, Resources, run_cli


def _sqs(res: Resources) -> Any:
    return boto3.client("sqs", region_name=REGION, endpoint_url=res.endpoint_url,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _depth(sqs: Any, url: str) -> int:
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
    return int(attrs["Attributes"]["ApproximateNumberOfMessages"])


@pytest.mark.server
def test_stats_then_redrive_moves_dead_letters_back(server_aws: Resources) -> None:
    """stats counts the DLQ; redrive (moto lacks StartMessageMoveTask) copies the messages back."""
    # GIVEN two messages in the DLQ and one in the queue
    sqs = _sqs(server_aws)
    for body in ("dead-1", "dead-2"):
        sqs.send_message(QueueUrl=server_aws.dlq_url, MessageBody=body)
    sqs.send_message(QueueUrl=server_aws.queue_url, MessageBody="live")
    env = server_aws.env() | {"GPUCTL_MAX_ATTEMPTS": "1"}
    # WHEN stats and redrive run
    stats = run_cli(["queue", "stats", "--output", "json"], env)
    moved = run_cli(["queue", "redrive", "--output", "json"], env)
    # THEN stats saw them, and redrive says how many moved and how
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout) == {"visible": 1, "in_flight": 0, "delayed": 0, "dlq": 2,
                                        "max_receive_count": MAX_RECEIVE, "visibility_timeout": 300}
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout) == {"moved": 2, "method": "receive-send-delete", "task_handle": None}
    assert (_depth(sqs, server_aws.queue_url), _depth(sqs, server_aws.dlq_url)) == (3, 0)


@pytest.mark.server
def test_purge_needs_yes_without_a_terminal(server_aws: Resources) -> None:
    """Piped stdin and no --yes: exit 2 and nothing deleted; with --yes the queue is emptied."""
    sqs = _sqs(server_aws)
    sqs.send_message(QueueUrl=server_aws.queue_url, MessageBody="x")
    refused = run_cli(["queue", "purge"], server_aws.env(), input="y\n")
    assert refused.returncode == 2 and "pass --yes" in refused.stderr
    assert _depth(sqs, server_aws.queue_url) == 1
    purged = run_cli(["queue", "purge", "--yes", "-q"], server_aws.env())
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.strip() == server_aws.queue_url
    assert _depth(sqs, server_aws.queue_url) == 0


def test_purge_fails_the_pending_jobs_it_orphans(gateways: Any) -> None:
    """After a purge, jobs that were pending end failed (no job waits forever); others are untouched."""
    from gpuctl.services.queue import PURGED_MESSAGE, purge_queue

    now = time.time()
    jobs = {s: JobRecord(task_id=str(uuid.uuid4()), status=s, job_type="/api/v1/camera-angle/jobs",
                         created_at=now - 5, updated_at=now - 5) for s in (JobStatus.PENDING, JobStatus.PROCESSING)}
    for record in jobs.values():
        gateways.table.create(record)
    gateways.queue.send("{}")
    assert purge_queue(gateways) == 1
    pending = gateways.table.get(jobs[JobStatus.PENDING].task_id)
    assert (pending.status, pending.error_message) == (JobStatus.FAILED, PURGED_MESSAGE)
    assert gateways.table.get(jobs[JobStatus.PROCESSING].task_id).status is JobStatus.PROCESSING
    assert gateways.queue.stats().visible == 0
