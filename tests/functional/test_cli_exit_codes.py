"""Every documented exit code on every command that can produce it, run as a user runs gpuctl: a subprocess
against moto's server. The 0 cases print --output json, which is validated against the command's JSON Schema.

The cases are independent of each other (each has its own jobs), so the module runs them on a few threads at
once and each test then checks one result. Ctrl-C (130) is in test_cli_interrupts.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx
import jsonschema
import pytest

from gpuctl import schemas
from gpuctl.models import CANCEL_MESSAGE, JobRecord, JobStatus, JobType
from tests.helpers import REGION, Resources, create_resources, make_image, png_bytes, put_object, run_cli

pytestmark = pytest.mark.server

UNKNOWN = "3f2b8c1e-4d5a-4b6c-8d7e-9f0a1b2c3d4e"
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass
class World:
    res: Resources
    tmp: Path
    jobs: dict[str, str] = field(default_factory=dict)  # name → job id
    small_queue_url: str = ""

    def env(self, variant: str = "ok") -> dict[str, str]:
        env = self.res.env()
        if variant == "down":  # nothing listens on port 9: every AWS call fails to connect
            env.update(GPUCTL_ENDPOINT_URL="http://127.0.0.1:9", GPUCTL_MAX_ATTEMPTS="1",
                       GPUCTL_CONNECT_TIMEOUT="1")
        elif variant == "no-queue":
            env["GPUCTL_QUEUE_URL"] = ""
        elif variant == "no-instance":
            env["GPUCTL_INSTANCE_ID"] = ""
        elif variant == "gone-queue":
            env["GPUCTL_QUEUE_URL"] = self.res.queue_url.replace("gpu_tasks_queue", "deleted_queue")
        elif variant == "bad-instance":
            env["GPUCTL_INSTANCE_ID"] = "i-0123456789abcdef0"
        elif variant == "small-queue":  # SQS refuses messages over 1 KiB (MaximumMessageSize)
            env["GPUCTL_QUEUE_URL"] = self.small_queue_url
        elif variant != "ok":
            raise AssertionError(variant)
        return env


def _seed(res: Resources, status: JobStatus, **fields: Any) -> str:
    from gpuctl.aws.dynamo import JobTable

    client = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing").client(
        "dynamodb", region_name=REGION, endpoint_url=res.endpoint_url)
    now = time.time() - 60
    record = JobRecord(task_id=str(uuid.uuid4()), status=status, job_type=JobType.QWEN_IMAGE_EDIT.api_path,
                       job_kind="qwen-image-edit", created_at=now, updated_at=now,
                       request={"image_url": f"s3://{res.bucket}/inputs/sample.png", "prompt": "p"}, **fields)
    JobTable(client, res.table_name).create(record)
    return record.task_id


@pytest.fixture(scope="module")
def world(moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> World:
    httpx.post(f"{moto_server}/moto-api/reset", timeout=10).raise_for_status()
    session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing")
    res = create_resources(session, moto_server)
    tmp = tmp_path_factory.mktemp("exit-codes")
    w = World(res, tmp)
    sqs = session.client("sqs", region_name=REGION, endpoint_url=moto_server)
    w.small_queue_url = sqs.create_queue(QueueName="small", Attributes={"MaximumMessageSize": "1024"})["QueueUrl"]
    put_object(res, "inputs/sample.png", png_bytes())
    put_object(res, "results/done.png", png_bytes((8, 8)))
    make_image(tmp / "in.png")
    (tmp / "notes.txt").write_text("not an image\n")
    (tmp / "exists.png").write_bytes(b"already here")
    (tmp / "jobs.jsonl").write_text("\n".join(json.dumps(
        {"job_type": "qwen-image-edit", "image": "in.png", "prompt": f"edit {i}"}) for i in range(3)))
    # 25 rows: rows 11-20 go in the second SendMessageBatch of the chunk, and row 15 is too large for the small
    # queue, so SQS refuses that request: 10 rows are not queued, 15 are (a partial batch).
    rows = [{"job_type": "qwen-image-edit", "image": "s3://" + res.bucket + "/inputs/sample.png",
             "prompt": ("x" * 1500) if i == 14 else f"edit {i}"} for i in range(25)]
    (tmp / "partial.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    done = f"s3://{res.bucket}/results/done.png"
    w.jobs = {
        "pending": _seed(res, JobStatus.PENDING),
        "pending2": _seed(res, JobStatus.PENDING),
        "pending3": _seed(res, JobStatus.PENDING),
        "processing": _seed(res, JobStatus.PROCESSING),
        "completed": _seed(res, JobStatus.COMPLETED, result_s3_uri=done),
        "completed2": _seed(res, JobStatus.COMPLETED, result_s3_uri=done),
        "failed": _seed(res, JobStatus.FAILED, error_message="out of memory"),
        "cancelled": _seed(res, JobStatus.FAILED, error_message=CANCEL_MESSAGE),
        "retry": _seed(res, JobStatus.FAILED, error_message="flaky"),
    }
    return w


@dataclass(frozen=True)
class Case:
    args: list[str]
    code: int
    stderr: str = ""  # a sentence (part) stderr must hold; "" for success
    env: str = "ok"
    schema: str | None = None  # the JSON Schema definition of stdout (exit 0 with --output json)
    stdout: str = "empty"  # without a schema: "empty", "id" (one job id: the queued job), "lines:N", "any"


S3 = "s3://gpuctl-test-bucket/inputs/sample.png"
CASES: dict[str, Case] = {
    # --- no arguments, usage
    "root-no-args": Case([], 2, "Usage: gpuctl"),
    "group-no-args": Case(["jobs"], 2, "Usage: gpuctl jobs"),
    "completion-bash": Case(["completion", "bash"], 0, stdout="any"),
    "completion-unknown": Case(["completion", "tcsh"], 2, "No completion for the shell 'tcsh'"),
    # --- submit (one job)
    "submit-camera-0": Case(["submit", "camera-angle", "{tmp}/in.png", "--no-start", "-o", "json"], 0,
                            schema="submitted"),
    "submit-qwen-0": Case(["submit", "qwen-image-edit", S3, "--prompt", "p", "-o", "json"], 0, schema="submitted"),
    "submit-no-args": Case(["submit"], 2, "Give a job type and an image"),
    "submit-bad-knob": Case(["submit", "camera-angle", "{tmp}/in.png", "--vertical", "3"], 2,
                            "vertical should be less than or equal to 2"),
    "submit-no-prompt": Case(["submit", "qwen-image-edit", S3], 2, "Missing option '--prompt'"),
    "submit-wait-timeout": Case(["submit", "camera-angle", S3, "--no-start", "--wait", "--timeout", "1"], 3,
                                "Timed out after", stdout="lines:2"),
    "submit-queue-gone": Case(["submit", "camera-angle", S3, "--no-start"], 1, "does not exist",
                              env="gone-queue"),
    "submit-sqs-refuses": Case(["submit", "qwen-image-edit", S3, "--prompt", "x" * 1500, "--no-start"], 4,
                               "Message must be shorter than 1024 bytes", env="small-queue"),
    "submit-require-instance": Case(["submit", "camera-angle", S3, "--require-instance"], 4,
                                    "but the GPU instance was not started (--require-instance)",
                                    env="bad-instance", stdout="id"),
    "submit-endpoint-down": Case(["submit", "camera-angle", "{tmp}/in.png"], 4, "Cannot reach AWS", env="down"),
    # --- submit --from
    "batch-0": Case(["submit", "--from", "{tmp}/jobs.jsonl", "--no-start", "-o", "json"], 0, schema="batch"),
    "batch-bad-file": Case(["submit", "--from", "{tmp}/none.jsonl"], 2, "does not exist"),
    "batch-partial": Case(["submit", "--from", "{tmp}/partial.jsonl", "--no-start"], 1,
                          "10 of 25 rows were not queued", env="small-queue", stdout="lines:25"),
    "batch-down": Case(["submit", "--from", "{tmp}/jobs.jsonl"], 4, "Cannot reach AWS", env="down"),
    # --- status
    "status-0": Case(["status", "{completed}", "-o", "json"], 0, schema="job"),
    "status-unknown": Case(["status", UNKNOWN], 1, f"Job {UNKNOWN} does not exist."),
    "status-malformed": Case(["status", "not-a-uuid"], 2, "'not-a-uuid' is not a job id"),
    "status-down": Case(["status", UNKNOWN], 4, "Cannot reach AWS", env="down"),
    # --- watch
    "watch-0": Case(["watch", "{completed}", "-o", "json"], 0, schema="watch_line"),
    "watch-failed": Case(["watch", "{failed}"], 1, "failed: out of memory.", stdout="lines:1"),
    "watch-cancelled": Case(["watch", "{cancelled}"], 1, "was cancelled: cancelled by user.", stdout="lines:1"),
    "watch-timeout": Case(["watch", "{pending3}", "--timeout", "1"], 3, "Timed out after", stdout="any"),
    "watch-bad-timeout": Case(["watch", "{pending}", "--timeout", "nan"], 2, "--timeout must be a positive"),
    "watch-down": Case(["watch", UNKNOWN, "--timeout", "5"], 4, "Cannot reach AWS", env="down"),
    # --- result
    "result-0": Case(["result", "{completed}", "-o", "{tmp}/out/", "--output", "json"], 0, schema="result_file"),
    "result-url-0": Case(["result", "{completed2}", "--url", "--output", "json"], 0, schema="result_url"),
    "result-not-done": Case(["result", "{processing}", "-o", "{tmp}/x.png"], 1, "has no result yet"),
    "result-exists": Case(["result", "{completed}", "-o", "{tmp}/exists.png"], 2,
                          "exists.png already exists; pass --force to overwrite it."),
    "result-down": Case(["result", "{completed}", "--url"], 4, "Cannot reach AWS", env="down"),
    # --- jobs
    "list-0": Case(["jobs", "list", "--limit", "3", "-o", "json"], 0, schema="jobs_page"),
    "list-bad-status": Case(["jobs", "list", "--status", "done"], 2, "Unknown status 'done'"),
    "list-down": Case(["jobs", "list"], 4, "Cannot reach AWS", env="down"),
    "cancel-0": Case(["jobs", "cancel", "{pending}", "-o", "json"], 0, schema="job_cancelled"),
    "cancel-finished": Case(["jobs", "cancel", "{failed}"], 1, "already finished (failed)"),
    "cancel-malformed": Case(["jobs", "cancel", "12345"], 2, "'12345' is not a job id"),
    "retry-0": Case(["jobs", "retry", "{retry}", "--no-start", "-o", "json"], 0, schema="job"),
    "retry-unfinished": Case(["jobs", "retry", "{pending2}"], 1, "still pending"),
    # --- instance
    "instance-status-0": Case(["instance", "status", "-o", "json"], 0, schema="instance_status"),
    "instance-status-unknown": Case(["instance", "status"], 1, "does not exist", env="bad-instance"),
    "instance-status-no-id": Case(["instance", "status"], 2, "set GPU_INSTANCE_ID", env="no-instance"),
    "instance-status-down": Case(["instance", "status"], 4, "Cannot reach AWS", env="down"),
    "instance-stop-busy": Case(["instance", "stop"], 1, "Refusing to stop"),
    "instance-start-bad-timeout": Case(["instance", "start", "--wait", "--timeout", "0"], 2,
                                       "--timeout must be a positive"),
    "hold-0": Case(["instance", "hold", "--for", "1h", "-o", "json"], 0, schema="hold"),
    "hold-bad-duration": Case(["instance", "hold", "--for", "forever"], 2, "is not a duration"),
    "hold-unknown-instance": Case(["instance", "hold", "--for", "1h"], 1, "does not exist", env="bad-instance"),
    "why-stopped-0": Case(["instance", "why-stopped", "-o", "json"], 0, schema="why_stopped"),
    # --- queue
    "queue-stats-0": Case(["queue", "stats", "-o", "json"], 0, schema="queue_stats"),
    "queue-stats-gone": Case(["queue", "stats"], 1, "deleted_queue does not exist", env="gone-queue"),
    "queue-stats-no-url": Case(["queue", "stats"], 2, "set SQS_QUEUE_URL", env="no-queue"),
    "queue-stats-down": Case(["queue", "stats"], 4, "Cannot reach AWS", env="down"),
    "queue-purge-no-tty": Case(["queue", "purge"], 2, "pass --yes"),
    # --- config, stack
    "config-show-0": Case(["config", "show", "-o", "json"], 0, schema="config_show"),
    "config-set-unknown": Case(["config", "set", "colour", "blue"], 2, "Unknown setting 'colour'"),
    "stack-status-none": Case(["stack", "status"], 1, "There is no stack gpuctl"),
    "stack-outputs-none": Case(["stack", "outputs"], 1, "There is no stack gpuctl"),
    "destroy-no-tty": Case(["destroy"], 2, "pass --yes"),
    "deploy-no-tty": Case(["deploy"], 2, "pass --yes"),
    # --- local mode (not running)
    "local-status-down": Case(["local", "status", "-o", "json"], 1, schema="local_status"),
}


def _expand(world: World, args: list[str]) -> list[str]:
    out = []
    for arg in args:
        arg = arg.replace("{tmp}", str(world.tmp))
        for name, job_id in world.jobs.items():
            arg = arg.replace("{" + name + "}", job_id)
        out.append(arg)
    return out


def _run(world: World, case: Case) -> subprocess.CompletedProcess[str]:
    env = world.env(case.env) | {"GPUCTL_LOCAL_DIR": str(world.tmp / "local-state"), "NO_COLOR": ""}
    return run_cli(_expand(world, case.args), env, input="", timeout=90)


@pytest.fixture(scope="module")
def results(world: World) -> Iterator[dict[str, subprocess.CompletedProcess[str]]]:
    # The cases touch different jobs and resources, so they can run side by side (3 at once on 2 cores).
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(_run, world, case) for name, case in CASES.items()}
        yield {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_exit_code(name: str, results: dict[str, subprocess.CompletedProcess[str]]) -> None:
    """The command exits with its documented code, one sentence (no traceback) on stderr, JSON that matches
    its schema on stdout."""
    # GIVEN the case's command and environment (run by the `results` fixture)
    case, proc = CASES[name], results[name]
    # THEN its exit code and message are the documented ones
    assert proc.returncode == case.code, f"{proc.returncode}: {proc.stderr}"
    assert case.stderr in proc.stderr
    assert "Traceback" not in proc.stderr and "site-packages" not in proc.stderr
    assert ".." not in proc.stderr.replace("...", "") and "S3://" not in proc.stderr
    if case.code not in (0, 130) and case.schema is None and not proc.stderr.startswith("Usage:"):
        assert proc.stderr.count("Error: ") == 1, proc.stderr
    # AND stdout carries only data: its JSON document, the queued job's id, or nothing
    if case.schema is not None:
        lines = proc.stdout.splitlines() if case.schema == "watch_line" else [proc.stdout]
        for text in lines:
            jsonschema.validate(json.loads(text), schemas.definition(case.schema))
    elif case.stdout == "id":
        assert UUID.match(proc.stdout.strip()), proc.stdout
    elif case.stdout.startswith("lines:"):
        assert len(proc.stdout.splitlines()) == int(case.stdout.split(":")[1]), proc.stdout
    elif case.stdout == "empty":
        assert proc.stdout == "", proc.stdout
    # AND no escape code reaches a pipe (NO_COLOR is not set for these runs)
    assert "\x1b" not in proc.stdout + proc.stderr


def test_adapter_whose_backend_never_becomes_ready_exits_1(world: World) -> None:
    """`gpuctl adapter run` keeps its own codes: 1 when the backend never became ready (systemd restarts it)."""
    # GIVEN a backend URL where nothing listens and a short readiness timeout
    env = world.env() | {"GPUCTL_READY_TIMEOUT": "1", "GPUCTL_BACKEND_URL": "http://127.0.0.1:9"}
    # WHEN the adapter is run in the foreground
    proc = run_cli(["adapter", "run"], env, timeout=60)
    # THEN it exits 1
    assert proc.returncode == 1, proc.stderr


# moto's server thread runs in this process, where warnings are errors; it warns for each resource type it skips.
@pytest.mark.filterwarnings("ignore:Tried to parse AWS:UserWarning")
def test_stack_commands_and_declined_confirmations(world: World, moto_server: str, capsys: Any) -> None:
    """deploy, stack status/outputs and destroy exit 0 with schema-valid JSON; answering "n" to deploy, destroy
    or queue purge on a terminal (a real process on a pseudo-terminal) exits 2 and changes nothing."""
    from tests.helpers import invoke

    # GIVEN a fresh emulator (the stack creates its own queue and table) with a GPU instance, and a stack
    httpx.post(f"{moto_server}/moto-api/reset", timeout=10).raise_for_status()
    ec2 = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing").client(
        "ec2", region_name=REGION, endpoint_url=moto_server)
    instance = ec2.run_instances(ImageId="ami-12c6146b", InstanceType="g5.xlarge", MinCount=1,
                                 MaxCount=1)["Instances"][0]["InstanceId"]
    env = {"GPUCTL_ENDPOINT_URL": moto_server, "GPUCTL_REGION": REGION,
           "GPUCTL_CONFIG_DIR": str(world.tmp / "stack-config")}
    deployed = invoke(["deploy", "--instance-id", instance, "--yes", "-o", "json"], env, capsys)
    assert deployed.code == 0, deployed.stderr
    jsonschema.validate(json.loads(deployed.stdout), schemas.definition("deploy"))
    for args, schema in ((["stack", "status", "-o", "json"], "stack_status"),
                         (["stack", "outputs", "-o", "json"], "stack_outputs")):
        got = invoke(args, env, capsys)
        assert got.code == 0, got.stderr
        jsonschema.validate(json.loads(got.stdout), schemas.definition(schema))
    arn = invoke(["stack", "outputs", "OperatorPolicyArn", "-q"], env, capsys)
    assert arn.code == 0 and arn.stdout.startswith("arn:aws:iam::") and arn.stdout.count("\n") == 1
    table = invoke(["stack", "outputs"], env, capsys)  # not a terminal: plain lines, the ARN whole
    assert re.search(r"^OperatorPolicyArn +" + re.escape(arn.stdout.strip()) + "$", table.stdout, re.M)
    missing = invoke(["stack", "outputs", "NoSuchOutput"], env, capsys)
    assert missing.code == 1 and "has no output 'NoSuchOutput'" in missing.stderr
    queued = invoke(["submit", "qwen-image-edit", "https://93.184.216.34/in.png", "--prompt", "p", "--no-start",
                     "-q"], env, capsys)
    assert queued.code == 0, queued.stderr
    # WHEN each confirmation is declined on a terminal
    for args in (["deploy", "--idle-minutes", "45"], ["destroy"], ["queue", "purge"]):
        proc = _on_a_terminal(["-m", "gpuctl", *args], env, answer="n\n")
        # THEN it exits 2, says so, and nothing changed
        assert proc.returncode == 2, (args, proc.output)
        assert "Cancelled" in proc.output or "Not purged" in proc.output, proc.output
    status = json.loads(invoke(["stack", "status", "-o", "json"], env, capsys).stdout)
    assert status["status"].endswith("_COMPLETE") and status["parameters"].get("IdleMinutes") != "45"
    assert json.loads(invoke(["queue", "stats", "-o", "json"], env, capsys).stdout)["visible"] == 1
    # AND destroy --yes exits 0
    destroyed = invoke(["destroy", "--yes", "-o", "json"], env, capsys)
    assert destroyed.code == 0, destroyed.stderr
    jsonschema.validate(json.loads(destroyed.stdout), schemas.definition("destroy"))


@dataclass(frozen=True)
class TtyRun:
    returncode: int
    output: str


def _on_a_terminal(args: list[str], env: dict[str, str], *, answer: str) -> TtyRun:
    """Run python ARGS with stdin, stdout and stderr on a pseudo-terminal, typing ``answer`` when asked."""
    import os
    import pty

    master, slave = pty.openpty()
    full_env = {**os.environ, **env, "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, *args], stdin=slave, stdout=slave, stderr=slave, env=full_env,
                            close_fds=True)
    os.close(slave)
    output = b""
    typed = False
    try:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal (it exited)
                break
            if not chunk:
                break
            output += chunk
            if not typed and b"[y/N]" in output:
                os.write(master, answer.encode())
                typed = True
    finally:
        os.close(master)
    return TtyRun(proc.wait(timeout=60), output.decode(errors="replace"))
