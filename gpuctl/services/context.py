"""Gateways built once from Settings: what every service receives."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpuctl.aws._session import AwsClients
    from gpuctl.aws.autoscaling import FleetGroup
    from gpuctl.aws.dynamo import JobTable
    from gpuctl.aws.ec2 import GpuInstance, Instances
    from gpuctl.aws.history import InstanceHistory
    from gpuctl.aws.s3 import ObjectStore
    from gpuctl.aws.sqs import JobQueue
    from gpuctl.settings import Settings

__all__ = ["Gateways"]


class Gateways:
    """Lazily built gateways; each one checks the setting it needs when first used."""

    def __init__(self, settings: Settings, clients: AwsClients | None = None) -> None:
        from gpuctl.aws._session import make_clients

        self.settings = settings
        self.clients = clients or make_clients(settings)

    @functools.cached_property
    def table(self) -> JobTable:
        from gpuctl.aws.dynamo import JobTable

        return JobTable(self.clients.dynamodb, self.settings.require("table_name"))

    @functools.cached_property
    def queue(self) -> JobQueue:
        from gpuctl.aws.sqs import JobQueue

        return JobQueue(self.clients.sqs, self.settings.require("queue_url"), self.settings.dlq_url)

    @functools.cached_property
    def instance(self) -> GpuInstance:
        from gpuctl.aws.ec2 import GpuInstance

        return GpuInstance(self.clients.ec2, self.settings.require("instance_id"))

    @functools.cached_property
    def instances(self) -> Instances:
        """Several instances at once (fleet mode's members)."""
        from gpuctl.aws.ec2 import Instances

        return Instances(self.clients.ec2)

    @functools.cached_property
    def fleet(self) -> FleetGroup:
        """Fleet mode's Auto Scaling group (setting ``fleet_group``)."""
        from gpuctl.aws.autoscaling import FleetGroup

        return FleetGroup(self.clients.client("autoscaling"), self.settings.require("fleet_group"))

    @functools.cached_property
    def history(self) -> InstanceHistory:
        from gpuctl.aws.history import InstanceHistory

        return InstanceHistory(self.clients.dynamodb, self.settings.require("history_table"))

    @functools.cached_property
    def store(self) -> ObjectStore:
        from gpuctl.aws.s3 import ObjectStore

        return ObjectStore(self.clients.s3)
