"""Generated world states for the scheduler, built in moto and run through the real handler.

Shared by tests/functional/test_lambda_generated.py (a bounded number of states in CI) and
bench/bench_scheduler_states.py (the full 20,000-state run). Each state is a consistent world: an instance
(running or stopped, with a last start), a queue (visible, in-flight, delayed messages), GPU and other
services' jobs in every status with heartbeat ages, the activity marker as the adapter and submit keep it (or
no marker at all, as with the running system's adapter, with the scheduler's own observations simulated
run by run), holds (valid, expired, malformed, over-long) and a clock. Optionally one AWS call the handler
makes fails (throttling, access denied, a missing resource) or answers without what it should contain,
injected with a botocore ``before-call`` hook (moto cannot produce these).

:func:`check` states the invariants against the world's truth, not against the handler's own view.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from botocore.awsrequest import AWSResponse

GPU_TYPES = ("/api/v1/camera-angle/jobs", "/api/v1/qwen-image-edit/jobs")
CPU_TYPES = ("/api/v1/face-mask/tasks", "/api/v1/full-face-swap/tasks")
IDLE = 30 * 60.0
SKEW = 60.0
PERIOD = 5 * 60.0
LOST_AFTER = IDLE
MAX_HOLD = 7 * 86400.0
MARKER = "gpuctl#activity"
TAG_KEYS = ["gpuctl:started-at", "gpuctl:started-reason", "gpuctl:started-by", "gpuctl:stopped-at",
            "gpuctl:stopped-reason", "gpuctl:stopped-by", "gpuctl:hold-until", "gpuctl:hold-reason"]

# (operation, what it reads or writes) -> the faults that make sense for it
READS = {
    ("DescribeInstances", "instance"): True,
    ("GetQueueAttributes", "queue"): True,
    ("GetQueueAttributes", "dlq"): False,  # reported only: its loss must not block anything
    ("Query", "pending"): True,
    ("Query", "processing"): True,
    ("Query", "completed"): True,
    ("Query", "failed"): True,
    ("GetItem", "marker"): True,
}
WRITES = [("UpdateItem", "observations"), ("UpdateItem", "fence"), ("UpdateItem", "reap"),
          ("StopInstances", "instance"), ("StartInstances", "instance"), ("CreateTags", "instance")]
KINDS = ["throttled", "denied", "missing", "incomplete"]
ERROR_CODES = {
    ("throttled", "ec2"): "RequestLimitExceeded", ("throttled", "sqs"): "ThrottlingException",
    ("throttled", "dynamodb"): "ThrottlingException",
    ("denied", "ec2"): "UnauthorizedOperation", ("denied", "sqs"): "AccessDenied",
    ("denied", "dynamodb"): "AccessDeniedException",
    ("missing", "ec2"): "InvalidInstanceID.Malformed", ("missing", "sqs"): "AWS.SimpleQueueService.NonExistentQueue",
    ("missing", "dynamodb"): "ResourceNotFoundException",
}


@dataclass
class Job:
    task_id: str
    status: str
    job_type: str
    created_at: float
    updated_at: float
    heartbeat_at: float | None = None
    finished_at: float | None = None
    has_message: bool = False

    @property
    def gpu(self) -> bool:
        return self.job_type in GPU_TYPES


@dataclass
class Fault:
    operation: str
    target: str
    kind: str

    def __str__(self) -> str:
        return f"{self.kind} {self.operation}({self.target})"


@dataclass
class World:
    now: float
    state: str
    started_at: float | None
    visible: int
    in_flight: int
    delayed: int
    dlq: int
    jobs: list[Job]
    marker: dict[str, Any] | None  # None: never written
    exact: bool  # a gpuctl adapter reported since the last start
    hold_raw: str | None
    hold_seen_at: float | None
    queue_empty_since: float | None
    fault: Fault | None = None
    notes: list[str] = field(default_factory=list)

    # --- the truth -----------------------------------------------------------------------------
    @property
    def messages(self) -> int:
        return self.visible + self.in_flight + self.delayed

    def true_last_activity(self) -> float:
        times = [self.started_at or 0.0]
        times += [j.finished_at for j in self.jobs if j.gpu and j.finished_at is not None]
        times += [j.created_at for j in self.jobs if j.gpu]  # every GPU job was submitted
        return max(times)

    def real_work(self) -> bool:
        """Work the GPU can still do: a message, or a GPU job that is not (yet) certainly lost."""
        if self.messages:
            return True
        for job in self.jobs:
            if not job.gpu:
                continue
            if job.status == "pending" and self.now - job.created_at < LOST_AFTER:
                return True
            if job.status == "processing":
                seen = max(t for t in (job.heartbeat_at, job.updated_at) if t is not None)
                if self.now - seen < LOST_AFTER:
                    return True
        return False

    def hold_blocks(self, slack: float = 0.0) -> bool:
        """A hold the scheduler must honour: a future time within the cap, or any doubtful value in its cap.

        ``slack`` widens it (a hold that ended less than ``slack`` ago still counts), for the liveness check.
        """
        if self.hold_raw is None:
            return False
        from decide import parse_time

        anchor = self.hold_seen_at if self.hold_seen_at is not None else self.now
        value = parse_time(self.hold_raw)
        if value is None or value > anchor + MAX_HOLD:
            return self.now < anchor + MAX_HOLD + slack
        return value + slack > self.now

    def open_gpu_jobs(self) -> list[Job]:
        return [j for j in self.jobs if j.gpu and j.status in ("pending", "processing")]

    def lost(self) -> list[Job]:
        empty_long = self.queue_empty_since is not None and self.now - self.queue_empty_since >= LOST_AFTER
        out = []
        for job in self.jobs:
            if not job.gpu or self.messages:
                continue
            if self.queue_empty_since is None or self.now - self.queue_empty_since < 60:
                continue
            if job.status == "processing":
                seen = max(t for t in (job.heartbeat_at, job.updated_at) if t is not None)
                if self.now - seen >= LOST_AFTER + SKEW:
                    out.append(job)
            elif job.status == "pending" and empty_long and self.now - job.created_at >= LOST_AFTER + SKEW:
                out.append(job)
        return out


# ---------------------------------------------------------------------------------------------- generation


def _ago(rng: random.Random, now: float) -> float:
    """A time before now on one of the scales that matter (seconds, the idle window, hours, days)."""
    if rng.random() < 0.3:  # around the idle window's edge, where mistakes show
        return now - IDLE + rng.uniform(-2 * SKEW, 2 * SKEW)
    scale = rng.choice([120.0, 1800.0, 3600.0, 7200.0, 86400.0, 3 * 86400.0])
    return now - rng.uniform(0, scale)


def generate(rng: random.Random, *, now: float, fault_rate: float = 0.5) -> World:
    state = rng.choice(["running", "running", "running", "stopped"])
    started = _ago(rng, now) if rng.random() < 0.9 else None
    jobs: list[Job] = []
    queue_recent = rng.random() < 0.35
    visible = rng.choice([0, 0, 0, 1, 2]) if queue_recent else 0
    in_flight = rng.choice([0, 0, 0, 1]) if queue_recent and state == "running" else 0
    delayed = rng.choice([0, 0, 0, 0, 1]) if queue_recent else 0
    for _ in range(rng.choice([0, 0, 1, 3, 8, 14])):
        status = rng.choice(["pending", "processing", "completed", "failed", "completed", "completed", "completed"])
        job_type = rng.choice(GPU_TYPES + GPU_TYPES + CPU_TYPES)
        created = _ago(rng, now)
        job = Job(str(uuid.uuid4()), status, job_type, created, created)
        if status == "processing":
            job.heartbeat_at = rng.choice([None, 0.0, created + rng.uniform(0, now - created)])
            job.updated_at = max(created, job.heartbeat_at or created, created + rng.uniform(0, now - created))
        elif status in ("completed", "failed"):
            job.finished_at = created + rng.uniform(0, min(now - created, rng.choice([30.0, 600.0, 7200.0])))
            job.updated_at = job.finished_at
        jobs.append(job)
    # The classic sampling trap: an old job that finished a moment ago behind ten newer finished ones.
    if rng.random() < 0.1:
        old = now - 7200
        jobs.append(Job(str(uuid.uuid4()), "completed", GPU_TYPES[0], old, now - 60, finished_at=now - 60))
        for i in range(10):
            created = now - 3600 + i
            jobs.append(Job(str(uuid.uuid4()), "completed", GPU_TYPES[1], created, created + 5,
                            finished_at=created + 5))
    messages = visible + in_flight + delayed
    gpu_finishes = [j.finished_at for j in jobs if j.gpu and j.finished_at is not None]
    gpu_submits = [j.created_at for j in jobs if j.gpu]
    marker: dict[str, Any] | None
    mode = rng.choice(["exact", "exact", "observed", "none"])
    exact = mode == "exact"
    if mode == "none":
        marker = None
    else:
        marker = {}
        if exact:
            # The adapter writes its latest finish; it reported since the last start.
            start = started or now - 30 * 86400
            marker["adapter_seen_at"] = rng.uniform(start, now)
            marker["adapter_state"] = rng.choice(["running", "stopped"])
            marker["jobs_in_hand"] = 0
            if gpu_finishes:
                marker["last_finished_at"] = max(gpu_finishes)
        if gpu_submits and rng.random() < 0.8:
            marker["last_submit_at"] = max(gpu_submits)
        if not exact:
            _simulate_observations(rng, marker, jobs, started, messages, now)
    hold_raw, hold_seen = _hold(rng, now)
    if hold_raw is not None and marker is not None and hold_seen is not None:
        marker["hold_seen_value"], marker["hold_seen_at"] = hold_raw, hold_seen
    elif hold_raw is not None:
        hold_seen = None
    empty_since: float | None = None
    if marker is not None and not messages and rng.random() < 0.7:
        empty_since = rng.choice([now - 30, now - 120, now - 1900, now - 86400])
        marker["queue_empty_since"] = empty_since
    world = World(now, state, started, visible, in_flight, delayed, rng.choice([0, 0, 1, 3]), jobs, marker, exact,
                  hold_raw, hold_seen, empty_since)
    if rng.random() < fault_rate:
        world.fault = _fault(rng)
    return world


def _simulate_observations(rng: random.Random, marker: dict[str, Any], jobs: list[Job], started: float | None,
                           messages: int, now: float) -> None:
    """What the scheduler recorded running every PERIOD since it began watching (the no-adapter fallback)."""
    watch = now - rng.choice([60.0, 1200.0, 3 * 3600.0, 2 * 86400.0])
    marker["scheduler_watch_since"] = watch
    runs = [now - k * PERIOD for k in range(int((now - watch) // PERIOD), 0, -1)]

    def busy(at: float) -> bool:
        for job in jobs:
            if not job.gpu or job.created_at > at:
                continue
            if job.finished_at is not None:
                if job.finished_at > at:
                    return True
            elif (job.status == "pending" or job.heartbeat_at is None
                  or at - max(job.heartbeat_at, job.updated_at) < 300):  # it heartbeated until then
                return True
        return messages > 0 and at >= now - PERIOD

    was_busy = False
    for at in runs:
        if busy(at):
            was_busy = True
        elif was_busy:
            marker["scheduler_work_ended_at"] = at
            was_busy = False
    if was_busy:
        marker["scheduler_busy_since"] = runs[-1]


def _hold(rng: random.Random, now: float) -> tuple[str | None, float | None]:
    kind = rng.choice(["none"] * 10 + ["valid", "expired", "iso", "malformed", "absurd", "long"])
    seen = rng.choice([None, now - 60, now - 3 * 86400, now - 8 * 86400])
    if kind == "none":
        return None, None
    if kind == "valid":
        return str(int(now + rng.uniform(60, 86400))), seen
    if kind == "expired":
        return str(int(now - rng.uniform(1, 86400))), seen
    if kind == "iso":
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + rng.uniform(-3600, 3600))), seen
    if kind == "malformed":
        return rng.choice(["inf", "2h", "tomorrow", "", " ", "nan", "-inf"]), seen
    if kind == "absurd":
        return str(int((now + 3600) * 1000)), seen  # a millisecond epoch
    return str(int(now + 30 * 86400)), seen  # beyond the 7-day cap


def _fault(rng: random.Random) -> Fault:
    if rng.random() < 0.75:
        operation, target = rng.choice(list(READS))
    else:
        operation, target = rng.choice(WRITES)
    return Fault(operation, target, rng.choice(KINDS))


# ---------------------------------------------------------------------------------------------- building


class Builder:
    """Builds worlds in one moto backend, reusing the table and instance, a fresh queue per world."""

    def __init__(self, session: Any, region: str) -> None:
        self.sqs = session.client("sqs", region_name=region)
        self.ddb = session.client("dynamodb", region_name=region)
        self.ec2 = session.client("ec2", region_name=region)
        self.table = "task_store"
        self.ddb.create_table(
            TableName=self.table, BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[{"AttributeName": "task_id", "AttributeType": "S"},
                                  {"AttributeName": "status", "AttributeType": "S"},
                                  {"AttributeName": "created_at", "AttributeType": "N"}],
            KeySchema=[{"AttributeName": "task_id", "KeyType": "HASH"}],
            GlobalSecondaryIndexes=[{"IndexName": "status-created_at-index",
                                     "KeySchema": [{"AttributeName": "status", "KeyType": "HASH"},
                                                   {"AttributeName": "created_at", "KeyType": "RANGE"}],
                                     "Projection": {"ProjectionType": "ALL"}}],
        )
        self.dlq_url = self.sqs.create_queue(QueueName="gen_dlq")["QueueUrl"]
        reservation = self.ec2.run_instances(ImageId="ami-12c6146b", InstanceType="g5.xlarge", MinCount=1,
                                             MaxCount=1)
        self.instance_id = reservation["Instances"][0]["InstanceId"]
        self.queue_url: str | None = None
        self.current = "running"
        self.dlq_depth = 0
        self.count = 0
        self._keys: list[str] = []

    def build(self, world: World) -> dict[str, str]:
        """Make the emulator hold ``world``; return the handler's environment for it."""
        self._clear()
        self.count += 1
        self.queue_url = self.sqs.create_queue(QueueName=f"gen_q{self.count}",
                                               Attributes={"VisibilityTimeout": "300"})["QueueUrl"]
        body = json.dumps({"task_id": "x", "api_path": GPU_TYPES[0], "request_body": {}})
        for _ in range(world.visible + world.in_flight):
            self.sqs.send_message(QueueUrl=self.queue_url, MessageBody=body)
        if world.in_flight:
            got = self.sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=world.in_flight,
                                           VisibilityTimeout=900)
            assert len(got.get("Messages", [])) == world.in_flight
        for _ in range(world.delayed):
            self.sqs.send_message(QueueUrl=self.queue_url, MessageBody=body, DelaySeconds=900)
        for _ in range(max(0, world.dlq - self.dlq_depth)):
            self.sqs.send_message(QueueUrl=self.dlq_url, MessageBody=body)
        self.dlq_depth = max(self.dlq_depth, world.dlq)
        requests = [{"PutRequest": {"Item": _item(job)}} for job in world.jobs]
        if world.marker is not None:
            requests.append({"PutRequest": {"Item": _marker_item(world.marker)}})
        for i in range(0, len(requests), 25):
            self.ddb.batch_write_item(RequestItems={self.table: requests[i:i + 25]})
        self._keys = [job.task_id for job in world.jobs] + ([MARKER] if world.marker is not None else [])
        if world.state == "running" and self.current != "running":
            self.ec2.start_instances(InstanceIds=[self.instance_id])
        elif world.state == "stopped" and self.current != "stopped":
            self.ec2.stop_instances(InstanceIds=[self.instance_id])
        self.current = world.state
        self.ec2.delete_tags(Resources=[self.instance_id], Tags=[{"Key": k} for k in TAG_KEYS])
        new_tags = []
        if world.started_at is not None:
            new_tags.append({"Key": "gpuctl:started-at", "Value": _iso(world.started_at)})
        if world.hold_raw is not None:
            new_tags.append({"Key": "gpuctl:hold-until", "Value": world.hold_raw})
        if new_tags:
            self.ec2.create_tags(Resources=[self.instance_id], Tags=new_tags)
        # moto sets LaunchTime from the real clock (a month before the worlds' clock): at most now.
        world.started_at = max(world.started_at or 0.0, time.time())
        return {"QUEUE_URL": self.queue_url, "DLQ_URL": self.dlq_url, "TABLE_NAME": self.table,
                "INSTANCE_ID": self.instance_id, "IDLE_MINUTES": str(IDLE / 60),
                "CLOCK_SKEW_SECONDS": str(SKEW), "LOST_AFTER_MINUTES": str(LOST_AFTER / 60)}

    def _instance(self) -> dict[str, Any]:
        result: dict[str, Any] = self.ec2.describe_instances(InstanceIds=[self.instance_id])[
            "Reservations"][0]["Instances"][0]
        return result

    def _clear(self) -> None:
        if self.queue_url:
            self.sqs.delete_queue(QueueUrl=self.queue_url)
        keys = [{"DeleteRequest": {"Key": {"task_id": {"S": k}}}} for k in self._keys]
        for i in range(0, len(keys), 25):
            self.ddb.batch_write_item(RequestItems={self.table: keys[i:i + 25]})

    def items(self) -> dict[str, dict[str, Any]]:
        found = self.ddb.scan(TableName=self.table)["Items"]
        return {i["task_id"]["S"]: i for i in found}

    def state(self) -> str:
        self.current = str(self._instance()["State"]["Name"])
        return self.current


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _n(value: float) -> dict[str, str]:
    return {"N": repr(float(value))}


