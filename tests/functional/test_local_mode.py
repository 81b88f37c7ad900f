"""Local mode with real background processes: `gpuctl local up|status|down`, the GPU box that follows the
instance record, the README's runbooks practised on it, your own ComfyUI, and `gpuctl demo` end to end.

Each test uses its own state folder (GPUCTL_LOCAL_DIR) and config folder (GPUCTL_CONFIG_DIR), and stops
every process it started, also when it fails.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from gpuctl.local import supervisor as sv
from gpuctl.services import local
from gpuctl.services.hold import hold
from gpuctl.services.instance import start_instance, stop_instance
from gpuctl.services.local import LocalOptions
from tests.conftest import free_port
from tests.helpers import make_image, run_cli

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private local-mode state folder; whatever is still recorded there at the end is taken down."""
    folder = tmp_path / "local-state"
    monkeypatch.setenv("GPUCTL_LOCAL_DIR", str(folder))
    yield folder
    local.local_down(folder)


def _pids(status: local.StatusResult) -> dict[str, int]:
    return {c.name: c.pid for c in status.components if c.pid is not None}


def _gpuctl(command: str, job: str = "", env: dict[str, str] | None = None,
            timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """A README command line run against local mode: `--profile local` after `gpuctl`, $JOB filled in."""
    words = shlex.split(command.split("#", 1)[0].replace("$JOB", job))
    assert words[0] == "gpuctl", command
    extra = [] if words[1] == "local" else ["--profile", "local"]
    return run_cli([*extra, *words[1:]], env or {}, timeout=timeout)


def _runbook() -> tuple[list[str], dict[str, str]]:
    """The README's "Task stuck in pending" section: its commands, and each table row's fix by what it shows."""
    text = (ROOT / "README.md").read_text()
    section = text.split("**Task stuck in `pending`**", 1)[1].split("\n**", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert block is not None
    commands = [line.strip() for line in block.group(1).splitlines() if line.strip()]
    fixes = {}
    for row in re.findall(r"^\| (.+) \|$", section, flags=re.M):
        cells = [c.strip() for c in row.split(" | ")]
        if len(cells) == 3 and cells[0].startswith("`Why it waits:"):
            fixes[cells[0].split("`")[1]] = cells[2]
    return commands, fixes


def _box_state() -> str | None:
    box = local.local_status().box
    return box.state if box else None


def _wait(condition: object, timeout: float = 60.0) -> None:
    assert sv.wait_until(condition, timeout=timeout), f"not within {timeout} s"  # type: ignore[arg-type]


def _gateways() -> Any:
    from gpuctl.local.components import LocalClients, local_settings
    from gpuctl.services.context import Gateways

    settings = local_settings()
    return Gateways(settings, LocalClients(settings))


def _job_status(job: str, gw: Any = None) -> str:
    """The job's status, read in-process (a CLI call takes most of a second; some waits need to be quicker)."""
    return str((gw or _gateways()).table.get(job).status.value)


def test_pending_runbook_on_the_stopped_box(state_dir: Path, clean_env: Path, tmp_path: Path) -> None:
    """Box off, a job pending: the README's commands show why, its fix completes the job; `instance stop`
    shuts the box down again (the adapter stopped by SIGTERM); down stops everything."""
    # GIVEN local mode up, with the scheduler's next run far off (so that it does not start the instance itself)
    result = local.local_up(options=LocalOptions(seconds_per_job=0.5, boot_delay=1.0, scheduler_interval=600))
    assert result.action == "started"
    history = local.local_settings().history_table
    assert sorted(result.filled) == sorted(["alarm gpuctl-gpu-queue-idle", "alarm gpuctl-gpu-scheduler-errors",
                                            "ttl task_store.expires_at", f"ttl {history}.expires_at"])
    endpoint = result.status.endpoint_url
    assert endpoint is not None and endpoint.startswith("http://127.0.0.1:")
    profile = (clean_env / "local.toml").read_text()
    assert "queue_url" in profile and endpoint in profile
    # … with the GPU box off: no ComfyUI, no adapter, and that is healthy
    status = run_cli(["local", "status", "--output", "json"], {})
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["box"]["state"] == "off" and doc["box"]["instance_state"] == "stopped"
    assert [c["name"] for c in doc["components"]] == ["aws", "box", "scheduler", "comfyui", "adapter"]
    assert [(c["running"], c["healthy"]) for c in doc["components"][3:]] == [(False, True), (False, True)]

    # WHEN a job is submitted without starting the instance
    image = make_image(tmp_path / "in.png", size=(96, 64))
    submit = run_cli(["--profile", "local", "submit", "camera-angle", str(image), "--no-start", "-q"], {})
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip()
    # THEN nothing runs it while the instance is stopped (a wait for something that must not happen)
    time.sleep(2.0)
    assert _job_status(job) == "pending" and _box_state() == "off"
    assert not any(c.running for c in local.local_status().components if c.on_box)

    # WHEN the README's runbook commands are run
    commands, fixes = _runbook()
    shown = {c.split("#")[0].strip(): _gpuctl(c, job) for c in commands}
    # THEN they say why: the job waits on a stopped instance, with its message in the queue
    assert all(p.returncode == 0 for p in shown.values()), {c: p.stderr for c, p in shown.items()}
    why = shown["gpuctl status $JOB"]
    assert "pending" in why.stdout and "Why it waits: The GPU instance" in why.stderr and "is stopped" in why.stderr
    assert re.search(r"state\s+stopped", shown["gpuctl instance status"].stdout)
    assert re.search(r"visible\s+1\b", shown["gpuctl queue stats"].stdout)

    # WHEN the fix the README gives for it is run
    fix = re.findall(r"`(gpuctl [^`]+)`", fixes["Why it waits: The GPU instance … is stopped"])[0]
    assert _gpuctl(fix).returncode == 0
    # THEN the box boots and the job completes, its result stored
    watched = _gpuctl("gpuctl watch $JOB --timeout 60", job)
    assert watched.returncode == 0, watched.stderr
    assert _box_state() == "up"
    result_url = _gateways().table.get(job).result_s3_uri
    assert result_url is not None
    bucket, key = result_url.removeprefix("s3://").split("/", 1)
    assert boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").head_object(
        Bucket=bucket, Key=key)["ContentLength"] > 0
    up = local.local_status()
    assert up.healthy, up
    box_pids = {n: p for n, p in _pids(up).items() if n in ("comfyui", "adapter")}

    # WHEN a job goes through the stand-in's unified API (the running system's layout)
    comfy = next(c.url for c in up.components if c.name == "comfyui")
    assert comfy is not None
    unified = _unified_job(comfy, f"s3://{bucket}/{key}")  # the first job's result as its input
    # THEN its result is in local mode's bucket, named as the running unified API names it
    assert unified["status"] == "completed", unified
    assert unified["result_s3_uri"] == f"s3://{bucket}/results/camera-angle/{unified['job_id']}.png"
    assert boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").head_object(
        Bucket=bucket, Key=f"results/camera-angle/{unified['job_id']}.png")["ContentLength"] > 0

    # WHEN the instance is stopped
    assert _gpuctl("gpuctl instance stop --wait").returncode == 0
    # THEN the box shuts down: the adapter got SIGTERM and stopped cleanly, then ComfyUI
    _wait(lambda: _box_state() == "off", timeout=30)
    assert not any(sv.is_alive(pid) for pid in box_pids.values())
    adapter_log = (state_dir / "logs" / "adapter.log").read_text()
    assert '"signal": "SIGTERM"' in adapter_log and '"adapter.stopped"' in adapter_log

    # WHEN local mode is taken down
    pids = list(_pids(local.local_status()).values())
    down = run_cli(["local", "down", "--output", "json"], {})
    # THEN every process is gone, the state is removed, and so is the profile it wrote
    assert down.returncode == 0, down.stderr
    assert {c["result"] for c in json.loads(down.stdout)["components"]} == {"stopped"}
    assert not any(sv.is_alive(pid) for pid in pids)
    assert not (state_dir / "state.json").exists() and not list(state_dir.glob("*.pid"))
    assert not (clean_env / "local.toml").exists()
    assert local.local_status().up is False


