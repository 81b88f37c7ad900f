"""`gpuctl fleet status|scale`, `instance …` in fleet mode, and the instance column of `jobs list`/`status`,
run at the CLI's boundary against moto's server (exit codes, stdout JSON against its schema, stderr sentences)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import boto3
import jsonschema
import pytest

import handler
from gpuctl import schemas
from gpuctl.models import JobRecord, JobStatus, JobType
from tests.helpers import FLEET_GROUP, REGION, Resources, create_fleet_group, invoke

pytestmark = pytest.mark.server


@pytest.fixture
def fleet_env(server_aws: Resources) -> dict[str, str]:
    session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing")
    create_fleet_group(session, server_aws.endpoint_url, max_size=4)
    return server_aws.env() | {"GPUCTL_FLEET_GROUP": FLEET_GROUP}


def as_json(got: Any, name: str) -> dict[str, Any]:
    assert got.code == 0, got.stderr
    doc: dict[str, Any] = json.loads(got.stdout)
    jsonschema.validate(doc, schemas.definition(name))
    return doc


def test_scale_sets_a_floor_the_scheduler_honours(fleet_env: dict[str, str], server_aws: Resources,
                                                   capsys: Any) -> None:
    """GIVEN a fleet at 0 WHEN `fleet scale 2 --for 2h` THEN 2 desired, status shows the floor and 2 instances,
    and an idle scheduler run keeps 2 until the floor ends; `fleet scale 0` removes it."""
    empty = as_json(invoke(["fleet", "status", "-o", "json"], fleet_env, capsys), "fleet status")
    assert (empty["desired"], empty["floor"], empty["instances"]) == (0, 0, [])
    assert "No instances" in invoke(["fleet", "status"], fleet_env, capsys).stderr

    scaled = as_json(invoke(["fleet", "scale", "2", "--for", "2h", "--reason", "release batch", "-o", "json"],
                            fleet_env, capsys), "fleet scale")
    assert (scaled["desired_before"], scaled["desired"], scaled["floor"]) == (0, 2, 2)
    assert scaled["floor_until"] == pytest.approx(time.time() + 7200, abs=60)
    status = as_json(invoke(["fleet", "status", "-o", "json"], fleet_env, capsys), "fleet status")
    assert (status["floor"], status["floor_reason"], len(status["instances"])) == (2, "release batch", 2)
    assert all(not m["protected"] and m["jobs_in_hand"] == 0 for m in status["instances"])
    assert invoke(["fleet", "status", "-q"], fleet_env, capsys).stdout == "2\n"

    endpoint = str(server_aws.endpoint_url)
    config = handler.SchedulerConfig.from_env({"QUEUE_URL": server_aws.queue_url, "TABLE_NAME": server_aws.table_name,
                                               "FLEET_GROUP": FLEET_GROUP, "AWS_ENDPOINT_URL": endpoint})
    clients = handler.make_clients(REGION, endpoint, fleet=True)
    held = handler.run_once(config, clients, now=time.time() + 3600, trigger="schedule")
    assert (held["action"], held["desired"]) == ("none", 2)
    after = handler.run_once(config, clients, now=time.time() + 3 * 3600, trigger="schedule")
    assert (after["desired"], after["code"]) == (0, "idle")

    removed = as_json(invoke(["fleet", "scale", "0", "-o", "json"], fleet_env, capsys), "fleet scale")
    assert removed["floor"] == 0 and removed["floor_until"] is None


def test_scale_beyond_the_maximum_is_refused(fleet_env: dict[str, str], capsys: Any) -> None:
    """GIVEN max 4 WHEN `fleet scale 5` THEN exit 2 with the way to raise the maximum, and nothing changes."""
    got = invoke(["fleet", "scale", "5"], fleet_env, capsys)
    assert got.code == 2 and "at most 4 instances" in got.stderr and "--max-instances 5" in got.stderr
    assert got.stdout == ""
    bad = invoke(["fleet", "scale", "2", "--for", "9d"], fleet_env, capsys)
    assert bad.code == 2 and "maximum hold" in bad.stderr


def test_fleet_commands_need_a_fleet(server_aws: Resources, capsys: Any) -> None:
    """GIVEN single-instance mode WHEN `fleet status` THEN exit 2 naming the fleet_group setting."""
    got = invoke(["fleet", "status"], server_aws.env(), capsys)
    assert got.code == 2 and "fleet_group" in got.stderr and "Traceback" not in got.stderr


@pytest.mark.parametrize(("args", "pointer"), [
    (["instance", "status"], "gpuctl fleet status"),
    (["instance", "start"], "gpuctl fleet scale 1"),
    (["instance", "stop"], "gpuctl fleet scale 0"),
    (["instance", "hold", "--for", "1h"], "gpuctl fleet scale N --for 2h"),
    (["instance", "release"], "gpuctl fleet scale 0"),
    (["instance", "why-stopped"], "gpuctl instance decisions"),
])
def test_instance_commands_point_to_fleet_commands(fleet_env: dict[str, str], capsys: Any, args: list[str],
                                                   pointer: str) -> None:
    """GIVEN fleet mode WHEN an `instance …` command that drives one instance runs THEN exit 2 and a pointer."""
    got = invoke(args, fleet_env, capsys)
    assert got.code == 2 and "fleet mode" in got.stderr and pointer in got.stderr, got.stderr
    assert got.stdout == ""


def test_jobs_show_the_instance_that_ran_them(fleet_env: dict[str, str], server_aws: Resources,
                                             capsys: Any) -> None:
    """GIVEN a job claimed on a fleet instance WHEN `jobs list` / `status` THEN the instance is shown (and in JSON)."""
    from gpuctl.aws.dynamo import JobTable
    from tests.helpers import _test_client

    now = time.time()
    record = JobRecord(task_id=str(uuid.uuid4()), status=JobStatus.PROCESSING, job_type=JobType.CAMERA_ANGLE.api_path,
                       created_at=now, updated_at=now, worker="w-1", instance_id="i-0123456789abcdef0")
    JobTable(_test_client("dynamodb", server_aws.endpoint_url), server_aws.table_name).create(record)
    listed = invoke(["jobs", "list"], fleet_env, capsys)
    assert listed.code == 0 and "Instance" in listed.stdout and "i-0123456789abcdef0" in listed.stdout
    shown = invoke(["status", record.task_id], fleet_env, capsys)
    assert "i-0123456789abcdef0" in shown.stdout
    doc = as_json(invoke(["status", record.task_id, "-o", "json"], fleet_env, capsys), "status")
    assert doc["instance_id"] == "i-0123456789abcdef0"


def group_tags(endpoint: str | None) -> dict[str, str]:
    from tests.helpers import _test_client

    g = _test_client("autoscaling", endpoint).describe_auto_scaling_groups(
        AutoScalingGroupNames=[FLEET_GROUP])["AutoScalingGroups"][0]
    return {t["Key"]: t["Value"] for t in g["Tags"]}


def test_submit_and_scale_tag_the_capacity_change_they_make(fleet_env: dict[str, str], server_aws: Resources,
                                                            tmp_path: Any, capsys: Any) -> None:
    """GIVEN a fleet at 0 WHEN a submit raises it to 1, then `fleet scale 3 --reason` to 3 THEN the group's capacity
    tags name each change, its reason and its sizes (the history names the members' starts after them)."""
    from tests.helpers import make_image

    submitted = invoke(["submit", "camera-angle", str(make_image(tmp_path / "in.png")), "-q"], fleet_env, capsys)
    assert submitted.code == 0, submitted.stderr
    tags = group_tags(server_aws.endpoint_url)
    assert (tags["gpuctl:capacity-by"], tags["gpuctl:capacity-reason"]) == ("gpuctl-cli", "job submitted")
    assert (tags["gpuctl:capacity-from"], tags["gpuctl:capacity-to"]) == ("0", "1")
    assert tags["gpuctl:capacity-at"] == tags["gpuctl:scaled-out-at"]

    assert invoke(["fleet", "scale", "3", "--reason", "release batch", "-q"], fleet_env, capsys).code == 0
    tags = group_tags(server_aws.endpoint_url)
    assert tags["gpuctl:capacity-reason"] == "fleet scale 3: release batch"
    assert (tags["gpuctl:capacity-from"], tags["gpuctl:capacity-to"]) == ("1", "3")
