"""Local mode: the whole pipeline on one machine, with a GPU box that is off until work arrives.

``local_up`` starts moto's server on 127.0.0.1, creates an EC2 instance record that stands for the GPU
instance (stopped), deploys ``infra/cloudformation.yaml`` into the emulator with the same service as
``gpuctl deploy`` (which writes the stack outputs into the ``local`` profile), creates what the emulator
skips, and starts two background processes (``gpuctl.local.supervisor`` records them): the GPU box
(``gpuctl.local.box``), which runs ComfyUI and the adapter only while the instance record is running, and
the scheduler loop, which runs the Lambda's handler as its schedule would (starting the instance for waiting
work, stopping it when idle). ``local_down`` stops exactly those processes; ``local_status`` reports their
health and the box's state.

Everything emulator-specific lives here and in ``gpuctl.local``: with an endpoint given (LocalStack …) no
emulator is started and the same steps run against it.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import shutil
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from gpuctl.errors import ConfigError, GpuctlError, UsageError
from gpuctl.local import supervisor as sv
from gpuctl.local.box import BOX_FILE, BoxStatus, read_box
from gpuctl.local.components import (
    BOX_SERVICES,
    LOCAL_REGION,
    LocalClients,
    LocalOptions,
    adapter_env,
    admin_settings,
    child_env,
    component_spec,
    local_settings,
)

if TYPE_CHECKING:
    from gpuctl.aws._session import AwsClients

__all__ = [
    "COMPONENTS",
    "LOCAL_PROFILE",
    "BoxView",
    "ComponentHealth",
    "DownResult",
    "LocalOptions",
    "Readiness",
    "StatusResult",
    "UpResult",
    "box_view",
    "local_down",
    "local_options",
    "local_settings",
    "local_status",
    "local_up",
]

log = logging.getLogger(__name__)

LOCAL_PROFILE = "local"
#: What `up` starts, in order; `down` stops them in reverse. The box starts and stops its own services.
COMPONENTS = ("aws", "box", "scheduler")
_INSTANCE_NAME = "gpuctl-local-gpu"
# moto accepts any AMI id (AMI validation is off unless MOTO_ENABLE_AMI_VALIDATION is set), and with
# MOTO_EC2_LOAD_DEFAULT_AMIS=false it skips loading ~1,300 images on the first EC2 call (about 1-5 s).
_LOCAL_AMI = "ami-0123456789abcdef0"
_IDLE_BOUNDS = (10.0, 24 * 3600.0)
#: The box's own stop includes the adapter's drain (see gpuctl.local.box), so it gets longer than the rest.
_STOP_TIMEOUT = {"box": 60.0}

Step = Callable[[str], None]


def local_options(*, seconds_per_job: float = 2.0, idle: str = "5m", boot_delay: float = 2.0,
                  comfyui_url: str | None = None, workflows: Path | None = None) -> LocalOptions:
    """Check what the user asked for and turn it into LocalOptions.

    Raises:
        UsageError: an idle window that is not a duration within 10 s … 24 h, or a ComfyUI URL that is not
            ``http(s)://host[:port]``.
    """
    from gpuctl.services.jobs import parse_duration

    idle_seconds = parse_duration(idle, option="--idle")
    if not _IDLE_BOUNDS[0] <= idle_seconds <= _IDLE_BOUNDS[1]:
        raise UsageError(f"--idle {idle!r} is out of range: use 10s to 24h.")
    url = None
    if comfyui_url is not None:
        parts = urlsplit(comfyui_url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise UsageError(f"--comfyui-url {comfyui_url!r} is not a ComfyUI address such as "
                             "http://127.0.0.1:8188.")
        url = f"{parts.scheme}://{parts.netloc}"
    return LocalOptions(seconds_per_job=seconds_per_job, idle_seconds=idle_seconds, boot_delay=boot_delay,
                        comfyui_url=url, workflows_dir=str(workflows.resolve()) if workflows else None)


# --- results ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ComponentHealth:
    name: str
    pid: int | None
    running: bool  # the recorded pid is still the process local mode started
    healthy: bool  # as it should be: running and answering; for a GPU box service, stopped while the box is off
    url: str | None
    log: str | None
    detail: str = ""
    on_box: bool = False  # started and stopped by the GPU box, not by `up`

    def document(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.pid, "running": self.running, "healthy": self.healthy,
                "url": self.url, "log": self.log, "detail": self.detail, "on_box": self.on_box}


@dataclass(frozen=True)
class BoxView:
    """The GPU box as `local status` shows it: ``off`` | ``booting`` | ``up`` | ``stopping`` | ``unknown``
    (the box process is not running, so nothing follows the instance)."""

    state: str
    instance_id: str | None
    instance_state: str | None
    since: float | None
    boot_delay: float
    detail: str
    comfyui_url: str | None
    own_comfyui: bool  # the user's ComfyUI: the box switches only the adapter
    idle_seconds: float
    boot_started_at: float | None = None  # the last boot: when the box saw the instance start …
    up_at: float | None = None  # … and when its adapter first polled
    boot_seconds: float | None = None

    def document(self) -> dict[str, Any]:
        from gpuctl.times import stamp

        return {"state": self.state, "instance_id": self.instance_id, "instance_state": self.instance_state,
                **stamp("since", self.since), "detail": self.detail, "boot_delay_seconds": self.boot_delay,
                "boot_seconds": None if self.boot_seconds is None else round(self.boot_seconds, 2),
                "comfyui_url": self.comfyui_url, "own_comfyui": self.own_comfyui,
                "idle_seconds": self.idle_seconds}


@dataclass(frozen=True)
class StatusResult:
    up: bool  # state is recorded
    state_dir: Path
    endpoint_url: str | None = None
    external_endpoint: bool = False
    profile: str | None = None
    components: list[ComponentHealth] = field(default_factory=list)
    box: BoxView | None = None

    @property
    def healthy(self) -> bool:
        return self.up and all(c.healthy for c in self.components)

    def document(self) -> dict[str, Any]:
        return {"up": self.up, "healthy": self.healthy, "state_dir": str(self.state_dir),
                "endpoint_url": self.endpoint_url, "external_endpoint": self.external_endpoint,
                "profile": self.profile, "box": self.box.document() if self.box else None,
                "components": [c.document() for c in self.components]}


@dataclass(frozen=True)
class Readiness:
    """The adapter's readiness report on the user's ComfyUI (``gpuctl adapter check``): exit 0 = ready."""

    ready: bool
    report: str

    def document(self) -> dict[str, Any]:
        return {"ready": self.ready, "report": self.report}


@dataclass(frozen=True)
class UpResult:
    action: str  # started | already-up | restarted
    status: StatusResult
    seconds: float
    config_path: Path | None = None
    restarted: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)  # what was created by API calls because the emulator skips it
    warnings: list[str] = field(default_factory=list)
    readiness: Readiness | None = None
    #: The clients a fresh `up` built for the local endpoint, service models loaded: a caller that goes on using
    #: the stack (the demo) saves loading them again.
    clients: AwsClients | None = field(default=None, repr=False, compare=False)

    def document(self) -> dict[str, Any]:
        return {"action": self.action, "seconds": round(self.seconds, 2),
                "config_file": str(self.config_path) if self.config_path else None,
                "restarted": self.restarted, "created_directly": self.filled, "warnings": self.warnings,
                "readiness": self.readiness.document() if self.readiness else None, **self.status.document()}


@dataclass(frozen=True)
class DownResult:
    was_up: bool
    stopped: list[sv.StopOutcome] = field(default_factory=list)
    profile_removed: bool = False
    #: The ``gpuctl-standin-*`` folders of killed stand-ins that were removed.
    leftovers_removed: list[str] = field(default_factory=list)

    def document(self) -> dict[str, Any]:
        return {"was_up": self.was_up, "profile_removed": self.profile_removed,
                "components": [{"name": o.name, "pid": o.pid, "result": o.result} for o in self.stopped],
                "leftovers_removed": self.leftovers_removed}


# --- starting components ---------------------------------------------------------------------------

def _require_local_extra() -> None:
    missing = [m for m in ("moto.server", "aiohttp", "yaml") if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        raise ConfigError("Local mode needs the emulator and the ComfyUI stand-in: "
                          "pip install 'gpuctl[local]' (missing: " + ", ".join(missing) + ").")


def _healthy(record: sv.ComponentRecord) -> bool:
    if record.health_url is not None:
        return sv.http_ok(record.health_url)
    return record.ready_marker is not None and sv.log_has(record, record.ready_marker)


def _wait_ready(record: sv.ComponentRecord, timeout: float) -> None:
    """Block until the component is healthy; it exiting or the timeout ends the wait with an error."""
    if sv.wait_until(lambda: _healthy(record), timeout=timeout, alive=lambda: sv.is_alive(record.pid)):
        return
    why = "exited" if not sv.is_alive(record.pid) else f"did not become ready within {timeout:.0f} s"
    tail = sv.log_tail(record.log)
    raise GpuctlError(f"The local {record.name} {why}; see its log {record.log}"
                      + (f", which ends with:\n{tail}" if tail else "."))


def _start_component(name: str, state: sv.LocalState, root: sv.StateDir, port: int | None = None
                     ) -> sv.ComponentRecord:
    record = component_spec(name, state, root, port).start(root)
    state.components[name] = record
    root.save(state)
    return record


# --- status ----------------------------------------------------------------------------------------

def _health(record: sv.ComponentRecord) -> ComponentHealth:
    running = sv.owns(record)
    healthy = running and _healthy(record)
    if not running:
        detail = "not running" if not sv.is_alive(record.pid) else "pid now belongs to another process"
    else:
        detail = "ok" if healthy else ("not answering" if record.url else "not ready")
    return ComponentHealth(record.name, record.pid, running, healthy, record.url, record.log, detail)


def box_view(root: sv.StateDir, state: sv.LocalState) -> BoxView:
    """The GPU box as its process last wrote it (``unknown`` when that process is not running)."""
    record = state.components.get("box")
    return _box_view(state, read_box(root) if record is not None and sv.owns(record) else None)


def _box_view(state: sv.LocalState, status: BoxStatus | None) -> BoxView:
    options = LocalOptions.from_document(state.options)
    url = options.comfyui_url or state.options.get("standin_url")
    if status is None:
        return BoxView("unknown", state.instance_id, None, None, options.boot_delay,
                       "the GPU box process is not running: nothing follows the instance",
                       url, bool(options.comfyui_url), options.idle_seconds)
    return BoxView(status.state, status.instance_id, status.instance_state, status.since, status.boot_delay,
                   status.detail, url, bool(options.comfyui_url), options.idle_seconds,
                   status.boot_started_at, status.up_at, status.boot_seconds)


def _service_health(root: sv.StateDir, name: str, box: BoxView, status: BoxStatus | None) -> ComponentHealth:
    """A service of the box: healthy when it is as the box's state says it should be."""
    log_path = str(root.log_path(name))
    if name == "comfyui" and box.own_comfyui:
        answering = bool(box.comfyui_url) and sv.http_ok(f"{box.comfyui_url}/system_stats")
        return ComponentHealth(name, None, answering, answering, box.comfyui_url, None,
                               "yours: answering" if answering else "yours: not answering")
    service = status.services.get(name) if status else None
    record = service.record if service else None
    running = record is not None and sv.owns(record)
    pid = record.pid if record else None
    url = box.comfyui_url if name == "comfyui" else None
    if box.state == "unknown":
        return ComponentHealth(name, pid, running, False, url, log_path, "the GPU box is not running", on_box=True)
    if box.state in ("off", "stopping"):
        healthy = box.state == "stopping" or not running
        detail = box.state if healthy else "running although the GPU box is off"
        return ComponentHealth(name, pid, running, healthy, url, log_path, detail, on_box=True)
    state = service.state if service else "stopped"
    if state in ("failed", "restarting") or (state == "stopped" and box.state == "up"):
        reason = service.detail if service else ""
        return ComponentHealth(name, pid, running, False, url, log_path, f"{state}: {reason}".rstrip(": "),
                               on_box=True)
    if box.state == "booting":
        detail = f"{state}: {service.detail}" if service and service.detail else state
        if state == "stopped":
            detail = "booting"
        return ComponentHealth(name, pid, running, True, url, log_path, detail, on_box=True)
    healthy = running and state == "ready"
    return ComponentHealth(name, pid, running, healthy, url, log_path, "ok" if healthy else state, on_box=True)


