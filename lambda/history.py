"""The record of the GPU instance's life: one item per EC2 state change, with its time and cause.

EventBridge delivers "EC2 Instance State-change Notification" events for the GPU instance(s) to the scheduler
Lambda (``handler.lambda_handler`` dispatches them here). Each becomes one item of the stack's history table:

    instance_id (HASH, S)   the instance the event names (any instance the rule lets through: fleet-ready)
    at          (RANGE, N)  the event's time (epoch seconds) plus a state rank / 10 (two changes within the
                            same second keep their order; a redelivered event writes the same key again)
    event_at                the event's time itself (what reports measure with)
    state                   pending | running | stopping | stopped | shutting-down | terminated
    cause                   submit | scheduler | cli | <another gpuctl actor> | other
    by, reason              from the ``gpuctl:started-by/-reason`` or ``gpuctl:stopped-by/-reason`` tags
    instance_type           from DescribeInstances (the price of the running time depends on it)
    group                   fleet mode: the Auto Scaling group the instance belongs to (what
                            ``gpuctl cost report`` reads a fleet's history by)
    event_id, expires_at    the EventBridge event id; TTL (HISTORY_TTL_DAYS, default 400)

Cause: gpuctl writes ``gpuctl:started-at/-by/-reason`` after every start it makes (submit, the scheduler,
``gpuctl instance start``) and ``gpuctl:stopped-*`` after every stop. A start-type state (pending, running)
takes the started-* tags when ``gpuctl:started-at`` is no older than :data:`TAG_FRESH_SECONDS` before the event
(and not later than the allowed skew after it); a stop-type state likewise the stopped-* tags. Otherwise the
change was made by the console or something else (``other``). The tags are written just after the
Start/StopInstances call returns, so the first event of a change (``pending``, ``stopping``) may be read
before them; the second one (``running``, ``stopped``) comes seconds to minutes later and carries the cause,
and ``gpuctl cost report`` takes an interval's cause from any of its events.

Fleet mode (FLEET_GROUP set): EventBridge cannot filter events on tags, so the stack's rule passes every EC2
state change of the account and region, and only the group's members are recorded: an instance whose
``aws:autoscaling:groupName`` tag names FLEET_GROUP (warm-pool instances carry it too), or INSTANCE_ID. Any
other instance is skipped (``skipped`` in the record, logged at DEBUG, nothing stored). When membership cannot
be read (DescribeInstances failed), the record says so and the handler raises, so the event is kept in the
scheduler's failure queue (its dead-letter queue: async invocations are not retried) rather than stored for
an instance that may not be ours. A member's change without a fresh gpuctl tag of its own is explained by the
group's last capacity change (the ``gpuctl:capacity-*`` tags every gpuctl change of the desired capacity
writes: the scheduler with its reason, a submit, ``gpuctl fleet scale``) when that change is fresh and went the
same way (a raise for a start, a lowering for a stop); otherwise its cause is ``autoscaling``, by the group
(a health replacement, a rebalance, the console).

Environment: HISTORY_TABLE (required for recording; unset: events are logged and not stored),
HISTORY_TTL_DAYS (default 400), FLEET_GROUP and INSTANCE_ID (fleet mode, above). Local mode (moto emits no
EC2 events) builds the same event JSON from the state changes its scheduler loop observes
(:func:`state_change_event`) and calls :func:`record_event`.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

import fleet
from decide import parse_time

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_ec2 import EC2Client

__all__ = [
    "DETAIL_TYPE",
    "GROUP_TAG",
    "STATE_RANK",
    "HistoryConfig",
    "HistoryRecordFailed",
    "attribute",
    "is_state_change",
    "record_event",
    "state_change_event",
]

logger = logging.getLogger("gpuctl.history")

DETAIL_TYPE = "EC2 Instance State-change Notification"
#: The order of the states within one second (also the fraction added to ``at``).
STATE_RANK = {"pending": 1, "running": 2, "stopping": 3, "stopped": 4, "shutting-down": 5, "terminated": 6}
START_STATES = frozenset({"pending", "running"})
STOP_STATES = frozenset({"stopping", "stopped", "shutting-down", "terminated"})
#: A gpuctl tag older than this before the event did not cause it (a stop takes minutes at most).
TAG_FRESH_SECONDS = 900.0
#: A tag this much after the event still counts (the writer's clock may be ahead).
TAG_SKEW_SECONDS = 60.0
DEFAULT_TTL_DAYS = 400.0

#: The tag Auto Scaling puts on every instance of a group (warm pool included).
GROUP_TAG = "aws:autoscaling:groupName"

#: gpuctl actors (the ``-by`` tags) and the cause each stands for.
_ACTORS = {"gpuctl-scheduler": "scheduler", "gpuctl-cli": "cli"}


class HistoryRecordFailed(RuntimeError):
    """Raised by the handler after logging a state change that could not be stored, or whose instance could not
    be told apart from the account's other instances in fleet mode (so the event is kept in the failure queue)."""