def _item(job: Job) -> dict[str, Any]:
    item: dict[str, Any] = {"task_id": {"S": job.task_id}, "status": {"S": job.status},
                            "job_type": {"S": job.job_type}, "created_at": _n(job.created_at),
                            "updated_at": _n(job.updated_at)}
    if job.heartbeat_at is not None:
        item["heartbeat_at"] = _n(job.heartbeat_at)
    if job.finished_at is not None:
        item["finished_at"] = _n(job.finished_at)
    return item


def _marker_item(marker: dict[str, Any]) -> dict[str, Any]:
    item: dict[str, Any] = {"task_id": {"S": MARKER}}
    for key, value in marker.items():
        item[key] = {"S": value} if isinstance(value, str) else _n(value)
    return item


# ---------------------------------------------------------------------------------------------- faults


def install_fault(clients: Any, world: World, instance_id: str) -> tuple[Callable[[], bool], Callable[[], None]]:
    """Make the world's fault happen on the handler's clients; return (did it fire?, remove the hook)."""
    fault = world.fault
    fired = [False]
    if fault is None:
        return (lambda: False), (lambda: None)

    def matches(operation: str, body: dict[str, Any]) -> bool:
        if operation != fault.operation:
            return False
        if operation == "GetQueueAttributes":
            return (body.get("QueueUrl", "").endswith("gen_dlq")) == (fault.target == "dlq")
        if operation == "Query":
            return bool(body.get("ExpressionAttributeValues", {}).get(":s", {}).get("S") == fault.target)
        if operation == "UpdateItem":
            key = body.get("Key", {}).get("task_id", {}).get("S")
            fence = "stop_fence_at" in body.get("UpdateExpression", "")
            return {"observations": key == MARKER and not fence, "fence": fence,
                    "reap": key != MARKER}[fault.target]
        return True

    def hook(model: Any, params: dict[str, Any], **_: Any) -> Any:
        raw = params.get("body")
        body: dict[str, Any] = {}
        if isinstance(raw, dict):
            body = raw
        elif raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = {}
        if fired[0] or not matches(model.name, body):
            return None
        fired[0] = True
        if fault.kind == "incomplete":
            return AWSResponse("https://fault.invalid", 200, {}, None), _incomplete(model.name, instance_id)
        code = ERROR_CODES[(fault.kind, model.service_model.service_name)]
        status = 403 if fault.kind == "denied" else 400
        return AWSResponse("https://fault.invalid", status, {}, None), {
            "Error": {"Code": code, "Message": f"injected: {fault}"},
            "ResponseMetadata": {"HTTPStatusCode": status}}

    hook_id = f"fault-{uuid.uuid4()}"
    for client in (clients.ec2, clients.sqs, clients.dynamodb):
        client.meta.events.register("before-call", hook, unique_id=hook_id)

    def remove() -> None:
        for client in (clients.ec2, clients.sqs, clients.dynamodb):
            client.meta.events.unregister("before-call", unique_id=hook_id)

    return (lambda: fired[0]), remove


