"""Fleet mode (setting ``fleet_group``): the Auto Scaling group instead of one instance.

* :func:`ensure_capacity`: what submit does instead of starting the instance - raise the desired capacity from
  0 to 1 (more is the scheduler's job, from the backlog); never raises.
* :func:`fleet_status`: desired/min/max, the floor, each instance with its lifecycle state, protection, the jobs
  in its hands and its adapter's last report (``gpuctl fleet status``).
* :func:`scale`: a manual floor with an expiry, like ``instance hold`` (``gpuctl fleet scale N --for 2h``): the
  ``gpuctl:floor`` / ``gpuctl:floor-until`` tags the scheduler honours (lambda/fleet.py), and the desired
  capacity raised to it at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gpuctl.aws.autoscaling import (
    CAPACITY_AT_TAG,
    CAPACITY_BY_TAG,
    CAPACITY_FROM_TAG,
    CAPACITY_REASON_TAG,
    CAPACITY_TO_TAG,
    FLOOR_REASON_TAG,
    FLOOR_TAG,
    FLOOR_UNTIL_TAG,
)
from gpuctl.errors import GpuctlError, UsageError
from gpuctl.models import JobStatus
from gpuctl.services.hold import judge_hold, parse_hold_duration
from gpuctl.times import iso, stamp

if TYPE_CHECKING:
    from gpuctl.aws.autoscaling import GroupInfo
    from gpuctl.services.context import Gateways
    from gpuctl.services.instance import StartOutcome

__all__ = ["FleetStatus", "MemberStatus", "ScaleResult", "ensure_capacity", "fleet_status", "not_in_fleet_mode",
           "scale"]

log = logging.getLogger(__name__)

SCALED_OUT_AT_TAG = "gpuctl:scaled-out-at"
#: The default length of a `fleet scale` floor (like `instance hold`, at most 7 days).
DEFAULT_FLOOR_FOR = "1h"


#: What each ``instance …`` command means in fleet mode: where to go instead.
FLEET_POINTERS = {
    "status": "use `gpuctl fleet status`",
    "start": "use `gpuctl fleet scale 1` (a floor of one instance), or submit a job",
    "stop": "use `gpuctl fleet scale 0` to remove a floor; the scheduler scales an idle fleet in to 0",
    "hold": "use `gpuctl fleet scale N --for 2h` (a floor of N instances)",
    "release": "use `gpuctl fleet scale 0` (removes the floor)",
    "why-stopped": "the scheduler's scale-in decisions are in `gpuctl instance decisions`",
}


def not_in_fleet_mode(gw: Gateways, command: str) -> None:
    """Refuse an ``instance …`` command that has no meaning for a fleet, pointing at what to use instead.

    Raises:
        UsageError: ``fleet_group`` is set.
    """
    group = gw.settings.fleet_group
    if group:
        raise UsageError(f"`gpuctl instance {command}` drives one instance, but this profile is in fleet mode (the "
                         f"Auto Scaling group {group}): {FLEET_POINTERS[command]}.")


def ensure_capacity(gw: Gateways) -> StartOutcome:
    """Raise the group from 0 to 1 (nothing when it already has capacity); a failure is a warning, never raised."""
    from gpuctl.services.instance import StartOutcome

    try:
        group = gw.fleet.describe()
        if group.desired > 0:
            return StartOutcome("already-running", f"{group.desired} desired")
        if group.max_size < 1:
            return StartOutcome("skipped", "0 desired", warning=f"the Auto Scaling group {group.name} has a maximum "
                                "size of 0; the job is queued but no instance can start")
        gw.fleet.set_desired(1)
    except GpuctlError as exc:
        return StartOutcome("failed", warning=f"the job is queued, but the fleet was not scaled out: {exc}", error=exc)
    warning = None
    now = iso(time.time()) or ""
    try:
        gw.fleet.set_tags({SCALED_OUT_AT_TAG: now, **capacity_tags(now, "gpuctl-cli", "job submitted", 0, 1)})
    except GpuctlError as exc:
        warning = f"the fleet was scaled out, but its gpuctl:scaled-out-at tag was not written: {exc}"
    log.info("submit.fleet_scaled_out", extra={"group": gw.fleet.name})
    return StartOutcome("started", "1 desired", warning=warning)


def capacity_tags(at_iso: str, by: str, reason: str, before: int, after: int) -> dict[str, str]:
    """The group's tags for one change of its desired capacity (as lambda/fleet.py's ``capacity_tags``)."""
    return {CAPACITY_AT_TAG: at_iso, CAPACITY_BY_TAG: by, CAPACITY_REASON_TAG: reason[:256],
            CAPACITY_FROM_TAG: str(before), CAPACITY_TO_TAG: str(after)}


# --- status -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemberStatus:
    instance_id: str
    lifecycle_state: str
    protected: bool
    health: str | None
    instance_type: str | None
    zone: str | None
    jobs_in_hand: int
    last_heartbeat_at: float | None

    def document(self) -> dict[str, Any]:
        return {"instance_id": self.instance_id, "lifecycle_state": self.lifecycle_state,
                "protected": self.protected, "health": self.health, "instance_type": self.instance_type,
                "availability_zone": self.zone, "jobs_in_hand": self.jobs_in_hand,
                **stamp("last_heartbeat_at", self.last_heartbeat_at)}


@dataclass(frozen=True)
class FleetStatus:
    group: str
    desired: int
    min_size: int
    max_size: int
    floor: int
    floor_until: float | None
    floor_reason: str | None
    floor_warning: str | None
    members: list[MemberStatus] = field(default_factory=list)
    unassigned_jobs: int = 0  # processing jobs whose record names no instance of the group

    def document(self) -> dict[str, Any]:
        return {"fleet_group": self.group, "desired": self.desired, "min_size": self.min_size,
                "max_size": self.max_size, "floor": self.floor, **stamp("floor_until", self.floor_until),
                "floor_reason": self.floor_reason, "floor_warning": self.floor_warning,
                "instances": [m.document() for m in self.members], "unassigned_jobs": self.unassigned_jobs}


def _floor(group: GroupInfo, now: float) -> tuple[int, float | None, str | None]:
    """(floor, until, warning) as the scheduler honours the tags (a floor without a live hold is 0)."""
    raw_floor = group.tags.get(FLOOR_TAG, "").strip()
    floor = int(raw_floor) if raw_floor.isdigit() else 0
    judged = judge_hold(group.tags.get(FLOOR_UNTIL_TAG) if floor else None, now)
    if judged.until is None:
        return 0, None, judged.warning
    return floor, judged.until, judged.warning


def fleet_status(gw: Gateways, *, now: float | None = None) -> FleetStatus:
    """The group and, per instance, the jobs in its hands (processing jobs recorded with its instance id).

    Raises:
        NotFound: the group does not exist.
    """
    at = time.time() if now is None else now
    group = gw.fleet.describe()
    by_instance: dict[str, list[float | None]] = {}
    unassigned = 0
    for record in gw.table.query_status(JobStatus.PROCESSING, limit=1000):
        owner = record.instance_id
        if owner is None:
            unassigned += 1
            continue
        by_instance.setdefault(owner, []).append(record.heartbeat_at)
    members = []
    for m in group.members:
        jobs = by_instance.pop(m.instance_id, [])
        beats = [b for b in jobs if b is not None]
        members.append(MemberStatus(m.instance_id, m.lifecycle_state, m.protected, m.health, m.instance_type, m.zone,
                                    len(jobs), max(beats) if beats else None))
    unassigned += sum(len(v) for v in by_instance.values())  # jobs of instances no longer in the group
    floor, until, warning = _floor(group, at)
    return FleetStatus(group.name, group.desired, group.min_size, group.max_size, floor, until,
                       group.tags.get(FLOOR_REASON_TAG) or None, warning, members, unassigned)


# --- scale --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScaleResult:
    group: str
    floor: int
    floor_until: float | None
    reason: str | None
    desired_before: int
    desired: int
    max_size: int

    def document(self) -> dict[str, Any]:
        return {"fleet_group": self.group, "floor": self.floor, **stamp("floor_until", self.floor_until),
                "floor_reason": self.reason, "desired_before": self.desired_before, "desired": self.desired,
                "max_size": self.max_size}


def scale(gw: Gateways, count: int, duration: str | None = None, reason: str | None = None, *,
          now: float | None = None) -> ScaleResult:
    """Keep at least ``count`` instances for ``duration`` (default 1h, at most 7 days), raising the desired
    capacity to it now; ``count`` 0 removes the floor (the scheduler then sizes the group from the work).

    Raises:
        UsageError: a negative count, one above the group's maximum, or a bad duration.
        NotFound: the group does not exist.
    """
    if count < 0:
        raise UsageError(f"The fleet size must be 0 or more, got {count}.")
    seconds = parse_hold_duration(duration or DEFAULT_FLOOR_FOR)
    fleet = gw.fleet
    group = fleet.describe()
    if count > group.max_size:
        raise UsageError(f"The Auto Scaling group {group.name} has at most {group.max_size} instances; "
                         f"`gpuctl deploy --fleet --max-instances {count}` raises the maximum.")
    if count == 0:
        fleet.delete_tags([FLOOR_TAG, FLOOR_UNTIL_TAG, FLOOR_REASON_TAG])
        log.info("fleet.floor_removed", extra={"group": group.name})
        return ScaleResult(group.name, 0, None, None, group.desired, group.desired, group.max_size)
    at = time.time() if now is None else now
    until = int(at + seconds)
    tags = {FLOOR_TAG: str(count), FLOOR_UNTIL_TAG: str(until)}
    if reason:
        tags[FLOOR_REASON_TAG] = reason[:256]
    fleet.set_tags(tags)
    if not reason:
        fleet.delete_tags([FLOOR_REASON_TAG])
    desired = max(group.desired, count)
    if desired != group.desired:
        fleet.set_desired(desired)
        why = f"fleet scale {count}" + (f": {reason}" if reason else "")
        try:
            fleet.set_tags(capacity_tags(iso(at) or "", "gpuctl-cli", why, group.desired, desired))
        except GpuctlError as exc:  # the change is made; only the history's cause for it is lost
            log.warning("fleet.capacity_tags_failed", extra={"group": group.name, "error": str(exc)})
    log.info("fleet.floor", extra={"group": group.name, "floor": count, "until": until})
    return ScaleResult(group.name, count, float(until), reason[:256] if reason else None, group.desired, desired,
                       group.max_size)

