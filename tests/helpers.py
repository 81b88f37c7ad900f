"""Shared test helpers: AWS resources in the emulator, running the CLI as a user does, sample images."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REGION = "us-east-1"
QUEUE = "gpu_tasks_queue"
DLQ = "gpu_tasks_dlq"
TABLE = "task_store"
BUCKET = "gpuctl-test-bucket"
MAX_RECEIVE = 3


@dataclass
class Resources:
    """The names of what :func:`create_resources` made, and the settings/env that point at them."""

    queue_url: str
    dlq_url: str
    table_name: str
    bucket: str
    instance_id: str
    endpoint_url: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def settings_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "region": REGION,
            "queue_url": self.queue_url,
            "dlq_url": self.dlq_url,
            "table_name": self.table_name,
            "bucket": self.bucket,
            "instance_id": self.instance_id,
        }
        if self.endpoint_url:
            kw["endpoint_url"] = self.endpoint_url
        return kw

    def env(self) -> dict[str, str]:
        """Environment for a gpuctl subprocess pointed at these resources."""
        env = {
            "GPUCTL_REGION": REGION,
            "GPUCTL_QUEUE_URL": self.queue_url,
            "GPUCTL_DLQ_URL": self.dlq_url,
            "GPUCTL_TABLE_NAME": self.table_name,
            "GPUCTL_BUCKET": self.bucket,
            "GPUCTL_INSTANCE_ID": self.instance_id,
        }
        if self.endpoint_url:
            env["GPUCTL_ENDPOINT_URL"] = self.endpoint_url
        env.update(self.extra_env)
        return env


def create_resources(session: Any, endpoint_url: str | None = None, *, visibility_timeout: int = 300,
                     instance_state: str = "stopped") -> Resources:
    """Create queue + DLQ, table + GSI + TTL, bucket and a GPU instance record with real boto3 calls."""
    kw = {"endpoint_url": endpoint_url} if endpoint_url else {}
    sqs = session.client("sqs", region_name=REGION, **kw)
    ddb = session.client("dynamodb", region_name=REGION, **kw)
    s3 = session.client("s3", region_name=REGION, **kw)
    ec2 = session.client("ec2", region_name=REGION, **kw)

    dlq_url = sqs.create_queue(QueueName=DLQ)["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue_url = sqs.create_queue(
        QueueName=QUEUE,
        Attributes={
            "VisibilityTimeout": str(visibility_timeout),
            "ReceiveMessageWaitTimeSeconds": "20",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": MAX_RECEIVE}),
        },
    )["QueueUrl"]
    ddb.create_table(
        TableName=TABLE,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[
            {"AttributeName": "task_id", "AttributeType": "S"},
            {"AttributeName": "status", "AttributeType": "S"},
            {"AttributeName": "created_at", "AttributeType": "N"},
        ],
        KeySchema=[{"AttributeName": "task_id", "KeyType": "HASH"}],
        GlobalSecondaryIndexes=[
            {
                "IndexName": "status-created_at-index",
                "KeySchema": [
                    {"AttributeName": "status", "KeyType": "HASH"},
                    {"AttributeName": "created_at", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "ALL"},
            }
        ],
    )
    s3.create_bucket(Bucket=BUCKET)
    # moto accepts any AMI id unless MOTO_ENABLE_AMI_VALIDATION is set; describe_images costs ~1 s.
    instance = ec2.run_instances(ImageId="ami-12c6146b", InstanceType="g5.xlarge", MinCount=1, MaxCount=1)
    instance_id = instance["Instances"][0]["InstanceId"]
    if instance_state == "stopped":
        ec2.stop_instances(InstanceIds=[instance_id])
    return Resources(queue_url, dlq_url, TABLE, BUCKET, instance_id, endpoint_url)


def deploy_fresh_stack(endpoint_url: str) -> tuple[Any, Any, Any]:
    """Reset moto's server, launch a GPU instance and deploy the stack with gpuctl's own deploy service.

    Returns (settings, clients, the DeployResult).
    """
    import boto3
    import httpx

    from gpuctl.services.context import Gateways
    from gpuctl.services.deploy import deploy
    from gpuctl.settings import Settings

    httpx.post(f"{endpoint_url}/moto-api/reset", timeout=10).raise_for_status()
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=endpoint_url, aws_access_key_id="testing",
                       aws_secret_access_key="testing")
    instance_id = ec2.run_instances(ImageId="ami-12c6146b", InstanceType="g5.xlarge", MinCount=1,
                                    MaxCount=1)["Instances"][0]["InstanceId"]
    settings = Settings(region=REGION, endpoint_url=endpoint_url)
    clients = Gateways(settings).clients
    return settings, clients, deploy(clients, settings, instance_id=instance_id, poll_delay=0.2)


def run_cli(args: list[str], env: dict[str, str], *, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python -m gpuctl ARGS`` in a subprocess exactly as a user would."""
    full_env = {k: v for k, v in os.environ.items()}
    full_env.update(env)
    full_env.setdefault("NO_COLOR", "1")
    full_env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "gpuctl", *args],
        env=full_env, input=input, capture_output=True, text=True, timeout=timeout, check=False,
    )


def make_image(path: Path, *, size: tuple[int, int] = (64, 48), fmt: str = "PNG") -> Path:
    """Write a small real image (a gradient, so transforms are visible)."""
    from PIL import Image

    img = Image.new("RGB", size)
    img.putdata([(x * 4 % 256, y * 5 % 256, (x + y) % 256) for y in range(size[1]) for x in range(size[0])])
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    path.write_bytes(buf.getvalue())
    return path
