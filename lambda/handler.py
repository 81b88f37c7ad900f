"""Scheduler Lambda: stop the idle GPU instance, start it when work waits (thin shim over ``decide``).

Invoked by the queue-idle CloudWatch alarm and by an EventBridge ``rate(5 minutes)`` schedule. The event only
says *why* we run; the decision is always taken from live state (EC2, SQS, DynamoDB). Self-contained:
standard library + boto3 (``gpuctl deploy`` zips this folder as it is).

Every fact is read on its own: a call that fails (throttled, denied, a missing resource) or answers without
the value needed makes that fact unknown, and unknown never means "no work" (see decide.py). The run then
still logs its decision record, and ``lambda_handler`` raises afterwards so the failure counts as a Lambda
error (the stack alarms on those and keeps failed invocations in a dead-letter queue).

Last activity comes from the activity marker, one item of the task table (``task_id = "gpuctl#activity"``;
the attribute names of gpuctl.aws.dynamo.Activity): ``last_finished_at`` (the adapter), ``last_submit_at``
(every submit), the instance's last start. One consistent GetItem, whatever the table holds. Where no gpuctl
adapter has reported since the instance started (the running system's own adapter writes no marker), the
scheduler falls back to what it observed itself, recorded in the same item: when it first watched
(``scheduler_watch_since``), and the first run that saw no GPU work after one that did
(``scheduler_work_ended_at``); plus the newest finished jobs of the status index, as before. Before
StopInstances it writes ``stop_fence_at`` on condition that ``last_submit_at`` and ``last_finished_at`` are
what it read: a submit or a finish that raced the decision cancels the stop.

Environment:
    QUEUE_URL            job queue URL (required)
    TABLE_NAME           task table name (required)
    INSTANCE_ID          GPU instance id (required, except in fleet mode)
    FLEET_GROUP          fleet mode: the EC2 Auto Scaling group whose desired capacity is set from the backlog
                         (fleet.py) instead of starting/stopping INSTANCE_ID
    JOBS_PER_INSTANCE    fleet mode: queued or running jobs one instance is meant to own (default 4)
    DLQ_URL              dead-letter queue URL (optional; reported, never counted as work)
    IDLE_MINUTES         idle window in minutes (default 30; may be fractional)
    START_AFTER_SECONDS  how long a pending job waits before it starts a stopped instance whose queue cannot be
                         read (default 60)
    CLOCK_SKEW_SECONDS   allowed difference between this clock and the adapter's, the CLI's, EC2's (default 60)
    LOST_AFTER_MINUTES   a processing job without a heartbeat, or a pending job without a message, for this long
                         (with the queue empty) is failed as lost (default: the idle window, at least 5)
    MAX_HOLD_HOURS       the longest hold honoured (default 168 = the CLI's 7 days)
    GPU_JOB_TYPES        comma-separated api_paths that are the GPU's work (default: gpuctl's two job types)
    REAP_LOST_JOBS       ``false`` to only report lost jobs, never fail them (default true)
    SCHEDULE_MINUTES     the period of the EventBridge schedule (default 5; bounds the fallback's estimate)
    STATUS_INDEX         GSI name (default ``status-created_at-index``)
    AWS_ENDPOINT_URL     optional endpoint (local emulator)
    LOG_LEVEL            default INFO
    HISTORY_TABLE        the instance history table (optional; EC2 state-change events, see history.py)
    HISTORY_TTL_DAYS     how long a recorded state change is kept (default 400)

Local mode (moto never runs Lambda code) calls :func:`run_once` in a loop with its own clients.

Tags read and written on the instance:
    gpuctl:hold-until     epoch seconds or ISO-8601 time; no stop before it (read; see decide.resolve_hold)
    gpuctl:hold-reason    free text (read)
    gpuctl:started-at     ISO-8601; counts as activity (read; written on start)
    gpuctl:stopped-reason / -at / -by   written on stop (``gpuctl instance why-stopped`` reads them)
    gpuctl:started-reason / -by         written on start
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

import history
from decide import (
    Decision,
    Facts,
    HoldView,
    LostJob,
    OpenJob,
    Policy,
    decide,
    gpu_job_types,
    lost_jobs,
    parse_time,
    resolve_hold,
)

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_sqs import SQSClient

__all__ = [
    "ACTIVITY_TASK_ID",
    "DEFAULT_GPU_JOB_TYPES",
    "HOLD_REASON_TAG",
    "HOLD_UNTIL_TAG",
    "STARTED_AT_TAG",
    "STOPPED_AT_TAG",
    "STOPPED_REASON_TAG",
    "Clients",
    "SchedulerConfig",
    "SchedulerRunFailed",
    "event_kind",
    "gather",
    "lambda_handler",
    "make_clients",
    "run_once",
]

logger = logging.getLogger("gpuctl.scheduler")

HOLD_UNTIL_TAG = "gpuctl:hold-until"
HOLD_REASON_TAG = "gpuctl:hold-reason"
STARTED_AT_TAG = "gpuctl:started-at"
STARTED_REASON_TAG = "gpuctl:started-reason"
STARTED_BY_TAG = "gpuctl:started-by"
STOPPED_AT_TAG = "gpuctl:stopped-at"
STOPPED_REASON_TAG = "gpuctl:stopped-reason"
STOPPED_BY_TAG = "gpuctl:stopped-by"
ACTOR = "gpuctl-scheduler"

#: The activity marker's key (gpuctl.models.ACTIVITY_TASK_ID; the Lambda cannot import gpuctl).
ACTIVITY_TASK_ID = "gpuctl#activity"
#: gpuctl's GPU job types (gpuctl.models.GPU_API_PATHS; a test keeps the two equal).
DEFAULT_GPU_JOB_TYPES = ("/api/v1/camera-angle/jobs", "/api/v1/qwen-image-edit/jobs")
DEFAULT_INDEX = "status-created_at-index"
#: Open-job counts stop at this many (we need "any?" and a rough size for the log).
COUNT_LIMIT = 100
#: At most this many index pages (1 MB each) are read per status before the count is "unknown": a table
#: shared with a service that has a huge backlog of its own must not make each run read all of it.
MAX_PAGES = 10
#: Finished jobs inspected per status in the fallback (no gpuctl adapter reports): the newest by created_at.
FINISHED_SAMPLE = 10
#: Lost jobs failed per run (the rest on the next runs).
REAP_BATCH = 25
#: An adapter report younger than this says what it holds now (gpuctl's adapter reports every few seconds).
ADAPTER_REPORT_FRESH = 120.0
#: A processing job whose heartbeat is older than this is not live work for the scheduler's own observation
#: (the adapter's visibility timeout; it heartbeats every 30 s). Jobs without heartbeats count as live.
LIVE_HEARTBEAT = 300.0
_TAG_VALUE_MAX = 256

T = TypeVar("T")


class SchedulerRunFailed(RuntimeError):
    """Raised by lambda_handler after logging a run in which AWS calls failed, so it counts as an error."""


@dataclass(frozen=True)
class SchedulerConfig:
    """Where to look and the policy; built from the environment by :meth:`from_env`."""

    queue_url: str
    table_name: str
    instance_id: str
    dlq_url: str | None = None
    status_index: str = DEFAULT_INDEX
    idle_minutes: float = 30.0
    start_after_seconds: float = 60.0
    clock_skew_seconds: float = 60.0
    lost_after_minutes: float | None = None
    max_hold_hours: float = 168.0
    job_types: frozenset[str] = frozenset(DEFAULT_GPU_JOB_TYPES)
    reap: bool = True
    schedule_minutes: float = 5.0
    region: str | None = None
    endpoint_url: str | None = None
    fleet_group: str | None = None
    jobs_per_instance: int = 4

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SchedulerConfig:
        fleet_group = (env.get("FLEET_GROUP") or "").strip() or None
        required = ("QUEUE_URL", "TABLE_NAME") if fleet_group else ("QUEUE_URL", "TABLE_NAME", "INSTANCE_ID")
        missing = [name for name in required if not env.get(name)]
        if missing:
            raise ValueError(f"missing required environment variable(s): {', '.join(missing)}")
        lost = env.get("LOST_AFTER_MINUTES")
        if lost and _non_negative(env, "LOST_AFTER_MINUTES", 0.0) < 1:
            raise ValueError(f"LOST_AFTER_MINUTES must be at least 1 (a job is never lost that fast), got {lost!r}")
        return cls(
            queue_url=env["QUEUE_URL"],
            table_name=env["TABLE_NAME"],
            instance_id=env.get("INSTANCE_ID") or "",
            dlq_url=env.get("DLQ_URL") or None,
            status_index=env.get("STATUS_INDEX") or DEFAULT_INDEX,
            idle_minutes=_non_negative(env, "IDLE_MINUTES", 30.0),
            start_after_seconds=_non_negative(env, "START_AFTER_SECONDS", 60.0),
            clock_skew_seconds=_non_negative(env, "CLOCK_SKEW_SECONDS", 60.0),
            lost_after_minutes=_non_negative(env, "LOST_AFTER_MINUTES", 0.0) if lost else None,
            max_hold_hours=_non_negative(env, "MAX_HOLD_HOURS", 168.0),
            job_types=gpu_job_types(env.get("GPU_JOB_TYPES"), DEFAULT_GPU_JOB_TYPES),
            schedule_minutes=_non_negative(env, "SCHEDULE_MINUTES", 5.0),
            reap=(env.get("REAP_LOST_JOBS") or "true").strip().lower() not in ("false", "0", "no", "off"),
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            endpoint_url=env.get("AWS_ENDPOINT_URL") or None,
            fleet_group=fleet_group,
            jobs_per_instance=_jobs_per_instance(env),
        )

    @property
    def policy(self) -> Policy:
        idle = self.idle_minutes * 60.0
        lost = self.lost_after_minutes * 60.0 if self.lost_after_minutes is not None else max(idle, 300.0)
        return Policy(idle_seconds=idle, start_after_seconds=self.start_after_seconds,
                      clock_skew_seconds=self.clock_skew_seconds, lost_after_seconds=lost,
                      max_hold_seconds=self.max_hold_hours * 3600.0)


def _jobs_per_instance(env: Mapping[str, str]) -> int:
    raw = (env.get("JOBS_PER_INSTANCE") or "4").strip()
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"JOBS_PER_INSTANCE must be a whole number of at least 1, got {raw!r}")
    return int(raw)


def _non_negative(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number, got {raw!r}")
    return value


@dataclass(frozen=True)
class Clients:
    ec2: EC2Client
    sqs: SQSClient
    dynamodb: DynamoDBClient
    autoscaling: AutoScalingClient | None = None  # fleet mode only


def make_clients(region: str | None = None, endpoint_url: str | None = None, *, fleet: bool = False) -> Clients:
    """The one place the scheduler builds boto3 clients (bounded retries and timeouts)."""
    session = boto3.session.Session(region_name=region)
    cfg = BotoConfig(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=15)
    return Clients(
        ec2=session.client("ec2", endpoint_url=endpoint_url, config=cfg),
        sqs=session.client("sqs", endpoint_url=endpoint_url, config=cfg),
        dynamodb=session.client("dynamodb", endpoint_url=endpoint_url, config=cfg),
        autoscaling=session.client("autoscaling", endpoint_url=endpoint_url, config=cfg) if fleet else None,
    )


@functools.lru_cache(maxsize=4)
def _warm_clients(region: str | None, endpoint_url: str | None, fleet: bool = False) -> Clients:
    """Module-scope client cache: built lazily on the first invocation, reused while the Lambda is warm."""
    return make_clients(region, endpoint_url, fleet=fleet)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Missing(Exception):
    """An answer came back without the value a fact needs."""


@dataclass
class _Run:
    """One run's bookkeeping: the AWS errors met (each fact that became unknown) and warnings."""

    errors: list[dict[str, str]] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def read(self, fact: str, call: Callable[[], T]) -> T | None:
        """``call()``, or None (the fact is unknown) when it fails or its answer lacks what is needed."""
        try:
            return call()
        except ClientError as exc:
            self.fail(fact, exc)
        except BotoCoreError as exc:
            self.fail(fact, exc)
        except _Missing as exc:
            self.unknown.append(fact)
            self.errors.append({"fact": fact, "code": "IncompleteAnswer", "message": str(exc)})
        return None

    def fail(self, what: str, exc: Exception) -> None:
        self.unknown.append(what)
        self.errors.append({"fact": what, "code": _code(exc), "message": str(exc)[:300]})


