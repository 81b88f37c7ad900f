"""`gpuctl doctor --canary` end to end: the CLI as a user runs it, moto's server, the ComfyUI stand-in and a real
adapter process; a canary that completes, one the backend fails, one nobody claims, one interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest

from gpuctl import schemas
from gpuctl.aws.s3 import parse_s3_uri
from gpuctl.errors import NotFound
from gpuctl.local.comfyui_standin import StandinFaults, StandinServer
from gpuctl.models import JobRecord, JobStatus
from tests.functional.test_adapter import AdapterProcess, adapter_factory, gw, standin_factory  # noqa: F401
from tests.helpers import Resources, invoke

pytestmark = pytest.mark.server

STAGES = ("queue_wait", "boot", "execution", "publish")


def canary_records(gateways: Any) -> list[JobRecord]:
    """Every canary job in the table, whatever its status."""
    return [r for status in JobStatus for r in gateways.table.query_status(status) if r.canary]


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout} s")


def start_cli(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """``python -m gpuctl ARGS`` in the background, as :func:`run_cli` runs it."""
    return subprocess.Popen([sys.executable, "-m", "gpuctl", *args],
                            env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def gone(gateways: Any, uri: str) -> bool:
    try:
        gateways.store.head(*parse_s3_uri(uri))
    except NotFound:
        return True
    return False


def test_canary_boots_the_instance_runs_and_reports_each_stage(
        standin_factory: Callable[..., StandinServer], adapter_factory: Callable[..., AdapterProcess],  # noqa: F811
        gw: Any, server_aws: Resources, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """Stopped instance, no adapter yet: the canary starts the instance, waits for the adapter (boot), completes;
    the four stages add up to its time, the JSON follows the schema, the canary is marked and cleaned up."""
    # GIVEN a stopped instance whose adapter is not up yet
    standin = standin_factory()
    # WHEN the canary runs and the adapter comes up only after it was queued
    proc = start_cli(["doctor", "--check", "canary", "--canary-timeout", "60", "--output", "json"], server_aws.env())
    try:
        wait_until(lambda: canary_records(gw), 30, "canary record")
        time.sleep(1.0)  # the box "boots" at least this long
        adapter_factory(standin).start()
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        proc.kill()
    # THEN it passes, with every stage measured
    assert proc.returncode == 0, stdout + stderr
    doc = json.loads(stdout)
    jsonschema.validate(doc, schemas.definition("doctor"))
    assert doc["worst"] == "pass", doc
    assert [f["check"] for f in doc["findings"]] == ["canary", *(f"canary.{s}" for s in STAGES)]
    canary = doc["canary"]
    assert canary["status"] == "completed" and canary["error"] is None and canary["instance"] == "started"
    seconds = canary["seconds"]
    assert all(seconds[s] is not None for s in STAGES), seconds
    assert seconds["boot"] >= 1.0 and seconds["execution"] >= 0.4  # the wait before the adapter; the stand-in's job
    assert sum(seconds[s] for s in STAGES) == pytest.approx(seconds["total"], abs=0.05)
    # AND the record says canary, and the input and the result are deleted again
    [record] = canary_records(gw)
    assert record.task_id == canary["job_id"] and record.status is JobStatus.COMPLETED and record.canary
    assert record.executed_at is not None and record.started_at < record.executed_at <= record.finished_at
    uploaded = record.request["image_url"] if record.request else ""
    assert sorted(canary["cleaned_up"]) == sorted([uploaded, record.result_s3_uri])
    assert gone(gw, uploaded) and gone(gw, record.result_s3_uri or "")
    assert gw.instance.describe().state == "running"
    # AND `jobs list` tells it apart (its JSON says "canary": true, from the record's status document)
    listed = invoke(["jobs", "list"], server_aws.env(), capsys)
    assert "camera-angle (canary)" in listed.stdout, listed.stdout
    assert record.status_document()["canary"] is True


def test_canary_the_backend_fails_exits_1_with_the_reason(
        standin_factory: Callable[..., StandinServer], adapter_factory: Callable[..., AdapterProcess],  # noqa: F811
        gw: Any, server_aws: Resources, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """The stand-in fails the job: FAIL canary with ComfyUI's reason, exit 1, the input deleted."""
    # GIVEN an adapter polling a ComfyUI that fails the next job
    standin = standin_factory(faults=StandinFaults(execution_error=1))
    adapter_factory(standin).start()
    wait_until(lambda: gw.table.read_activity().adapter_state == "running", 20, "adapter report")
    # WHEN
    result = invoke(["doctor", "--check", "canary", "--canary-timeout", "60"], server_aws.env(), capsys)
    # THEN
    assert result.code == 1, result.stdout + result.stderr
    [record] = canary_records(gw)
    assert record.status is JobStatus.FAILED and record.error_message
    assert f"FAIL  canary: the canary job {record.task_id} failed: {record.error_message}" in result.stdout
    assert "fix: gpuctl status" in result.stdout and "Traceback" not in result.stderr
    assert f"Canary job {record.task_id} is queued" in result.stderr
    assert gone(gw, record.request["image_url"] if record.request else "")


