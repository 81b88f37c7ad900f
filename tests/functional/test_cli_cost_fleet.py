"""`gpuctl cost report|simulate` in fleet mode, run as a user runs them, against moto's server: two members of an
Auto Scaling group (and one instance outside it) whose history the Lambda's own recorder wrote, in fleet mode."""

from __future__ import annotations

import json
import time

import boto3
import jsonschema
import pytest

import history
from gpuctl import schemas
from tests.helpers import (
    FLEET_GROUP,
    Resources,
    _test_client,
    create_fleet_group,
    create_history_table,
    create_resources,
    invoke,
)

CAMERA = "/api/v1/camera-angle/jobs"

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def fleet(moto_server: str) -> tuple[Resources, list[str], str]:
    """Three hours ago the group went to 2: member A ran 40 min (two jobs, one of them doctor's canary), member B
    ran 20 min (one job) and was terminated; an instance outside the group ran too. Every event went through the
    recorder in fleet mode, as the Lambda's rule (which passes every instance) delivers them."""
    import httpx

    httpx.post(f"{moto_server}/moto-api/reset", timeout=10).raise_for_status()
    session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing")
    res = create_resources(session, moto_server)
    table = create_history_table(session, moto_server)
    create_fleet_group(session, moto_server)
    autoscaling, ec2, ddb = (_test_client(n, moto_server) for n in ("autoscaling", "ec2", "dynamodb"))
    autoscaling.set_desired_capacity(AutoScalingGroupName=FLEET_GROUP, DesiredCapacity=2)
    a, b = sorted(i["InstanceId"] for i in autoscaling.describe_auto_scaling_groups(
        AutoScalingGroupNames=[FLEET_GROUP])["AutoScalingGroups"][0]["Instances"])
    config = history.HistoryConfig(table, fleet_group=FLEET_GROUP)
    t0 = float(int(time.time()) - 3 * 3600)
    changes = [(a, "pending", 0), (a, "running", 30), (b, "pending", 600), (b, "running", 630),
               (b, "shutting-down", 1830), (b, "terminated", 1850), (a, "stopping", 2430), (a, "stopped", 2450),
               (res.instance_id, "running", 100), (res.instance_id, "stopping", 900)]
    for instance_id, state, offset in changes:
        record = history.record_event(history.state_change_event(instance_id, state, at=t0 + offset), config,
                                      ec2, ddb)
        assert record["stored"] is (instance_id != res.instance_id), record
    ec2.terminate_instances(InstanceIds=[b])
    for task_id, instance_id, start, end, canary in (("a-1", a, 60, 660, False), ("a-canary", a, 700, 720, True),
                                                     ("b-1", b, 660, 1260, False)):
        item = {"task_id": {"S": task_id}, "status": {"S": "completed"}, "job_type": {"S": CAMERA},
                "created_at": {"N": str(t0 + start - 20)}, "updated_at": {"N": str(t0 + end)},
                "started_at": {"N": str(t0 + start)}, "finished_at": {"N": str(t0 + end)},
                "instance_id": {"S": instance_id}}
        if canary:
            item["canary"] = {"BOOL": True}
        ddb.put_item(TableName=res.table_name, Item=item)
    res.extra_env.update({"GPUCTL_HISTORY_TABLE": table, "GPUCTL_FLEET_GROUP": FLEET_GROUP})
    return res, [a, b], t0


def test_fleet_report_bills_each_member_and_charges_jobs_where_they_ran(
        fleet: tuple[Resources, list[str], float], capsys: pytest.CaptureFixture[str]) -> None:
    """--output json in fleet mode: a line per member, billed at g5.xlarge, jobs on their own member's time."""
    # GIVEN
    res, (a, b), _t0 = fleet
    # WHEN
    result = invoke(["cost", "report", "--since", "1d", "--output", "json"], res.env(), capsys)
    # THEN
    assert result.code == 0, result.stderr
    doc = json.loads(result.stdout)
    jsonschema.validate(doc, schemas.definition("cost report"))
    assert doc["fleet_group"] == FLEET_GROUP and doc["instance_id"] is None
    rows = {i["instance_id"]: i for i in doc["instances"]}
    assert set(rows) == {a, b}  # the instance outside the group is not in the history
    assert (rows[a]["billed_seconds"], rows[b]["billed_seconds"]) == (2400, 1200)
    assert (rows[a]["busy_seconds"], rows[b]["busy_seconds"]) == (620, 600)
    assert doc["totals"]["cost"] == pytest.approx(3600 / 3600 * 1.006, abs=0.001)
    jobs = {j["job_id"]: j for j in doc["jobs"]}
    assert jobs["b-1"]["charged_seconds"] == pytest.approx(1200, abs=1)  # B's whole stretch: its one job
    assert jobs["a-1"]["charged_seconds"] + jobs["a-canary"]["charged_seconds"] == pytest.approx(2400, abs=1)
    assert {s["started_by"] for s in doc["stretches"]} == {"autoscaling"}
    # A is back in the group, stopped: its volume costs while stopped; B's went with it
    assert doc["ebs_while_stopped"]["volumes_gb"] and any("no longer exist" in w for w in doc["warnings"])


def test_fleet_report_text_has_a_line_per_instance(
        fleet: tuple[Resources, list[str], float], capsys: pytest.CaptureFixture[str]) -> None:
    """Text in fleet mode names the group and shows each member with its price, billed time and cost."""
    # GIVEN
    res, (a, b), _t0 = fleet
    # WHEN
    result = invoke(["cost", "report"], res.env(), capsys)
    # THEN
    assert result.code == 0, result.stderr
    assert f"fleet {FLEET_GROUP}: 2 instance(s) (g5.xlarge)" in result.stdout
    assert a in result.stdout and b in result.stdout and "$1.01/h" in result.stdout


def test_fleet_simulate_replays_the_group_and_leaves_out_canaries(
        fleet: tuple[Resources, list[str], float], capsys: pytest.CaptureFixture[str]) -> None:
    """cost simulate in fleet mode: the two real jobs replayed on the group (its maximum, --jobs-per-instance),
    the canary left out and said; text names the fleet."""
    # GIVEN
    res, _members, _t0 = fleet
    # WHEN
    result = invoke(["cost", "simulate", "--idle", "5m,30m", "--since", "1d", "--jobs-per-instance", "2",
                     "--output", "json"], res.env(), capsys)
    text = invoke(["cost", "simulate", "--idle", "5m,30m", "--since", "1d"], res.env(), capsys)
    bad = invoke(["cost", "simulate", "--jobs-per-instance", "0"], res.env(), capsys)
    # THEN
    assert result.code == 0, result.stderr
    doc = json.loads(result.stdout)
    jsonschema.validate(doc, schemas.definition("cost simulate"))
    assert (doc["jobs"], doc["fleet_group"], doc["max_instances"], doc["jobs_per_instance"]) == (
        2, FLEET_GROUP, 4, 2)
    assert any("1 job(s) of gpuctl doctor --canary are left out" in w for w in doc["warnings"])
    short, long = doc["windows"]
    assert short["gpu_hours"] <= long["gpu_hours"] and short["cold_starts"] >= 1
    assert text.code == 0 and f"on the fleet {FLEET_GROUP} (up to 4 instances, 4 jobs each)" in text.stderr
    assert bad.code == 2 and "--jobs-per-instance must be at least 1" in bad.stderr
