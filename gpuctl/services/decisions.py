"""The scheduler's recent decisions, for people: what it did, why, and the facts it saw."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpuctl.errors import ConfigError

if TYPE_CHECKING:
    from gpuctl.aws.logs import LoggedDecision
    from gpuctl.services.context import Gateways

__all__ = ["Decision", "recent_decisions", "scheduler_log_group"]


@dataclass(frozen=True)
class Decision:
    """One scheduler run: its decision record (as the Lambda logged it) and when it was logged."""

    logged: LoggedDecision

    @property
    def record(self) -> dict[str, Any]:
        return self.logged.record

    @property
    def decided_at(self) -> float:
        value = self.record.get("decided_at")
        return float(value) if isinstance(value, int | float) else self.logged.logged_at

    def document(self) -> dict[str, Any]:
        """The record as logged, plus when the log received it (JSON: epoch seconds and ``_iso``)."""
        from gpuctl.times import stamp

        return {**self.record, **stamp("decided_at", self.decided_at), **stamp("logged_at", self.logged.logged_at),
                "log_stream": self.logged.stream}


def scheduler_log_group(gw: Gateways) -> str:
    """The scheduler's log group: the ``scheduler_log_group`` setting, else the stack's LogGroupName output.

    Raises:
        ConfigError: neither is there.
    """
    settings = gw.settings
    if settings.scheduler_log_group:
        return settings.scheduler_log_group
    from gpuctl.aws.cfn import Stacks

    info = Stacks(gw.clients.cloudformation).describe(settings.stack_name)
    if info is not None and info.outputs.get("LogGroupName"):
        return info.outputs["LogGroupName"]
    raise ConfigError(
        "No scheduler log group is configured: set GPUCTL_SCHEDULER_LOG_GROUP, or run `gpuctl config set "
        f"scheduler_log_group /aws/lambda/gpuctl-gpu-scheduler`, or `gpuctl deploy` (the stack {settings.stack_name} "
        "records it)."
    )


def recent_decisions(gw: Gateways, *, since_seconds: float, limit: int = 50,
                     now: float | None = None) -> list[Decision]:
    """The scheduler's decisions of the last ``since_seconds``, the newest ``limit`` of them, oldest first.

    Raises:
        ConfigError: no log group is known.
        NotFound: the log group does not exist.
        AwsError: the logs could not be read.
    """
    from gpuctl.aws.logs import DecisionLog

    group = scheduler_log_group(gw)
    at = time.time() if now is None else now
    log = DecisionLog(gw.clients.client("logs"), group)
    found = [Decision(d) for d in log.decisions(since=at - since_seconds, limit=100_000)]
    found.sort(key=lambda d: d.decided_at)
    return found[-limit:] if limit else found
