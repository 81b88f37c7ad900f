"""The record of the instance's life: real EC2 state-change events through the scheduler Lambda's handler."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

import handler
import history
from gpuctl.services.context import Gateways
from gpuctl.services.instance import start_instance, stop_instance
from gpuctl.settings import Settings
from tests.helpers import FLEET_GROUP, REGION, Resources, create_fleet_group, create_history_table, create_resources

EVENTS = Path(__file__).resolve().parent.parent / "events"
EVENT_AT = 1796029200.0  # 2026-11-30T09:00:00Z, the fixtures' "time"


def event(state: str, instance_id: str) -> dict[str, Any]:
    """The real EventBridge event for ``state`` (tests/events), naming the emulator's instance."""
    data: dict[str, Any] = json.loads((EVENTS / f"ec2_state_change_{state}.json").read_text())
    data["detail"]["instance-id"] = instance_id
    data["resources"] = [f"arn:aws:ec2:{REGION}:123456789012:instance/{instance_id}"]
    return data


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[Resources, str]]:
    """moto in-process with the queue, tables and bucket, created once for the module (each test has its own
    instance, and the history is keyed by instance)."""
    from moto import mock_aws

    with mock_aws():
        session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing")
        yield create_resources(session), create_history_table(session)


@pytest.fixture
def env(world: tuple[Resources, str], monkeypatch: pytest.MonkeyPatch) -> Resources:
    """A new stopped GPU instance, and the Lambda's environment as the template sets it, with the history table."""
    shared, table = world
    ec2 = boto3.client("ec2", region_name=REGION)
    instance_id = ec2.run_instances(ImageId="ami-12c6146b", InstanceType="g5.xlarge", MinCount=1,
                                    MaxCount=1)["Instances"][0]["InstanceId"]
    ec2.stop_instances(InstanceIds=[instance_id])
    aws = dataclasses.replace(shared, instance_id=instance_id, extra_env={"history_table": table})
    for name, value in (("QUEUE_URL", aws.queue_url), ("DLQ_URL", aws.dlq_url), ("TABLE_NAME", aws.table_name),
                        ("INSTANCE_ID", aws.instance_id), ("HISTORY_TABLE", table)):
        monkeypatch.setenv(name, value)
    return aws


def items(instance_id: str) -> list[dict[str, Any]]:
    ddb = boto3.client("dynamodb", region_name=REGION)
    answer = ddb.query(TableName="gpuctl-instance-history", KeyConditionExpression="instance_id = :i",
                       ExpressionAttributeValues={":i": {"S": instance_id}})
    return [{k: next(iter(v.values())) for k, v in item.items()} for item in answer["Items"]]


def tag(instance_id: str, **tags: str) -> None:
    boto3.client("ec2", region_name=REGION).create_tags(
        Resources=[instance_id], Tags=[{"Key": f"gpuctl:{k.replace('_', '-')}", "Value": v} for k, v in tags.items()])


def test_event_fixtures_are_ec2_state_changes() -> None:
    """The kept events are what EventBridge delivers for EC2 state changes, and the handler knows them."""
    # GIVEN / WHEN / THEN
    for state in ("pending", "running", "stopping", "stopped", "shutting-down", "terminated"):
        data = json.loads((EVENTS / f"ec2_state_change_{state}.json").read_text())
        assert handler.event_kind(data) == "ec2_state"
        assert data["detail"]["state"] == state and data["detail"]["instance-id"].startswith("i-")


def test_start_by_the_cli_is_recorded_with_its_cause(env: Resources) -> None:
    """`gpuctl instance start` then the running event: stored with cause cli, its reason and instance type."""
    # GIVEN the instance started by gpuctl (which tags who and why)
    gw = Gateways(Settings(**env.settings_kwargs()))
    start_instance(gw)
    tag(env.instance_id, started_at="2026-11-30T08:59:50Z")  # the tag's time as it was at the event
    # WHEN EventBridge delivers the running event
    record = handler.lambda_handler(event("running", env.instance_id), None)
    # THEN
    assert record["stored"] is True and record["errors"] == []
    [item] = items(env.instance_id)
    assert item["state"] == "running" and item["cause"] == "cli" and item["reason"] == "manual start"
    assert float(item["at"]) == EVENT_AT + 0.2
    assert item["instance_type"] == "g5.xlarge"
    assert float(item["expires_at"]) > EVENT_AT + 300 * 86400