def _code(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code") or "unknown")
    return type(exc).__name__


# ---------------------------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class _Instance:
    state: str
    started_at: float | None
    hold_raw: str | None
    hold_reason: str | None


def _instance(ec2: EC2Client, instance_id: str) -> _Instance:
    try:
        reservations = ec2.describe_instances(InstanceIds=[instance_id]).get("Reservations")
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "InvalidInstanceID.NotFound":
            return _Instance("missing", None, None, None)
        raise
    if reservations is None:
        raise _Missing("DescribeInstances answered without Reservations")
    instances = [i for r in reservations for i in r.get("Instances", [])]
    if not instances:
        return _Instance("missing", None, None, None)
    instance = instances[0]
    state = instance.get("State", {}).get("Name")
    if not state:
        raise _Missing("DescribeInstances answered without the instance state")
    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", []) if "Key" in t and "Value" in t}
    # LaunchTime is the last start for an EBS-backed instance on AWS; our own tag covers emulators and
    # starts made by gpuctl.
    started = [t for t in (instance["LaunchTime"].timestamp() if "LaunchTime" in instance else None,
                           parse_time(tags.get(STARTED_AT_TAG))) if t is not None]
    return _Instance(state, max(started) if started else None, tags.get(HOLD_UNTIL_TAG),
                     tags.get(HOLD_REASON_TAG) or None)


_QUEUE_ATTRS = ("ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed")


def _queue_counts(sqs: SQSClient, queue_url: str) -> tuple[int, int, int]:
    answer: Mapping[str, Any] = sqs.get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
                                            "ApproximateNumberOfMessagesDelayed"])
    attrs: Mapping[str, str] | None = answer.get("Attributes")
    if attrs is None:
        raise _Missing("GetQueueAttributes answered without Attributes")
    values = []
    for name in _QUEUE_ATTRS:
        raw = attrs.get(name)
        try:
            values.append(int(str(raw)))
        except ValueError:
            raise _Missing(f"GetQueueAttributes answered without a number for {name}") from None
    return values[0], values[1], values[2]


