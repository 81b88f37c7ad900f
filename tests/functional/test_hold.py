"""Holds and the recorded stop reason: the tags the scheduler Lambda honours and writes, against moto."""

from __future__ import annotations

import json
import time
from typing import Any

import boto3
import pytest

from gpuctl.errors import NotFound, UsageError
from gpuctl.services.hold import MAX_HOLD_SECONDS, hold, parse_hold_duration, release, why_stopped
from gpuctl.services.instance import HOLD_REASON_TAG, HOLD_UNTIL_TAG, STOPPED_AT_TAG, STOPPED_REASON_TAG
from tests.helpers import REGION, Resources, run_cli


def _tags(instance_id: str, endpoint: str | None = None) -> dict[str, str]:
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=endpoint)
    reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return {t["Key"]: t["Value"] for t in reservations[0]["Instances"][0].get("Tags", [])}


@pytest.mark.parametrize(("value", "seconds"), [("30m", 1800), ("2h", 7200), ("1d", 86400), ("90s", 90),
                                                ("1.5h", 5400), ("7d", MAX_HOLD_SECONDS)])
def test_durations(value: str, seconds: float) -> None:
    """--for takes a number and a unit (s, m, h, d, w)."""
    assert parse_hold_duration(value) == seconds


@pytest.mark.parametrize(("value", "message"), [("2", "not a duration"), ("soon", "not a duration"),
                                                ("0m", "longer than zero"), ("8d", "maximum hold of 7 days")])
def test_bad_durations_are_refused(value: str, message: str) -> None:
    """A duration without a unit, zero, or over a week is a usage error that says why."""
    with pytest.raises(UsageError, match=message):
        parse_hold_duration(value)


def test_hold_sets_the_tags_the_lambda_reads(gateways: Any, aws: Resources) -> None:
    """A hold writes hold-until as epoch seconds and the reason; holding again replaces both."""
    # WHEN the instance is held for 2 hours with a reason
    result = hold(gateways, "2h", "debugging", now=1_000_000.0)
    # THEN the tags carry the expiry (epoch seconds) and the reason
    tags = _tags(aws.instance_id)
    assert tags[HOLD_UNTIL_TAG] == "1007200"
    assert tags[HOLD_REASON_TAG] == "debugging"
    assert result.document() == {"instance_id": aws.instance_id, "state": "stopped", "hold_until": 1007200,
                                 "hold_until_iso": "1970-01-12T15:46:40Z", "hold_reason": "debugging",
                                 "hold_warning": None}
    # WHEN it is held again without a reason
    hold(gateways, "30m")
    # THEN the old reason is gone and the expiry is from now
    tags = _tags(aws.instance_id)
    assert HOLD_REASON_TAG not in tags
    assert abs(int(tags[HOLD_UNTIL_TAG]) - (time.time() + 1800)) < 60


def test_release_removes_the_hold(gateways: Any, aws: Resources) -> None:
    """Release deletes both hold tags and returns the hold that was there; a second release finds none."""
    hold(gateways, "1h", "demo", now=2_000_000.0)

    first = release(gateways)
    second = release(gateways)

    assert (first.until, first.reason) == (2_003_600.0, "demo")
    assert second.until is None
    assert not {HOLD_UNTIL_TAG, HOLD_REASON_TAG} & set(_tags(aws.instance_id))


def test_why_stopped_without_a_record(gateways: Any) -> None:
    """With no stop tags there is no recorded stop (not an error)."""
    record = why_stopped(gateways)

    assert not record.recorded
    assert record.document()["stopped_reason"] is None


def test_why_stopped_reads_the_lambdas_tags(gateways: Any, aws: Resources) -> None:
    """The reason and time the Lambda tagged on its last stop are read back."""
    # GIVEN the scheduler stopped the instance and tagged why
    gateways.instance.set_tags({STOPPED_REASON_TAG: "idle for 30 min", STOPPED_AT_TAG: "2026-01-01T12:00:00Z"})
    # WHEN asked why it stopped
    record = why_stopped(gateways)
    # THEN the recorded stop is returned with the instance's state
    assert record.recorded
    assert (record.reason, record.stopped_at, record.state) == ("idle for 30 min", "2026-01-01T12:00:00Z", "stopped")