def _status(root: sv.StateDir, state: sv.LocalState | None) -> StatusResult:
    if state is None:
        return StatusResult(False, root.root)
    components = [_health(state.components[n]) for n in COMPONENTS if n in state.components]
    box_running = any(c.name == "box" and c.healthy for c in components)
    status = read_box(root) if box_running else None
    box = _box_view(state, status)
    services = [_service_health(root, n, box, status) for n in BOX_SERVICES]
    return StatusResult(True, root.root, state.endpoint_url, state.external_endpoint, state.profile,
                        components + services, box)


def local_status(directory: Path | None = None) -> StatusResult:
    """The health of each recorded component (its pid still ours, answering) and the GPU box's state."""
    root = sv.StateDir(sv.state_dir(directory))
    return _status(root, root.load())


# --- up --------------------------------------------------------------------------------------------

def _clients(state: sv.LocalState) -> AwsClients:
    return LocalClients(admin_settings(state))


def _load_models(clients: AwsClients) -> None:
    """Build the clients `up` uses (botocore loads each service's model once per session: most of a second
    for EC2), so that the emulator's start-up, not this, is what `up` waits for."""
    for service in ("sts", "lambda", "cloudwatch"):
        clients.client(service)
    for cached in (clients.ec2, clients.s3, clients.cloudformation, clients.sqs, clients.dynamodb):
        assert cached is not None


