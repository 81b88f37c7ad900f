"""DynamoDB gateway for the job table (``task_store``)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpuctl.aws._errors import error_code, translate
from gpuctl.errors import Conflict, NotFound
from gpuctl.models import ACTIVITY_TASK_ID, GSI_STATUS_CREATED, JobRecord, JobStatus, allowed_sources

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

__all__ = ["ADAPTER_FRESH_SECONDS", "Activity", "JobAlreadyExists", "JobTable", "TableInfo", "TransitionRefused"]

_BATCH_WRITE_MAX = 25
#: An adapter that wrote the marker this recently (and no stop was decided since) is polling: its instance runs.
ADAPTER_FRESH_SECONDS = 60.0


@dataclass(frozen=True)
class Activity:
    """The activity marker: one item of the job table (``task_id`` = ``gpuctl#activity``, no ``status``, so it
    is in no status-index query) that says when the GPU last had work, without sampling the jobs.

    Who writes what (each with a write it makes anyway, or one small UpdateItem):

    * ``last_submit_at``: every submit (CLI, HTTP API) after its message is queued (``gpuctl serve``: one write
      for the messages queued since its last one, :mod:`gpuctl.services.notes`). Work arriving is activity.
    * ``last_finished_at``: the adapter, when it finishes a job (coalesced with its liveness write).
    * ``adapter_seen_at`` / ``adapter_state`` (``running`` | ``draining`` | ``stopped``) / ``adapter_worker`` /
      ``jobs_in_hand``: the adapter, while it polls (at most every few seconds) and when it stops.
    * ``stop_fence_at``: whoever is about to stop the instance (the scheduler, ``gpuctl instance stop``), before
      StopInstances. The scheduler writes it only if ``last_submit_at`` is unchanged since it read the facts,
      so a submit that raced its decision cancels the stop.

    Readers: the scheduler (last activity = the newest of the two ``last_*`` and the last start) and submit,
    which skips EC2 altogether while :meth:`adapter_fresh` says an adapter is polling.
    """

    last_submit_at: float | None = None
    last_finished_at: float | None = None
    adapter_seen_at: float | None = None
    adapter_state: str | None = None
    adapter_worker: str | None = None
    jobs_in_hand: int | None = None
    stop_fence_at: float | None = None
    #: The scheduler's record of when it first saw the current ``gpuctl:hold-until`` value: a malformed or
    #: over-long hold is capped at the maximum from then (see lambda/decide.py resolve_hold).
    hold_seen_value: str | None = None
    hold_seen_at: float | None = None

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> Activity:
        def num(name: str) -> float | None:
            value = item.get(name)
            try:
                return None if value is None or isinstance(value, bool) else float(value)
            except (TypeError, ValueError):
                return None

        def text(name: str) -> str | None:
            value = item.get(name)
            return value if isinstance(value, str) else None

        in_hand = num("jobs_in_hand")
        return cls(num("last_submit_at"), num("last_finished_at"), num("adapter_seen_at"), text("adapter_state"),
                   text("adapter_worker"), None if in_hand is None else int(in_hand), num("stop_fence_at"),
                   hold_seen_value=text("hold_seen_value"), hold_seen_at=num("hold_seen_at"))

    def adapter_fresh(self, now: float, within: float = ADAPTER_FRESH_SECONDS) -> bool:
        """An adapter reported itself polling within ``within`` s and no stop was decided since."""
        if self.adapter_state != "running" or self.adapter_seen_at is None:
            return False
        if self.stop_fence_at is not None and self.stop_fence_at >= self.adapter_seen_at:
            return False
        return 0 <= now - self.adapter_seen_at <= within

    @property
    def last_activity_at(self) -> float | None:
        times = [t for t in (self.last_submit_at, self.last_finished_at) if t is not None]
        return max(times) if times else None


@dataclass(frozen=True)
class TableInfo:
    """What deploy and destroy need to know about a table (DescribeTable)."""

    name: str
    status: str
    item_count: int | None  # DynamoDB's approximate count (refreshed about every six hours)
    deletion_protection: bool
    indexes: dict[str, list[tuple[str, str]]]  # index name -> [(attribute, HASH|RANGE)]

    def has_status_index(self) -> bool:
        return self.indexes.get(GSI_STATUS_CREATED) == [("status", "HASH"), ("created_at", "RANGE")]


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
        add: Mapping[str, int] | None = None,
    ) -> JobRecord:
        """Move a job to ``target`` only from an allowed status; set ``fields`` in the same write.

        Args:
            expected: the statuses it may move from (default: every status allowed to reach target).
            condition: an extra condition expression ANDed to the status check.
            add: counters to change by the given amount in the same write (a missing one counts from 0),
                so a claim needs no read before it.

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
                            names, target=target, add=add)

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
        add: Mapping[str, int] | None = None,
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
        if add:
            values[":zero"] = 0
            for i, (key, amount) in enumerate(add.items()):
                names[f"#n{i}"] = key
                values[f":n{i}"] = amount
                sets.append(f"#n{i} = if_not_exists(#n{i}, :zero) + :n{i}")
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

    # --- the activity marker -------------------------------------------------------------------
    def _marker_update(self, sets: Mapping[str, Any], *, returning: bool) -> dict[str, Any]:
        import botocore.exceptions

        from gpuctl.models import to_dynamo_value

        names = {f"#a{i}": key for i, key in enumerate(sets)}
        values = self._encode({f":a{i}": to_dynamo_value(v) for i, v in enumerate(sets.values())})
        try:
            response = self._client.update_item(
                TableName=self.table_name,
                Key={"task_id": {"S": ACTIVITY_TASK_ID}},
                UpdateExpression="SET " + ", ".join(f"#a{i} = :a{i}" for i in range(len(sets))),
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
                ReturnValues="ALL_NEW" if returning else "NONE",
            )
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise translate(exc, self._what()) from exc
        return {k: self._de.deserialize(v) for k, v in response.get("Attributes", {}).items()}

    def note_submit(self, now: float | None = None) -> Activity:
        """Record that work arrived (after its message is queued); return the marker as it is now.

        One UpdateItem that both records the arrival and reads whether an adapter is polling.
        """
        return Activity.from_item(self._marker_update({"last_submit_at": now or _now()}, returning=True))

    def note_adapter(self, worker: str, *, state: str, jobs_in_hand: int, now: float | None = None,
                     finished_at: float | None = None) -> None:
        """Record that an adapter is alive (``running``), draining or stopped, and its latest finished job."""
        sets: dict[str, Any] = {"adapter_seen_at": now or _now(), "adapter_state": state,
                                "adapter_worker": worker, "jobs_in_hand": jobs_in_hand}
        if finished_at is not None:
            sets["last_finished_at"] = finished_at
        self._marker_update(sets, returning=False)

    def note_stop(self, now: float | None = None, *, by: str | None = None) -> None:
        """Record that the instance is being stopped (before StopInstances), so submits start it again."""
        sets: dict[str, Any] = {"stop_fence_at": now or _now()}
        if by:
            sets["stop_fence_by"] = by
        self._marker_update(sets, returning=False)

    def read_activity(self) -> Activity:
        """The marker, read consistently (all None when nothing has written it yet)."""
        import botocore.exceptions

        try:
            response = self._client.get_item(TableName=self.table_name,
                                              Key={"task_id": {"S": ACTIVITY_TASK_ID}}, ConsistentRead=True)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise translate(exc, self._what()) from exc
        item = {k: self._de.deserialize(v) for k, v in response.get("Item", {}).items()}
        return Activity.from_item(item)

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

    def query_page(
        self,
        status: JobStatus,
        *,
        limit: int,
        since: float | None = None,
        after: tuple[str, str] | None = None,
    ) -> tuple[list[tuple[JobRecord, tuple[str, str]]], bool]:
        """One Query of at most ``limit`` jobs in ``status``, newest first, after the job whose position is
        ``after`` = ``(task_id, created_at as stored)``; returns each job with its position, and whether the index
        may hold more. Positions keep ``created_at`` as DynamoDB returned it, so a page starts exactly after it."""
        import botocore.exceptions

        kwargs: dict[str, Any] = {"TableName": self.table_name, "IndexName": GSI_STATUS_CREATED,
                                  **self._status_key(status, since), "ScanIndexForward": False, "Limit": limit}
        if after is not None:
            kwargs["ExclusiveStartKey"] = {"task_id": {"S": after[0]}, "status": {"S": status.value},
                                           "created_at": {"N": after[1]}}
        try:
            page: dict[str, Any] = dict(self._client.query(**kwargs))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise translate(exc, self._what()) from exc
        jobs = [(self._decode(item), (item["task_id"]["S"], item["created_at"]["N"])) for item in page.get("Items", [])]
        return jobs, bool(page.get("LastEvaluatedKey"))

    def count_status(self, status: JobStatus, *, cap: int | None = None) -> int:
        """How many jobs are in ``status`` (stops counting at ``cap`` when given)."""
        query = {**self._status_key(status), "Select": "COUNT"}
        return sum(int(page.get("Count", 0)) for page in self._pages(query, limit=cap))

    def count_gpu_status(self, status: JobStatus, *, cap: int | None = None,
                         job_types: Iterable[str] | None = None) -> int:
        """How many GPU jobs (``job_type`` one of ``job_types``, default gpuctl's) are in ``status``.

        Other services share the table (SPEC §11); their rows are filtered out by DynamoDB, so they are read
        but never counted. Counting stops at ``cap`` matching jobs.
        """
        from gpuctl.models import GPU_API_PATHS

        types = sorted(set(job_types if job_types is not None else GPU_API_PATHS))
        spelled = types + [t + "/" for t in types]  # the running system's trailing-slash spelling too
        key = self._status_key(status)
        values = {**key["ExpressionAttributeValues"], **{f":jt{i}": {"S": t} for i, t in enumerate(spelled)}}
        names = ", ".join(f":jt{i}" for i in range(len(spelled)))
        query = {**key, "Select": "COUNT", "FilterExpression": f"#jt IN ({names})",
                 "ExpressionAttributeNames": {**key["ExpressionAttributeNames"], "#jt": "job_type"},
                 "ExpressionAttributeValues": values}
        total = 0
        for page in self._pages(query, limit=None):
            total += int(page.get("Count", 0))
            if cap is not None and total >= cap:
                return cap
        return total

    # --- the table itself (deploy beside the running system, destroy --delete-data) ------------------
    def describe(self) -> TableInfo:
        """The table's status, approximate item count, deletion protection and indexes.

        Raises:
            NotFound: there is no such table.
        """
        import botocore.exceptions

        try:
            table: Any = self._client.describe_table(TableName=self.table_name)["Table"]
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise translate(exc, self._what()) from exc
        indexes = {str(i["IndexName"]): [(str(k["AttributeName"]), str(k["KeyType"])) for k in i["KeySchema"]]
                   for i in table.get("GlobalSecondaryIndexes", [])}
        count = table.get("ItemCount")
        return TableInfo(self.table_name, str(table.get("TableStatus", "")), None if count is None else int(count),
                         bool(table.get("DeletionProtectionEnabled", False)), indexes)

    def ttl(self) -> tuple[str | None, str]:
        """The TTL attribute and its status (``ENABLED``, ``DISABLED``, …)."""
        import botocore.exceptions

        try:
            answer: Any = self._client.describe_time_to_live(TableName=self.table_name)["TimeToLiveDescription"]
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise translate(exc, self._what()) from exc
        return answer.get("AttributeName"), str(answer.get("TimeToLiveStatus", "DISABLED"))

    def count_items(self, *, max_pages: int = 20) -> tuple[int, bool]:
        """Count every item with a Scan (Select COUNT); return (count, exact). Stops after ``max_pages`` pages
        (1 MB each), when the count is a lower bound (``exact`` False)."""
        import botocore.exceptions

        kwargs: dict[str, Any] = {"TableName": self.table_name, "Select": "COUNT"}
        total = 0
        for _ in range(max_pages):
            try:
                page: Any = self._client.scan(**kwargs)
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
                raise translate(exc, self._what()) from exc
            total += int(page.get("Count", 0))
            if not page.get("LastEvaluatedKey"):
                return total, True
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        return total, False

    def delete_table(self, *, timeout: float = 300.0) -> None:
        """Turn deletion protection off, delete the table and wait until it is gone (destroy --delete-data)."""
        import botocore.exceptions

        try:
            if self.describe().deletion_protection:
                self._client.update_table(TableName=self.table_name, DeletionProtectionEnabled=False)
            self._client.delete_table(TableName=self.table_name)
            self._client.get_waiter("table_not_exists").wait(
                TableName=self.table_name, WaiterConfig={"Delay": 2, "MaxAttempts": max(1, int(timeout / 2))})
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise translate(exc, self._what()) from exc
        except botocore.exceptions.WaiterError as exc:
            from gpuctl.errors import WaitTimeout

            raise WaitTimeout(f"The table {self.table_name} was still being deleted after {timeout:.0f} s.") from exc


def _now() -> float:
    return round(time.time(), 3)


def _num(value: float) -> str:
    return format(value, "f").rstrip("0").rstrip(".") if isinstance(value, float) else str(value)
