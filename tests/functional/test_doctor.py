"""`gpuctl doctor` against the stack deployed into moto's server: every check passes on a healthy setup, and
each one is made to fail on purpose."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import jsonschema
import pytest

from gpuctl import schemas
from gpuctl.local.stack_gaps import fill_gaps
from gpuctl.services.context import Gateways
from gpuctl.services.doctor import CHECK_NAMES, Finding, run_checks
from gpuctl.settings import Settings
from tests.helpers import REGION, deploy_fresh_stack, invoke

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


@dataclass(frozen=True)
class World:
    """The healthy setup deployed once for the module, and the CLI profile its deploy wrote."""

    endpoint: str
    outputs: dict[str, str]
    config: Path
    gw: Gateways  # clients built once for the module (each costs a fraction of a second)

    def checks(self, only: set[str]) -> list[Finding]:
        return run_checks(self.gw, only=only)


@pytest.fixture(scope="module")
def world(moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> World:
    """Deployed once: every test here repairs what it breaks (the last one, the scheduler loop, stops the
    instance and must stay last)."""
    config = tmp_path_factory.mktemp("doctor-profile")
    with pytest.MonkeyPatch.context() as env:
        for name in [n for n in os.environ if n.startswith(("AWS_", "GPUCTL_"))]:
            env.delenv(name)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("GPUCTL_CONFIG_DIR", str(config))
        return World(moto_server, healthy(moto_server), config,
                     Gateways(Settings(region=REGION, endpoint_url=moto_server)))


@pytest.fixture
def deployed(world: World, clean_env: Path) -> dict[str, str]:
    """The module's healthy setup, its profile in this test's config folder and the adapter's heartbeat fresh."""
    shutil.copytree(world.config, clean_env, dirs_exist_ok=True)
    heartbeat(world.endpoint, world.outputs["TableName"])
    return world.outputs


