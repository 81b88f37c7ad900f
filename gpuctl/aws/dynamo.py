"""DynamoDB gateway for the job table (``task_store``)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gpuctl.aws._errors import error_code, translate
from gpuctl.errors import Conflict, NotFound
from gpuctl.models import GSI_STATUS_CREATED, JobRecord, JobStatus, allowed_sources

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

__all__ = ["JobAlreadyExists", "JobTable", "TransitionRefused"]

_BATCH_WRITE_MAX = 25


class JobAlreadyExists(Conflict):
    """A record with this task_id exists already."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"Job {task_id} already exists.")
        self.task_id = task_id


class TransitionRefused(Conflict):
    """A conditional status change found the job in another state."""

    def __init__(self, task_id: str, target: JobStatus, current: JobRecord | None) -> None:
        state = current.status.value if current else "missing"
        super().__init__(f"Job {task_id} is {state}; it cannot move to {target.value}.")
        self.task_id = task_id
        self.current = current


class JobTable:
    """Typed access to the job table: conditional creates and transitions, GSI queries."""

    def __init__(self, client: DynamoDBClient, table_name: str) -> None:
        from boto3.dynamodb.types import TypeDeserializer, TypeSerializer

        self._client = client
        self.table_name = table_name
        self._ser = TypeSerializer()
        self._de = TypeDeserializer()

    # --- codec ---------------------------------------------------------------------------------
    def _encode(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return {k: self._ser.serialize(v) for k, v in values.items()}

    def _decode(self, item: Mapping[str, Any]) -> JobRecord:
        return JobRecord.from_item({k: self._de.deserialize(v) for k, v in item.items()})

    def _what(self) -> str:
        return f"the DynamoDB table {self.table_name}"

    # --- writes --------------------------------------------------------------------------------
    def create(self, record: JobRecord) -> None:
        """Write a new job; never overwrite one.

        Raises:
            JobAlreadyExists: a record with this task_id exists.
        """
        import botocore.exceptions

        try:
            self._client.put_item(
                TableName=self.table_name,
                Item=self._encode(record.to_item()),
                ConditionExpression="attribute_not_exists(task_id)",
            )
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                raise JobAlreadyExists(record.task_id) from None
            raise translate(exc, self._what()) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise translate(exc, self._what()) from exc

    def batch_create(self, records: Sequence[JobRecord]) -> list[str]:
        """Write many new jobs with BatchWriteItem (25 a request); return the task_ids not written.

        UnprocessedItems are retried with a short backoff a bounded number of times. BatchWriteItem
        has no conditions, so callers pass fresh uuid4 task_ids only.
        """
        import botocore.exceptions

        unwritten: list[str] = []
        for start in range(0, len(records), _BATCH_WRITE_MAX):
            chunk = records[start : start + _BATCH_WRITE_MAX]
            pending: list[dict[str, Any]] = [
                {"PutRequest": {"Item": self._encode(r.to_item())}} for r in chunk
            ]
            for attempt in range(5):
                try:
                    response = self._client.batch_write_item(
                        RequestItems={self.table_name: pending}  # type: ignore[dict-item]
                    )
                except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
                    if start == 0 and attempt == 0:
                        raise translate(exc, self._what()) from exc
                    break
                pending = [dict(r) for r in response.get("UnprocessedItems", {}).get(self.table_name, [])]
                if not pending:
                    break
                time.sleep(min(0.05 * 2**attempt, 1.0))
            for request in pending:
                unwritten.append(request["PutRequest"]["Item"]["task_id"]["S"])
        return unwritten

    def transition(
        self,
        task_id: str,
        target: JobStatus,
        *,
        fields: Mapping[str, Any] | None = None,
        remove: Iterable[str] = (),
        expected: Iterable[JobStatus] | None = None,
        condition: str | None = None,
        condition_values: Mapping[str, Any] | None = None,
    ) -> JobRecord:
        """Move a job to ``target`` only from an allowed status; set ``fields`` in the same write.

        Args:
            expected: the statuses it may move from (default: every status allowed to reach target).
            condition: an extra condition expression ANDed to the status check.

        Raises:
            TransitionRefused: the job is not in an expected status (carries the current record).
            NotFound: there is no such job.
        """
        sources = sorted(s.value for s in (expected if expected is not None else allowed_sources(target)))
        values: dict[str, Any] = {":now": _now()}
        names = {"#s": "status"}
        status_names = []
        for i, source in enumerate(sources):
            values[f":src{i}"] = source
            status_names.append(f":src{i}")
        cond = f"attribute_exists(task_id) AND #s IN ({', '.join(status_names)})"
        if condition:
            cond = f"{cond} AND ({condition})"
            values.update(condition_values or {})
        return self._update(task_id, {"status": target.value, **(fields or {})}, remove, cond, values,
                            names, target=target)

    def update_fields(
        self,
        task_id: str,
        fields: Mapping[str, Any],
        *,
        only_if: Iterable[JobStatus] | None = None,
        remove: Iterable[str] = (),
    ) -> JobRecord:
        """Set attributes of an existing job (heartbeat, progress, cancel request…) without a status change.

        Raises:
            TransitionRefused: ``only_if`` was given and the job is in another status.
            NotFound: there is no such job.
        """
        values: dict[str, Any] = {":now": _now()}
        names: dict[str, str] = {}
        cond = "attribute_exists(task_id)"
        if only_if is not None:
            names["#s"] = "status"
            statuses = sorted(s.value for s in only_if)
            for i, status in enumerate(statuses):
                values[f":only{i}"] = status
            cond += f" AND #s IN ({', '.join(f':only{i}' for i in range(len(statuses)))})"
        return self._update(task_id, dict(fields), remove, cond, values, names, target=None)

    def _update(
        self,
        task_id: str,
        fields: dict[str, Any],
        remove: Iterable[str],
        condition: str,
        values: dict[str, Any],
        names: dict[str, str],
        *,
        target: JobStatus | None,
    ) -> JobRecord:
        import botocore.exceptions

        sets = ["#updated_at = :now"]
        names["#updated_at"] = "updated_at"
        for i, (key, value) in enumerate(fields.items()):
            if key == "updated_at":
                continue
            names[f"#f{i}"] = key
            values[f":f{i}"] = value
            sets.append(f"#f{i} = :f{i}")
        expression = "SET " + ", ".join(sets)
        removed = list(remove)
        if removed:
            for i, key in enumerate(removed):
                names[f"#r{i}"] = key
            expression += " REMOVE " + ", ".join(f"#r{i}" for i in range(len(removed)))
        from gpuctl.models import to_dynamo_value

        try:
            response = self._client.update_item(
                TableName=self.table_name,
                Key={"task_id": {"S": task_id}},
                UpdateExpression=expression,
                ConditionExpression=condition,
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=self._encode({k: to_dynamo_value(v) for k, v in values.items()}),
                ReturnValues="ALL_NEW",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                old: Any = exc.response.get("Item")
                if not old:
                    raise NotFound(f"Job {task_id} does not exist.") from None
                current = self._decode(old)
                raise TransitionRefused(task_id, target or current.status, current) from None
            raise translate(exc, self._what()) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise translate(exc, self._what()) from exc
        return self._decode(response["Attributes"])

    # --- reads ---------------------------------------------------------------------------------
    def get(self, task_id: str) -> JobRecord:
        """The job, read consistently.

        Raises:
            NotFound: there is no such job.
        """
        import botocore.exceptions

        try:
            response = self._client.get_item(
                TableName=self.table_name, Key={"task_id": {"S": task_id}}, ConsistentRead=True
            )
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise translate(exc, self._what()) from exc
        item = response.get("Item")
        if not item:
            raise NotFound(f"Job {task_id} does not exist.")
        return self._decode(item)

    def _pages(self, query: dict[str, Any], *, limit: int | None) -> Iterator[dict[str, Any]]:
        """Query pages on the status index, asking for no more than ``limit`` items in all."""
        import botocore.exceptions

        start_key: dict[str, Any] | None = None
        remaining = limit
        while remaining is None or remaining > 0:
            kwargs = {"TableName": self.table_name, "IndexName": GSI_STATUS_CREATED, **query}
            if remaining is not None:
                kwargs["Limit"] = remaining
            if start_key:
                kwargs["ExclusiveStartKey"] = start_key
            try:
                page: dict[str, Any] = dict(self._client.query(**kwargs))
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
                raise translate(exc, self._what()) from exc
            yield page
            if remaining is not None:
                remaining -= int(page.get("Count", 0))
            start_key = page.get("LastEvaluatedKey")
            if not start_key:
                return

    @staticmethod
    def _status_key(status: JobStatus, since: float | None = None) -> dict[str, Any]:
        values: dict[str, Any] = {":s": {"S": status.value}}
        key = "#s = :s"
        if since is not None:
            key += " AND created_at >= :since"
            values[":since"] = {"N": _num(since)}
        return {"KeyConditionExpression": key, "ExpressionAttributeNames": {"#s": "status"},
                "ExpressionAttributeValues": values}

    def query_status(
        self,
        status: JobStatus,
        *,
        since: float | None = None,
        limit: int | None = None,
        newest_first: bool = True,
    ) -> Iterator[JobRecord]:
        """Jobs in ``status`` from the GSI, newest first, reading no more items than ``limit``."""
        query = {**self._status_key(status, since), "ScanIndexForward": not newest_first}
        for page in self._pages(query, limit=limit):
            for item in page.get("Items", []):
                yield self._decode(item)

    def count_status(self, status: JobStatus, *, cap: int | None = None) -> int:
        """How many jobs are in ``status`` (stops counting at ``cap`` when given)."""
        query = {**self._status_key(status), "Select": "COUNT"}
        return sum(int(page.get("Count", 0)) for page in self._pages(query, limit=cap))


def _now() -> float:
    return round(time.time(), 3)


def _num(value: float) -> str:
    return format(value, "f").rstrip("0").rstrip(".") if isinstance(value, float) else str(value)
