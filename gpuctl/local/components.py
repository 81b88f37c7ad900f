"""How each local-mode process is started, and the settings and clients that point at the local stack.

Shared by ``gpuctl.services.local`` (which starts the emulator, the GPU box and the scheduler loop) and
``gpuctl.local.box`` (the GPU box, which starts ComfyUI and the adapter while the instance runs), so a
service started by either runs the same way on every start.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpuctl.aws._session import AwsClients
from gpuctl.errors import ConfigError, GpuctlError
from gpuctl.local import supervisor as sv

if TYPE_CHECKING:
    import boto3

    from gpuctl.settings import Settings

__all__ = [
    "BOX_READY_EVENT",
    "BOX_SERVICES",
    "DUMMY_KEY",
    "LOCAL_REGION",
    "LocalClients",
    "LocalOptions",
    "Spec",
    "adapter_env",
    "admin_settings",
    "child_env",
    "comfyui_url",
    "component_spec",
    "local_settings",
]

LOCAL_REGION = "us-east-1"
DUMMY_KEY = "gpuctl-local"
#: What runs on the GPU box, in start order (the box stops them in reverse: the adapter drains first).
BOX_SERVICES = ("comfyui", "adapter")
BOX_READY_EVENT = "box.ready"
_SEED_ENV = ("SQS_QUEUE_URL", "DYNAMODB_TABLE", "GPU_INSTANCE_ID")


@dataclass(frozen=True)
class LocalOptions:
    """How local mode runs; kept in state.json so that restarted components run the same way."""

    seconds_per_job: float = 2.0
    #: The scheduler loop stops the idle GPU box after this; any length (the stack keeps the template's
    #: IdleMinutes, whose minimum is 5: the loop is told the shorter window directly).
    idle_seconds: float = 300.0
    scheduler_interval: float = 5.0
    ready_timeout: float = 60.0
    #: How long the GPU box "boots" after the instance starts, before ComfyUI and the adapter start.
    boot_delay: float = 2.0
    #: A ComfyUI the user runs; None: the stand-in runs on the box.
    comfyui_url: str | None = None
    #: A workflow override folder for the adapter (GPUCTL_WORKFLOWS_DIR).
    workflows_dir: str | None = None

    def document(self) -> dict[str, Any]:
        return {"seconds_per_job": self.seconds_per_job, "idle_seconds": self.idle_seconds,
                "scheduler_interval": self.scheduler_interval, "ready_timeout": self.ready_timeout,
                "boot_delay": self.boot_delay, "comfyui_url": self.comfyui_url,
                "workflows_dir": self.workflows_dir}

    @classmethod
    def from_document(cls, data: Mapping[str, Any]) -> LocalOptions:
        default = cls()

        def number(name: str) -> float:
            return float(data.get(name, getattr(default, name)))

        def text(name: str) -> str | None:
            value = data.get(name)
            return str(value) if value else None

        return cls(number("seconds_per_job"), number("idle_seconds"), number("scheduler_interval"),
                   number("ready_timeout"), number("boot_delay"), text("comfyui_url"), text("workflows_dir"))


def comfyui_url(state: sv.LocalState) -> str:
    """Where the adapter finds ComfyUI: the user's, or the stand-in's port chosen by `up`."""
    options = LocalOptions.from_document(state.options)
    url = options.comfyui_url or state.options.get("standin_url")
    if not url:
        raise GpuctlError("The local state has no ComfyUI address; run `gpuctl local down`, then "
                          "`gpuctl local up`.")
    return str(url)


# --- environment of the children -------------------------------------------------------------------

def child_env(state: sv.LocalState, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without anything that points at real AWS or another gpuctl setup.

    AWS and gpuctl variables (and the seed's names) would override the ``local`` profile, so they go;
    dummy keys go in (an emulator accepts any), and the AWS config files are hidden so that a
    ``credential_process`` or SSO profile is never consulted for a loopback endpoint.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "GPUCTL_", "MOTO_")) and k not in _SEED_ENV}
    env.update({
        "AWS_ACCESS_KEY_ID": DUMMY_KEY, "AWS_SECRET_ACCESS_KEY": DUMMY_KEY,
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
class Spec:
    name: str
    argv: list[str]
    env: dict[str, str]
    url: str | None = None
    health_path: str | None = None
    ready_marker: str | None = None

    def start(self, root: sv.StateDir) -> sv.ComponentRecord:
        """Spawn it detached, its output appended to ``logs/<name>.log``.

        Raises:
            GpuctlError: the program could not be started.
        """
        try:
            return sv.spawn(self.name, self.argv, env=self.env, log_path=root.log_path(self.name), url=self.url,
                            health_path=self.health_path, ready_marker=self.ready_marker)
        except OSError as exc:
            raise GpuctlError(f"Cannot start the local {self.name}: {exc}.") from exc


def adapter_env(state: sv.LocalState) -> dict[str, str]:
    """The adapter's settings on the local GPU box (what /etc/gpuctl/adapter.env holds on a real one)."""
    options = LocalOptions.from_document(state.options)
    env = {
        "GPUCTL_PROFILE": state.profile, "GPUCTL_CONFIG_DIR": state.config_dir,
        "GPUCTL_BACKEND": "comfyui", "GPUCTL_BACKEND_URL": comfyui_url(state),
        "GPUCTL_WORKER_ID": "local-adapter",
        # A short long-poll and grace keep a box stop quick; a message still wakes the poll at once.
        "GPUCTL_POLL_WAIT": "1", "GPUCTL_SHUTDOWN_GRACE": "5",
    }
    if options.workflows_dir:
        env["GPUCTL_WORKFLOWS_DIR"] = options.workflows_dir
    return env