def test_doctor_passes_a_healthy_setup(deployed: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """Healthy: exit 0, every check passes, the JSON follows the schema (canary null without --canary)."""
    # GIVEN a healthy deployed setup
    # WHEN the CLI runs as a user runs it
    ok = invoke(["doctor", "--output", "json"], {}, capsys)
    # THEN
    assert ok.code == 0, ok.stdout + ok.stderr
    doc = json.loads(ok.stdout)
    jsonschema.validate(doc, schemas.definition("doctor"))
    assert doc["worst"] == "pass", [f for f in doc["findings"] if f["level"] != "pass"]
    assert [f["check"] for f in doc["findings"]] == list(CHECK_NAMES)
    assert doc["canary"] is None


def _cases(endpoint: str, out: dict[str, str]) -> dict[str, tuple[str, str, Callable[[], Any], Callable[[], Any]]]:
    """Each broken invariant: (the finding, its level, how to break it, how to repair it)."""
    sqs, lam, cw, events = (client(n, endpoint) for n in ("sqs", "lambda", "cloudwatch", "events"))
    ec2, ddb, s3 = (client(n, endpoint) for n in ("ec2", "dynamodb", "s3"))
    env = {k: str(v) for k, v in lam.get_function_configuration(
        FunctionName=out["LambdaFunctionName"])["Environment"]["Variables"].items()}
    redrive = sqs.get_queue_attributes(QueueUrl=out["QueueUrl"], AttributeNames=["RedrivePolicy"])["Attributes"]
    alarm = out["AlarmName"]

    def set_env(**values: str) -> Callable[[], None]:
        def apply() -> None:
            lam.update_function_configuration(FunctionName=out["LambdaFunctionName"],
                                              Environment={"Variables": {**env, **values}})
        return apply

    def queue(**attributes: str) -> Callable[[], None]:
        return lambda: sqs.set_queue_attributes(QueueUrl=out["QueueUrl"], Attributes=attributes)

    def disassociate() -> None:
        [association] = ec2.describe_iam_instance_profile_associations()["IamInstanceProfileAssociations"]
        ec2.disassociate_iam_instance_profile(AssociationId=association["AssociationId"])

    return {
        "visibility-below-heartbeat": ("queue.visibility", "fail", queue(VisibilityTimeout="20"),
                                       queue(VisibilityTimeout="300")),
        "visibility-below-extension": ("queue.visibility", "warn", queue(VisibilityTimeout="60"),
                                       queue(VisibilityTimeout="300")),
        "dlq-unbounded": ("queue.dlq", "warn", queue(RedrivePolicy=json.dumps(
            {**json.loads(redrive["RedrivePolicy"]), "maxReceiveCount": 50})),
            queue(RedrivePolicy=redrive["RedrivePolicy"])),
        "no-dlq": ("queue.dlq", "fail", queue(RedrivePolicy=""), queue(RedrivePolicy=redrive["RedrivePolicy"])),
        "idle-window-short": ("idle_window", "warn", set_env(IDLE_MINUTES="20"), set_env()),
        "scheduler-watches-dlq": ("scheduler.environment", "fail", set_env(QUEUE_URL=out["DeadLetterQueueUrl"]),
                                  set_env()),
        "alarm-disabled": ("alarm", "fail", lambda: cw.disable_alarm_actions(AlarmNames=[alarm]),
                           lambda: cw.enable_alarm_actions(AlarmNames=[alarm])),
        "alarm-deleted": ("alarm", "fail", lambda: cw.delete_alarms(AlarmNames=[alarm]),
                          lambda: fill_gaps(Gateways(Settings(region=REGION, endpoint_url=endpoint)).clients,
                                            "gpuctl")),
        "schedule-disabled": ("schedule", "fail", lambda: events.disable_rule(Name=out["ScheduleRuleName"]),
                              lambda: events.enable_rule(Name=out["ScheduleRuleName"])),
        "history-rule-untargeted": (
            "history_rule", "fail",
            lambda: events.remove_targets(Rule=out["StateChangeRuleName"], Ids=["gpuctl-history"]),
            lambda: events.put_targets(Rule=out["StateChangeRuleName"], Targets=[
                {"Id": "gpuctl-history", "Arn": lam.get_function(FunctionName=out["LambdaFunctionName"])[
                    "Configuration"]["FunctionArn"]}])),
        "no-instance-profile": ("instance.profile", "fail", disassociate,
                                lambda: ec2.associate_iam_instance_profile(
                                    InstanceId=out["InstanceId"],
                                    IamInstanceProfile={"Name": out["InstanceProfileName"]})),
        "no-status-index": (
            "table.index", "fail",
            lambda: ddb.update_table(TableName=out["TableName"], GlobalSecondaryIndexUpdates=[
                {"Delete": {"IndexName": "status-created_at-index"}}]),
            lambda: ddb.update_table(TableName=out["TableName"], AttributeDefinitions=[
                {"AttributeName": "status", "AttributeType": "S"},
                {"AttributeName": "created_at", "AttributeType": "N"}],
                GlobalSecondaryIndexUpdates=[{"Create": {
                    "IndexName": "status-created_at-index", "Projection": {"ProjectionType": "ALL"},
                    "KeySchema": [{"AttributeName": "status", "KeyType": "HASH"},
                                  {"AttributeName": "created_at", "KeyType": "RANGE"}]}}])),
        "no-ttl": ("table.ttl", "warn",
                   lambda: ddb.update_time_to_live(TableName=out["TableName"], TimeToLiveSpecification={
                       "AttributeName": "expires_at", "Enabled": False}),
                   lambda: ddb.update_time_to_live(TableName=out["TableName"], TimeToLiveSpecification={
                       "AttributeName": "expires_at", "Enabled": True})),
        "no-lifecycle": ("bucket.lifecycle", "warn", lambda: s3.delete_bucket_lifecycle(Bucket=out["BucketName"]),
                         lambda: lifecycle(endpoint, out["BucketName"])),
        "silent-adapter": ("adapter.heartbeat", "fail", lambda: heartbeat(endpoint, out["TableName"], age=600),
                           lambda: heartbeat(endpoint, out["TableName"])),
    }


CASES = ("visibility-below-heartbeat", "visibility-below-extension", "dlq-unbounded", "no-dlq", "idle-window-short",
         "scheduler-watches-dlq", "alarm-disabled", "alarm-deleted", "schedule-disabled", "history-rule-untargeted",
         "no-instance-profile", "no-status-index", "no-ttl", "no-lifecycle", "silent-adapter")


@pytest.fixture(scope="module")
def cases(world: World) -> dict[str, tuple[str, str, Callable[[], Any], Callable[[], Any]]]:
    return _cases(world.endpoint, world.outputs)


@pytest.mark.parametrize("case", CASES)
def test_each_broken_invariant_is_reported_by_its_check(
        case: str, cases: dict[str, tuple[str, str, Callable[[], Any], Callable[[], Any]]], world: World,
        deployed: dict[str, str]) -> None:
    """One invariant broken: its check (run alone, as `--check NAME` runs it) reports it with a fix; repaired,
    it passes again (the healthy test shows every check passing before)."""
    # GIVEN a healthy setup with one invariant broken
    check, level, breaks, repair = cases[case]
    breaks()
    try:
        # WHEN its check runs
        found = world.checks({check})
        # THEN exactly that finding reports it, with the fix
        assert [(f.check, f.level) for f in found] == [(check, level)], found
        assert found[0].fix
    finally:
        repair()
    assert [(f.check, f.level) for f in world.checks({check})] == [(check, "pass")]


def test_check_option_runs_the_named_checks_only(
        deployed: dict[str, str], moto_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--check queue --check cli.profile`: the queue's findings and the profile's; a wrong profile fails; an
    unknown name is a usage error naming the checks."""
    # GIVEN the healthy setup
    # WHEN
    picked = invoke(["doctor", "--check", "queue", "--check", "cli.profile"], {}, capsys)
    unknown = invoke(["doctor", "--check", "queues"], {}, capsys)
    # THEN
    assert picked.code == 0, picked.stdout + picked.stderr
    assert [line.split(":")[0] for line in picked.stdout.splitlines()] == [
        "ok    queue.visibility", "ok    queue.dlq", "ok    cli.profile"]
    assert "3 passed, 0 warnings, 0 failed." in picked.stderr
    assert unknown.code == 2 and "--check 'queues' is not a check; the checks are: stack, " in unknown.stderr
    assert "Traceback" not in unknown.stderr
    # AND the CLI profile pointing elsewhere fails its check
    wrong = run_checks(Gateways(Settings(region=REGION, endpoint_url=moto_server,
                                         queue_url=deployed["DeadLetterQueueUrl"])), only={"cli.profile"})
    assert [(f.check, f.level) for f in wrong] == [("cli.profile", "fail")]


def test_a_stopped_instance_expects_no_adapter_and_a_missing_stack_fails(
        deployed: dict[str, str], world: World, moto_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Stopped: a silent adapter is fine. No stack: one FAIL, exit 1, whatever --check asks."""
    # GIVEN the instance stopped, its adapter silent for an hour
    ec2 = client("ec2", moto_server)
    ec2.stop_instances(InstanceIds=[deployed["InstanceId"]])
    heartbeat(moto_server, deployed["TableName"], age=3600)
    try:
        # WHEN / THEN
        assert [(f.check, f.level) for f in world.checks({"adapter.heartbeat"})] == [
            ("adapter.heartbeat", "pass")]
    finally:
        ec2.start_instances(InstanceIds=[deployed["InstanceId"]])
    failed = invoke(["doctor", "-q", "--check", "queue"], {"GPUCTL_STACK_NAME": "no-such-stack"}, capsys)
    assert failed.code == 1
    assert failed.stdout.splitlines() == ["FAIL  stack: the stack no-such-stack does not exist",
                                          "      fix: gpuctl deploy --instance-id i-..."]
    assert "Traceback" not in failed.stderr


def test_local_scheduler_loop_records_the_state_changes_it_sees(
        deployed: dict[str, str], moto_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Local mode: the scheduler loop turns observed state changes into history items (moto emits no events),
    with gpuctl's cause, and `gpuctl cost report` reads them. (Last: it leaves the instance stopped.)"""
    # GIVEN the deployed stack and its running instance
    out = deployed
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
        stopped = invoke(["instance", "stop"], {}, capsys)
        assert stopped.code == 0, stopped.stderr
        found = wait_for("stopped")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    # THEN
    assert found[-1]["cause"] == "cli" and found[-1]["reason"] == "manual stop"
    report = invoke(["cost", "report", "--since", "1h", "--output", "json"], {}, capsys)
    assert report.code == 0, report.stderr
    assert len(json.loads(report.stdout)["stretches"]) == 1
