"""The CloudFormation gateway and the deploy service in-process: change sets, the AWS execute path, large
templates through S3, and failures explained in plain words.

moto never fails or rolls back a stack (it has no per-resource events either), so the failure paths use
botocore's Stubber with the event records CloudFormation sends; everything else runs against moto.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from gpuctl.aws.cfn import NoChanges, StackEvent, StackFailed, Stacks, explain_failure
from gpuctl.errors import Conflict, UsageError
from gpuctl.services.deploy import TEMPLATE_BODY_LIMIT, DeploySources, deploy, find_sources
from gpuctl.settings import Settings
from tests.helpers import REGION

pytestmark = pytest.mark.filterwarnings("ignore:Tried to parse AWS:UserWarning")

NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def moto_env(clean_env: Path) -> Iterator[tuple[Any, str]]:
    """moto in-process with a GPU instance; yields (clients, instance id)."""
    from moto import mock_aws

    from gpuctl.aws._session import make_clients

    with mock_aws():
        clients = make_clients(Settings(region=REGION))
        ec2 = boto3.client("ec2", region_name=REGION)
        instance = ec2.run_instances(ImageId="ami-12c6146b", InstanceType="g5.xlarge", MinCount=1, MaxCount=1)
        yield clients, instance["Instances"][0]["InstanceId"]


def test_unchanged_update_is_refused_as_no_changes(moto_env: tuple[Any, str]) -> None:
    """An UPDATE change set with nothing to change raises NoChanges (the emulator refuses it outright)."""
    # GIVEN a stack created with a parameter
    clients, _ = moto_env
    body = "Parameters:\n  P: {Type: String}\nResources:\n  Q: {Type: 'AWS::SQS::Queue'}\n"
    stacks = Stacks(clients.cloudformation)
    stacks.create_stack("s", template={"TemplateBody": body}, parameters={"P": "a"}, capabilities=[])
    # WHEN an UPDATE change set with the same template and parameter is asked for
    # THEN it is reported as "nothing to change", not as an error
    with pytest.raises(NoChanges):
        stacks.create_change_set("s", "same", change_set_type="UPDATE", template={"TemplateBody": body},
                                 parameters={"P": "a"}, capabilities=[])


def test_failed_no_change_change_set_means_no_changes(clean_env: Path) -> None:
    """On AWS the change set is created and then FAILED "didn't contain changes": that is no changes."""
    client = boto3.client("cloudformation", region_name=REGION)
    stub = Stubber(client)
    failed = {"ChangeSetId": "cs", "StackId": "st", "Status": "FAILED", "ExecutionStatus": "UNAVAILABLE",
              "StatusReason": "The submitted information didn't contain changes. Submit different information "
                              "to create a change set.", "Changes": []}
    stub.add_response("describe_change_set", failed, {"ChangeSetName": "cs"})  # the waiter's first poll
    stub.add_response("describe_change_set", failed, {"ChangeSetName": "cs"})

    with stub:
        change_set = Stacks(client).wait_change_set("cs", delay=1, timeout=1)

    assert change_set.no_changes


def test_a_failed_change_set_explains_why(clean_env: Path) -> None:
    """A change set that FAILED for another reason raises StackFailed with CloudFormation's reason."""
    client = boto3.client("cloudformation", region_name=REGION)
    stub = Stubber(client)
    failed = {"ChangeSetId": "cs", "StackId": "st", "Status": "FAILED", "ExecutionStatus": "UNAVAILABLE",
              "StatusReason": "Parameter 'IdleMinutes' must be a number.", "Changes": []}
    stub.add_response("describe_change_set", failed, {"ChangeSetName": "cs"})
    stub.add_response("describe_change_set", failed, {"ChangeSetName": "cs"})

    with stub, pytest.raises(StackFailed, match="could not prepare the change: Parameter 'IdleMinutes' must be"):
        Stacks(client).wait_change_set("cs", delay=1, timeout=1)


def test_change_set_type_must_be_explicit(moto_env: tuple[Any, str]) -> None:
    """The gateway refuses a change set without CREATE or UPDATE (moto would duplicate resources)."""
    clients, _ = moto_env

    with pytest.raises(ValueError, match="CREATE or UPDATE"):
        Stacks(clients.cloudformation).create_change_set("s", "x", change_set_type="", template={},
                                                         parameters={}, capabilities=[])


