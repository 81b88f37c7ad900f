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


#: An instance whose last change before the window is one of these took no part in it.
_GONE = frozenset({"terminated"})


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

    def group_transitions(self, group: str, *, since: float, until: float) -> dict[str, list[Transition]]:
        """Fleet mode: each of the group's instances' changes in [since, until], oldest first, preceded by its
        last one before ``since`` (as :meth:`transitions`). The items carry their group, not a key on it: a
        Scan (the table holds a few items per start and stop, kept HISTORY_TTL_DAYS)."""
        import botocore.exceptions

        found: dict[str, list[tuple[float, Transition]]] = {}
        try:
            for page in self._client.get_paginator("scan").paginate(
                    TableName=self.table_name, FilterExpression="#g = :g AND event_at <= :u",
                    ExpressionAttributeNames={"#g": "group"},
                    ExpressionAttributeValues={":g": {"S": group}, ":u": {"N": repr(until)}}):
                for item in page.get("Items", []):
                    # The key ``at`` orders (its fraction ranks the states of one second).
                    found.setdefault(str(item["instance_id"]["S"]), []).append((float(item["at"]["N"]),
                                                                                 _transition(item)))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise translate(exc, f"the instance history table {self.table_name}") from exc
        result: dict[str, list[Transition]] = {}
        for instance_id, keyed in sorted(found.items()):
            changes = [change for _key, change in sorted(keyed, key=lambda pair: pair[0])]
            before = [c for c in changes if c.at < since]
            inside = [c for c in changes if c.at >= since]
            if inside or (before and before[-1].state not in _GONE):
                result[instance_id] = [*before[-1:], *inside]
        return result
