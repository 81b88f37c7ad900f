"""`gpuctl doctor` against the stack deployed into moto's server: every check passes on a healthy setup, and
each one is made to fail on purpose."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import boto3
import jsonschema
import pytest

from gpuctl import schemas
from gpuctl.local.stack_gaps import fill_gaps
from gpuctl.services.context import Gateways
from gpuctl.services.doctor import run_checks
from gpuctl.settings import Settings
from tests.helpers import REGION, deploy_fresh_stack, run_cli

pytestmark = [pytest.mark.server, pytest.mark.filterwarnings("ignore:Tried to parse AWS:UserWarning")]


def client(name: str, endpoint: str) -> Any:
    return boto3.client(name, region_name=REGION, endpoint_url=endpoint, aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def heartbeat(endpoint: str, table: str, age: float = 0.0) -> None:
    """The activity marker as a polling adapter writes it, ``age`` seconds ago."""
    client("dynamodb", endpoint).update_item(
        TableName=table, Key={"task_id": {"S": "gpuctl#activity"}},
        UpdateExpression="SET adapter_seen_at = :t, adapter_state = :s",
        ExpressionAttributeValues={":t": {"N": str(time.time() - age)}, ":s": {"S": "running"}})


def lifecycle(endpoint: str, bucket: str) -> None:
    """The template's bucket rules (the emulator's CloudFormation skips LifecycleConfiguration)."""
    client("s3", endpoint).put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={
        "Rules": [{"ID": "expire-inputs", "Status": "Enabled", "Filter": {"Prefix": "inputs/"},
                   "Expiration": {"Days": 7}},
                  {"ID": "abort-incomplete-uploads", "Status": "Enabled", "Filter": {"Prefix": ""},
                   "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 7}}]})


def healthy(endpoint: str) -> dict[str, str]:
    """Deploy the stack and finish what the emulator leaves out (alarms, TTL, lifecycle, the profile's
    association, which the README tells the operator to do); return the outputs."""
    _settings, clients, result = deploy_fresh_stack(endpoint)
    fill_gaps(clients, result.stack_name)
    out = result.outputs
    client("ec2", endpoint).associate_iam_instance_profile(
        InstanceId=out["InstanceId"], IamInstanceProfile={"Name": out["InstanceProfileName"]})
    lifecycle(endpoint, out["BucketName"])
    heartbeat(endpoint, out["TableName"])
    return out


def test_doctor_passes_a_healthy_setup_and_fails_each_broken_invariant(moto_server: str) -> None:
    """Healthy: exit 0, every check passes. Then each invariant broken in turn is reported, and repaired."""
    # GIVEN a healthy deployed setup
    out = healthy(moto_server)
    sqs, lam, cw, events = (client(n, moto_server) for n in ("sqs", "lambda", "cloudwatch", "events"))
    ec2, ddb, s3 = (client(n, moto_server) for n in ("ec2", "dynamodb", "s3"))
    # WHEN the CLI runs as a user runs it
    ok = run_cli(["doctor", "--output", "json"], {})
    # THEN
    assert ok.returncode == 0, ok.stdout + ok.stderr
    doc = json.loads(ok.stdout)
    jsonschema.validate(doc, schemas.definition("doctor"))
    assert doc["worst"] == "pass", [f for f in doc["findings"] if f["level"] != "pass"]
    checks = {f["check"] for f in doc["findings"]}
    assert checks >= {"stack", "queue.visibility", "queue.dlq", "idle_window", "alarm", "schedule", "history_rule",
                      "scheduler.environment", "instance.profile", "table.index", "table.ttl", "history.ttl",
                      "bucket.lifecycle", "cli.profile", "adapter.heartbeat"}

    env = {k: str(v) for k, v in lam.get_function_configuration(
        FunctionName=out["LambdaFunctionName"])["Environment"]["Variables"].items()}
    redrive = sqs.get_queue_attributes(QueueUrl=out["QueueUrl"], AttributeNames=["RedrivePolicy"])["Attributes"]
    alarm = out["AlarmName"]
    association = ec2.describe_iam_instance_profile_associations()["IamInstanceProfileAssociations"][0]

    def set_env(**values: str) -> Callable[[], None]:
        def apply() -> None:
            lam.update_function_configuration(FunctionName=out["LambdaFunctionName"],
                                              Environment={"Variables": {**env, **values}})
        return apply

    def queue(**attributes: str) -> Callable[[], None]:
        return lambda: sqs.set_queue_attributes(QueueUrl=out["QueueUrl"], Attributes=attributes)

    cases: list[tuple[str, str, Callable[[], None], Callable[[], None]]] = [
        ("queue.visibility", "fail", queue(VisibilityTimeout="20"), queue(VisibilityTimeout="300")),
        ("queue.visibility", "warn", queue(VisibilityTimeout="60"), queue(VisibilityTimeout="300")),
        ("queue.dlq", "warn", queue(RedrivePolicy=json.dumps({**json.loads(redrive["RedrivePolicy"]),
                                                               "maxReceiveCount": 50})),
         queue(RedrivePolicy=redrive["RedrivePolicy"])),
        ("queue.dlq", "fail", queue(RedrivePolicy=""), queue(RedrivePolicy=redrive["RedrivePolicy"])),
        ("idle_window", "warn", set_env(IDLE_MINUTES="20"), set_env()),
        ("scheduler.environment", "fail", set_env(QUEUE_URL=out["DeadLetterQueueUrl"]), set_env()),
        ("alarm", "fail", lambda: cw.disable_alarm_actions(AlarmNames=[alarm]),
         lambda: cw.enable_alarm_actions(AlarmNames=[alarm])),
        ("alarm", "fail", lambda: cw.delete_alarms(AlarmNames=[alarm]),
         lambda: fill_gaps(Gateways(Settings(region=REGION, endpoint_url=moto_server)).clients, "gpuctl")),
        ("schedule", "fail", lambda: events.disable_rule(Name=out["ScheduleRuleName"]),
         lambda: events.enable_rule(Name=out["ScheduleRuleName"])),
        ("history_rule", "fail", lambda: events.remove_targets(Rule=out["StateChangeRuleName"], Ids=["gpuctl-history"]),
         lambda: events.put_targets(Rule=out["StateChangeRuleName"], Targets=[
             {"Id": "gpuctl-history", "Arn": lam.get_function(FunctionName=out["LambdaFunctionName"])[
                 "Configuration"]["FunctionArn"]}])),
        ("instance.profile", "fail",
         lambda: ec2.disassociate_iam_instance_profile(AssociationId=association["AssociationId"]),
         lambda: ec2.associate_iam_instance_profile(InstanceId=out["InstanceId"],
                                                    IamInstanceProfile={"Name": out["InstanceProfileName"]})),
        ("table.index", "fail",
         lambda: ddb.update_table(TableName=out["TableName"], GlobalSecondaryIndexUpdates=[
             {"Delete": {"IndexName": "status-created_at-index"}}]),
         lambda: ddb.update_table(TableName=out["TableName"], AttributeDefinitions=[
             {"AttributeName": "status", "AttributeType": "S"}, {"AttributeName": "created_at", "AttributeType": "N"}],
             GlobalSecondaryIndexUpdates=[{"Create": {
                 "IndexName": "status-created_at-index", "Projection": {"ProjectionType": "ALL"},
                 "KeySchema": [{"AttributeName": "status", "KeyType": "HASH"},
                               {"AttributeName": "created_at", "KeyType": "RANGE"}]}}])),
        ("table.ttl", "warn",
         lambda: ddb.update_time_to_live(TableName=out["TableName"], TimeToLiveSpecification={
             "AttributeName": "expires_at", "Enabled": False}),
         lambda: ddb.update_time_to_live(TableName=out["TableName"], TimeToLiveSpecification={
             "AttributeName": "expires_at", "Enabled": True})),
        ("bucket.lifecycle", "warn", lambda: s3.delete_bucket_lifecycle(Bucket=out["BucketName"]),
         lambda: lifecycle(moto_server, out["BucketName"])),
        ("adapter.heartbeat", "fail", lambda: heartbeat(moto_server, out["TableName"], age=600),
         lambda: heartbeat(moto_server, out["TableName"])),
    ]
    for check, level, breaks, repair in cases:
        # WHEN one invariant is broken
        breaks()
        found = run_checks(Gateways(Settings(region=REGION, endpoint_url=moto_server)))
        # THEN exactly that check reports it (and the others still pass)
        bad = {(f.check, f.level) for f in found if f.level != "pass"}
        assert bad == {(check, level)}, (check, level, [f for f in found if f.level != "pass"])
        assert all(f.fix for f in found if f.level != "pass")
        repair()

    # the CLI profile pointing elsewhere, the instance stopped (no adapter expected), no stack
    wrong = {f.check: f.level for f in run_checks(Gateways(Settings(region=REGION, endpoint_url=moto_server,
                                                                    queue_url=out["DeadLetterQueueUrl"])))}
    assert wrong["cli.profile"] == "fail"
    ec2.stop_instances(InstanceIds=[out["InstanceId"]])
    heartbeat(moto_server, out["TableName"], age=3600)
    assert {f.check: f.level for f in run_checks(Gateways(Settings(region=REGION, endpoint_url=moto_server)))}[
        "adapter.heartbeat"] == "pass"
    failed = run_cli(["doctor", "-q"], {"GPUCTL_STACK_NAME": "no-such-stack"})
    assert failed.returncode == 1
    assert "FAIL  stack: the stack no-such-stack does not exist" in failed.stdout
    assert "Traceback" not in failed.stderr


def test_local_scheduler_loop_records_the_state_changes_it_sees(moto_server: str) -> None:
    """Local mode: the scheduler loop turns observed state changes into history items (moto emits no events),
    with gpuctl's cause, and `gpuctl cost report` reads them."""
    # GIVEN the deployed stack and its running instance
    _settings, _clients, result = deploy_fresh_stack(moto_server)
    out = result.outputs
    proc = subprocess.Popen([sys.executable, "-m", "gpuctl.local.scheduler", "--endpoint-url", moto_server,
                             "--function-name", out["LambdaFunctionName"], "--interval", "0.3"],
                            env={**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ddb = client("dynamodb", moto_server)

    def states() -> list[dict[str, Any]]:
        items = ddb.query(TableName=out["HistoryTableName"], KeyConditionExpression="instance_id = :i",
                          ExpressionAttributeValues={":i": {"S": out["InstanceId"]}})["Items"]
        return [{k: next(iter(v.values())) for k, v in i.items()} for i in items]

    def wait_for(state: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = states()
            if found and found[-1]["state"] == state:
                return found
            time.sleep(0.3)
        raise AssertionError(f"no {state} recorded: {states()}")

    try:
        wait_for("running")
        # WHEN the operator stops it with gpuctl
        stopped = run_cli(["instance", "stop"], {})
        assert stopped.returncode == 0, stopped.stderr
        found = wait_for("stopped")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    # THEN
    assert found[-1]["cause"] == "cli" and found[-1]["reason"] == "manual stop"
    report = run_cli(["cost", "report", "--since", "1h", "--output", "json"], {})
    assert report.returncode == 0, report.stderr
    assert len(json.loads(report.stdout)["stretches"]) == 1
