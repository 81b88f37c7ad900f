"""`gpuctl doctor` on a fleet-mode stack (deployed into in-process moto with gpuctl's own deploy): the instance
checks look at the group's members, not at an instance id the stack does not have."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from gpuctl.local.stack_gaps import fill_gaps
from gpuctl.services.context import Gateways
from gpuctl.services.deploy import FleetSpec, deploy
from gpuctl.services.doctor import run_checks
from gpuctl.settings import Settings
from tests.helpers import REGION

pytestmark = pytest.mark.filterwarnings("ignore:Tried to parse AWS:UserWarning")

GROUP = "gpuctl-gpu-fleet"


@pytest.fixture(scope="module")
def fleet_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateways, dict[str, str]]]:
    """A fleet stack at 0 over two subnets, with what the emulator leaves out filled in (alarm, TTL, lifecycle)."""
    from moto import mock_aws

    with pytest.MonkeyPatch.context() as env, mock_aws():
        env.setenv("GPUCTL_CONFIG_DIR", str(tmp_path_factory.mktemp("doctor-fleet-profile")))
        ec2 = boto3.client("ec2", region_name=REGION)
        vpc = ec2.create_vpc(CidrBlock="10.13.0.0/16")["Vpc"]["VpcId"]
        subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.13.{n}.0/24", AvailabilityZone=f"{REGION}{z}")
                   ["Subnet"]["SubnetId"] for n, z in ((1, "a"), (2, "b"))]
        settings = Settings(region=REGION, endpoint_url="http://127.0.0.1:5000")
        gw = Gateways(Settings(region=REGION))
        result = deploy(gw.clients, settings, fleet=FleetSpec(3, ami="ami-12c6146b", instance_types=("g5.xlarge",),
                                                              subnets=tuple(subnets)), poll_delay=0)
        fill_gaps(gw.clients, result.stack_name)
        out = result.outputs
        boto3.client("s3", region_name=REGION).put_bucket_lifecycle_configuration(
            Bucket=out["BucketName"], LifecycleConfiguration={"Rules": [
                {"ID": "expire-inputs", "Status": "Enabled", "Filter": {"Prefix": "inputs/"},
                 "Expiration": {"Days": 7}},
                {"ID": "abort-incomplete-uploads", "Status": "Enabled", "Filter": {"Prefix": ""},
                 "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 7}}]})
        # The profile deploy wrote, with the in-process clients (its endpoint only chose deploy's path).
        checked = Gateways(Settings(region=REGION, **{k: v for k, v in result.settings_written.items()
                                                      if k not in ("region", "endpoint_url")}), gw.clients)
        yield checked, out


def heartbeat(table: str, age: float) -> None:
    boto3.client("dynamodb", region_name=REGION).update_item(
        TableName=table, Key={"task_id": {"S": "gpuctl#activity"}},
        UpdateExpression="SET adapter_seen_at = :t, adapter_state = :s",
        ExpressionAttributeValues={":t": {"N": str(time.time() - age)}, ":s": {"S": "running"}})


def members(n: int, out: dict[str, str], *, profile: bool = True) -> list[str]:
    """The group at ``n``; each new member given the stack's instance profile (as the launch template does on
    AWS: moto does not apply it)."""
    autoscaling, ec2 = boto3.client("autoscaling", region_name=REGION), boto3.client("ec2", region_name=REGION)
    autoscaling.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=n)
    ids = [i["InstanceId"] for i in autoscaling.describe_auto_scaling_groups(
        AutoScalingGroupNames=[GROUP])["AutoScalingGroups"][0]["Instances"]]
    for instance_id in ids:
        has = ec2.describe_iam_instance_profile_associations(
            Filters=[{"Name": "instance-id", "Values": [instance_id]}])["IamInstanceProfileAssociations"]
        if profile and not has:
            ec2.associate_iam_instance_profile(InstanceId=instance_id,
                                               IamInstanceProfile={"Name": out["InstanceProfileName"]})
    return ids


def levels(gw: Gateways, only: set[str] | None = None) -> dict[str, tuple[str, str]]:
    return {f.check: (f.level, f.message) for f in run_checks(gw, only=only)}


def test_a_healthy_fleet_passes_every_check_at_zero_and_with_members(fleet_stack: tuple[Gateways, Any]) -> None:
    """GIVEN a fleet stack at 0 THEN every check passes (no instance id needed); at 2 members with the profile and
    an adapter reporting, they still do."""
    gw, out = fleet_stack
    # WHEN at 0
    empty = levels(gw)
    # THEN
    assert {check: level for check, (level, _m) in empty.items()} == dict.fromkeys(empty, "pass"), empty
    assert "has no instance now" in empty["instance.profile"][1]
    assert "no instance of the fleet" in empty["adapter.heartbeat"][1]
    assert "fleet group" in empty["scheduler.environment"][1]
    # WHEN two members run and an adapter reports
    members(2, out)
    heartbeat(out["TableName"], age=5)
    try:
        busy = levels(gw, {"instance.profile", "adapter.heartbeat"})
    finally:
        members(0, out)
    # THEN
    assert busy["instance.profile"] == ("pass", "the fleet's 2 instance(s) have the stack's instance profile")
    assert busy["adapter.heartbeat"][0] == "pass"


def test_a_member_without_the_profile_and_a_silent_fleet_fail(fleet_stack: tuple[Gateways, Any]) -> None:
    """GIVEN a running member without the stack's profile, and no adapter report for an hour THEN both checks fail
    with the member named and a fix."""
    gw, out = fleet_stack
    ids = members(1, out, profile=False)
    heartbeat(out["TableName"], age=3600)
    try:
        found = {f.check: f for f in run_checks(gw, only={"instance.profile", "adapter.heartbeat"})}
    finally:
        members(0, out)
    assert found["instance.profile"].level == "fail" and ids[0] in found["instance.profile"].message
    assert found["instance.profile"].fix and "launch template" in found["instance.profile"].fix
    assert found["adapter.heartbeat"].level == "fail"
    assert "1 instance(s) of the fleet run but the latest of their adapters last reported" in \
        found["adapter.heartbeat"].message
