"""What moto's CloudFormation skips (alarms, TTL) is created by local mode from the template itself, conditions
and intrinsic functions resolved as CloudFormation would."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TEMPLATE = """
Parameters:
  ExistingQueueUrl: {Type: String, Default: ""}
  Periods: {Type: Number, Default: 3}
Conditions:
  CreateQueue: !Equals [!Ref ExistingQueueUrl, ""]
  UseExisting: !Not [!Condition CreateQueue]
  Never: !And [!Condition CreateQueue, !Equals [!Ref Periods, 0]]
Resources:
  Queue:
    Type: AWS::SQS::Queue
    Condition: CreateQueue
    Properties: {QueueName: jobs}
  Table:
    Type: AWS::DynamoDB::Table
    Properties:
      TableName: tasks
      BillingMode: PAY_PER_REQUEST
      AttributeDefinitions: [{AttributeName: id, AttributeType: S}]
      KeySchema: [{AttributeName: id, KeyType: HASH}]
      TimeToLiveSpecification: {AttributeName: expires_at, Enabled: true}
  Idle:
    Type: AWS::CloudWatch::Alarm
    Properties:
      AlarmName: !Sub "${AWS::StackName}-idle"
      Namespace: AWS/SQS
      MetricName: ApproximateNumberOfMessagesVisible
      Statistic: Maximum
      Period: 60
      EvaluationPeriods: !Ref Periods
      Threshold: 0
      ComparisonOperator: LessThanOrEqualToThreshold
      Dimensions:
        - Name: QueueName
          Value: !If [CreateQueue, !GetAtt Queue.QueueName, !Select [4, !Split ["/", !Sub "${ExistingQueueUrl}/////"]]]
      AlarmActions: !If [UseExisting, ["arn:aws:sns:us-east-1:123456789012:ops"], !Ref AWS::NoValue]
  NeverCreated:
    Type: AWS::CloudWatch::Alarm
    Condition: Never
    Properties:
      AlarmName: never
      Namespace: AWS/SQS
      MetricName: ApproximateNumberOfMessagesVisible
      Statistic: Maximum
      Period: 60
      EvaluationPeriods: 1
      Threshold: 0
      ComparisonOperator: GreaterThanThreshold
"""


@pytest.fixture
def clients(clean_env: Path) -> Iterator[Any]:
    import boto3
    from moto import mock_aws

    from gpuctl.aws._session import make_clients
    from gpuctl.settings import Settings

    with mock_aws():
        boto3.client("sqs", region_name="us-east-1")  # moto needs a client created inside the mock
        yield make_clients(Settings(region="us-east-1"))


@pytest.mark.filterwarnings("ignore:Tried to parse:UserWarning")
@pytest.mark.parametrize(("existing", "queue_name", "actions"), [
    pytest.param("", "jobs", [], id="stack-creates-the-queue"),
    pytest.param("https://sqs.us-east-1.amazonaws.com/123456789012/gpu_tasks_queue", "gpu_tasks_queue",
                 ["arn:aws:sns:us-east-1:123456789012:ops"], id="existing-queue"),
])
def test_the_skipped_alarm_and_ttl_are_created_as_the_template_says(clients: Any, tmp_path: Path, existing: str,
                                                                    queue_name: str, actions: list[str]) -> None:
    """The alarm gets the branch of each Fn::If its condition picks; a resource whose condition is false is not
    created; the table's TTL is enabled."""
    from gpuctl.local.stack_gaps import fill_gaps

    # GIVEN the stack deployed into the emulator, which skipped the alarms and ignored the TTL
    template = tmp_path / "stack.yaml"
    template.write_text(TEMPLATE)
    clients.cloudformation.create_stack(StackName="lab", TemplateBody=TEMPLATE,
                                        Parameters=[{"ParameterKey": "ExistingQueueUrl", "ParameterValue": existing}])
    cloudwatch = clients.client("cloudwatch")
    assert cloudwatch.describe_alarms()["MetricAlarms"] == []

    # WHEN local mode fills the gaps
    created = fill_gaps(clients, "lab", template=template)

    # THEN the alarm is there as CloudFormation would have made it, and only what should exist was made
    assert sorted(created) == ["alarm lab-idle", "ttl tasks.expires_at"]
    (alarm,) = cloudwatch.describe_alarms()["MetricAlarms"]
    assert alarm["AlarmName"] == "lab-idle" and alarm["EvaluationPeriods"] == 3
    assert alarm["Dimensions"] == [{"Name": "QueueName", "Value": queue_name}]
    assert alarm["AlarmActions"] == actions
    ttl = clients.dynamodb.describe_time_to_live(TableName="tasks")["TimeToLiveDescription"]
    assert ttl["TimeToLiveStatus"] == "ENABLED"
    # … and a second run creates nothing
    assert fill_gaps(clients, "lab", template=template) == []