def _gpu_instance(clients: AwsClients) -> str:
    """An EC2 instance record that stands for the GPU instance, stopped: the GPU box is off until work comes."""
    response = clients.ec2.run_instances(
        ImageId=_LOCAL_AMI, InstanceType="g5.xlarge", MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": _INSTANCE_NAME}]}],
    )
    instance_id = response["Instances"][0]["InstanceId"]
    clients.ec2.stop_instances(InstanceIds=[instance_id])
    return instance_id


def _deploy(clients: AwsClients, state: sv.LocalState, options: LocalOptions, step: Step) -> dict[str, Any]:
    """``gpuctl deploy`` itself (the same service function), into the emulator; returns the outputs."""
    from gpuctl.services.deploy import deploy

    # The template allows IdleMinutes 5 … 1440; a shorter local window is given to the scheduler loop itself.
    idle_minutes = min(1440, max(5, math.ceil(options.idle_seconds / 60)))
    result = deploy(clients, admin_settings(state), instance_id=state.instance_id,
                    idle_minutes=idle_minutes, on_step=step, timeout=120.0, poll_delay=0.25)
    state.stack_name = result.stack_name
    state.settings_written = sorted(k for k, v in result.settings_written.items() if v is not None)
    return dict(result.outputs)


def _fresh_up(target: _Target, root: sv.StateDir, options: LocalOptions, step: Step,
              ) -> tuple[sv.LocalState, list[str], AwsClients]:
    from gpuctl.local.stack_gaps import fill_gaps
    from gpuctl.settings import config_dir

    external = target.endpoint_url
    state = sv.LocalState(
        endpoint_url=external or "", profile=LOCAL_PROFILE, config_dir=str(config_dir(target.config_dir)),
        region=target.region or LOCAL_REGION, started_at=time.time(),
        external_endpoint=bool(external), options=options.document(),
    )
    if not options.comfyui_url:  # the stand-in's port is fixed now, so the adapter finds it after every boot
        state.options["standin_url"] = f"http://127.0.0.1:{sv.free_port()}"
    root.root.mkdir(parents=True, exist_ok=True)
    (root.root / BOX_FILE).unlink(missing_ok=True)
    aws = None
    if not external:
        port = sv.free_port()
        state.endpoint_url = f"http://127.0.0.1:{port}"
        step("Starting the AWS emulator (moto) …")
        aws = _start_component("aws", state, root, port)
    clients = _clients(state)
    _load_models(clients)  # while the emulator starts: two processes, two cores
    if aws is not None:
        _wait_ready(aws, options.ready_timeout)
    step("Creating the GPU instance record, stopped: the GPU box is off until work arrives …")
    state.instance_id = _gpu_instance(clients)
    root.save(state)
    # The box needs only the instance record: it starts (and follows the record) while the stack deploys.
    step("Starting the GPU box …")
    box = _start_component("box", state, root)
    step("Deploying infra/cloudformation.yaml (the `gpuctl deploy` code path) …")
    outputs = _deploy(clients, state, options, step)
    state.options["function_name"] = outputs.get("LambdaFunctionName", "")
    root.save(state)
    step("Starting the scheduler loop …")
    scheduler = _start_component("scheduler", state, root)
    filled = fill_gaps(clients, state.stack_name or "gpuctl", step=step)
    for record in (box, scheduler):
        _wait_ready(record, options.ready_timeout)
    return state, filled, clients


