"""Nothing pins the GPU for ever: each cost leak the review found, run through the real handler every five
minutes against moto until the instance stops, within idle window + clock skew + one schedule period of the
last real work. Also: other services' tasks in the shared table neither start nor pin the GPU, and each
action's outcome is recorded as it really happened."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse

import handler
from tests.helpers import REGION, Resources

IDLE = 30 * 60.0
SKEW = 60.0
PERIOD = 5 * 60.0
GPU = "/api/v1/camera-angle/jobs"
CPU = "/api/v1/face-mask/tasks"


def ddb() -> Any:
    return boto3.client("dynamodb", region_name=REGION)


def ec2() -> Any:
    return boto3.client("ec2", region_name=REGION)


def instance_state(res: Resources) -> str:
    described = ec2().describe_instances(InstanceIds=[res.instance_id])
    return str(described["Reservations"][0]["Instances"][0]["State"]["Name"])


def put(res: Resources, task_id: str, status: str, job_type: str = GPU, **numbers: float) -> None:
    item: dict[str, Any] = {"task_id": {"S": task_id}, "status": {"S": status}, "job_type": {"S": job_type}}
    item.update({k: {"N": repr(float(v))} for k, v in numbers.items()})
    ddb().put_item(TableName=res.table_name, Item=item)


def status_of(res: Resources, task_id: str) -> dict[str, Any]:
    item = ddb().get_item(TableName=res.table_name, Key={"task_id": {"S": task_id}})["Item"]
    return {"status": item["status"]["S"], "error": item.get("error_message", {}).get("S")}


def marker(res: Resources, **values: Any) -> None:
    item: dict[str, Any] = {"task_id": {"S": "gpuctl#activity"}}
    item.update({k: {"S": v} if isinstance(v, str) else {"N": repr(float(v))} for k, v in values.items()})
    ddb().put_item(TableName=res.table_name, Item=item)


@pytest.fixture
def world(aws: Resources) -> Iterator[tuple[Resources, handler.SchedulerConfig, handler.Clients]]:
    """A running GPU instance whose gpuctl adapter reported; the scheduler with the template's defaults."""
    ec2().start_instances(InstanceIds=[aws.instance_id])
    config = handler.SchedulerConfig.from_env({"QUEUE_URL": aws.queue_url, "DLQ_URL": aws.dlq_url,
                                               "TABLE_NAME": aws.table_name, "INSTANCE_ID": aws.instance_id,
                                               "IDLE_MINUTES": "30", "AWS_DEFAULT_REGION": REGION})
    yield aws, config, handler.make_clients(REGION)


# Clocks a day ahead of the real one: moto's LaunchTime (the real clock) is then older than any window here.
T0 = time.time() + 86400


def run_every_period(config: handler.SchedulerConfig, clients: handler.Clients, start: float,
                     until: float) -> tuple[float | None, list[dict[str, Any]]]:
    """Invoke the scheduler as the schedule does, every PERIOD from ``start``; return when it stopped."""
    records = []
    at = start
    while at <= until:
        record = handler.run_once(config, clients, now=at, trigger="schedule")
        records.append(record)
        if record["action"] == "stop":
            assert record["outcome"] == "stopped", record
            return at, records
        at += PERIOD
    return None, records


def test_dead_worker_job_is_failed_and_the_instance_stops_on_time(world: Any) -> None:
    """A processing job whose worker died (heartbeat 0, message dead-lettered) no longer pins the GPU."""
    res, config, clients = world
    # GIVEN the adapter's last sign of life at T0: it released the job (heartbeat 0) and died; SQS dead-lettered
    # the message; nothing else happened since
    last_work = T0
    put(res, "job-dead", "processing", created_at=T0 - 600, updated_at=last_work, heartbeat_at=0)
    boto3.client("sqs", region_name=REGION).send_message(QueueUrl=res.dlq_url, MessageBody="{}")
    marker(res, adapter_seen_at=T0 - 900, adapter_state="running", jobs_in_hand=1, last_finished_at=T0 - 3600,
           last_submit_at=T0 - 600)
    # WHEN the schedule runs
    stopped_at, records = run_every_period(config, clients, last_work, last_work + 6 * 3600)
    # THEN the job was failed as lost, and the instance stopped in time
    assert stopped_at is not None
    assert stopped_at <= last_work + IDLE + SKEW + PERIOD
    assert status_of(res, "job-dead")["status"] == "failed"
    assert "the worker running it was lost" in str(status_of(res, "job-dead")["error"])
    reaped = [r for rec in records for r in rec["reaped"]]
    assert [(r["job_id"], r["outcome"]) for r in reaped] == [("job-dead", "failed the job")]
    assert instance_state(res) == "stopped"


