"""`gpuctl cost report` run as a user runs it, against moto's server: history written by the Lambda's recorder."""

from __future__ import annotations

import json
import time
from typing import Any

import boto3
import jsonschema
import pytest

import history
from gpuctl import schemas
from tests.helpers import REGION, Resources, create_history_table, create_resources, invoke

CAMERA = "/api/v1/camera-angle/jobs"

pytestmark = pytest.mark.server


def client(name: str, endpoint: str) -> Any:
    return boto3.client(name, region_name=REGION, endpoint_url=endpoint, aws_access_key_id="testing",
                        aws_secret_access_key="testing")


@pytest.fixture(scope="module")
def recorded(moto_server: str) -> tuple[Resources, float]:
    """Two hours ago a submit started the instance for one job (5 min of GPU), and the scheduler stopped it
    31 minutes after the start; the history was written by the Lambda's own recorder. Built once: every test
    here only reads it."""
    import httpx

    httpx.post(f"{moto_server}/moto-api/reset", timeout=10).raise_for_status()
    session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing")
    res = create_resources(session, moto_server)
    table = create_history_table(session, moto_server)
    ec2, ddb = client("ec2", moto_server), client("dynamodb", moto_server)
    t0 = float(int(time.time()) - 7200)  # events carry whole seconds
    config = history.HistoryConfig(table)
    for state, at in (("pending", t0 + 5), ("running", t0 + 20), ("stopping", t0 + 1880), ("stopped", t0 + 1900)):
        record = history.record_event(history.state_change_event(res.instance_id, state, at=at), config, ec2, ddb)
        assert record["stored"]
    ddb.put_item(TableName=res.table_name, Item={
        "task_id": {"S": "job-1"}, "status": {"S": "completed"}, "job_type": {"S": CAMERA},
        "created_at": {"N": str(t0)}, "updated_at": {"N": str(t0 + 380)}, "started_at": {"N": str(t0 + 80)},
        "finished_at": {"N": str(t0 + 380)}})
    res.extra_env["GPUCTL_HISTORY_TABLE"] = table
    return res, t0


def test_report_json_matches_its_schema_and_the_history(
        recorded: tuple[Resources, float], capsys: pytest.CaptureFixture[str]) -> None:
    """--output json: billed = the running stretch, boot until the claim, busy = the job, the rest idle."""
    # GIVEN
    res, _t0 = recorded
    # WHEN
    result = invoke(["cost", "report", "--since", "1d", "--by", "job-type", "--output", "json"], res.env(), capsys)
    # THEN
    assert result.code == 0, result.stderr
    doc = json.loads(result.stdout)
    jsonschema.validate(doc, schemas.definition("cost report"))
    totals = doc["totals"]
    assert totals["billed_seconds"] == pytest.approx(1860, abs=1)
    assert totals["boot_seconds"] == pytest.approx(60, abs=1)
    assert totals["busy_seconds"] == pytest.approx(300, abs=1)
    assert totals["idle_tail_seconds"] == pytest.approx(1500, abs=1)
    assert doc["instance_type"] == "g5.xlarge" and doc["hourly_price"] == pytest.approx(1.006)
    assert totals["cost"] == pytest.approx(1860 / 3600 * 1.006, abs=0.001)
    [group] = doc["groups"]
    assert group.pop("cost") == pytest.approx(doc["jobs"][0]["cost"], abs=0.001)
    assert group == {"job_type": "camera-angle", "jobs": 1, "gpu_seconds": 300, "boot_share_seconds": 60,
                     "idle_share_seconds": 1500, "charged_seconds": 1860}
    assert doc["stretches"][0]["started_by"] == "other"  # emulator events carry no gpuctl tags here


def test_report_text_with_chart_and_quiet(
        recorded: tuple[Resources, float], capsys: pytest.CaptureFixture[str]) -> None:
    """Text shows the totals and a bar per day; -q prints only the money; --hourly-price overrides the table."""
    # GIVEN
    res, _t0 = recorded
    # WHEN
    text = invoke(["cost", "report", "--by", "day"], res.env(), capsys)
    quiet = invoke(["cost", "report", "-q", "--hourly-price", "3.6"], res.env(), capsys)
    # THEN
    assert text.code == 0, text.stderr
    assert "GPU cost" in text.stdout and "idle tail" in text.stdout
    assert "█" in text.stdout and "░" in text.stdout
    assert quiet.code == 0 and float(quiet.stdout) == pytest.approx(1.86, abs=0.001)


@pytest.mark.parametrize(("args", "message"), [
    (["--by", "week"], "--by 'week' is not one of"),
    (["--since", "forever"], "--since 'forever' is not a duration"),
    (["--hourly-price", "-1"], "--hourly-price must be a non-negative number"),
])
def test_bad_options_exit_2_with_one_sentence(
        recorded: tuple[Resources, float], args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad option: exit 2, one clear sentence on stderr, nothing on stdout, no traceback."""
    # GIVEN
    res, _t0 = recorded
    # WHEN
    result = invoke(["cost", "report", *args], res.env(), capsys)
    # THEN
    assert result.code == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_no_history_table_configured(recorded: tuple[Resources, float], capsys: pytest.CaptureFixture[str]) -> None:
    """Without the history table setting: exit 2 and how to set it."""
    # GIVEN / WHEN
    env = {k: v for k, v in recorded[0].env().items() if k != "GPUCTL_HISTORY_TABLE"}
    result = invoke(["cost", "report"], env, capsys)
    # THEN
    assert result.code == 2
    assert "GPUCTL_HISTORY_TABLE" in result.stderr


def test_simulate_replays_the_recorded_job(
        recorded: tuple[Resources, float], capsys: pytest.CaptureFixture[str]) -> None:
    """cost simulate: the recorded job and measured boot replayed per window; -q prints the recommendation."""
    # GIVEN
    res, _t0 = recorded
    # WHEN
    result = invoke(["cost", "simulate", "--idle", "5m,30m", "--since", "1d", "--output", "json"], res.env(), capsys)
    quiet = invoke(["cost", "simulate", "--idle", "5m,30m", "-q"], res.env(), capsys)
    bad = invoke(["cost", "simulate", "--idle", "10s"], res.env(), capsys)
    # THEN
    assert result.code == 0, result.stderr
    doc = json.loads(result.stdout)
    jsonschema.validate(doc, schemas.definition("cost simulate"))
    assert doc["jobs"] == 1 and doc["boot_seconds"] == pytest.approx(60, abs=1) and doc["boots_measured"] == 1
    short, long = doc["windows"]
    assert (short["idle_window_seconds"], long["idle_window_seconds"]) == (300, 1800)
    assert short["cold_starts"] == long["cold_starts"] == 1
    assert short["gpu_hours"] < long["gpu_hours"]
    assert doc["recommended_idle_window_seconds"] == 300
    assert quiet.code == 0 and quiet.stdout.strip() == "5"
    assert bad.code == 2 and "--idle windows must be at least 1 minute" in bad.stderr