def _incomplete(operation: str, instance_id: str) -> dict[str, Any]:
    """A successful answer without what the operation should return."""
    meta = {"ResponseMetadata": {"HTTPStatusCode": 200}}
    if operation == "DescribeInstances":
        return {"Reservations": [{"Instances": [{"InstanceId": instance_id}]}], **meta}
    if operation == "GetQueueAttributes":
        return {"Attributes": {"ApproximateNumberOfMessagesDelayed": "0"}, **meta}
    if operation == "Query":
        return {"Count": 0, **meta}
    if operation == "GetItem":
        return {**meta}  # as if the marker had never been written
    return {**meta}  # writes: an empty success


# ---------------------------------------------------------------------------------------------- checking


def check(world: World, record: dict[str, Any], state_after: str, items: dict[str, dict[str, Any]],
          fault_fired: bool) -> list[str]:
    """The invariants; each broken one is a sentence (an empty list: the state passed)."""
    problems: list[str] = []
    action, outcome = record["action"], record["outcome"]
    stopped = action == "stop" and outcome.startswith("stopped")
    if action == "stop":
        if world.state != "running":
            problems.append("stopped an instance that was not running")
        if world.real_work():
            problems.append("stop with work present")
        if world.now - world.true_last_activity() < IDLE:
            problems.append(f"stop inside the idle window (last activity "
                            f"{world.now - world.true_last_activity():.0f}s ago)")
        if world.hold_blocks():
            problems.append(f"stop during a hold ({world.hold_raw!r})")
        if fault_fired and world.fault is not None and READS.get((world.fault.operation, world.fault.target)):
            problems.append(f"stop although {world.fault} hid a fact")
    if stopped and state_after != "stopped":
        problems.append("recorded a stop that did not happen")
    if world.fault is not None and fault_fired:
        op = world.fault.operation
        if op == "UpdateItem" and world.fault.target == "fence" and world.fault.kind != "incomplete" \
                and state_after == "stopped" and world.state == "running":
            problems.append("stopped although the stop fence could not be written")
        if op == "StopInstances" and world.fault.kind != "incomplete" and outcome.startswith("stopped"):
            problems.append(f"outcome {outcome!r} after a failed StopInstances")
        if op == "CreateTags" and world.fault.kind != "incomplete" and action != "none" \
                and "tagging failed" not in outcome:
            problems.append(f"outcome {outcome!r} hides the failed CreateTags after a {action}")
    # Other services' jobs are never touched; GPU jobs are failed only when certainly lost.
    lost_ids = {j.task_id for j in world.lost()}
    for job in world.jobs:
        item = items.get(job.task_id)
        status = item["status"]["S"] if item else "missing"
        if status != job.status:
            if not job.gpu:
                problems.append(f"changed another service's job {job.task_id} to {status}")
            elif job.task_id not in lost_ids:
                problems.append(f"failed GPU job {job.task_id} ({job.status}) that was not lost")
    if world.fault is None:
        # Liveness: no fault, so the scheduler must do its job.
        if world.state == "stopped" and (world.visible or world.delayed) and action != "start":
            problems.append(f"did not start a stopped instance with a message waiting ({record['code']})")
        if world.state == "stopped" and action == "start" and not (world.visible or world.delayed):
            problems.append("started a stopped instance with no message waiting")
        reaped = {r["job_id"] for r in record["reaped"] if r["outcome"] == "failed the job"}
        if reaped != lost_ids:
            problems.append(f"reaped {sorted(reaped)} but the lost jobs were {sorted(lost_ids)}")
        idle_enough = world.now - world.true_last_activity() >= IDLE + SKEW
        unlost = [j for j in world.open_gpu_jobs() if j.task_id not in lost_ids]
        if (world.state == "running" and world.exact and not world.messages and not unlost
                and not world.hold_blocks(slack=SKEW) and idle_enough and action != "stop"):
            problems.append(f"kept an idle instance running ({record['code']}: {record['reason']})")
    return problems