def test_large_template_goes_through_s3_and_change_set_is_executed(moto_env: tuple[Any, str],
                                                                    tmp_path: Path) -> None:
    """A template over 51,200 bytes is uploaded and passed as TemplateURL; on AWS the change set executes."""
    # GIVEN the real template padded past the TemplateBody limit (comments change nothing)
    clients, instance_id = moto_env
    real = find_sources()
    template = tmp_path / "cloudformation.yaml"
    padding = "".join(f"# padding line {i:05d} " + "x" * 80 + "\n" for i in range(TEMPLATE_BODY_LIMIT // 80))
    template.write_text(real.template.read_text() + padding)
    code = shutil.copytree(real.lambda_dir, tmp_path / "lambda")
    assert template.stat().st_size > TEMPLATE_BODY_LIMIT
    # WHEN it is deployed with no emulator endpoint configured (the AWS path: execute the change set)
    result = deploy(clients, Settings(region=REGION), instance_id=instance_id,
                    sources=DeploySources(template, code), poll_delay=0)
    # THEN the template was stored in the artifacts bucket and the stack was created from the change set
    assert result.action == "created"
    assert result.status == "CREATE_COMPLETE"
    keys = [o["Key"] for o in clients.s3.list_objects_v2(Bucket=result.code_bucket)["Contents"]]
    assert result.code_key in keys
    assert any(k.startswith("templates/gpuctl-") for k in keys)
    stack = clients.cloudformation.describe_stacks(StackName="gpuctl")["Stacks"][0]
    assert {p["ParameterKey"]: p["ParameterValue"] for p in stack["Parameters"]}["InstanceId"] == instance_id


def test_a_declined_review_changes_nothing(moto_env: tuple[Any, str]) -> None:
    """When the review callback says no, the change set and the empty review stack are deleted."""
    clients, instance_id = moto_env
    seen: list[Any] = []

    def decline(plan: Any) -> bool:
        seen.append(plan)
        return False

    result = deploy(clients, Settings(region=REGION), instance_id=instance_id, review=decline)

    assert result.action == "cancelled"
    assert seen and seen[0].change_type == "CREATE"
    assert Stacks(clients.cloudformation).describe("gpuctl") is None


def test_a_busy_stack_is_not_touched(moto_env: tuple[Any, str]) -> None:
    """A stack still in progress (here: stuck after a failed create in moto) is refused with Conflict."""
    # GIVEN a stack moto left in CREATE_IN_PROGRESS (a template error during creation)
    clients, instance_id = moto_env
    body = "Resources:\n  Q: {Type: 'AWS::SQS::Queue', Properties: {QueueName: !GetAtt Nope.Arn}}\n"
    with pytest.raises(UsageError):
        Stacks(clients.cloudformation).create_stack("gpuctl", template={"TemplateBody": body}, parameters={},
                                                    capabilities=[])
    # WHEN deploy runs
    with pytest.raises(Conflict, match="busy"):
        deploy(clients, Settings(region=REGION), instance_id=instance_id)


# --- failures (Stubber: moto cannot fail or roll back a stack) ------------------------------------------

def _stack(status: str, reason: str | None = None) -> dict[str, Any]:
    stack: dict[str, Any] = {"StackName": "gpuctl", "StackId": "arn:aws:cloudformation:us-east-1:1:stack/gpuctl/x",
                             "StackStatus": status, "CreationTime": NOW}
    if reason:
        stack["StackStatusReason"] = reason
    return {"Stacks": [stack]}


def _raw_event(n: int, logical: str, rtype: str, status: str, reason: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"StackId": "x", "EventId": f"e{n}", "StackName": "gpuctl", "LogicalResourceId": logical,
                             "ResourceType": rtype, "ResourceStatus": status,
                             "Timestamp": NOW + dt.timedelta(seconds=n)}
    if reason:
        event["ResourceStatusReason"] = reason
    return event


def test_follow_explains_a_rollback_by_its_first_failed_resource(clean_env: Path) -> None:
    """Following an update that rolls back reports each new event and names the resource that failed."""
    # GIVEN CloudFormation answers: in progress, then rolled back, with the per-resource events
    client = boto3.client("cloudformation", region_name=REGION)
    stub = Stubber(client)
    newest_first = [
        _raw_event(5, "gpuctl", "AWS::CloudFormation::Stack", "UPDATE_ROLLBACK_COMPLETE"),
        _raw_event(4, "JobQueue", "AWS::SQS::Queue", "UPDATE_FAILED", "Resource update cancelled"),
        _raw_event(3, "SchedulerFunction", "AWS::Lambda::Function", "UPDATE_FAILED",
                   "Error occurred while GetObject. S3 Error Code: NoSuchKey."),
        _raw_event(2, "gpuctl", "AWS::CloudFormation::Stack", "UPDATE_IN_PROGRESS", "User Initiated"),
        _raw_event(1, "gpuctl", "AWS::CloudFormation::Stack", "CREATE_COMPLETE"),
    ]
    stub.add_response("describe_stacks", _stack("UPDATE_IN_PROGRESS"), {"StackName": "gpuctl"})
    stub.add_response("describe_stack_events", {"StackEvents": newest_first[3:]}, {"StackName": "gpuctl"})
    stub.add_response("describe_stacks", _stack("UPDATE_ROLLBACK_COMPLETE"), {"StackName": "gpuctl"})
    stub.add_response("describe_stack_events", {"StackEvents": newest_first}, {"StackName": "gpuctl"})
    reported: list[StackEvent] = []
    # WHEN the stack is followed (event e1 predates the update)
    with stub:
        info, events = Stacks(client).follow("gpuctl", seen={"e1"}, on_event=reported.append, delay=0,
                                             sleep=lambda _s: None)
    # THEN every new event was reported once, oldest first, and the explanation names the root cause
    assert [e.event_id for e in reported] == ["e2", "e3", "e4", "e5"]
    assert info.status == "UPDATE_ROLLBACK_COMPLETE"
    message = explain_failure("gpuctl", info.status, info.status_reason, events)
    assert message.startswith("The stack gpuctl could not be updated and was rolled back (UPDATE_ROLLBACK_COMPLETE): "
                              "SchedulerFunction (AWS::Lambda::Function) failed: Error occurred while GetObject.")
    assert "back on its previous configuration" in message


@pytest.mark.parametrize(
    ("status", "events", "expected"),
    [
        ("ROLLBACK_COMPLETE",
         [StackEvent("1", NOW, "TaskTable", "AWS::DynamoDB::Table", "CREATE_FAILED", "task_store already exists")],
         ["could not be created and was rolled back", "TaskTable (AWS::DynamoDB::Table) failed: task_store already "
          "exists.", "gpuctl destroy --stack gpuctl"]),
        ("DELETE_FAILED",
         [StackEvent("1", NOW, "DataBucket", "AWS::S3::Bucket", "DELETE_FAILED", "The bucket you tried to delete "
                     "is not empty")],
         ["could not be deleted", "DataBucket (AWS::S3::Bucket) failed", "empty the bucket"]),
        ("UPDATE_ROLLBACK_FAILED", [], ["ContinueUpdateRollback"]),
    ],
)
def test_failures_are_explained_in_plain_words(status: str, events: list[StackEvent], expected: list[str]) -> None:
    """Each failure status gets the failed resource, its reason and what to do next."""
    message = explain_failure("gpuctl", status, None, events)

    for part in expected:
        assert part in message


def test_a_failed_deletion_raises_with_the_reason(clean_env: Path) -> None:
    """When the delete waiter fails, the stack's DELETE_FAILED reason is raised, not a waiter error."""
    client = boto3.client("cloudformation", region_name=REGION)
    stub = Stubber(client)
    stub.add_response("describe_stacks", _stack("DELETE_FAILED"), {"StackName": "gpuctl"})  # the waiter
    stub.add_response("describe_stacks", _stack("DELETE_FAILED"), {"StackName": "gpuctl"})
    stub.add_response("describe_stack_events", {"StackEvents": [
        _raw_event(2, "DataBucket", "AWS::S3::Bucket", "DELETE_FAILED", "The bucket you tried to delete is not empty"),
    ]}, {"StackName": "arn:aws:cloudformation:us-east-1:1:stack/gpuctl/x"})

    with stub, pytest.raises(StackFailed, match=r"DataBucket .* not empty") as caught:
        Stacks(client).wait_deleted("gpuctl", timeout=1, delay=1)
    assert caught.value.status == "DELETE_FAILED"
