"""infra/cloudformation.yaml: cfn-lint clean, deploys into moto, and its IAM covers what gpuctl calls (no more).

What moto 5.2 does NOT emulate, so these tests cannot check it in the emulator (cfn-lint and the template-parsing
tests below cover them instead):
- AWS::CloudWatch::Alarm, AWS::S3::BucketPolicy, AWS::Lambda::EventInvokeConfig, AWS::CloudFront::* are skipped
  with a UserWarning (filtered below); the function's DeadLetterConfig is dropped. Any Ref/GetAtt to them crashes
  moto, so the template never references the alarm, and deploying with EnableCdn=true into moto fails (the CDN
  outputs read the distribution): local mode keeps the CDN off.
- DynamoDB TimeToLiveSpecification and PointInTimeRecoverySpecification are ignored (TTL shows DISABLED).
- S3 PublicAccessBlockConfiguration, LifecycleConfiguration and OwnershipControls are ignored (only
  BucketEncryption is applied); Lambda LoggingConfig is ignored.
- moto does not delete an AWS::IAM::ManagedPolicy with its stack (the operator policy is left behind).
- S3 VersioningConfiguration is ignored; DeletionPolicy Retain and DynamoDB DeletionProtectionEnabled are honoured.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from cfnlint.api import ManualArgs, lint_file
from cfnlint.decode import decode
from moto import mock_aws

import handler
from tests.helpers import REGION

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "infra" / "cloudformation.yaml"
LAMBDA_DIR = ROOT / "lambda"
STACK = "gpuctl"
CODE_BUCKET = "gpuctl-deploy-artifacts"
CODE_KEY = "lambda/gpu-scheduler.zip"

# moto's "Tried to parse AWS::CloudWatch::Alarm / AWS::S3::BucketPolicy but it's not supported" (the filter
# syntax splits on ':', so '..' stands for '::').
pytestmark = pytest.mark.filterwarnings(
    r"ignore:Tried to parse AWS..(CloudWatch..Alarm|S3..BucketPolicy|Lambda..EventInvokeConfig) but it.s not"
    r" supported:UserWarning"
)

# ------------------------------------------------------------------------------ calls gpuctl makes (by API)
# The gpuctl CLI: submit (upload + record + enqueue, batch), status/list/watch/cancel, download, queue stats,
# purge and redrive (StartMessageMoveTask, or receive/send-batch/delete-batch where it is missing),
# instance status/start/stop/hold.
CLI_CALLS: list[tuple[str, str]] = [
    ("s3:PutObject", "inputs/*"),
    ("s3:GetObject", "inputs/*"),
    ("s3:GetObject", "results/*"),
    ("s3:ListBucket", "DataBucket"),
    ("dynamodb:PutItem", "TaskTable"),
    ("dynamodb:GetItem", "TaskTable"),
    ("dynamodb:UpdateItem", "TaskTable"),
    ("dynamodb:Query", "index/status-created_at-index"),
    ("dynamodb:BatchWriteItem", "TaskTable"),
    ("sqs:SendMessage", "JobQueue"),
    ("sqs:SendMessageBatch", "JobQueue"),
    ("sqs:GetQueueAttributes", "JobQueue"),
    ("sqs:GetQueueAttributes", "DeadLetterQueue"),
    ("sqs:PurgeQueue", "JobQueue"),
    ("sqs:PurgeQueue", "DeadLetterQueue"),
    ("sqs:ReceiveMessage", "DeadLetterQueue"),
    ("sqs:DeleteMessage", "DeadLetterQueue"),
    ("sqs:StartMessageMoveTask", "DeadLetterQueue"),
    ("sqs:ListMessageMoveTasks", "DeadLetterQueue"),
    ("sqs:GetQueueUrl", "DeadLetterQueue"),
    ("sqs:DeleteMessageBatch", "DeadLetterQueue"),
    ("ec2:DescribeInstances", "*"),
    ("ec2:StartInstances", "instance/${InstanceId}"),
    ("ec2:StopInstances", "instance/${InstanceId}"),
    ("ec2:CreateTags", "instance/${InstanceId}"),
    ("ec2:DeleteTags", "instance/${InstanceId}"),
    ("logs:FilterLogEvents", "SchedulerLogGroup"),
    # cost report / simulate: one instance's history (Query), a fleet's members (Scan), the volumes
    ("dynamodb:Query", "HistoryTable"),
    ("dynamodb:Scan", "HistoryTable"),
    ("ec2:DescribeVolumes", "*"),
]
# The adapter daemon on the GPU instance (poison messages are copied to the DLQ, found by name if needed).
ADAPTER_CALLS: list[tuple[str, str]] = [
    ("sqs:ReceiveMessage", "JobQueue"),
    ("sqs:DeleteMessage", "JobQueue"),
    ("sqs:ChangeMessageVisibility", "JobQueue"),
    ("sqs:GetQueueAttributes", "JobQueue"),
    ("sqs:SendMessage", "JobQueue"),
    ("sqs:GetQueueUrl", "DeadLetterQueue"),
    ("sqs:SendMessage", "DeadLetterQueue"),
    ("dynamodb:GetItem", "TaskTable"),
    ("dynamodb:UpdateItem", "TaskTable"),
    ("s3:GetObject", "inputs/*"),
    ("s3:PutObject", "results/*"),
    ("s3:DeleteObject", "results/*"),
]
# API operations that have no IAM action of their own: they are authorised by another action.
API_TO_IAM = {
    "sqs:SendMessageBatch": "sqs:SendMessage",
    "sqs:DeleteMessageBatch": "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibilityBatch": "sqs:ChangeMessageVisibility",
    "s3:HeadObject": "s3:GetObject",
    "s3:ListObjectsV2": "s3:ListBucket",
    "s3:CreateMultipartUpload": "s3:PutObject",
    "s3:UploadPart": "s3:PutObject",
    "s3:CompleteMultipartUpload": "s3:PutObject",
}
# Actions that AWS does not allow to be scoped to a resource: Resource "*" is required and allowed for them.
UNSCOPABLE_PREFIXES = ("ec2:Describe", "autoscaling:Describe")


# ------------------------------------------------------------------------------------------- helpers


def template() -> dict[str, Any]:
    tpl, matches = decode(str(TEMPLATE))
    assert not matches, matches
    assert tpl is not None
    return dict(tpl)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def _statements(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for stmt in _as_list(doc["Statement"]):
        if isinstance(stmt, dict) and "Fn::If" in stmt:  # conditional statement: check both branches
            out.extend(s for s in stmt["Fn::If"][1:] if isinstance(s, dict) and "Effect" in s)
        else:
            out.append(stmt)
    return out


def role_statements(tpl: dict[str, Any], logical_id: str) -> list[dict[str, Any]]:
    props = tpl["Resources"][logical_id]["Properties"]
    return [s for p in props.get("Policies", []) for s in _statements(p["PolicyDocument"])]


def managed_policy_statements(tpl: dict[str, Any], logical_id: str) -> list[dict[str, Any]]:
    return _statements(tpl["Resources"][logical_id]["Properties"]["PolicyDocument"])


def _render(resource: Any) -> str:
    return resource if isinstance(resource, str) else json.dumps(resource)


def allowed(statements: list[dict[str, Any]], api_call: str, resource_hint: str) -> bool:
    """True when an Allow statement grants the IAM action behind ``api_call`` on a resource matching the hint."""
    action = API_TO_IAM.get(api_call, api_call)
    for stmt in statements:
        if stmt.get("Effect") != "Allow" or action not in _as_list(stmt["Action"]):
            continue
        resources = [_render(r) for r in _as_list(stmt["Resource"])]
        if resource_hint == "*" and "*" in resources:
            return True
        if any(resource_hint in r for r in resources if r != "*"):
            return True
    return False


def assert_least_privilege(statements: list[dict[str, Any]]) -> None:
    for stmt in statements:
        actions = _as_list(stmt["Action"])
        assert all("*" not in a for a in actions), f"wildcard action in {stmt.get('Sid')}: {actions}"
        if "*" in [_render(r) for r in _as_list(stmt["Resource"])]:
            assert all(a.startswith(UNSCOPABLE_PREFIXES) for a in actions), (
                f"statement {stmt.get('Sid')} uses Resource '*' for scopable actions {actions}"
            )


def lambda_zip() -> bytes:
    """The lambda/ folder zipped as it is, as gpuctl deploy does."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(LAMBDA_DIR.glob("*.py")):
            zf.write(path, path.name)
    return buf.getvalue()


