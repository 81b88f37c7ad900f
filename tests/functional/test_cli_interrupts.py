"""Ctrl-C (SIGINT) and SIGTERM sent to the real gpuctl process: exit 130, "Interrupted." on stderr, and nothing
half-written — no ``pending`` record without its message, no message without its record, no upload that no
record refers to — whenever the signal lands.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import pytest

from gpuctl.services.submit import INTERRUPTED_MESSAGE
from tests.helpers import ACTIVITY_ID, REGION, Resources, make_image, png_bytes, put_object

pytestmark = pytest.mark.server


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    full_env = {**os.environ, **env, "NO_COLOR": "1"}
    return subprocess.Popen([sys.executable, "-m", "gpuctl", *args], env=full_env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _first_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else ""
    return line


def _interrupt(proc: subprocess.Popen[str], signum: int = signal.SIGINT) -> tuple[int, str, str]:
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def _session() -> Any:
    return boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing")


def _seed_pending(res: Resources) -> str:
    proc = subprocess.run([sys.executable, "-m", "gpuctl", "submit", "qwen-image-edit", "https://93.184.216.34/a.png",
                           "--prompt", "p", "--no-start", "-q"], env={**os.environ, **res.env()},
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_ctrl_c_during_watch_exits_130(server_aws: Resources) -> None:
    """SIGINT while `watch` follows a job: exit 130 and "Interrupted." on stderr, no traceback."""
    # GIVEN a watch following a pending job (its first line printed: it is polling)
    job = _seed_pending(server_aws)
    proc = _start(["watch", job], server_aws.env())
    assert job in _first_line(proc)
    # WHEN it is interrupted
    code, _, err = _interrupt(proc)
    # THEN
    assert code == 130, err
    assert err.strip() == "Error: Interrupted."


def test_sigterm_during_watch_exits_130_too(server_aws: Resources) -> None:
    """SIGTERM during `watch` is handled like Ctrl-C only where gpuctl writes; elsewhere it ends the process."""
    job = _seed_pending(server_aws)
    proc = _start(["watch", job, "--output", "json"], server_aws.env())
    assert json.loads(_first_line(proc))["job_id"] == job
    code, _, _ = _interrupt(proc, signal.SIGTERM)
    assert code in (130, -signal.SIGTERM)


def test_ctrl_c_during_submit_wait_keeps_the_job_and_exits_130(server_aws: Resources) -> None:
    """SIGINT during `submit --wait`: the job id was printed first, the job stays queued, exit 130."""
    # GIVEN a submit that queued its job and now waits for it
    proc = _start(["submit", "qwen-image-edit", "https://93.184.216.34/a.png", "--prompt", "p", "--no-start",
                   "--wait", "-q"], server_aws.env())
    job = _first_line(proc).strip()
    # WHEN it is interrupted
    code, _, err = _interrupt(proc)
    # THEN it exits 130 and the job is pending with its message queued
    assert code == 130 and err.startswith("Error: Interrupted") and "Traceback" not in err
    records, messages = _records(server_aws), _message_ids(server_aws)
    assert records == {job: "pending"} and messages == [job]


def test_ctrl_c_during_submit_from_prints_the_queued_ids_and_exits_130(server_aws: Resources,
                                                                      tmp_path: Path) -> None:
    """SIGINT during `submit --from`: the ids of the queued rows are printed, the rest is not written."""
    # GIVEN a submit of 200 rows that has started queueing them
    jobs = _job_file(server_aws, tmp_path, rows=200)
    proc = _start(["submit", "--from", str(jobs), "--no-start", "-q"], server_aws.env())
    sqs = _session().client("sqs", region_name=REGION, endpoint_url=server_aws.endpoint_url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and not int(sqs.get_queue_attributes(
            QueueUrl=server_aws.queue_url, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"][
            "ApproximateNumberOfMessages"]):
        time.sleep(0.05)
    # WHEN it is interrupted
    code, out, err = _interrupt(proc)
    # THEN one line per row was printed, the queued ids among them, and exit 130 said how far it got
    assert code == 130, err
    assert err.startswith("Error: Interrupted: ") and "rows were not submitted" in err, err
    printed = [line for line in out.splitlines() if line != "-"]
    assert len(out.splitlines()) == 200 and 0 < len(printed) < 200
    assert sorted(printed) == sorted(_message_ids(server_aws))


# --- the invariant, at random moments -----------------------------------------------------------------------

def _job_file(res: Resources, tmp: Path, *, rows: int) -> Path:
    """Rows that name an s3:// input (checked once), and every fourth a local file (uploaded per job)."""
    uri = put_object(res, "shared/in.png", png_bytes())
    local = make_image(tmp / "local.png")
    lines = [json.dumps({"job_type": "qwen-image-edit", "image": str(local) if i % 4 == 0 else uri,
                         "prompt": f"edit {i}"}) for i in range(rows)]
    path = tmp / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _records(res: Resources) -> dict[str, str]:
    """task_id → status of every job record (the activity marker left out)."""
    ddb = _session().client("dynamodb", region_name=REGION, endpoint_url=res.endpoint_url)
    out: dict[str, str] = {}
    for page in ddb.get_paginator("scan").paginate(TableName=res.table_name):
        for item in page["Items"]:
            if item["task_id"]["S"] != ACTIVITY_ID:
                out[item["task_id"]["S"]] = item["status"]["S"] + (
                    ":" + item["error_message"]["S"] if "error_message" in item else "")
    return out


