"""CloudFormation gateway: stacks, change sets, events, outputs; plus the deploy artifacts bucket.

Change sets always carry an explicit ``ChangeSetType`` (CREATE for a new stack, UPDATE otherwise): without
it the emulator treats an update as a create and duplicates every resource. A change set that FAILED
because "the submitted information didn't contain changes" is not an error; it means there is nothing to do.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gpuctl.aws._errors import error_code, translate
from gpuctl.errors import AwsError, Conflict, GpuctlError, NotFound, UsageError, WaitTimeout
from gpuctl.times import stamp

if TYPE_CHECKING:
    from mypy_boto3_cloudformation import CloudFormationClient
    from mypy_boto3_s3 import S3Client

__all__ = [
    "SUCCESS_STATUSES",
    "ArtifactBucket",
    "ChangeSet",
    "NoChanges",
    "ResourceChange",
    "StackEvent",
    "StackFailed",
    "StackInfo",
    "Stacks",
    "TemplateParameter",
    "caller_account",
    "explain_failure",
    "is_terminal",
]

#: A deploy that ends in one of these succeeded; every other terminal status is a failure.
SUCCESS_STATUSES = frozenset({"CREATE_COMPLETE", "UPDATE_COMPLETE", "IMPORT_COMPLETE"})
#: A stack in one of these can take an UPDATE change set.
UPDATABLE_STATUSES = frozenset({"CREATE_COMPLETE", "UPDATE_COMPLETE", "UPDATE_ROLLBACK_COMPLETE",
                                "IMPORT_COMPLETE", "IMPORT_ROLLBACK_COMPLETE"})
_NO_CHANGES = ("didn't contain changes", "No updates are to be performed")
# Follow-on failures that only say another resource failed first; never the reason to show.
_CASCADE = ("Resource creation cancelled", "Resource update cancelled", "Resource deletion cancelled")


def is_terminal(status: str) -> bool:
    """True when CloudFormation is done with the stack (nothing ``*_IN_PROGRESS``)."""
    return not status.endswith("_IN_PROGRESS")


class NoChanges(GpuctlError):
    """CloudFormation says the template and parameters match the stack ("No updates are to be performed")."""


class StackFailed(GpuctlError):
    """A stack operation ended in a failure or rollback status."""

    def __init__(self, message: str, *, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TemplateParameter:
    key: str
    default: str | None


@dataclass(frozen=True)
class StackInfo:
    name: str
    stack_id: str
    status: str
    status_reason: str | None
    parameters: dict[str, str]
    outputs: dict[str, str]
    created: dt.datetime | None = None
    updated: dt.datetime | None = None
    description: str | None = None

    def document(self) -> dict[str, Any]:
        """The stable JSON shape of ``gpuctl stack status --output json``."""
        return {
            "stack_name": self.name,
            "stack_id": self.stack_id,
            "status": self.status,
            "status_reason": self.status_reason,
            **stamp("created_at", self.created.timestamp() if self.created else None),
            **stamp("updated_at", self.updated.timestamp() if self.updated else None),
            "parameters": dict(sorted(self.parameters.items())),
            "outputs": dict(sorted(self.outputs.items())),
        }


@dataclass(frozen=True)
class StackEvent:
    event_id: str
    timestamp: dt.datetime
    logical_id: str
    resource_type: str
    status: str
    reason: str | None = None

    @property
    def failed(self) -> bool:
        return self.status.endswith("_FAILED")


@dataclass(frozen=True)
class ResourceChange:
    action: str  # Add | Modify | Remove | Import | Dynamic
    logical_id: str
    resource_type: str
    replacement: str | None = None  # True | False | Conditional (Modify only)

    def document(self) -> dict[str, Any]:
        return {"action": self.action, "logical_id": self.logical_id, "resource_type": self.resource_type,
                "replacement": self.replacement}


@dataclass(frozen=True)
class ChangeSet:
    change_set_id: str
    stack_id: str
    status: str
    execution_status: str | None
    status_reason: str | None
    changes: list[ResourceChange] = field(default_factory=list)

    @property
    def no_changes(self) -> bool:
        return self.status == "FAILED" and any(s in (self.status_reason or "") for s in _NO_CHANGES)


def explain_failure(stack_name: str, status: str, status_reason: str | None, events: Iterable[StackEvent]) -> str:
    """One paragraph saying what failed and what to do, from the stack status and its events (oldest first)."""
    failed = [e for e in events if e.failed and e.reason]
    causes = [e for e in failed if e.logical_id != stack_name and not (e.reason or "").startswith(_CASCADE)]
    root = (causes or failed)[0] if failed else None
    if status.startswith("UPDATE_ROLLBACK"):
        what = "could not be updated and was rolled back"
    elif status.startswith("ROLLBACK") or status == "CREATE_FAILED":
        what = "could not be created" + (" and was rolled back" if status.startswith("ROLLBACK") else "")
    elif status.startswith("DELETE"):
        what = "could not be deleted"
    else:
        what = "did not finish"
    message = f"The stack {stack_name} {what} ({status})"
    if root is not None and root.logical_id != stack_name:
        message += f": {root.logical_id} ({root.resource_type}) failed: {(root.reason or '').rstrip('.')}."
    elif root is not None or status_reason:
        message += f": {((root.reason if root else None) or status_reason or '').rstrip('.')}."
    else:
        message += "."
    if status in ("ROLLBACK_COMPLETE", "ROLLBACK_FAILED", "CREATE_FAILED"):
        message += (f" A stack that failed to create can only be deleted: fix the cause, run "
                    f"`gpuctl destroy --stack {stack_name}`, then deploy again.")
    elif status == "UPDATE_ROLLBACK_COMPLETE":
        message += " The stack is back on its previous configuration; fix the cause and deploy again."
    elif status == "UPDATE_ROLLBACK_FAILED":
        message += (" CloudFormation could not roll back: continue the rollback in the CloudFormation console "
                    "(ContinueUpdateRollback), then deploy again.")
    elif status == "DELETE_FAILED":
        message += " Fix the cause (for example empty the bucket) and run destroy again."
    return message


def _event(raw: Mapping[str, Any]) -> StackEvent:
    return StackEvent(
        event_id=str(raw["EventId"]),
        timestamp=raw["Timestamp"],
        logical_id=str(raw.get("LogicalResourceId", "")),
        resource_type=str(raw.get("ResourceType", "")),
        status=str(raw.get("ResourceStatus", "")),
        reason=raw.get("ResourceStatusReason") or None,
    )


class Stacks:
    """Typed access to CloudFormation stacks and change sets."""

    def __init__(self, client: CloudFormationClient) -> None:
        self._client = client

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        import botocore.exceptions
        import botocore.parsers

        try:
            return fn(**kwargs)
        except botocore.parsers.ResponseParserError as exc:
            # An endpoint that failed internally (the emulator answers HTTP 500 with a non-XML body).
            raise AwsError(f"CloudFormation failed internally on {what}: {str(exc).splitlines()[-1][:300]}",
                           code="InternalFailure") from exc
        except botocore.exceptions.ClientError as exc:
            code = error_code(exc)
            message = str(exc.response.get("Error", {}).get("Message") or code)
            if code == "ChangeSetNotFound" or (code == "ValidationError" and "does not exist" in message):
                raise NotFound(f"{what[0].upper()}{what[1:]} does not exist.") from exc
            if code == "ValidationError" and any(s in message for s in _NO_CHANGES):
                raise NoChanges(f"Nothing to change in {what}.") from exc
            if code == "ValidationError" and "_IN_PROGRESS state" in message:
                raise Conflict(f"CloudFormation is busy with {what}: {message.rstrip('.')}; wait for it to "
                               "finish (`gpuctl stack status`) and try again.") from exc
            if code in ("InsufficientCapabilitiesException", "InsufficientCapabilities"):
                raise AwsError(f"CloudFormation needs more capabilities for {what}: {message}", code=code) from exc
            if code == "ValidationError":
                raise UsageError(f"CloudFormation rejected the request for {what}: {message.rstrip('.')}.") from exc
            if code in ("InvalidChangeSetStatus", "InvalidChangeSetStatusException", "OperationInProgressException"):
                raise Conflict(f"CloudFormation cannot do that to {what} right now: {message}") from exc
            raise translate(exc, what) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise translate(exc, what) from exc

    # --- stacks ------------------------------------------------------------------------------------

    def describe(self, name: str) -> StackInfo | None:
        """The stack called ``name`` (or with that stack id), or None when there is none."""
        try:
            response = self._call(f"the stack {name}", self._client.describe_stacks, StackName=name)
        except NotFound:
            return None
        for raw in response.get("Stacks", []):
            return StackInfo(
                name=raw["StackName"],
                stack_id=raw["StackId"],
                status=raw["StackStatus"],
                status_reason=raw.get("StackStatusReason") or None,
                parameters={p["ParameterKey"]: p.get("ParameterValue", "") for p in raw.get("Parameters", [])},
                outputs={o["OutputKey"]: o.get("OutputValue", "") for o in raw.get("Outputs", [])},
                created=raw.get("CreationTime"),
                updated=raw.get("LastUpdatedTime"),
                description=raw.get("Description"),
            )
        return None

    def template_body(self, name: str) -> str | None:
        """The stack's current (original, untransformed) template text; None if it is not text."""
        response = self._call(f"the template of {name}", self._client.get_template, StackName=name,
                              TemplateStage="Original")
        body = response.get("TemplateBody")
        # botocore parses JSON templates into a dict; only a text body can be compared byte for byte.
        return body if isinstance(body, str) else None

    def template_parameters(self, *, body: str | None = None, url: str | None = None) -> list[TemplateParameter]:
        """The parameters a template declares, with their defaults (GetTemplateSummary)."""
        source: dict[str, Any] = {"TemplateURL": url} if url else {"TemplateBody": body}
        response = self._call("the template", self._client.get_template_summary, **source)
        return [TemplateParameter(p["ParameterKey"], p.get("DefaultValue")) for p in response.get("Parameters", [])]

    def create_stack(self, name: str, *, template: Mapping[str, str], parameters: Mapping[str, str],
                     capabilities: list[str], description: str | None = None) -> str:
        """Create a stack directly (no change set); return its id."""
        response = self._call(f"the stack {name}", self._client.create_stack, StackName=name,
                              Parameters=_parameters(parameters), Capabilities=capabilities,
                              Tags=[{"Key": "gpuctl:stack", "Value": name}], **template)
        return str(response["StackId"])

    def delete_stack(self, name: str) -> None:
        self._call(f"the stack {name}", self._client.delete_stack, StackName=name)

    def wait_deleted(self, name: str, *, timeout: float, delay: int = 5) -> None:
        """Block until the stack is gone (boto3 waiter ``stack_delete_complete``).

        Raises:
            StackFailed: it ended DELETE_FAILED (the reason from its events).
            WaitTimeout: it was still deleting after ``timeout`` seconds.
        """
        import botocore.exceptions

        waiter = self._client.get_waiter("stack_delete_complete")
        try:
            waiter.wait(StackName=name, WaiterConfig={"Delay": delay, "MaxAttempts": max(1, int(timeout / delay))})
        except botocore.exceptions.WaiterError as exc:
            info = self.describe(name)
            if info is None:
                return
            if info.status == "DELETE_IN_PROGRESS":
                raise WaitTimeout(f"The stack {name} was still being deleted after {timeout:.0f} s; "
                                  "see `gpuctl stack status`.") from exc
            events = self.events(info.stack_id)
            raise StackFailed(explain_failure(name, info.status, info.status_reason, events),
                              status=info.status) from exc

    # --- change sets -------------------------------------------------------------------------------

    def create_change_set(self, stack_name: str, change_set_name: str, *, change_set_type: str,
                          template: Mapping[str, str], parameters: Mapping[str, str],
                          capabilities: list[str], description: str | None = None) -> str:
        """Create a change set (``change_set_type`` CREATE or UPDATE, always explicit); return its id.

        Raises:
            NoChanges: the service refused it outright because nothing would change (the emulator does
                this; AWS creates the change set and fails it, see :meth:`wait_change_set`).
        """
        if change_set_type not in ("CREATE", "UPDATE"):
            raise ValueError(f"change_set_type must be CREATE or UPDATE, not {change_set_type!r}")
        extra: dict[str, Any] = {"Description": description} if description else {}
        response = self._call(
            f"the stack {stack_name}", self._client.create_change_set, StackName=stack_name,
            ChangeSetName=change_set_name, ChangeSetType=change_set_type, Parameters=_parameters(parameters),
            Capabilities=capabilities, Tags=[{"Key": "gpuctl:stack", "Value": stack_name}], **template, **extra,
        )
        return str(response["Id"])

    def wait_change_set(self, change_set_id: str, *, timeout: float = 300.0, delay: int = 2) -> ChangeSet:
        """Wait until the change set is computed; return it (``no_changes`` when there is nothing to do).

        Raises:
            StackFailed: the change set failed for another reason (a template or parameter problem).
            WaitTimeout: it was not ready within ``timeout`` seconds.
        """
        import botocore.exceptions

        waiter = self._client.get_waiter("change_set_create_complete")
        try:
            waiter.wait(ChangeSetName=change_set_id,
                        WaiterConfig={"Delay": delay, "MaxAttempts": max(1, int(timeout / delay))})
        except botocore.exceptions.WaiterError as exc:
            change_set = self.describe_change_set(change_set_id)
            if change_set.no_changes:
                return change_set
            if change_set.status == "FAILED":
                raise StackFailed(f"CloudFormation could not prepare the change: "
                                  f"{(change_set.status_reason or 'no reason given').rstrip('.')}.",
                                  status="FAILED") from exc
            raise WaitTimeout(f"The change set was not ready after {timeout:.0f} s "
                              f"(status {change_set.status}).") from exc
        return self.describe_change_set(change_set_id)

    def describe_change_set(self, change_set_id: str) -> ChangeSet:
        """The change set with all its changes (every page)."""
        kwargs: dict[str, Any] = {"ChangeSetName": change_set_id}
        changes: list[ResourceChange] = []
        while True:
            page = self._call("the change set", self._client.describe_change_set, **kwargs)
            for change in page.get("Changes", []):
                rc = change.get("ResourceChange", {})
                changes.append(ResourceChange(
                    action=str(rc.get("Action", "")), logical_id=str(rc.get("LogicalResourceId", "")),
                    resource_type=str(rc.get("ResourceType", "")), replacement=rc.get("Replacement"),
                ))
            if not page.get("NextToken"):
                return ChangeSet(
                    change_set_id=str(page.get("ChangeSetId", change_set_id)), stack_id=str(page.get("StackId", "")),
                    status=str(page.get("Status", "")), execution_status=page.get("ExecutionStatus"),
                    status_reason=page.get("StatusReason") or None, changes=changes,
                )
            kwargs["NextToken"] = page["NextToken"]

    def execute_change_set(self, change_set_id: str) -> None:
        self._call("the change set", self._client.execute_change_set, ChangeSetName=change_set_id)

    def delete_change_set(self, change_set_id: str) -> None:
        self._call("the change set", self._client.delete_change_set, ChangeSetName=change_set_id)

    # --- events ------------------------------------------------------------------------------------

    def events(self, stack: str, *, after: set[str] | None = None) -> list[StackEvent]:
        """The stack's events, oldest first; with ``after``, only those whose ids are not in it.

        Pages are read newest first and reading stops at the first already-seen event.
        """
        kwargs: dict[str, Any] = {"StackName": stack}
        newest_first: list[StackEvent] = []
        while True:
            page = self._call(f"the stack {stack}", self._client.describe_stack_events, **kwargs)
            for raw in page.get("StackEvents", []):
                event = _event(raw)
                if after is not None and event.event_id in after:
                    return newest_first[::-1]
                newest_first.append(event)
            if not page.get("NextToken"):
                return newest_first[::-1]
            kwargs["NextToken"] = page["NextToken"]

    def event_ids(self, stack: str) -> set[str]:
        """Ids of the events the stack has now (the first page is enough: newer ones come first)."""
        page = self._call(f"the stack {stack}", self._client.describe_stack_events, StackName=stack)
        return {str(raw["EventId"]) for raw in page.get("StackEvents", [])}

    def follow(self, stack_id: str, *, seen: set[str], on_event: Callable[[StackEvent], None] | None = None,
               timeout: float = 3600.0, delay: float = 5.0,
               sleep: Callable[[float], None] = time.sleep) -> tuple[StackInfo, list[StackEvent]]:
        """Report new events until the stack reaches a terminal status; return it and the events seen.

        The loop is bounded by ``timeout``; CloudFormation has no push channel short of SNS, so this polls
        DescribeStacks/DescribeStackEvents every ``delay`` seconds like the AWS CLI and SAM do.

        Raises:
            NotFound: the stack disappeared.
            WaitTimeout: no terminal status within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        collected: list[StackEvent] = []
        while True:
            info = self.describe(stack_id)
            if info is None:
                raise NotFound(f"The stack {stack_id} disappeared while gpuctl was following it.")
            for event in self.events(stack_id, after=seen):
                seen.add(event.event_id)
                collected.append(event)
                if on_event is not None:
                    on_event(event)
            if is_terminal(info.status):
                return info, collected
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"The stack {info.name} was still {info.status} after {timeout:.0f} s; "
                                  "it carries on in AWS: see `gpuctl stack status`.")
            sleep(delay)


def _parameters(values: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"ParameterKey": k, "ParameterValue": v} for k, v in sorted(values.items())]


# --- deploy artifacts ----------------------------------------------------------------------------------

def caller_account(sts: Any) -> str:
    """The AWS account id of the caller's credentials (STS GetCallerIdentity)."""
    import botocore.exceptions

    try:
        return str(sts.get_caller_identity()["Account"])
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        raise translate(exc, "AWS STS (who am I)") from exc


