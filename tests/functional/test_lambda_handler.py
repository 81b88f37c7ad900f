"""The scheduler Lambda (lambda/handler.py) against in-process moto, driven by real alarm/schedule events."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber

import handler
from tests.helpers import REGION, Resources

EVENTS = Path(__file__).resolve().parent.parent / "events"
ALARM_EVENT = "cloudwatch_alarm_state_change.json"
SCHEDULE_EVENT = "eventbridge_scheduled_event.json"


def load_event(name: str) -> dict[str, Any]:
    return json.loads((EVENTS / name).read_text())


@pytest.fixture
def env(aws: Resources, monkeypatch: pytest.MonkeyPatch) -> Resources:
    """The Lambda's environment as the template sets it, pointing at the emulator's resources."""
    monkeypatch.setenv("QUEUE_URL", aws.queue_url)
    monkeypatch.setenv("DLQ_URL", aws.dlq_url)
    monkeypatch.setenv("TABLE_NAME", aws.table_name)
    monkeypatch.setenv("INSTANCE_ID", aws.instance_id)
    # The emulator's instance was launched a moment ago and moto never moves LaunchTime, so a zero idle
    # window is the only way lambda_handler (which uses the real clock) can see an idle instance.
    # The 30-minute window is exercised through run_once(now=...) below.
    monkeypatch.setenv("IDLE_MINUTES", "0")
    return aws


def ec2() -> Any:
    return boto3.client("ec2", region_name=REGION)


def instance(instance_id: str) -> dict[str, Any]:
    reservations = ec2().describe_instances(InstanceIds=[instance_id])["Reservations"]
    result: dict[str, Any] = reservations[0]["Instances"][0]
    return result


def state(instance_id: str) -> str:
    return str(instance(instance_id)["State"]["Name"])


def tags(instance_id: str) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance(instance_id).get("Tags", [])}


def start(instance_id: str) -> None:
    ec2().start_instances(InstanceIds=[instance_id])
    assert state(instance_id) == "running"


def put_job(table: str, status: str, created_at: float, **numbers: float) -> None:
    item: dict[str, Any] = {
        "task_id": {"S": f"job-{status}-{created_at}"},
        "status": {"S": status},
        "job_type": {"S": "/api/v1/camera-angle/jobs"},
        "created_at": {"N": str(int(created_at))},
        "updated_at": {"N": str(int(created_at))},
    }
    item.update({name: {"N": str(int(value))} for name, value in numbers.items()})
    boto3.client("dynamodb", region_name=REGION).put_item(TableName=table, Item=item)


def send_message(queue_url: str, **kw: Any) -> None:
    body = json.dumps({"task_id": "t1", "api_path": "/api/v1/camera-angle/jobs", "request_body": {}})
    boto3.client("sqs", region_name=REGION).send_message(QueueUrl=queue_url, MessageBody=body, **kw)


@pytest.mark.parametrize(("event_file", "trigger"), [(ALARM_EVENT, "alarm"), (SCHEDULE_EVENT, "schedule")])
def test_idle_instance_is_stopped_and_tagged(env: Resources, event_file: str, trigger: str) -> None:
    """An idle running instance is stopped and tagged with why and when, whichever event invoked us."""
    # GIVEN a running instance, an empty queue and no jobs
    start(env.instance_id)
    # WHEN
    result = handler.lambda_handler(load_event(event_file), None)
    # THEN
    assert (result["action"], result["code"], result["outcome"]) == ("stop", "idle", "done")
    assert result["trigger"] == trigger
    assert state(env.instance_id) == "stopped"
    instance_tags = tags(env.instance_id)
    assert instance_tags["gpuctl:stopped-reason"] == result["reason"]
    assert instance_tags["gpuctl:stopped-at"] == result["decided_at"]
    assert instance_tags["gpuctl:stopped-by"] == "gpuctl-scheduler"


def test_pending_job_keeps_instance_running(env: Resources) -> None:
    """A pending job (even without its message yet) keeps the instance running."""
    # GIVEN
    start(env.instance_id)
    put_job(env.table_name, "pending", time.time() - 5)
    # WHEN
    result = handler.lambda_handler(load_event(ALARM_EVENT), None)
    # THEN
    assert (result["action"], result["code"]) == ("none", "work_present")
    assert result["facts"]["jobs_pending"] == 1
    assert state(env.instance_id) == "running"
    assert "gpuctl:stopped-reason" not in tags(env.instance_id)


def test_message_in_flight_keeps_instance_running(env: Resources) -> None:
    """A message being worked on (received, not deleted) keeps the instance running."""
    # GIVEN a message received by a worker and still invisible
    start(env.instance_id)
    send_message(env.queue_url)
    received = boto3.client("sqs", region_name=REGION).receive_message(QueueUrl=env.queue_url, WaitTimeSeconds=0)
    assert len(received["Messages"]) == 1
    # WHEN
    result = handler.lambda_handler(load_event(SCHEDULE_EVENT), None)
    # THEN
    assert (result["action"], result["code"]) == ("none", "work_present")
    assert result["facts"]["queue_in_flight"] == 1
    assert result["facts"]["queue_visible"] == 0
    assert state(env.instance_id) == "running"


def test_delayed_message_keeps_instance_running(env: Resources) -> None:
    """A delayed message counts as work."""
    start(env.instance_id)
    send_message(env.queue_url, DelaySeconds=60)
    result = handler.lambda_handler(load_event(SCHEDULE_EVENT), None)
    assert (result["action"], result["facts"]["queue_delayed"]) == ("none", 1)
    assert state(env.instance_id) == "running"


def test_active_hold_keeps_instance_running(env: Resources) -> None:
    """An unexpired gpuctl:hold-until tag prevents the stop and its reason is reported."""
    # GIVEN an idle instance held for another hour
    start(env.instance_id)
    hold = [
        {"Key": "gpuctl:hold-until", "Value": str(int(time.time()) + 3600)},
        {"Key": "gpuctl:hold-reason", "Value": "profiling"},
    ]
    ec2().create_tags(Resources=[env.instance_id], Tags=hold)
    # WHEN
    result = handler.lambda_handler(load_event(ALARM_EVENT), None)
    # THEN
    assert (result["action"], result["code"]) == ("none", "hold_active")
    assert "profiling" in result["reason"]
    assert state(env.instance_id) == "running"


def test_expired_hold_does_not_prevent_stop(env: Resources) -> None:
    """A hold whose time (ISO-8601 here) has passed no longer applies."""
    start(env.instance_id)
    ec2().create_tags(Resources=[env.instance_id], Tags=[{"Key": "gpuctl:hold-until", "Value": "2020-01-01T00:00:00Z"}])
    result = handler.lambda_handler(load_event(ALARM_EVENT), None)
    assert result["action"] == "stop"
    assert state(env.instance_id) == "stopped"


def test_invalid_hold_is_ignored_and_logged(env: Resources, caplog: pytest.LogCaptureFixture) -> None:
    """An unparseable hold value is reported as a warning and does not block the stop."""
    start(env.instance_id)
    ec2().create_tags(Resources=[env.instance_id], Tags=[{"Key": "gpuctl:hold-until", "Value": "tomorrow"}])
    with caplog.at_level(logging.WARNING, logger="gpuctl.scheduler"):
        result = handler.lambda_handler(load_event(SCHEDULE_EVENT), None)
    assert result["action"] == "stop"
    assert any(r.getMessage() == "scheduler.hold_tag_invalid" for r in caplog.records)


def test_stopped_instance_with_waiting_message_is_started(env: Resources) -> None:
    """Work waiting on a stopped instance starts it, and the start is tagged."""
    # GIVEN the fixture's stopped instance and a visible message
    assert state(env.instance_id) == "stopped"
    send_message(env.queue_url)
    # WHEN
    result = handler.lambda_handler(load_event(SCHEDULE_EVENT), None)
    # THEN
    assert (result["action"], result["code"], result["outcome"]) == ("start", "work_waiting", "done")
    assert state(env.instance_id) == "running"
    assert tags(env.instance_id)["gpuctl:started-at"] == result["decided_at"]


def test_stopped_instance_with_old_pending_job_is_started(env: Resources) -> None:
    """A pending job older than a minute starts a stopped instance even when its message is missing."""
    put_job(env.table_name, "pending", time.time() - 120)
    result = handler.lambda_handler(load_event(SCHEDULE_EVENT), None)
    assert result["action"] == "start"
    assert state(env.instance_id) == "running"


def test_stopped_instance_with_fresh_pending_job_waits(env: Resources) -> None:
    """A just-submitted pending job without a message does not start the instance yet."""
    put_job(env.table_name, "pending", time.time())
    result = handler.lambda_handler(load_event(SCHEDULE_EVENT), None)
    assert (result["action"], result["code"]) == ("none", "work_not_yet_waiting")
    assert state(env.instance_id) == "stopped"


def test_stopped_idle_instance_is_left_alone(env: Resources) -> None:
    """A stopped instance with nothing waiting stays stopped; dead letters are not work."""
    send_message(env.dlq_url)
    result = handler.lambda_handler(load_event(ALARM_EVENT), None)
    assert (result["action"], result["code"]) == ("none", "nothing_to_do")
    assert result["facts"]["dlq_visible"] == 1
    assert state(env.instance_id) == "stopped"


def test_recently_finished_job_blocks_stop_within_idle_window(env: Resources) -> None:
    """With a 30-minute window, a job finished 10 minutes ago keeps the GPU up; 40 minutes later it stops."""
    # GIVEN a running instance and a job finished at t0 but created long before (GSI sorts by created_at)
    start(env.instance_id)
    t0 = time.time() + 3600  # in the future of the instance's launch, so only the job decides
    put_job(env.table_name, "completed", t0 - 7200, updated_at=t0 - 5, finished_at=t0)
    put_job(env.table_name, "failed", t0 - 600, updated_at=t0 - 600)
    config = handler.SchedulerConfig.from_env({**_env_of(env), "IDLE_MINUTES": "30"})
    clients = handler.make_clients(REGION)
    # WHEN / THEN
    early = handler.run_once(config, clients, now=t0 + 10 * 60)
    assert (early["action"], early["code"]) == ("none", "recent_activity")
    assert early["facts"]["last_finished_at"] == int(t0)
    late = handler.run_once(config, clients, now=t0 + 40 * 60)
    assert late["action"] == "stop"
    assert state(env.instance_id) == "stopped"


def test_missing_instance_is_reported_not_acted_on(env: Resources, monkeypatch: pytest.MonkeyPatch) -> None:
    """An instance id that does not exist gives a 'none' decision instead of an exception."""
    monkeypatch.setenv("INSTANCE_ID", "i-0123456789abcdef0")
    send_message(env.queue_url)
    result = handler.lambda_handler(load_event(SCHEDULE_EVENT), None)
    assert (result["action"], result["code"]) == ("none", "instance_missing")


def test_decision_is_logged_as_one_json_line(env: Resources, caplog: pytest.LogCaptureFixture) -> None:
    """Every decision is logged once, as a JSON object equal to the returned record."""
    with caplog.at_level(logging.INFO, logger="gpuctl.scheduler"):
        result = handler.lambda_handler(load_event(ALARM_EVENT), None)
    lines = [r.getMessage() for r in caplog.records if r.name == "gpuctl.scheduler" and r.levelno == logging.INFO]
    assert len(lines) == 1
    assert "\n" not in lines[0]
    assert json.loads(lines[0]) == result
    assert result["event"] == "scheduler.decision"
    assert set(result["facts"]) >= {"instance_state", "queue_visible", "queue_in_flight", "jobs_pending"}


def test_missing_environment_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without its required environment the handler names what is missing."""
    monkeypatch.delenv("QUEUE_URL", raising=False)
    monkeypatch.setenv("TABLE_NAME", "task_store")
    with pytest.raises(ValueError, match="QUEUE_URL") as excinfo:
        handler.lambda_handler({}, None)
    assert "INSTANCE_ID" in str(excinfo.value)


