"""SQS gateway for the job queue and its dead-letter queue."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpuctl.aws._errors import error_code, translate
from gpuctl.errors import ConfigError, GpuctlError

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

__all__ = ["JobQueue", "QueueStats", "ReceivedMessage", "RedriveResult"]

log = logging.getLogger(__name__)
_SEND_BATCH_MAX = 10


@dataclass(frozen=True)
class QueueStats:
    """The queue's approximate counts (SQS counts are eventually consistent)."""

    visible: int
    in_flight: int
    delayed: int
    dlq_visible: int | None = None
    max_receive_count: int | None = None
    visibility_timeout: int | None = None

    @property
    def busy(self) -> bool:
        return bool(self.visible or self.in_flight or self.delayed)


@dataclass(frozen=True)
class ReceivedMessage:
    message_id: str
    receipt_handle: str
    body: str
    receive_count: int
    sent_at: float | None


@dataclass(frozen=True)
class RedriveResult:
    moved: int
    method: str  # "message-move-task" or "receive-send-delete"
    task_handle: str | None = None


class JobQueue:
    """Typed access to the job queue: send, batch send, receive, stats, DLQ redrive, purge."""

    def __init__(self, client: SQSClient, queue_url: str, dlq_url: str | None = None) -> None:
        self._client = client
        self.queue_url = queue_url
        self._dlq_url = dlq_url
        self._attributes: dict[str, str] | None = None

    def _what(self, url: str | None = None) -> str:
        return f"the SQS queue {url or self.queue_url}"

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        import botocore.exceptions

        try:
            return fn(**kwargs)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise translate(exc, what) from exc

    # --- send ----------------------------------------------------------------------------------
    def send(self, body: str, *, delay_seconds: int = 0) -> str:
        """Queue one message; return its MessageId."""
        response = self._call(
            self._what(), self._client.send_message,
            QueueUrl=self.queue_url, MessageBody=body, DelaySeconds=delay_seconds,
        )
        return str(response["MessageId"])

    def send_batch(self, bodies: Sequence[tuple[str, str]]) -> dict[str, str]:
        """Queue many ``(key, body)`` messages, 10 a request; return ``{key: reason}`` for those not sent.

        A request that fails as a whole marks all of its entries failed rather than raising, so the
        caller can account for every entry.
        """
        failed: dict[str, str] = {}
        for start in range(0, len(bodies), _SEND_BATCH_MAX):
            chunk = bodies[start : start + _SEND_BATCH_MAX]
            entries = [{"Id": str(i), "MessageBody": body} for i, (_key, body) in enumerate(chunk)]
            try:
                response = self._call(
                    self._what(), self._client.send_message_batch, QueueUrl=self.queue_url, Entries=entries
                )
            except GpuctlError as exc:
                if start == 0:
                    raise
                failed.update({key: str(exc) for key, _ in chunk})
                continue
            for failure in response.get("Failed", []):
                key = chunk[int(failure["Id"])][0]
                failed[key] = f"{failure.get('Code')}: {failure.get('Message', '')}".rstrip(": ")
        return failed

    # --- receive -------------------------------------------------------------------------------
    def receive(
        self, *, max_messages: int = 10, wait_seconds: int = 20, visibility_timeout: int | None = None
    ) -> list[ReceivedMessage]:
        kwargs: dict[str, Any] = {
            "QueueUrl": self.queue_url,
            "MaxNumberOfMessages": max_messages,
            "WaitTimeSeconds": wait_seconds,
            "MessageSystemAttributeNames": ["ApproximateReceiveCount", "SentTimestamp"],
        }
        if visibility_timeout is not None:
            kwargs["VisibilityTimeout"] = visibility_timeout
        response = self._call(self._what(), self._client.receive_message, **kwargs)
        out = []
        for m in response.get("Messages", []):
            attrs = m.get("Attributes", {})
            sent = attrs.get("SentTimestamp")
            out.append(
                ReceivedMessage(
                    message_id=m["MessageId"],
                    receipt_handle=m["ReceiptHandle"],
                    body=m.get("Body", ""),
                    receive_count=int(attrs.get("ApproximateReceiveCount", "1")),
                    sent_at=int(sent) / 1000 if sent else None,
                )
            )
        return out

    def delete(self, receipt_handle: str) -> None:
        self._call(self._what(), self._client.delete_message, QueueUrl=self.queue_url,
                   ReceiptHandle=receipt_handle)

    def change_visibility(self, receipt_handle: str, seconds: int) -> None:
        self._call(self._what(), self._client.change_message_visibility, QueueUrl=self.queue_url,
                   ReceiptHandle=receipt_handle, VisibilityTimeout=seconds)

    # --- attributes ----------------------------------------------------------------------------
    def attributes(self, url: str | None = None) -> dict[str, str]:
        response = self._call(self._what(url), self._client.get_queue_attributes,
                              QueueUrl=url or self.queue_url, AttributeNames=["All"])
        return dict(response.get("Attributes", {}))

    def stats(self, *, include_dlq: bool = True) -> QueueStats:
        """Visible, in-flight and delayed counts, the DLQ depth and the redrive settings."""
        attrs = self.attributes()
        self._attributes = attrs
        dlq_visible = None
        if include_dlq:
            dlq = self.dlq_url()
            if dlq:
                dlq_visible = int(self.attributes(dlq).get("ApproximateNumberOfMessages", "0"))
        policy = _redrive_policy(attrs)
        return QueueStats(
            visible=int(attrs.get("ApproximateNumberOfMessages", "0")),
            in_flight=int(attrs.get("ApproximateNumberOfMessagesNotVisible", "0")),
            delayed=int(attrs.get("ApproximateNumberOfMessagesDelayed", "0")),
            dlq_visible=dlq_visible,
            max_receive_count=int(policy["maxReceiveCount"]) if "maxReceiveCount" in policy else None,
            visibility_timeout=int(attrs["VisibilityTimeout"]) if "VisibilityTimeout" in attrs else None,
        )

    def max_receive_count(self) -> int | None:
        attrs = self._attributes or self.attributes()
        self._attributes = attrs
        policy = _redrive_policy(attrs)
        return int(policy["maxReceiveCount"]) if "maxReceiveCount" in policy else None

    def dlq_url(self) -> str | None:
        """The dead-letter queue: the configured URL, else the one the redrive policy names."""
        if self._dlq_url:
            return self._dlq_url
        attrs = self._attributes or self.attributes()
        self._attributes = attrs
        arn = _redrive_policy(attrs).get("deadLetterTargetArn")
        if not arn:
            return None
        parts = str(arn).split(":")
        name, account = parts[-1], parts[-2]
        response = self._call(f"the dead-letter queue {name}", self._client.get_queue_url,
                              QueueName=name, QueueOwnerAWSAccountId=account)
        self._dlq_url = str(response["QueueUrl"])
        return self._dlq_url

    # --- DLQ redrive and purge -----------------------------------------------------------------
    def redrive(self, *, max_messages: int | None = None) -> RedriveResult:
        """Move the dead-letter queue's messages back to the job queue.

        Uses StartMessageMoveTask where the endpoint has it; otherwise (an emulator, an older
        endpoint) receives from the DLQ, sends each message to the job queue and then deletes it,
        ten at a time, so a message is never deleted before its copy is queued.
        """
        import botocore.exceptions

        dlq = self.dlq_url()
        if not dlq:
            raise ConfigError(
                "This queue has no dead-letter queue: set GPUCTL_DLQ_URL or `gpuctl config set dlq_url URL`."
            )
        if max_messages is None:
            dlq_arn = self.attributes(dlq).get("QueueArn")
            queue_arn = (self._attributes or self.attributes()).get("QueueArn")
            try:
                response = self._client.start_message_move_task(SourceArn=str(dlq_arn),
                                                                DestinationArn=str(queue_arn))
                depth = int(self.attributes(dlq).get("ApproximateNumberOfMessages", "0"))
                return RedriveResult(moved=depth, method="message-move-task",
                                     task_handle=response.get("TaskHandle"))
            except botocore.exceptions.ClientError as exc:
                code = error_code(exc)
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if not (status >= 500 or code in {"UnsupportedOperation", "InvalidAction",
                                                   "AWS.SimpleQueueService.UnsupportedOperation"}):
                    raise translate(exc, self._what(dlq)) from exc
                log.info("sqs.redrive_fallback", extra={"code": code, "status": status})
            except botocore.exceptions.BotoCoreError as exc:
                # An emulator answering 500 with an HTML page fails parsing, not with a ClientError.
                log.info("sqs.redrive_fallback", extra={"error": type(exc).__name__})
        return self._redrive_by_copy(dlq, max_messages)

    def _redrive_by_copy(self, dlq: str, max_messages: int | None) -> RedriveResult:
        moved = 0
        while max_messages is None or moved < max_messages:
            batch = self._call(
                self._what(dlq), self._client.receive_message, QueueUrl=dlq,
                MaxNumberOfMessages=min(10, (max_messages - moved) if max_messages else 10),
                WaitTimeSeconds=0, VisibilityTimeout=60, MessageAttributeNames=["All"],
            ).get("Messages", [])
            if not batch:
                break
            entries = [_copy_entry(i, m) for i, m in enumerate(batch)]
            sent = self._call(self._what(), self._client.send_message_batch,
                              QueueUrl=self.queue_url, Entries=entries)
            ok = {int(s["Id"]) for s in sent.get("Successful", [])}
            to_delete = [{"Id": str(i), "ReceiptHandle": batch[i]["ReceiptHandle"]} for i in sorted(ok)]
            if to_delete:
                self._call(self._what(dlq), self._client.delete_message_batch,
                           QueueUrl=dlq, Entries=to_delete)
            moved += len(ok)
            if len(ok) < len(batch):
                break  # leave the rest in the DLQ rather than loop on a failing send
        return RedriveResult(moved=moved, method="receive-send-delete")

    def purge(self) -> None:
        self._call(self._what(), self._client.purge_queue, QueueUrl=self.queue_url)

    # --- added for the adapter -----------------------------------------------------------------
    def send_to_dlq(self, body: str, *, reason: str) -> str | None:
        """Copy a message the adapter cannot process to the dead-letter queue, with the reason attached.

        The reason goes in the message attribute ``gpuctl_poison_reason``. Returns the new MessageId, or
        None when the queue has no dead-letter queue.
        """
        dlq = self.dlq_url()
        if not dlq:
            return None
        response = self._call(
            self._what(dlq), self._client.send_message, QueueUrl=dlq, MessageBody=body or "(empty body)",
            MessageAttributes={"gpuctl_poison_reason": {"DataType": "String", "StringValue": reason[:1024]}},
        )
        return str(response["MessageId"])


def _redrive_policy(attrs: dict[str, str]) -> dict[str, Any]:
    raw = attrs.get("RedrivePolicy")
    if not raw:
        return {}
    try:
        policy = json.loads(raw)
    except ValueError:
        return {}
    return policy if isinstance(policy, dict) else {}


def _copy_entry(index: int, message: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {"Id": str(index), "MessageBody": message["Body"]}
    if message.get("MessageAttributes"):
        entry["MessageAttributes"] = message["MessageAttributes"]
    return entry
