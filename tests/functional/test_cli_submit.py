"""`gpuctl submit` run as a user runs it: a subprocess against moto's server on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import Resources, emulator_counts, make_image, png_bytes, put_object, run_cli


def _counts(res: Resources) -> tuple[int, int, int]:
    """(messages queued, job records, objects in the bucket) in the emulator."""
    counts = emulator_counts(res)
    return counts.messages, counts.records, counts.objects


def test_submit_json_output_and_instance_start(server_aws: Resources, tmp_path: Path) -> None:
    """`--output json` prints only the status document; the job is recorded, queued, the instance started."""
    image = make_image(tmp_path / "in.png")
    proc = run_cli(["submit", "camera-angle", str(image), "--vertical", "1", "--output", "json"], server_aws.env())
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["status"] == "pending" and doc["job_type"] == "camera-angle"
    assert doc["instance"]["action"] == "started"
    assert _counts(server_aws) == (1, 1, 1)
    status = run_cli(["status", doc["job_id"], "--output", "json"], server_aws.env())
    assert json.loads(status.stdout)["status"] == "pending"


def test_submit_quiet_prints_the_bare_id(server_aws: Resources) -> None:
    """`-q` prints the job id alone: usable as JOB=$(gpuctl submit … -q)."""
    uri = put_object(server_aws, "in.png", png_bytes())
    proc = run_cli(["submit", "qwen-image-edit", uri, "--prompt", "sketch", "-q", "--no-start"], server_aws.env())
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    assert len(line) == 36 and line.count("-") == 4
    assert proc.stderr == ""


def test_submit_from_file_prints_one_id_per_row(server_aws: Resources, tmp_path: Path) -> None:
    """A CSV of jobs gives one id per row in order."""
    make_image(tmp_path / "a.png")
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("job_type,image,prompt,zoom\nqwen-image-edit,a.png,sketch,\ncamera-angle,a.png,,1\n")
    proc = run_cli(["submit", "--from", str(jobs), "-q", "--no-start"], server_aws.env())
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.split()) == 2
    assert _counts(server_aws)[:2] == (2, 2)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        pytest.param(["submit", "camera-angle", "{tmp}/missing.png"], 2, "does not exist", id="missing-file"),
        pytest.param(["submit", "camera-angle", "{tmp}/notes.txt"], 2, "is not an image", id="text-as-image"),
        pytest.param(["submit", "paint", "{tmp}/ok.png"], 2, "No such command 'paint'", id="unknown-type"),
        pytest.param(["submit", "camera-angle", "{tmp}/ok.png", "--vertical", "3"], 2,
                     "vertical should be less than or equal to 2", id="vertical-3"),
        pytest.param(["submit", "camera-angle", "{tmp}/ok.png", "--prompt", "x", "--zoom", "1"], 2,
                     "either --prompt or the", id="prompt-and-knobs"),
        pytest.param(["submit", "qwen-image-edit", "{tmp}/ok.png", "--prompt", ""], 2, "prompt must not be empty",
                     id="empty-prompt"),
        pytest.param(["submit", "qwen-image-edit", "{tmp}/ok.png"], 2, "Missing option '--prompt'",
                     id="missing-prompt"),
        pytest.param(["submit", "--from", "{tmp}/none.jsonl"], 2, "does not exist", id="missing-batch-file"),
        pytest.param(["submit", "camera-angle", "s3://gpuctl-test-bucket/nope.png"], 2,
                     "The image s3://gpuctl-test-bucket/nope.png does not exist.", id="missing-s3-key"),
        pytest.param(["submit", "camera-angle", "https://does-not-resolve.invalid/a.png"], 2,
                     "does not resolve", id="unresolvable-https-host"),
        pytest.param(["submit", "camera-angle", "{tmp}/ok.png", "--wait", "--timeout", "-5"], 2,
                     "--timeout must be a positive number of seconds", id="negative-timeout"),
        pytest.param(["submit", "qwen-image-edit", "{tmp}/ok.png", "--prompt", "p", "--download", "x.png"], 2,
                     "--download needs --wait", id="download-without-wait"),
    ],
)
def test_bad_input_exits_nonzero_with_one_sentence_and_writes_nothing(
    server_aws: Resources, tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    """Bad input: the documented exit code, a clear message on stderr, no traceback, nothing written."""
    make_image(tmp_path / "ok.png")
    (tmp_path / "notes.txt").write_text("hello\n")
    proc = run_cli([a.replace("{tmp}", str(tmp_path)) for a in args], server_aws.env())
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert _counts(server_aws) == (0, 0, 0)


def test_missing_setting_names_it_and_exits_2(server_aws: Resources, tmp_path: Path) -> None:
    """With no queue configured the message names SQS_QUEUE_URL and how to set it."""
    env = server_aws.env()
    env.pop("GPUCTL_QUEUE_URL")
    image = make_image(tmp_path / "in.png")
    proc = run_cli(["submit", "qwen-image-edit", str(image), "--prompt", "p"], env)
    assert proc.returncode == 2
    assert "SQS_QUEUE_URL" in proc.stderr and "gpuctl config set queue_url" in proc.stderr
    assert "Traceback" not in proc.stderr
    # nothing written: no record, no message, and no upload either (the setting is checked first)
    assert _counts(server_aws) == (0, 0, 0)


def test_missing_queue_fails_cleanly_and_leaves_no_pending_job(server_aws: Resources) -> None:
    """A queue that does not exist: a clear error naming the job, which is recorded failed (never a pending
    orphan)."""
    env = server_aws.env()
    env["GPUCTL_QUEUE_URL"] = server_aws.queue_url.replace("gpu_tasks_queue", "nope")
    uri = put_object(server_aws, "in.png", png_bytes())
    proc = run_cli(["submit", "qwen-image-edit", uri, "--prompt", "p", "--output", "json"], env)
    assert proc.returncode == 1, proc.stderr
    assert "could not be queued and is recorded as failed" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    listing = run_cli(["jobs", "list", "--status", "pending", "--output", "json"], server_aws.env())
    assert json.loads(listing.stdout)["jobs"] == []


def test_refused_local_submit_deletes_its_upload(server_aws: Resources, tmp_path: Path) -> None:
    """A local-file submit whose record cannot be written (the table is gone) leaves no upload in S3."""
    env = server_aws.env() | {"GPUCTL_TABLE_NAME": "deleted_table"}
    image = make_image(tmp_path / "in.png")
    proc = run_cli(["submit", "camera-angle", str(image), "--no-start"], env)
    assert proc.returncode == 1 and "deleted_table does not exist" in proc.stderr, proc.stderr
    assert _counts(server_aws) == (0, 0, 0)
