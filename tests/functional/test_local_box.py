"""The GPU box controller: the instance record switches real (tiny) service processes on and off.

The controller runs in the test's process against moto in-process, ticked by hand with a clock the test moves;
the services are small Python programs that behave like the adapter and ComfyUI where the box cares: they log a
ready line, stop on SIGTERM (noting when), or exit with a given code and an error line.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpuctl.aws.ec2 import GpuInstance
from gpuctl.local import supervisor as sv
from gpuctl.local.box import BoxController, read_box
from gpuctl.local.components import Spec

# A service: logs the adapter's ready line, then sleeps; on SIGTERM writes "<name> <time>" to the notes file
# (after the given drain time) and exits 0; EXIT=<code> makes it log an error line and exit at once.
_SERVICE = r"""
import json, os, signal, sys, time
name, notes = sys.argv[1], sys.argv[2]
code = os.environ.get("EXIT")
if os.environ.get("WAIT_FOR"):  # never ready: says what it waits for, as the adapter's readiness wait does
    print(json.dumps({"level": "info", "event": "fake.waiting", "problem": os.environ["WAIT_FOR"]}), flush=True)
    while True:
        time.sleep(0.05)
if code is not None:
    print(json.dumps({"level": "error", "event": "fake.not_ready", "error": f"{name} is missing NodeX"}), flush=True)
    sys.exit(int(code))