def test_canary_nobody_claims_times_out_and_is_cancelled(
        gw: Any, server_aws: Resources, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """No adapter polls: after --canary-timeout the canary fails (still pending), is cancelled so it never runs
    later, and its input is deleted."""
    # GIVEN no adapter
    # WHEN
    result = invoke(["doctor", "--check", "canary", "--canary-timeout", "1.5", "--output", "json"], server_aws.env(),
                    capsys)
    # THEN
    assert result.code == 1, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    jsonschema.validate(doc, schemas.definition("doctor"))
    [finding] = doc["findings"]
    assert finding["check"] == "canary" and finding["level"] == "fail" and finding["fix"]
    assert "did not finish within 1.5 s (still pending: no adapter claimed it); it was cancelled" in finding["message"]
    assert doc["canary"]["status"] == "timed-out"
    assert all(doc["canary"]["seconds"][s] is None for s in STAGES)
    [record] = canary_records(gw)
    assert record.cancelled and record.task_id == doc["canary"]["job_id"]
    assert gone(gw, record.request["image_url"] if record.request else "")


def test_ctrl_c_during_the_canary_exits_130_naming_the_job_left(gw: Any, server_aws: Resources) -> None:  # noqa: F811
    """SIGINT while the canary waits: exit 130, "Interrupted", the job id it leaves and how to end it."""
    # GIVEN a canary waiting for an adapter
    proc = start_cli(["doctor", "--check", "canary"], server_aws.env())
    try:
        [record] = wait_until(lambda: canary_records(gw), 30, "canary record")
        wait_until(lambda: "is queued" in (proc.stderr.readline() if proc.stderr else ""), 10, "queued note")
        # WHEN
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
    # THEN
    assert proc.returncode == 130, stdout + stderr
    assert "Interrupted" in stderr and f"gpuctl jobs cancel {record.task_id}" in stderr, stderr
    assert "Traceback" not in stderr
    assert gw.table.get(record.task_id).status is JobStatus.PENDING


def test_canary_that_cannot_be_queued_is_a_failed_finding(
        gw: Any, server_aws: Resources, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """The queue is gone: FAIL canary "could not be submitted" with the AWS error, exit 1, JSON still printed."""
    # GIVEN a profile whose queue does not exist
    env = {**server_aws.env(), "GPUCTL_QUEUE_URL": server_aws.queue_url + "-gone"}
    # WHEN
    result = invoke(["doctor", "--check", "canary", "--output", "json"], env, capsys)
    # THEN
    assert result.code == 1, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    jsonschema.validate(doc, schemas.definition("doctor"))
    [finding] = doc["findings"]
    assert finding["level"] == "fail" and finding["message"].startswith("the canary could not be submitted: Job ")
    assert doc["canary"]["status"] == "not-submitted" and doc["canary"]["job_id"] is None
    [record] = canary_records(gw)
    assert record.status is JobStatus.FAILED  # submit's own rule: a record whose message was not queued fails