def test_scheduler_start_idle_stop_stopped_adapter_and_a_forced_stop(state_dir: Path, tmp_path: Path) -> None:
    """The scheduler boots the box for a --no-start job and stops it when idle; the README's runbook for a
    running instance whose adapter is stopped shows why and its local fix completes the job; a forced stop
    while a job runs lets the adapter finish it (SIGTERM drain) before the box goes off."""
    # GIVEN local mode with a 1 s schedule and a 10 s idle window
    local.local_up(options=LocalOptions(seconds_per_job=2.0, boot_delay=0.5, scheduler_interval=1.0,
                                        idle_seconds=10.0))
    image = make_image(tmp_path / "in.png", size=(96, 64))
    endpoint = local.local_status().endpoint_url

    # WHEN a job is submitted without starting the instance
    first = run_cli(["--profile", "local", "submit", "camera-angle", str(image), "--no-start", "--wait",
                     "--timeout", "60", "-q"], {}, timeout=90)
    # THEN the scheduler loop started it (the message waited on a stopped instance) and the job completed
    assert first.returncode == 0, first.stderr
    ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name="us-east-1")
    tags = {t["Key"]: t["Value"] for t in ec2.describe_tags()["Tags"]}
    assert tags["gpuctl:started-by"] == "gpuctl-scheduler"
    # … and stops the idle box after the idle window
    _wait(lambda: _box_state() == "off", timeout=45)
    tags = {t["Key"]: t["Value"] for t in ec2.describe_tags()["Tags"]}
    assert tags["gpuctl:stopped-by"] == "gpuctl-scheduler" and "idle" in tags["gpuctl:stopped-reason"]

    # WHEN the box is up (held from now on: no idle stop may come between the steps below, however slow the
    # machine) and only the adapter is stopped, as `systemctl stop` would
    gw = _gateways()  # built once: its clients take a while to build on a loaded machine
    hold(gw, "30m", "the test goes on")
    start_instance(gw)
    _wait(lambda: _box_state() == "up", timeout=30)
    os.kill(int((state_dir / "adapter.pid").read_text()), signal.SIGTERM)
    _wait(lambda: not (state_dir / "adapter.pid").exists(), timeout=30)
    # … and a job is submitted
    job = run_cli(["--profile", "local", "submit", "camera-angle", str(image), "-q"], {}).stdout.strip()
    time.sleep(1.5)  # longer than the stuck_after given below
    # THEN the README's commands show that nothing polls the queue, and local status names the adapter
    commands, fixes = _runbook()
    env = {"GPUCTL_STUCK_AFTER": "1"}
    shown = {c.split("#")[0].strip(): _gpuctl(c, job, env) for c in commands}
    why = shown["gpuctl status $JOB"]
    assert "Why it waits: Nothing is polling the queue" in why.stderr, why.stderr
    assert re.search(r"state\s+running", shown["gpuctl instance status"].stdout)
    assert re.search(r"in flight\s+0\b", shown["gpuctl queue stats"].stdout)
    health = run_cli(["local", "status", "--output", "json"], {})
    adapter = next(c for c in json.loads(health.stdout)["components"] if c["name"] == "adapter")
    assert health.returncode == 1 and adapter["detail"].startswith("stopped: it exited cleanly")

    # WHEN the README's local-mode fix for it is run
    fix_cell = fixes["Why it waits: Nothing is polling the queue"]
    fix = re.findall(r"`(gpuctl local [^`]+)`", fix_cell.split("local mode:", 1)[1])[-1]
    fixed = _gpuctl(fix)
    # THEN the adapter is started again and the job completes
    assert fixed.returncode == 0, fixed.stderr
    assert "Restarted adapter" in fixed.stderr
    assert _gpuctl("gpuctl watch $JOB --timeout 60", job).returncode == 0

    # WHEN two jobs are in the adapter's hands (queued together; ComfyUI runs one at a time, so the second one
    # waits its turn there) and the instance is stopped by force
    rows = tmp_path / "jobs.jsonl"
    rows.write_text("".join(json.dumps({"job_type": "camera-angle", "image": str(image)}) + "\n" for _ in range(2)))
    batch = run_cli(["--profile", "local", "submit", "--from", str(rows), "-q"], {})
    assert batch.returncode == 0, batch.stderr
    jobs = batch.stdout.split()
    _wait(lambda: {_job_status(j, gw) for j in jobs} == {"processing"}, timeout=30)
    stop_instance(gw, force=True)  # in-process: a CLI's start-up would eat into the jobs' time
    # THEN the adapter got SIGTERM with work in hand and finished it before it exited, the box went off, and
    # both jobs completed (one the drain did not reach, if any, after the scheduler started the box again)
    _wait(lambda: [_job_status(j, gw) for j in jobs] == ["completed", "completed"], timeout=60)
    # (the records turn completed before the drained adapter logs that it stopped: wait for that line)
    def drained_log() -> str:
        log = (state_dir / "logs" / "adapter.log").read_text()
        signalled = log.rindex('"adapter.signal"')
        stopped = log.find('"adapter.stopped"', signalled)
        return log[signalled:stopped] if stopped != -1 else ""

    _wait(lambda: drained_log() != "", timeout=30)
    assert '"adapter.job_completed"' in drained_log()
    def box_went_off() -> bool:
        box_log = (state_dir / "logs" / "box.log").read_text()
        return '"box.off"' in box_log[box_log.rindex('"box.stopping"'):]

    _wait(box_went_off, timeout=30)


