"""GpuInstance against moto, and ensure_running's stopping/capacity paths with botocore's Stubber
(moto never produces IncorrectInstanceState or InsufficientInstanceCapacity)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from gpuctl.aws.ec2 import CapacityError, GpuInstance
from gpuctl.errors import NotFound
from gpuctl.services.context import Gateways
from gpuctl.services.instance import ensure_running
from gpuctl.settings import Settings

IID = "i-0123456789abcdef0"


def test_describe_start_stop_and_tags(gateways: Any) -> None:
    """describe reports state and type; start/stop report (previous, current); tags round-trip."""
    instance = gateways.instance
    info = instance.describe()
    assert (info.state, info.instance_type, info.uptime_seconds()) == ("stopped", "g5.xlarge", None)
    assert instance.start() == ("stopped", "pending")
    instance.wait("running", timeout=10, delay=1)
    assert instance.describe().uptime_seconds() is not None
    instance.set_tags({"gpuctl:hold-until": "2099-01-01T00:00:00Z"})
    assert instance.describe().tags["gpuctl:hold-until"] == "2099-01-01T00:00:00Z"
    assert instance.stop()[0] == "running"
    instance.delete_tags(["gpuctl:hold-until"])
    assert "gpuctl:hold-until" not in instance.describe().tags


def test_unknown_instance_is_not_found(gateways: Any) -> None:
    """An instance id that does not exist raises NotFound."""
    with pytest.raises(NotFound):
        GpuInstance(gateways.clients.ec2, "i-00000000000000000").describe()


@pytest.fixture
def stubbed() -> Iterator[tuple[Gateways, Stubber]]:
    """Gateways whose GPU instance talks to a stubbed EC2 client (no network, no moto)."""
    client = boto3.client("ec2", region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    gw = Gateways(Settings(region="us-east-1", instance_id=IID))
    gw.__dict__["instance"] = GpuInstance(client, IID)  # the cached_property's slot
    with Stubber(client) as stub:
        yield gw, stub
        stub.assert_no_pending_responses()


def _change(key: str, previous: str, current: str) -> dict[str, Any]:
    codes = {"pending": 0, "running": 16, "stopping": 64, "stopped": 80}
    return {key: [{"InstanceId": IID, "PreviousState": {"Name": previous, "Code": codes[previous]},
                   "CurrentState": {"Name": current, "Code": codes[current]}}]}


def _described(state: str) -> dict[str, Any]:
    codes = {"pending": 0, "running": 16, "stopping": 64, "stopped": 80}
    return {"Reservations": [{"Instances": [{
        "InstanceId": IID, "InstanceType": "g5.xlarge", "State": {"Name": state, "Code": codes[state]},
        "LaunchTime": dt.datetime(2024, 1, 1, tzinfo=dt.UTC)}]}]}


def test_stopping_instance_is_waited_for_then_started(stubbed: tuple[Gateways, Stubber]) -> None:
    """IncorrectInstanceState while stopping: wait for stopped (waiter), then start it."""
    gw, stub = stubbed
    # GIVEN an instance that is still stopping when the job arrives
    stub.add_client_error("start_instances", service_error_code="IncorrectInstanceState",
                          service_message=f"The instance '{IID}' is not in a state from which it can be started.")
    stub.add_response("describe_instances", _described("stopping"), {"InstanceIds": [IID]})
    stub.add_response("describe_instances", _described("stopped"), {"InstanceIds": [IID]})
    stub.add_response("start_instances", _change("StartingInstances", "stopped", "pending"), {"InstanceIds": [IID]})
    stub.add_response("create_tags", {}, None)
    # WHEN ensure_running runs
    outcome = ensure_running(gw, stopping_wait=30)
    # THEN it waited, started it and tagged the start for the scheduler, without a warning
    assert (outcome.action, outcome.state, outcome.warning) == ("started", "pending", None)


def test_capacity_error_is_a_warning_not_a_failure(stubbed: tuple[Gateways, Stubber]) -> None:
    """InsufficientInstanceCapacity: ensure_running returns failed with a warning; nothing raises."""
    gw, stub = stubbed
    stub.add_client_error("start_instances", service_error_code="InsufficientInstanceCapacity",
                          service_message="We currently do not have sufficient g5.xlarge capacity.")
    outcome = ensure_running(gw)
    assert outcome.action == "failed"
    assert isinstance(outcome.error, CapacityError)
    assert outcome.warning is not None and "the job is queued" in outcome.warning
    assert "InsufficientInstanceCapacity" in outcome.warning


def test_already_running_is_one_request(stubbed: tuple[Gateways, Stubber]) -> None:
    """A running instance: one StartInstances (idempotent), reported already-running."""
    gw, stub = stubbed
    stub.add_response("start_instances", _change("StartingInstances", "running", "running"), {"InstanceIds": [IID]})
    assert ensure_running(gw).action == "already-running"
