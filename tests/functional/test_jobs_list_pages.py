"""`jobs list` pages (in-process moto): newest first across statuses, at most about twice --limit items read per
page whatever the table holds, and --next-token continues without losing or repeating a job (ties included)."""

from __future__ import annotations

import random
import time
import uuid
from typing import Any

import pytest

from gpuctl.errors import UsageError
from gpuctl.models import JobRecord, JobStatus, JobType
from gpuctl.services.jobs import list_jobs


def _fill(gateways: Any, statuses: list[JobStatus], *, same_time: bool = False) -> list[JobRecord]:
    now = time.time()
    records = [JobRecord(task_id=str(uuid.uuid4()), status=s, job_type=JobType.CAMERA_ANGLE.api_path,
                         created_at=round(now if same_time else now - i * 1.5, 3), updated_at=now)
               for i, s in enumerate(statuses)]
    assert gateways.table.batch_create(records) == []
    return records


def _reads(gateways: Any) -> dict[str, int]:
    counted = {"items": 0, "queries": 0}

    def after(parsed: dict[str, Any], **_: Any) -> None:
        counted["items"] += int(parsed.get("Count", 0))
        counted["queries"] += 1

    gateways.clients.dynamodb.meta.events.register("after-call.dynamodb.Query", after)
    return counted


def _newest_first(records: list[JobRecord]) -> list[str]:
    return [r.task_id for r in sorted(records, key=lambda r: -r.created_at)]


@pytest.mark.parametrize("layout", ["one-status-newest", "interleaved"])
def test_a_page_reads_at_most_twice_the_limit(gateways: Any, layout: str) -> None:
    """The newest 50 of 600 jobs come back in order, reading at most 2 × 50 + 3 items."""
    # GIVEN 600 jobs: the newest 300 all completed (the worst case for a merge), or statuses interleaved
    if layout == "one-status-newest":
        statuses = [JobStatus.COMPLETED] * 300 + [JobStatus.PENDING, JobStatus.FAILED, JobStatus.PROCESSING] * 100
    else:
        statuses = [random.Random(i).choice(list(JobStatus)) for i in range(600)]
    records = _fill(gateways, statuses)
    reads = _reads(gateways)
    # WHEN the first page is listed without --status
    page = list_jobs(gateways, limit=50)
    # THEN it holds the newest 50, and the reads stayed within the bound
    assert [r.task_id for r in page.records] == _newest_first(records)[:50]
    assert reads["items"] <= 2 * 50 + 3, reads
    assert page.next_token


def test_next_token_walks_every_job_exactly_once(gateways: Any) -> None:
    """Following --next-token from the first page to the last returns every job once, newest first; jobs created
    in the same millisecond (a batch) are not lost at a page boundary."""
    # GIVEN 130 jobs of mixed statuses, 40 of them sharing one created_at
    mixed = _fill(gateways, [random.Random(i).choice(list(JobStatus)) for i in range(90)])
    tied = _fill(gateways, [JobStatus.PENDING] * 20 + [JobStatus.FAILED] * 20, same_time=True)
    # WHEN every page of 17 is read in turn
    seen: list[str] = []
    token: str | None = None
    pages = 0
    while True:
        page = list_jobs(gateways, limit=17, next_token=token)
        seen += [r.task_id for r in page.records]
        pages += 1
        token = page.next_token
        if token is None:
            break
    # THEN each job came exactly once, in created_at order
    assert sorted(seen) == sorted(r.task_id for r in mixed + tied)
    assert len(seen) == len(set(seen)) == 130 and pages == 8
    created = {r.task_id: r.created_at for r in mixed + tied}
    assert [created[t] for t in seen] == sorted(created[t] for t in seen)[::-1]


def test_a_status_filter_reads_one_page(gateways: Any) -> None:
    """With --status the listing is one Query of exactly --limit items."""
    _fill(gateways, [JobStatus.FAILED] * 120)
    reads = _reads(gateways)
    page = list_jobs(gateways, status="failed", limit=50)
    assert len(page.records) == 50 and reads == {"items": 50, "queries": 1}


def test_a_token_for_another_status_or_garbage_is_refused(gateways: Any) -> None:
    """A token is tied to its --status; a made-up one is refused in one sentence."""
    _fill(gateways, [JobStatus.FAILED] * 5)
    token = list_jobs(gateways, status="failed", limit=2).next_token
    assert token
    with pytest.raises(UsageError, match="another --status"):
        list_jobs(gateways, status="pending", next_token=token)
    with pytest.raises(UsageError, match="is not a token"):
        list_jobs(gateways, next_token="eyJ2IjoyfQ")
