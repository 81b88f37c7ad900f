"""The scheduler Lambda in fleet mode (FLEET_GROUP) against in-process moto: the group follows the backlog."""

from __future__ import annotations

import time
from typing import Any

import boto3
import pytest

import handler
from tests.helpers import REGION, Resources, create_fleet_group

IDLE = 30 * 60.0


@pytest.fixture
def fleet(aws: Resources) -> tuple[Resources, handler.SchedulerConfig, handler.Clients]:
    group = create_fleet_group(boto3.session.Session())
    config = handler.SchedulerConfig.from_env({
        "QUEUE_URL": aws.queue_url, "DLQ_URL": aws.dlq_url, "TABLE_NAME": aws.table_name, "FLEET_GROUP": group,
        "JOBS_PER_INSTANCE": "2", "CLOCK_SKEW_SECONDS": "0"})
    return aws, config, handler.make_clients(REGION, fleet=True)


def asg() -> Any:
    return boto3.client("autoscaling", region_name=REGION)


def group() -> dict[str, Any]:
    answer: dict[str, Any] = asg().describe_auto_scaling_groups(AutoScalingGroupNames=["gpuctl-fleet"])
    return answer["AutoScalingGroups"][0]  # type: ignore[no-any-return]


def send(aws: Resources, n: int) -> None:
    sqs = boto3.client("sqs", region_name=REGION)
    for i in range(n):
        sqs.send_message(QueueUrl=aws.queue_url, MessageBody=f'{{"task_id": "t{i}"}}')


def drain(aws: Resources) -> None:
    sqs = boto3.client("sqs", region_name=REGION)
    while msgs := sqs.receive_message(QueueUrl=aws.queue_url, MaxNumberOfMessages=10,
                                       WaitTimeSeconds=0).get("Messages", []):
        for m in msgs:
            sqs.delete_message(QueueUrl=aws.queue_url, ReceiptHandle=m["ReceiptHandle"])


def test_backlog_scales_out_then_idle_fleet_returns_to_zero(fleet: Any) -> None:
    """GIVEN 5 queued jobs and a fleet at 0 WHEN the scheduler runs THEN 3 instances; once idle past the window, 0."""
    aws, config, clients = fleet
    send(aws, 5)
    now = time.time()
    record = handler.run_once(config, clients, now=now, trigger="schedule")
    assert (record["mode"], record["action"], record["desired"], record["errors"]) == ("fleet", "scale", 3, [])
    assert record["outcome"] == "set desired capacity 0 -> 3"
    g = group()
    assert g["DesiredCapacity"] == 3 and len(g["Instances"]) == 3
    tags = {t["Key"]: t["Value"] for t in g["Tags"]}
    assert "gpuctl:scaled-out-at" in tags
    assert (tags["gpuctl:capacity-by"], tags["gpuctl:capacity-reason"]) == ("gpuctl-scheduler", record["reason"])
    assert (tags["gpuctl:capacity-from"], tags["gpuctl:capacity-to"]) == ("0", "3")

    drain(aws)
    inside = handler.run_once(config, clients, now=now + 60, trigger="schedule")
    assert (inside["desired"], inside["code"]) == (1, "recent_activity")  # not 0 inside the idle window
    done = handler.run_once(config, clients, now=now + IDLE + 120, trigger="schedule")
    assert (done["desired"], done["code"], done["outcome"]) == (0, "idle", "set desired capacity 1 -> 0")
    assert group()["DesiredCapacity"] == 0
    tags = {t["Key"]: t["Value"] for t in group()["Tags"]}
    assert (tags["gpuctl:capacity-from"], tags["gpuctl:capacity-to"]) == ("1", "0")