def test_bad_idle_minutes_is_a_clear_error() -> None:
    """IDLE_MINUTES must be a non-negative number."""
    base = {"QUEUE_URL": "q", "TABLE_NAME": "t", "INSTANCE_ID": "i-1"}
    with pytest.raises(ValueError, match="IDLE_MINUTES"):
        handler.SchedulerConfig.from_env({**base, "IDLE_MINUTES": "soon"})
    with pytest.raises(ValueError, match="IDLE_MINUTES"):
        handler.SchedulerConfig.from_env({**base, "IDLE_MINUTES": "-1"})


def test_instance_changing_state_under_us_is_skipped(env: Resources) -> None:
    """If EC2 rejects the stop (IncorrectInstanceState, which moto cannot produce) nothing is tagged."""
    # GIVEN real moto SQS/DynamoDB and an EC2 client stubbed for the one error moto never raises
    ec2_client = boto3.client("ec2", region_name=REGION)
    clients = handler.Clients(
        ec2=ec2_client,
        sqs=boto3.client("sqs", region_name=REGION),
        dynamodb=boto3.client("dynamodb", region_name=REGION),
    )
    launched = {"InstanceId": env.instance_id, "State": {"Name": "running", "Code": 16}}
    with Stubber(ec2_client) as stub:
        stub.add_response(
            "describe_instances",
            {"Reservations": [{"Instances": [launched]}]},
            {"InstanceIds": [env.instance_id]},
        )
        stub.add_client_error(
            "stop_instances",
            service_error_code="IncorrectInstanceState",
            service_message="The instance is not in a state from which it can be stopped.",
            expected_params={"InstanceIds": [env.instance_id]},
        )
        config = handler.SchedulerConfig.from_env(_env_of(env))
        # WHEN
        result = handler.run_once(config, clients)
        # THEN no create_tags call was made (the stubber would have raised on it)
        stub.assert_no_pending_responses()
    assert (result["action"], result["outcome"]) == ("stop", "skipped:IncorrectInstanceState")