def _number(item: Mapping[str, Any], name: str) -> float | None:
    """A numeric attribute (``{"N": ...}``) as a float; None when absent.

    Raises:
        _Missing: present but not a finite number.
    """
    attr = item.get(name)
    if attr is None:
        return None
    if not isinstance(attr, Mapping) or "N" not in attr:
        raise _Missing(f"{name} is not a number ({attr!r})")
    try:
        value = float(attr["N"])
    except (TypeError, ValueError):
        raise _Missing(f"{name} is not a number ({attr!r})") from None
    if not math.isfinite(value):
        raise _Missing(f"{name} is not a finite number ({attr!r})")
    return value


def _lenient_number(item: Mapping[str, Any], name: str) -> float | None:
    try:
        return _number(item, name)
    except _Missing:
        return None


@dataclass(frozen=True)
class _OpenJobs:
    """Open GPU jobs of one status: how many (capped), the oldest ones (for the reaper)."""

    count: int
    jobs: list[OpenJob]
    complete: bool  # every matching item was read (no cap, no page limit hit)


def _gpu_query(config: SchedulerConfig, status: str, projection: str, *, newest_first: bool,
               limit: int | None = None) -> dict[str, Any]:
    """A status-index query for one status, GPU job types only (other services' rows filtered out)."""
    types = sorted(config.job_types)
    # The running system's spelling with a trailing slash counts too.
    values = {f":t{i}": {"S": t} for i, t in enumerate([*types, *(t + "/" for t in types)])}
    query: dict[str, Any] = {
        "TableName": config.table_name, "IndexName": config.status_index,
        "KeyConditionExpression": "#s = :s", "FilterExpression": f"#jt IN ({', '.join(values)})",
        "ExpressionAttributeNames": {"#s": "status", "#jt": "job_type"},
        "ExpressionAttributeValues": {":s": {"S": status}, **values},
        "ProjectionExpression": projection, "ScanIndexForward": not newest_first,
    }
    if limit is not None:
        query["Limit"] = limit
    return query