def _unified_job(comfy: str, image_url: str) -> dict[str, Any]:
    """Run one camera-angle job through the stand-in's /api/v1 routes; its last status document."""
    import httpx

    job = httpx.post(f"{comfy}/api/v1/camera-angle/jobs", json={"image_url": image_url}, timeout=10).json()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        doc: dict[str, Any] = httpx.get(f"{comfy}/api/v1/jobs/{job['job_id']}", timeout=10).json()
        if doc["status"] in ("completed", "failed"):
            return doc
        time.sleep(0.1)
    raise AssertionError(f"the unified job {job['job_id']} did not finish")


def test_up_restarts_a_component_that_died(state_dir: Path) -> None:
    """With the emulator alive, a second up restarts only the component that died."""
    # GIVEN local mode is up and the scheduler loop has been killed
    first = local.local_up(options=LocalOptions(seconds_per_job=0.5))
    scheduler = _pids(first.status)["scheduler"]
    os.kill(scheduler, signal.SIGKILL)
    assert sv.wait_until(lambda: not sv.is_alive(scheduler), timeout=5)
    assert not local.local_status().healthy

    # WHEN up runs again
    again = local.local_up()

    # THEN only the scheduler was started again, and everything is healthy
    assert again.action == "restarted" and again.restarted == ["scheduler"]
    assert again.status.healthy
    pids = _pids(again.status)
    assert pids["scheduler"] != scheduler
    assert {n: pids[n] for n in ("aws", "box")} == {n: _pids(first.status)[n] for n in ("aws", "box")}


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