def parameters(instance_id: str, **extra: str) -> list[dict[str, str]]:
    values = {"InstanceId": instance_id, "LambdaCodeBucket": CODE_BUCKET, "LambdaCodeKey": CODE_KEY, **extra}
    return [{"ParameterKey": k, "ParameterValue": v} for k, v in values.items()]


def outputs(cfn: Any, stack: str = STACK) -> dict[str, str]:
    described = cfn.describe_stacks(StackName=stack)["Stacks"][0]
    return {o["OutputKey"]: o["OutputValue"] for o in described.get("Outputs", [])}


@pytest.fixture
def emulator(clean_env: Path) -> Iterator[dict[str, Any]]:
    """moto in-process with the Lambda code uploaded and an existing GPU instance."""
    with mock_aws():
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket=CODE_BUCKET)
        s3.put_object(Bucket=CODE_BUCKET, Key=CODE_KEY, Body=lambda_zip())
        ec2 = boto3.client("ec2", region_name=REGION)
        reservation = ec2.run_instances(ImageId="ami-12c6146b", InstanceType="g5.xlarge", MinCount=1, MaxCount=1)
        yield {
            "instance_id": reservation["Instances"][0]["InstanceId"],
            "cfn": boto3.client("cloudformation", region_name=REGION),
        }