def test_failed_action_is_logged_then_raised(env: Resources, caplog: pytest.LogCaptureFixture) -> None:
    """A start EC2 refuses (no capacity: moto never says so) is logged as a failed decision and re-raised."""
    # GIVEN work waiting on the stopped instance and EC2 stubbed to refuse the start
    send_message(env.queue_url)
    ec2_client = boto3.client("ec2", region_name=REGION)
    clients = handler.Clients(
        ec2=ec2_client,
        sqs=boto3.client("sqs", region_name=REGION),
        dynamodb=boto3.client("dynamodb", region_name=REGION),
    )
    stopped_instance = {"InstanceId": env.instance_id, "State": {"Name": "stopped", "Code": 80}}
    with Stubber(ec2_client) as stub:
        stub.add_response("describe_instances", {"Reservations": [{"Instances": [stopped_instance]}]})
        stub.add_client_error("start_instances", service_error_code="InsufficientInstanceCapacity")
        config = handler.SchedulerConfig.from_env(_env_of(env))
        # WHEN / THEN
        with caplog.at_level(logging.INFO, logger="gpuctl.scheduler"), pytest.raises(ClientError):
            handler.run_once(config, clients)
    (line,) = [r for r in caplog.records if r.name == "gpuctl.scheduler"]
    assert line.levelno == logging.ERROR
    logged = json.loads(line.getMessage())
    assert (logged["action"], logged["outcome"]) == ("start", "failed:InsufficientInstanceCapacity")


def test_event_kind_recognises_the_real_event_shapes() -> None:
    """The alarm and schedule fixtures are told apart; anything else is a plain invoke."""
    assert handler.event_kind(load_event(ALARM_EVENT)) == "alarm"
    assert handler.event_kind(load_event(SCHEDULE_EVENT)) == "schedule"
    assert handler.event_kind({}) == "invoke"
    assert handler.event_kind(None) == "invoke"


def _env_of(res: Resources) -> dict[str, str]:
    return {
        "QUEUE_URL": res.queue_url,
        "DLQ_URL": res.dlq_url,
        "TABLE_NAME": res.table_name,
        "INSTANCE_ID": res.instance_id,
        "AWS_DEFAULT_REGION": REGION,
    }