def _run_on_a_terminal(args: list[str], env: dict[str, str], cwd: Path,
                       timeout: float) -> tuple[int, str, str]:
    """Run ``python -m gpuctl ARGS`` with stderr on a pseudo-terminal (as a user at a terminal sees it) and
    stdout on a pipe; returns the exit code, stdout and everything written to the terminal."""
    import pty
    import threading

    master, slave = pty.openpty()
    terminal = {"COLUMNS": "120", "TERM": "xterm", "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gpuctl", *args], env={**env, **terminal}, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    screen = bytearray()

    def read_terminal() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not chunk:
                return
            screen.extend(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
        reader.join(timeout=10)
        os.close(master)
    # Without the terminal's control sequences (cursor moves, styles): the frames and lines, in order.
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))
    return proc.returncode, stdout.decode(), text


def test_demo_runs_end_to_end_on_a_terminal(state_dir: Path, tmp_path: Path) -> None:
    """`gpuctl demo` at a terminal on a machine with nothing configured: the box starts off and boots for the
    first job, both results are saved as PNGs, every step is timed, the live table is finished (both jobs
    completed) before "Taking local mode down …", and local mode is down afterwards."""
    from PIL import Image

    # GIVEN no AWS credentials or config at all, no gpuctl profile, nothing running
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["HOME"] = str(tmp_path / "home")
    out_dir = tmp_path / "demo-out"

    # WHEN the demo runs at a terminal, in a fresh directory, as the README says
    code, stdout, screen = _run_on_a_terminal(["demo", "--output-dir", str(out_dir)], env, tmp_path, timeout=150)

    # THEN it succeeded from a cold box and timed every step of both jobs
    assert code == 0, screen
    # (stdout is a pipe here, so the step table is plain text: columns apart by two or more spaces)
    rows = [re.split(r" {2,}", line.strip()) for line in stdout.splitlines()]
    steps = {cells[0]: cells[1:3] for cells in rows if len(cells) == 3 and not cells[1].startswith("/")}
    assert list(steps) == ["Step", "Submit", "Queue wait", "Boot", "Execution", "Publish", "Download", "Status"]
    assert steps["Step"] == ["camera-angle", "qwen-image-edit"]
    assert steps["Status"] == ["completed", "completed"]
    for step in ("Submit", "Queue wait", "Boot", "Execution", "Publish", "Download"):
        assert all(re.fullmatch(r"\d+\.\d+ s", cell) for cell in steps[step]), (step, steps[step])
    assert all(float(cell.split()[0]) > 0 for cell in steps["Boot"] + steps["Execution"])
    booted = re.search(r"The GPU box was off: the first submit started its instance and it booted in "
                       r"([\d.]+) s \(([\d.]+) s boot delay", " ".join(screen.split()))
    assert booted is not None, screen
    assert float(booted.group(1)) >= float(booted.group(2))
    # … the live table on the terminal ended with both jobs completed, and only then did local mode go down
    live, _, after = screen.rpartition("Taking local mode down")
    assert live, screen
    last_frame = live.rsplit("Progress", 1)[-1]
    assert len(re.findall(r"│ (?:camera-angle|qwen-image-edit) +│ [0-9a-f-]{36} │ completed", last_frame)) == 2
    assert "Progress" not in after and "│ completed" not in after, after
    # … both results are PNGs, and local mode is down again
    for name in ("camera-angle", "qwen-image-edit"):
        with Image.open(out_dir / f"{name}.png") as image:
            image.verify()
            assert image.format == "PNG"
    assert sorted(p.name for p in out_dir.glob("*.png")) == [
        "camera-angle.png", "qwen-image-edit.png", "sample-input.png"]
    assert not (state_dir / "state.json").exists()