@pytest.fixture
def stack(emulator: dict[str, Any]) -> dict[str, str]:
    """The template deployed with create_stack and default parameters; returns its outputs."""
    cfn = emulator["cfn"]
    cfn.create_stack(
        StackName=STACK,
        TemplateBody=TEMPLATE.read_text(),
        Parameters=parameters(emulator["instance_id"]),
        Capabilities=["CAPABILITY_IAM"],
    )
    cfn.get_waiter("stack_create_complete").wait(StackName=STACK, WaiterConfig={"Delay": 1, "MaxAttempts": 10})
    return outputs(cfn)


# ------------------------------------------------------------------------------------------- cfn-lint


def test_cfn_lint_reports_nothing() -> None:
    """cfn-lint finds no errors, warnings or informational findings in the template."""
    # WHEN
    matches = lint_file(TEMPLATE, config=ManualArgs(include_checks=["I"], regions=["us-east-1", "eu-west-1"]))
    # THEN
    assert [str(m) for m in matches] == []


# ------------------------------------------------------------------------------------------- deploy into moto


def test_create_stack_outputs_what_the_cli_reads(stack: dict[str, str], emulator: dict[str, Any]) -> None:
    """create_stack completes and every output gpuctl reads is present (CdnDomain only with the CDN on)."""
    assert set(stack) >= {
        "QueueUrl",
        "QueueArn",
        "DeadLetterQueueUrl",
        "TableName",
        "BucketName",
        "InstanceId",
        "Region",
        "LambdaFunctionName",
        "AlarmName",
        "OperatorPolicyArn",
        "InstanceProfileName",
    }
    assert "CdnDomain" not in stack
    assert stack["InstanceId"] == emulator["instance_id"]
    assert stack["Region"] == REGION
    assert stack["TableName"] == "task_store"
    assert stack["QueueUrl"].endswith("/gpu_tasks_queue")
    assert stack["DeadLetterQueueUrl"].endswith("/gpu_tasks_queue_dlq")
    assert stack["AlarmName"] == f"{STACK}-gpu-queue-idle"


def test_queue_has_long_polling_visibility_encryption_and_redrive(stack: dict[str, str]) -> None:
    """The job queue has VT 300 s, 20 s long polling, SSE, and redrives to the DLQ after 5 receives."""
    sqs = boto3.client("sqs", region_name=REGION)
    attrs = sqs.get_queue_attributes(QueueUrl=stack["QueueUrl"], AttributeNames=["All"])["Attributes"]
    assert attrs["VisibilityTimeout"] == "300"
    assert attrs["ReceiveMessageWaitTimeSeconds"] == "20"
    assert attrs["SqsManagedSseEnabled"] == "true"
    dlq_arn = sqs.get_queue_attributes(QueueUrl=stack["DeadLetterQueueUrl"], AttributeNames=["QueueArn"])
    assert json.loads(attrs["RedrivePolicy"]) == {
        "deadLetterTargetArn": dlq_arn["Attributes"]["QueueArn"],
        "maxReceiveCount": 5,
    }


def test_table_has_status_index(stack: dict[str, str]) -> None:
    """The task table is on-demand, keyed by task_id, with the status/created_at GSI projecting all."""
    table = boto3.client("dynamodb", region_name=REGION).describe_table(TableName=stack["TableName"])["Table"]
    assert table["KeySchema"] == [{"AttributeName": "task_id", "KeyType": "HASH"}]
    assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    (gsi,) = table["GlobalSecondaryIndexes"]
    assert gsi["IndexName"] == "status-created_at-index"
    assert gsi["KeySchema"] == [
        {"AttributeName": "status", "KeyType": "HASH"},
        {"AttributeName": "created_at", "KeyType": "RANGE"},
    ]
    assert gsi["Projection"] == {"ProjectionType": "ALL"}


def test_bucket_is_encrypted(stack: dict[str, str]) -> None:
    """The data bucket exists with default encryption (the rest of its settings are checked statically)."""
    s3 = boto3.client("s3", region_name=REGION)
    rules = s3.get_bucket_encryption(Bucket=stack["BucketName"])["ServerSideEncryptionConfiguration"]["Rules"]
    assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"


