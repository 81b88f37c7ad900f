"""Local mode: `gpuctl local up|status|down` with real background processes, and `gpuctl demo` end to end.

Each test uses its own state folder (GPUCTL_LOCAL_DIR) and config folder (GPUCTL_CONFIG_DIR), and stops
every process it started, also when it fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from gpuctl.local import supervisor as sv
from gpuctl.services import local
from tests.helpers import make_image, run_cli

pytestmark = pytest.mark.server


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private local-mode state folder; whatever is still recorded there at the end is taken down."""
    folder = tmp_path / "local-state"
    monkeypatch.setenv("GPUCTL_LOCAL_DIR", str(folder))
    yield folder
    local.local_down(folder)


def _pids(status: local.StatusResult) -> list[int]:
    return [c.pid for c in status.components if c.pid is not None]


def test_up_status_job_end_to_end_then_down(state_dir: Path, clean_env: Path, tmp_path: Path) -> None:
    """up starts four healthy components; a submitted job completes with its result stored; down stops them."""
    # GIVEN local mode brought up from nothing
    result = local.local_up(options=local.LocalOptions(seconds_per_job=0.5))
    assert result.action == "started"
    assert sorted(result.filled) == ["alarm gpuctl-gpu-queue-idle", "alarm gpuctl-gpu-scheduler-errors",
                                     "ttl task_store.expires_at"]
    endpoint = result.status.endpoint_url
    assert endpoint is not None and endpoint.startswith("http://127.0.0.1:")
    profile = (clean_env / "local.toml").read_text()
    assert "queue_url" in profile and endpoint in profile

    # WHEN its status is asked for, through the CLI
    status = run_cli(["local", "status", "--output", "json"], {})
    # THEN every component is ours and answering
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert [c["name"] for c in doc["components"]] == ["aws", "comfyui", "adapter", "scheduler"]
    assert all(c["healthy"] for c in doc["components"]), doc
    assert all(Path(c["log"]).is_file() for c in doc["components"])

    # WHEN a job is submitted with the local profile, as a user would
    image = make_image(tmp_path / "in.png", size=(96, 64))
    submit = run_cli(["--profile", "local", "submit", "camera-angle", str(image), "--vertical", "1",
                      "--wait", "--timeout", "60", "-q"], {}, timeout=90)
    # THEN the adapter ran it on the stand-in and the record and the result object are there
    assert submit.returncode == 0, submit.stderr
    job_id, result_url = submit.stdout.split()
    table = local.local_settings().require("table_name")
    item = boto3.client("dynamodb", endpoint_url=endpoint, region_name="us-east-1").get_item(
        TableName=table, Key={"task_id": {"S": job_id}})
    assert item["Item"]["status"]["S"] == "completed"
    assert item["Item"]["result_s3_uri"]["S"] == result_url
    bucket, key = result_url.removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    assert s3.head_object(Bucket=bucket, Key=key)["ContentLength"] > 0

    # WHEN up runs again
    again = local.local_up()
    # THEN it says so and starts nothing
    assert again.action == "already-up"
    assert _pids(again.status) == _pids(result.status)

    # WHEN local mode is taken down
    pids = _pids(result.status)
    down = run_cli(["local", "down", "--output", "json"], {})
    # THEN every process is gone, the state is removed, and so is the profile it wrote
    assert down.returncode == 0, down.stderr
    assert {c["result"] for c in json.loads(down.stdout)["components"]} == {"stopped"}
    assert not any(sv.is_alive(pid) for pid in pids)
    assert not (state_dir / "state.json").exists() and not list(state_dir.glob("*.pid"))
    assert not (clean_env / "local.toml").exists()
    assert local.local_status().up is False


def test_up_restarts_a_component_that_died(state_dir: Path) -> None:
    """With the emulator alive, a second up restarts only the component that died."""
    # GIVEN local mode is up and the scheduler loop has been killed
    first = local.local_up(options=local.LocalOptions(seconds_per_job=0.5))
    scheduler = next(c for c in first.status.components if c.name == "scheduler")
    assert scheduler.pid is not None
    os.kill(scheduler.pid, signal.SIGKILL)
    assert sv.wait_until(lambda: not sv.is_alive(scheduler.pid or 0), timeout=5)
    assert not local.local_status().healthy

    # WHEN up runs again
    again = local.local_up()

    # THEN only the scheduler was started again, and everything is healthy
    assert again.action == "restarted" and again.restarted == ["scheduler"]
    assert again.status.healthy
    pids = dict(zip([c.name for c in again.status.components], _pids(again.status), strict=True))
    assert pids["scheduler"] != scheduler.pid
    assert [pids[n] for n in ("aws", "comfyui", "adapter")] == [
        c.pid for c in first.status.components if c.name != "scheduler"]