def test_scheduler_stop_and_submit_start_are_told_apart(env: Resources) -> None:
    """The scheduler's stop tags give cause scheduler; a submit's start gives cause submit."""
    # GIVEN
    tag(env.instance_id, stopped_at="2026-11-30T08:59:58Z", stopped_by="gpuctl-scheduler",
        stopped_reason="idle: queue empty")
    # WHEN
    handler.lambda_handler(event("stopping", env.instance_id), None)
    tag(env.instance_id, started_at="2026-11-30T09:00:00Z", started_by="gpuctl-cli", started_reason="job submitted")
    handler.lambda_handler(event("pending", env.instance_id), None)
    # THEN
    found = {i["state"]: i for i in items(env.instance_id)}
    assert (found["stopping"]["cause"], found["stopping"]["reason"]) == ("scheduler", "idle: queue empty")
    assert found["pending"]["cause"] == "submit"


@pytest.mark.parametrize("stale", ["2026-11-30T07:00:00Z", "not a time", None])
def test_change_without_a_fresh_gpuctl_tag_is_the_console(env: Resources, stale: str | None) -> None:
    """A stop without a gpuctl stop tag of about its time is recorded as made by the console or something else."""
    # GIVEN an old, unreadable or missing stop tag
    if stale is not None:
        tag(env.instance_id, stopped_at=stale, stopped_by="gpuctl-cli", stopped_reason="manual stop")
    # WHEN
    record = handler.lambda_handler(event("stopped", env.instance_id), None)
    # THEN
    assert record["cause"] == "other" and record["by"] is None
    assert items(env.instance_id)[0]["cause"] == "other"


def test_stop_tag_older_than_the_last_start_does_not_explain_a_stop(env: Resources) -> None:
    """A gpuctl stop followed by a start, then a console stop minutes later: the old stop tag is not its cause."""
    # GIVEN a stop tag from 09:55 and a start tag from 09:57 (both within the freshness bound)
    tag(env.instance_id, stopped_at="2026-11-30T08:55:00Z", stopped_by="gpuctl-cli",
        started_at="2026-11-30T08:57:00Z", started_by="gpuctl-scheduler")
    # WHEN the console stops it at 09:00
    record = handler.lambda_handler(event("stopping", env.instance_id), None)
    # THEN
    assert record["cause"] == "other"


def test_redelivered_event_is_stored_once(env: Resources) -> None:
    """EventBridge may deliver an event twice: the same key is written again, not a second change."""
    # GIVEN / WHEN
    handler.lambda_handler(event("running", env.instance_id), None)
    handler.lambda_handler(event("running", env.instance_id), None)
    # THEN
    assert len(items(env.instance_id)) == 1