def test_lambda_is_wired_to_the_stack(stack: dict[str, str], emulator: dict[str, Any]) -> None:
    """The scheduler runs handler.lambda_handler on python3.12 with env that points at this stack."""
    lam = boto3.client("lambda", region_name=REGION)
    fn = lam.get_function_configuration(FunctionName=stack["LambdaFunctionName"])
    assert (fn["Runtime"], fn["Handler"]) == ("python3.12", "handler.lambda_handler")
    env = {k: str(v) for k, v in fn["Environment"]["Variables"].items()}
    assert env["QUEUE_URL"] == stack["QueueUrl"]
    assert env["DLQ_URL"] == stack["DeadLetterQueueUrl"]
    assert env["TABLE_NAME"] == stack["TableName"]
    assert env["INSTANCE_ID"] == emulator["instance_id"]
    assert env["IDLE_MINUTES"] == "30"
    # The environment is one the handler accepts.
    config = handler.SchedulerConfig.from_env(env)
    assert config.policy.idle_seconds == 1800


def test_schedule_and_alarm_may_invoke_the_lambda(stack: dict[str, str]) -> None:
    """A rate(5 minutes) rule targets the Lambda; EventBridge and the named alarm may invoke it."""
    events = boto3.client("events", region_name=REGION)
    lam = boto3.client("lambda", region_name=REGION)
    rule = events.describe_rule(Name=stack["ScheduleRuleName"])
    assert rule["ScheduleExpression"] == "rate(5 minutes)"
    fn_arn = lam.get_function_configuration(FunctionName=stack["LambdaFunctionName"])["FunctionArn"]
    targets = events.list_targets_by_rule(Rule=stack["ScheduleRuleName"])["Targets"]
    assert [t["Arn"] for t in targets] == [fn_arn]
    policy = json.loads(lam.get_policy(FunctionName=stack["LambdaFunctionName"])["Policy"])
    events_arns = {s["Condition"]["ArnLike"]["AWS:SourceArn"] for s in policy["Statement"]
                   if s["Principal"]["Service"] == "events.amazonaws.com"}
    by_principal = {s["Principal"]["Service"]: s["Condition"] for s in policy["Statement"]}
    # The schedule, and the instance state-change rule of gpuctl cost (issue 14).
    state_rule = events.describe_rule(Name=stack["StateChangeRuleName"])
    assert events_arns == {rule["Arn"], state_rule["Arn"]}
    assert json.loads(state_rule["EventPattern"])["detail"] == {"instance-id": [stack["InstanceId"]]}
    alarm = by_principal["lambda.alarms.cloudwatch.amazonaws.com"]
    assert alarm["ArnLike"]["AWS:SourceArn"].endswith(f":alarm:{stack['AlarmName']}")
    assert alarm["StringEquals"]["AWS:SourceAccount"] == "123456789012"


def test_instance_profile_holds_the_gpu_role(stack: dict[str, str]) -> None:
    """The instance profile to attach to the GPU instance contains the adapter's role."""
    iam = boto3.client("iam", region_name=REGION)
    profile = iam.get_instance_profile(InstanceProfileName=stack["InstanceProfileName"])["InstanceProfile"]
    assert len(profile["Roles"]) == 1
    assert iam.get_policy(PolicyArn=stack["OperatorPolicyArn"])["Policy"]["AttachmentCount"] == 0


def physical_ids(cfn: Any, stack: str = STACK) -> dict[str, str]:
    # Skipped (unsupported) resources come back as blank entries, hence .get().
    summaries = cfn.list_stack_resources(StackName=stack)["StackResourceSummaries"]
    return {r["LogicalResourceId"]: r.get("PhysicalResourceId", "") for r in summaries if r.get("LogicalResourceId")}


