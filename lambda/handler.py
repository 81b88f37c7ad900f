"""Scheduler Lambda: stop the idle GPU instance, start it when work waits (thin shim over ``decide``).

Invoked by the queue-idle CloudWatch alarm and by an EventBridge ``rate(5 minutes)`` schedule. The event only
says *why* we run; the decision is always taken from live state (EC2, SQS, DynamoDB). Self-contained:
standard library + boto3 (``gpuctl deploy`` zips this folder as it is).

Environment:
    QUEUE_URL            job queue URL (required)
    TABLE_NAME           task table name (required)
    INSTANCE_ID          GPU instance id (required)
    DLQ_URL              dead-letter queue URL (optional; reported, never counted as work)
    IDLE_MINUTES         idle window in minutes (default 30; may be fractional)
    START_AFTER_SECONDS  how long a pending job waits before it starts a stopped instance (default 60)
    STATUS_INDEX         GSI name (default ``status-created_at-index``)
    AWS_ENDPOINT_URL     optional endpoint (local emulator)
    LOG_LEVEL            default INFO

Local mode (moto never runs Lambda code) calls :func:`run_once` in a loop with its own clients.

Tags read and written on the instance:
    gpuctl:hold-until     epoch seconds or ISO-8601 time; no stop before it (read)
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
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from decide import Decision, Facts, Policy, decide

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_sqs import SQSClient

__all__ = [
    "HOLD_REASON_TAG",
    "HOLD_UNTIL_TAG",
    "STARTED_AT_TAG",
    "STOPPED_AT_TAG",
    "STOPPED_REASON_TAG",
    "Clients",
    "SchedulerConfig",
    "event_kind",
    "gather_facts",
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

DEFAULT_INDEX = "status-created_at-index"
#: Pending/processing counts are capped at this (we only need "any?" and a rough size for the log).
COUNT_LIMIT = 100
#: Finished jobs inspected per status to find the latest finish. The GSI is sorted by created_at, not by
#: finish time, so we look at the newest few and take the largest finished_at/updated_at among them.
FINISHED_SAMPLE = 10
_TAG_VALUE_MAX = 256


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
    region: str | None = None
    endpoint_url: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SchedulerConfig:
        missing = [name for name in ("QUEUE_URL", "TABLE_NAME", "INSTANCE_ID") if not env.get(name)]
        if missing:
            raise ValueError(f"missing required environment variable(s): {', '.join(missing)}")
        return cls(
            queue_url=env["QUEUE_URL"],
            table_name=env["TABLE_NAME"],
            instance_id=env["INSTANCE_ID"],
            dlq_url=env.get("DLQ_URL") or None,
            status_index=env.get("STATUS_INDEX") or DEFAULT_INDEX,
            idle_minutes=_non_negative(env, "IDLE_MINUTES", 30.0),
            start_after_seconds=_non_negative(env, "START_AFTER_SECONDS", 60.0),
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            endpoint_url=env.get("AWS_ENDPOINT_URL") or None,
        )

    @property
    def policy(self) -> Policy:
        return Policy(idle_seconds=self.idle_minutes * 60.0, start_after_seconds=self.start_after_seconds)


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


def make_clients(region: str | None = None, endpoint_url: str | None = None) -> Clients:
    """The one place the scheduler builds boto3 clients (bounded retries and timeouts)."""
    session = boto3.session.Session(region_name=region)
    cfg = BotoConfig(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=15)
    return Clients(
        ec2=session.client("ec2", endpoint_url=endpoint_url, config=cfg),
        sqs=session.client("sqs", endpoint_url=endpoint_url, config=cfg),
        dynamodb=session.client("dynamodb", endpoint_url=endpoint_url, config=cfg),
    )


@functools.lru_cache(maxsize=4)
def _warm_clients(region: str | None, endpoint_url: str | None) -> Clients:
    """Module-scope client cache: built lazily on the first invocation, reused while the Lambda is warm."""
    return make_clients(region, endpoint_url)


# ---------------------------------------------------------------------------------------------- facts


def _parse_time(raw: str | None) -> float | None:
    """Epoch seconds or ISO-8601 (``Z`` allowed; naive means UTC). ``None`` when absent or unparseable."""
    if raw is None or raw.strip() == "":
        return None
    text = raw.strip()
    try:
        value = float(text)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    return value if math.isfinite(value) else None


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _number(item: Mapping[str, Any], name: str) -> float | None:
    attr = item.get(name)
    if not isinstance(attr, Mapping) or "N" not in attr:
        return None
    try:
        return float(attr["N"])
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class _InstanceFacts:
    state: str
    started_at: float | None
    hold_until: float | None
    hold_reason: str | None
    hold_raw: str | None


def _instance_facts(ec2: EC2Client, instance_id: str) -> _InstanceFacts:
    try:
        reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "InvalidInstanceID.NotFound":
            return _InstanceFacts("missing", None, None, None, None)
        raise
    instances = [i for r in reservations for i in r.get("Instances", [])]
    if not instances:
        return _InstanceFacts("missing", None, None, None, None)
    instance = instances[0]
    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", []) if "Key" in t and "Value" in t}
    # LaunchTime is the last start for an EBS-backed instance on AWS; our own tag covers emulators and
    # starts made by gpuctl.
    started = [
        t
        for t in (
            instance["LaunchTime"].timestamp() if "LaunchTime" in instance else None,
            _parse_time(tags.get(STARTED_AT_TAG)),
        )
        if t is not None
    ]
    hold_raw = tags.get(HOLD_UNTIL_TAG)
    return _InstanceFacts(
        state=instance.get("State", {}).get("Name", "unknown"),
        started_at=max(started) if started else None,
        hold_until=_parse_time(hold_raw),
        hold_reason=tags.get(HOLD_REASON_TAG) or None,
        hold_raw=hold_raw,
    )


def _queue_counts(sqs: SQSClient, queue_url: str) -> tuple[int, int, int]:
    attrs = sqs.get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=[
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        ],
    ).get("Attributes", {})
    return (
        int(attrs.get("ApproximateNumberOfMessages", "0")),
        int(attrs.get("ApproximateNumberOfMessagesNotVisible", "0")),
        int(attrs.get("ApproximateNumberOfMessagesDelayed", "0")),
    )


def _status_query(config: SchedulerConfig, status: str) -> dict[str, Any]:
    return {
        "TableName": config.table_name,
        "IndexName": config.status_index,
        "KeyConditionExpression": "#s = :s",
        "ExpressionAttributeNames": {"#s": "status"},
        "ExpressionAttributeValues": {":s": {"S": status}},
    }


def _pending(ddb: DynamoDBClient, config: SchedulerConfig) -> tuple[int, float | None]:
    """Pending jobs (count capped at COUNT_LIMIT) and the oldest one's created_at (GSI range key)."""
    resp = ddb.query(
        **_status_query(config, "pending"),
        ScanIndexForward=True,
        Limit=COUNT_LIMIT,
        ProjectionExpression="task_id, created_at",
    )
    items = resp.get("Items", [])
    return len(items), (_number(items[0], "created_at") if items else None)