def component_spec(name: str, state: sv.LocalState, root: sv.StateDir, port: int | None = None) -> Spec:
    """How to start one component for ``state`` (the same on first start and on restart)."""
    py = sys.executable
    options = LocalOptions.from_document(state.options)
    if name == "aws":
        assert port is not None
        return Spec(name, [py, "-m", "gpuctl.local.emulator", "-H", "127.0.0.1", "-p", str(port),
                           "--region", state.region],
                    child_env(state, {"MOTO_EC2_LOAD_DEFAULT_AMIS": "false"}),
                    url=f"http://127.0.0.1:{port}", health_path="/moto-api/config")
    if name == "comfyui":
        url = comfyui_url(state)
        folder = root.root / "comfyui"
        return Spec(name, [py, "-m", "gpuctl.local.comfyui_standin", "--port", url.rsplit(":", 1)[1],
                           "--seconds-per-job", str(options.seconds_per_job),
                           "--input-dir", str(folder / "input"), "--output-dir", str(folder / "output"),
                           "--temp-dir", str(folder / "temp"), *_standin_results(state)],
                    child_env(state), url=url, health_path="/system_stats")
    if name == "adapter":
        return Spec(name, [py, "-m", "adapter"], child_env(state, adapter_env(state)),
                    ready_marker='"adapter.started"')
    if name == "box":
        return Spec(name, [py, "-m", "gpuctl.local.box", "--state-dir", str(root.root)], child_env(state),
                    ready_marker=f'"{BOX_READY_EVENT}"')
    if name == "scheduler":
        from gpuctl.local.scheduler import READY_EVENT

        return Spec(name, [py, "-m", "gpuctl.local.scheduler", "--endpoint-url", state.endpoint_url,
                           "--region", state.region, "--function-name", _function_name(state),
                           "--interval", str(options.scheduler_interval),
                           "--idle-minutes", f"{options.idle_seconds / 60:g}"],
                    child_env(state), ready_marker=f'"{READY_EVENT}"')
    raise ValueError(name)


def _standin_results(state: sv.LocalState) -> list[str]:
    """The stand-in's unified API publishes results as the running one does: into the stack's bucket (the
    emulator's), as ``https://<cdn>/<key>`` when the local profile names a CDN domain. The box starts the stand-in
    only after the deploy, so the bucket exists by then."""
    settings = local_settings(state)
    if not settings.bucket:
        return []
    args = ["--output-bucket", settings.bucket, "--output-prefix", settings.results_prefix,
            "--s3-endpoint-url", state.endpoint_url]
    return args + (["--cdn-domain", settings.cdn_domain] if settings.cdn_domain else [])


def _function_name(state: sv.LocalState) -> str:
    name = state.options.get("function_name")
    if not name:
        raise GpuctlError("The local state has no scheduler function; run `gpuctl local down`, then "
                          "`gpuctl local up`.")
    return str(name)


# --- settings and clients for the local stack ------------------------------------------------------

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


def admin_settings(state: sv.LocalState) -> Settings:
    """Settings that reach the local endpoint before (or without) the profile's stack outputs."""
    from gpuctl.settings import Settings

    return Settings(profile=state.profile, config_dir=Path(state.config_dir), endpoint_url=state.endpoint_url,
                    region=state.region, aws_profile=None, instance_id=state.instance_id)


class LocalClients(AwsClients):
    """gpuctl's client factory with fixed dummy keys: the caller's AWS credentials (or SSO and
    credential_process profiles) are never used, let alone sent, for the local endpoint."""

    @functools.cached_property
    def session(self) -> boto3.session.Session:
        import boto3

        return boto3.session.Session(aws_access_key_id=DUMMY_KEY, aws_secret_access_key=DUMMY_KEY,
                                     region_name=self.settings.region or LOCAL_REGION)