def test_change_sets_create_and_update(emulator: dict[str, Any]) -> None:
    """The template deploys through CREATE and UPDATE change sets (what gpuctl deploy may use).

    moto 5.2 does not (re)compute stack Outputs when a change set is executed, so this test reads the
    physical resource ids instead of the outputs.
    """
    cfn = emulator["cfn"]
    body = TEMPLATE.read_text()
    waiter_cfg = {"Delay": 1, "MaxAttempts": 10}
    # WHEN a CREATE change set is executed
    cfn.create_change_set(
        StackName=STACK,
        ChangeSetName="create-1",
        ChangeSetType="CREATE",
        TemplateBody=body,
        Parameters=parameters(emulator["instance_id"]),
        Capabilities=["CAPABILITY_IAM"],
    )
    cfn.get_waiter("change_set_create_complete").wait(
        StackName=STACK, ChangeSetName="create-1", WaiterConfig=waiter_cfg
    )
    cfn.execute_change_set(StackName=STACK, ChangeSetName="create-1")
    cfn.get_waiter("stack_create_complete").wait(StackName=STACK, WaiterConfig=waiter_cfg)
    created = physical_ids(cfn)
    queue_url = created["JobQueue"]
    assert queue_url.endswith("/gpu_tasks_queue")
    assert created["SchedulerFunction"] == "gpuctl-gpu-scheduler"
    # AND an UPDATE change set changes the idle window (moto's queue update applies only VisibilityTimeout
    # and ReceiveMessageWaitTimeSeconds, so a RedrivePolicy change cannot be observed here)
    cfn.create_change_set(
        StackName=STACK,
        ChangeSetName="update-1",
        ChangeSetType="UPDATE",
        TemplateBody=body,
        Parameters=parameters(emulator["instance_id"], IdleMinutes="45"),
        Capabilities=["CAPABILITY_IAM"],
    )
    cfn.get_waiter("change_set_create_complete").wait(
        StackName=STACK, ChangeSetName="update-1", WaiterConfig=waiter_cfg
    )
    cfn.execute_change_set(StackName=STACK, ChangeSetName="update-1")
    cfn.get_waiter("stack_update_complete").wait(StackName=STACK, WaiterConfig=waiter_cfg)
    # THEN the stack was updated in place
    assert physical_ids(cfn)["JobQueue"] == queue_url
    fn = boto3.client("lambda", region_name=REGION).get_function_configuration(FunctionName="gpuctl-gpu-scheduler")
    assert str(fn["Environment"]["Variables"]["IDLE_MINUTES"]) == "45"


def test_delete_stack_keeps_the_table_and_the_bucket(stack: dict[str, str], emulator: dict[str, Any]) -> None:
    """Deleting the stack succeeds, removes the queues and keeps the team's data: the table (still protected
    against deletion) and the bucket."""
    cfn = emulator["cfn"]
    cfn.delete_stack(StackName=STACK)
    cfn.get_waiter("stack_delete_complete").wait(StackName=STACK, WaiterConfig={"Delay": 1, "MaxAttempts": 10})
    assert boto3.client("sqs", region_name=REGION).list_queues().get("QueueUrls", []) == []
    ddb = boto3.client("dynamodb", region_name=REGION)
    assert ddb.list_tables()["TableNames"] == [stack["TableName"]]
    assert ddb.describe_table(TableName=stack["TableName"])["Table"]["DeletionProtectionEnabled"] is True
    boto3.client("s3", region_name=REGION).head_bucket(Bucket=stack["BucketName"])


