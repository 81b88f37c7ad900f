"""DynamoDB gateway for the instance history table: the GPU instance's recorded state changes (lambda/history.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpuctl.aws._errors import translate

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

__all__ = ["InstanceHistory", "Transition"]


@dataclass(frozen=True)
class Transition:
    """One recorded state change: when (epoch seconds), the new state, and who or what caused it."""

    instance_id: str
    at: float
    state: str
    cause: str = "other"
    by: str | None = None
    reason: str | None = None
    instance_type: str | None = None


def _transition(item: dict[str, Any]) -> Transition:
    def text(name: str) -> str | None:
        value = item.get(name, {}).get("S")
        return str(value) if value else None

    # ``at`` carries a state rank in its fraction (ordering only); ``event_at`` is the time itself.
    at = float(item.get("event_at", item["at"])["N"])
    return Transition(instance_id=str(item["instance_id"]["S"]), at=at,
                      state=str(item.get("state", {}).get("S", "unknown")), cause=text("cause") or "other",
                      by=text("by"), reason=text("reason"), instance_type=text("instance_type"))


class InstanceHistory:
    """Reads the history table (written only by the scheduler Lambda and local mode's scheduler loop)."""

    def __init__(self, client: DynamoDBClient, table_name: str) -> None:
        self._client = client
        self.table_name = table_name

    def _query(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
        import botocore.exceptions

        start: dict[str, Any] | None = None
        while True:
            args = {"TableName": self.table_name, **kwargs}
            if start:
                args["ExclusiveStartKey"] = start
            try:
                page = self._client.query(**args)
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
                raise translate(exc, f"the instance history table {self.table_name}") from exc
            yield from page.get("Items", [])
            start = page.get("LastEvaluatedKey")
            if not start or "Limit" in kwargs:
                return

    def transitions(self, instance_id: str, *, since: float, until: float) -> list[Transition]:
        """The changes recorded in [since, until], oldest first, preceded by the last one before ``since``
        (the state the instance was in when the window opened), when there is one."""
        key = {":i": {"S": instance_id}}
        before = list(self._query(KeyConditionExpression="instance_id = :i AND #a < :s",
                                  ExpressionAttributeNames={"#a": "at"},
                                  ExpressionAttributeValues={**key, ":s": {"N": repr(since)}},
                                  ScanIndexForward=False, Limit=1))
        inside = self._query(KeyConditionExpression="instance_id = :i AND #a BETWEEN :s AND :u",
                             ExpressionAttributeNames={"#a": "at"},
                             ExpressionAttributeValues={**key, ":s": {"N": repr(since)}, ":u": {"N": repr(until)}})
        return [_transition(i) for i in [*before[:1], *inside]]