def run_states(count: int, seed: int, *, region: str = "us-east-1", env_override: dict[str, str] | None = None,
               on_problem: Callable[[int, World, list[str], dict[str, Any]], bool | None] | None = None
               ) -> dict[str, Any]:
    """Build and check ``count`` worlds in in-process moto; return the tallies.

    ``on_problem`` sees each state that broke an invariant; returning True ends the run there.
    """
    import logging

    # Each run logs its full record (an ERROR for an injected fault): thousands of them are noise here.
    scheduler_log = logging.getLogger("gpuctl.scheduler")
    was_disabled, scheduler_log.disabled = scheduler_log.disabled, True
    try:
        return _run(count, seed, region, env_override, on_problem)
    finally:
        scheduler_log.disabled = was_disabled


def _run(count: int, seed: int, region: str, env_override: dict[str, str] | None,
         on_problem: Callable[[int, World, list[str], dict[str, Any]], bool | None] | None) -> dict[str, Any]:
    import boto3
    from moto import mock_aws

    import handler

    rng = random.Random(seed)
    base_now = time.time() + 30 * 86400  # moto's LaunchTime is the real clock: keep it out of the idle window
    tally: dict[str, Any] = {"states": 0, "stops": 0, "starts": 0, "reaped": 0, "faults": 0, "violations": 0,
                             "by_code": {}}
    with mock_aws():
        session = boto3.session.Session()
        builder = Builder(session, region)
        clients = handler.make_clients(region)
        for i in range(count):
            world = generate(rng, now=base_now + i * 7.0)
            env = builder.build(world)
            fired, remove = install_fault(clients, world, builder.instance_id)
            config = handler.SchedulerConfig.from_env({**env, "AWS_DEFAULT_REGION": region, **(env_override or {})})
            try:
                record = handler.run_once(config, clients, now=world.now, trigger="schedule")
            finally:
                remove()
            problems = check(world, record, builder.state(), builder.items(), fired())
            tally["states"] += 1
            tally["stops"] += record["action"] == "stop" and record["outcome"].startswith("stopped")
            tally["starts"] += record["action"] == "start" and record["outcome"].startswith("started")
            tally["reaped"] += sum(r["outcome"] == "failed the job" for r in record["reaped"])
            tally["faults"] += fired()
            tally["by_code"][record["code"]] = tally["by_code"].get(record["code"], 0) + 1
            if problems:
                tally["violations"] += 1
                if on_problem is not None and on_problem(i, world, problems, record):
                    break
    return tally
