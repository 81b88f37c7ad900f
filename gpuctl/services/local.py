"""Local mode: the whole pipeline on one machine, and the demo that runs a job of each type through it.

``local_up`` starts moto's server on 127.0.0.1, creates an EC2 instance record that stands for the GPU
instance, deploys ``infra/cloudformation.yaml`` into the emulator with the same service as ``gpuctl deploy``
(which writes the stack outputs into the ``local`` profile), creates what the emulator skips, and starts
the ComfyUI stand-in, the adapter and the scheduler loop as background processes (``gpuctl.local.supervisor``
records them). ``local_down`` stops exactly those processes; ``local_status`` reports their health.

Everything emulator-specific lives here and in ``gpuctl.local``: with an endpoint given (LocalStack …) no
emulator is started and the same steps run against it.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpuctl.aws._session import AwsClients
from gpuctl.errors import ConfigError, GpuctlError, JobFailed, WaitTimeout
from gpuctl.local import supervisor as sv

if TYPE_CHECKING:
    import boto3

    from gpuctl.models import JobRecord
    from gpuctl.services.context import Gateways
    from gpuctl.settings import Settings

__all__ = [
    "COMPONENTS",
    "LOCAL_PROFILE",
    "ComponentHealth",
    "DemoJob",
    "DemoResult",
    "DownResult",
    "LocalOptions",
    "StatusResult",
    "UpResult",
    "local_down",
    "local_settings",
    "local_status",
    "local_up",
    "run_demo",
]

log = logging.getLogger(__name__)

LOCAL_PROFILE = "local"
LOCAL_REGION = "us-east-1"
#: Start order; `down` stops them in reverse.
COMPONENTS = ("aws", "comfyui", "adapter", "scheduler")
_SEED_ENV = ("SQS_QUEUE_URL", "DYNAMODB_TABLE", "GPU_INSTANCE_ID")
_DUMMY_KEY = "gpuctl-local"
_INSTANCE_NAME = "gpuctl-local-gpu"
# moto accepts any AMI id (AMI validation is off unless MOTO_ENABLE_AMI_VALIDATION is set), and with
# MOTO_EC2_LOAD_DEFAULT_AMIS=false it skips loading ~1,300 images on the first EC2 call (about 1-5 s).
_LOCAL_AMI = "ami-0123456789abcdef0"

Step = Callable[[str], None]


@dataclass(frozen=True)
class LocalOptions:
    """How local mode runs; kept in state.json so that restarted components run the same way."""

    seconds_per_job: float = 2.0
    idle_minutes: int = 5  # the template's minimum; the scheduler stops the idle "GPU" after it
    scheduler_interval: float = 5.0
    ready_timeout: float = 60.0

    def document(self) -> dict[str, Any]:
        return {"seconds_per_job": self.seconds_per_job, "idle_minutes": self.idle_minutes,
                "scheduler_interval": self.scheduler_interval, "ready_timeout": self.ready_timeout}

    @classmethod
    def from_document(cls, data: Mapping[str, Any]) -> LocalOptions:
        default = cls()
        return cls(float(data.get("seconds_per_job", default.seconds_per_job)),
                   int(data.get("idle_minutes", default.idle_minutes)),
                   float(data.get("scheduler_interval", default.scheduler_interval)),
                   float(data.get("ready_timeout", default.ready_timeout)))


# --- results ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ComponentHealth:
    name: str
    pid: int | None
    running: bool  # the recorded pid is still the process local mode started
    healthy: bool  # running, and answering (HTTP 2xx) or past its ready line in the log
    url: str | None
    log: str | None
    detail: str = ""

    def document(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.pid, "running": self.running, "healthy": self.healthy,
                "url": self.url, "log": self.log, "detail": self.detail}


@dataclass(frozen=True)
class StatusResult:
    up: bool  # state is recorded
    state_dir: Path
    endpoint_url: str | None = None
    external_endpoint: bool = False
    profile: str | None = None
    components: list[ComponentHealth] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return self.up and all(c.healthy for c in self.components)

    def document(self) -> dict[str, Any]:
        return {"up": self.up, "healthy": self.healthy, "state_dir": str(self.state_dir),
                "endpoint_url": self.endpoint_url, "external_endpoint": self.external_endpoint,
                "profile": self.profile, "components": [c.document() for c in self.components]}


@dataclass(frozen=True)
class UpResult:
    action: str  # started | already-up | restarted
    status: StatusResult
    seconds: float
    config_path: Path | None = None
    restarted: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)  # what was created by API calls because the emulator skips it

    def document(self) -> dict[str, Any]:
        return {"action": self.action, "seconds": round(self.seconds, 2),
                "config_file": str(self.config_path) if self.config_path else None,
                "restarted": self.restarted, "created_directly": self.filled, **self.status.document()}


@dataclass(frozen=True)
class DownResult:
    was_up: bool
    stopped: list[sv.StopOutcome] = field(default_factory=list)
    profile_removed: bool = False

    def document(self) -> dict[str, Any]:
        return {"was_up": self.was_up, "profile_removed": self.profile_removed,
                "components": [{"name": o.name, "pid": o.pid, "result": o.result} for o in self.stopped]}


# --- environment of the children -------------------------------------------------------------------

def _require_local_extra() -> None:
    missing = [m for m in ("moto.server", "aiohttp", "yaml") if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        raise ConfigError("Local mode needs the emulator and the ComfyUI stand-in: "
                          "pip install 'gpuctl[local]' (missing: " + ", ".join(missing) + ").")


def _child_env(state: sv.LocalState, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without anything that points at real AWS or another gpuctl setup.

    AWS and gpuctl variables (and the seed's names) would override the ``local`` profile, so they go;
    dummy keys go in (an emulator accepts any), and the AWS config files are hidden so that a
    ``credential_process`` or SSO profile is never consulted for a loopback endpoint.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "GPUCTL_", "MOTO_")) and k not in _SEED_ENV}
    env.update({
        "AWS_ACCESS_KEY_ID": _DUMMY_KEY, "AWS_SECRET_ACCESS_KEY": _DUMMY_KEY,
        "AWS_DEFAULT_REGION": state.region, "AWS_REGION": state.region,
        "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        # `python -m` puts the working directory first on sys.path; a folder named adapter/ or gpuctl/
        # wherever the user stands must not shadow the installed packages.
        "PYTHONSAFEPATH": "1", "PYTHONUNBUFFERED": "1",
    })
    # The components talk to each other on loopback: never through a proxy the user configured.
    user_no_proxy = os.environ.get("NO_PROXY") or os.environ.get("no_proxy")
    no_proxy = ",".join(p for p in (user_no_proxy, "127.0.0.1,localhost") if p)
    env.update({"NO_PROXY": no_proxy, "no_proxy": no_proxy})
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class _Spec:
    name: str
    argv: list[str]
    env: dict[str, str]
    url: str | None = None
    health_path: str | None = None
    ready_marker: str | None = None


def _spec(name: str, state: sv.LocalState, root: sv.StateDir, port: int | None = None) -> _Spec:
    """How to start one component for ``state`` (the same on first start and on restart)."""
    py = sys.executable
    options = LocalOptions.from_document(state.options)
    if name == "aws":
        assert port is not None
        return _Spec(name, [py, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                     _child_env(state, {"MOTO_EC2_LOAD_DEFAULT_AMIS": "false"}),
                     url=f"http://127.0.0.1:{port}", health_path="/moto-api/config")
    if name == "comfyui":
        assert port is not None
        folder = root.root / "comfyui"
        return _Spec(name, [py, "-m", "gpuctl.local.comfyui_standin", "--port", str(port),
                            "--seconds-per-job", str(options.seconds_per_job),
                            "--input-dir", str(folder / "input"), "--output-dir", str(folder / "output")],
                     _child_env(state), url=f"http://127.0.0.1:{port}", health_path="/system_stats")
    if name == "adapter":
        comfy = state.components["comfyui"].url
        assert comfy is not None
        return _Spec(name, [py, "-m", "adapter"], _child_env(state, {
            "GPUCTL_PROFILE": state.profile, "GPUCTL_CONFIG_DIR": state.config_dir,
            "GPUCTL_BACKEND": "comfyui", "GPUCTL_BACKEND_URL": comfy, "GPUCTL_WORKER_ID": "local-adapter",
            # A short long-poll and grace keep `gpuctl local down` quick; a message still wakes it at once.
            "GPUCTL_POLL_WAIT": "2", "GPUCTL_SHUTDOWN_GRACE": "5",
        }), ready_marker='"adapter.started"')
    if name == "scheduler":
        from gpuctl.local.scheduler import READY_EVENT

        function = _function_name(state)
        return _Spec(name, [py, "-m", "gpuctl.local.scheduler", "--endpoint-url", state.endpoint_url,
                            "--region", state.region, "--function-name", function,
                            "--interval", str(options.scheduler_interval)],
                     _child_env(state), ready_marker=f'"{READY_EVENT}"')
    raise ValueError(name)


def _function_name(state: sv.LocalState) -> str:
    name = state.options.get("function_name")
    if not name:
        raise GpuctlError("The local state has no scheduler function; run `gpuctl local down`, then "
                          "`gpuctl local up`.")
    return str(name)


def _start(spec: _Spec, root: sv.StateDir) -> sv.ComponentRecord:
    try:
        return sv.spawn(spec.name, spec.argv, env=spec.env, log_path=root.log_path(spec.name), url=spec.url,
                        health_path=spec.health_path, ready_marker=spec.ready_marker)
    except OSError as exc:
        raise GpuctlError(f"Cannot start the local {spec.name}: {exc}.") from exc


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


# --- status ----------------------------------------------------------------------------------------

def _health(record: sv.ComponentRecord) -> ComponentHealth:
    running = sv.owns(record)
    healthy = running and _healthy(record)
    if not running:
        detail = "not running" if not sv.is_alive(record.pid) else "pid now belongs to another process"
    else:
        detail = "ok" if healthy else ("not answering" if record.url else "not ready")
    return ComponentHealth(record.name, record.pid, running, healthy, record.url, record.log, detail)


def _status(root: sv.StateDir, state: sv.LocalState | None) -> StatusResult:
    if state is None:
        return StatusResult(False, root.root)
    components = [_health(state.components[n]) for n in COMPONENTS if n in state.components]
    return StatusResult(True, root.root, state.endpoint_url, state.external_endpoint, state.profile, components)


def local_status(directory: Path | None = None) -> StatusResult:
    """The health of each recorded component: its pid still ours, and answering."""
    root = sv.StateDir(sv.state_dir(directory))
    return _status(root, root.load())


# --- what the emulator skips ----------------------------------------------------------------------
#
# moto's CloudFormation silently skips AWS::CloudWatch::Alarm and ignores a table's
# TimeToLiveSpecification (reference/moto-capabilities.md §6). Both are read from the deployed template
# and created with the API calls CloudFormation would make, so they cannot drift from it; an endpoint
# that did create them (LocalStack) is left as it is. Also skipped, and not needed locally: the bucket
# policy (moto does not enforce policies), CloudFront (off unless --enable-cdn), and the schedule rule's
# and alarm's invocations (the scheduler loop stands in for them).

def _cfn_yaml(text: str) -> dict[str, Any]:
    """Parse a CloudFormation YAML template, short-form intrinsics (!Ref, !Sub …) as their long form."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def construct(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
        value: Any
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            assert isinstance(node, yaml.MappingNode)
            value = loader.construct_mapping(node, deep=True)
        if suffix == "GetAtt" and isinstance(value, str):
            value = value.split(".", 1)
        return {"Ref" if suffix == "Ref" else f"Fn::{suffix}": value}

    Loader.add_multi_constructor("!", construct)
    data = yaml.load(text, Loader=Loader)
    return data if isinstance(data, dict) else {}