class ArtifactBucket:
    """The per-account, per-region bucket that holds what deploys upload (the zipped Lambda)."""

    def __init__(self, client: S3Client, name: str, region: str) -> None:
        self._client = client
        self.name = name
        self.region = region

    def _fail(self, exc: Exception, key: str | None = None) -> GpuctlError:
        return translate(exc, f"s3://{self.name}/{key or ''}")

    def exists(self) -> bool:
        """True if the bucket exists and is ours.

        Raises:
            AwsError: it exists but belongs to another account (403).
        """
        import botocore.exceptions

        try:
            self._client.head_bucket(Bucket=self.name)
        except botocore.exceptions.ClientError as exc:
            code = error_code(exc)
            if code in ("404", "NoSuchBucket", "NotFound"):
                return False
            if code in ("403", "AccessDenied"):
                raise AwsError(f"The artifacts bucket {self.name} exists but you cannot use it (it may belong "
                               "to another account).", code=code) from exc
            raise self._fail(exc) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise self._fail(exc) from exc
        return True

    def ensure(self) -> bool:
        """Create the bucket (private, public access blocked) unless it exists; True when it was created."""
        import botocore.exceptions

        if self.exists():
            return False
        kwargs: dict[str, Any] = {"Bucket": self.name}
        if self.region != "us-east-1":  # us-east-1 rejects an explicit LocationConstraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**kwargs)
            self._client.put_public_access_block(
                Bucket=self.name,
                PublicAccessBlockConfiguration={"BlockPublicAcls": True, "IgnorePublicAcls": True,
                                                "BlockPublicPolicy": True, "RestrictPublicBuckets": True},
            )
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) == "BucketAlreadyOwnedByYou":  # created concurrently by another deploy
                return False
            raise self._fail(exc) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise self._fail(exc) from exc
        return True

    def has(self, key: str) -> bool:
        import botocore.exceptions

        try:
            self._client.head_object(Bucket=self.name, Key=key)
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._fail(exc, key) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise self._fail(exc, key) from exc
        return True

    def put(self, key: str, data: bytes, *, content_type: str = "application/zip") -> None:
        import botocore.exceptions

        try:
            self._client.put_object(Bucket=self.name, Key=key, Body=data, ContentType=content_type)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._fail(exc, key) from exc

    def template_url(self, key: str, *, path_style_global: bool) -> str:
        """An https URL CloudFormation accepts for ``TemplateURL``.

        ``https://s3.amazonaws.com/bucket/key`` is the form both AWS (us-east-1) and the local emulator read;
        other regions use their regional endpoint.
        """
        if path_style_global or self.region == "us-east-1":
            return f"https://s3.amazonaws.com/{self.name}/{key}"
        return f"https://s3.{self.region}.amazonaws.com/{self.name}/{key}"
