"""Fleet mode end to end on moto's server: submit a backlog, the scheduler scales the group out, several adapter
processes (each its own ComfyUI stand-in and instance id) share the queue, no job runs twice, the backlog drains,
a protected instance is never scaled in, and the idle fleet returns to 0.

moto launches instances the moment the desired capacity rises (no warm pool, always InService): the adapters are
started by hand, one per instance, as the instances' systemd units would be.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import boto3
import pytest

import handler
from gpuctl.local.comfyui_standin import StandinServer
from gpuctl.models import JobStatus, JobType, parse_request
from gpuctl.services.context import Gateways
from gpuctl.services.submit import submit_request
from gpuctl.settings import Settings
from tests.functional.test_adapter import (  # noqa: F401 - fixtures
    AdapterProcess,
    adapter_factory,
    gw,
    input_url,
    standin_factory,
)
from tests.helpers import FLEET_GROUP, REGION, Resources, create_fleet_group

pytestmark = pytest.mark.server

JOBS = 12
ADAPTERS = 3
IDLE = 30 * 60.0


def group(endpoint: str) -> dict[str, Any]:
    client = boto3.client("autoscaling", region_name=REGION, endpoint_url=endpoint)
    answer: dict[str, Any] = client.describe_auto_scaling_groups(AutoScalingGroupNames=[FLEET_GROUP])
    return answer["AutoScalingGroups"][0]  # type: ignore[no-any-return]


def test_fleet_drains_a_backlog_without_running_a_job_twice(
        server_aws: Resources, input_url: str, standin_factory: Callable[..., StandinServer],  # noqa: F811
        adapter_factory: Callable[..., AdapterProcess]) -> None:  # noqa: F811
    """GIVEN a fleet at 0 and 12 submitted jobs WHEN the scheduler scales out and 3 adapters work THEN every job
    completes exactly once, on a fleet instance; protected instances survive a scale-in; idle, the fleet goes to 0."""
    endpoint = str(server_aws.endpoint_url)
    session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing")
    create_fleet_group(session, endpoint, max_size=ADAPTERS)
    fleet_gw = Gateways(Settings(**server_aws.settings_kwargs(), fleet_group=FLEET_GROUP))

    # WHEN a backlog is submitted: the first submit raises the group from 0 to 1
    outcomes = [submit_request(fleet_gw, parse_request(JobType.CAMERA_ANGLE, {"image_url": input_url, "horizontal": 1}))
                for _ in range(JOBS)]
    assert outcomes[0].instance is not None and outcomes[0].instance.action == "started"
    assert {o.instance.action for o in outcomes[1:] if o.instance} == {"already-running"}
    assert group(endpoint)["DesiredCapacity"] == 1

    # AND the scheduler sizes the group from the backlog (12 jobs / 4 per instance, capped at 3)
    config = handler.SchedulerConfig.from_env({
        "QUEUE_URL": server_aws.queue_url, "TABLE_NAME": server_aws.table_name, "FLEET_GROUP": FLEET_GROUP,
        "CLOCK_SKEW_SECONDS": "0", "AWS_ENDPOINT_URL": endpoint})
    clients = handler.make_clients(REGION, endpoint, fleet=True)
    record = handler.run_once(config, clients, trigger="schedule")
    assert (record["desired"], record["outcome"]) == (ADAPTERS, f"set desired capacity 1 -> {ADAPTERS}")
    instances = [i["InstanceId"] for i in group(endpoint)["Instances"]]
    assert len(instances) == ADAPTERS

    # AND one adapter per instance, each with its own stand-in, shares the queue
    # (Visibility and staleness bounds wide enough that a loaded machine's stalls never look like a lost worker:
    # a takeover would be a legitimate second attempt, and this test counts attempts.)
    adapters = [adapter_factory(standin_factory(seconds_per_job=0.5), GPUCTL_FLEET_GROUP=FLEET_GROUP,
                                GPUCTL_INSTANCE_ID=iid, GPUCTL_WORKER_ID=f"worker-{n}", GPUCTL_HEARTBEAT_INTERVAL="1",
                                GPUCTL_VISIBILITY_EXTENSION="30", GPUCTL_HEARTBEAT_STALE_AFTER="20").start()
                for n, iid in enumerate(instances)]

    # THEN while jobs are in hand, their instances are protected and AWS never scales them in
    deadline = time.monotonic() + 60
    busy: set[str] = set()
    while time.monotonic() < deadline and not busy:
        busy = {i["InstanceId"] for i in group(endpoint)["Instances"] if i["ProtectedFromScaleIn"]}
        time.sleep(0.2)
    assert busy, "no adapter protected its instance while holding work"
    boto3.client("autoscaling", region_name=REGION, endpoint_url=endpoint).set_desired_capacity(
        AutoScalingGroupName=FLEET_GROUP, DesiredCapacity=0)  # an aggressive scale-in
    assert busy <= {i["InstanceId"] for i in group(endpoint)["Instances"]}

    # AND the backlog drains: every job completed once, on one of the fleet's instances
    ids = [o.record.task_id for o in outcomes]
    deadline = time.monotonic() + 300  # a condition, not a sleep: a loaded machine only makes it slower
    records = [fleet_gw.table.get(t) for t in ids]
    while time.monotonic() < deadline and not all(r.status is JobStatus.COMPLETED for r in records):
        time.sleep(0.5)
        records = [fleet_gw.table.get(t) for t in ids]
    assert [r.status for r in records] == [JobStatus.COMPLETED] * JOBS, [(r.task_id, r.status) for r in records]
    assert all(r.attempts == 1 for r in records), [(r.task_id, r.attempts) for r in records]
    assert {r.instance_id for r in records} <= set(instances)
    started = [e["task_id"] for a in adapters for e in a.events() if e.get("event") == "adapter.job_started"]
    assert sorted(started) == sorted(ids)  # executed exactly once each, across all adapters

    # AND once idle the protection is gone and, after the idle window, the scheduler takes the fleet to 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(i["ProtectedFromScaleIn"] for i in group(endpoint)["Instances"]):
        time.sleep(0.2)
    assert not any(i["ProtectedFromScaleIn"] for i in group(endpoint)["Instances"])
    boto3.client("autoscaling", region_name=REGION, endpoint_url=endpoint).set_desired_capacity(
        AutoScalingGroupName=FLEET_GROUP, DesiredCapacity=ADAPTERS)  # undo the manual scale-in above
    record = handler.run_once(config, clients, now=time.time() + IDLE + 120, trigger="schedule")
    assert (record["desired"], record["code"]) == (0, "idle"), record["reason"]
    assert group(endpoint)["Instances"] == []