def _index_pages(ddb: DynamoDBClient, query: dict[str, Any], status: str) -> Iterator[tuple[list[Any], bool]]:
    """At most MAX_PAGES pages of the query: (items, whether more remain).

    Raises:
        _Missing: a page came back without Items.
    """
    for _ in range(MAX_PAGES):
        page = ddb.query(**query)
        items = page.get("Items")
        if items is None:
            raise _Missing(f"the {status} query answered without Items")
        start = page.get("LastEvaluatedKey")
        yield list(items), bool(start)
        if not start:
            return
        query["ExclusiveStartKey"] = start


def _open_jobs(ddb: DynamoDBClient, config: SchedulerConfig, status: str) -> _OpenJobs:
    """Pending or processing GPU jobs, oldest first (the GSI range key), other services' jobs filtered out."""
    query = _gpu_query(config, status, "task_id, created_at, updated_at, heartbeat_at", newest_first=False)
    jobs: list[OpenJob] = []
    more = False
    for items, remaining in _index_pages(ddb, query, status):
        more = remaining
        for item in items:
            task_id = item.get("task_id", {}).get("S")
            if not task_id:
                raise _Missing(f"a {status} job came back without its task_id")
            jobs.append(OpenJob(task_id, status,  # type: ignore[arg-type]
                                _lenient_number(item, "created_at"), _lenient_number(item, "updated_at"),
                                _lenient_number(item, "heartbeat_at")))
        if len(jobs) >= COUNT_LIMIT:
            return _OpenJobs(len(jobs), jobs[:COUNT_LIMIT], complete=False)
    if more and not jobs:
        raise _Missing(f"no {status} GPU job in the first {MAX_PAGES} pages, and more remain")
    return _OpenJobs(len(jobs), jobs, complete=not more)


def _sampled_finish(ddb: DynamoDBClient, config: SchedulerConfig) -> float | None:
    """Fallback (no gpuctl adapter reports): an upper bound of the last GPU job's finish from the newest ones.

    The status index is sorted by created_at, not by finish, so the newest ``FINISHED_SAMPLE`` GPU jobs of
    each finished status are read (finished_at, else updated_at). When a sample is full, an older job may have
    finished later, but only within the same gap between two scheduler runs (a job that was open while the
    scheduler ran was seen, see ``scheduler_work_ended_at``), so one schedule period is added to it.
    """
    latest: float | None = None
    for status in ("completed", "failed"):
        # Small pages: the newest few are wanted, not a megabyte of history per page.
        query = _gpu_query(config, status, "created_at, updated_at, finished_at", newest_first=True,
                           limit=FINISHED_SAMPLE * 5)
        finishes: list[float] = []
        more = False
        for items, remaining in _index_pages(ddb, query, status):
            more = remaining
            for item in items:
                times = [t for t in (_lenient_number(item, n) for n in ("finished_at", "updated_at", "created_at"))
                         if t is not None]
                if times:
                    finishes.append(max(times))
            if len(finishes) >= FINISHED_SAMPLE:
                break
        complete = len(finishes) < FINISHED_SAMPLE and not more
        finishes = sorted(finishes, reverse=True)[:FINISHED_SAMPLE]
        if finishes:
            bound = finishes[0] + (0.0 if complete else config.schedule_minutes * 60.0)
            latest = bound if latest is None else max(latest, bound)
    return latest


@dataclass(frozen=True)
class _Marker:
    """The activity marker as read: raw attribute values (for the fence's conditions) and parsed fields."""

    raw: dict[str, Any]

    def number(self, name: str) -> float | None:
        return _number(self.raw, name)

    def lenient(self, name: str) -> float | None:
        return _lenient_number(self.raw, name)

    def text(self, name: str) -> str | None:
        attr = self.raw.get(name)
        return attr.get("S") if isinstance(attr, Mapping) else None


