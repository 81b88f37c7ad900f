"""The adapter in fleet mode (setting ``fleet_group``): its own instance's scale-in protection and drain.

* Its instance id: the ``instance_id`` setting (``GPUCTL_INSTANCE_ID``; tests and non-EC2 hosts), else the
  instance metadata service (IMDSv2, as the stack's launch template requires). Without one the adapter refuses
  to start in fleet mode: it could neither protect its work nor be drained. The id is recorded on every job it
  claims (``instance_id``; ``gpuctl jobs list`` / ``status`` show it).
* Scale-in protection: set on its own instance while it holds work, cleared when it holds none (from the
  heartbeat thread, within a tick of the change; a failed call is retried on the next tick). Auto Scaling never
  picks a protected instance for scale-in, and the scheduler never sizes the group below the protected count.
* Drain: every ``activity_interval`` it reads its own lifecycle state (DescribeAutoScalingInstances). In
  ``Terminating:Wait`` (the stack's ``gpuctl-drain`` scale-in hook) it takes the SIGTERM path: stop receiving,
  let the jobs in hand finish within ``shutdown_grace``, hand back the rest; then it completes the lifecycle action
  (CONTINUE) and exits, and the instance goes back to the warm pool (stopped). While it drains it records a
  lifecycle heartbeat so a long job is not cut off by the hook's timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from gpuctl.errors import ConfigError, GpuctlError

if TYPE_CHECKING:
    from adapter.settings import AdapterSettings
    from gpuctl.aws.autoscaling import FleetGroup

__all__ = ["DRAIN_STATES", "FleetMember", "instance_id_from_imds", "start_member"]

log = logging.getLogger(__name__)

#: Lifecycle states in which the instance is being taken out of service and must drain.
DRAIN_STATES = frozenset({"Terminating:Wait"})
IMDS = "http://169.254.169.254/latest"
#: A lifecycle heartbeat at most this often while draining (the hook's timeout is an hour).
_LIFECYCLE_HEARTBEAT = 300.0
#: The longest wait between two attempts of a failing SetInstanceProtection.
_PROTECT_BACKOFF_MAX = 30.0


def instance_id_from_imds(base: str = IMDS, timeout: float = 2.0) -> str | None:
    """This EC2 instance's id from IMDSv2 (a session token, then the id); None off EC2 or when it does not answer."""
    import httpx

    try:
        with httpx.Client(timeout=timeout) as client:
            token = client.put(f"{base}/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
            token.raise_for_status()
            answer = client.get(f"{base}/meta-data/instance-id", headers={"X-aws-ec2-metadata-token": token.text})
            answer.raise_for_status()
    except httpx.HTTPError:
        return None
    value = answer.text.strip()
    return value if value.startswith("i-") else None


class FleetMember:
    """One adapter's part in the fleet: see the module docstring. ``tick`` runs on the heartbeat thread."""

    def __init__(self, settings: AdapterSettings, group: FleetGroup, instance_id: str, stop: threading.Event) -> None:
        self._settings = settings
        self._group = group
        self.instance_id = instance_id
        self._stop = stop
        self._protected: bool | None = None  # unknown at start: the first tick sets it either way
        #: After a failed protection call: not again before this (monotonic), unless the wanted state changes.
        self.protect_retry_at = 0.0
        self._protect_backoff = 0.0
        self._protect_failed: bool | None = None
        self._next_check = time.monotonic()
        self._next_lifecycle_beat = 0.0
        self.draining = False

    def tick(self, in_hand: int) -> None:
        """Keep protection equal to "holds work", and notice a scale-in of this instance."""
        want = in_hand > 0
        now = time.monotonic()
        if want != self._protected and (want != self._protect_failed or now >= self.protect_retry_at):
            try:
                self._group.protect(self.instance_id, want)
            except GpuctlError as exc:
                # Backed off (1 s doubling to 30 s), not retried every heartbeat tick against a throttled API.
                self._protect_backoff = min(_PROTECT_BACKOFF_MAX, max(1.0, self._protect_backoff * 2))
                self._protect_failed, self.protect_retry_at = want, now + self._protect_backoff
                log.warning("adapter.fleet_protection_failed", extra={
                    "protect": want, "error": str(exc), "retry_in_seconds": self._protect_backoff})
            else:
                self._protected, self._protect_failed, self._protect_backoff = want, None, 0.0
                log.info("adapter.fleet_protection", extra={"instance_id": self.instance_id, "protected": want})
        if self.draining:
            if in_hand and now >= self._next_lifecycle_beat:
                self._next_lifecycle_beat = now + _LIFECYCLE_HEARTBEAT
                try:
                    self._group.heartbeat_lifecycle(self.instance_id)
                except GpuctlError as exc:
                    log.warning("adapter.fleet_lifecycle_heartbeat_failed", extra={"error": str(exc)})
            return
        if now < self._next_check:
            return
        self._next_check = now + self._settings.activity_interval
        try:
            state = self._group.lifecycle_state(self.instance_id)
        except GpuctlError as exc:
            log.warning("adapter.fleet_state_unknown", extra={"error": str(exc)})
            return
        if state in DRAIN_STATES:
            self.draining = True
            log.info("adapter.fleet_draining", extra={"instance_id": self.instance_id, "lifecycle_state": state,
                                                      "jobs": in_hand})
            self._stop.set()  # the SIGTERM path: no new work, the jobs in hand finish or are handed back

    def scaled_in_already(self) -> bool:
        """At start: is this instance already being scaled in (the adapter restarted during a drain)? Then it
        takes no work: protection is cleared and the lifecycle action completed, and the caller exits. A state
        that cannot be read is not a scale-in (the heartbeat's ticks look again)."""
        try:
            state = self._group.lifecycle_state(self.instance_id)
        except GpuctlError as exc:
            log.warning("adapter.fleet_state_unknown", extra={"error": str(exc)})
            return False
        if state not in DRAIN_STATES:
            return False
        log.info("adapter.fleet_scaled_in_at_start", extra={"instance_id": self.instance_id,
                                                            "lifecycle_state": state})
        self.draining = True
        self.after_drain()
        return True

    def after_drain(self) -> None:
        """After the loop drained: clear protection, and let Auto Scaling continue a scale-in that waited for us."""
        if self._protected is not False:
            try:
                self._group.protect(self.instance_id, False)
                self._protected = False
            except GpuctlError as exc:
                log.warning("adapter.fleet_protection_failed", extra={"protect": False, "error": str(exc)})
        if not self.draining:
            return
        try:
            self._group.complete_lifecycle(self.instance_id)
        except GpuctlError as exc:
            # The hook's timeout then continues it (DefaultResult CONTINUE): the instance still goes, later.
            log.error("adapter.fleet_complete_failed", extra={"error": str(exc)})
            return
        log.info("adapter.fleet_drained", extra={"instance_id": self.instance_id})


def start_member(settings: AdapterSettings, stop: threading.Event) -> FleetMember | None:
    """The fleet member for these settings (None in single-instance mode); fills ``settings.instance_id``.

    Raises:
        ConfigError: fleet mode and no instance id (no setting, no instance metadata service).
    """
    if not settings.fleet_group:
        return None
    from gpuctl.aws._session import make_clients
    from gpuctl.aws.autoscaling import FleetGroup

    instance_id = settings.instance_id or instance_id_from_imds(IMDS)
    if not instance_id:
        raise ConfigError(f"Fleet mode (fleet_group {settings.fleet_group}) needs this instance's id: set "
                          "GPUCTL_INSTANCE_ID, or run on EC2 with the instance metadata service on.")
    settings.instance_id = instance_id
    group = FleetGroup(make_clients(settings).client("autoscaling"), settings.fleet_group)
    log.info("adapter.fleet_member", extra={"group": settings.fleet_group, "instance_id": instance_id})
    return FleetMember(settings, group, instance_id, stop)
