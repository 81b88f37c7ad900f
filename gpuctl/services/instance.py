"""The GPU instance: make sure it runs when work arrives; status, start, stop."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpuctl.errors import GpuctlError
from gpuctl.times import parse_time, stamp

if TYPE_CHECKING:
    from gpuctl.services.context import Gateways

__all__ = [
    "InstanceStatus",
    "StartOutcome",
    "StateChange",
    "Workload",
    "ensure_running",
    "instance_status",
    "start_instance",
    "stop_instance",
    "workload",
]

log = logging.getLogger(__name__)

# How long a submit waits for a `stopping` instance to finish stopping before starting it again.
STOPPING_WAIT_SECONDS = 180.0


@dataclass(frozen=True)
class StartOutcome:
    """What ensure_running did: ``action`` is started | already-running | skipped | failed."""

    action: str
    state: str | None = None
    warning: str | None = None
    error: GpuctlError | None = None


def ensure_running(gw: Gateways, *, stopping_wait: float = STOPPING_WAIT_SECONDS) -> StartOutcome:
    """Start the instance if it is not running, without ever raising for instance trouble.

    StartInstances is idempotent on a running or pending instance, so the common case is one request
    and no DescribeInstances. An instance that is still ``stopping`` refuses to start
    (IncorrectInstanceState): wait for ``stopped`` with the boto3 waiter, then start it.
    Capacity errors and every other failure come back as a warning: the job is already queued and
    the Lambda's schedule starts the instance once capacity returns. ``stopping_wait`` 0: never wait for a
    ``stopping`` instance (``skipped``, with a warning).
    """
    from gpuctl.errors import Conflict

    try:
        gateway = gw.instance
        try:
            previous, state = gateway.start()
        except Conflict:
            info = gateway.describe()
            if info.state == "stopping" and stopping_wait <= 0:
                # A caller that must answer at once (the HTTP API): the scheduler starts it for the queued job.
                return StartOutcome("skipped", info.state, warning="the GPU instance is still stopping; the job is "
                                    "queued and the scheduler starts the instance once it has stopped")
            if info.state == "stopping":
                gateway.wait("stopped", timeout=stopping_wait, delay=5.0)
                previous, state = gateway.start()
            elif info.state in ("running", "pending"):
                return StartOutcome("already-running", info.state)
            else:
                raise
    except GpuctlError as exc:
        return StartOutcome(
            "failed",
            warning=f"the job is queued, but the GPU instance was not started: {exc}",
            error=exc,
        )
    if previous in ("running", "pending"):
        return StartOutcome("already-running", previous)
    # Tell the scheduler Lambda the instance was just started, so its idle window counts from now.
    warning = _tag(gw, {STARTED_AT_TAG: _iso_now(), STARTED_REASON_TAG: "job submitted", STARTED_BY_TAG: _ACTOR})
    return StartOutcome("started", state, warning=warning)


# --- status, start, stop (the `gpuctl instance` commands) ------------------------------------------

# Tags the scheduler Lambda reads and writes on the instance (lambda/handler.py keeps the same names).
HOLD_UNTIL_TAG = "gpuctl:hold-until"
HOLD_REASON_TAG = "gpuctl:hold-reason"
STARTED_AT_TAG = "gpuctl:started-at"
STARTED_REASON_TAG = "gpuctl:started-reason"
STARTED_BY_TAG = "gpuctl:started-by"
STOPPED_AT_TAG = "gpuctl:stopped-at"
STOPPED_REASON_TAG = "gpuctl:stopped-reason"
STOPPED_BY_TAG = "gpuctl:stopped-by"
_ACTOR = "gpuctl-cli"

#: Job counts stop at this many; status only needs "how busy", not an exact census of a huge backlog.
COUNT_CAP = 1000


@dataclass(frozen=True)
class Workload:
    """The work the instance has or is about to have."""

    visible: int
    in_flight: int
    delayed: int
    dlq: int | None
    pending: int
    processing: int

    @property
    def busy(self) -> bool:
        return bool(self.visible or self.in_flight or self.delayed or self.processing)

    def describe(self) -> str:
        """What keeps it busy, in words (empty when idle)."""
        parts = [(self.processing, "job", "processing"), (self.visible, "message", "waiting in the queue"),
                 (self.in_flight, "message", "in flight"), (self.delayed, "message", "delayed")]
        return ", ".join(f"{n} {noun}{'s' if n != 1 else ''} {what}" for n, noun, what in parts if n)


@dataclass(frozen=True)
class InstanceStatus:
    instance_id: str
    state: str
    instance_type: str | None
    uptime_seconds: float | None
    workload: Workload
    tags: dict[str, str]
    #: How the scheduler treats the hold tag: until when (None: no hold), and why when not as written.
    hold_effective_until: float | None = None
    hold_warning: str | None = None

    @property
    def busy(self) -> bool:
        return self.workload.busy

    def document(self) -> dict[str, Any]:
        """The stable JSON shape of ``gpuctl instance status --output json``."""

        w = self.workload
        return {
            "instance_id": self.instance_id,
            "state": self.state,
            "instance_type": self.instance_type,
            "uptime_seconds": None if self.uptime_seconds is None else round(self.uptime_seconds),
            "busy": self.busy,
            "queue": {"visible": w.visible, "in_flight": w.in_flight, "delayed": w.delayed, "dlq": w.dlq},
            "jobs": {"pending": w.pending, "processing": w.processing, "count_cap": COUNT_CAP},
            # Times as gpuctl.times has them (epoch seconds + _iso), whatever format the tag holds.
            **stamp("hold_until", parse_time(self.tags.get(HOLD_UNTIL_TAG))),
            "hold_reason": self.tags.get(HOLD_REASON_TAG),
            **stamp("hold_effective_until", self.hold_effective_until),
            "hold_warning": self.hold_warning,
            **stamp("started_at", parse_time(self.tags.get(STARTED_AT_TAG))),
            **stamp("stopped_at", parse_time(self.tags.get(STOPPED_AT_TAG))),
            "stopped_reason": self.tags.get(STOPPED_REASON_TAG),
            "stopped_by": self.tags.get(STOPPED_BY_TAG),
        }


@dataclass(frozen=True)
class StateChange:
    """What a start or stop did: the state before, the state after (after waiting, with ``waited``)."""

    instance_id: str
    previous: str
    state: str
    waited: bool = False
    warning: str | None = None


def workload(gw: Gateways) -> Workload:
    """Queue counts and pending/processing GPU job counts (each capped at :data:`COUNT_CAP`).

    Only gpuctl's job types count: other services' tasks in the shared table are not the GPU's work (SPEC §11).
    """
    from gpuctl.models import JobStatus

    stats = gw.queue.stats()
    return Workload(
        visible=stats.visible, in_flight=stats.in_flight, delayed=stats.delayed, dlq=stats.dlq_visible,
        pending=gw.table.count_gpu_status(JobStatus.PENDING, cap=COUNT_CAP),
        processing=gw.table.count_gpu_status(JobStatus.PROCESSING, cap=COUNT_CAP),
    )


def instance_status(gw: Gateways, *, now: float | None = None) -> InstanceStatus:
    """The instance's state, type and uptime, with the workload that says whether it is busy, and the hold as
    the scheduler treats it (a warning when the hold tag is not a usable time).

    Raises:
        NotFound: the instance, queue or table does not exist.
    """
    from gpuctl.services.hold import judge_hold

    info = gw.instance.describe()
    at = time.time() if now is None else now
    raw = info.tags.get(HOLD_UNTIL_TAG)
    judged = judge_hold(raw, at)
    if judged.warning is not None:
        # Capped holds count from when the scheduler first saw the value: it records that in the marker.
        activity = gw.table.read_activity()
        if activity.hold_seen_value == raw and activity.hold_seen_at is not None:
            judged = judge_hold(raw, at, first_seen_at=activity.hold_seen_at)
    return InstanceStatus(info.instance_id, info.state, info.instance_type, info.uptime_seconds(),
                          workload(gw), info.tags, judged.until, judged.warning)


def _iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _tag(gw: Gateways, tags: dict[str, str]) -> str | None:
    """Record who changed the instance and why; a failure here must not undo the change itself."""
    try:
        gw.instance.set_tags(tags)
    except GpuctlError as exc:
        log.warning("instance.tag_failed", extra={"error": str(exc)})
        return f"the instance could not be tagged ({exc})"
    return None


def start_instance(gw: Gateways, *, wait: bool = False, timeout: float = 600.0) -> StateChange:
    """Start the GPU instance (a no-op when it is running); with ``wait``, until EC2 says running.

    The ``gpuctl:started-at`` tag tells the scheduler Lambda the instance was just started, so it is not
    stopped as idle before the idle window has passed.

    Raises:
        Conflict: the instance cannot start in its current state (e.g. still stopping).
        CapacityError: AWS has no capacity for the instance type right now.
        WaitTimeout: with ``wait``, it was not running within ``timeout`` seconds.
    """
    gateway = gw.instance
    previous, state = gateway.start()
    warning = None
    if previous not in ("running", "pending"):
        warning = _tag(gw, {STARTED_AT_TAG: _iso_now(), STARTED_REASON_TAG: "manual start",
                            STARTED_BY_TAG: _ACTOR})
    log.info("instance.start", extra={"instance_id": gateway.instance_id, "previous": previous})
    if wait and state != "running":
        gateway.wait("running", timeout=timeout)
        state = "running"
    return StateChange(gateway.instance_id, previous, state, waited=wait, warning=warning)


def stop_instance(gw: Gateways, *, force: bool = False, wait: bool = False,
                  timeout: float = 600.0) -> StateChange:
    """Stop the GPU instance, refusing while it has work unless ``force``.

    Raises:
        Conflict: jobs are processing or messages are queued or in flight (without ``force``).
        WaitTimeout: with ``wait``, it was not stopped within ``timeout`` seconds.
    """
    from gpuctl.errors import Conflict

    gateway = gw.instance
    if not force:
        work = workload(gw)
        if work.busy:
            current = gateway.describe().state
            if current in ("stopped", "stopping"):
                return StateChange(gateway.instance_id, current, current)
            raise Conflict(f"Refusing to stop {gateway.instance_id}: {work.describe()}. Wait for the work to "
                           "finish, or pass --force to stop it anyway (running jobs are then retried).")
    fence_warning = None
    if gateway.describe().state not in ("stopped", "stopping", "terminated", "shutting-down"):
        # Before StopInstances: a submit that sees this fence starts the instance instead of trusting the
        # adapter it saw polling a moment ago.
        try:
            gw.table.note_stop(by=_ACTOR)
        except GpuctlError as exc:
            log.warning("instance.stop_fence_failed", extra={"error": str(exc)})
            fence_warning = (f"the stop was not recorded in the activity marker ({exc}); a job submitted in the "
                             "next minute may wait for the scheduler to start the instance")
    previous, state = gateway.stop()
    if previous == "stopped":
        state = previous  # some endpoints answer "stopping" for an instance that was already stopped
    warning = None
    if previous not in ("stopped", "stopping"):
        reason = "manual stop (forced)" if force else "manual stop"
        warning = _tag(gw, {STOPPED_AT_TAG: _iso_now(), STOPPED_REASON_TAG: reason, STOPPED_BY_TAG: _ACTOR})
    warning = "; ".join(w for w in (fence_warning, warning) if w) or None
    log.info("instance.stop", extra={"instance_id": gateway.instance_id, "previous": previous, "force": force})
    if wait and state != "stopped":
        gateway.wait("stopped", timeout=timeout)
        state = "stopped"
    return StateChange(gateway.instance_id, previous, state, waited=wait, warning=warning)