def _marker(ddb: DynamoDBClient, config: SchedulerConfig) -> _Marker:
    response = ddb.get_item(TableName=config.table_name, Key={"task_id": {"S": ACTIVITY_TASK_ID}},
                            ConsistentRead=True)
    return _Marker(dict(response.get("Item") or {}))


@dataclass
class Gathered:
    """Everything read in one run, before the decision."""

    facts: Facts
    instance: _Instance | None
    marker: _Marker | None
    pending: _OpenJobs | None
    processing: _OpenJobs | None
    queue_empty_since: float | None
    activity_source: str
    marker_update: dict[str, Any]  # attribute -> value to SET (None: REMOVE)


def _observe(marker: _Marker, facts: Facts, hold_raw: str | None, live_work: bool | None, now: float,
             policy: Policy) -> tuple[dict[str, Any], float | None, float | None, HoldView]:
    """What the scheduler records of its own observations, and the values to decide with.

    Returns the marker changes, queue_empty_since, the observed activity time and the hold.
    """
    changes: dict[str, Any] = {}
    empty = facts.queue_empty
    empty_since = marker.lenient("queue_empty_since")
    if empty is True and empty_since is None:
        changes["queue_empty_since"] = empty_since = now
    elif empty is False:
        if empty_since is not None:
            changes["queue_empty_since"] = None
        empty_since = None
    watch_since = marker.lenient("scheduler_watch_since")
    if watch_since is None:
        changes["scheduler_watch_since"] = watch_since = now
    busy_since = marker.lenient("scheduler_busy_since")
    ended = marker.lenient("scheduler_work_ended_at")
    if live_work is True and busy_since is None:
        changes["scheduler_busy_since"] = now
    elif live_work is False and busy_since is not None:
        changes["scheduler_busy_since"] = None
        changes["scheduler_work_ended_at"] = ended = now
    observed = max(t for t in (watch_since, ended) if t is not None)
    seen_value, seen_at = marker.text("hold_seen_value"), marker.lenient("hold_seen_at")
    if hold_raw is None:
        if seen_value is not None:
            changes["hold_seen_value"] = changes["hold_seen_at"] = None
        first_seen = None
    elif seen_value != hold_raw or seen_at is None:
        changes["hold_seen_value"], changes["hold_seen_at"] = hold_raw, now
        first_seen = now
    else:
        first_seen = seen_at
    return changes, empty_since, observed, resolve_hold(hold_raw, now, policy, first_seen_at=first_seen)


def _live(jobs: _OpenJobs | None, now: float) -> bool:
    """Whether processing jobs include live work (no heartbeat recorded, or a recent one)."""
    return jobs is not None and any(j.heartbeat_at is None or now - j.heartbeat_at < LIVE_HEARTBEAT
                                    for j in jobs.jobs)


def gather(config: SchedulerConfig, clients: Clients, run: _Run, now: float, *,
           read_instance: Callable[[], _Instance] | None = None, instance_fact: str = "instance") -> Gathered:
    """Read every fact the decision needs; each one that cannot be read becomes unknown (never zero).

    ``read_instance`` replaces the EC2 read (fleet mode: the Auto Scaling group stands for the instance).
    """
    policy = config.policy
    instance = run.read(instance_fact, read_instance or (lambda: _instance(clients.ec2, config.instance_id)))
    counts = run.read("queue", lambda: _queue_counts(clients.sqs, config.queue_url))
    dlq_url = config.dlq_url
    dlq = run.read("dead-letter queue", lambda: _queue_counts(clients.sqs, dlq_url)) if dlq_url else None
    pending = run.read("pending jobs", lambda: _open_jobs(clients.dynamodb, config, "pending"))
    processing = run.read("processing jobs", lambda: _open_jobs(clients.dynamodb, config, "processing"))
    marker = run.read("activity marker", lambda: _marker(clients.dynamodb, config))

    started = instance.started_at if instance else None
    base = Facts(
        instance_state=instance.state if instance else "unknown",
        queue_visible=counts[0] if counts else None,
        queue_in_flight=counts[1] if counts else None,
        queue_delayed=counts[2] if counts else None,
        jobs_pending=pending.count if pending else None,
        jobs_processing=processing.count if processing else None,
        oldest_pending_created_at=pending.jobs[0].created_at if pending and pending.jobs else None,
        last_started_at=started,
        hold_reason=instance.hold_reason if instance else None,
        dlq_visible=dlq[0] if dlq else None,
    )
    hold_raw = instance.hold_raw if instance else None
    if marker is None:
        hold = resolve_hold(hold_raw, now, policy)
        facts = dataclasses.replace(base, activity_known=False, hold_until=hold.until, hold_warning=hold.warning,
                                    unknown=tuple(run.unknown))
        return Gathered(facts, instance, None, pending, processing, None, "unknown", {})

    live_work: bool | None = None
    if not base.work_unknown:
        live_work = bool(base.queue_visible or base.queue_in_flight or base.queue_delayed or base.jobs_pending
                         or _live(processing, now))
    changes, empty_since, observed, hold = _observe(marker, base, hold_raw, live_work, now, policy)
    if hold.warning:
        run.warnings.append(hold.warning)

    activity_known = True
    try:
        last_finished, last_submit = marker.number("last_finished_at"), marker.number("last_submit_at")
    except _Missing as exc:
        run.unknown.append("activity marker")
        run.errors.append({"fact": "activity marker", "code": "IncompleteAnswer", "message": str(exc)})
        last_finished = last_submit = None
        activity_known = False
    adapter_seen = marker.lenient("adapter_seen_at")
    exact = adapter_seen is not None and (started is None or adapter_seen >= started - policy.clock_skew_seconds)
    in_hand = None
    if adapter_seen is not None and now - adapter_seen <= ADAPTER_REPORT_FRESH + policy.clock_skew_seconds \
            and marker.text("adapter_state") in ("running", "draining"):
        in_hand_value = marker.lenient("jobs_in_hand")
        in_hand = int(in_hand_value) if in_hand_value is not None else None
    observed_at: float | None = None
    source = "marker"
    if not exact:
        source = "observed"
        observed_at = observed
        sampled = run.read("finished jobs", lambda: _sampled_finish(clients.dynamodb, config))
        if sampled is None and "finished jobs" in run.unknown:
            activity_known = False
        last_finished = max((t for t in (last_finished, sampled) if t is not None), default=None)
    facts = dataclasses.replace(
        base, last_finished_at=last_finished, last_submit_at=last_submit, observed_activity_at=observed_at,
        activity_known=activity_known, adapter_jobs_in_hand=in_hand, hold_until=hold.until,
        hold_warning=hold.warning, unknown=tuple(run.unknown),
    )
    return Gathered(facts, instance, marker, pending, processing, empty_since, source, changes)


