"""EC2 Auto Scaling gateway for fleet mode's group: describe it, set its desired capacity, its floor tags,
and (for the adapter) one instance's lifecycle state, scale-in protection and lifecycle action."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gpuctl.aws._errors import translate
from gpuctl.errors import NotFound

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient

__all__ = ["CAPACITY_AT_TAG", "CAPACITY_BY_TAG", "CAPACITY_FROM_TAG", "CAPACITY_REASON_TAG", "CAPACITY_TO_TAG",
           "FLOOR_REASON_TAG", "FLOOR_TAG", "FLOOR_UNTIL_TAG", "FleetGroup", "GroupInfo", "Member"]

#: The scheduler's names (lambda/fleet.py): a manual floor and until when it holds.
FLOOR_TAG = "gpuctl:floor"
FLOOR_UNTIL_TAG = "gpuctl:floor-until"
FLOOR_REASON_TAG = "gpuctl:floor-reason"
#: Who last changed the desired capacity, why, from and to what (lambda/fleet.py writes the same; the history
#: names a member's start or stop after it).
CAPACITY_AT_TAG = "gpuctl:capacity-at"
CAPACITY_BY_TAG = "gpuctl:capacity-by"
CAPACITY_REASON_TAG = "gpuctl:capacity-reason"
CAPACITY_FROM_TAG = "gpuctl:capacity-from"
CAPACITY_TO_TAG = "gpuctl:capacity-to"
#: The lifecycle hook the stack puts on scale-in (infra/cloudformation.yaml, FleetGroup).
DRAIN_HOOK = "gpuctl-drain"


@dataclass(frozen=True)
class Member:
    """One instance of the group as Auto Scaling sees it."""

    instance_id: str
    lifecycle_state: str
    protected: bool
    health: str | None = None
    instance_type: str | None = None
    zone: str | None = None


@dataclass(frozen=True)
class GroupInfo:
    name: str
    desired: int
    min_size: int
    max_size: int
    members: tuple[Member, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    created: dt.datetime | None = None


class FleetGroup:
    """Typed access to the fleet's Auto Scaling group."""

    def __init__(self, client: AutoScalingClient, name: str) -> None:
        self._client = client
        self.name = name

    def _what(self) -> str:
        return f"the Auto Scaling group {self.name}"

    def _call(self, fn: Any, **kwargs: Any) -> Any:
        import botocore.exceptions

        try:
            return fn(**kwargs)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise translate(exc, self._what()) from exc

    def describe(self) -> GroupInfo:
        """Raises: NotFound: the group does not exist."""
        answer = self._call(self._client.describe_auto_scaling_groups, AutoScalingGroupNames=[self.name])
        groups = answer.get("AutoScalingGroups") or []
        if not groups:
            raise NotFound(f"The Auto Scaling group {self.name} does not exist (setting fleet_group; "
                           "`gpuctl deploy --fleet` creates it).")
        g = groups[0]
        members = tuple(Member(i["InstanceId"], str(i.get("LifecycleState", "")), bool(i.get("ProtectedFromScaleIn")),
                               i.get("HealthStatus"), i.get("InstanceType"), i.get("AvailabilityZone"))
                        for i in g.get("Instances", []))
        tags = {t["Key"]: t.get("Value", "") for t in g.get("Tags", []) if "Key" in t}
        return GroupInfo(self.name, int(g["DesiredCapacity"]), int(g["MinSize"]), int(g["MaxSize"]), members, tags,
                         g.get("CreatedTime"))

    def set_desired(self, desired: int) -> None:
        self._call(self._client.set_desired_capacity, AutoScalingGroupName=self.name, DesiredCapacity=desired,
                   HonorCooldown=False)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call(self._client.create_or_update_tags, Tags=[
            {"ResourceId": self.name, "ResourceType": "auto-scaling-group", "Key": k, "Value": v,
             "PropagateAtLaunch": False} for k, v in tags.items()])

    def delete_tags(self, keys: list[str]) -> None:
        self._call(self._client.delete_tags, Tags=[
            {"ResourceId": self.name, "ResourceType": "auto-scaling-group", "Key": k} for k in keys])

    # --- one instance (the adapter's own) -------------------------------------------------------------
    def lifecycle_state(self, instance_id: str) -> str | None:
        """The instance's lifecycle state (``InService``, ``Terminating:Wait``, ``Warmed:Stopped``…); None when
        Auto Scaling does not know it (not in the group)."""
        answer = self._call(self._client.describe_auto_scaling_instances, InstanceIds=[instance_id])
        for item in answer.get("AutoScalingInstances") or []:
            if item.get("InstanceId") == instance_id:
                return str(item.get("LifecycleState") or "") or None
        return None

    def protect(self, instance_id: str, protected: bool) -> None:
        self._call(self._client.set_instance_protection, InstanceIds=[instance_id], AutoScalingGroupName=self.name,
                   ProtectedFromScaleIn=protected)

    def complete_lifecycle(self, instance_id: str, *, hook: str = DRAIN_HOOK, result: str = "CONTINUE") -> None:
        self._call(self._client.complete_lifecycle_action, LifecycleHookName=hook, AutoScalingGroupName=self.name,
                   InstanceId=instance_id, LifecycleActionResult=result)

    def heartbeat_lifecycle(self, instance_id: str, *, hook: str = DRAIN_HOOK) -> None:
        self._call(self._client.record_lifecycle_action_heartbeat, LifecycleHookName=hook,
                   AutoScalingGroupName=self.name, InstanceId=instance_id)