def _message_ids(res: Resources) -> list[str]:
    """The task_id of every message in the queue (all received, none deleted)."""
    sqs = _session().client("sqs", region_name=REGION, endpoint_url=res.endpoint_url)
    ids: list[str] = []
    while True:
        got = sqs.receive_message(QueueUrl=res.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                  VisibilityTimeout=600).get("Messages", [])
        if not got:
            return ids
        ids += [json.loads(m["Body"])["task_id"] for m in got]


def _uploads(res: Resources) -> list[str]:
    s3 = _session().client("s3", region_name=REGION, endpoint_url=res.endpoint_url)
    return [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket=res.bucket, Prefix="inputs/")
            for o in p.get("Contents", [])]


def _assert_nothing_half_written(res: Resources, printed: list[str]) -> None:
    records, messages, uploads = _records(res), _message_ids(res), _uploads(res)
    pending = {task_id for task_id, status in records.items() if status == "pending"}
    assert len(messages) == len(set(messages)), "a message was queued twice"
    # no pending record without its message, and no message without its record
    assert pending == set(messages), (len(pending), len(messages))
    assert set(messages) <= set(records)
    # a record that is not pending was stopped before its message was queued, and says so
    assert all(status == f"failed:{INTERRUPTED_MESSAGE}" for t, status in records.items() if t not in pending)
    # the ids printed are exactly the jobs queued
    assert sorted(printed) == sorted(messages)
    # every upload belongs to a recorded job
    assert {key.split("/")[1] for key in uploads} <= set(records)


@pytest.mark.parametrize("trial", range(4))
def test_interrupting_submit_from_at_a_random_moment_leaves_nothing_half_written(
        server_aws: Resources, tmp_path: Path, trial: int) -> None:
    """A real `submit --from` of 200 rows, interrupted at a random moment (twice in quick succession in the last
    trial, which forces the interrupt inside a write): every record has its message and every message its record."""
    # GIVEN a file of 200 rows
    jobs = _job_file(server_aws, tmp_path, rows=200)
    rng = random.Random(8_000 + trial)
    delay = rng.uniform(0.3, 2.5)
    # WHEN it is submitted and interrupted after a random delay
    proc = _start(["submit", "--from", str(jobs), "--no-start", "-q"], server_aws.env())
    time.sleep(delay)
    if trial == 3:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.005)
    code, out, err = _interrupt(proc)
    # THEN it exited 130 (or 0 when it had finished), with one sentence and no traceback
    assert code in (0, 130), f"delay {delay:.2f}: {err}"
    assert "Traceback" not in err
    if code == 130:
        assert err.strip().startswith("Error: Interrupted"), err
    # AND nothing is half-written
    _assert_nothing_half_written(server_aws, [line for line in out.splitlines() if line != "-"])