def test_the_data_is_retained_and_protected() -> None:
    """Table and bucket are Retain on delete and on replacement; the table has deletion protection and PITR."""
    resources = template()["Resources"]
    for logical_id in ("TaskTable", "DataBucket"):
        assert resources[logical_id]["DeletionPolicy"] == "Retain"
        assert resources[logical_id]["UpdateReplacePolicy"] == "Retain"
    table = resources["TaskTable"]["Properties"]
    assert table["DeletionProtectionEnabled"] is True
    assert table["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    assert resources["DataBucket"]["Properties"]["VersioningConfiguration"] == {"Status": "Enabled"}


def test_existing_resources_are_used_instead_of_created(emulator: dict[str, Any]) -> None:
    """With Existing* parameters the stack creates no queue, table or bucket, and points at the given ones."""
    # GIVEN the running system's queue (with its DLQ), table and bucket
    from tests.helpers import create_resources

    seed = create_resources(boto3.session.Session())
    cfn = emulator["cfn"]
    # WHEN the stack is created beside them
    cfn.create_stack(StackName="beside", TemplateBody=TEMPLATE.read_text(), Capabilities=["CAPABILITY_IAM"],
                     Parameters=parameters(emulator["instance_id"], ExistingQueueUrl=seed.queue_url,
                                           ExistingDeadLetterQueueUrl=seed.dlq_url, ExistingTableName=seed.table_name,
                                           ExistingBucketName=seed.bucket))
    out = outputs(cfn, "beside")
    # THEN the outputs are the existing resources and nothing new was made
    assert (out["QueueUrl"], out["DeadLetterQueueUrl"]) == (seed.queue_url, seed.dlq_url)
    assert (out["TableName"], out["BucketName"]) == (seed.table_name, seed.bucket)
    assert out["QueueArn"] == f"arn:aws:sqs:{REGION}:123456789012:{seed.queue_url.rsplit('/', 1)[1]}"
    assert out["DeadLetterQueueArn"] == f"arn:aws:sqs:{REGION}:123456789012:{seed.dlq_url.rsplit('/', 1)[1]}"
    summaries = cfn.list_stack_resources(StackName="beside")["StackResourceSummaries"]
    created = {r.get("ResourceType") for r in summaries}
    # Only the instance history table (issue 14) is the stack's own, beside the existing task table.
    tables = {r.get("LogicalResourceId") for r in summaries if r.get("ResourceType") == "AWS::DynamoDB::Table"}
    assert tables == {"HistoryTable"} and "AWS::S3::Bucket" not in created
    queues = boto3.client("sqs", region_name=REGION).list_queues()["QueueUrls"]
    assert sorted(q.rsplit("/", 1)[1] for q in queues) == sorted(
        [seed.queue_url.rsplit("/", 1)[1], seed.dlq_url.rsplit("/", 1)[1], "gpuctl-gpu-scheduler-failures"])
    fn = boto3.client("lambda", region_name=REGION).get_function_configuration(FunctionName="gpuctl-gpu-scheduler")
    assert fn["Environment"]["Variables"]["QUEUE_URL"] == seed.queue_url
    assert fn["Environment"]["Variables"]["TABLE_NAME"] == seed.table_name


def test_policies_scope_to_existing_resources() -> None:
    """Every table, queue and bucket resource in the policies follows the Existing* parameters."""
    text = json.dumps(template()["Resources"])
    for param in ("ExistingQueueUrl", "ExistingDeadLetterQueueUrl", "ExistingTableName", "ExistingBucketName"):
        assert param in text
    for role in ("GpuInstanceRole", "SchedulerRole"):
        for stmt in role_statements(template(), role):
            for resource in _as_list(stmt["Resource"]):
                rendered = _render(resource)
                if any(name in rendered for name in ("JobQueue", "TaskTable", "DataBucket", "DeadLetterQueue")):
                    assert "Fn::If" in rendered, (role, stmt.get("Sid"))


def test_tag_permissions_cannot_touch_other_tags() -> None:
    """CreateTags/DeleteTags are limited to gpuctl:* keys, and a request naming no key (DeleteTags without Tags
    deletes every tag) is refused by the Null guard."""
    tpl = template()
    statements = managed_policy_statements(tpl, "OperatorPolicy") + role_statements(tpl, "SchedulerRole")
    tagging = [s for s in statements if {"ec2:CreateTags", "ec2:DeleteTags"} & set(_as_list(s["Action"]))]
    assert len(tagging) == 2
    for stmt in tagging:
        assert stmt["Condition"]["ForAllValues:StringLike"] == {"aws:TagKeys": ["gpuctl:*"]}
        assert stmt["Condition"]["Null"] == {"aws:TagKeys": "false"}


def test_scheduler_runs_one_at_a_time_and_keeps_its_failures() -> None:
    """Reserved concurrency 1, no retries, a dead-letter queue for failed invocations, an alarm on errors."""
    resources = template()["Resources"]
    fn = resources["SchedulerFunction"]["Properties"]
    assert fn["ReservedConcurrentExecutions"] == 1
    assert fn["DeadLetterConfig"] == {"TargetArn": {"Fn::GetAtt": ["SchedulerFailureQueue", "Arn"]}}
    assert resources["SchedulerInvokeConfig"]["Properties"]["MaximumRetryAttempts"] == 0
    alarm = resources["SchedulerErrorsAlarm"]["Properties"]
    assert (alarm["Namespace"], alarm["MetricName"]) == ("AWS/Lambda", "Errors")
    assert allowed(role_statements(template(), "SchedulerRole"), "sqs:SendMessage", "SchedulerFailureQueue")


def test_instance_role_has_no_unused_or_unscoped_permission() -> None:
    """The adapter never puts items, and may list only the inputs/ and results/ prefixes."""
    statements = role_statements(template(), "GpuInstanceRole")
    assert not any("dynamodb:PutItem" in _as_list(s["Action"]) for s in statements)
    (listing,) = [s for s in statements if "s3:ListBucket" in _as_list(s["Action"])]
    assert listing["Condition"] == {"StringLike": {"s3:prefix": ["inputs/*", "results/*"]}}


def test_dead_letter_queue_accepts_only_the_job_queue() -> None:
    """The DLQ's redrive-allow policy names the job queue (its ARN built, the queue refers to the DLQ)."""
    props = template()["Resources"]["DeadLetterQueue"]["Properties"]
    assert props["RedriveAllowPolicy"]["redrivePermission"] == "byQueue"
    assert _render(props["RedriveAllowPolicy"]["sourceQueueArns"][0]).endswith(':${QueueName}"}')


def test_results_can_expire_and_the_cdn_needs_tls_1_2() -> None:
    """ResultsExpireDays adds an expiry rule for results/; the CDN has a certificate and TLS 1.2 minimum."""
    tpl = template()
    rules = tpl["Resources"]["DataBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    (conditional,) = [r for r in rules if "Fn::If" in r]
    assert conditional["Fn::If"][0] == "ExpireResults"
    assert conditional["Fn::If"][1]["Prefix"] == "results/"
    cert = tpl["Resources"]["ResultsDistribution"]["Properties"]["DistributionConfig"]["ViewerCertificate"]
    assert cert["MinimumProtocolVersion"] == "TLSv1.2_2021"
    assert cert["AcmCertificateArn"] == {"Ref": "CdnCertificateArn"}


def test_every_scanner_skip_gives_its_reason() -> None:
    """Each checkov finding skipped in the template carries a comment saying why it does not apply."""
    skips = [(lid, skip) for lid, res in template()["Resources"].items()
             for skip in res.get("Metadata", {}).get("checkov", {}).get("skip", [])]
    assert skips
    for logical_id, skip in skips:
        assert skip["id"].startswith("CKV_AWS_"), logical_id
        assert len(skip.get("comment", "")) > 30, (logical_id, skip)


def test_names_can_be_overridden(emulator: dict[str, Any]) -> None:
    """QueueName, TableName and ResourcePrefix let a second stack live beside the first."""
    cfn = emulator["cfn"]
    cfn.create_stack(
        StackName="gpuctl-staging",
        TemplateBody=TEMPLATE.read_text(),
        Parameters=parameters(
            emulator["instance_id"], QueueName="staging_tasks", TableName="staging_store", ResourcePrefix="staging"
        ),
        Capabilities=["CAPABILITY_IAM"],
    )
    out = outputs(cfn, "gpuctl-staging")
    assert out["QueueUrl"].endswith("/staging_tasks")
    assert out["DeadLetterQueueUrl"].endswith("/staging_tasks_dlq")
    assert out["TableName"] == "staging_store"
    assert out["LambdaFunctionName"] == "staging-gpu-scheduler"


# ------------------------------------------------------------------------------------------- static checks


def test_operator_policy_allows_every_cli_call() -> None:
    """The operator managed policy grants each AWS call the CLI makes, on the right resource."""
    statements = managed_policy_statements(template(), "OperatorPolicy")
    missing = [call for call in CLI_CALLS if not allowed(statements, *call)]
    assert missing == []


def test_instance_role_allows_every_adapter_call() -> None:
    """The GPU instance role grants each AWS call the adapter makes, on the right resource."""
    statements = role_statements(template(), "GpuInstanceRole")
    missing = [call for call in ADAPTER_CALLS if not allowed(statements, *call)]
    assert missing == []


def test_scheduler_role_allows_every_call_the_handler_makes(clean_env: Path) -> None:
    """The Lambda role grants exactly the calls recorded while the handler stops and starts an instance."""
    # GIVEN the handler running against moto with its clients instrumented to record every API call
    recorded: set[str] = set()

    def record(model: Any, **_: Any) -> None:
        recorded.add(f"{model.service_model.signing_name}:{model.name}")

    with mock_aws():
        from tests.helpers import create_resources

        res = create_resources(boto3.session.Session(), instance_state="running")
        clients = handler.make_clients(REGION)
        for client in (clients.ec2, clients.sqs, clients.dynamodb):
            client.meta.events.register("before-call", record)
        config = handler.SchedulerConfig.from_env(
            {
                "QUEUE_URL": res.queue_url,
                "DLQ_URL": res.dlq_url,
                "TABLE_NAME": res.table_name,
                "INSTANCE_ID": res.instance_id,
                "IDLE_MINUTES": "0",
                "CLOCK_SKEW_SECONDS": "0",
            }
        )
        # A gpuctl adapter reported long ago, so the marker decides and the stop is fenced.
        boto3.client("dynamodb", region_name=REGION).put_item(TableName=res.table_name, Item={
            "task_id": {"S": "gpuctl#activity"}, "adapter_seen_at": {"N": "1000"}})
        # WHEN it stops the idle instance and then starts it for a waiting message
        assert handler.run_once(config, clients)["action"] == "stop"
        boto3.client("sqs", region_name=REGION).send_message(QueueUrl=res.queue_url, MessageBody="{}")
        assert handler.run_once(config, clients)["action"] == "start"
    # THEN every recorded call is allowed, scoped where AWS allows it
    statements = role_statements(template(), "SchedulerRole")
    hints = {"ec2": "instance/${InstanceId}", "sqs": "Queue", "dynamodb:Query": "index/status-created_at-index",
             "dynamodb:GetItem": "TaskTable", "dynamodb:UpdateItem": "TaskTable"}
    assert recorded >= {"ec2:DescribeInstances", "ec2:StopInstances", "ec2:StartInstances", "ec2:CreateTags",
                        "dynamodb:GetItem", "dynamodb:UpdateItem", "dynamodb:Query"}
    for call in sorted(recorded):
        hint = "*" if call.startswith(UNSCOPABLE_PREFIXES) else hints.get(call, hints.get(call.split(":")[0], "?"))
        assert allowed(statements, call, hint), call


@pytest.mark.parametrize("kind", ["role:GpuInstanceRole", "role:SchedulerRole", "policy:OperatorPolicy"])
def test_no_wildcards_where_a_resource_can_be_named(kind: str) -> None:
    """No '*' actions anywhere, and Resource '*' only for ec2:Describe* (which cannot be scoped)."""
    tpl = template()
    what, logical_id = kind.split(":")
    statements = role_statements(tpl, logical_id) if what == "role" else managed_policy_statements(tpl, logical_id)
    assert statements
    assert_least_privilege(statements)


def test_least_privilege_check_rejects_a_wildcard() -> None:
    """The wildcard check itself fails on a broad statement (guards against a vacuous test)."""
    with pytest.raises(AssertionError):
        assert_least_privilege([{"Effect": "Allow", "Action": "sqs:*", "Resource": "x"}])
    with pytest.raises(AssertionError):
        assert_least_privilege([{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}])


def test_operator_policy_is_not_attached_by_the_template() -> None:
    """The managed policy does not attach itself via Roles/Users/Groups (that breaks stack delete in moto)."""
    props = template()["Resources"]["OperatorPolicy"]["Properties"]
    assert not {"Roles", "Users", "Groups"} & set(props)


def test_nothing_references_the_alarm() -> None:
    """No Ref/GetAtt points at the alarm (moto crashes on it); its name is built with !Sub."""
    tpl = template()
    assert tpl["Resources"]["QueueIdleAlarm"]["Type"] == "AWS::CloudWatch::Alarm"
    text = json.dumps({k: v for k, v in tpl.items() if k != "Resources"}) + json.dumps(
        {k: v for k, v in tpl["Resources"].items() if k != "QueueIdleAlarm"}
    )
    assert '"QueueIdleAlarm"' not in text
    assert "QueueIdleAlarm." not in text


def test_alarm_watches_visible_in_flight_and_delayed_messages() -> None:
    """The idle alarm sums visible + in-flight + delayed messages and fires at 0 for the idle window."""
    props = template()["Resources"]["QueueIdleAlarm"]["Properties"]
    metrics = {m["Id"]: m for m in props["Metrics"]}
    names = {m["MetricStat"]["Metric"]["MetricName"] for m in metrics.values() if "MetricStat" in m}
    assert names == {
        "ApproximateNumberOfMessagesVisible",
        "ApproximateNumberOfMessagesNotVisible",
        "ApproximateNumberOfMessagesDelayed",
    }
    (expr,) = [m for m in metrics.values() if "Expression" in m]
    assert expr["ReturnData"] is True
    assert (props["ComparisonOperator"], props["Threshold"]) == ("LessThanOrEqualToThreshold", 0)
    assert props["EvaluationPeriods"] == {"Ref": "IdleMinutes"}
    assert props["AlarmActions"] == [{"Fn::GetAtt": ["SchedulerFunction", "Arn"]}]


def test_bucket_is_private_and_inputs_expire() -> None:
    """The bucket blocks all public access, is encrypted, and expires inputs/ after InputsExpireDays."""
    props = template()["Resources"]["DataBucket"]["Properties"]
    assert all(props["PublicAccessBlockConfiguration"].values())
    assert len(props["PublicAccessBlockConfiguration"]) == 4
    assert "BucketEncryption" in props
    (inputs_rule,) = [r for r in props["LifecycleConfiguration"]["Rules"] if r.get("Prefix") == "inputs/"]
    assert inputs_rule["ExpirationInDays"] == {"Ref": "InputsExpireDays"}


def test_cdn_is_optional_and_reads_only_results() -> None:
    """The CloudFront resources and output exist only under EnableCdn, and OAC may read only results/*."""
    tpl = template()
    for logical_id in ("ResultsDistribution", "ResultsOriginAccessControl"):
        assert tpl["Resources"][logical_id]["Condition"] == "CdnEnabled"
    assert tpl["Outputs"]["CdnDomain"]["Condition"] == "CdnEnabled"
    statements = _statements(tpl["Resources"]["DataBucketPolicy"]["Properties"]["PolicyDocument"])
    (cdn,) = [s for s in statements if s.get("Principal") == {"Service": "cloudfront.amazonaws.com"}]
    assert cdn["Action"] == "s3:GetObject"
    assert _render(cdn["Resource"]).endswith('/results/*"}')