def test_an_unknown_instance_is_not_found(aws: Resources) -> None:
    """Holding an instance that does not exist says so (and tags nothing)."""
    from gpuctl.services.context import Gateways
    from gpuctl.settings import Settings

    gw = Gateways(Settings(**{**aws.settings_kwargs(), "instance_id": "i-0123456789abcdef0"}))

    with pytest.raises(NotFound, match="i-0123456789abcdef0"):
        hold(gw, "1h")


@pytest.mark.server
def test_cli_hold_release_why_stopped(server_aws: Resources) -> None:
    """`gpuctl instance hold|why-stopped|release` as a user runs them, against moto's server."""
    env = server_aws.env()

    held = run_cli(["instance", "hold", "--for", "2h", "--reason", "demo", "--output", "json"], env)
    assert held.returncode == 0, held.stderr
    doc = json.loads(held.stdout)
    assert (doc["hold_reason"], doc["state"]) == ("demo", "stopped")
    assert _tags(server_aws.instance_id, server_aws.endpoint_url)[HOLD_UNTIL_TAG] == str(doc["hold_until"])

    why = run_cli(["instance", "why-stopped"], env)
    assert why.returncode == 0, why.stderr
    assert "no recorded stop" in why.stdout

    released = run_cli(["instance", "release", "--output", "json"], env)
    assert released.returncode == 0, released.stderr
    assert json.loads(released.stdout)["released"] is True
    assert HOLD_UNTIL_TAG not in _tags(server_aws.instance_id, server_aws.endpoint_url)

    text = run_cli(["instance", "hold", "--for", "30m"], env)
    assert text.returncode == 0, text.stderr
    assert "held until" in text.stderr
    assert "a hold only prevents idle stops" in text.stderr  # the instance is stopped

    bad = run_cli(["instance", "hold", "--for", "forever"], env)
    assert bad.returncode == 2
    assert "--for 'forever' is not a duration" in bad.stderr


NOW = 1_750_000_000.0


@pytest.mark.parametrize("raw", ["inf", "2h", "tomorrow", "", " ", "nan", str(int(NOW * 1000)),
                                 str(int(NOW + 8 * 86400)), str(int(NOW + 3600)), str(int(NOW - 5)),
                                 "2025-06-15T15:06:40Z", None])
@pytest.mark.parametrize("first_seen", [None, NOW - 3 * 86400, NOW - 8 * 86400])
def test_the_cli_judges_a_hold_as_the_scheduler_does(raw: str | None, first_seen: float | None) -> None:
    """gpuctl's hold judgement and the Lambda's (which cannot import gpuctl) agree on every kind of value."""
    from decide import Policy, resolve_hold
    from gpuctl.services.hold import judge_hold

    ours = judge_hold(raw, NOW, first_seen_at=first_seen)
    lambdas = resolve_hold(raw, NOW, Policy(max_hold_seconds=MAX_HOLD_SECONDS), first_seen_at=first_seen)
    assert ours.until == lambdas.until
    assert (ours.warning is None) == (lambdas.warning is None)


@pytest.mark.server
def test_status_warns_about_a_malformed_hold(server_aws: Resources) -> None:
    """`instance status` shows that an unreadable hold counts as a capped hold: a warning and the cap in JSON."""
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=server_aws.endpoint_url)
    ec2.create_tags(Resources=[server_aws.instance_id], Tags=[{"Key": HOLD_UNTIL_TAG, "Value": "tomorrow"}])
    doc = json.loads(run_cli(["instance", "status", "--output", "json"], server_aws.env()).stdout)
    text = run_cli(["instance", "status"], server_aws.env())
    assert doc["hold_until"] is None  # not a time: the JSON carries times only (the warning quotes the value)
    assert "'tomorrow' is not a time" in doc["hold_warning"]
    assert abs(doc["hold_effective_until"] - (time.time() + MAX_HOLD_SECONDS)) < 120
    assert text.returncode == 0, text.stderr
    assert "Warning: the hold value 'tomorrow' is not a time" in " ".join(text.stderr.split())