# ---------------------------------------------------------------------------------------------- writes


def _update_marker(ddb: DynamoDBClient, config: SchedulerConfig, changes: Mapping[str, Any]) -> None:
    sets = {k: v for k, v in changes.items() if v is not None}
    removes = [k for k, v in changes.items() if v is None]
    names = {f"#m{i}": k for i, k in enumerate(changes)}
    index = {k: f"#m{i}" for i, k in enumerate(changes)}
    values: dict[str, Any] = {}
    parts = []
    if sets:
        assignments = []
        for i, (key, value) in enumerate(sets.items()):
            values[f":m{i}"] = {"S": value} if isinstance(value, str) else {"N": repr(float(value))}
            assignments.append(f"{index[key]} = :m{i}")
        parts.append("SET " + ", ".join(assignments))
    if removes:
        parts.append("REMOVE " + ", ".join(index[k] for k in removes))
    kwargs: dict[str, Any] = {"TableName": config.table_name, "Key": {"task_id": {"S": ACTIVITY_TASK_ID}},
                              "UpdateExpression": " ".join(parts), "ExpressionAttributeNames": names}
    if values:
        kwargs["ExpressionAttributeValues"] = values
    ddb.update_item(**kwargs)


def _reap(ddb: DynamoDBClient, config: SchedulerConfig, lost: LostJob, now: float) -> str:
    """Fail one lost job, on condition that it is still as it was read; return the outcome."""
    job = lost.job
    values: dict[str, Any] = {":failed": {"S": "failed"}, ":expected": {"S": job.status},
                              ":reason": {"S": lost.reason}, ":now": {"N": repr(now)}}
    conditions = ["#s = :expected"]
    for name, value in (("created_at", job.created_at), ("updated_at", job.updated_at),
                        ("heartbeat_at", job.heartbeat_at)):
        if value is None:
            conditions.append(f"attribute_not_exists({name})")
        else:
            values[f":{name}"] = {"N": repr(value)}
            conditions.append(f"{name} = :{name}")
    try:
        ddb.update_item(
            TableName=config.table_name, Key={"task_id": {"S": job.task_id}},
            UpdateExpression="SET #s = :failed, error_message = :reason, finished_at = :now, updated_at = :now",
            ConditionExpression=" AND ".join(conditions), ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues=values,
        )
    except ClientError as exc:
        if _code(exc) == "ConditionalCheckFailedException":
            return "skipped: it changed since it was read"
        return f"failed: {_code(exc)}"
    except BotoCoreError as exc:
        return f"failed: {_code(exc)}"
    return "failed the job"


def _fence(ddb: DynamoDBClient, config: SchedulerConfig, marker: _Marker, now: float) -> None:
    """Write stop_fence_at unless last_submit_at / last_finished_at changed since the marker was read."""
    values: dict[str, Any] = {":now": {"N": repr(now)}, ":by": {"S": ACTOR}}
    conditions = []
    for name in ("last_submit_at", "last_finished_at"):
        if name in marker.raw:
            values[f":{name}"] = marker.raw[name]
            conditions.append(f"{name} = :{name}")
        else:
            conditions.append(f"attribute_not_exists({name})")
    ddb.update_item(
        TableName=config.table_name, Key={"task_id": {"S": ACTIVITY_TASK_ID}},
        UpdateExpression="SET stop_fence_at = :now, stop_fence_by = :by",
        ConditionExpression=" AND ".join(conditions), ExpressionAttributeValues=values,
    )