@pytest.mark.parametrize("mismatch", ["cmdline", "start_time"])
def test_down_leaves_a_recycled_pid_alone(state_dir: Path, clean_env: Path, mismatch: str) -> None:
    """A recorded pid that now belongs to another process (other argv or start time) is never signalled."""
    # GIVEN state.json records a component whose pid is now an unrelated process
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        found = sv.identity(other.pid)
        assert found is not None
        argv, ticks = list(found.cmdline), found.start_ticks
        if mismatch == "cmdline":
            argv = [sys.executable, "-m", "gpuctl.local.scheduler", "--interval", "5"]
        else:
            assert ticks is not None, "needs /proc"
            ticks -= 100
        record = sv.ComponentRecord(name="scheduler", pid=other.pid, argv=argv, start_ticks=ticks,
                                    log=str(state_dir / "logs" / "scheduler.log"), started_at=0.0)
        sv.StateDir(state_dir).save(sv.LocalState(
            endpoint_url="http://127.0.0.1:9", profile="local", config_dir=str(clean_env), region="us-east-1",
            started_at=0.0, components={"scheduler": record}))

        # WHEN local mode is taken down
        result = local.local_down()

        # THEN the unrelated process still runs, and the stale state is gone
        assert [(o.name, o.result) for o in result.stopped] == [("scheduler", "not-ours")]
        assert other.poll() is None
        assert not (state_dir / "state.json").exists()
    finally:
        other.kill()
        other.wait(timeout=10)


def test_demo_runs_end_to_end_in_a_subprocess(state_dir: Path, tmp_path: Path) -> None:
    """`gpuctl demo` on a machine with nothing configured exits 0 with both results saved as PNGs."""
    from PIL import Image

    # GIVEN no AWS credentials or config at all, no gpuctl profile, nothing running
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["HOME"] = str(tmp_path / "home")
    out_dir = tmp_path / "demo-out"

    # WHEN the demo runs, in a fresh directory, as the README says
    proc = subprocess.run([sys.executable, "-m", "gpuctl", "demo", "--output-dir", str(out_dir), "--output", "json"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=150, check=False)

    # THEN it succeeded, wrote both results, and took local mode down again
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["taken_down"] is True and doc["local_mode"] == "started"
    assert [j["status"] for j in doc["jobs"]] == ["completed", "completed"]
    for job in doc["jobs"]:
        assert all(v is not None for v in job["seconds"].values()), job
        with Image.open(job["file"]) as image:
            image.verify()
            assert image.format == "PNG"
    assert sorted(p.name for p in out_dir.glob("*.png")) == [
        "camera-angle.png", "qwen-image-edit.png", "sample-input.png"]
    assert not (state_dir / "state.json").exists()


# The in-process server warns about the resource types its CloudFormation skips (the bucket policy …).
@pytest.mark.filterwarnings("ignore:Tried to parse:UserWarning")
def test_up_with_an_endpoint_uses_it_and_down_leaves_it_running(state_dir: Path, moto_server: str) -> None:
    """Given --endpoint-url (as for LocalStack) no emulator is started; the rest runs against that endpoint."""
    import httpx

    # GIVEN an AWS-compatible endpoint that local mode did not start (here: moto's server in this process)
    httpx.post(f"{moto_server}/moto-api/reset", timeout=10).raise_for_status()
    try:
        # WHEN local mode comes up against it
        result = local.local_up(endpoint_url=moto_server, options=local.LocalOptions(seconds_per_job=0.5))

        # THEN only the stand-in, the adapter and the scheduler run, all healthy, and the stack is there
        assert result.status.external_endpoint and result.status.endpoint_url == moto_server
        assert [c.name for c in result.status.components] == ["comfyui", "adapter", "scheduler"]
        assert result.status.healthy
        cfn = boto3.client("cloudformation", endpoint_url=moto_server, region_name="us-east-1")
        assert cfn.describe_stacks(StackName="gpuctl")["Stacks"][0]["StackStatus"] == "CREATE_COMPLETE"

        # WHEN it is taken down
        down = local.local_down()

        # THEN its own processes stopped and the endpoint still answers
        assert [o.name for o in down.stopped] == ["scheduler", "adapter", "comfyui"]
        assert sv.http_ok(f"{moto_server}/moto-api/config")
    finally:
        httpx.post(f"{moto_server}/moto-api/reset", timeout=10).raise_for_status()