def _processing(ddb: DynamoDBClient, config: SchedulerConfig) -> int:
    resp = ddb.query(**_status_query(config, "processing"), Select="COUNT", Limit=COUNT_LIMIT)
    return int(resp.get("Count", 0))


def _last_finished(ddb: DynamoDBClient, config: SchedulerConfig) -> float | None:
    """Latest finish time among the newest finished jobs (finished_at, else updated_at, else created_at)."""
    latest: float | None = None
    for status in ("completed", "failed"):
        resp = ddb.query(
            **_status_query(config, status),
            ScanIndexForward=False,
            Limit=FINISHED_SAMPLE,
            ProjectionExpression="created_at, updated_at, finished_at",
        )
        for item in resp.get("Items", []):
            times = [
                t for t in (_number(item, n) for n in ("finished_at", "updated_at", "created_at")) if t is not None
            ]
            if times and (latest is None or max(times) > latest):
                latest = max(times)
    return latest


def gather_facts(config: SchedulerConfig, clients: Clients) -> Facts:
    """Read the live state the decision needs. AWS errors propagate: no facts, no action."""
    instance = _instance_facts(clients.ec2, config.instance_id)
    if instance.hold_raw is not None and instance.hold_until is None:
        logger.warning(
            "scheduler.hold_tag_invalid",
            extra={"instance_id": config.instance_id, "tag": HOLD_UNTIL_TAG, "value": instance.hold_raw},
        )
    visible, in_flight, delayed = _queue_counts(clients.sqs, config.queue_url)
    dlq_visible = _queue_counts(clients.sqs, config.dlq_url)[0] if config.dlq_url else None
    pending, oldest_pending = _pending(clients.dynamodb, config)
    return Facts(
        instance_state=instance.state,
        queue_visible=visible,
        queue_in_flight=in_flight,
        queue_delayed=delayed,
        jobs_pending=pending,
        jobs_processing=_processing(clients.dynamodb, config),
        oldest_pending_created_at=oldest_pending,
        last_finished_at=_last_finished(clients.dynamodb, config),
        last_started_at=instance.started_at,
        hold_until=instance.hold_until,
        hold_reason=instance.hold_reason,
        dlq_visible=dlq_visible,
    )