def _stop_all(records: list[sv.ComponentRecord]) -> list[sv.StopOutcome]:
    """SIGTERM them together (each stop waits for its own process), in the order given for the results."""
    if not records:
        return []
    with ThreadPoolExecutor(max_workers=len(records)) as pool:
        return list(pool.map(lambda r: sv.stop(r, timeout=_STOP_TIMEOUT.get(r.name, 10.0)), records))


def _teardown(root: sv.StateDir, state: sv.LocalState | None) -> list[sv.StopOutcome]:
    """Stop what is recorded: everything but the emulator at once, then the emulator (the box's adapter
    releases its job through it); then any box service a killed box left behind."""
    outcomes: list[sv.StopOutcome] = []
    if state is not None:
        order = [n for n in reversed(COMPONENTS) if n in state.components]
        order += [n for n in state.components if n not in order]  # a state.json of an older gpuctl
        first = [state.components[n] for n in order if n != "aws"]
        outcomes += _stop_all(first)
        if "aws" in state.components:
            outcomes += _stop_all([state.components["aws"]])
    box = read_box(root)
    leftovers = [s.record for s in (box.services.values() if box else []) if s.record and sv.owns(s.record)]
    outcomes += _stop_all(leftovers)
    root.clear()
    (root.root / BOX_FILE).unlink(missing_ok=True)
    shutil.rmtree(root.root / "comfyui", ignore_errors=True)
    return outcomes


