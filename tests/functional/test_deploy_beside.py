"""Deploying next to the running system: its queue (with a dead-letter queue), table and bucket already exist.

Against moto's server, as a user runs it: `gpuctl deploy --existing-...` onto resources shaped like the seed
system's (gpu_tasks_queue with a redrive policy, task_store with status-created_at-index, a bucket, another
service's CPU task in the table), then a job submitted with the CLI and run by the adapter as a real process
on the ComfyUI stand-in; the scheduler's environment from that stack reads the same table. Refusals name what
is missing; destroy leaves the running system's resources alone, and keeps or (--delete-data) deletes the data
a stack created.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import boto3
import pytest

from gpuctl.local.comfyui_standin import StandinConfig, StandinServer
from tests.functional.test_adapter import AdapterProcess
from tests.helpers import REGION, Resources, deploy_fresh_stack, make_image, run_cli

pytestmark = [pytest.mark.server, pytest.mark.filterwarnings("ignore:Tried to parse AWS:UserWarning")]

CPU_TASK = "cpu-task-of-another-service"


def _client(res: Resources, service: str) -> Any:
    return boto3.client(service, region_name=REGION, endpoint_url=res.endpoint_url,  # type: ignore[call-overload]
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _json(proc: Any) -> Any:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _deploy_beside(res: Resources, *extra: str) -> Any:
    return run_cli(["--endpoint-url", str(res.endpoint_url), "--region", REGION, "--output", "json", "deploy",
                    "--instance-id", res.instance_id, "--existing-queue-url", res.queue_url,
                    "--existing-table", res.table_name, "--existing-bucket", res.bucket, *extra, "--yes"], {})


def test_deploy_beside_the_running_system_then_run_a_job(server_aws: Resources, tmp_path: Path) -> None:
    """The stack points at the existing resources; a job submitted through them completes on the adapter."""
    # GIVEN the running system's resources, with another service's task in the shared table
    now = int(time.time())
    _client(server_aws, "dynamodb").put_item(TableName=server_aws.table_name, Item={
        "task_id": {"S": CPU_TASK}, "status": {"S": "processing"}, "job_type": {"S": "/api/v1/face-mask/tasks"},
        "created_at": {"N": str(now - 7200)}, "updated_at": {"N": str(now - 7200)}})
    # WHEN the stack is deployed beside them
    created = _json(_deploy_beside(server_aws))
    # THEN it uses them (the dead-letter queue found from the redrive policy) and creates no data store
    out = created["outputs"]
    assert (out["QueueUrl"], out["DeadLetterQueueUrl"]) == (server_aws.queue_url, server_aws.dlq_url)
    assert (out["TableName"], out["BucketName"]) == (server_aws.table_name, server_aws.bucket)
    # (the stack's own instance-history table is the one table it creates: a cost record, not the team's data)
    assert sorted(_client(server_aws, "dynamodb").list_tables()["TableNames"]) == sorted(
        [server_aws.table_name, out["HistoryTableName"]])
    assert created["plan"]["parameters"]["ExistingDeadLetterQueueUrl"] == server_aws.dlq_url

    # WHEN a job is submitted with the profile deploy wrote, and the adapter runs on the GPU box
    standin = StandinServer(StandinConfig(port=0, seconds_per_job=0.3))
    standin.start()
    adapter = AdapterProcess({**server_aws.env(), "GPUCTL_BACKEND_URL": standin.base_url, "GPUCTL_POLL_WAIT": "1",
                              "GPUCTL_READY_TIMEOUT": "20", "GPUCTL_LOG_LEVEL": "INFO"}, tmp_path / "adapter.log")
    try:
        adapter.start()
        image = make_image(tmp_path / "in.png")
        job_id = run_cli(["submit", "camera-angle", str(image), "--no-start", "-q"], {}).stdout.strip()
        assert job_id
        watched = run_cli(["watch", job_id, "--timeout", "60", "--output", "json"], {}, timeout=90)
    finally:
        adapter.stop()
        standin.stop()
    # THEN it completed through the existing queue and table, and the other service's task was not touched
    assert watched.returncode == 0, watched.stderr + adapter.log_path.read_text()[-2000:]
    status = _json(run_cli(["status", job_id, "--output", "json"], {}))
    assert status["status"] == "completed"
    assert status["result_s3_uri"].startswith(f"s3://{server_aws.bucket}/results/camera-angle/")
    item = _client(server_aws, "dynamodb").get_item(TableName=server_aws.table_name,
                                                    Key={"task_id": {"S": CPU_TASK}})["Item"]
    assert item["status"]["S"] == "processing"

    # AND the scheduler, with the environment the stack gave it, reads the same table and queue
    import handler

    fn = _client(server_aws, "lambda").get_function_configuration(FunctionName=out["LambdaFunctionName"])
    env = {k: str(v) for k, v in fn["Environment"]["Variables"].items()}
    config = handler.SchedulerConfig.from_env({**env, "AWS_ENDPOINT_URL": str(server_aws.endpoint_url),
                                               "AWS_DEFAULT_REGION": REGION})
    record = handler.run_once(config, handler.make_clients(REGION, str(server_aws.endpoint_url)))
    assert record["errors"] == []
    assert (record["facts"]["jobs_processing"], record["facts"]["jobs_pending"]) == (0, 0)  # the CPU task: not ours

    # WHEN the stack is destroyed
    destroyed = _json(run_cli(["--output", "json", "destroy", "--yes"], {}))
    # THEN the running system's resources are untouched, and said so
    assert destroyed["kept"] == [] and destroyed["data_deleted"] == []
    assert set(destroyed["untouched"]) == {"queue", "dead-letter queue", "table", "bucket"}
    _client(server_aws, "sqs").get_queue_attributes(QueueUrl=server_aws.queue_url, AttributeNames=["QueueArn"])
    assert _client(server_aws, "dynamodb").list_tables()["TableNames"] == [server_aws.table_name]
    _client(server_aws, "s3").head_object(Bucket=server_aws.bucket, Key=status["result_s3_uri"].split("/", 3)[3])


def test_a_queue_without_redrive_policy_is_refused(server_aws: Resources) -> None:
    """An existing queue without a dead-letter queue: exit 2 with the command that gives it one; no stack."""
    _client(server_aws, "sqs").set_queue_attributes(QueueUrl=server_aws.queue_url, Attributes={"RedrivePolicy": ""})
    proc = _deploy_beside(server_aws)
    assert proc.returncode == 2
    message = " ".join(proc.stderr.split())
    assert "The queue gpu_tasks_queue has no redrive policy" in message
    assert "aws sqs set-queue-attributes" in message and "Traceback" not in proc.stderr
    assert not _client(server_aws, "cloudformation").describe_stacks()["Stacks"]


def test_a_table_without_the_status_index_is_refused(server_aws: Resources) -> None:
    """An existing table without status-created_at-index: exit 2 naming the index and how to add it."""
    ddb = _client(server_aws, "dynamodb")
    ddb.create_table(TableName="plain_store", BillingMode="PAY_PER_REQUEST",
                     AttributeDefinitions=[{"AttributeName": "task_id", "AttributeType": "S"}],
                     KeySchema=[{"AttributeName": "task_id", "KeyType": "HASH"}])
    proc = run_cli(["--endpoint-url", str(server_aws.endpoint_url), "--region", REGION, "deploy", "--instance-id",
                    server_aws.instance_id, "--existing-table", "plain_store", "--yes"], {})
    assert proc.returncode == 2
    message = " ".join(proc.stderr.split())
    assert "The table plain_store has no status-created_at-index" in message
    assert "aws dynamodb update-table --table-name plain_store" in message


@pytest.mark.parametrize(("flags", "message"), [
    (["--existing-table", "no_such_table"], "The table no_such_table does not exist"),
    (["--existing-bucket", "no-such-bucket"], "The bucket no-such-bucket does not exist"),
    (["--existing-dlq-url", "https://sqs.us-east-1.amazonaws.com/123456789012/x"], "needs --existing-queue-url"),
    (["--enable-cdn"], "--enable-cdn needs --cdn-certificate-arn and --cdn-domain"),
])
def test_unusable_existing_resources_are_refused_plainly(server_aws: Resources, flags: list[str],
                                                         message: str) -> None:
    """Each problem is one sentence on stderr and exit 2, before anything is created."""
    proc = run_cli(["--endpoint-url", str(server_aws.endpoint_url), "--region", REGION, "deploy", "--instance-id",
                    server_aws.instance_id, *flags, "--yes"], {})
    assert proc.returncode == 2, proc.stderr
    assert message in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr


@pytest.fixture
def own_stack(moto_server: str, clean_env: Path) -> tuple[Any, Any, dict[str, str]]:
    """A stack that created its own queue, table and bucket (an emptied emulator), with three jobs and a result."""
    settings, clients, result = deploy_fresh_stack(moto_server)
    outputs = result.outputs
    for i in range(3):
        clients.dynamodb.put_item(TableName=outputs["TableName"], Item={"task_id": {"S": f"job-{i}"}})
    clients.s3.put_object(Bucket=outputs["BucketName"], Key="results/camera-angle/job-0.png", Body=b"png")
    clients.s3.put_object(Bucket=outputs["BucketName"], Key="results/camera-angle/job-0.png", Body=b"png2")
    return clients, settings, outputs


def test_destroy_delete_data_asks_with_the_count_then_deletes(own_stack: Any) -> None:
    """--delete-data names the table and its item count, then deletes the table and every bucket version."""
    from gpuctl.services.deploy import destroy

    clients, settings, outputs = own_stack
    asked: list[str] = []

    def confirm_data(plan: Any) -> bool:
        asked.extend(f"{k.kind} {k.name} {k.counted}" for k in plan.kept)
        return True

    result = destroy(clients, settings, delete_data=True, confirm_data=confirm_data, poll_delay=0.2)
    assert asked[0] == f"table {outputs['TableName']} 3 items"
    assert asked[1].startswith(f"bucket {outputs['BucketName']} ")
    assert [(d.kind, d.name) for d in result.data_deleted] == [("table", outputs["TableName"]),
                                                               ("bucket", outputs["BucketName"])]
    assert result.kept == []
    assert clients.dynamodb.list_tables()["TableNames"] == []
    assert outputs["BucketName"] not in [b["Name"] for b in clients.s3.list_buckets()["Buckets"]]


def test_declining_the_data_question_deletes_nothing(own_stack: Any) -> None:
    """Saying no to deleting the data cancels the whole destroy: the stack and the data stay."""
    from gpuctl.services.deploy import destroy

    clients, settings, outputs = own_stack
    result = destroy(clients, settings, delete_data=True, confirm_data=lambda plan: False, poll_delay=0.2)
    assert not result.deleted
    assert clients.cloudformation.describe_stacks(StackName="gpuctl")["Stacks"][0]["StackStatus"] == "CREATE_COMPLETE"
    assert sorted(clients.dynamodb.list_tables()["TableNames"]) == sorted(
        [outputs["TableName"], outputs["HistoryTableName"]])


def test_destroy_says_what_it_kept(own_stack: Any, clean_env: Path) -> None:
    """Without --delete-data the table (still deletion-protected) and the bucket stay, and destroy says how to
    remove them or use them again."""
    clients, settings, outputs = own_stack
    proc = run_cli(["--endpoint-url", str(settings.endpoint_url), "--region", REGION, "destroy", "--yes"], {})
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stderr.split())
    assert f"Kept the table {outputs['TableName']} (3 items)" in text
    # moto ignores the bucket's versioning: the overwritten result is one object there, two versions on AWS
    assert f"Kept the bucket {outputs['BucketName']} (1 object)" in text
    assert "--no-deletion-protection-enabled" in text
    assert f"gpuctl deploy --existing-table {outputs['TableName']} --existing-bucket {outputs['BucketName']}" in text
    table = clients.dynamodb.describe_table(TableName=outputs["TableName"])["Table"]
    assert table["DeletionProtectionEnabled"] is True
