"""The adapter's fleet member (adapter/fleet.py): scale-in protection on moto, and the drain on scale-in.

moto 5 emulates groups, instance protection and DescribeAutoScalingInstances, but every instance is always
``InService`` there (no ``Terminating:Wait``, no warm-pool states) and CompleteLifecycleAction /
RecordLifecycleActionHeartbeat are not implemented: the drain is driven by botocore's Stubber with the answer
shapes AWS sends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

import adapter.fleet as fleet_module
from adapter.fleet import FleetMember, instance_id_from_imds, start_member
from adapter.settings import AdapterSettings
from gpuctl.aws.autoscaling import FleetGroup
from gpuctl.errors import ConfigError
from tests.helpers import FLEET_GROUP, REGION, Resources, create_fleet_group


def settings(aws: Resources, **extra: Any) -> AdapterSettings:
    return AdapterSettings(**{**aws.settings_kwargs(), "fleet_group": FLEET_GROUP, "activity_interval": 0.01, **extra})


@pytest.fixture
def group_with_one(aws: Resources) -> tuple[Resources, str]:
    create_fleet_group(boto3.session.Session())
    client = boto3.client("autoscaling", region_name=REGION)
    client.set_desired_capacity(AutoScalingGroupName=FLEET_GROUP, DesiredCapacity=1)
    instance = client.describe_auto_scaling_groups(AutoScalingGroupNames=[FLEET_GROUP])[
        "AutoScalingGroups"][0]["Instances"][0]["InstanceId"]
    return aws, instance


def protected(instance_id: str) -> bool:
    answer = boto3.client("autoscaling", region_name=REGION).describe_auto_scaling_instances(
        InstanceIds=[instance_id])["AutoScalingInstances"]
    return bool(answer[0]["ProtectedFromScaleIn"])


def test_protection_follows_the_work_in_hand(group_with_one: tuple[Resources, str]) -> None:
    """GIVEN an adapter on a fleet instance WHEN it holds a job, then none THEN protection is set, then cleared;
    an InService instance is not drained."""
    aws, instance = group_with_one
    stop = threading.Event()
    member = FleetMember(settings(aws), FleetGroup(boto3.client("autoscaling", region_name=REGION), FLEET_GROUP),
                         instance, stop)
    member.tick(1)
    assert protected(instance)
    member.tick(2)
    member.tick(0)
    assert not protected(instance)
    assert not stop.is_set() and not member.draining


def test_scale_in_drains_then_completes_the_lifecycle_action(aws: Resources) -> None:
    """GIVEN the instance in Terminating:Wait with a job in hand WHEN the member ticks THEN the adapter stops taking
    work (stop set), records a lifecycle heartbeat, and after the drain clears protection and completes (CONTINUE)."""
    client = boto3.client("autoscaling", region_name=REGION)
    stub = Stubber(client)
    iid = "i-0123456789abcdef0"
    group = {"AutoScalingGroupName": FLEET_GROUP, "InstanceIds": [iid]}
    stub.add_response("set_instance_protection", {}, {**group, "ProtectedFromScaleIn": True})
    stub.add_response("describe_auto_scaling_instances", {"AutoScalingInstances": [{
        "InstanceId": iid, "AutoScalingGroupName": FLEET_GROUP, "AvailabilityZone": "us-east-1a",
        "LifecycleState": "Terminating:Wait", "HealthStatus": "HEALTHY", "ProtectedFromScaleIn": True}]},
        {"InstanceIds": [iid]})
    hook = {"LifecycleHookName": "gpuctl-drain", "AutoScalingGroupName": FLEET_GROUP, "InstanceId": iid}
    stub.add_response("record_lifecycle_action_heartbeat", {}, hook)
    stub.add_response("set_instance_protection", {}, {**group, "ProtectedFromScaleIn": False})
    stub.add_response("complete_lifecycle_action", {}, {**hook, "LifecycleActionResult": "CONTINUE"})
    stop = threading.Event()
    with stub:
        member = FleetMember(settings(aws), FleetGroup(client, FLEET_GROUP), iid, stop)
        member.tick(1)
        assert stop.is_set() and member.draining
        member.tick(1)  # draining with a job in hand: a lifecycle heartbeat, no new state read
        member.after_drain()
    stub.assert_no_pending_responses()


def test_a_failed_protection_call_is_retried_after_a_backoff(aws: Resources) -> None:
    """GIVEN SetInstanceProtection throttled twice WHEN the member ticks THEN it waits 1 s, then 2 s, between
    attempts (not every 0.5 s tick), and a change of the wanted state is tried at once."""
    client = boto3.client("autoscaling", region_name=REGION)
    stub = Stubber(client)
    iid = "i-0123456789abcdef0"
    params = {"AutoScalingGroupName": FLEET_GROUP, "InstanceIds": [iid], "ProtectedFromScaleIn": True}
    stub.add_client_error("set_instance_protection", "Throttling", "Rate exceeded", expected_params=params)
    in_service = {"AutoScalingInstances": [{"InstanceId": iid, "AutoScalingGroupName": FLEET_GROUP,
                                            "AvailabilityZone": "us-east-1a", "LifecycleState": "InService",
                                            "HealthStatus": "HEALTHY", "ProtectedFromScaleIn": False}]}
    stub.add_response("describe_auto_scaling_instances", in_service, {"InstanceIds": [iid]})
    stub.add_client_error("set_instance_protection", "Throttling", "Rate exceeded", expected_params=params)
    stub.add_response("set_instance_protection", {}, {**params, "ProtectedFromScaleIn": False})
    with stub:
        member = FleetMember(settings(aws, max_attempts=1), FleetGroup(client, FLEET_GROUP), iid, threading.Event())
        member.tick(1)  # fails: next attempt in 1 s
        member._next_check = float("inf")  # only protection calls from here on
        first_wait = member.protect_retry_at - time.monotonic()
        member.tick(1)  # within the backoff: no call (the stub would answer the next one queued)
        member.protect_retry_at = 0.0  # the backoff has passed
        member.tick(1)  # fails again: next attempt in 2 s
        second_wait = member.protect_retry_at - time.monotonic()
        member.tick(0)  # the job is gone: unprotecting is a different call, tried at once
    stub.assert_no_pending_responses()
    assert 0.5 < first_wait <= 1.0 and 1.5 < second_wait <= 2.0


class _Imds(BaseHTTPRequestHandler):
    def do_PUT(self) -> None:
        self._answer(b"token-1" if self.path == "/latest/api/token" else None)

    def do_GET(self) -> None:
        ok = self.path == "/latest/meta-data/instance-id" and self.headers.get("X-aws-ec2-metadata-token") == "token-1"
        self._answer(b"i-0fedcba9876543210" if ok else None)

    def _answer(self, body: bytes | None) -> None:
        self.send_response(200 if body else 401)
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def imds() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Imds)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/latest"
    server.shutdown()
    server.server_close()


def test_instance_id_comes_from_imdsv2(imds: str) -> None:
    """GIVEN an IMDSv2 endpoint WHEN asked THEN the id comes with a session token; a closed port gives None."""
    assert instance_id_from_imds(imds) == "i-0fedcba9876543210"
    assert instance_id_from_imds("http://127.0.0.1:9/latest", timeout=0.5) is None


def test_fleet_mode_without_an_instance_id_refuses_to_start(aws: Resources, monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    """GIVEN fleet mode, no instance id and no metadata service WHEN the member starts THEN a clear ConfigError."""
    monkeypatch.setattr(fleet_module, "IMDS", "http://127.0.0.1:9/latest")
    with pytest.raises(ConfigError, match="GPUCTL_INSTANCE_ID"):
        start_member(settings(aws, instance_id=None), threading.Event())
    assert start_member(AdapterSettings(**aws.settings_kwargs()), threading.Event()) is None  # single mode


def test_an_adapter_restarted_during_a_scale_in_takes_no_work_and_completes_it(aws: Resources) -> None:
    """GIVEN the instance already in Terminating:Wait when the adapter starts (it crashed mid-drain and systemd
    restarted it) WHEN the member starts THEN it clears protection and completes the lifecycle action, and the
    loop is told not to poll; InService: nothing is called beyond the look."""
    client = boto3.client("autoscaling", region_name=REGION)
    stub = Stubber(client)
    iid = "i-0123456789abcdef0"

    def state(name: str) -> dict[str, Any]:
        return {"AutoScalingInstances": [{"InstanceId": iid, "AutoScalingGroupName": FLEET_GROUP,
                                          "AvailabilityZone": "us-east-1a", "LifecycleState": name,
                                          "HealthStatus": "HEALTHY", "ProtectedFromScaleIn": True}]}

    stub.add_response("describe_auto_scaling_instances", state("InService"), {"InstanceIds": [iid]})
    stub.add_response("describe_auto_scaling_instances", state("Terminating:Wait"), {"InstanceIds": [iid]})
    stub.add_response("set_instance_protection", {}, {"AutoScalingGroupName": FLEET_GROUP, "InstanceIds": [iid],
                                                      "ProtectedFromScaleIn": False})
    stub.add_response("complete_lifecycle_action", {}, {
        "AutoScalingGroupName": FLEET_GROUP, "InstanceId": iid, "LifecycleHookName": "gpuctl-drain",
        "LifecycleActionResult": "CONTINUE"})
    with stub:
        group = FleetGroup(client, FLEET_GROUP)
        in_service = FleetMember(settings(aws, max_attempts=1), group, iid, threading.Event())
        terminating = FleetMember(settings(aws, max_attempts=1), group, iid, threading.Event())
        assert in_service.scaled_in_already() is False
        assert terminating.scaled_in_already() is True
    stub.assert_no_pending_responses()
