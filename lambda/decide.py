"""Pure stop/start decision for the GPU instance scheduler (no I/O; every safety rule lives here).

The handler gathers :class:`Facts` from EC2, SQS and DynamoDB and calls :func:`decide`. A fact it could not
read, or read without the value it needs, is ``None`` ("unknown"); unknown never means "no work".

1. Only a ``running`` instance can be stopped and only a ``stopped`` one started. ``pending``, ``stopping``,
   ``shutting-down``, ``terminated``, a missing instance, an unreadable one or any unknown state: do nothing.
2. Running instance - stop only when ALL of these hold:
   - nothing is queued: no visible, in-flight (not visible) or delayed message in the job queue;
   - no GPU job (a gpuctl job type; other services share the table) is ``pending`` or ``processing``, and no
     adapter that reported in the last two minutes says it holds a job;
   - every one of those facts is known (a failed or incomplete read blocks the stop);
   - no hold is active (:func:`resolve_hold`: an unreadable, absurd or over-long hold is a hold capped at the
     maximum, counted from when the scheduler first saw it);
   - the last activity is older than the idle window plus the allowed clock skew. Activity = the newest of the
     last finished GPU job, the last submit, the instance's last start and, where no gpuctl adapter reports
     (the running system's own adapter), what the scheduler itself observed (see ``observed_activity_at``).
   The dead-letter queue is NOT work (nothing consumes it automatically); it is reported, not counted.
3. Stopped instance - start when a message is waiting: at least one visible or delayed message in the job
   queue (no consumer can take it while the instance is stopped). A ``pending`` job alone does not start it
   when the queue is known to be empty: the adapter only works from the queue, so a pending job without a
   message gives the GPU nothing to do (it is failed as lost by :func:`lost_jobs` once that is certain). Only
   when the queue cannot be read does a pending GPU job older than ``start_after_seconds`` start it.
   In-flight messages and ``processing`` jobs alone do not start an instance: the message becomes
   visible again when its visibility timeout ends, and that then starts it. A hold never blocks a start.
4. Lost jobs (:func:`lost_jobs`, the reaper): with the queue empty (and seen empty before), a ``processing``
   job whose heartbeat (else last update) is older than ``lost_after_seconds`` lost its worker, and a
   ``pending`` job older than that, while the queue has been empty at least as long, lost its message.

Clock skew: times written by other machines (the adapter, the CLI, EC2) may be off by up to
``clock_skew_seconds``; every comparison leans towards keeping the GPU up by that much, and a time more than
``MAX_FUTURE_SECONDS`` ahead is ignored as absurd rather than trusted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

__all__ = [
    "ACTING_STATES",
    "MAX_FUTURE_SECONDS",
    "Action",
    "Decision",
    "Facts",
    "HoldView",
    "LostJob",
    "OpenJob",
    "Policy",
    "decide",
    "gpu_job_types",
    "lost_jobs",
    "parse_time",
    "resolve_hold",
]

Action = Literal["stop", "start", "none"]

#: The only instance states the scheduler acts on; everything else is left alone.
ACTING_STATES = frozenset({"running", "stopped"})
#: A recorded time further ahead of the scheduler's clock than this is a broken clock, not a fact.
MAX_FUTURE_SECONDS = 3600.0


@dataclass(frozen=True)
class Policy:
    """Tunables. ``lost_after_seconds``: how long a job may go without a sign of life (processing) or a
    message (pending) before it is failed as lost; ``max_hold_seconds`` caps any hold (the CLI's 7 days)."""

    idle_seconds: float = 30 * 60.0
    start_after_seconds: float = 60.0
    clock_skew_seconds: float = 60.0
    lost_after_seconds: float = 30 * 60.0
    max_hold_seconds: float = 7 * 86400.0
    #: A queue read empty once may be an approximate count; it must have read empty this long.
    empty_confirm_seconds: float = 60.0


@dataclass(frozen=True)
class Facts:
    """Observed state at decision time. Times are epoch seconds; ``None`` means unknown (or never, for times).

    Counts are GPU jobs only. ``activity_known`` is False when the activity marker could not be read or holds
    a value that is not a time: then the last activity is unknown and the instance is not stopped.
    """

    instance_state: str
    queue_visible: int | None = 0
    queue_in_flight: int | None = 0
    queue_delayed: int | None = 0
    jobs_pending: int | None = 0
    jobs_processing: int | None = 0
    oldest_pending_created_at: float | None = None
    last_finished_at: float | None = None
    last_submit_at: float | None = None
    last_started_at: float | None = None
    observed_activity_at: float | None = None
    activity_known: bool = True
    adapter_jobs_in_hand: int | None = None
    hold_until: float | None = None
    hold_reason: str | None = None
    hold_warning: str | None = None
    dlq_visible: int | None = None  # reported only; dead letters are not work
    unknown: tuple[str, ...] = ()  # the facts that could not be read, for the reason text

    @property
    def counts(self) -> dict[str, int | None]:
        return {"queue visible": self.queue_visible, "queue in flight": self.queue_in_flight,
                "queue delayed": self.queue_delayed, "pending GPU jobs": self.jobs_pending,
                "processing GPU jobs": self.jobs_processing}

    @property
    def work_present(self) -> bool:
        """Anything known to be queued, in flight, delayed, pending, processing or in an adapter's hands."""
        return any(n for n in self.counts.values() if n) or bool(self.adapter_jobs_in_hand)

    @property
    def work_unknown(self) -> bool:
        """Some count could not be read (so "no work" cannot be concluded)."""
        return any(n is None for n in self.counts.values())

    @property
    def queue_empty(self) -> bool | None:
        """True/False when all three queue counts are known, else None."""
        counts = (self.queue_visible, self.queue_in_flight, self.queue_delayed)
        if any(n is None for n in counts):
            return None
        return not any(counts)

    def last_activity_at(self, now: float) -> float | None:
        """The newest activity time, ignoring times absurdly in the future (a broken clock)."""
        times = [t for t in (self.last_finished_at, self.last_submit_at, self.last_started_at,
                             self.observed_activity_at)
                 if t is not None and math.isfinite(t) and t <= now + MAX_FUTURE_SECONDS]
        return max(times) if times else None


@dataclass(frozen=True)
class Decision:
    """What to do and why. ``code`` is a stable machine-readable reason; ``reason`` is for people."""

    action: Action
    code: str
    reason: str


def _iso(epoch: float) -> str:
    try:
        return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{epoch:.0f}"


def parse_time(raw: str | None) -> float | None:
    """Epoch seconds or ISO 8601 (``Z`` allowed; naive means UTC). None when absent, blank or unparseable."""
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


# ---------------------------------------------------------------------------------------------- holds


@dataclass(frozen=True)
class HoldView:
    """A hold as the scheduler honours it: ``until`` (None: no hold) and a warning when it was not taken as
    written (unreadable, absurd or longer than the maximum)."""

    until: float | None
    warning: str | None = None


def resolve_hold(raw: str | None, now: float, policy: Policy, *, first_seen_at: float | None = None) -> HoldView:
    """The effective hold for a ``gpuctl:hold-until`` tag value.

    A readable time in the past: no hold. A readable time up to ``max_hold_seconds`` after the hold was first
    seen: that time. Anything else (blank, ``inf``, ``2h``, ``tomorrow``, a millisecond epoch, a time beyond
    the maximum) is doubt, and doubt keeps the GPU up: a hold until ``first_seen_at + max_hold_seconds``.
    ``first_seen_at`` is when the scheduler first saw this exact value (it records that); unknown means now.
    """
    if raw is None:
        return HoldView(None)
    anchor = now if first_seen_at is None else min(first_seen_at, now)
    cap = anchor + policy.max_hold_seconds
    days = policy.max_hold_seconds / 86400
    value = parse_time(raw)
    if value is None:
        return HoldView(cap, f"the hold value {raw!r} is not a time; it counts as a hold of at most "
                             f"{days:g} days, until {_iso(cap)}")
    if value <= now:
        return HoldView(None)
    if value > cap:
        return HoldView(cap, f"the hold value {raw!r} ({_iso(value)}) is longer than the maximum of {days:g} "
                             f"days; it counts as a hold until {_iso(cap)}")
    return HoldView(value)


def _hold_active(facts: Facts, now: float, policy: Policy) -> bool:
    until = facts.hold_until
    return until is not None and not math.isnan(until) and now < until + policy.clock_skew_seconds


# ---------------------------------------------------------------------------------------------- lost jobs


@dataclass(frozen=True)
class OpenJob:
    """A pending or processing GPU job as the reaper sees it (times as read; None when absent)."""

    task_id: str
    status: Literal["pending", "processing"]
    created_at: float | None
    updated_at: float | None = None
    heartbeat_at: float | None = None

    @property
    def last_sign_of_life(self) -> float | None:
        """The newest of heartbeat and last update (a processing job's worker bumps both)."""
        times = [t for t in (self.heartbeat_at, self.updated_at) if t is not None]
        return max(times) if times else None


@dataclass(frozen=True)
class LostJob:
    job: OpenJob
    reason: str


LOST_WORKER = "the worker running it was lost (no heartbeat for {age}, and its message is no longer in the queue)"
LOST_MESSAGE = "lost before it was queued (pending for {age} while the queue was empty)"


def _age(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def lost_jobs(jobs: Iterable[OpenJob], *, queue_empty: bool | None, queue_empty_since: float | None,
              now: float, policy: Policy) -> list[LostJob]:
    """The open jobs that can no longer finish and should be failed, with the reason to record.

    Nothing is lost unless the queue is known to be empty now and was already empty
    ``empty_confirm_seconds`` ago (SQS counts are approximate): then no job has a message anywhere a worker
    could receive it. A job with an unknown time is never lost (doubt keeps it).
    """
    if queue_empty is not True or queue_empty_since is None:
        return []
    empty_for = now - queue_empty_since
    if empty_for < policy.empty_confirm_seconds:
        return []
    bound = policy.lost_after_seconds + policy.clock_skew_seconds
    lost: list[LostJob] = []
    for job in jobs:
        if job.status == "processing":
            seen = job.last_sign_of_life
            if seen is not None and now - seen >= bound:
                lost.append(LostJob(job, LOST_WORKER.format(age=_age(now - seen))))
        elif job.status == "pending":
            created = job.created_at
            if created is not None and now - created >= bound and empty_for >= policy.lost_after_seconds:
                lost.append(LostJob(job, LOST_MESSAGE.format(age=_age(now - created))))
    return lost


# ---------------------------------------------------------------------------------------------- decide


def _work_summary(facts: Facts) -> str:
    parts = [f"{name}={'unknown' if n is None else n}" for name, n in facts.counts.items()]
    if facts.adapter_jobs_in_hand:
        parts.append(f"jobs in an adapter's hands={facts.adapter_jobs_in_hand}")
    return ", ".join(parts)


def _unknown_text(facts: Facts) -> str:
    return ", ".join(facts.unknown) if facts.unknown else "some facts"


def _decide_running(facts: Facts, now: float, policy: Policy) -> Decision:
    if facts.work_present:
        return Decision("none", "work_present", f"work present ({_work_summary(facts)})")
    if facts.work_unknown or not facts.activity_known:
        return Decision("none", "facts_unknown",
                        f"not stopping: {_unknown_text(facts)} could not be read ({_work_summary(facts)})")
    if _hold_active(facts, now, policy):
        why = f": {facts.hold_reason}" if facts.hold_reason else ""
        warn = f" ({facts.hold_warning})" if facts.hold_warning else ""
        assert facts.hold_until is not None
        return Decision("none", "hold_active", f"hold active until {_iso(facts.hold_until)}{why}{warn}")
    last = facts.last_activity_at(now)
    window = policy.idle_seconds + policy.clock_skew_seconds
    if last is not None and now - last < window:
        idle_for = max(0.0, now - last)
        return Decision(
            "none",
            "recent_activity",
            f"last activity {idle_for:.0f}s ago, idle window is {policy.idle_seconds:.0f}s "
            f"(+{policy.clock_skew_seconds:.0f}s allowed clock skew)",
        )
    idle_text = "no recorded activity" if last is None else f"idle for {now - last:.0f}s"
    return Decision(
        "stop",
        "idle",
        f"idle: queue empty, no pending or processing GPU jobs, {idle_text} "
        f"(idle window {policy.idle_seconds:.0f}s)",
    )


def _decide_stopped(facts: Facts, now: float, policy: Policy) -> Decision:
    visible, delayed = facts.queue_visible, facts.queue_delayed
    if visible or delayed:
        return Decision(
            "start",
            "work_waiting",
            f"work waiting on a stopped instance: {visible or 0} visible and {delayed or 0} delayed messages",
        )
    pending = facts.jobs_pending
    if visible is None or delayed is None:
        oldest = facts.oldest_pending_created_at
        if pending and (oldest is None or now - oldest >= policy.start_after_seconds):
            age = "unknown" if oldest is None else f"{now - oldest:.0f}s"
            return Decision("start", "work_waiting",
                            f"the queue could not be read and {pending} GPU jobs are pending on a stopped "
                            f"instance (oldest waited {age})")
        return Decision("none", "facts_unknown",
                        f"not starting: the queue could not be read and no GPU job has been pending "
                        f"{policy.start_after_seconds:.0f}s ({_work_summary(facts)})")
    if pending:
        return Decision("none", "pending_without_message",
                        f"{pending} GPU jobs are pending but the queue has no message for them: not starting "
                        f"(they are failed as lost once the queue has been empty for "
                        f"{policy.lost_after_seconds:.0f}s)")
    return Decision("none", "nothing_to_do", "instance stopped and no work is waiting")


def decide(facts: Facts, now: float, policy: Policy) -> Decision:
    """Decide whether to stop, start or leave the GPU instance (see the module docstring for the rules)."""
    state = facts.instance_state
    if state == "running":
        return _decide_running(facts, now, policy)
    if state == "stopped":
        return _decide_stopped(facts, now, policy)
    if state == "missing":
        return Decision("none", "instance_missing", "the GPU instance was not found")
    if state == "unknown":
        return Decision("none", "facts_unknown", f"the instance state could not be read ({_unknown_text(facts)})")
    if state in {"pending", "stopping", "shutting-down"}:
        return Decision("none", "instance_transitioning", f"instance is {state}; leaving it alone")
    if state == "terminated":
        return Decision("none", "instance_terminated", "instance is terminated; nothing to do")
    return Decision("none", "unknown_state", f"unknown instance state {state!r}; leaving it alone")


def gpu_job_types(raw: str | None, default: Sequence[str]) -> frozenset[str]:
    """The configured GPU job types (comma-separated api_paths), trailing slashes ignored."""
    if raw is None or not raw.strip():
        return frozenset(p.rstrip("/") for p in default)
    return frozenset(p.strip().rstrip("/") for p in raw.split(",") if p.strip())
