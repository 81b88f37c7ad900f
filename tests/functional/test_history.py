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
from tests.helpers import REGION, Resources, create_history_table, create_resources

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
    for state in ("pending", "running", "stopping", "stopped"):
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