def stop(signum, frame):
    time.sleep(float(os.environ.get("DRAIN", "0")))
    with open(notes, "a") as f:
        f.write(f"{name} {time.time()}\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print(json.dumps({"level": "info", "event": "adapter.started"}), flush=True)
while True:
    time.sleep(0.05)
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def root(tmp_path: Path) -> sv.StateDir:
    folder = sv.StateDir(tmp_path / "state")
    folder.root.mkdir()
    return folder


@pytest.fixture
def notes(tmp_path: Path) -> Path:
    return tmp_path / "notes.txt"


def _specs(notes: Path, env: dict[str, dict[str, str]] | None = None) -> dict[str, Spec]:
    env = env or {}
    return {name: Spec(name, [sys.executable, "-c", _SERVICE, name, str(notes)],
                       {**os.environ, **env.get(name, {})}, ready_marker='"adapter.started"')
            for name in ("comfyui", "adapter")}


@pytest.fixture
def instance(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[GpuInstance]:
    """A stopped instance record in moto in-process (the box needs nothing else from AWS)."""
    import boto3
    from moto import mock_aws

    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")  # any AMI id is accepted; loading ~1,300 takes 1 s
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="us-east-1")
        instance_id = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
        ec2.stop_instances(InstanceIds=[instance_id])
        yield GpuInstance(ec2, instance_id)


@pytest.fixture
def make_box(root: sv.StateDir, instance: GpuInstance) -> Iterator[Any]:
    boxes: list[BoxController] = []

    def make(specs: dict[str, Spec], **kwargs: Any) -> tuple[BoxController, Clock]:
        clock = Clock()
        box = BoxController(root, instance, specs, clock=clock, **kwargs)
        boxes.append(box)
        return box, clock

    yield make
    for box in boxes:  # whatever a failing test left running
        for service in box.status.services.values():
            if service.record is not None:
                sv.stop(service.record, timeout=5)


def _tick_until(box: BoxController, condition: Any, timeout: float = 20.0) -> None:
    def check() -> bool:
        box.tick()
        return bool(condition())

    assert sv.wait_until(check, timeout=timeout), box.status


def _alive(box: BoxController) -> dict[str, bool]:
    return {n: s.record is not None and sv.owns(s.record) for n, s in box.status.services.items()}


def test_the_instance_record_switches_the_services(make_box: Any, instance: GpuInstance, root: sv.StateDir,
                                                   notes: Path) -> None:
    """Stopped: nothing runs; started: booting for the delay, then up once the adapter is ready; stopped again:
    the adapter is stopped (and has drained) before ComfyUI is signalled, and the box is off."""
    # GIVEN a box on a stopped instance, with a 5 s boot delay and an adapter whose drain takes 0.5 s
    box, clock = make_box(_specs(notes, {"adapter": {"DRAIN": "0.5"}}), boot_delay=5.0)
    box.tick()
    assert box.status.state == "off" and not any(_alive(box).values())

    # WHEN the instance starts
    instance.start()
    box.tick()
    # THEN the box boots, and nothing runs during the boot delay
    assert box.status.state == "booting" and box.status.boot_started_at == clock.now
    clock.now += 4.9
    box.tick()
    assert not any(_alive(box).values())
    # … after it both services start, and the box is up once the adapter says it polls
    clock.now += 0.2
    _tick_until(box, lambda: box.status.state == "up")
    assert _alive(box) == {"comfyui": True, "adapter": True}
    assert box.status.boot_seconds == pytest.approx(5.1)
    assert read_box(root).state == "up"  # type: ignore[union-attr]
    adapter_pid = box.status.services["adapter"].record.pid  # type: ignore[union-attr]
    assert root.pid_path("adapter").read_text().strip() == str(adapter_pid)

    # WHEN the instance is stopped
    instance.stop()
    box.tick()
    # THEN the box is off, nothing runs, and the adapter had finished before ComfyUI got its SIGTERM
    assert box.status.state == "off" and not any(_alive(box).values())
    order = [line.split() for line in notes.read_text().splitlines()]
    assert [name for name, _ in order] == ["adapter", "comfyui"]
    assert float(order[0][1]) < float(order[1][1])
    assert not root.pid_path("adapter").exists()


def test_a_stop_during_the_boot_delay_starts_nothing(make_box: Any, instance: GpuInstance, notes: Path) -> None:
    """An instance stopped again before the boot delay is over never starts a service."""
    # GIVEN a box booting
    box, clock = make_box(_specs(notes), boot_delay=5.0)
    instance.start()
    box.tick()
    assert box.status.state == "booting"
    # WHEN the instance stops within the delay, and time goes on
    instance.stop()
    clock.now += 10
    box.tick()
    box.tick()
    # THEN the box is off and no service ever ran
    assert box.status.state == "off" and not notes.exists()
    assert all(s.record is None for s in box.status.services.values())


@pytest.mark.parametrize(("code", "state", "restarted"), [
    pytest.param("1", "restarting", True, id="crash-restarted"),
    pytest.param("2", "failed", False, id="config-error-not-restarted"),
])
def test_a_service_that_exits_is_treated_as_the_unit_file_says(make_box: Any, instance: GpuInstance, notes: Path,
                                                               code: str, state: str, restarted: bool) -> None:
    """A crash is restarted after the restart delay with its own reason shown; exit 2 stays failed."""
    # GIVEN a box whose adapter exits at once with `code`, logging why
    box, clock = make_box(_specs(notes, {"adapter": {"EXIT": code}}), boot_delay=0.0, restart_delay=10.0)
    instance.start()

    # WHEN it boots and the adapter exits
    _tick_until(box, lambda: box.status.services["adapter"].exit_code is not None)

    # THEN the box is still booting, and the adapter's state carries the reason from its log
    adapter = box.status.services["adapter"]
    assert box.status.state == "booting"
    assert adapter.state == state and "adapter is missing NodeX" in adapter.detail
    # … and it is started again only after the restart delay, and only for a crash
    box.tick()
    assert adapter.record is None
    clock.now += 10.1
    box.tick()
    assert (adapter.record is not None) is restarted and adapter.restarts == int(restarted)


def test_what_a_booting_adapter_waits_for_is_shown(make_box: Any, instance: GpuInstance, notes: Path) -> None:
    """An adapter that waits for its backend (models missing) keeps the box booting, with its reason shown."""
    # GIVEN a box whose adapter waits, saying for what
    box, _ = make_box(_specs(notes, {"adapter": {"WAIT_FOR": "ComfyUI lacks model files: qwen.safetensors"}}),
                      boot_delay=0.0)
    instance.start()
    # WHEN it boots
    _tick_until(box, lambda: box.status.services["adapter"].detail != "")
    # THEN the box stays booting and the adapter's detail is its own reason
    assert box.status.state == "booting"
    assert box.status.services["adapter"].detail == "waiting: ComfyUI lacks model files: qwen.safetensors"


def test_a_clean_exit_is_not_restarted_until_asked(make_box: Any, instance: GpuInstance, notes: Path) -> None:
    """An adapter stopped with SIGTERM while the box is up stays stopped (as `systemctl stop` leaves it) until
    the restart request; ComfyUI keeps running meanwhile."""
    # GIVEN a box that is up
    box, clock = make_box(_specs(notes), boot_delay=0.0, restart_delay=10.0)
    instance.start()
    _tick_until(box, lambda: box.status.state == "up")
    record = box.status.services["adapter"].record
    assert record is not None

    # WHEN someone stops only the adapter
    os.kill(record.pid, signal.SIGTERM)
    _tick_until(box, lambda: box.status.services["adapter"].state == "stopped")
    clock.now += 60
    box.tick()

    # THEN it is not restarted, the box stays up, ComfyUI still runs
    assert box.status.services["adapter"].record is None and box.status.state == "up"
    assert _alive(box)["comfyui"]
    # WHEN a restart is asked for (what SIGUSR1 does)
    box._restart_stopped()
    _tick_until(box, lambda: box.status.services["adapter"].state == "ready")
    # THEN it runs again
    assert _alive(box) == {"comfyui": True, "adapter": True}


def test_a_new_box_stops_what_a_killed_one_left_running(make_box: Any, instance: GpuInstance, root: sv.StateDir,
                                                        notes: Path) -> None:
    """Services recorded in box.json by a box that died are stopped before the next box follows the record."""
    # GIVEN a box that is up, abandoned without stopping its services (its process was killed)
    first, _ = make_box(_specs(notes), boot_delay=0.0)
    instance.start()
    _tick_until(first, lambda: first.status.state == "up")
    leftovers = [s.record for s in first.status.services.values() if s.record is not None]
    instance.stop()

    # WHEN a new box starts on the stopped instance
    second, _ = make_box(_specs(notes), boot_delay=0.0)
    second._stop_leftovers()
    second.tick()

    # THEN the old services are gone and the new box is off
    assert all(not sv.is_alive(r.pid) for r in leftovers)
    assert second.status.state == "off"
    assert json.loads((root.root / "box.json").read_text())["state"] == "off"
    for service in first.status.services.values():  # nothing left for the fixture to stop
        service.record = None


def test_an_unreadable_record_keeps_the_box_as_it_is(make_box: Any, instance: GpuInstance, notes: Path) -> None:
    """While the emulator cannot be reached the box neither boots nor stops anything."""
    import boto3
    from botocore.config import Config

    from tests.conftest import free_port

    # GIVEN a box that is up
    box, _ = make_box(_specs(notes), boot_delay=0.0)
    instance.start()
    _tick_until(box, lambda: box.status.state == "up")

    # WHEN the instance record cannot be read (the endpoint is gone) for a while
    closed = boto3.client("ec2", endpoint_url=f"http://127.0.0.1:{free_port()}", region_name="us-east-1",
                          config=Config(retries={"total_max_attempts": 1}, connect_timeout=0.2))
    box._instance = GpuInstance(closed, instance.instance_id)
    start = time.monotonic()
    while time.monotonic() - start < 0.5:
        box.tick()

    # THEN the services still run and the box still says up
    assert box.status.state == "up" and all(_alive(box).values())
