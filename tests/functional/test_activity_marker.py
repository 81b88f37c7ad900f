"""The activity marker item: written by submit and the adapter, read by the scheduler and submit."""

from __future__ import annotations

from gpuctl.aws.dynamo import Activity
from gpuctl.models import ACTIVITY_TASK_ID, JobStatus


def test_marker_starts_empty_then_records_submits_and_the_adapter(gateways) -> None:
    """note_submit returns the marker it wrote; note_adapter/note_stop fill the rest."""
    table = gateways.table
    # GIVEN nothing has written the marker
    assert table.read_activity() == Activity()
    # WHEN a submit, then an adapter, report
    seen = table.note_submit(now=1000.0)
    table.note_adapter("box:1", state="running", jobs_in_hand=1, now=1005.0, finished_at=1004.0)
    marker = table.read_activity()
    # THEN each field carries what its writer said, and the adapter counts as fresh
    assert seen.last_submit_at == 1000.0 and seen.adapter_seen_at is None
    assert (marker.last_submit_at, marker.last_finished_at, marker.adapter_seen_at) == (1000.0, 1004.0, 1005.0)
    assert marker.adapter_worker == "box:1" and marker.jobs_in_hand == 1
    assert marker.adapter_fresh(1030.0) and not marker.adapter_fresh(1100.0)
    assert marker.last_activity_at == 1004.0


def test_a_stop_fence_makes_the_adapter_stale(gateways) -> None:
    """After a stop is decided, submit must not trust the adapter's last report."""
    table = gateways.table
    table.note_adapter("box:1", state="running", jobs_in_hand=0, now=1000.0)
    table.note_stop(now=1001.0)
    assert not table.note_submit(now=1002.0).adapter_fresh(1002.0)
    table.note_adapter("box:1", state="running", jobs_in_hand=0, now=1003.0)
    assert table.read_activity().adapter_fresh(1004.0)
    table.note_adapter("box:1", state="stopped", jobs_in_hand=0, now=1005.0)
    assert not table.read_activity().adapter_fresh(1006.0)


def test_marker_is_in_no_status_query(gateways) -> None:
    """The marker has no status: it never shows up as a job."""
    gateways.table.note_submit(now=1000.0)
    for status in JobStatus:
        assert [r.task_id for r in gateways.table.query_status(status)] == []
    raw = gateways.clients.dynamodb.get_item(TableName=gateways.table.table_name,
                                             Key={"task_id": {"S": ACTIVITY_TASK_ID}})["Item"]
    assert "status" not in raw