@dataclass(frozen=True)
class HistoryConfig:
    table_name: str | None
    ttl_days: float = DEFAULT_TTL_DAYS
    #: Fleet mode: record only this group's members (and ``instance_id``); None: record what the rule passes.
    fleet_group: str | None = None
    instance_id: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> HistoryConfig:
        raw = env.get("HISTORY_TTL_DAYS") or ""
        ttl = DEFAULT_TTL_DAYS
        if raw:
            try:
                ttl = float(raw)
            except ValueError:
                raise ValueError(f"HISTORY_TTL_DAYS must be a number, got {raw!r}") from None
            if not math.isfinite(ttl) or ttl < 1:
                raise ValueError(f"HISTORY_TTL_DAYS must be at least 1, got {raw!r}")
        return cls(env.get("HISTORY_TABLE") or None, ttl, env.get("FLEET_GROUP") or None,
                   env.get("INSTANCE_ID") or None)


def is_state_change(event: Any) -> bool:
    return isinstance(event, Mapping) and event.get("source") == "aws.ec2" \
        and event.get("detail-type") == DETAIL_TYPE


def state_change_event(instance_id: str, state: str, *, at: float, region: str = "us-east-1",
                       account: str = "123456789012") -> dict[str, Any]:
    """The event EventBridge delivers for one state change (for local mode, where nothing emits it)."""
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": DETAIL_TYPE,
        "source": "aws.ec2",
        "account": account,
        "time": datetime.fromtimestamp(at, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": region,
        "resources": [f"arn:aws:ec2:{region}:{account}:instance/{instance_id}"],
        "detail": {"instance-id": instance_id, "state": state},
    }


@dataclass(frozen=True)
class Cause:
    cause: str
    by: str | None = None
    reason: str | None = None


def attribute(state: str, tags: Mapping[str, str], event_at: float) -> Cause:
    """Who or what caused a change to ``state`` at ``event_at``, from the instance's gpuctl tags (an Auto
    Scaling group's member without a fresh gpuctl tag: the group)."""
    group = tags.get(GROUP_TAG) or None
    unknown = Cause("autoscaling", group) if group else Cause("other")
    if state in START_STATES:
        prefix = "gpuctl:started-"
    elif state in STOP_STATES:
        prefix = "gpuctl:stopped-"
    else:
        return unknown
    other = "gpuctl:stopped-at" if prefix == "gpuctl:started-" else "gpuctl:started-at"
    tagged_at, opposite_at = parse_time(tags.get(prefix + "at")), parse_time(tags.get(other))
    if tagged_at is None or not (event_at - TAG_FRESH_SECONDS <= tagged_at <= event_at + TAG_SKEW_SECONDS):
        return unknown
    if opposite_at is not None and opposite_at > tagged_at:
        return unknown  # the tag is from an earlier change: a later opposite one came after it
    return _cause(tags.get(prefix + "by") or None, tags.get(prefix + "reason") or None)


def _cause(by: str | None, reason: str | None) -> Cause:
    if by == "gpuctl-cli" and reason == "job submitted":
        return Cause("submit", by, reason)
    return Cause(_ACTORS.get(by or "", by or "other"), by, reason)


def group_cause(state: str, group_tags: Mapping[str, str], event_at: float) -> Cause | None:
    """A fleet member's change explained by the group's last capacity change (lambda/fleet.py's capacity tags):
    a start-type state after a fresh raise, a stop-type state after a fresh lowering; else None."""
    at = parse_time(group_tags.get(fleet.CAPACITY_AT_TAG))
    if at is None or not (event_at - TAG_FRESH_SECONDS <= at <= event_at + TAG_SKEW_SECONDS):
        return None
    try:
        before, after = int(group_tags.get(fleet.CAPACITY_FROM_TAG, "")), int(group_tags.get(fleet.CAPACITY_TO_TAG, ""))
    except ValueError:
        return None
    if (state in START_STATES and after > before) or (state in STOP_STATES and after < before):
        return _cause(group_tags.get(fleet.CAPACITY_BY_TAG) or None, group_tags.get(fleet.CAPACITY_REASON_TAG) or None)
    return None


def _group_tags(autoscaling: AutoScalingClient, group: str) -> dict[str, str]:
    groups = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[group]).get("AutoScalingGroups") or []
    return {t["Key"]: t.get("Value", "") for g in groups for t in g.get("Tags", []) if "Key" in t}


