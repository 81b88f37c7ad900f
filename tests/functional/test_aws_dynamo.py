"""JobTable against moto in-process: conditional creates and transitions, GSI queries with pagination."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from gpuctl.aws.dynamo import JobAlreadyExists, TransitionRefused
from gpuctl.errors import NotFound
from gpuctl.models import JobRecord, JobStatus, JobType


def _record(status: JobStatus = JobStatus.PENDING, created_at: float | None = None, **fields: Any) -> JobRecord:
    now = time.time() if created_at is None else created_at
    return JobRecord(task_id=str(uuid.uuid4()), status=status, job_type=JobType.CAMERA_ANGLE.api_path,
                     created_at=now, updated_at=now, **fields)


def test_create_never_overwrites(gateways: Any) -> None:
    """A second create with the same task_id raises JobAlreadyExists and keeps the first record."""
    table = gateways.table
    record = _record(request={"image_url": "s3://b/k.png"})
    table.create(record)
    with pytest.raises(JobAlreadyExists):
        table.create(record.model_copy(update={"status": JobStatus.COMPLETED}))
    assert table.get(record.task_id) == record


def test_transitions_only_move_forward(gateways: Any) -> None:
    """pending → processing → completed succeeds; a late duplicate processing is refused with the current record."""
    table = gateways.table
    record = _record()
    table.create(record)
    assert table.transition(record.task_id, JobStatus.PROCESSING, fields={"worker": "w1"}).worker == "w1"
    done = table.transition(record.task_id, JobStatus.COMPLETED, fields={"result_s3_uri": "s3://b/r"})
    assert done.status is JobStatus.COMPLETED and done.updated_at >= record.updated_at
    with pytest.raises(TransitionRefused) as refused:
        table.transition(record.task_id, JobStatus.PROCESSING)
    assert refused.value.current is not None and refused.value.current.status is JobStatus.COMPLETED
    with pytest.raises(TransitionRefused):
        table.transition(record.task_id, JobStatus.FAILED)
    assert table.get(record.task_id).result_s3_uri == "s3://b/r"


def test_transition_and_update_of_a_missing_job_raise_not_found(gateways: Any) -> None:
    """Conditional writes on a task_id that does not exist say so instead of creating a record."""
    missing = str(uuid.uuid4())
    with pytest.raises(NotFound):
        gateways.table.transition(missing, JobStatus.PROCESSING)
    with pytest.raises(NotFound):
        gateways.table.update_fields(missing, {"progress": 0.5})
    with pytest.raises(NotFound):
        gateways.table.get(missing)


def test_update_fields_only_if_status(gateways: Any) -> None:
    """update_fields with only_if writes in that status and refuses in another."""
    table = gateways.table
    record = _record(JobStatus.PROCESSING)
    table.create(record)
    assert table.update_fields(record.task_id, {"cancel_requested": True},
                               only_if={JobStatus.PROCESSING}).cancel_requested
    with pytest.raises(TransitionRefused):
        table.update_fields(record.task_id, {"progress": 0.1}, only_if={JobStatus.PENDING})


def test_query_status_pages_newest_first_without_duplicates(gateways: Any) -> None:
    """query_status follows LastEvaluatedKey across 1 MB pages, newest first, and stops at the limit."""
    # GIVEN 150 pending jobs of ~10 KB each (moto pages at 1 MB, so ~99 a page) and some completed ones
    table = gateways.table
    base = 1_700_000_000.0
    big = {"image_url": "s3://b/k.png", "prompt": "x" * 10_000}
    records = [_record(created_at=base + i, request=big) for i in range(150)]
    assert table.batch_create(records) == []
    table.batch_create([_record(JobStatus.COMPLETED, created_at=base + 500 + i) for i in range(5)])
    # WHEN queried without and with a limit that crosses a page
    everything = list(table.query_status(JobStatus.PENDING))
    first_120 = list(table.query_status(JobStatus.PENDING, limit=120))
    recent = list(table.query_status(JobStatus.PENDING, since=base + 140))
    # THEN every job comes once, newest first; the limit and the lower bound hold
    expected = [r.task_id for r in sorted(records, key=lambda r: r.created_at, reverse=True)]
    assert [r.task_id for r in everything] == expected
    assert [r.task_id for r in first_120] == expected[:120]
    assert [r.task_id for r in recent] == expected[:10]
    assert table.count_status(JobStatus.PENDING) == 150
    assert table.count_status(JobStatus.PENDING, cap=40) >= 40
    assert table.count_status(JobStatus.COMPLETED) == 5