class _Resolver:
    """Resolves Ref / Fn::Sub / Fn::GetAtt against the deployed stack (what CloudFormation would pass)."""

    def __init__(self, clients: AwsClients, stack_name: str, template: Mapping[str, Any]) -> None:
        self._clients = clients
        self._template = template
        stack = clients.cloudformation.describe_stacks(StackName=stack_name)["Stacks"][0]
        declared = template.get("Parameters", {})
        self._refs: dict[str, str] = {k: str(v.get("Default", "")) for k, v in declared.items()}
        self._refs.update({p["ParameterKey"]: p.get("ParameterValue", "") for p in stack.get("Parameters", [])})
        account = clients.client("sts").get_caller_identity()["Account"]
        self._refs.update({"AWS::StackName": stack["StackName"], "AWS::StackId": stack["StackId"],
                           "AWS::Region": str(clients.session.region_name), "AWS::AccountId": str(account),
                           "AWS::Partition": "aws", "AWS::URLSuffix": "amazonaws.com"})
        resources = clients.cloudformation.describe_stack_resources(StackName=stack_name)["StackResources"]
        # Skipped resources come back as entries without a LogicalResourceId: .get() (moto quirk).
        self._physical = {r["LogicalResourceId"]: r.get("PhysicalResourceId", "")
                          for r in resources if r.get("LogicalResourceId")}
        self._refs.update(self._physical)

    def physical(self, logical_id: str) -> str | None:
        return self._physical.get(logical_id)

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (key, arg), = value.items()
            if key == "Ref":
                return self._ref(str(arg))
            if key == "Fn::GetAtt":
                return self._get_att(str(arg[0]), str(arg[1]))
            if key == "Fn::Sub":
                return self._sub(arg)
            if key == "Fn::If":  # the template's Existing* parameters choose between created and given resources
                return self.resolve(arg[1] if self._condition(str(arg[0])) else arg[2])
            if key == "Fn::Select":
                return self.resolve(arg[1])[int(self.resolve(arg[0]))]
            if key == "Fn::Split":
                return str(self.resolve(arg[1])).split(str(arg[0]))
            if key.startswith("Fn::"):
                raise GpuctlError(f"Local mode cannot resolve {key} in the template; extend "
                                  "gpuctl/services/local.py (_Resolver).")
        return {k: self.resolve(v) for k, v in value.items()}

    def _condition(self, name: str) -> bool:
        return self._truth(self._template.get("Conditions", {})[name])

    def _truth(self, expression: Any) -> bool:
        (key, arg), = expression.items()
        if key == "Condition":
            return self._condition(str(arg))
        if key == "Fn::Equals":
            return str(self.resolve(arg[0])) == str(self.resolve(arg[1]))
        if key == "Fn::Not":
            return not self._truth(arg[0])
        if key == "Fn::And":
            return all(self._truth(a) for a in arg)
        if key == "Fn::Or":
            return any(self._truth(a) for a in arg)
        raise GpuctlError(f"Local mode cannot evaluate {key} in a template condition; extend "
                          "gpuctl/services/local.py (_Resolver._truth).")

    def _ref(self, name: str) -> str:
        if name not in self._refs:
            raise GpuctlError(f"Local mode cannot resolve Ref {name}: the emulator did not create it.")
        return self._refs[name]

    def _sub(self, arg: Any) -> str:
        import re

        text, extra = (arg[0], self.resolve(arg[1])) if isinstance(arg, list) else (arg, {})

        def one(match: re.Match[str]) -> str:
            name = match.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"
            if name in extra:
                return str(extra[name])
            if "." in name and not name.startswith("AWS::"):
                logical, attribute = name.split(".", 1)
                return self._get_att(logical, attribute)
            return self._ref(name)

        return re.sub(r"\$\{([^}]+)\}", one, str(text))

    def _get_att(self, logical: str, attribute: str) -> str:
        physical = self._ref(logical)
        kind = self._template.get("Resources", {}).get(logical, {}).get("Type")
        if kind == "AWS::SQS::Queue" and attribute == "QueueName":
            return physical.rstrip("/").rsplit("/", 1)[-1]
        if kind == "AWS::SQS::Queue" and attribute == "Arn":
            attrs = self._clients.sqs.get_queue_attributes(QueueUrl=physical, AttributeNames=["QueueArn"])
            return attrs["Attributes"]["QueueArn"]
        if kind == "AWS::Lambda::Function" and attribute == "Arn":
            config = self._clients.client("lambda").get_function_configuration(FunctionName=physical)
            return str(config["FunctionArn"])
        if kind == "AWS::DynamoDB::Table" and attribute == "Arn":
            return self._clients.dynamodb.describe_table(TableName=physical)["Table"]["TableArn"]
        raise GpuctlError(f"Local mode cannot resolve {logical}.{attribute} ({kind}); extend "
                          "gpuctl/services/local.py (_Resolver._get_att).")