def _tag_value(text: str) -> str:
    return text if len(text) <= _TAG_VALUE_MAX else text[: _TAG_VALUE_MAX - 3] + "..."


def _act(config: SchedulerConfig, clients: Clients, decision: Decision, gathered: Gathered, run: _Run,
         now: float) -> str:
    """Carry out the decision; return what really happened, one step at a time."""
    if decision.action == "none":
        return "noop"
    ids = [config.instance_id]
    if decision.action == "stop":
        assert gathered.marker is not None  # a stop needs the marker's facts
        try:
            _fence(clients.dynamodb, config, gathered.marker, now)
        except ClientError as exc:
            if _code(exc) == "ConditionalCheckFailedException":
                return "skipped: work arrived while deciding (a submit or a finish changed the activity marker)"
            run.fail("stop fence", exc)
            return f"not stopped: the stop fence could not be written ({_code(exc)})"
        except BotoCoreError as exc:
            run.fail("stop fence", exc)
            return f"not stopped: the stop fence could not be written ({_code(exc)})"
        verb = "stopped"
        call: Callable[..., Any] = clients.ec2.stop_instances
        tags = {STOPPED_REASON_TAG: decision.reason, STOPPED_AT_TAG: _iso(now), STOPPED_BY_TAG: ACTOR}
    else:
        verb, call = "started", clients.ec2.start_instances
        tags = {STARTED_REASON_TAG: decision.reason, STARTED_AT_TAG: _iso(now), STARTED_BY_TAG: ACTOR}
    try:
        answer = call(InstanceIds=ids)
    except ClientError as exc:
        if _code(exc) == "IncorrectInstanceState":  # the state moved since we looked: the next run re-decides
            return f"skipped: the instance changed state ({_code(exc)})"
        run.fail(f"{decision.action} instance", exc)
        return f"failed: {_code(exc)}"
    except BotoCoreError as exc:
        run.fail(f"{decision.action} instance", exc)
        return f"failed: {_code(exc)}"
    # Only an answer that names the instance in its new state says the change happened.
    key, states = (("StoppingInstances", {"stopping", "stopped"}) if decision.action == "stop"
                   else ("StartingInstances", {"pending", "running"}))
    changes = answer.get(key) if isinstance(answer, Mapping) else None
    confirmed = any(c.get("InstanceId") == config.instance_id and c.get("CurrentState", {}).get("Name") in states
                    for c in changes or [])
    if not confirmed:
        what = f"{decision.action.capitalize()}Instances answered without the instance's new state"
        run.unknown.append(f"{decision.action} instance")
        run.errors.append({"fact": f"{decision.action} instance", "code": "IncompleteAnswer", "message": what})
        return f"unconfirmed: {what}"
    try:
        clients.ec2.create_tags(Resources=ids, Tags=[{"Key": k, "Value": _tag_value(v)} for k, v in tags.items()])
    except (ClientError, BotoCoreError) as exc:
        run.fail("instance tags", exc)
        return f"{verb}; tagging failed ({_code(exc)})"
    return verb


# ---------------------------------------------------------------------------------------------- entry points


def event_kind(event: Any) -> str:
    """``alarm`` (CloudWatch alarm action), ``schedule`` (EventBridge scheduled event), ``ec2_state`` (an EC2
    instance state change, recorded by history.py) or ``invoke``."""
    if history.is_state_change(event):
        return "ec2_state"
    if isinstance(event, Mapping):
        if event.get("source") == "aws.cloudwatch" and "alarmData" in event:
            return "alarm"
        if event.get("source") == "aws.events" and event.get("detail-type") == "Scheduled Event":
            return "schedule"
    return "invoke"


def _reap_lost(config: SchedulerConfig, clients: Clients, gathered: Gathered, run: _Run,
               now: float) -> tuple[Facts, list[dict[str, Any]]]:
    """Fail the lost GPU jobs (at most REAP_BATCH a run) and take them out of the counts."""
    facts = gathered.facts
    candidates = [j for part in (gathered.pending, gathered.processing) if part for j in part.jobs]
    lost = lost_jobs(candidates, queue_empty=facts.queue_empty, queue_empty_since=gathered.queue_empty_since,
                     now=now, policy=config.policy)[:REAP_BATCH]
    if not lost:
        return facts, []
    report: list[dict[str, Any]] = []
    gone: set[str] = set()
    for item in lost:
        outcome = _reap(clients.dynamodb, config, item, now) if config.reap else "reported only (REAP_LOST_JOBS)"
        if outcome.startswith("failed: "):
            run.errors.append({"fact": f"fail lost job {item.job.task_id}", "code": outcome[8:], "message": ""})
        if outcome == "failed the job":
            gone.add(item.job.task_id)
        report.append({"job_id": item.job.task_id, "status": item.job.status, "reason": item.reason,
                       "outcome": outcome})
    if not gone:
        return facts, report

    def left(part: _OpenJobs | None) -> _OpenJobs | None:
        if part is None:
            return None
        jobs = [j for j in part.jobs if j.task_id not in gone]
        return _OpenJobs(part.count - (len(part.jobs) - len(jobs)), jobs, part.complete)

    gathered.pending, gathered.processing = left(gathered.pending), left(gathered.processing)
    pending, processing = gathered.pending, gathered.processing
    changes: dict[str, Any] = {}
    if pending is not None:
        changes["jobs_pending"] = pending.count
        changes["oldest_pending_created_at"] = pending.jobs[0].created_at if pending.jobs else None
    if processing is not None:
        changes["jobs_processing"] = processing.count
    return dataclasses.replace(facts, **changes), report


