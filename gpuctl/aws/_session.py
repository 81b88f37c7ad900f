"""The one place boto3 clients are built: one session, botocore ``standard`` retries, explicit timeouts.

Clients are created lazily, per service, on first use, so a command that only talks to DynamoDB never
pays for an EC2 client, and ``gpuctl --help`` never imports boto3 at all.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from gpuctl.errors import ConfigError

if TYPE_CHECKING:
    import boto3
    from mypy_boto3_cloudformation import CloudFormationClient
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sqs import SQSClient

    from gpuctl.settings import Settings

__all__ = ["DEFAULT_POOL", "AwsClients", "is_local_endpoint", "make_clients"]

_LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def is_local_endpoint(endpoint_url: str | None) -> bool:
    """True for an emulator on this machine (moto's server, LocalStack on loopback)."""
    return bool(endpoint_url) and (urlparse(endpoint_url).hostname or "") in _LOOPBACK


#: botocore's default: connections each client keeps open for reuse (one per thread calling it at once).
DEFAULT_POOL = 10


class AwsClients:
    """Lazily built, shared boto3 clients for one Settings.

    ``max_pool_connections``: connections each client keeps for reuse; a process that calls AWS from more threads at
    once (``gpuctl serve``) sizes it to its threads, or every call beyond the pool opens a connection and drops it.
    """

    def __init__(self, settings: Settings, *, max_pool_connections: int = DEFAULT_POOL) -> None:
        self.settings = settings
        self.max_pool_connections = max_pool_connections

    @functools.cached_property
    def session(self) -> boto3.session.Session:
        import boto3
        import botocore.exceptions

        region = self.settings.region
        try:
            session = boto3.session.Session(profile_name=self.settings.aws_profile, region_name=region)
        except botocore.exceptions.ProfileNotFound:
            raise ConfigError(
                f"The AWS profile {self.settings.aws_profile!r} does not exist in your AWS config."
            ) from None
        if session.region_name is None:
            raise self.settings.missing("region")
        if is_local_endpoint(self.settings.endpoint_url) and session.get_credentials() is None:
            # An emulator on loopback accepts any key; a newcomer without AWS credentials should not
            # have to invent some.
            session = boto3.session.Session(
                aws_access_key_id="gpuctl-local",
                aws_secret_access_key="gpuctl-local",
                region_name=session.region_name,
            )
        return session

    @functools.cached_property
    def _config(self) -> Any:
        from botocore.config import Config

        return Config(
            retries={"mode": "standard", "max_attempts": self.settings.max_attempts},
            connect_timeout=self.settings.connect_timeout,
            read_timeout=self.settings.read_timeout,
            max_pool_connections=self.max_pool_connections,
            # Path-style URLs work against any endpoint, including an emulator on an IP address.
            s3={"addressing_style": "path"} if self.settings.endpoint_url else None,
        )

    def client(self, service: str, *, read_timeout: float | None = None) -> Any:
        """A client for ``service``; ``read_timeout`` overrides the default (for long polls)."""
        config = self._config
        if read_timeout is not None:
            from botocore.config import Config

            config = config.merge(Config(read_timeout=read_timeout))
        return self.session.client(
            service,  # type: ignore[call-overload]
            endpoint_url=self.settings.endpoint_url,
            config=config,
        )

    @functools.cached_property
    def sqs(self) -> SQSClient:
        # A long poll holds the connection for up to 20 s; leave room for it.
        return self.client("sqs", read_timeout=max(self.settings.read_timeout, 30.0))  # type: ignore[no-any-return]

    @functools.cached_property
    def dynamodb(self) -> DynamoDBClient:
        return self.client("dynamodb")  # type: ignore[no-any-return]

    @functools.cached_property
    def ec2(self) -> EC2Client:
        return self.client("ec2")  # type: ignore[no-any-return]

    @functools.cached_property
    def s3(self) -> S3Client:
        return self.client("s3")  # type: ignore[no-any-return]

    @functools.cached_property
    def cloudformation(self) -> CloudFormationClient:
        return self.client("cloudformation")  # type: ignore[no-any-return]


def make_clients(settings: Settings, *, max_pool_connections: int = DEFAULT_POOL) -> AwsClients:
    """The client factory (style R4): call it at an entry point and pass the result down."""
    return AwsClients(settings, max_pool_connections=max_pool_connections)