_INT_KEYS = frozenset({"EvaluationPeriods", "DatapointsToAlarm", "Period"})


def _api_shape(value: Any, key: str = "") -> Any:
    """CloudFormation's strings to the API's types (a Ref to a Number parameter resolves to a string)."""
    if isinstance(value, dict):
        return {k: _api_shape(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_api_shape(v, key) for v in value]
    if key in _INT_KEYS:
        return int(value)
    if key == "Threshold":
        return float(value)
    if key in ("ReturnData", "ActionsEnabled", "Enabled") and isinstance(value, str):
        return value.lower() == "true"
    return value


def fill_gaps(clients: AwsClients, stack_name: str, *, template: Path | None = None,
              step: Step | None = None) -> list[str]:
    """Create the template's alarms and table TTLs that the endpoint's CloudFormation did not create.

    Returns what was created (``alarm NAME``, ``ttl TABLE.ATTRIBUTE``).
    """
    from gpuctl.services.deploy import find_sources

    path = template or find_sources().template
    parsed = _cfn_yaml(path.read_text(encoding="utf-8"))
    resolver = _Resolver(clients, stack_name, parsed)
    created: list[str] = []
    for logical, resource in parsed.get("Resources", {}).items():
        kind, props = resource.get("Type"), resource.get("Properties", {})
        if kind == "AWS::CloudWatch::Alarm" and "Condition" not in resource:
            created += _ensure_alarm(clients, _api_shape(resolver.resolve(props)), step)
        elif kind == "AWS::DynamoDB::Table" and props.get("TimeToLiveSpecification"):
            table = resolver.physical(logical)
            spec = _api_shape(resolver.resolve(props["TimeToLiveSpecification"]))
            if table and spec.get("Enabled"):
                created += _ensure_ttl(clients, table, str(spec["AttributeName"]), step)
    log.info("local.gaps_filled", extra={"created": created})
    return created


def _ensure_alarm(clients: AwsClients, props: dict[str, Any], step: Step | None) -> list[str]:
    cloudwatch = clients.client("cloudwatch")
    name = str(props["AlarmName"])
    if cloudwatch.describe_alarms(AlarmNames=[name]).get("MetricAlarms"):
        return []
    if step is not None:
        step(f"Creating the alarm {name} (the emulator skips AWS::CloudWatch::Alarm) …")
    cloudwatch.put_metric_alarm(**props)
    return [f"alarm {name}"]


def _ensure_ttl(clients: AwsClients, table: str, attribute: str, step: Step | None) -> list[str]:
    current = clients.dynamodb.describe_time_to_live(TableName=table)["TimeToLiveDescription"]
    if current.get("TimeToLiveStatus") in ("ENABLED", "ENABLING"):
        return []
    if step is not None:
        step(f"Enabling TTL on {table}.{attribute} (the emulator ignores TimeToLiveSpecification) …")
    clients.dynamodb.update_time_to_live(
        TableName=table, TimeToLiveSpecification={"AttributeName": attribute, "Enabled": True})
    return [f"ttl {table}.{attribute}"]


# --- up --------------------------------------------------------------------------------------------

def local_settings(state: sv.LocalState | None = None, *, directory: Path | None = None) -> Settings:
    """Settings for the local pipeline: only the ``local`` profile counts, never the caller's environment.

    Raises:
        ConfigError: local mode is not up.
    """
    from gpuctl.settings import Settings, read_profile

    if state is None:
        state = sv.StateDir(sv.state_dir(directory)).load()
    if state is None:
        raise ConfigError("Local mode is not running: start it with `gpuctl local up`.")
    values = read_profile(state.profile, Path(state.config_dir))
    # Explicit values (None included) win over the environment, so a GPUCTL_QUEUE_URL meant for AWS can
    # never send a local job elsewhere.
    blank = dict.fromkeys(("aws_profile", "cdn_domain", "dlq_url"))
    return Settings(**{**blank, **values, "profile": state.profile, "config_dir": Path(state.config_dir),
                       "endpoint_url": state.endpoint_url, "region": state.region})


def _admin_settings(state: sv.LocalState) -> Settings:
    from gpuctl.settings import Settings

    return Settings(profile=state.profile, config_dir=Path(state.config_dir), endpoint_url=state.endpoint_url,
                    region=state.region, aws_profile=None)


class _LocalClients(AwsClients):
    """gpuctl's client factory with fixed dummy keys: the caller's AWS credentials (or SSO and
    credential_process profiles) are never used, let alone sent, for the local endpoint."""

    @functools.cached_property
    def session(self) -> boto3.session.Session:
        import boto3

        return boto3.session.Session(aws_access_key_id=_DUMMY_KEY, aws_secret_access_key=_DUMMY_KEY,
                                     region_name=self.settings.region or LOCAL_REGION)


def _clients(state: sv.LocalState) -> AwsClients:
    return _LocalClients(_admin_settings(state))


def _gpu_instance(clients: AwsClients) -> str:
    """An EC2 instance record that stands for the GPU instance, stopped, so a submit visibly starts it."""
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

    result = deploy(clients, _admin_settings(state), instance_id=state.instance_id,
                    idle_minutes=options.idle_minutes, on_step=step, timeout=120.0, poll_delay=0.25)
    state.stack_name = result.stack_name
    state.settings_written = sorted(k for k, v in result.settings_written.items() if v is not None)
    return dict(result.outputs)


def _start_component(name: str, state: sv.LocalState, root: sv.StateDir, port: int | None = None
                     ) -> sv.ComponentRecord:
    record = _start(_spec(name, state, root, port), root)
    state.components[name] = record
    root.save(state)
    return record


def _fresh_up(target: _Target, root: sv.StateDir, options: LocalOptions, step: Step,
              ) -> tuple[sv.LocalState, list[str]]:
    from gpuctl.settings import config_dir

    external = target.endpoint_url
    state = sv.LocalState(
        endpoint_url=external or "", profile=LOCAL_PROFILE, config_dir=str(config_dir(target.config_dir)),
        region=target.region or LOCAL_REGION, started_at=time.time(),
        external_endpoint=bool(external), options=options.document(),
    )
    root.root.mkdir(parents=True, exist_ok=True)
    aws = None
    if not external:
        port = sv.free_port()
        state.endpoint_url = f"http://127.0.0.1:{port}"
        step("Starting the AWS emulator (moto) …")
        aws = _start_component("aws", state, root, port)
    # The stand-in needs nothing from AWS: start it now so that it boots while the stack deploys.
    step("Starting the ComfyUI stand-in …")
    comfy = _start_component("comfyui", state, root, sv.free_port())
    if aws is not None:
        _wait_ready(aws, options.ready_timeout)
    clients = _clients(state)
    step("Creating the GPU instance record (stopped) …")
    state.instance_id = _gpu_instance(clients)
    root.save(state)
    step("Deploying infra/cloudformation.yaml (the `gpuctl deploy` code path) …")
    outputs = _deploy(clients, state, options, step)
    state.options["function_name"] = outputs.get("LambdaFunctionName", "")
    root.save(state)
    filled = fill_gaps(clients, state.stack_name or "gpuctl", step=step)
    _wait_ready(comfy, options.ready_timeout)
    step("Starting the adapter and the scheduler loop …")
    adapter = _start_component("adapter", state, root)
    scheduler = _start_component("scheduler", state, root)
    _wait_ready(adapter, options.ready_timeout)
    _wait_ready(scheduler, options.ready_timeout)
    return state, filled


def _teardown(root: sv.StateDir, state: sv.LocalState | None) -> list[sv.StopOutcome]:
    outcomes: list[sv.StopOutcome] = []
    if state is not None:
        for name in reversed(COMPONENTS):
            if name in state.components:
                outcomes.append(sv.stop(state.components[name]))
    root.clear()
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
            result = _revive(root, state, step, started)
            if result is not None:
                return result
        try:
            state, filled = _fresh_up(_Target(endpoint_url, region, config_dir), root, options, step)
        except BaseException:
            _teardown(root, root.load())
            raise
    from gpuctl.settings import profile_path

    log.info("local.up", extra={"endpoint": state.endpoint_url, "seconds": time.monotonic() - started})
    return UpResult("started", _status(root, state), time.monotonic() - started,
                    profile_path(state.profile, Path(state.config_dir)), filled=filled)


def _revive(root: sv.StateDir, state: sv.LocalState, step: Step, started: float) -> UpResult | None:
    """With state recorded: nothing to do, restart dead components, or (emulator gone) None for a fresh up."""
    from gpuctl.settings import profile_path

    status = _status(root, state)
    config = profile_path(state.profile, Path(state.config_dir))
    if status.healthy:
        return UpResult("already-up", status, time.monotonic() - started, config)
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
        if health.healthy:
            continue
        record = state.components[health.name]
        if health.running:  # alive but not answering: replace it
            sv.stop(record)
        step(f"Restarting the {health.name} …")
        port = int(record.url.rsplit(":", 1)[1]) if record.url else None
        new = _start_component(health.name, state, root, port)
        _wait_ready(new, options.ready_timeout)
        restarted.append(health.name)
    return UpResult("restarted", _status(root, state), time.monotonic() - started, config, restarted=restarted)


def _expected(state: sv.LocalState) -> set[str]:
    return {n for n in COMPONENTS if not (n == "aws" and state.external_endpoint)}


# --- down ------------------------------------------------------------------------------------------

def local_down(directory: Path | None = None) -> DownResult:
    """Stop the processes `up` started (only while their pids are still theirs) and remove the state."""
    root = sv.StateDir(sv.state_dir(directory))
    with root.lock():
        state = root.load()
        if state is None:
            return DownResult(False)
        outcomes = _teardown(root, state)
        removed = _forget_profile(state)
    log.info("local.down", extra={"results": {o.name: o.result for o in outcomes}})
    return DownResult(True, outcomes, removed)


# --- demo ------------------------------------------------------------------------------------------

@dataclass
class DemoJob:
    """One demo job and how long each of its stages took (None: not observed)."""

    kind: str
    job_id: str
    submit_s: float
    queued_s: float | None = None  # created → claimed by the adapter (processing)
    processing_s: float | None = None  # claimed → completed
    download_s: float | None = None
    status: str = "pending"
    result_url: str | None = None
    path: Path | None = None
    error: str | None = None

    def document(self) -> dict[str, Any]:
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 2)

        return {"job_type": self.kind, "job_id": self.job_id, "status": self.status,
                "result_s3_uri": self.result_url, "file": str(self.path) if self.path else None,
                "error": self.error, "seconds": {"submit": r(self.submit_s), "queued": r(self.queued_s),
                                                 "processing": r(self.processing_s),
                                                 "download": r(self.download_s)}}


