"""The local GPU box: the EC2 instance record in the emulator switches ComfyUI and the adapter on and off.

On AWS, StartInstances boots a machine whose systemd then starts ComfyUI and the adapter, and StopInstances
makes systemd SIGTERM them (the adapter finishes or releases the job in hand). The emulator keeps only the
record, so this process plays the machine; `gpuctl local up` starts it as the ``box`` component:

* instance ``stopped`` / ``stopping`` / gone: ComfyUI and the adapter are not running — the box is ``off``;
* ``pending`` / ``running``: the box is ``booting``; after the boot delay it starts the ComfyUI stand-in
  (not when the user's own ComfyUI is configured: that one is not the box's to switch) and the adapter,
  and it is ``up`` once the adapter logs that it polls the queue. moto shows ``running`` the moment
  StartInstances returns, so the boot is modelled here, not by the record;
* back to ``stopped``: the box is ``stopping`` while the adapter drains (SIGTERM, as systemd sends it on
  shutdown), then the stand-in is stopped, then ``off``;
* a service that exits while the box should be up is treated as the unit file says (Restart=on-failure,
  RestartSec=10, RestartPreventExitStatus=2): a crash is restarted after 10 s, a configuration error
  (exit 2) is not, nor is a clean exit (someone stopped it, as `systemctl stop` would). SIGUSR1 restarts
  whatever is not running at once (what `gpuctl local up` sends: `systemctl restart` for the local box).

``box.json`` in the state folder is the box's state for `gpuctl local status` and the demo; only this
process writes it (atomically). Logs one JSON object per line on stderr.

    python -m gpuctl.local.box --state-dir ~/.local/state/gpuctl/local
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from gpuctl.errors import GpuctlError, NotFound
from gpuctl.local import supervisor as sv
from gpuctl.local.components import BOX_READY_EVENT, BOX_SERVICES, Spec

if TYPE_CHECKING:
    from gpuctl.aws.ec2 import GpuInstance

__all__ = ["BOX_FILE", "RESTART_DELAY", "BoxController", "BoxStatus", "ServiceStatus", "main", "read_box"]

log = logging.getLogger("gpuctl.local.box")

BOX_FILE = "box.json"
#: The unit file's RestartSec: how long a crashed service stays down before it is started again.
RESTART_DELAY = 10.0
#: The instance record is read this often. moto emits no instance state-change events (on AWS that would be
#: EventBridge's "EC2 Instance State-change Notification"; moto's EventBridge never emits it), so the box
#: polls DescribeInstances on the loopback emulator: four requests of a few milliseconds a second, and a
#: start shows within a quarter of a second.
TICK = 0.25
#: How long a service may take to stop after SIGTERM before it is killed. The adapter's drain is bounded by
#: its shutdown grace (5 s in local mode), its 2 s long poll and its 30 s wait for an interrupted job.
_STOP_TIMEOUT = {"adapter": 45.0, "comfyui": 10.0}
_ON_STATES = frozenset({"pending", "running"})


@dataclass
class ServiceStatus:
    """One service of the box: ``stopped`` | ``starting`` | ``ready`` | ``restarting`` | ``failed``."""

    name: str
    state: str = "stopped"
    record: sv.ComponentRecord | None = None
    detail: str = ""
    exit_code: int | None = None
    restart_at: float | None = None
    restarts: int = 0
    ready_at: float | None = None  # when it said it was ready (its own log time), else when the box saw it

    def document(self) -> dict[str, Any]:
        data = asdict(self)
        data["record"] = asdict(self.record) if self.record is not None else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ServiceStatus:
        record = data.get("record")
        known = set(cls.__dataclass_fields__) - {"record"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   record=sv.ComponentRecord.from_dict(record) if isinstance(record, Mapping) else None)


@dataclass
class BoxStatus:
    """What box.json holds. ``state``: ``off`` | ``booting`` | ``up`` | ``stopping``."""

    state: str = "off"
    since: float = 0.0
    instance_id: str | None = None
    instance_state: str | None = None
    boot_delay: float = 0.0
    boot_started_at: float | None = None  # when the box saw the instance start (this boot)
    up_at: float | None = None  # when the adapter of this boot first polled
    boots: int = 0
    detail: str = ""
    pid: int | None = None  # the box process
    updated_at: float = 0.0
    services: dict[str, ServiceStatus] = field(default_factory=dict)

    @property
    def boot_seconds(self) -> float | None:
        if self.boot_started_at is None or self.up_at is None:
            return None
        return self.up_at - self.boot_started_at

    def document(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "services"}
        data["services"] = {k: v.document() for k, v in self.services.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BoxStatus:
        services = {k: ServiceStatus.from_dict(v) for k, v in dict(data.get("services", {})).items()}
        known = set(cls.__dataclass_fields__) - {"services"}
        return cls(**{k: v for k, v in data.items() if k in known}, services=services)


def read_box(root: sv.StateDir) -> BoxStatus | None:
    """The box's last written state, or None when there is none (or it cannot be read)."""
    try:
        data = json.loads((root.root / BOX_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return BoxStatus.from_dict(data) if isinstance(data, dict) else None


def _log_entries(record: sv.ComponentRecord) -> list[dict[str, Any]]:
    """The JSON lines of the service's log from this run (other lines are skipped)."""
    try:
        with Path(record.log).open("rb") as handle:
            handle.seek(record.log_offset)
            lines = handle.read().decode(errors="replace").splitlines()
    except OSError:
        return []
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def _last_error(record: sv.ComponentRecord) -> str | None:
    """The reason the service gave for stopping: its last error-level log line of this run."""
    for entry in reversed(_log_entries(record)):
        if entry.get("level") in ("error", "critical"):
            return str(entry.get("error") or entry.get("event"))
    return None


def _waiting_for(record: sv.ComponentRecord) -> str | None:
    """What a starting service says it waits for (the adapter logs its readiness ``problem`` while it waits)."""
    for entry in reversed(_log_entries(record)):
        if entry.get("problem"):
            return str(entry["problem"])
    return None


def _ready_time(record: sv.ComponentRecord) -> float | None:
    """The time on the service's own ready line (its ``ts``): the box's tick comes a little later."""
    from gpuctl.times import parse_time

    event = (record.ready_marker or "").strip('"')
    for entry in _log_entries(record):
        if event and entry.get("event") == event:
            return parse_time(entry.get("ts"))
    return None


class BoxController:
    """Follows the instance record and keeps the box's services as the record says (see the module)."""

    def __init__(self, root: sv.StateDir, instance: GpuInstance, specs: Mapping[str, Spec], *,
                 boot_delay: float, restart_delay: float = RESTART_DELAY,
                 clock: Callable[[], float] = time.time) -> None:
        self._root = root
        self._instance = instance
        self._specs = specs  # the services this box runs, in start order
        self._restart_delay = restart_delay
        self._clock = clock
        self._started_services = False
        self._last_written: dict[str, Any] | None = None
        self._aws_trouble = False
        self.status = BoxStatus(since=clock(), instance_id=instance.instance_id, boot_delay=boot_delay,
                                pid=os.getpid(), services={n: ServiceStatus(n) for n in specs})

    # --- the loop ----------------------------------------------------------------------------------
    def run(self, stop: threading.Event, restart_now: threading.Event) -> int:
        """Follow the instance until ``stop``; then stop the services (the machine shuts down) and return."""
        self._stop_leftovers()
        self.tick()
        if self.status.state == "off" and not self.status.detail:
            self.status.detail = f"the instance is {self.status.instance_state}"
            self._write()
        log.info(BOX_READY_EVENT, extra={"instance_id": self.status.instance_id,
                                         "services": list(self._specs), "boot_delay_s": self.status.boot_delay})
        while not stop.wait(TICK):
            if restart_now.is_set():
                restart_now.clear()
                self._restart_stopped()
            self.tick()
        self._power_off("local mode is going down", drain=False)
        return 0

    def tick(self) -> None:
        """Read the instance record once and move the box one step towards it."""
        try:
            state = self._instance.describe().state
        except NotFound:
            state = "missing"
        except GpuctlError as exc:
            # The emulator is busy or gone: keep the box as it is and look again on the next tick.
            if not self._aws_trouble:
                log.warning("box.instance_unreadable", extra={"error": str(exc)})
            self._aws_trouble = True
            return
        self._aws_trouble = False
        if state != self.status.instance_state:
            log.info("box.instance_state", extra={"instance_state": state, "previous": self.status.instance_state})
            self.status.instance_state = state
        if state in _ON_STATES:
            self._power_on_step()
        elif self.status.state != "off":
            self._power_off(f"the instance is {state}")
        self._write()

    # --- on ----------------------------------------------------------------------------------------
    def _power_on_step(self) -> None:
        now = self._clock()
        st = self.status
        if st.state == "off":
            self._enter("booting", f"the instance started; booting ({st.boot_delay:g} s)")
            st.boot_started_at, st.up_at, st.boots = now, None, st.boots + 1
            self._started_services = False
        if st.state == "booting" and not self._started_services and now >= (st.boot_started_at or now) + st.boot_delay:
            self._started_services = True
            st.detail = "starting " + " and ".join(self._specs)
            for name in self._specs:  # the adapter waits for ComfyUI itself, as on the real box
                self._spawn(st.services[name])
        for service in st.services.values():
            self._supervise(service, now)
        adapter = st.services.get("adapter")
        if st.state == "booting" and adapter is not None and adapter.state == "ready":
            st.up_at = adapter.ready_at or now
            self._enter("up", "the adapter polls the queue", boot_s=round(st.up_at - (st.boot_started_at or now), 2))

    def _spawn(self, service: ServiceStatus) -> None:
        try:
            service.record = self._specs[service.name].start(self._root)
        except GpuctlError as exc:
            service.state, service.detail = "restarting", str(exc)
            service.restart_at = self._clock() + self._restart_delay
            log.error("box.service_not_started", extra={"service": service.name, "error": str(exc)})
            return
        service.state, service.exit_code, service.restart_at = "starting", None, None
        service.detail = ""
        # For shell users (`kill "$(cat …/adapter.pid)"`); box.json is the record gpuctl reads.
        self._root.pid_path(service.name).write_text(f"{service.record.pid}\n", encoding="utf-8")
        log.info("box.service_started", extra={"service": service.name, "pid": service.record.pid})

    def _supervise(self, service: ServiceStatus, now: float) -> None:
        if service.record is None:
            if service.state == "restarting" and service.restart_at is not None and now >= service.restart_at:
                service.restarts += 1
                self._spawn(service)
            return
        code = _exit_code(service.record.pid)
        if code is None:
            if service.state == "starting" and _ready(service.record):
                service.state, service.ready_at = "ready", _ready_time(service.record) or now
                service.detail = ""
                log.info("box.service_ready", extra={"service": service.name})
            elif service.state == "starting" and service.record.ready_marker is not None:
                problem = _waiting_for(service.record)
                service.detail = f"waiting: {problem}" if problem else ""
            return
        reason = _last_error(service.record) or f"exited with code {code}"
        service.record, service.exit_code = None, code
        if code == 0:
            service.state = "stopped"
            service.detail = "it exited cleanly (code 0), so it is not restarted; `gpuctl local up` starts it again"
        elif code == 2:
            service.state, service.detail = "failed", f"{reason} (a configuration error: not restarted)"
        else:
            service.state, service.detail, service.restart_at = "restarting", reason, now + self._restart_delay
        self._root.forget(service.name)
        log.warning("box.service_exited", extra={"service": service.name, "exit_code": code, "reason": reason,
                                                 "restart_in_s": self._restart_delay if service.state == "restarting"
                                                 else None})

    def _restart_stopped(self) -> None:
        if self.status.state not in ("booting", "up") or not self._started_services:
            return
        for service in self.status.services.values():
            if service.record is None:
                log.info("box.service_restart", extra={"service": service.name, "was": service.state})
                service.restarts += 1
                self._spawn(service)

    # --- off ---------------------------------------------------------------------------------------
    def _power_off(self, reason: str, *, drain: bool = True) -> None:
        """Stop the services: the adapter first, so that it finishes or releases its job on ComfyUI; or, when
        local mode goes down altogether (nothing is left to drain into), all at once."""
        running = [s for name in reversed(list(self._specs)) if (s := self.status.services[name]).record]
        if running:
            self._enter("stopping", f"{reason}; stopping " + " and ".join(s.name for s in running))
            self._write()
            groups = [[s] for s in running] if drain else [running]
            for group in groups:
                with ThreadPoolExecutor(max_workers=len(group)) as pool:
                    outcomes = list(pool.map(self._stop_service, group))
                for outcome in outcomes:
                    log.info("box.service_stopped", extra={"service": outcome.name, "result": outcome.result})
        for service in self.status.services.values():
            service.record, service.state, service.detail, service.restart_at = None, "stopped", "", None
            self._root.forget(service.name)
        self._started_services = False
        if self.status.state != "off":
            self._enter("off", reason)
        self._write()

    @staticmethod
    def _stop_service(service: ServiceStatus) -> sv.StopOutcome:
        assert service.record is not None
        return sv.stop(service.record, timeout=_STOP_TIMEOUT.get(service.name, 10.0))

    def _stop_leftovers(self) -> None:
        """Stop services that an earlier box process started and left behind (it was killed)."""
        previous = read_box(self._root)
        for service in (previous.services.values() if previous else []):
            if service.record is not None and sv.owns(service.record):
                log.warning("box.leftover_stopped", extra={"service": service.name, "pid": service.record.pid})
                sv.stop(service.record, timeout=_STOP_TIMEOUT.get(service.name, 10.0))

    # --- state -------------------------------------------------------------------------------------
    def _enter(self, state: str, detail: str, **extra: Any) -> None:
        log.info(f"box.{state}", extra={"detail": detail, "instance_state": self.status.instance_state, **extra})
        self.status.state, self.status.since, self.status.detail = state, self._clock(), detail

    def _write(self) -> None:
        document = self.status.document()
        comparable = {k: v for k, v in document.items() if k != "updated_at"}
        if comparable == self._last_written:
            return
        self._last_written = comparable
        self.status.updated_at = self._clock()
        path = self._root.root / BOX_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.status.document(), indent=2, sort_keys=True), encoding="utf-8")
        tmp.replace(path)


