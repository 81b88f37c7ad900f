"""Fleet mode: the Auto Scaling group's desired capacity from the backlog (pure decision + the run around it).

In fleet mode (``FLEET_GROUP`` set) the scheduler does not start or stop one instance: it sets the desired
capacity of an EC2 Auto Scaling group, and AWS launches (from the warm pool: stopped, prepared instances) or
scales in (back to the warm pool) accordingly. :func:`decide_capacity` is pure; it reuses every safety rule of
:func:`decide.decide` rather than restating them:

1. The group could not be read, or answered without its sizes: do nothing.
2. Target: ``ceil((visible + in flight + delayed) / jobs_per_instance)``, raised to the group's minimum, to a
   floor that is active (``gpuctl fleet scale N --for 2h``: the ``gpuctl:floor`` / ``gpuctl:floor-until``
   tags on the group, resolved exactly as an instance hold by :func:`decide.resolve_hold`) and to the number of
   in-service instances protected from scale-in (their adapters hold work); capped at the group's maximum.
3. From 0: scale out when :func:`decide.decide` would start a stopped instance (a message is waiting; or the
   queue cannot be read and a GPU job has been pending ``start_after_seconds``), or when a floor asks for it.
4. Unknown facts never mean "no work": when a count cannot be read, the desired capacity is never lowered
   (it is only raised to an active floor).
5. Down to a smaller non-zero size: when the target is below the current desired capacity. Scale-in never
   takes an instance that holds a job: the target is never below the protected instances (rule 2), AWS does
   not choose a protected instance, and a lifecycle hook on scale-in lets the adapter drain first.
6. To 0: only when :func:`decide.decide` would stop a running instance (nothing queued, in flight, delayed,
   pending or processing, every fact known, no hold, the idle window passed, clock skew allowed). Otherwise
   the group keeps one instance (the same rule that keeps the single instance up).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from botocore.exceptions import BotoCoreError, ClientError

from decide import Decision, Facts, Policy, decide

if TYPE_CHECKING:
    from handler import Clients, SchedulerConfig

__all__ = [
    "CAPACITY_AT_TAG",
    "FLOOR_TAG",
    "FLOOR_UNTIL_TAG",
    "CapacityDecision",
    "FleetPolicy",
    "GroupView",
    "Member",
    "capacity_tags",
    "decide_capacity",
    "floor_of",
    "run_once",
]

FLOOR_TAG = "gpuctl:floor"
FLOOR_UNTIL_TAG = "gpuctl:floor-until"
FLOOR_REASON_TAG = "gpuctl:floor-reason"
SCALED_OUT_AT_TAG = "gpuctl:scaled-out-at"
#: Who last changed the desired capacity, why, and from and to what (history.py names a member's start or stop
#: after the change that explains it: the scheduler with its reason, a submit, `gpuctl fleet scale`).
CAPACITY_AT_TAG = "gpuctl:capacity-at"
CAPACITY_BY_TAG = "gpuctl:capacity-by"
CAPACITY_REASON_TAG = "gpuctl:capacity-reason"
CAPACITY_FROM_TAG = "gpuctl:capacity-from"
CAPACITY_TO_TAG = "gpuctl:capacity-to"
#: Lifecycle states of an instance that serves (or is about to serve) the group's work.
SERVING_STATES = frozenset({"Pending", "Pending:Wait", "Pending:Proceed", "InService"})

CapacityAction = Literal["set", "none"]


@dataclass(frozen=True)
class FleetPolicy:
    """``jobs_per_instance``: how many queued or running jobs one instance is meant to own."""

    jobs_per_instance: int = 4

    def __post_init__(self) -> None:
        if self.jobs_per_instance < 1:
            raise ValueError(f"jobs_per_instance must be at least 1, got {self.jobs_per_instance}")


@dataclass(frozen=True)
class Member:
    instance_id: str
    lifecycle_state: str
    protected: bool = False

    @property
    def serving(self) -> bool:
        return self.lifecycle_state in SERVING_STATES


@dataclass(frozen=True)
class GroupView:
    """The Auto Scaling group as read: sizes, members and the floor (``floor`` applies while the hold does)."""

    name: str
    desired: int
    min_size: int
    max_size: int
    members: tuple[Member, ...] = ()
    floor: int = 0
    floor_until_raw: str | None = None
    floor_reason: str | None = None
    scaled_out_at: float | None = None

    @property
    def protected(self) -> int:
        return sum(1 for m in self.members if m.serving and m.protected)


@dataclass(frozen=True)
class CapacityDecision:
    """``desired`` is the capacity to set (None with ``none``); ``code``/``reason`` as :class:`decide.Decision`."""

    action: CapacityAction
    desired: int | None
    code: str
    reason: str
    #: The underlying single-instance decision the zero rules came from, when they were consulted.
    safety: Decision | None = None


def floor_of(raw: str | None) -> int:
    """The ``gpuctl:floor`` tag as a number of instances (absent, unreadable or negative: 0)."""
    try:
        value = int(str(raw).strip())
    except ValueError:
        return 0
    return max(0, value)


def _set(desired: int, code: str, reason: str, safety: Decision | None = None) -> CapacityDecision:
    return CapacityDecision("set", desired, code, reason, safety)


def _none(code: str, reason: str, safety: Decision | None = None) -> CapacityDecision:
    return CapacityDecision("none", None, code, reason, safety)


def decide_capacity(facts: Facts, group: GroupView | None, now: float, policy: Policy,
                    fleet: FleetPolicy) -> CapacityDecision:
    """The group's desired capacity (see the module docstring for the rules).

    ``facts`` are the scheduler's facts as for :func:`decide.decide` (its ``instance_state`` is ignored);
    ``facts.hold_until`` is the floor's resolved expiry (a floor counts only while it is active).
    """
    if group is None:
        return _none("facts_unknown", "the Auto Scaling group could not be read")
    current, hi = group.desired, group.max_size
    floor_active = group.floor > 0 and _hold_active(facts, now, policy)
    floor = min(group.floor, hi) if floor_active else 0
    lo = min(hi, max(group.min_size, floor, group.protected))
    counts = (facts.queue_visible, facts.queue_in_flight, facts.queue_delayed)
    known = all(n is not None for n in counts)
    backlog = sum(n or 0 for n in counts)
    need = math.ceil(backlog / fleet.jobs_per_instance)
    target = min(hi, max(lo, need))
    floor_text = f"floor {group.floor} until the hold ends" if floor_active else ""
    sizes = f"backlog {backlog if known else 'unknown'}, {fleet.jobs_per_instance} jobs per instance, " \
            f"min {group.min_size}, max {hi}, {group.protected} protected"
    if floor_text:
        sizes += f", {floor_text}"

    if current <= 0:
        started = decide(dataclasses.replace(facts, instance_state="stopped"), now, policy)
        # As for a stopped instance: in-flight messages alone do not wake the fleet (they become visible again).
        want = max(target if known else 1, 1) if started.action == "start" else 0
        want = min(hi, max(want, lo))
        if want > 0:
            if started.action == "start":
                return _set(want, started.code, f"scale out from 0 to {want}: {started.reason} ({sizes})", started)
            return _set(want, "floor" if floor_active else "minimum", f"scale out from 0 to {want} ({sizes})",
                        started)
        return _none(started.code, started.reason, started)

    if not known or facts.work_unknown:
        if lo > current:
            return _set(lo, "floor", f"raise to {lo} ({sizes}); not lowering: some facts could not be read")
        return _none("facts_unknown", f"keeping {current}: the work could not be counted, so it is never lowered "
                                      f"({sizes})")
    if target > current:
        return _set(target, "backlog", f"scale out from {current} to {target} ({sizes})")
    if target == current:
        return _none("at_target", f"desired capacity {current} matches the work ({sizes})")
    if target > 0:
        return _set(target, "backlog", f"scale in from {current} to {target} ({sizes})")
    stop = decide(dataclasses.replace(facts, instance_state="running"), now, policy)
    if stop.action == "stop":
        return _set(0, "idle", f"scale in to 0: {stop.reason}", stop)
    if current > 1:
        return _set(1, stop.code, f"scale in from {current} to 1, not to 0: {stop.reason}", stop)
    return _none(stop.code, f"keeping 1 instance: {stop.reason}", stop)


def _hold_active(facts: Facts, now: float, policy: Policy) -> bool:
    until = facts.hold_until
    return until is not None and not math.isnan(until) and now < until + policy.clock_skew_seconds


# ---------------------------------------------------------------------------------------------- the run


class _Missing(Exception):
    pass


def _group(autoscaling: Any, name: str) -> GroupView:
    from decide import parse_time

    groups = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name]).get("AutoScalingGroups")
    if groups is None:
        raise _Missing("DescribeAutoScalingGroups answered without AutoScalingGroups")
    if not groups:
        raise _Missing(f"the Auto Scaling group {name} does not exist")
    g = groups[0]
    try:
        desired, lo, hi = int(g["DesiredCapacity"]), int(g["MinSize"]), int(g["MaxSize"])
    except (KeyError, TypeError, ValueError):
        raise _Missing("DescribeAutoScalingGroups answered without the group's sizes") from None
    tags = {t["Key"]: t.get("Value", "") for t in g.get("Tags", []) if "Key" in t}
    members = tuple(Member(i["InstanceId"], str(i.get("LifecycleState", "")), bool(i.get("ProtectedFromScaleIn")))
                    for i in g.get("Instances", []) if "InstanceId" in i)
    return GroupView(name, desired, lo, hi, members, floor_of(tags.get(FLOOR_TAG)),
                     tags.get(FLOOR_UNTIL_TAG) or None, tags.get(FLOOR_REASON_TAG) or None,
                     parse_time(tags.get(SCALED_OUT_AT_TAG)))


def run_once(config: SchedulerConfig, clients: Clients, run: Any, at: float, trigger: str) -> dict[str, Any]:
    """One fleet run: gather (the group stands for the instance), reap, decide the capacity, act, log."""
    import handler

    holder: dict[str, GroupView | None] = {"group": None}
    policy = config.policy
    fleet = FleetPolicy(config.jobs_per_instance)
    name, autoscaling = config.fleet_group, clients.autoscaling
    assert name is not None and autoscaling is not None  # handler dispatches here only in fleet mode

    def read_group() -> handler._Instance:
        try:
            group = _group(autoscaling, name)
        except _Missing as exc:
            raise handler._Missing(str(exc)) from None
        holder["group"] = group
        # The group stands for the instance: "running" with capacity, "stopped" at 0; the floor is its hold.
        return handler._Instance("running" if group.desired > 0 else "stopped", group.scaled_out_at,
                                 group.floor_until_raw if group.floor > 0 else None, group.floor_reason)

    gathered, facts, reaped = handler.gather_and_reap(config, clients, run, at, read_instance=read_group,
                                                      instance_fact="fleet group")
    group = holder["group"]
    decision = decide_capacity(facts, group, at, policy, fleet)
    outcome = _act(config, clients, decision, group, gathered, run, at)
    head = {
        "mode": "fleet",
        "action": "scale" if decision.action == "set" else "none",
        "code": decision.code,
        "reason": decision.reason,
        "outcome": outcome,
        "fleet_group": name,
        "desired_before": group.desired if group else None,
        "desired": decision.desired if decision.desired is not None else (group.desired if group else None),
        "min_size": group.min_size if group else None,
        "max_size": group.max_size if group else None,
        "protected": group.protected if group else None,
        "jobs_per_instance": fleet.jobs_per_instance,
    }
    return handler.log_record(head, config=config, trigger=trigger, at=at, gathered=gathered, facts=facts,
                              reaped=reaped, run=run)


def _act(config: SchedulerConfig, clients: Clients, decision: CapacityDecision, group: GroupView | None,
         gathered: Any, run: Any, at: float) -> str:
    import handler

    autoscaling = clients.autoscaling
    if decision.action == "none" or group is None or decision.desired is None or autoscaling is None:
        return "noop"
    desired = decision.desired
    if desired == group.desired:
        return "noop"
    if desired == 0:
        # The same fence as a stop: a submit or a finish that raced this decision cancels the scale-in to 0.
        assert gathered.marker is not None
        try:
            handler._fence(clients.dynamodb, config, gathered.marker, at)
        except (ClientError, BotoCoreError) as exc:
            if handler._code(exc) == "ConditionalCheckFailedException":
                return "skipped: work arrived while deciding (a submit or a finish changed the activity marker)"
            run.fail("stop fence", exc)
            return f"not scaled in: the stop fence could not be written ({handler._code(exc)})"
    try:
        # HonorCooldown off: the decision is taken from live work, not from a cooldown's guess.
        autoscaling.set_desired_capacity(AutoScalingGroupName=group.name, DesiredCapacity=desired,
                                                 HonorCooldown=False)
    except (ClientError, BotoCoreError) as exc:
        run.fail("set desired capacity", exc)
        return f"failed: {handler._code(exc)}"
    tags = capacity_tags(handler._iso(at), "gpuctl-scheduler", decision.reason, group.desired, desired)
    if group.desired == 0:
        tags[SCALED_OUT_AT_TAG] = handler._iso(at)
    try:
        autoscaling.create_or_update_tags(Tags=[{
            "ResourceId": group.name, "ResourceType": "auto-scaling-group", "Key": key,
            "Value": handler._tag_value(value), "PropagateAtLaunch": False} for key, value in tags.items()])
    except (ClientError, BotoCoreError) as exc:
        run.fail("group tags", exc)
        return f"set desired capacity {group.desired} -> {desired}; tagging failed ({handler._code(exc)})"
    return f"set desired capacity {group.desired} -> {desired}"


def capacity_tags(at_iso: str, by: str, reason: str, before: int, after: int) -> dict[str, str]:
    """The group's tags for one change of its desired capacity (see CAPACITY_AT_TAG)."""
    return {CAPACITY_AT_TAG: at_iso, CAPACITY_BY_TAG: by, CAPACITY_REASON_TAG: reason[:256],
            CAPACITY_FROM_TAG: str(before), CAPACITY_TO_TAG: str(after)}