@dataclass
class DemoResult:
    output_dir: Path
    up: UpResult | None = None
    jobs: list[DemoJob] = field(default_factory=list)
    sample: Path | None = None
    up_s: float = 0.0
    total_s: float = 0.0
    down: DownResult | None = None

    def document(self) -> dict[str, Any]:
        return {"output_dir": str(self.output_dir), "sample": str(self.sample) if self.sample else None,
                "local_mode": self.up.action if self.up else None, "taken_down": self.down is not None,
                "seconds": {"up": round(self.up_s, 2), "total": round(self.total_s, 2)},
                "jobs": [j.document() for j in self.jobs]}


#: The two demo jobs: the job type and the options a user would pass to `gpuctl submit`.
DEMO_JOBS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("camera-angle", {"vertical": 1, "horizontal": 1, "zoom": 0}),
    ("qwen-image-edit", {"prompt": "Turn the photo into a pencil sketch"}),
)


def run_demo(
    output_dir: Path,
    *,
    keep: bool = False,
    endpoint_url: str | None = None,
    region: str | None = None,
    config_dir: Path | None = None,
    directory: Path | None = None,
    options: LocalOptions | None = None,
    on_step: Step | None = None,
    on_change: Callable[[DemoJob, JobRecord], None] | None = None,
    timeout: float = 180.0,
) -> DemoResult:
    """Bring local mode up (unless it is), run one job of each type on the sample picture, download the
    results to ``output_dir``; take local mode down again unless ``keep`` or it was already up.

    Raises:
        JobFailed: a demo job failed (local mode is still taken down).
        WaitTimeout: the jobs did not finish within ``timeout`` seconds.
        GpuctlError: local mode did not come up.
    """
    from gpuctl.local.sample import write_sample

    step = on_step or (lambda _message: None)
    began = time.monotonic()
    result = DemoResult(output_dir.resolve())
    result.up = local_up(endpoint_url=endpoint_url, region=region, config_dir=config_dir, directory=directory,
                         options=options, on_step=step)
    result.up_s = time.monotonic() - began
    try:
        result.sample = write_sample(result.output_dir / "sample-input.png")
        _demo_jobs(local_settings(directory=directory), result, step, on_change, timeout)
    finally:
        if result.up.action != "already-up" and not keep:
            step("Taking local mode down …")
            result.down = local_down(directory)
        result.total_s = time.monotonic() - began
    return result