def _exit_code(pid: int) -> int | None:
    """The exit code of our child ``pid`` once it has exited (-N: killed by signal N), else None."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None if sv.is_alive(pid) else -1  # not our child (cannot happen for what we spawn)
    return None if done == 0 else os.waitstatus_to_exitcode(status)


def _ready(record: sv.ComponentRecord) -> bool:
    if record.health_url is not None:
        return sv.http_ok(record.health_url, timeout=1.0)
    return record.ready_marker is not None and sv.log_has(record, record.ready_marker)


# --- entry point -----------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gpuctl.local.box",
                                description="Play the GPU box of local mode: run ComfyUI and the adapter while "
                                            "the emulator's instance record is running.")
    p.add_argument("--state-dir", type=Path, required=True, help="local mode's state folder (state.json)")
    return p


class _FreshSpecs(Mapping[str, Spec]):
    """The box's services, each spec built from the local state at the moment it is started: the box starts
    before the stack is deployed, and the stand-in's spec names the stack's bucket (its unified-API results)."""

    def __init__(self, root: sv.StateDir, names: list[str]) -> None:
        self._root, self._names = root, names

    def __getitem__(self, name: str) -> Spec:
        from gpuctl.local.components import component_spec

        if name not in self._names:
            raise KeyError(name)
        state = self._root.load()
        if state is None:
            raise GpuctlError(f"the local state in {self._root.root} is gone")
        return component_spec(name, state, self._root)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def main(argv: list[str] | None = None) -> int:
    """Run until SIGTERM/SIGINT; exit 2 when the local state cannot be read."""
    from gpuctl.local.components import LocalClients, LocalOptions, admin_settings, component_spec
    from gpuctl.logs import configure
    from gpuctl.services.context import Gateways

    args = _parser().parse_args(argv)
    configure("INFO")
    root = sv.StateDir(args.state_dir)
    state = root.load()
    if state is None or not state.instance_id:
        log.error("box.config_error", extra={"error": f"no local state with an instance in {root.root}"})
        return 2
    options = LocalOptions.from_document(state.options)
    names = [n for n in BOX_SERVICES if not (n == "comfyui" and options.comfyui_url)]
    try:
        for name in names:  # checked once now; each boot builds them again from the state as it is then
            component_spec(name, state, root)
        specs = _FreshSpecs(root, names)
    except GpuctlError as exc:
        log.error("box.config_error", extra={"error": str(exc)})
        return 2
    settings = admin_settings(state)
    instance = Gateways(settings, LocalClients(settings)).instance

    stop, restart_now = threading.Event(), threading.Event()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    def on_restart(signum: int, frame: FrameType | None) -> None:
        restart_now.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, on_restart)
    code = BoxController(root, instance, specs, boot_delay=options.boot_delay).run(stop, restart_now)
    log.info("box.exited")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