def _forget_profile(state: sv.LocalState) -> bool:
    """Remove what local mode wrote into the profile (its endpoint is gone); drop the file when empty."""
    from gpuctl.settings import profile_path, read_profile, write_profile

    directory = Path(state.config_dir)
    keys = set(state.settings_written) | {"endpoint_url", "region", "stack_name"}
    current = read_profile(state.profile, directory)
    if not current or not state.endpoint_url or current.get("endpoint_url") != state.endpoint_url:
        return False  # the profile was rewritten since: not ours to touch
    write_profile(state.profile, dict.fromkeys(k for k in keys if k in current), directory)
    if not read_profile(state.profile, directory):
        profile_path(state.profile, directory).unlink(missing_ok=True)
    return True


def _adapter_check(state: sv.LocalState) -> Readiness | None:
    """The adapter's own readiness report on the user's ComfyUI, from `gpuctl adapter check` with the
    adapter's settings; None when this adapter has no such command (its log then says it when the box boots)."""
    import subprocess

    from gpuctl.cli.adapter import app

    if not any(command.name == "check" for command in app.registered_commands):
        return None
    proc = subprocess.run([sys.executable, "-m", "gpuctl", "adapter", "check"],
                          env=child_env(state, adapter_env(state)), capture_output=True, text=True,
                          timeout=120, check=False)
    return Readiness(proc.returncode == 0, "\n".join(p for p in (proc.stdout.strip(), proc.stderr.strip()) if p))