def _demo_jobs(settings: Settings, result: DemoResult, step: Step,
               on_change: Callable[[DemoJob, JobRecord], None] | None, timeout: float) -> None:
    from gpuctl.inputs import ImageLimits
    from gpuctl.models import JobType
    from gpuctl.services.context import Gateways
    from gpuctl.services.submit import draft_job, submit_draft
    from gpuctl.services.watch import watch_jobs

    gw = Gateways(settings, _LocalClients(settings))
    assert result.sample is not None
    step("Submitting the sample picture as both job types …")
    for kind, fields in DEMO_JOBS:
        t0 = time.monotonic()
        draft = draft_job(JobType(kind), str(result.sample), fields,
                          limits=ImageLimits.from_settings(settings))
        submitted = submit_draft(gw, draft)
        result.jobs.append(DemoJob(kind, submitted.record.task_id, time.monotonic() - t0))
    by_id = {job.job_id: job for job in result.jobs}
    claimed: dict[str, float] = {}

    def changed(record: JobRecord) -> None:
        job = by_id[record.task_id]
        job.status = record.status.value
        if record.status.value == "processing" and record.task_id not in claimed:
            # The claim writes updated_at; the first processing record seen carries that time.
            claimed[record.task_id] = record.updated_at
        if record.status.is_finished:
            job.result_url, job.error = record.result_s3_uri, record.error_message
            start = claimed.get(record.task_id)
            end = record.finished_at or record.updated_at
            if start is not None:
                job.queued_s, job.processing_s = start - record.created_at, end - start
        if on_change is not None:
            on_change(job, record)

    outcome = watch_jobs(gw.table, list(by_id), on_change=changed, timeout=timeout, interval=0.25,
                         max_interval=0.5)
    _finished_or_raise(outcome.failed, outcome.timed_out, outcome.unfinished, outcome.elapsed)
    _download(gw, result)


def _finished_or_raise(failed: list[JobRecord], timed_out: bool, unfinished: list[JobRecord],
                       elapsed: float) -> None:
    if failed:
        reasons = "; ".join(f"{r.kind} {r.task_id}: {r.error_message or 'no reason recorded'}" for r in failed)
        raise JobFailed(f"A demo job failed — {reasons}. The adapter's log (`gpuctl local status`) says why.")
    if timed_out:
        waiting = ", ".join(f"{r.kind} ({r.status.value})" for r in unfinished)
        raise WaitTimeout(f"The demo jobs did not finish within {elapsed:.0f} s (still {waiting}); "
                          "see the logs listed by `gpuctl local status`.")


def _download(gw: Gateways, result: DemoResult) -> None:
    from gpuctl.services.jobs import download_result

    for job in result.jobs:
        t0 = time.monotonic()
        saved = download_result(gw, job.job_id, result.output_dir / f"{job.kind}.png")
        job.download_s = time.monotonic() - t0
        job.path = saved.path