# The in-process server warns about the resource types its CloudFormation skips (the bucket policy …).
@pytest.mark.filterwarnings("ignore:Tried to parse:UserWarning")
def test_an_endpoint_and_your_comfyui(state_dir: Path, moto_server: str, tmp_path: Path) -> None:
    """With --endpoint-url and --comfyui-url neither the emulator nor the stand-in is started: the box switches
    only the adapter, and a workflow override needing a node class your ComfyUI lacks shows as the adapter's
    reason in `local status`. Down leaves both running."""
    # GIVEN an AWS endpoint and a ComfyUI that local mode did not start (the stand-in run on its own)
    httpx.post(f"{moto_server}/moto-api/reset", timeout=10).raise_for_status()
    port = free_port()
    yours = subprocess.Popen([sys.executable, "-m", "gpuctl", "local", "comfyui", "--port", str(port),
                              "--seconds-per-job", "0.3"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    comfy = f"http://127.0.0.1:{port}"
    workflows = tmp_path / "my-workflows"
    workflows.mkdir()
    try:
        _wait(lambda: sv.http_ok(f"{comfy}/system_stats"), timeout=30)
        # WHEN local mode comes up against both
        options = local.local_options(seconds_per_job=0.3, boot_delay=0.2, comfyui_url=comfy + "/",
                                      workflows=workflows)
        result = local.local_up(endpoint_url=moto_server, options=options)
        # THEN only the box and the scheduler were started, and your ComfyUI is shown as yours
        assert result.status.external_endpoint and result.status.endpoint_url == moto_server
        names = [(c.name, c.pid is not None) for c in result.status.components]
        assert names == [("box", True), ("scheduler", True), ("comfyui", False), ("adapter", False)]
        assert result.status.box is not None and result.status.box.comfyui_url == comfy
        assert result.status.healthy
        # … and the adapter's readiness check ran on it, where the adapter has `gpuctl adapter check`
        from gpuctl.cli.adapter import app as adapter_app

        has_check = any(command.name == "check" for command in adapter_app.registered_commands)
        assert (result.readiness is not None) == has_check
        assert result.readiness is None or result.readiness.ready, result.readiness
        cfn = boto3.client("cloudformation", endpoint_url=moto_server, region_name="us-east-1")
        assert cfn.describe_stacks(StackName="gpuctl")["Stacks"][0]["StackStatus"] == "CREATE_COMPLETE"

        # WHEN a job is submitted, and the instance stopped afterwards
        image = make_image(tmp_path / "in.png", size=(96, 64))
        done = run_cli(["--profile", "local", "submit", "camera-angle", str(image), "--wait", "--timeout", "60",
                        "-q"], {}, timeout=90)
        assert done.returncode == 0, done.stderr
        assert _gpuctl("gpuctl instance stop --wait").returncode == 0
        _wait(lambda: _box_state() == "off", timeout=30)
        # THEN your ComfyUI ran it and still runs: the box switched only the adapter
        assert yours.poll() is None and sv.http_ok(f"{comfy}/system_stats")

        # WHEN the override folder gets a camera-angle graph with a node class your ComfyUI lacks, and it boots
        graph = json.loads((ROOT / "adapter" / "workflows" / "camera-angle.json").read_text())
        next(iter(graph.values()))["class_type"] = "NoSuchNodeClass"
        (workflows / "camera-angle.json").write_text(json.dumps(graph))
        assert _gpuctl("gpuctl instance start --wait").returncode == 0

        # THEN `local status` shows the adapter's own reason, and exits 1
        def adapter_detail() -> str:
            return next(c.detail for c in local.local_status().components if c.name == "adapter")

        _wait(lambda: "NoSuchNodeClass" in adapter_detail(), timeout=30)
        status = run_cli(["local", "status"], {})
        assert status.returncode == 1
        assert "lacks node classes the workflows need: NoSuchNodeClass" in status.stdout + status.stderr

        # WHEN it is taken down
        down = local.local_down()
        # THEN its own processes stopped; the endpoint and your ComfyUI still answer
        assert [o.name for o in down.stopped] == ["scheduler", "box"]
        assert sv.http_ok(f"{moto_server}/moto-api/config") and sv.http_ok(f"{comfy}/system_stats")
    finally:
        yours.terminate()
        yours.wait(timeout=10)
        httpx.post(f"{moto_server}/moto-api/reset", timeout=10).raise_for_status()