@dataclass(frozen=True)
class _Target:
    endpoint_url: str | None
    region: str | None
    config_dir: Path | None


def local_up(*, endpoint_url: str | None = None, region: str | None = None, config_dir: Path | None = None,
             directory: Path | None = None, options: LocalOptions | None = None,
             on_step: Step | None = None) -> UpResult:
    """Bring local mode up, or report that it is up, or restart the components that died.

    Args:
        endpoint_url: an AWS-compatible endpoint (LocalStack …) to use instead of starting the emulator.
        region: the region to use there (default us-east-1).
        config_dir: where the ``local`` profile is written (default: gpuctl's config folder).
        directory: the state folder (default: ``GPUCTL_LOCAL_DIR`` or the XDG state folder).

    Raises:
        ConfigError: the ``local`` extra is not installed.
        GpuctlError: a component did not start (everything started by this call is stopped again).
    """
    options = options or LocalOptions()
    step = on_step or (lambda _message: None)
    root = sv.StateDir(sv.state_dir(directory))
    started = time.monotonic()
    _require_local_extra()
    with root.lock():
        state = root.load()
        if state is not None:
            result = _revive(root, state, options, step, started)
            if result is not None:
                return result
        try:
            state, filled, clients = _fresh_up(_Target(endpoint_url, region, config_dir), root, options, step)
        except BaseException:
            _teardown(root, root.load())
            raise
    from gpuctl.settings import profile_path

    readiness = None
    if options.comfyui_url:
        step(f"Checking your ComfyUI at {options.comfyui_url} with the adapter's readiness check …")
        readiness = _adapter_check(state)
    log.info("local.up", extra={"endpoint": state.endpoint_url, "seconds": time.monotonic() - started})
    return UpResult("started", _status(root, state), time.monotonic() - started,
                    profile_path(state.profile, Path(state.config_dir)), filled=filled, readiness=readiness,
                    clients=clients)


def _revive(root: sv.StateDir, state: sv.LocalState, asked: LocalOptions, step: Step, started: float
            ) -> UpResult | None:
    """With state recorded: nothing to do, restart what died, or (emulator gone) None for a fresh up."""
    from gpuctl.settings import profile_path

    status = _status(root, state)
    config = profile_path(state.profile, Path(state.config_dir))
    warnings = _option_warnings(state, asked)
    if status.healthy:
        return UpResult("already-up", status, time.monotonic() - started, config, warnings=warnings)
    aws = state.components.get("aws")
    if (aws is not None and not sv.owns(aws)) or set(state.components) != _expected(state):
        # The emulator keeps everything in memory: without it the stack is gone, so start over.
        step("The AWS emulator is gone (or the last `up` did not finish): starting afresh …")
        _teardown(root, state)
        _forget_profile(state)
        return None
    options = LocalOptions.from_document(state.options)
    restarted = []
    for health in status.components:
        if health.healthy or health.on_box or health.name not in state.components:
            continue
        record = state.components[health.name]
        if health.running:  # alive but not answering: replace it
            sv.stop(record, timeout=_STOP_TIMEOUT.get(record.name, 10.0))
        step(f"Restarting the {health.name} …")
        port = int(record.url.rsplit(":", 1)[1]) if record.url else None
        _wait_ready(_start_component(health.name, state, root, port), options.ready_timeout)
        restarted.append(health.name)
    restarted += _restart_box_services(root, state, options, step)
    status = _status(root, state)
    if not restarted:  # nothing of ours had died: say what is wrong instead
        sick = ", ".join(f"{c.name} ({c.detail})" for c in status.components if not c.healthy)
        warnings.append(f"Not healthy, and nothing to restart: {sick}.")
        return UpResult("already-up", status, time.monotonic() - started, config, warnings=warnings)
    return UpResult("restarted", status, time.monotonic() - started, config, restarted=restarted,
                    warnings=warnings)


