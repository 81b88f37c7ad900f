"""`gpuctl watch`: the polling loop in-process (fake clock), and the CLI in a subprocess as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import boto3
import pytest

from gpuctl.models import JobRecord, JobStatus, JobType
from tests.helpers import REGION, Resources, run_cli


def _record(status: JobStatus = JobStatus.PENDING, **fields: Any) -> JobRecord:
    now = time.time()
    return JobRecord(task_id=str(uuid.uuid4()), status=status, job_type=JobType.CAMERA_ANGLE.api_path,
                     created_at=now, updated_at=now, **fields)


class FakeTime:
    """A clock that only moves when the watch loop sleeps; each sleep may run a scripted step."""

    def __init__(self, steps: list[Any] | None = None) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.steps = list(steps or [])

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.steps:
            self.steps.pop(0)()


# --- the loop, in-process --------------------------------------------------------------------------

def test_reports_each_change_once_and_ends_when_the_job_finishes(gateways: Any) -> None:
    """Every status/progress change is reported once; heartbeats alone are not changes."""
    from gpuctl.services.watch import watch_jobs

    # GIVEN a pending job that a worker will pick up, heartbeat, advance and complete
    job = _record()
    table = gateways.table
    table.create(job)
    steps = [
        lambda: table.transition(job.task_id, JobStatus.PROCESSING, fields={"progress": 0.0}),
        lambda: table.update_fields(job.task_id, {"heartbeat_at": time.time()}),
        lambda: table.update_fields(job.task_id, {"progress": 0.5}),
        lambda: table.transition(job.task_id, JobStatus.COMPLETED, fields={"result_s3_uri": "s3://b/r.png"}),
    ]
    fake = FakeTime(steps)
    seen: list[tuple[str, float | None]] = []
    # WHEN it is watched
    result = watch_jobs(table, [job.task_id], on_change=lambda r: seen.append((r.status.value, r.progress)),
                        timeout=60, clock=fake.clock, sleep=fake.sleep)
    # THEN each change was reported exactly once and the watch ended on completion
    assert seen == [("pending", None), ("processing", 0.0), ("processing", 0.5), ("completed", 0.5)]
    assert not result.timed_out and result.failed == []
    assert result.records[0].result_s3_uri == "s3://b/r.png"


def test_interval_grows_while_nothing_changes_and_stops_at_the_deadline(gateways: Any) -> None:
    """Unchanged polls back off gently up to the cap; the last sleep never overshoots the deadline."""
    from gpuctl.services.watch import watch_jobs

    job = _record()
    gateways.table.create(job)
    fake = FakeTime()
    result = watch_jobs(gateways.table, [job.task_id], on_change=lambda r: None, timeout=20, interval=1.0,
                        max_interval=4.0, clock=fake.clock, sleep=fake.sleep)
    assert result.timed_out and [r.task_id for r in result.unfinished] == [job.task_id]
    assert fake.sleeps[:5] == [1.0, 1.5, 2.25, 3.375, 4.0]
    assert max(fake.sleeps) == 4.0
    assert sum(fake.sleeps) == pytest.approx(20.0)


def test_several_jobs_stop_polling_once_finished(gateways: Any) -> None:
    """A finished job is not read again while the others are still watched."""
    from gpuctl.services.watch import watch_jobs

    done = _record(JobStatus.FAILED, error_message="boom")
    pending = _record()
    for record in (done, pending):
        gateways.table.create(record)
    fake = FakeTime([lambda: gateways.table.transition(pending.task_id, JobStatus.FAILED,
                                                       fields={"error_message": "cancelled by user"})])
    calls: list[str] = []

    class CountingTable:
        def get(self, task_id: str) -> JobRecord:
            calls.append(task_id)
            return gateways.table.get(task_id)  # type: ignore[no-any-return]

    result = watch_jobs(CountingTable(), [done.task_id, pending.task_id, done.task_id],  # type: ignore[arg-type]
                        on_change=lambda r: None, clock=fake.clock, sleep=fake.sleep)
    assert calls == [done.task_id, pending.task_id, pending.task_id]
    assert [r.error_message for r in result.failed] == ["boom", "cancelled by user"]


def test_unknown_job_fails_at_once(gateways: Any) -> None:
    """Watching a job that does not exist raises NotFound on the first poll, without sleeping."""
    from gpuctl.errors import NotFound
    from gpuctl.services.watch import watch_jobs

    fake = FakeTime()
    with pytest.raises(NotFound, match="does not exist"):
        watch_jobs(gateways.table, [str(uuid.uuid4())], on_change=lambda r: None, clock=fake.clock,
                   sleep=fake.sleep)
    assert fake.sleeps == []


# --- the CLI, in a subprocess ------------------------------------------------------------------------

def _table(res: Resources) -> Any:
    from gpuctl.aws.dynamo import JobTable

    client = boto3.client("dynamodb", region_name=REGION, endpoint_url=res.endpoint_url,
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    return JobTable(client, res.table_name)


@pytest.mark.server
def test_piped_watch_prints_one_line_per_change_and_exits_0(server_aws: Resources) -> None:
    """Piped, each change is one `TIME ID STATUS [PROGRESS] [RESULT]` line; completion exits 0."""
    # GIVEN a pending job, watched by `gpuctl watch` with stdout piped
    table = _table(server_aws)
    job = _record()
    table.create(job)
    env = {**os.environ, **server_aws.env(), "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gpuctl", "watch", job.task_id, "--interval", "0.2",
                             "--timeout", "30"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        # WHEN a worker takes it, reports progress and completes it
        table.transition(job.task_id, JobStatus.PROCESSING, fields={"progress": 0.25})
        time.sleep(0.6)
        table.transition(job.task_id, JobStatus.COMPLETED, fields={"result_s3_uri": "s3://b/results/r.png"})
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # THEN one line per change, in order, and exit 0
    lines = [first.split()] + [line.split() for line in out.splitlines()]
    assert proc.returncode == 0, err
    assert [line[1:] for line in lines] == [[job.task_id, "pending"], [job.task_id, "processing", "25%"],
                                            [job.task_id, "completed", "s3://b/results/r.png"]]
    assert all(line[0].endswith("Z") for line in lines)


@pytest.mark.server
def test_failed_job_exits_1_naming_the_error_with_json_lines(server_aws: Resources) -> None:
    """A failed job: exit 1, its error on stderr; --output json prints one JSON object per change."""
    table = _table(server_aws)
    ok = _record(JobStatus.COMPLETED, result_s3_uri="s3://b/ok.png")
    bad = _record(JobStatus.FAILED, error_message="ComfyUI rejected the workflow")
    for record in (ok, bad):
        table.create(record)
    proc = run_cli(["watch", ok.task_id, bad.task_id, "--output", "json"], server_aws.env())
    assert proc.returncode == 1
    assert "ComfyUI rejected the workflow" in proc.stderr and bad.task_id in proc.stderr
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(d["job_id"], d["status"]) for d in docs] == [(ok.task_id, "completed"), (bad.task_id, "failed")]
    assert {"time", "job_id", "status", "result_s3_uri", "error"} <= set(docs[0])


@pytest.mark.server
def test_timeout_exits_3_and_quiet_prints_result_urls(server_aws: Resources) -> None:
    """An unfinished job at the deadline: exit 3 naming it; -q prints only result URLs of finished jobs."""
    table = _table(server_aws)
    stuck = _record()
    done = _record(JobStatus.COMPLETED, result_s3_uri="s3://b/done.png")
    for record in (stuck, done):
        table.create(record)
    started = time.monotonic()
    proc = run_cli(["watch", done.task_id, stuck.task_id, "--timeout", "1", "--interval", "0.2", "-q"],
                   server_aws.env())
    assert proc.returncode == 3
    assert f"{stuck.task_id} (pending)" in proc.stderr
    assert proc.stdout == "s3://b/done.png\n"
    assert time.monotonic() - started < 15
