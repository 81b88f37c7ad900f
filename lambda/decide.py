"""Pure stop/start decision for the GPU instance scheduler (no I/O; every safety rule lives here).

The handler gathers :class:`Facts` from EC2, SQS and DynamoDB and calls :func:`decide`. Rules, in order:

1. Only a ``running`` instance can be stopped and only a ``stopped`` one started. ``pending``, ``stopping``,
   ``shutting-down``, ``terminated``, a missing instance or any unknown state: do nothing.
2. Running instance - stop only when ALL of these hold:
   - nothing is queued: no visible, in-flight (not visible) or delayed message in the job queue;
   - no job is ``pending`` or ``processing`` in the task table;
   - no hold is active (``hold_until`` in the future, tag ``gpuctl:hold-until``);
   - the last activity is older than the idle window. Activity = the newest finished job
     (``completed``/``failed``) and the last time the instance was started.
   The dead-letter queue is NOT work (nothing consumes it automatically); it is reported, not counted.
3. Stopped instance - start when work is waiting, defined as:
   - at least one visible or delayed message in the job queue (SQS exposes no message age through its API,
     and no consumer can take a message while the instance is stopped, so such a message is waiting now), or
   - a ``pending`` job created at least ``start_after_seconds`` (default 60 s) ago, or a pending job whose
     age is unknown. A younger pending job with an empty queue is a submit in progress (the CLI writes the
     job before the message, and starts the instance itself), so it is left to the next run.
   In-flight messages and ``processing`` jobs alone do not start an instance: the message becomes
   visible again when its visibility timeout ends, and that then starts it. A hold never blocks a start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["ACTING_STATES", "Action", "Decision", "Facts", "Policy", "decide"]

Action = Literal["stop", "start", "none"]

#: The only instance states the scheduler acts on; everything else is left alone.
ACTING_STATES = frozenset({"running", "stopped"})


@dataclass(frozen=True)
class Facts:
    """Observed state at decision time. Times are epoch seconds; ``None`` means unknown/never."""

    instance_state: str
    queue_visible: int = 0
    queue_in_flight: int = 0
    queue_delayed: int = 0
    jobs_pending: int = 0
    jobs_processing: int = 0
    oldest_pending_created_at: float | None = None
    last_finished_at: float | None = None
    last_started_at: float | None = None
    hold_until: float | None = None
    hold_reason: str | None = None
    dlq_visible: int | None = None  # reported only; dead letters are not work

    @property
    def work_present(self) -> bool:
        """Anything queued, in flight, delayed, pending or processing."""
        return (
            self.queue_visible > 0
            or self.queue_in_flight > 0
            or self.queue_delayed > 0
            or self.jobs_pending > 0
            or self.jobs_processing > 0
        )

    @property
    def last_activity_at(self) -> float | None:
        """The newest of the last finished job and the last instance start."""
        times = [t for t in (self.last_finished_at, self.last_started_at) if t is not None]
        return max(times) if times else None


@dataclass(frozen=True)
class Policy:
    """Tunables: the idle window before a stop and the wait before a pending job starts the instance."""

    idle_seconds: float = 30 * 60.0
    start_after_seconds: float = 60.0


@dataclass(frozen=True)
class Decision:
    """What to do and why. ``code`` is a stable machine-readable reason; ``reason`` is for people."""

    action: Action
    code: str
    reason: str


def _hold_active(facts: Facts, now: float) -> bool:
    return facts.hold_until is not None and not math.isnan(facts.hold_until) and facts.hold_until > now


def _work_summary(facts: Facts) -> str:
    return (
        f"queue visible={facts.queue_visible} in_flight={facts.queue_in_flight} "
        f"delayed={facts.queue_delayed}, jobs pending={facts.jobs_pending} "
        f"processing={facts.jobs_processing}"
    )


def _decide_running(facts: Facts, now: float, policy: Policy) -> Decision:
    if facts.work_present:
        return Decision("none", "work_present", f"work present ({_work_summary(facts)})")
    if _hold_active(facts, now):
        why = f": {facts.hold_reason}" if facts.hold_reason else ""
        return Decision("none", "hold_active", f"hold active until {facts.hold_until:.0f}{why}")
    last = facts.last_activity_at
    if last is not None and now - last < policy.idle_seconds:
        idle_for = max(0.0, now - last)
        return Decision(
            "none",
            "recent_activity",
            f"last activity {idle_for:.0f}s ago, idle window is {policy.idle_seconds:.0f}s",
        )
    idle_text = "no recorded activity" if last is None else f"idle for {now - last:.0f}s"
    return Decision(
        "stop",
        "idle",
        f"idle: queue empty, no pending or processing jobs, {idle_text} (idle window {policy.idle_seconds:.0f}s)",
    )


def _decide_stopped(facts: Facts, now: float, policy: Policy) -> Decision:
    if facts.queue_visible > 0 or facts.queue_delayed > 0:
        return Decision(
            "start",
            "work_waiting",
            f"work waiting on a stopped instance: {facts.queue_visible} visible and "
            f"{facts.queue_delayed} delayed messages",
        )
    if facts.jobs_pending > 0:
        oldest = facts.oldest_pending_created_at
        if oldest is None or now - oldest >= policy.start_after_seconds:
            age = "unknown" if oldest is None else f"{now - oldest:.0f}s"
            return Decision(
                "start",
                "work_waiting",
                f"work waiting on a stopped instance: {facts.jobs_pending} pending jobs, oldest waited {age}",
            )
        return Decision(
            "none",
            "work_not_yet_waiting",
            f"{facts.jobs_pending} pending jobs, the oldest only {max(0.0, now - oldest):.0f}s old "
            f"(start threshold {policy.start_after_seconds:.0f}s)",
        )
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
    if state in {"pending", "stopping", "shutting-down"}:
        return Decision("none", "instance_transitioning", f"instance is {state}; leaving it alone")
    if state == "terminated":
        return Decision("none", "instance_terminated", "instance is terminated; nothing to do")
    return Decision("none", "unknown_state", f"unknown instance state {state!r}; leaving it alone")