def _restart_box_services(root: sv.StateDir, state: sv.LocalState, options: LocalOptions, step: Step
                          ) -> list[str]:
    """What `systemctl restart` is on a real GPU box: ask the box (SIGUSR1) to start the services that should
    run but do not, now, and wait until they are ready again.

    Raises:
        GpuctlError: a service failed again (its reason from its log), or was not ready in time.
    """
    box = state.components["box"]
    before = read_box(root)
    if before is None:
        return []
    down = [s.name for s in before.services.values() if _should_run(before, s.name)]
    if not down:
        return []
    step(f"Asking the GPU box to restart the {' and the '.join(down)} …")
    sv.send_signal(box, signal.SIGUSR1)

    def settled() -> bool:
        now = read_box(root)
        return now is not None and all(now.services[n].state == "ready" or _failed_again(before, now, n)
                                       for n in down)

    sv.wait_until(settled, timeout=options.ready_timeout, alive=lambda: sv.owns(box))
    after = read_box(root)
    not_ready = [n for n in down if after is None or after.services[n].state != "ready"]
    if not_ready:
        why = "; ".join(f"{n}: {after.services[n].detail or after.services[n].state}" if after else n
                        for n in not_ready)
        raise GpuctlError(f"The GPU box could not get the {' and the '.join(not_ready)} ready again — {why}. "
                          f"See {root.log_path(not_ready[0])}.")
    return down


def _should_run(box: BoxStatus, name: str) -> bool:
    """The box is booting or up, its services were started, and this one is not running."""
    service = box.services[name]
    if box.state not in ("booting", "up") or service.record is not None:
        return False
    return service.state in ("failed", "restarting") or (service.state == "stopped" and box.state == "up")


def _failed_again(before: BoxStatus, now: BoxStatus, name: str) -> bool:
    service = now.services[name]
    return service.restarts > before.services[name].restarts and service.record is None


def _option_warnings(state: sv.LocalState, asked: LocalOptions) -> list[str]:
    running = LocalOptions.from_document(state.options)
    if asked == LocalOptions() or asked == running:
        return []
    return ["Local mode is already up with other options; they were not changed. Run `gpuctl local down` "
            "first to start it with new ones."]


def _expected(state: sv.LocalState) -> set[str]:
    return {n for n in COMPONENTS if not (n == "aws" and state.external_endpoint)}


# --- down ------------------------------------------------------------------------------------------

def local_down(directory: Path | None = None) -> DownResult:
    """Stop the processes `up` started (only while their pids are still theirs) and remove the state.

    Also removes the working folders that killed ComfyUI stand-ins (``gpuctl local comfyui``) left in the
    temp directory, whether local mode was up or not.
    """
    from gpuctl.local.standin_dirs import sweep_leftovers

    root = sv.StateDir(sv.state_dir(directory))
    with root.lock():
        state = root.load()
        if state is None:
            return DownResult(False, leftovers_removed=[str(p) for p in sweep_leftovers()])
        outcomes = _teardown(root, state)
        removed = _forget_profile(state)
    leftovers = [str(p) for p in sweep_leftovers()]
    log.info("local.down", extra={"results": {o.name: o.result for o in outcomes}, "leftovers": leftovers})
    return DownResult(True, outcomes, removed, leftovers)
