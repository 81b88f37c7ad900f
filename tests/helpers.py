"""Shared test helpers: AWS resources in the emulator, running the CLI as a user does, sample images."""

from __future__ import annotations

import functools
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


# --- what is in the emulator, and the CLI in this process (issue 8's contract tests) ----------------------

ACTIVITY_ID = "gpuctl#activity"


@dataclass(frozen=True)
class Counts:
    """What a command may have written: queued messages, job records (not the activity marker), S3 objects."""

    messages: int
    records: int
    objects: int


def _test_client(service: str, endpoint_url: str | None) -> Any:
    """A boto3 client for the tests' own reads; one per service and server (clients cost ~50 ms each to build),
    a new one in-process (moto's mock must be active when a client is built)."""
    if endpoint_url is None:
        return _new_client(service, None)
    return _server_client(service, endpoint_url)


def _new_client(service: str, endpoint_url: str | None) -> Any:
    import boto3

    session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing")
    return session.client(service, region_name=REGION, endpoint_url=endpoint_url)  # type: ignore[call-overload]


_server_client = functools.cache(_new_client)


def emulator_counts(res: Resources) -> Counts:
    """Count messages (exact in moto), job records (a Scan without the activity marker) and objects."""
    attrs = _test_client("sqs", res.endpoint_url).get_queue_attributes(
        QueueUrl=res.queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    ddb = _test_client("dynamodb", res.endpoint_url)
    records, start = 0, None
    while True:
        page = ddb.scan(TableName=res.table_name, Select="COUNT", FilterExpression="task_id <> :a",
                        ExpressionAttributeValues={":a": {"S": ACTIVITY_ID}},
                        **({"ExclusiveStartKey": start} if start else {}))
        records += int(page["Count"])
        start = page.get("LastEvaluatedKey")
        if not start:
            break
    objects = sum(p.get("KeyCount", 0) for p in _test_client("s3", res.endpoint_url)
                  .get_paginator("list_objects_v2").paginate(Bucket=res.bucket))
    return Counts(int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"]),
                  records, objects)


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str


def invoke(args: list[str], env: dict[str, str], capsys: Any) -> CliResult:
    """Run gpuctl's ``main(args)`` in this process (the same boundary as the real process, ~10× cheaper than a
    subprocess) with ``env`` added to the environment; returns its exit code, stdout and stderr."""
    from gpuctl.__main__ import main

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    capsys.readouterr()
    try:
        code = main(list(args))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def put_object(res: Resources, key: str, body: bytes, content_type: str = "image/png") -> str:
    """Put an object in the test bucket; returns its s3:// URI."""
    _test_client("s3", res.endpoint_url).put_object(Bucket=res.bucket, Key=key, Body=body, ContentType=content_type)
    return f"s3://{res.bucket}/{key}"


def png_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width×height (a decompression bomb: about 100 bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


class HttpsFiles:
    """A real HTTPS server on 127.0.0.1 (a certificate for ``localhost`` from a test CA, trustme) serving
    ``files`` by path. Clients trust it through ``SSL_CERT_FILE`` (:attr:`ca_file`): https stays verified.

    ``files[path]`` is ``bytes`` (200 with Content-Length), ``("chunked", bytes)`` (no Content-Length),
    ``("redirect", location)`` (302) or an ``int`` status with no body.
    """

    def __init__(self, folder: Path) -> None:
        self.files: dict[str, Any] = {}
        self.requests: list[str] = []
        self._folder = folder
        self._server: Any = None

    def __enter__(self) -> HttpsFiles:
        import ssl
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import trustme

        ca = trustme.CA(key_type=trustme.KeyType.ECDSA)  # ECDSA: no RSA key generation to wait for
        self.ca_file = self._folder / "test-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests.append(self.path)
                entry = outer.files.get(self.path, 404)
                if isinstance(entry, int):
                    self.send_response(entry)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif isinstance(entry, bytes):
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(entry)))
                    self.end_headers()
                    self.wfile.write(entry)
                elif entry[0] == "redirect":
                    self.send_response(302)
                    self.send_header("Location", entry[1])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    body = entry[1]
                    for start in range(0, len(body), 4096):
                        piece = body[start:start + 4096]
                        self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.base_url = f"https://localhost:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, name="https-files", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


HISTORY_TABLE = "gpuctl-instance-history"


def create_history_table(session: Any, endpoint_url: str | None = None) -> str:
    """The instance history table as infra/cloudformation.yaml's HistoryTable defines it (keys and TTL)."""
    kw = {"endpoint_url": endpoint_url} if endpoint_url else {}
    ddb = session.client("dynamodb", region_name=REGION, **kw)
    ddb.create_table(
        TableName=HISTORY_TABLE, BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "instance_id", "AttributeType": "S"},
                              {"AttributeName": "at", "AttributeType": "N"}],
        KeySchema=[{"AttributeName": "instance_id", "KeyType": "HASH"}, {"AttributeName": "at", "KeyType": "RANGE"}],
    )
    ddb.update_time_to_live(TableName=HISTORY_TABLE,
                            TimeToLiveSpecification={"AttributeName": "expires_at", "Enabled": True})
    return HISTORY_TABLE


FLEET_GROUP = "gpuctl-fleet"


def create_fleet_group(session: Any, endpoint_url: str | None = None, *, name: str = FLEET_GROUP,
                       max_size: int = 4) -> str:
    """An Auto Scaling group at 0 (min 0) over two subnets with a launch template, as fleet mode deploys it."""
    kw = {"endpoint_url": endpoint_url} if endpoint_url else {}
    ec2 = session.client("ec2", region_name=REGION, **kw)
    autoscaling = session.client("autoscaling", region_name=REGION, **kw)
    vpc = ec2.create_vpc(CidrBlock="10.13.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.13.{n}.0/24", AvailabilityZone=f"{REGION}{z}")
               ["Subnet"]["SubnetId"] for n, z in ((1, "a"), (2, "b"))]
    template = ec2.create_launch_template(LaunchTemplateName=f"{name}-lt", LaunchTemplateData={
        "ImageId": "ami-12c6146b", "InstanceType": "g5.xlarge"})["LaunchTemplate"]["LaunchTemplateId"]
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=name, MinSize=0, MaxSize=max_size, DesiredCapacity=0,
        LaunchTemplate={"LaunchTemplateId": template, "Version": "$Latest"}, VPCZoneIdentifier=",".join(subnets))
    return name