def test_never_queued_job_on_a_running_instance_is_failed_and_the_instance_stops_on_time(world: Any) -> None:
    """A pending job whose message was never sent is failed as lost; it pins the GPU no longer than that."""
    res, config, clients = world
    # GIVEN a submit at T0 that wrote its record but never queued its message (so no last_submit_at either)
    last_work = T0
    put(res, "job-unqueued", "pending", created_at=T0, updated_at=T0)
    marker(res, adapter_seen_at=T0 - 60, adapter_state="running", jobs_in_hand=0, last_finished_at=T0 - 7200)
    # WHEN
    stopped_at, records = run_every_period(config, clients, T0 + 30, T0 + 6 * 3600)
    # THEN
    assert stopped_at is not None and stopped_at <= last_work + IDLE + SKEW + PERIOD
    assert status_of(res, "job-unqueued")["status"] == "failed"
    assert "lost before it was queued" in str(status_of(res, "job-unqueued")["error"])
    assert all(r["action"] != "stop" for r in records[:-1])


def test_never_queued_job_does_not_start_a_stopped_instance(world: Any) -> None:
    """On a stopped instance, a pending job without a message starts nothing, and is failed as lost."""
    res, config, clients = world
    ec2().stop_instances(InstanceIds=[res.instance_id])
    put(res, "job-unqueued", "pending", created_at=T0, updated_at=T0)
    _, records = run_every_period(config, clients, T0 + 120, T0 + 3 * 3600)
    assert {r["action"] for r in records} == {"none"}
    assert instance_state(res) == "stopped"
    assert status_of(res, "job-unqueued")["status"] == "failed"


def test_a_live_processing_job_is_never_failed(world: Any) -> None:
    """A job whose worker heartbeats keeps the GPU up, however long it runs, and is never reaped."""
    res, config, clients = world
    put(res, "job-long", "processing", created_at=T0, updated_at=T0, heartbeat_at=T0)
    at = T0
    for _ in range(30):  # 2.5 hours of runs, the worker heartbeating in between
        ddb().update_item(TableName=res.table_name, Key={"task_id": {"S": "job-long"}},
                          UpdateExpression="SET heartbeat_at = :h, updated_at = :h",
                          ExpressionAttributeValues={":h": {"N": repr(at)}})
        record = handler.run_once(config, clients, now=at + 20)
        assert (record["action"], record["reaped"]) == ("none", []), record
        at += PERIOD
    assert status_of(res, "job-long")["status"] == "processing"


def test_other_services_tasks_neither_start_nor_pin_the_gpu(world: Any) -> None:
    """CPU tasks of another service in the shared table: a pending one starts nothing, a processing one does
    not keep the GPU up, and neither is ever touched."""
    res, config, clients = world
    # GIVEN the GPU idle since T0 - 2 h and another service busy in the same table
    marker(res, adapter_seen_at=T0 - 7200, adapter_state="running", jobs_in_hand=0, last_finished_at=T0 - 7200)
    put(res, "cpu-running", "processing", CPU, created_at=T0 - 7200, updated_at=T0 - 7200)
    put(res, "cpu-waiting", "pending", CPU, created_at=T0 - 7200, updated_at=T0 - 7200)
    # WHEN / THEN the idle GPU is stopped
    record = handler.run_once(config, clients, now=T0)
    assert (record["action"], record["outcome"]) == ("stop", "stopped")
    assert (record["facts"]["jobs_pending"], record["facts"]["jobs_processing"]) == (0, 0)
    # AND a stopped GPU is not started for them
    later = handler.run_once(config, clients, now=T0 + 3 * 3600)
    assert (later["action"], later["code"]) == ("none", "nothing_to_do")
    assert status_of(res, "cpu-running")["status"] == "processing"
    assert status_of(res, "cpu-waiting")["status"] == "pending"


def test_a_submit_racing_the_decision_cancels_the_stop(world: Any) -> None:
    """If last_submit_at changes between reading the facts and the stop, the fence's condition fails: no stop."""
    res, config, clients = world
    marker(res, adapter_seen_at=T0 - 7200, adapter_state="running", last_submit_at=T0 - 7200)

    def submit_now(**_: Any) -> None:  # a submit lands just after the scheduler read the marker
        marker(res, adapter_seen_at=T0 - 7200, adapter_state="running", last_submit_at=T0)

    clients.dynamodb.meta.events.register_first("before-call.dynamodb.UpdateItem", submit_now)
    record = handler.run_once(config, clients, now=T0)
    assert record["action"] == "stop"
    assert record["outcome"].startswith("skipped: work arrived while deciding")
    assert instance_state(res) == "running"


