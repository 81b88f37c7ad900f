"""What the GPU cost: billed time from the recorded state changes, split into busy, boot and idle time.

Definitions (all per UTC second, from the instance history table and the jobs' records):

* **billed**: each stretch from ``running`` to the next stop-type state (``stopping``, ``stopped``,
  ``shutting-down``, ``terminated``), or to now while it runs. EC2 bills per second with a one-minute
  minimum per start: a stretch shorter than 60 s is billed 60 s. A stretch that began before the window is
  cut at the window's start (its minimum was billed before). A ``pending`` followed directly by a stop-type
  state (its ``running`` was not recorded) counts from ``pending``.
* **busy**: the union (overlaps merged) of the GPU jobs' processing intervals, ``started_at`` (the adapter's
  claim) to ``finished_at`` (now for a job still processing), within billed time. A job without
  ``started_at`` (written by an adapter older than this change) is counted in ``jobs_untimed`` and its time is
  idle here.
* **boot**: from the start of a billed stretch to the first claim in it, when the first job it ran was
  already waiting (created at most 60 s after the start): the time the GPU was paid for while it booted.
* **idle**: billed minus busy minus boot; **idle tail**: its part after the last job of each stretch.

A job that ran more than once (``attempts`` > 1: retried after a transient error, or taken over from an
adapter that stopped) counts only its last attempt: the record keeps that attempt's ``started_at`` alone, so
the earlier attempts' GPU time is idle here (the report warns). `gpuctl doctor --canary`'s jobs are charged as
any job and marked ``canary`` (``--by job-type`` groups them as ``canary``).

Per job: its own GPU seconds, and the seconds charged to it: its share of the stretch's busy time
(proportional to its own seconds when jobs overlap), an equal share of the boot with the other jobs that
waited for it, and a share of the stretch's idle time proportional to its GPU seconds. Stretches that ran no
job are charged to no job (``unattributed_seconds``). Money is seconds x the hourly price.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gpuctl.errors import UsageError

if TYPE_CHECKING:
    from gpuctl.aws.ec2 import InstanceInfo, Volume
    from gpuctl.aws.history import Transition
    from gpuctl.models import JobRecord
    from gpuctl.services.context import Gateways

__all__ = [
    "EBS_GB_MONTH",
    "HOURLY_PRICES",
    "MIN_BILLED_SECONDS",
    "CostReport",
    "JobTime",
    "Member",
    "Stretch",
    "build_fleet_report",
    "build_report",
    "cost_report",
    "hourly_price",
    "merge",
    "stretches",
]

#: On-demand Linux prices, USD per hour, us-east-1 (AWS price list, 2025). Other regions and savings plans
#: differ: pass --hourly-price for the price you pay.
HOURLY_PRICES: dict[str, float] = {
    "g4dn.xlarge": 0.526, "g4dn.2xlarge": 0.752, "g4dn.4xlarge": 1.204, "g4dn.8xlarge": 2.176,
    "g5.xlarge": 1.006, "g5.2xlarge": 1.212, "g5.4xlarge": 1.624, "g5.8xlarge": 2.448, "g5.12xlarge": 5.672,
    "g6.xlarge": 0.8048, "g6.2xlarge": 0.9776, "g6.4xlarge": 1.3232, "g6.12xlarge": 4.6016,
    "g6e.xlarge": 1.861, "g6e.2xlarge": 2.24208, "g6e.4xlarge": 3.00424,
    "p3.2xlarge": 3.06, "p4d.24xlarge": 32.7726, "p5.48xlarge": 98.32,
}
#: EBS, USD per GB-month, us-east-1 (a month is 730 hours, as AWS bills it).
EBS_GB_MONTH: dict[str, float] = {"gp3": 0.08, "gp2": 0.10, "io1": 0.125, "io2": 0.125, "st1": 0.045,
                                  "sc1": 0.015, "standard": 0.05}
MONTH_SECONDS = 730 * 3600.0
MIN_BILLED_SECONDS = 60.0
#: A first job created this long after a start did not wait for the boot (someone started it by hand).
BOOT_WAIT_SLACK = 60.0
START_STATES = frozenset({"pending", "running"})
STOP_STATES = frozenset({"stopping", "stopped", "shutting-down", "terminated"})


@dataclass
class Stretch:
    """One billed stretch of running time (times clipped to the window)."""

    start: float
    end: float
    started_in_window: bool
    running_now: bool = False
    start_cause: str | None = None
    stop_cause: str | None = None
    boot: float = 0.0
    busy: float = 0.0
    idle_tail: float = 0.0
    jobs: list[str] = field(default_factory=list)
    #: The instance that ran it, its type and hourly price (set by the report).
    instance_id: str | None = None
    instance_type: str | None = None
    price: float | None = None

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def billed(self) -> float:
        return max(self.seconds, MIN_BILLED_SECONDS) if self.started_in_window else self.seconds

    @property
    def idle(self) -> float:
        return max(0.0, self.billed - self.busy - self.boot)


@dataclass(frozen=True)
class JobTime:
    task_id: str
    kind: str
    created_at: float
    started_at: float
    finished_at: float
    canary: bool = False
    #: Fleet mode: the instance that ran it (charged only there); None: any of the report's stretches.
    instance_id: str | None = None


def stretches(transitions: Sequence[Transition], *, since: float, until: float) -> list[Stretch]:
    """The billed stretches of running time in [since, until] from the state changes (oldest first; the first
    may be the last change before ``since``). A stretch's cause is the first one of its events that is not
    ``other`` (the first event of a change may be recorded before gpuctl's tags are written)."""
    found: list[Stretch] = []
    start: tuple[float, bool] | None = None  # (when, counted from pending)
    causes: list[str] = []
    last: Stretch | None = None

    def first(names: list[str]) -> str:
        return next((n for n in names if n != "other"), names[0] if names else "other")

    for change in transitions:
        if change.state in START_STATES:
            if start is None or (start[1] and change.state == "running"):
                start = (change.at, change.state == "pending")
            causes.append(change.cause)
            last = None
        elif change.state in STOP_STATES:
            if start is not None:
                last = None
                if change.at >= since and start[0] <= until:
                    last = Stretch(max(start[0], since), min(change.at, until), start[0] >= since,
                                   start_cause=first(causes), stop_cause=change.cause)
                    found.append(last)
            elif last is not None and last.stop_cause == "other":
                last.stop_cause = change.cause
            start, causes = None, []
    if start is not None and start[0] <= until:
        found.append(Stretch(max(start[0], since), until, start[0] >= since, running_now=True,
                             start_cause=first(causes)))
    return found


def merge(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of intervals, sorted and non-overlapping."""
    merged: list[tuple[float, float]] = []
    for lo, hi in sorted(intervals):
        if hi <= lo:
            continue
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _overlap(a: tuple[float, float], lo: float, hi: float) -> float:
    return max(0.0, min(a[1], hi) - max(a[0], lo))


def _day(epoch: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(epoch))


def hourly_price(instance_type: str | None, override: float | None) -> tuple[float | None, str]:
    """The price per hour and where it came from (``--hourly-price``, the shipped table, or unknown)."""
    if override is not None:
        if not math.isfinite(override) or override < 0:
            raise UsageError(f"--hourly-price must be a non-negative number, got {override}.")
        return override, "--hourly-price"
    if instance_type and instance_type in HOURLY_PRICES:
        return HOURLY_PRICES[instance_type], f"shipped table (us-east-1 on-demand, {instance_type})"
    return None, "unknown (pass --hourly-price)"


@dataclass(frozen=True)
class Member:
    """One instance's part of the report: its recorded changes, its type's price, and its EBS volumes now."""

    instance_id: str
    instance_type: str | None
    transitions: Sequence[Transition]
    price: float | None
    ebs_gb: dict[str, int] = field(default_factory=dict)


@dataclass
class CostReport:
    """Everything ``gpuctl cost report`` prints; :meth:`document` is its JSON.

    One instance, or (fleet mode, ``fleet_group``) every member of the group the history recorded: each
    stretch is billed at its own instance type's price, and each job is charged on the instance that ran it.
    """

    instance_id: str | None
    instance_type: str | None
    since: float
    until: float
    price: float | None
    price_source: str
    stretches: list[Stretch]
    jobs: list[dict[str, Any]]
    jobs_untimed: int
    by: str | None = None
    warnings: list[str] = field(default_factory=list)
    fleet_group: str | None = None
    members: list[Member] = field(default_factory=list)
    #: Per member: (GB by volume type, seconds stopped in the window).
    ebs: list[tuple[dict[str, int], float]] = field(default_factory=list)

    @property
    def priced(self) -> bool:
        """Every instance's price is known (else no money is shown: a partial sum would mislead)."""
        return all(m.price is not None for m in self.members) if self.members else self.price is not None

    def _cost(self, pairs: Iterable[tuple[float, float | None]]) -> float | None:
        """Money for (seconds, hourly price) pairs."""
        if not self.priced:
            return None
        return round(sum(seconds / 3600.0 * (price or 0.0) for seconds, price in pairs), 4)

    def ebs_stopped(self) -> dict[str, Any]:
        volumes: dict[str, int] = defaultdict(int)
        cost = stopped_total = 0.0
        for gb_by_type, stopped in self.ebs:
            stopped_total += stopped
            for kind, gb in gb_by_type.items():
                volumes[kind] += gb
                cost += gb * EBS_GB_MONTH.get(kind, EBS_GB_MONTH["gp3"]) * stopped / MONTH_SECONDS
        return {"volumes_gb": dict(sorted(volumes.items())), "stopped_seconds": round(stopped_total),
                "cost": round(cost, 4)}

    def totals(self) -> dict[str, Any]:
        billed = sum(s.billed for s in self.stretches)
        busy = sum(s.busy for s in self.stretches)
        boot = sum(s.boot for s in self.stretches)
        idle = sum(s.idle for s in self.stretches)
        charged = sum(j["charged_seconds"] for j in self.jobs)
        return {"billed_seconds": round(billed), "busy_seconds": round(busy), "boot_seconds": round(boot),
                "idle_seconds": round(idle), "idle_tail_seconds": round(sum(s.idle_tail for s in self.stretches)),
                "gpu_hours": round(billed / 3600.0, 3), "starts": sum(1 for s in self.stretches if s.started_in_window),
                "jobs": len(self.jobs), "jobs_untimed": self.jobs_untimed,
                "unattributed_seconds": round(max(0.0, billed - charged)),
                "cost": self._cost((s.billed, s.price) for s in self.stretches),
                "utilisation": round(busy / billed, 4) if billed else None}

    def instances(self) -> list[dict[str, Any]]:
        """Per instance: its type and price, billed and busy time, starts and money."""
        rows = []
        for m in self.members:
            own = [s for s in self.stretches if s.instance_id == m.instance_id]
            rows.append({"instance_id": m.instance_id, "instance_type": m.instance_type, "hourly_price": m.price,
                         "billed_seconds": round(sum(s.billed for s in own)),
                         "busy_seconds": round(sum(s.busy for s in own)),
                         "starts": sum(1 for s in own if s.started_in_window),
                         "cost": self._cost((s.billed, s.price) for s in own)})
        return rows

    def days(self) -> list[dict[str, Any]]:
        """Per UTC day: billed, busy, boot, idle seconds and money (a stretch split at midnight; its minimum
        charge on the day it started)."""
        rows: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        money: dict[str, list[tuple[float, float | None]]] = defaultdict(list)
        for s in self.stretches:
            share = {"busy": s.busy, "boot": s.boot, "idle": s.idle}
            cursor = s.start
            while cursor < s.end or cursor == s.start:
                midnight = (math.floor(cursor / 86400) + 1) * 86400.0
                hi = min(s.end, midnight)
                part = (hi - cursor) / s.seconds if s.seconds else 1.0
                day = rows[_day(cursor)]
                day["billed_seconds"] += part * s.seconds
                money[_day(cursor)].append((part * s.seconds, s.price))
                for name, value in share.items():
                    day[f"{name}_seconds"] += part * value
                if hi >= s.end:
                    break
                cursor = hi
            extra = s.billed - s.seconds  # the one-minute minimum: idle time on the day it started
            rows[_day(s.start)]["billed_seconds"] += extra
            money[_day(s.start)].append((extra, s.price))
        return [{"day": day, **{k: round(v) for k, v in sorted(values.items())},
                 "cost": self._cost(money[day])} for day, values in sorted(rows.items())]

    def job_types(self) -> list[dict[str, Any]]:
        groups: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for job in self.jobs:
            group = groups["canary" if job["canary"] else job["job_type"]]
            group["jobs"] += 1
            for name in ("gpu_seconds", "boot_share_seconds", "idle_share_seconds", "charged_seconds"):
                group[name] += job[name]
            group["cost"] += job["cost"] or 0.0
        return [{"job_type": kind, **{k: round(v) for k, v in sorted(values.items()) if k != "cost"},
                 "cost": round(values["cost"], 4) if self.priced else None} for kind, values in sorted(groups.items())]

    def document(self) -> dict[str, Any]:
        from gpuctl.times import stamp

        doc: dict[str, Any] = {
            "instance_id": self.instance_id, "instance_type": self.instance_type, "fleet_group": self.fleet_group,
            **stamp("since", self.since), **stamp("until", self.until),
            "hourly_price": self.price, "price_source": self.price_source,
            "totals": self.totals(), "ebs_while_stopped": self.ebs_stopped(), "by": self.by,
            "instances": self.instances(),
            "stretches": [{"instance_id": s.instance_id, **stamp("start", s.start), **stamp("end", s.end),
                           "billed_seconds": round(s.billed),
                           "busy_seconds": round(s.busy), "boot_seconds": round(s.boot),
                           "idle_seconds": round(s.idle), "idle_tail_seconds": round(s.idle_tail),
                           "running_now": s.running_now, "started_by": s.start_cause, "stopped_by": s.stop_cause,
                           "jobs": len(s.jobs)} for s in self.stretches],
            "jobs": [dict(j) for j in self.jobs],
            "warnings": self.warnings,
        }
        if self.by == "day":
            doc["groups"] = self.days()
        elif self.by == "job-type":
            doc["groups"] = self.job_types()
        return doc


def _attribute(found: list[Stretch], jobs: Sequence[JobTime], priced: bool) -> list[dict[str, Any]]:
    """Fill each stretch's busy/boot/idle tail and charge every second of it to its jobs (module docstring).
    A job with an ``instance_id`` (fleet mode) is charged only on that instance's stretches."""
    charged: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for s in found:
        own = {j.task_id: _overlap((j.started_at, j.finished_at), s.start, s.end)
               if j.instance_id is None or j.instance_id == s.instance_id else 0.0 for j in jobs}
        inside = [j for j in jobs if own[j.task_id] > 0]
        busy = merge((max(j.started_at, s.start), min(j.finished_at, s.end)) for j in inside)
        s.busy = sum(hi - lo for lo, hi in busy)
        s.jobs = [j.task_id for j in inside]
        if not inside:
            continue
        first = min(inside, key=lambda j: j.started_at)
        waited: list[JobTime] = []
        if s.started_in_window and first.created_at <= s.start + BOOT_WAIT_SLACK:
            s.boot = max(0.0, min(first.started_at, s.end) - s.start)
            waited = [j for j in inside if j.created_at <= first.started_at]
        s.idle_tail = max(0.0, s.end - max(busy[-1][1], s.start + s.boot))
        total_own = sum(own[j.task_id] for j in inside)
        for j in inside:
            weight = own[j.task_id] / total_own
            row = charged[j.task_id]
            boot_share = s.boot / len(waited) if j in waited else 0.0
            row["gpu_seconds"] += own[j.task_id]
            row["busy_share_seconds"] += s.busy * weight
            row["boot_share_seconds"] += boot_share
            row["idle_share_seconds"] += s.idle * weight
            row["money"] += (s.busy * weight + boot_share + s.idle * weight) / 3600.0 * (s.price or 0.0)
    rows = []
    for j in jobs:
        if j.task_id not in charged:
            continue
        row = charged[j.task_id]
        rows.append({"job_id": j.task_id, "job_type": j.kind, "canary": j.canary,
                     "gpu_seconds": round(row["gpu_seconds"], 3),
                     "boot_share_seconds": round(row["boot_share_seconds"], 3),
                     "idle_share_seconds": round(row["idle_share_seconds"], 3),
                     "charged_seconds": round(row["busy_share_seconds"] + row["boot_share_seconds"]
                                              + row["idle_share_seconds"], 3),
                     "cost": round(row["money"], 4) if priced else None})
    return rows


def build_report(transitions: Sequence[Transition], records: Iterable[JobRecord], *, instance_id: str,
                 instance_type: str | None, since: float, until: float, price: float | None, price_source: str,
                 ebs_gb: dict[str, int], by: str | None = None) -> CostReport:
    """The report of one instance from what was recorded (pure: no AWS call)."""
    member = Member(instance_id, instance_type, transitions, price, ebs_gb)
    report = _build([member], records, since=since, until=until, price=price, price_source=price_source, by=by)
    if not transitions:
        report.warnings.insert(0, "No state change of the instance is recorded in this window (is the stack "
                                  "deployed with the history table, and did the instance change state since?).")
    elif transitions[0].at > since:
        report.warnings.insert(0, f"The history starts at {_iso(transitions[0].at)}, after the window's start: "
                                  "earlier running time is not counted.")
    if price is None:
        report.warnings.append(f"No price is known for the instance type {instance_type or '(unknown)'}: "
                               "pass --hourly-price to see money.")
    return report


def build_fleet_report(members: Sequence[Member], records: Iterable[JobRecord], *, group: str, since: float,
                       until: float, hourly: float | None = None, by: str | None = None) -> CostReport:
    """The report of a fleet's members from what was recorded (pure: no AWS call). Each member's price is its
    own type's (``hourly``: one price for all); jobs are charged on the instance that ran them."""
    types = sorted({m.instance_type or "(unknown)" for m in members})
    prices = {m.price for m in members}
    price = next(iter(prices)) if len(prices) == 1 else None
    source = "--hourly-price" if hourly is not None else "shipped table (us-east-1 on-demand, per instance type)"
    report = _build(members, records, since=since, until=until, price=price, price_source=source, by=by,
                    fleet_group=group)
    report.instance_type = types[0] if len(types) == 1 and types[0] != "(unknown)" else None
    if not members:
        report.warnings.insert(0, f"No state change of the fleet {group}'s instances is recorded in this window "
                                  "(is the stack deployed with the history table, and did the group run since?).")
    unpriced = sorted({m.instance_type or "(unknown)" for m in members if m.price is None})
    if unpriced:
        report.warnings.append(f"No price is known for the instance type(s) {', '.join(unpriced)}: "
                               "pass --hourly-price to see money.")
    gone = sum(1 for m in members if not m.ebs_gb)
    if gone:
        report.warnings.append(f"{gone} of the fleet's {len(members)} instance(s) no longer exist (or have no "
                               "volume): their EBS while stopped is not counted.")
    return report


def _lifetime(member: Member, since: float, until: float) -> tuple[float, float]:
    """The part of the window the member existed in: from its first change (or the window's start) to its
    termination (or the window's end)."""
    changes = member.transitions
    start = since if not changes or changes[0].at <= since else changes[0].at
    end = next((c.at for c in changes if c.state == "terminated" and c.at >= since), until)
    return start, min(max(start, end), until)


def _build(members: Sequence[Member], records: Iterable[JobRecord], *, since: float, until: float,
           price: float | None, price_source: str, by: str | None, fleet_group: str | None = None) -> CostReport:
    found: list[Stretch] = []
    ebs: list[tuple[dict[str, int], float]] = []
    for m in members:
        own = stretches(m.transitions, since=since, until=until)
        for s in own:
            s.instance_id, s.instance_type, s.price = m.instance_id, m.instance_type, m.price
        found.extend(own)
        lo, hi = _lifetime(m, since, until) if fleet_group else (since, until)
        ebs.append((m.ebs_gb, max(0.0, (hi - lo) - sum(s.seconds for s in own))))
    found.sort(key=lambda s: (s.start, s.instance_id or ""))
    known = {m.instance_id for m in members}
    jobs: list[JobTime] = []
    untimed = retaken = unplaced = elsewhere = 0
    for record in records:
        if not record.is_gpu_job:
            continue
        if record.started_at is None:
            untimed += 1
            continue
        end = record.finished_at if record.finished_at is not None else until
        if end < since or record.started_at > until:
            continue
        placed = None
        if fleet_group:
            if not record.instance_id:
                unplaced += 1
                continue
            placed = record.instance_id
            elsewhere += placed not in known
        jobs.append(JobTime(record.task_id, record.kind, record.created_at, record.started_at, end, record.canary,
                            placed))
        retaken += record.attempts > 1
    jobs.sort(key=lambda j: j.started_at)
    single = members[0] if members and not fleet_group else None
    report = CostReport(single.instance_id if single else None, single.instance_type if single else None, since,
                        until, price, price_source, found, [], untimed, by, fleet_group=fleet_group,
                        members=list(members), ebs=ebs)
    report.jobs = _attribute(found, jobs, report.priced)
    if untimed:
        report.warnings.append(f"{untimed} GPU job(s) have no started_at (processed by an adapter that does not "
                               "record it): their time counts as idle.")
    if unplaced:
        report.warnings.append(f"{unplaced} GPU job(s) have no instance_id (processed by an adapter that does not "
                               "record it): in a fleet their time cannot be placed and counts as idle.")
    if elsewhere:
        report.warnings.append(f"{elsewhere} GPU job(s) ran on instances with no recorded state change in this "
                               "window: their time is not in the report.")
    if retaken:
        report.warnings.append(f"{retaken} GPU job(s) ran more than once (retried or taken over): only their last "
                               "attempt's time is counted as busy, earlier attempts count as idle (the record "
                               "keeps only the last attempt's started_at).")
    return report


def _iso(epoch: float) -> str:
    from gpuctl.times import iso

    return iso(epoch) or str(epoch)


def finished_jobs(gw: Gateways, since: float) -> list[JobRecord]:
    """The GPU jobs that may have run since ``since``: finished ones created up to a day earlier, and the ones
    processing now."""
    from gpuctl.models import JobStatus

    records: list[JobRecord] = []
    for status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.PROCESSING):
        records.extend(gw.table.query_status(status, since=since - 86400.0))
    return [r for r in records if r.is_gpu_job]


def cost_report(gw: Gateways, *, since_seconds: float, by: str | None = None, hourly: float | None = None,
                now: float | None = None) -> CostReport:
    """Read the history, the jobs and the instance's volumes, and build the report.

    Raises:
        ConfigError: no history table is configured.
        NotFound / AwsError: a read failed.
    """
    if by not in (None, "day", "job-type"):
        raise UsageError(f"--by {by!r} is not one of: day, job-type.")
    until = time.time() if now is None else now
    since = until - since_seconds
    history = gw.history
    group = gw.settings.fleet_group
    if group:
        return _fleet_report(gw, group, since=since, until=until, by=by, hourly=hourly)
    info = gw.instance.describe()
    transitions = history.transitions(info.instance_id, since=since, until=until)
    instance_type = _type_of(info, transitions)
    price, source = hourly_price(instance_type, hourly)
    return build_report(transitions, finished_jobs(gw, since), instance_id=info.instance_id,
                        instance_type=instance_type, since=since, until=until, price=price, price_source=source,
                        ebs_gb=_gb_by_type(gw.instance.volumes(info.volume_ids)), by=by)


def _type_of(info: InstanceInfo | None, transitions: Sequence[Transition]) -> str | None:
    """The instance's type as EC2 says it, else as its newest recorded change said it (a terminated member)."""
    return (info.instance_type if info else None) or next(
        (t.instance_type for t in reversed(transitions) if t.instance_type), None)


def _gb_by_type(volumes: Iterable[Volume]) -> dict[str, int]:
    gb: dict[str, int] = defaultdict(int)
    for volume in volumes:
        gb[volume.volume_type] += volume.size_gb
    return dict(gb)


def _fleet_report(gw: Gateways, group: str, *, since: float, until: float, by: str | None,
                  hourly: float | None) -> CostReport:
    """Fleet mode: every member the history recorded in the window, priced by its own type."""
    histories = gw.history.group_transitions(group, since=since, until=until)
    # One DescribeInstances and one DescribeVolumes for all members (none at all when there are none).
    infos = {i.instance_id: i for i in gw.instances.describe(list(histories))}
    alive = [i for i in infos.values() if i.state != "terminated"]  # a terminated member's volumes are gone
    volumes = {v.volume_id: v for v in gw.instances.volumes([v for i in alive for v in i.volume_ids])}
    members: list[Member] = []
    for instance_id, transitions in histories.items():
        info = infos.get(instance_id)
        instance_type = _type_of(info, transitions)
        own = [volumes[v] for v in (info.volume_ids if info is not None and info in alive else ()) if v in volumes]
        members.append(Member(instance_id, instance_type, transitions, hourly_price(instance_type, hourly)[0],
                              _gb_by_type(own)))
    return build_fleet_report(members, finished_jobs(gw, since), group=group, since=since, until=until,
                              hourly=hourly, by=by)
