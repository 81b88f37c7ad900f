"""The scheduler Lambda (lambda/handler.py) against in-process moto, driven by real alarm/schedule events."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
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
    monkeypatch.setenv("CLOCK_SKEW_SECONDS", "0")
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


def put_job(table: str, status: str, created_at: float, *, job_type: str = "/api/v1/camera-angle/jobs",
            **numbers: float) -> str:
    task_id = f"job-{status}-{created_at}"
    item: dict[str, Any] = {
        "task_id": {"S": task_id},
        "status": {"S": status},
        "job_type": {"S": job_type},
        "created_at": {"N": str(int(created_at))},
        "updated_at": {"N": str(int(created_at))},
    }
    item.update({name: {"N": str(int(value))} for name, value in numbers.items()})
    boto3.client("dynamodb", region_name=REGION).put_item(TableName=table, Item=item)
    return task_id


def put_marker(table: str, **values: Any) -> None:
    """The activity marker as the adapter and submit write it."""
    item: dict[str, Any] = {"task_id": {"S": "gpuctl#activity"}}
    for name, value in values.items():
        item[name] = {"S": value} if isinstance(value, str) else {"N": str(value)}
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
    assert (result["action"], result["code"], result["outcome"]) == ("stop", "idle", "stopped")
    assert result["trigger"] == trigger
    assert state(env.instance_id) == "stopped"
    instance_tags = tags(env.instance_id)
    assert instance_tags["gpuctl:stopped-reason"] == result["reason"]
    assert instance_tags["gpuctl:stopped-at"] == result["decided_at_iso"]
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


@pytest.mark.parametrize("value", ["tomorrow", "inf", "2h", "", "1796118136000", "4102444800"])
def test_malformed_or_over_long_hold_counts_as_a_capped_hold(env: Resources, value: str) -> None:
    """An unreadable, absurd or beyond-7-days hold keeps the instance up, with a warning naming the value."""
    # GIVEN an idle running instance with a doubtful hold tag
    start(env.instance_id)
    ec2().create_tags(Resources=[env.instance_id], Tags=[{"Key": "gpuctl:hold-until", "Value": value}])
    # WHEN
    result = handler.lambda_handler(load_event(SCHEDULE_EVENT), None)
    # THEN it is held for at most seven days from now, and the record says why
    assert (result["action"], result["code"]) == ("none", "hold_active")
    assert repr(value) in result["warnings"][0]
    assert result["facts"]["hold_until"] == pytest.approx(time.time() + 7 * 86400, abs=60)
    assert state(env.instance_id) == "running"


def test_capped_hold_ends_seven_days_after_it_was_first_seen(env: Resources) -> None:
    """The cap counts from when the scheduler first saw the value, so a malformed hold cannot pin for ever."""
    start(env.instance_id)
    ec2().create_tags(Resources=[env.instance_id], Tags=[{"Key": "gpuctl:hold-until", "Value": "tomorrow"}])
    config = handler.SchedulerConfig.from_env({**_env_of(env), "IDLE_MINUTES": "0", "CLOCK_SKEW_SECONDS": "0"})
    clients = handler.make_clients(REGION)
    t0 = time.time()
    first = handler.run_once(config, clients, now=t0)
    later = handler.run_once(config, clients, now=t0 + 6 * 86400)
    after = handler.run_once(config, clients, now=t0 + 7 * 86400 + 1)
    assert [first["code"], later["code"], after["code"]] == ["hold_active", "hold_active", "idle"]
    assert state(env.instance_id) == "stopped"


def test_stopped_instance_with_waiting_message_is_started(env: Resources) -> None:
    """Work waiting on a stopped instance starts it, and the start is tagged."""
    # GIVEN the fixture's stopped instance and a visible message
    assert state(env.instance_id) == "stopped"
    send_message(env.queue_url)
    # WHEN
    result = handler.lambda_handler(load_event(SCHEDULE_EVENT), None)
    # THEN
    assert (result["action"], result["code"], result["outcome"]) == ("start", "work_waiting", "started")
    assert state(env.instance_id) == "running"
    assert tags(env.instance_id)["gpuctl:started-at"] == result["decided_at_iso"]


def test_pending_job_without_a_message_does_not_start_a_stopped_instance(env: Resources) -> None:
    """A pending GPU job whose message is not in the queue gives the GPU nothing to do: no start."""
    put_job(env.table_name, "pending", time.time() - 120)
    result = handler.lambda_handler(load_event(SCHEDULE_EVENT), None)
    assert (result["action"], result["code"]) == ("none", "pending_without_message")
    assert state(env.instance_id) == "stopped"


def test_stopped_idle_instance_is_left_alone(env: Resources) -> None:
    """A stopped instance with nothing waiting stays stopped; dead letters are not work."""
    send_message(env.dlq_url)
    result = handler.lambda_handler(load_event(ALARM_EVENT), None)
    assert (result["action"], result["code"]) == ("none", "nothing_to_do")
    assert result["facts"]["dlq_visible"] == 1
    assert state(env.instance_id) == "stopped"


def test_recently_finished_job_blocks_stop_within_idle_window(env: Resources) -> None:
    """With a 30-minute window, a job finished 10 minutes ago (per the marker) keeps the GPU up; 40 min: stop."""
    # GIVEN a running instance whose adapter reported a finish at t0, for a job created long before
    start(env.instance_id)
    t0 = time.time() + 3600  # in the future of the instance's launch, so only the job decides
    put_job(env.table_name, "completed", t0 - 7200, updated_at=t0, finished_at=t0)
    put_marker(env.table_name, adapter_seen_at=t0, last_finished_at=t0, adapter_state="running", jobs_in_hand=0)
    config = handler.SchedulerConfig.from_env({**_env_of(env), "IDLE_MINUTES": "30"})
    clients = handler.make_clients(REGION)
    # WHEN / THEN
    early = handler.run_once(config, clients, now=t0 + 10 * 60)
    assert (early["action"], early["code"], early["activity_source"]) == ("none", "recent_activity", "marker")
    assert early["facts"]["last_finished_at"] == pytest.approx(t0)
    late = handler.run_once(config, clients, now=t0 + 40 * 60)
    assert (late["action"], late["outcome"]) == ("stop", "stopped")
    assert state(env.instance_id) == "stopped"


def test_a_finish_hidden_behind_newer_jobs_still_counts(env: Resources) -> None:
    """The old sampling bug: a job created 2 h ago that finished 60 s ago, behind 10 newer finished ones."""
    # GIVEN the marker as the adapter keeps it, and the finished jobs as the status index orders them
    start(env.instance_id)
    t0 = time.time() + 3 * 3600
    put_job(env.table_name, "completed", t0 - 7200, updated_at=t0 - 60, finished_at=t0 - 60)
    for i in range(10):
        put_job(env.table_name, "completed", t0 - 3600 + i, updated_at=t0 - 3590 + i, finished_at=t0 - 3590 + i)
    put_marker(env.table_name, adapter_seen_at=t0 - 50, last_finished_at=t0 - 60, adapter_state="running",
               jobs_in_hand=0)
    config = handler.SchedulerConfig.from_env({**_env_of(env), "IDLE_MINUTES": "30"})
    # WHEN
    result = handler.run_once(config, handler.make_clients(REGION), now=t0)
    # THEN
    assert (result["action"], result["code"]) == ("none", "recent_activity")
    assert state(env.instance_id) == "running"


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
    with pytest.raises(ValueError, match="LOST_AFTER_MINUTES must be at least 1"):
        handler.SchedulerConfig.from_env({**base, "LOST_AFTER_MINUTES": "0"})
    assert handler.SchedulerConfig.from_env({**base, "IDLE_MINUTES": "45"}).policy.lost_after_seconds == 2700


def _stubbed_clients(ec2_client: Any) -> Any:
    return handler.Clients(ec2=ec2_client, sqs=boto3.client("sqs", region_name=REGION),
                           dynamodb=boto3.client("dynamodb", region_name=REGION))


def test_instance_changing_state_under_us_is_skipped(env: Resources) -> None:
    """If EC2 rejects the stop (IncorrectInstanceState, which moto cannot produce) nothing is tagged."""
    # GIVEN real moto SQS/DynamoDB, an idle marker, and an EC2 client stubbed for the one error moto never raises
    put_marker(env.table_name, adapter_seen_at=1000.0, last_finished_at=1000.0)
    ec2_client = boto3.client("ec2", region_name=REGION)
    launched = {"InstanceId": env.instance_id, "State": {"Name": "running", "Code": 16}}
    with Stubber(ec2_client) as stub:
        stub.add_response("describe_instances", {"Reservations": [{"Instances": [launched]}]},
                          {"InstanceIds": [env.instance_id]})
        stub.add_client_error("stop_instances", service_error_code="IncorrectInstanceState",
                              service_message="The instance is not in a state from which it can be stopped.",
                              expected_params={"InstanceIds": [env.instance_id]})
        config = handler.SchedulerConfig.from_env(_env_of(env))
        # WHEN
        result = handler.run_once(config, _stubbed_clients(ec2_client))
        # THEN no create_tags call was made (the stubber would have raised on it)
        stub.assert_no_pending_responses()
    assert result["action"] == "stop"
    assert result["outcome"] == "skipped: the instance changed state (IncorrectInstanceState)"
    assert result["errors"] == []


def test_failed_action_is_logged_then_raised(env: Resources, caplog: pytest.LogCaptureFixture) -> None:
    """A start EC2 refuses (no capacity: moto never says so) is logged as failed; the Lambda then errors."""
    # GIVEN work waiting on the stopped instance and EC2 stubbed to refuse the start
    send_message(env.queue_url)
    ec2_client = boto3.client("ec2", region_name=REGION)
    stopped_instance = {"InstanceId": env.instance_id, "State": {"Name": "stopped", "Code": 80}}
    with Stubber(ec2_client) as stub:
        stub.add_response("describe_instances", {"Reservations": [{"Instances": [stopped_instance]}]})
        stub.add_client_error("start_instances", service_error_code="InsufficientInstanceCapacity")
        config = handler.SchedulerConfig.from_env(_env_of(env))
        # WHEN
        with caplog.at_level(logging.INFO, logger="gpuctl.scheduler"):
            result = handler.run_once(config, _stubbed_clients(ec2_client))
    # THEN the record says what happened, at ERROR
    (line,) = [r for r in caplog.records if r.name == "gpuctl.scheduler"]
    assert line.levelno == logging.ERROR
    logged = json.loads(line.getMessage())
    assert (logged["action"], logged["outcome"]) == ("start", "failed: InsufficientInstanceCapacity")
    assert logged["errors"][0]["code"] == "InsufficientInstanceCapacity"
    assert result == logged


def test_lambda_handler_raises_after_logging_a_run_with_failed_calls(env: Resources,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A run whose AWS calls failed is logged, then counts as a Lambda error (the stack alarms on those)."""
    # GIVEN a queue that no longer exists
    boto3.client("sqs", region_name=REGION).delete_queue(QueueUrl=env.queue_url)
    start(env.instance_id)
    # WHEN / THEN
    with caplog.at_level(logging.INFO, logger="gpuctl.scheduler"), \
            pytest.raises(handler.SchedulerRunFailed, match=r"queue: AWS\.SimpleQueueService\.NonExistentQueue"):
        handler.lambda_handler(load_event(SCHEDULE_EVENT), None)
    logged = json.loads(next(r for r in caplog.records if r.name == "gpuctl.scheduler").getMessage())
    assert (logged["action"], logged["code"]) == ("none", "facts_unknown")
    assert state(env.instance_id) == "running"


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