def _fail(operation: str, code: str) -> Callable[..., Any]:
    def hook(**_: Any) -> Any:
        return AWSResponse("https://fault.invalid", 403, {}, None), {
            "Error": {"Code": code, "Message": "injected"}, "ResponseMetadata": {"HTTPStatusCode": 403}}
    return hook


def test_a_denied_create_tags_after_a_stop_is_recorded_as_stopped(world: Any) -> None:
    """The instance stopped; only the tags failed: the outcome says exactly that."""
    res, config, clients = world
    marker(res, adapter_seen_at=T0 - 7200, adapter_state="running")
    clients.ec2.meta.events.register("before-call.ec2.CreateTags", _fail("CreateTags", "UnauthorizedOperation"))
    record = handler.run_once(config, clients, now=T0)
    assert record["outcome"] == "stopped; tagging failed (UnauthorizedOperation)"
    assert instance_state(res) == "stopped"
    assert record["errors"][0]["fact"] == "instance tags"


def test_a_fence_that_cannot_be_written_means_no_stop(world: Any) -> None:
    """Without the stop fence a submit could miss the stop, so the stop waits for the next run."""
    res, config, clients = world
    marker(res, adapter_seen_at=T0 - 7200, adapter_state="running")
    clients.dynamodb.meta.events.register("before-call.dynamodb.UpdateItem",
                                          _fail("UpdateItem", "AccessDeniedException"))
    record = handler.run_once(config, clients, now=T0)
    assert record["outcome"] == "not stopped: the stop fence could not be written (AccessDeniedException)"
    assert instance_state(res) == "running"


def test_an_answer_without_counts_is_not_an_empty_queue(world: Any) -> None:
    """GetQueueAttributes succeeding without the counts, with a message really queued: unknown, no stop."""
    res, config, clients = world
    marker(res, adapter_seen_at=T0 - 7200, adapter_state="running")
    boto3.client("sqs", region_name=REGION).send_message(QueueUrl=res.queue_url, MessageBody=json.dumps({}))

    def empty(params: dict[str, Any], **_: Any) -> Any:
        if res.queue_url in str(params.get("body")):
            return AWSResponse("https://fault.invalid", 200, {}, None), {"Attributes": {}}
        return None

    clients.sqs.meta.events.register("before-call.sqs.GetQueueAttributes", empty)
    record = handler.run_once(config, clients, now=T0)
    assert (record["action"], record["code"]) == ("none", "facts_unknown")
    assert record["facts"]["queue_visible"] is None
    assert instance_state(res) == "running"


def test_the_fallback_without_a_gpuctl_adapter_watches_a_whole_window_first(world: Any) -> None:
    """With the running system's adapter (no marker), the scheduler stops only after it watched the GPU idle
    for a whole idle window itself, and it says where its activity came from."""
    _res, config, clients = world
    first = handler.run_once(config, clients, now=T0)
    assert (first["code"], first["activity_source"]) == ("recent_activity", "observed")
    stopped_at, _ = run_every_period(config, clients, T0 + PERIOD, T0 + 3 * 3600)
    assert stopped_at is not None and T0 + IDLE + SKEW <= stopped_at <= T0 + IDLE + SKEW + PERIOD


def test_a_stop_answer_without_the_new_state_is_not_recorded_as_a_stop(world: Any) -> None:
    """StopInstances succeeding without naming the instance's new state is "unconfirmed", not "stopped"
    (found by the 20,000-state run)."""
    res, config, clients = world
    marker(res, adapter_seen_at=T0 - 7200, adapter_state="running")

    def empty(**_: Any) -> Any:
        return AWSResponse("https://fault.invalid", 200, {}, None), {"ResponseMetadata": {"HTTPStatusCode": 200}}

    clients.ec2.meta.events.register("before-call.ec2.StopInstances", empty)
    record = handler.run_once(config, clients, now=T0)
    assert record["outcome"] == "unconfirmed: StopInstances answered without the instance's new state"
    assert record["errors"][0]["code"] == "IncompleteAnswer"
    assert instance_state(res) == "running"