def test_members_started_by_a_scale_out_are_recorded_as_the_scheduler_s(fleet: Any, monkeypatch: pytest.MonkeyPatch,
                                                                       ) -> None:
    """GIVEN the scheduler scaled the fleet out for a backlog WHEN the new members' state changes arrive THEN the
    history names the scheduler and its reason as their cause (from the group's capacity tags)."""
    import history
    from tests.helpers import create_history_table

    aws, config, clients = fleet
    table = create_history_table(boto3.session.Session())
    send(aws, 3)
    now = time.time()
    record = handler.run_once(config, clients, now=now, trigger="schedule")
    members = [i["InstanceId"] for i in group()["Instances"]]
    assert len(members) == 2
    history_config = history.HistoryConfig(table, fleet_group=config.fleet_group)
    for instance_id in members:
        change = history.record_event(history.state_change_event(instance_id, "running", at=now + 40),
                                      history_config, clients.ec2, clients.dynamodb, autoscaling=clients.autoscaling)
        assert (change["cause"], change["by"], change["reason"]) == ("scheduler", "gpuctl-scheduler",
                                                                     record["reason"]), change
    # A stop of a member is not explained by that raise: Auto Scaling did it (a replacement, a rebalance)
    stopped = history.record_event(history.state_change_event(members[0], "stopping", at=now + 90), history_config,
                                   clients.ec2, clients.dynamodb, autoscaling=clients.autoscaling)
    assert (stopped["cause"], stopped["by"]) == ("autoscaling", config.fleet_group)


def test_protected_instance_is_never_scaled_in(fleet: Any) -> None:
    """GIVEN 3 instances, 2 protected by adapters holding work WHEN the backlog drains THEN desired stays 2 and the
    protected ones remain."""
    aws, config, clients = fleet
    send(aws, 6)
    now = time.time()
    handler.run_once(config, clients, now=now, trigger="schedule")
    ids = [i["InstanceId"] for i in group()["Instances"]]
    asg().set_instance_protection(InstanceIds=ids[:2], AutoScalingGroupName="gpuctl-fleet",
                                  ProtectedFromScaleIn=True)
    drain(aws)
    record = handler.run_once(config, clients, now=now + 30, trigger="schedule")
    assert record["desired"] == 2 and record["protected"] == 2
    assert set(ids[:2]) <= {i["InstanceId"] for i in group()["Instances"]}


def test_unreadable_group_is_a_failed_run_that_changes_nothing(fleet: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """GIVEN the group was deleted WHEN the Lambda runs THEN it logs the unknown fact, acts on nothing and raises."""
    aws, config, clients = fleet
    send(aws, 3)
    asg().delete_auto_scaling_group(AutoScalingGroupName="gpuctl-fleet", ForceDelete=True)
    record = handler.run_once(config, clients, trigger="schedule")
    assert (record["action"], record["outcome"]) == ("none", "noop")
    assert "fleet group" in record["facts"]["unknown"]
    for name, value in {"QUEUE_URL": aws.queue_url, "TABLE_NAME": aws.table_name, "FLEET_GROUP": "gpuctl-fleet",
                        "AWS_DEFAULT_REGION": REGION}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("INSTANCE_ID", raising=False)
    handler._warm_clients.cache_clear()
    with pytest.raises(handler.SchedulerRunFailed, match="fleet group"):
        handler.lambda_handler({"source": "aws.events", "detail-type": "Scheduled Event"}, None)


def test_fleet_mode_needs_no_instance_id_and_checks_jobs_per_instance() -> None:
    """GIVEN fleet mode WHEN the environment lacks INSTANCE_ID THEN it is fine; a bad JOBS_PER_INSTANCE is refused."""
    env = {"QUEUE_URL": "https://q", "TABLE_NAME": "t", "FLEET_GROUP": "g"}
    assert handler.SchedulerConfig.from_env(env).jobs_per_instance == 4
    with pytest.raises(ValueError, match="JOBS_PER_INSTANCE"):
        handler.SchedulerConfig.from_env({**env, "JOBS_PER_INSTANCE": "0"})
    with pytest.raises(ValueError, match="INSTANCE_ID"):
        handler.SchedulerConfig.from_env({"QUEUE_URL": "https://q", "TABLE_NAME": "t"})
