"""EC2 gateway for the one GPU instance: describe, start, stop, wait, tags."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gpuctl.aws._errors import error_code, translate
from gpuctl.errors import AwsError, Conflict, NotFound, WaitTimeout

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

__all__ = ["CapacityError", "GpuInstance", "InstanceInfo", "Instances", "Volume"]

_CAPACITY = {"InsufficientInstanceCapacity", "InsufficientHostCapacity", "InsufficientCapacity",
             "InstanceLimitExceeded", "Unsupported"}


class CapacityError(AwsError):
    """AWS has no capacity for the instance type right now (the job stays queued)."""


@dataclass(frozen=True)
class InstanceInfo:
    instance_id: str
    state: str
    instance_type: str | None
    launch_time: dt.datetime | None
    tags: dict[str, str] = field(default_factory=dict)
    #: The instance profile associated with it (None: none); its attached EBS volume ids.
    profile_arn: str | None = None
    volume_ids: tuple[str, ...] = ()

    def uptime_seconds(self, now: dt.datetime | None = None) -> float | None:
        if self.state != "running" or self.launch_time is None:
            return None
        now = now or dt.datetime.now(dt.UTC)
        return max(0.0, (now - self.launch_time).total_seconds())


@dataclass(frozen=True)
class Volume:
    volume_id: str
    size_gb: int
    volume_type: str


class GpuInstance:
    """Typed access to the GPU instance."""

    def __init__(self, client: EC2Client, instance_id: str) -> None:
        self._client = client
        self.instance_id = instance_id

    def _what(self) -> str:
        return f"the EC2 instance {self.instance_id}"

    def _call(self, fn: Any, **kwargs: Any) -> Any:
        import botocore.exceptions

        try:
            return fn(**kwargs)
        except botocore.exceptions.ClientError as exc:
            code = error_code(exc)
            message = exc.response.get("Error", {}).get("Message", code)
            if code in _CAPACITY:
                raise CapacityError(
                    f"AWS has no capacity to start {self.instance_id} right now ({code}): {message}",
                    code=code,
                ) from exc
            if code == "IncorrectInstanceState":
                raise Conflict(f"The instance {self.instance_id} cannot do that in its current state: "
                               f"{message}") from exc
            raise translate(exc, self._what()) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise translate(exc, self._what()) from exc

    def describe(self) -> InstanceInfo:
        response = self._call(self._client.describe_instances, InstanceIds=[self.instance_id])
        for reservation in response.get("Reservations", []):
            for inst in reservation.get("Instances", []):
                return _info(inst)
        raise NotFound(f"The EC2 instance {self.instance_id} does not exist.")

    def volumes(self, volume_ids: tuple[str, ...]) -> list[Volume]:
        """The size and type of the given EBS volumes (what the instance costs while stopped)."""
        if not volume_ids:
            return []
        response = self._call(self._client.describe_volumes, VolumeIds=list(volume_ids))
        return [_volume(v) for v in response.get("Volumes", [])]

    def start(self) -> tuple[str, str]:
        """Ask EC2 to start the instance; return its ``(previous, current)`` states."""
        response = self._call(self._client.start_instances, InstanceIds=[self.instance_id])
        change = response["StartingInstances"][0]
        return str(change["PreviousState"]["Name"]), str(change["CurrentState"]["Name"])

    def stop(self) -> tuple[str, str]:
        """Ask EC2 to stop the instance; return its ``(previous, current)`` states."""
        response = self._call(self._client.stop_instances, InstanceIds=[self.instance_id])
        change = response["StoppingInstances"][0]
        return str(change["PreviousState"]["Name"]), str(change["CurrentState"]["Name"])

    def wait(self, state: str, *, timeout: float, delay: float = 5.0) -> None:
        """Block until the instance is ``running`` or ``stopped`` (boto3 waiters), at most ``timeout``.

        Raises:
            WaitTimeout: it did not get there in time.
        """
        import botocore.exceptions

        name = {"running": "instance_running", "stopped": "instance_stopped"}[state]
        waiter = self._client.get_waiter(name)  # type: ignore[call-overload]
        attempts = max(1, int(timeout / delay))
        try:
            waiter.wait(
                InstanceIds=[self.instance_id], WaiterConfig={"Delay": delay, "MaxAttempts": attempts}
            )
        except botocore.exceptions.WaiterError as exc:
            raise WaitTimeout(f"The instance {self.instance_id} did not reach {state} within "
                              f"{timeout:.0f} s.") from exc

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._call(self._client.create_tags, Resources=[self.instance_id],
                   Tags=[{"Key": k, "Value": v} for k, v in tags.items()])

    def delete_tags(self, keys: list[str]) -> None:
        self._call(self._client.delete_tags, Resources=[self.instance_id], Tags=[{"Key": k} for k in keys])


def _info(inst: Any) -> InstanceInfo:
    return InstanceInfo(
        instance_id=inst["InstanceId"],
        state=inst["State"]["Name"],
        instance_type=inst.get("InstanceType"),
        launch_time=inst.get("LaunchTime"),
        tags={t["Key"]: t["Value"] for t in inst.get("Tags", [])},
        profile_arn=inst.get("IamInstanceProfile", {}).get("Arn"),
        volume_ids=tuple(m["Ebs"]["VolumeId"] for m in inst.get("BlockDeviceMappings", [])
                         if m.get("Ebs", {}).get("VolumeId")),
    )


def _volume(v: Any) -> Volume:
    return Volume(str(v["VolumeId"]), int(v.get("Size", 0)), str(v.get("VolumeType", "gp3")))


#: EC2 takes at most this many values in one filter.
_FILTER_VALUES = 200


class Instances:
    """Typed access to several instances at once (a fleet's members, as its history names them)."""

    def __init__(self, client: EC2Client) -> None:
        self._client = client

    def _pages(self, operation: str, key: str, name: str, ids: list[str], what: str) -> list[Any]:
        import botocore.exceptions

        found: list[Any] = []
        paginator = self._client.get_paginator(operation)  # type: ignore[call-overload]
        for n in range(0, len(ids), _FILTER_VALUES):
            chunk = ids[n:n + _FILTER_VALUES]
            try:
                for page in paginator.paginate(Filters=[{"Name": name, "Values": chunk}]):
                    found.extend(page.get(key, []))
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
                raise translate(exc, what) from exc
        return found

    def describe(self, instance_ids: list[str]) -> list[InstanceInfo]:
        """The ones EC2 still knows (a filter, not InstanceIds: one unknown id does not fail the rest)."""
        reservations = self._pages("describe_instances", "Reservations", "instance-id", sorted(set(instance_ids)),
                                   "the fleet's EC2 instances")
        return [_info(inst) for r in reservations for inst in r.get("Instances", [])]

    def volumes(self, volume_ids: list[str]) -> list[Volume]:
        return [_volume(v) for v in self._pages("describe_volumes", "Volumes", "volume-id",
                                                sorted(set(volume_ids)), "the fleet's EBS volumes")]
