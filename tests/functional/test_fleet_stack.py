"""Fleet mode's stack: the template's fleet section (static checks where moto cannot follow) and
`gpuctl deploy --fleet` into moto, which records the group in the profile.

moto creates the Auto Scaling group and the launch template from the template, but silently skips
AWS::AutoScaling::WarmPool and ignores the group's LifecycleHookSpecificationList: those are checked here
statically (cfn-lint runs in .ci/run), and the adapter's lifecycle calls are covered in test_fleet_adapter.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from gpuctl.errors import UsageError
from gpuctl.services.deploy import FleetSpec, deploy
from gpuctl.settings import Settings, read_profile
from tests.functional.test_infra_template import allowed, assert_least_privilege, template
from tests.helpers import REGION, run_cli

pytestmark = pytest.mark.filterwarnings("ignore:Tried to parse AWS:UserWarning")

FLEET_RESOURCES = {"FleetLaunchTemplate", "FleetGroup", "FleetWarmPool", "FleetOperatorPolicy",
                   "FleetSchedulerPolicy", "FleetInstancePolicy"}


def policy_statements(tpl: dict[str, Any], logical_id: str) -> list[dict[str, Any]]:
    return list(tpl["Resources"][logical_id]["Properties"]["PolicyDocument"]["Statement"])


def test_every_fleet_resource_is_conditional_on_fleet_mode() -> None:
    """GIVEN the template WHEN single-instance mode deploys THEN it creates none of the fleet resources."""
    tpl = template()
    fleet = {k for k, r in tpl["Resources"].items() if str(r.get("Condition", "")).startswith("Fleet")}
    assert fleet == FLEET_RESOURCES
    assert tpl["Parameters"]["FleetMaxInstances"]["Default"] == 0
    outputs = {k for k, o in tpl["Outputs"].items() if o.get("Condition") == "FleetMode"}
    assert outputs == {"FleetGroupName", "FleetOperatorPolicyArn"}


def test_group_scales_to_zero_with_a_stopped_warm_pool_and_a_drain_hook() -> None:
    """GIVEN the fleet section THEN: min 0, no fixed desired size, several subnets, a Stopped warm pool reused on
    scale-in, and a scale-in lifecycle hook that continues by default."""
    res = template()["Resources"]
    group = res["FleetGroup"]["Properties"]
    assert group["MinSize"] == "0" and "DesiredCapacity" not in group
    assert group["VPCZoneIdentifier"] == {"Ref": "FleetSubnets"}
    overrides = group["MixedInstancesPolicy"]["LaunchTemplate"]["Overrides"]["Fn::If"]
    assert overrides[0] == "FleetType3Given" and len(overrides[1]) == 3
    hook = group["LifecycleHookSpecificationList"][0]
    assert (hook["LifecycleTransition"], hook["DefaultResult"]) == ("autoscaling:EC2_INSTANCE_TERMINATING",
                                                                    "CONTINUE")
    pool = res["FleetWarmPool"]["Properties"]
    assert pool["PoolState"] == "Stopped" and pool["InstanceReusePolicy"] == {"ReuseOnScaleIn": True}
    assert pool["AutoScalingGroupName"] == {"Ref": "FleetGroup"}
    data = res["FleetLaunchTemplate"]["Properties"]["LaunchTemplateData"]
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["IamInstanceProfile"] == {"Arn": {"Fn::GetAtt": ["GpuInstanceProfile", "Arn"]}}


@pytest.mark.parametrize(("policy", "calls"), [
    ("FleetSchedulerPolicy", ["autoscaling:DescribeAutoScalingGroups", "autoscaling:SetDesiredCapacity",
                              "autoscaling:CreateOrUpdateTags"]),
    ("FleetInstancePolicy", ["autoscaling:DescribeAutoScalingInstances", "autoscaling:SetInstanceProtection",
                             "autoscaling:CompleteLifecycleAction", "autoscaling:RecordLifecycleActionHeartbeat"]),
    ("FleetOperatorPolicy", ["autoscaling:DescribeAutoScalingGroups", "autoscaling:SetDesiredCapacity",
                             "autoscaling:CreateOrUpdateTags", "autoscaling:DeleteTags"]),
])
def test_fleet_policies_allow_exactly_the_calls_made_and_are_scoped(policy: str, calls: list[str]) -> None:
    """GIVEN each fleet policy THEN it allows the calls its user makes, on the group where the action can be scoped."""
    statements = policy_statements(template(), policy)
    assert_least_privilege(statements)
    for call in calls:
        hint = "*" if ":Describe" in call else "autoScalingGroupName/${ResourcePrefix}-gpu-fleet"
        assert allowed(statements, call, hint), call


def test_scheduler_runs_every_minute_in_fleet_mode_only() -> None:
    """GIVEN the schedule rule THEN fleet mode reconciles every minute, single-instance mode every 5 minutes."""
    tpl = template()
    assert tpl["Resources"]["ScheduleRule"]["Properties"]["ScheduleExpression"] == {
        "Fn::If": ["FleetMode", "rate(1 minute)", "rate(5 minutes)"]}
    env = tpl["Resources"]["SchedulerFunction"]["Properties"]["Environment"]["Variables"]
    assert env["FLEET_GROUP"]["Fn::If"][0] == "FleetMode"


@pytest.fixture
def moto_fleet(clean_env: Path) -> Iterator[tuple[Any, list[str], Path]]:
    from moto import mock_aws

    from gpuctl.aws._session import make_clients

    with mock_aws():
        ec2 = boto3.client("ec2", region_name=REGION)
        vpc = ec2.create_vpc(CidrBlock="10.13.0.0/16")["Vpc"]["VpcId"]
        subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.13.{n}.0/24", AvailabilityZone=f"{REGION}{z}")
                   ["Subnet"]["SubnetId"] for n, z in ((1, "a"), (2, "b"))]
        yield make_clients(Settings(region=REGION)), subnets, clean_env


def test_deploy_fleet_creates_the_group_and_records_it(moto_fleet: tuple[Any, list[str], Path]) -> None:
    """GIVEN two subnets WHEN deploy --fleet runs THEN the group exists at 0 (max 3) and the profile has fleet_group."""
    clients, subnets, _ = moto_fleet
    spec = FleetSpec(3, ami="ami-12c6146b", instance_types=("g5.xlarge", "g6.xlarge"), subnets=tuple(subnets),
                     jobs_per_instance=2)
    # An emulator endpoint in the settings takes deploy's local path (CreateStack): moto builds no outputs for a
    # stack made by executing a change set. The clients stay in-process.
    result = deploy(clients, Settings(region=REGION, endpoint_url="http://127.0.0.1:5000"), fleet=spec,
                    poll_delay=0)
    assert result.status == "CREATE_COMPLETE"
    assert result.outputs["FleetGroupName"] == "gpuctl-gpu-fleet"
    assert result.settings_written["fleet_group"] == "gpuctl-gpu-fleet"
    assert read_profile("default", None)["fleet_group"] == "gpuctl-gpu-fleet"
    group = boto3.client("autoscaling", region_name=REGION).describe_auto_scaling_groups(
        AutoScalingGroupNames=["gpuctl-gpu-fleet"])["AutoScalingGroups"][0]
    assert (group["MinSize"], group["MaxSize"], group["DesiredCapacity"]) == (0, 3, 0)
    assert set(group["VPCZoneIdentifier"].split(",")) == set(subnets)
    function = boto3.client("lambda", region_name=REGION).get_function_configuration(
        FunctionName="gpuctl-gpu-scheduler")
    env = function["Environment"]["Variables"]
    fleet_env = (env["FLEET_GROUP"], str(env["JOBS_PER_INSTANCE"]), str(env["SCHEDULE_MINUTES"]))
    assert fleet_env == ("gpuctl-gpu-fleet", "2", "1")
    assert "INSTANCE_ID" not in env or not env["INSTANCE_ID"]
    # The state-change rule passes every instance's events (they carry no tags; lambda/history.py keeps the
    # group's members), so gpuctl cost sees the fleet. moto has no TestEventPattern: its own EventBridge
    # matcher (what its PutEvents routes with) judges the deployed pattern.
    from moto.events.models import EventPattern

    rule = boto3.client("events", region_name=REGION).describe_rule(Name=result.outputs["StateChangeRuleName"])
    pattern = EventPattern.load(rule["EventPattern"])
    sample = json.loads((Path(__file__).parents[1] / "events" / "ec2_state_change_running.json").read_text())
    for state in ("pending", "running", "stopped", "terminated"):
        sample["detail"] = {"instance-id": "i-0fleet000000000001", "state": state}
        assert pattern.matches_event(sample), state
    sample["detail-type"] = "EC2 Spot Instance Interruption Warning"
    assert not pattern.matches_event(sample)


@pytest.mark.parametrize(("spec", "message"), [
    (FleetSpec(2, ami="ami-12c6146b", instance_types=("g5.xlarge",)), "--subnets"),
    (FleetSpec(2, subnets=("subnet-1",)), "--launch-template ID, or --ami"),
    (FleetSpec(2, launch_template="lt-0123456789abcdef0", ami="ami-12c6146b", subnets=("subnet-1",)), "not both"),
    (FleetSpec(2, ami="ami-12c6146b", instance_types=("a.b", "c.d", "e.f", "g.h"), subnets=("s",)), "at most 3"),
])
def test_incomplete_fleet_is_refused_before_anything_changes(moto_fleet: tuple[Any, list[str], Path],
                                                             spec: FleetSpec, message: str) -> None:
    """GIVEN an incomplete fleet spec WHEN deployed THEN one clear sentence, and no stack."""
    clients, _, _ = moto_fleet
    with pytest.raises(UsageError, match=message):
        deploy(clients, Settings(region=REGION), fleet=spec, poll_delay=0)
    assert clients.cloudformation.list_stacks()["StackSummaries"] == []


def test_cli_fleet_flags_need_fleet(clean_env: Path) -> None:
    """GIVEN fleet-only flags without --fleet, or --fleet without --max-instances WHEN run THEN exit 2, one sentence."""
    bad = run_cli(["--region", REGION, "deploy", "--subnets", "subnet-1", "--yes"], {})
    assert bad.returncode == 2 and "--subnets is a fleet-mode option: add --fleet." in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = run_cli(["--region", REGION, "deploy", "--fleet", "--yes"], {})
    assert missing.returncode == 2 and "--fleet needs --max-instances" in missing.stderr
