"""`gpuctl instance status|start|stop`: the CLI against moto's server, and the busy check in-process."""

from __future__ import annotations

import json
from typing import Any

import boto3
import pytest

from tests.helpers import REGION, Resources, run_cli


def _client(res: Resources, service: str) -> Any:
    return boto3.client(service, region_name=REGION, endpoint_url=res.endpoint_url,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.mark.server
def test_status_reports_state_queue_and_busy_verdict(server_aws: Resources) -> None:
    """instance status shows the state, type, queue counts, job counts, busy verdict and hold tag."""
    # GIVEN a stopped instance with a hold tag and one message waiting
    _client(server_aws, "ec2").create_tags(Resources=[server_aws.instance_id],
                                           Tags=[{"Key": "gpuctl:hold-until", "Value": "2099-01-01T00:00:00Z"}])
    _client(server_aws, "sqs").send_message(QueueUrl=server_aws.queue_url, MessageBody="{}")
    # WHEN its status is asked for as JSON and as text
    proc = run_cli(["instance", "status", "--output", "json"], server_aws.env())
    text = run_cli(["instance", "status"], server_aws.env())
    # THEN it is stopped, busy because of the visible message, and the hold shows
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert (doc["state"], doc["instance_type"], doc["busy"]) == ("stopped", "g5.xlarge", True)
    assert doc["queue"] == {"visible": 1, "in_flight": 0, "delayed": 0, "dlq": 0}
    assert doc["jobs"]["pending"] == 0 and doc["jobs"]["processing"] == 0
    assert (doc["hold_until"], doc["hold_until_iso"]) == (4070908800, "2099-01-01T00:00:00Z")
    assert "hold until    2099-01-01T00:00:00Z (in " in text.stdout
    assert "busy" in text.stdout and "1 message waiting in the queue" in text.stdout


@pytest.mark.server
def test_stop_refuses_while_work_waits_unless_forced(server_aws: Resources) -> None:
    """stop exits 1 saying why while a message waits; --force stops it and tags the reason."""
    # GIVEN a running instance and a queued message
    start = run_cli(["instance", "start", "--wait", "-q"], server_aws.env())
    assert (start.returncode, start.stdout) == (0, "running\n"), start.stderr
    _client(server_aws, "sqs").send_message(QueueUrl=server_aws.queue_url, MessageBody="{}")
    # WHEN it is stopped without and then with --force
    refused = run_cli(["instance", "stop"], server_aws.env())
    forced = run_cli(["instance", "stop", "--force", "--output", "json"], server_aws.env())
    # THEN the first is refused with the reason, the second stops it and records why
    assert refused.returncode == 1
    assert "Refusing to stop" in refused.stderr and "1 message waiting in the queue" in refused.stderr
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["previous_state"] == "running"
    described = _client(server_aws, "ec2").describe_instances(InstanceIds=[server_aws.instance_id])
    instance = described["Reservations"][0]["Instances"][0]
    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
    assert instance["State"]["Name"] == "stopped"
    assert tags["gpuctl:stopped-reason"] == "manual stop (forced)"


def test_start_tags_the_instance_and_stop_is_a_noop_when_stopped(gateways: Any) -> None:
    """A manual start records started-at for the scheduler; stopping a stopped idle instance does nothing."""
    from gpuctl.services.instance import start_instance, stop_instance

    stopped = stop_instance(gateways)
    assert (stopped.previous, stopped.state) == ("stopped", "stopped")
    started = start_instance(gateways, wait=True, timeout=30)
    assert (started.previous, started.state, started.waited) == ("stopped", "running", True)
    tags = gateways.instance.describe().tags
    assert tags["gpuctl:started-by"] == "gpuctl-cli" and tags["gpuctl:started-at"].endswith("Z")


def test_processing_job_keeps_the_instance_busy(gateways: Any) -> None:
    """A processing job alone makes the instance busy and blocks a plain stop."""
    import time
    import uuid

    from gpuctl.errors import Conflict
    from gpuctl.models import JobRecord, JobStatus
    from gpuctl.services.instance import instance_status, start_instance, stop_instance

    start_instance(gateways)
    now = time.time()
    gateways.table.create(JobRecord(task_id=str(uuid.uuid4()), status=JobStatus.PROCESSING,
                                    job_type="/api/v1/camera-angle/jobs", created_at=now, updated_at=now))
    status = instance_status(gateways)
    assert status.busy and status.workload.processing == 1 and status.state == "running"
    with pytest.raises(Conflict, match="1 job processing"):
        stop_instance(gateways)
    assert gateways.instance.describe().state == "running"


def test_other_services_jobs_do_not_count(gateways: Any) -> None:
    """Only GPU job types make the instance busy: another service's processing task neither shows as work nor
    blocks a plain stop (SPEC §11)."""
    import time

    from gpuctl.models import JobRecord, JobStatus
    from gpuctl.services.instance import instance_status, start_instance, stop_instance

    start_instance(gateways)
    now = time.time()
    for i, status in enumerate([JobStatus.PROCESSING, JobStatus.PENDING]):
        gateways.table.create(JobRecord(task_id=f"cpu-{i}", status=status, job_type="/api/v1/face-mask/tasks",
                                        created_at=now, updated_at=now))
    status = instance_status(gateways)
    assert (status.workload.pending, status.workload.processing, status.busy) == (0, 0, False)
    assert stop_instance(gateways).previous == "running"


def test_stop_writes_the_fence_before_stopping(gateways: Any) -> None:
    """A manual stop records stop_fence_at in the activity marker, so a fresh adapter no longer counts."""
    from gpuctl.services.instance import start_instance, stop_instance

    start_instance(gateways)
    gateways.table.note_adapter("box:1", state="running", jobs_in_hand=0)
    assert gateways.table.read_activity().adapter_fresh(__import__("time").time())
    stop_instance(gateways)
    marker = gateways.table.read_activity()
    assert marker.stop_fence_at is not None and marker.stop_fence_at >= marker.adapter_seen_at
    assert not marker.adapter_fresh(__import__("time").time())