# ---------------------------------------------------------------------------------------------- acting


def _tag_value(text: str) -> str:
    return text if len(text) <= _TAG_VALUE_MAX else text[: _TAG_VALUE_MAX - 3] + "..."


def _act(config: SchedulerConfig, clients: Clients, decision: Decision, now: float) -> str:
    """Carry out the decision; returns the outcome (``done``, ``noop`` or ``skipped:<error code>``)."""
    if decision.action == "none":
        return "noop"
    ids = [config.instance_id]
    try:
        if decision.action == "stop":
            clients.ec2.stop_instances(InstanceIds=ids)
            tags = {STOPPED_REASON_TAG: decision.reason, STOPPED_AT_TAG: _iso(now), STOPPED_BY_TAG: ACTOR}
        else:
            clients.ec2.start_instances(InstanceIds=ids)
            tags = {STARTED_REASON_TAG: decision.reason, STARTED_AT_TAG: _iso(now), STARTED_BY_TAG: ACTOR}
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "IncorrectInstanceState":  # the state moved since we looked: the next run re-decides
            return f"skipped:{code}"
        raise
    clients.ec2.create_tags(Resources=ids, Tags=[{"Key": k, "Value": _tag_value(v)} for k, v in tags.items()])
    return "done"


# ---------------------------------------------------------------------------------------------- entry points


def event_kind(event: Any) -> str:
    """``alarm`` (CloudWatch alarm action), ``schedule`` (EventBridge scheduled event) or ``invoke``."""
    if isinstance(event, Mapping):
        if event.get("source") == "aws.cloudwatch" and "alarmData" in event:
            return "alarm"
        if event.get("source") == "aws.events" and event.get("detail-type") == "Scheduled Event":
            return "schedule"
    return "invoke"


def run_once(
    config: SchedulerConfig,
    clients: Clients,
    *,
    now: float | None = None,
    trigger: str = "invoke",
) -> dict[str, Any]:
    """Gather facts, decide, act, log one JSON decision record and return it (local mode calls this).

    AWS errors while gathering facts propagate (no facts, no action). An EC2 error while acting is logged
    in the decision record (``outcome`` = ``failed:<code>``, level ERROR) and then re-raised, so the
    invocation counts as an error and the next run decides again.
    """
    facts = gather_facts(config, clients)
    at = time.time() if now is None else now
    decision = decide(facts, at, config.policy)
    record: dict[str, Any] = {
        "event": "scheduler.decision",
        "action": decision.action,
        "code": decision.code,
        "reason": decision.reason,
        "outcome": "pending",
        "instance_id": config.instance_id,
        "trigger": trigger,
        "decided_at": _iso(at),
        "now": at,
        "policy": dataclasses.asdict(config.policy),
        "facts": dataclasses.asdict(facts),
    }
    try:
        record["outcome"] = _act(config, clients, decision, at)
    except ClientError as exc:
        record["outcome"] = f"failed:{exc.response.get('Error', {}).get('Code', 'unknown')}"
        logger.error(json.dumps(record, sort_keys=True), extra={"decision": record})
        raise
    logger.info(json.dumps(record, sort_keys=True), extra={"decision": record})
    return record


def lambda_handler(event: Any, context: Any) -> dict[str, Any]:
    """AWS Lambda entry point (handler ``handler.lambda_handler``)."""
    logger.setLevel(os.environ.get("LOG_LEVEL", "INFO").upper())
    config = SchedulerConfig.from_env(os.environ)
    clients = _warm_clients(config.region, config.endpoint_url)
    return run_once(config, clients, trigger=event_kind(event))
