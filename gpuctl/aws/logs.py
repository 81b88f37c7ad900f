"""CloudWatch Logs gateway: the scheduler's decision records in its log group."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpuctl.aws._errors import translate

if TYPE_CHECKING:
    from mypy_boto3_logs import CloudWatchLogsClient

__all__ = ["DECISION_EVENT", "DecisionLog", "LoggedDecision", "parse_decision"]

#: The ``event`` field of the one JSON record the scheduler logs per run (lambda/handler.py run_once).
DECISION_EVENT = "scheduler.decision"


@dataclass(frozen=True)
class LoggedDecision:
    """One decision record as found in the log group, with when it was logged."""

    logged_at: float  # epoch seconds
    stream: str
    record: dict[str, Any]


def parse_decision(message: str) -> dict[str, Any] | None:
    """The decision record in a log line, or None.

    The Lambda runtime wraps what the handler logs: ``[INFO]\\t<time>\\t<request id>\\t{...}`` in its Text log
    format, ``{"message": "{...}", ...}`` in its JSON format; local mode writes the bare record.
    """
    text = message.strip()
    for candidate in (text, text[text.find("{"):] if "{" in text else ""):
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict) and value.get("event") == DECISION_EVENT:
            return value
        if isinstance(value, dict) and isinstance(value.get("message"), str):
            return parse_decision(value["message"])
    return None


class DecisionLog:
    """Typed access to the scheduler's log group (FilterLogEvents, newest pages read until ``limit``)."""

    def __init__(self, client: CloudWatchLogsClient, group: str) -> None:
        self._client = client
        self.group = group

    def decisions(self, *, since: float, until: float | None = None, limit: int = 1000) -> Iterator[LoggedDecision]:
        """Decision records logged at or after ``since`` (epoch seconds), oldest first, at most ``limit``.

        Raises:
            NotFound: the log group does not exist (the stack was never deployed, or under another prefix).
            AwsError: access denied or another failure.
        """
        import botocore.exceptions

        kwargs: dict[str, Any] = {"logGroupName": self.group, "startTime": int(since * 1000),
                                  "filterPattern": f'"{DECISION_EVENT}"'}
        if until is not None:
            kwargs["endTime"] = int(until * 1000)
        found = 0
        while True:
            try:
                page = self._client.filter_log_events(**kwargs)
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
                raise translate(exc, f"the log group {self.group}") from exc
            for event in page.get("events", []):
                record = parse_decision(str(event.get("message", "")))
                if record is None:
                    continue
                yield LoggedDecision(float(event.get("timestamp", 0)) / 1000, str(event.get("logStreamName", "")),
                                     record)
                found += 1
                if found >= limit:
                    return
            token = page.get("nextToken")
            if not token:
                return
            kwargs["nextToken"] = token