def run_once(
    config: SchedulerConfig,
    clients: Clients,
    *,
    now: float | None = None,
    trigger: str = "invoke",
) -> dict[str, Any]:
    """Gather facts, fail lost jobs, decide, act, log one JSON decision record and return it.

    Never raises for an AWS error: each one is in the record's ``errors`` (the fact it hid is unknown, which
    blocks a stop). Local mode calls this; ``lambda_handler`` raises after logging when ``errors`` is not empty.
    """
    at = time.time() if now is None else now
    run = _Run()
    if config.fleet_group:
        import fleet  # fleet mode: the group's desired capacity instead of one instance

        return fleet.run_once(config, clients, run, at, trigger)
    gathered, facts, reaped = gather_and_reap(config, clients, run, at)
    decision = decide(facts, at, config.policy)
    outcome = _act(config, clients, decision, gathered, run, at)
    head = {"action": decision.action, "code": decision.code, "reason": decision.reason, "outcome": outcome,
            "instance_id": config.instance_id}
    return log_record(head, config=config, trigger=trigger, at=at, gathered=gathered, facts=facts, reaped=reaped,
                      run=run)


def gather_and_reap(config: SchedulerConfig, clients: Clients, run: _Run, at: float,
                    **how: Any) -> tuple[Gathered, Facts, list[dict[str, Any]]]:
    """Gather (``how``: see :func:`gather`), fail the lost jobs, record the scheduler's observations."""
    gathered = gather(config, clients, run, at, **how)
    facts, reaped = _reap_lost(config, clients, gathered, run, at)
    if gathered.marker_update:
        try:
            _update_marker(clients.dynamodb, config, gathered.marker_update)
        except (ClientError, BotoCoreError) as exc:
            # The values decided with are the ones meant to be written (each is "now", the cautious value).
            run.errors.append({"fact": "record observations", "code": _code(exc), "message": str(exc)[:300]})
    return gathered, facts, reaped


def log_record(head: Mapping[str, Any], *, config: SchedulerConfig, trigger: str, at: float, gathered: Gathered,
               facts: Facts, reaped: list[dict[str, Any]], run: _Run) -> dict[str, Any]:
    """The run's one JSON decision record (``head``: what was decided and done), logged and returned."""
    record: dict[str, Any] = {
        "event": "scheduler.decision",
        **head,
        "trigger": trigger,
        "decided_at": at,
        "decided_at_iso": _iso(at),
        "activity_source": gathered.activity_source,
        "policy": dataclasses.asdict(config.policy),
        "facts": {**dataclasses.asdict(facts), "unknown": list(facts.unknown)},
        "reaped": reaped,
        "warnings": run.warnings,
        "errors": run.errors,
    }
    level = logging.ERROR if run.errors else logging.INFO
    logger.log(level, json.dumps(record, sort_keys=True, default=str), extra={"decision": record})
    return record


def lambda_handler(event: Any, context: Any) -> dict[str, Any]:
    """AWS Lambda entry point (handler ``handler.lambda_handler``)."""
    logger.setLevel(os.environ.get("LOG_LEVEL", "INFO").upper())
    config = SchedulerConfig.from_env(os.environ)
    clients = _warm_clients(config.region, config.endpoint_url, bool(config.fleet_group))
    if event_kind(event) == "ec2_state":
        # A state change is recorded, not decided on (the schedule and the alarm decide).
        logging.getLogger("gpuctl.history").setLevel(logger.level)
        change = history.record_event(event, history.HistoryConfig.from_env(os.environ), clients.ec2,
                                      clients.dynamodb, autoscaling=clients.autoscaling)
        if any(e["fact"] in ("store state change", "fleet membership") for e in change["errors"]):
            raise history.HistoryRecordFailed(f"the state change {change.get('state')} of "
                                              f"{change.get('instance_id')} was not stored: {change['errors']}")
        return change
    record = run_once(config, clients, trigger=event_kind(event))
    if record["errors"]:
        failed = "; ".join(f"{e['fact']}: {e['code']}" for e in record["errors"])
        raise SchedulerRunFailed(f"scheduler run {record['decided_at_iso']} decided {record['action']} "
                                 f"({record['outcome']}) with failed AWS calls: {failed}")
    return record