def _describe(ec2: EC2Client, instance_id: str) -> tuple[dict[str, str], str | None] | None:
    """The instance's tags and type; None when EC2 does not know it (any more)."""
    try:
        reservations = ec2.describe_instances(InstanceIds=[instance_id]).get("Reservations") or []
    except ClientError as exc:
        if _code(exc).startswith("InvalidInstanceID"):  # NotFound / Malformed
            return None
        raise
    for reservation in reservations:
        for instance in reservation.get("Instances", []):
            tags = {t["Key"]: t["Value"] for t in instance.get("Tags", []) if "Key" in t and "Value" in t}
            return tags, instance.get("InstanceType")
    return None


def record_event(event: Mapping[str, Any], config: HistoryConfig, ec2: EC2Client, ddb: DynamoDBClient,
                 *, now: float | None = None, autoscaling: AutoScalingClient | None = None) -> dict[str, Any]:
    """Store one state-change event; return the record (also logged as one JSON line).

    The record's ``errors`` lists what failed: the tags could not be read (the cause is then ``unknown``,
    the change is still stored), or the item could not be written (the caller raises so the event is kept).
    """
    detail = event.get("detail") or {}
    instance_id = str(detail.get("instance-id") or "")
    state = str(detail.get("state") or "")
    event_at = parse_time(str(event.get("time") or ""))
    received = time.time() if now is None else now
    errors: list[dict[str, str]] = []
    record: dict[str, Any] = {"event": "history.state_change", "instance_id": instance_id, "state": state,
                              "event_id": event.get("id"), "errors": errors}
    if not instance_id or state not in STATE_RANK:
        errors.append({"fact": "event", "code": "Unrecognised",
                       "message": f"not an EC2 state change this history records: {json.dumps(detail)[:200]}"})
        logger.error(json.dumps(record, sort_keys=True, default=str))
        return record
    at = received if event_at is None else event_at
    fleet = config.fleet_group is not None and instance_id != config.instance_id
    tags: dict[str, str] = {}
    try:
        described = _describe(ec2, instance_id)
        tags, instance_type = described or ({}, None)
        cause = attribute(state, tags, at)
        if described is None and not fleet:
            cause = Cause("unknown")
            errors.append({"fact": "instance tags", "code": "InvalidInstanceID.NotFound",
                           "message": f"EC2 does not know {instance_id}"})
    except (ClientError, BotoCoreError) as exc:
        described, instance_type, cause = None, None, Cause("unknown")
        errors.append({"fact": "fleet membership" if fleet else "instance tags", "code": _code(exc),
                       "message": str(exc)[:300]})
        if fleet:  # not known to be ours: kept in the failure queue, not stored
            record["stored"] = False
            logger.error(json.dumps(record, sort_keys=True, default=str))
            return record
    group = tags.get(GROUP_TAG) or None
    if fleet and group != config.fleet_group:
        record.update({"stored": False, "skipped": f"not a member of {config.fleet_group}"
                       + (f" (of {group})" if group else "" if described else " (EC2 does not know it)")})
        logger.debug(json.dumps(record, sort_keys=True, default=str))
        return record
    if group and group == config.fleet_group and cause.cause == "autoscaling" and autoscaling is not None:
        try:
            cause = group_cause(state, _group_tags(autoscaling, group), at) or cause
        except (ClientError, BotoCoreError) as exc:  # the change is still stored, as made by Auto Scaling
            errors.append({"fact": "group tags", "code": _code(exc), "message": str(exc)[:300]})
    key = at + STATE_RANK[state] / 10.0
    record.update({"at": key, "at_iso": event.get("time"), "cause": cause.cause, "by": cause.by,
                   "reason": cause.reason, "instance_type": instance_type, "group": group})
    if config.table_name is None:
        record["stored"] = False
        logger.warning(json.dumps(record, sort_keys=True, default=str))
        return record
    item: dict[str, Any] = {
        "instance_id": {"S": instance_id}, "at": {"N": repr(key)}, "event_at": {"N": repr(at)}, "state": {"S": state},
        "cause": {"S": cause.cause}, "recorded_at": {"N": repr(received)},
        "expires_at": {"N": str(int(received + config.ttl_days * 86400))},
    }
    for name, value in (("by", cause.by), ("reason", cause.reason), ("instance_type", instance_type),
                        ("event_id", event.get("id")), ("group", group)):
        if value:
            item[name] = {"S": str(value)[:1000]}
    try:
        ddb.put_item(TableName=config.table_name, Item=item)
        record["stored"] = True
    except (ClientError, BotoCoreError) as exc:
        record["stored"] = False
        errors.append({"fact": "store state change", "code": _code(exc), "message": str(exc)[:300]})
    level = logging.ERROR if errors else logging.INFO
    logger.log(level, json.dumps(record, sort_keys=True, default=str))
    return record


def _code(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code") or "unknown")
    return type(exc).__name__