def test_a_change_that_cannot_be_stored_fails_the_invocation(env: Resources, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed write raises after logging (Lambda retries the event, then keeps it in the failure queue)."""
    # GIVEN a history table that does not exist
    monkeypatch.setenv("HISTORY_TABLE", "no-such-table")
    # WHEN / THEN
    with pytest.raises(history.HistoryRecordFailed, match="was not stored"):
        handler.lambda_handler(event("running", env.instance_id), None)


def test_unrecognised_state_change_is_reported_not_stored(env: Resources) -> None:
    """An event with a state the history does not know is logged with an error and not stored (no retry)."""
    # GIVEN
    data = event("running", env.instance_id)
    data["detail"]["state"] = "rebooting"
    # WHEN
    record = handler.lambda_handler(data, None)
    # THEN
    assert record["errors"][0]["code"] == "Unrecognised"
    assert items(env.instance_id) == []


def test_state_change_is_not_a_scheduler_run(env: Resources) -> None:
    """A state-change event only records: it never stops or starts the instance."""
    # GIVEN a running, idle instance (a scheduler run would stop it)
    gw = Gateways(Settings(**env.settings_kwargs()))
    start_instance(gw)
    # WHEN
    handler.lambda_handler(event("running", env.instance_id), None)
    # THEN
    assert gw.instance.describe().state == "running"
    stop_instance(gw)


def test_history_ttl_days_must_be_a_number() -> None:
    """A bad HISTORY_TTL_DAYS is a clear configuration error."""
    # GIVEN / WHEN / THEN
    with pytest.raises(ValueError, match="HISTORY_TTL_DAYS"):
        history.HistoryConfig.from_env({"HISTORY_TABLE": "t", "HISTORY_TTL_DAYS": "forever"})


# ------------------------------------------------------------------ fleet mode: the group's members only


@pytest.fixture(scope="module")
def group(world: tuple[Resources, str]) -> str:
    """The fleet's Auto Scaling group at 0, created once for the module."""
    return create_fleet_group(boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing"))


@pytest.fixture
def fleet(world: tuple[Resources, str], group: str,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[list[str], str]]:
    """The group with two new members (launched by moto from the group's launch template), one instance outside
    it, and the Lambda's environment in fleet mode (FLEET_GROUP set, no INSTANCE_ID)."""
    shared, table = world
    autoscaling = boto3.client("autoscaling", region_name=REGION)
    ec2 = boto3.client("ec2", region_name=REGION)
    autoscaling.set_desired_capacity(AutoScalingGroupName=FLEET_GROUP, DesiredCapacity=2)
    members = [i["InstanceId"] for i in autoscaling.describe_auto_scaling_groups(
        AutoScalingGroupNames=[FLEET_GROUP])["AutoScalingGroups"][0]["Instances"]]
    outsider = ec2.run_instances(ImageId="ami-12c6146b", InstanceType="t3.micro", MinCount=1,
                                 MaxCount=1)["Instances"][0]["InstanceId"]
    for name, value in (("QUEUE_URL", shared.queue_url), ("DLQ_URL", shared.dlq_url),
                        ("TABLE_NAME", shared.table_name), ("HISTORY_TABLE", table), ("FLEET_GROUP", FLEET_GROUP)):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("INSTANCE_ID", raising=False)
    yield members, outsider
    autoscaling.set_desired_capacity(AutoScalingGroupName=FLEET_GROUP, DesiredCapacity=0)


def test_fleet_members_are_recorded_with_their_group_and_autoscaling_as_cause(fleet: tuple[list[str], str]) -> None:
    """Fleet mode: each member's changes are stored with the group; Auto Scaling started them (no gpuctl tag)."""
    # GIVEN two members of the group
    members, _outsider = fleet
    # WHEN EventBridge delivers their changes (the rule passes every instance's)
    for instance_id in members:
        for state in ("pending", "running"):
            record = handler.lambda_handler(event(state, instance_id), None)
            assert record["stored"] is True and record["errors"] == [], record
    # THEN
    for instance_id in members:
        found = {i["state"]: i for i in items(instance_id)}
        assert set(found) == {"pending", "running"}
        assert found["running"]["group"] == FLEET_GROUP and found["running"]["cause"] == "autoscaling"
        assert found["running"]["by"] == FLEET_GROUP and found["running"]["instance_type"] == "g5.xlarge"


def test_fleet_member_stopped_by_gpuctl_keeps_gpuctl_as_its_cause(fleet: tuple[list[str], str]) -> None:
    """A fresh gpuctl stop tag on a member still names gpuctl (the tags win over the group)."""
    # GIVEN
    members, _outsider = fleet
    tag(members[0], stopped_at="2026-11-30T08:59:58Z", stopped_by="gpuctl-scheduler", stopped_reason="idle")
    # WHEN
    record = handler.lambda_handler(event("stopping", members[0]), None)
    # THEN
    assert (record["cause"], record["group"]) == ("scheduler", FLEET_GROUP)


def test_instances_outside_the_fleet_are_skipped_not_stored(fleet: tuple[list[str], str]) -> None:
    """The account's other instances, and ones EC2 no longer knows, leave nothing in the history."""
    # GIVEN an instance outside the group, and an id EC2 does not know
    _members, outsider = fleet
    # WHEN
    records = [handler.lambda_handler(event("running", outsider), None),
               handler.lambda_handler(event("terminated", "i-0123456789abcdef0"), None)]
    # THEN
    assert [r["stored"] for r in records] == [False, False]
    assert records[0]["skipped"] == f"not a member of {FLEET_GROUP}"
    assert "does not know" in records[1]["skipped"]
    assert items(outsider) == [] and items("i-0123456789abcdef0") == []


def test_a_terminated_member_is_recorded_while_ec2_still_describes_it(fleet: tuple[list[str], str]) -> None:
    """Scale-in terminates a member: its shutting-down and terminated events end its billed time."""
    # GIVEN a member that Auto Scaling terminates
    members, _outsider = fleet
    boto3.client("ec2", region_name=REGION).terminate_instances(InstanceIds=[members[1]])
    # WHEN
    for state in ("shutting-down", "terminated"):
        handler.lambda_handler(event(state, members[1]), None)
    # THEN
    assert {i["state"] for i in items(members[1])} == {"shutting-down", "terminated"}


def test_membership_that_cannot_be_read_fails_the_invocation(fleet: tuple[list[str], str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """DescribeInstances throttled: nothing is stored for a maybe-foreign instance, and the event is retried."""
    from botocore.stub import Stubber

    # GIVEN EC2 answering RequestLimitExceeded (moto cannot throttle: Stubber gives the error code)
    members, _outsider = fleet
    clients = handler.make_clients(REGION, None, fleet=True)
    stub = Stubber(clients.ec2)
    stub.add_client_error("describe_instances", service_error_code="RequestLimitExceeded", http_status_code=503)
    stub.activate()
    monkeypatch.setattr(handler, "_warm_clients", lambda *_a, **_k: clients)
    # WHEN / THEN
    with pytest.raises(history.HistoryRecordFailed, match="fleet membership"):
        handler.lambda_handler(event("running", members[0]), None)
    assert items(members[0]) == []


def test_a_member_stopped_after_the_scheduler_lowered_the_capacity_is_the_scheduler_s(
        fleet: tuple[list[str], str]) -> None:
    """The group's fresh capacity tags (2 -> 1 by the scheduler) explain a member's stop; not a start."""
    import fleet as fleet_module

    # GIVEN the scheduler lowered the capacity 30 s before the events
    members, _outsider = fleet
    tags = fleet_module.capacity_tags("2026-11-30T08:59:30Z", "gpuctl-scheduler", "idle: queue empty", 2, 1)
    boto3.client("autoscaling", region_name=REGION).create_or_update_tags(Tags=[
        {"ResourceId": FLEET_GROUP, "ResourceType": "auto-scaling-group", "Key": k, "Value": v,
         "PropagateAtLaunch": False} for k, v in tags.items()])
    try:
        # WHEN a member stops, and another starts (Auto Scaling replacing one)
        stopped = handler.lambda_handler(event("stopping", members[0]), None)
        started = handler.lambda_handler(event("pending", members[1]), None)
    finally:
        boto3.client("autoscaling", region_name=REGION).delete_tags(Tags=[
            {"ResourceId": FLEET_GROUP, "ResourceType": "auto-scaling-group", "Key": k} for k in tags])
    # THEN
    assert (stopped["cause"], stopped["reason"]) == ("scheduler", "idle: queue empty")
    assert (started["cause"], started["by"]) == ("autoscaling", FLEET_GROUP)
