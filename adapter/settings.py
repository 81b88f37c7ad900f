"""The adapter's settings: gpuctl's Settings (queue, table, bucket, region…) plus the daemon's own knobs.

Every field is read from the environment with the ``GPUCTL_`` prefix (``GPUCTL_BACKEND``,
``GPUCTL_BACKEND_URL``, ``GPUCTL_INFLIGHT`` …), so the systemd unit's ``EnvironmentFile`` is the whole
configuration; the seed's names (``SQS_QUEUE_URL``, ``DYNAMODB_TABLE``, ``AWS_DEFAULT_REGION``) work too.
"""

from __future__ import annotations

import os
import socket
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from gpuctl.errors import ConfigError
from gpuctl.settings import Settings

__all__ = ["AdapterSettings", "BackendKind", "load_adapter_settings", "load_backend_settings"]

_DEFAULT_URLS = {"comfyui": "http://127.0.0.1:8188", "unified": "http://127.0.0.1:8000"}


class BackendKind(StrEnum):
    COMFYUI = "comfyui"
    UNIFIED = "unified"


def _default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class AdapterSettings(Settings):
    """What the adapter daemon needs besides gpuctl's AWS settings."""

    backend: BackendKind = BackendKind.COMFYUI
    backend_url: str | None = None  # default: 127.0.0.1:8188 (comfyui) or :8000 (unified)
    inflight: int = Field(default=2, ge=1, le=10)
    job_timeout: float = Field(default=1800.0, gt=0)
    heartbeat_interval: float = Field(default=30.0, gt=0)
    # A processing record whose heartbeat is older than this belongs to a crashed worker.
    heartbeat_stale_after: float = Field(default=120.0, gt=0)
    visibility_extension: int = Field(default=120, ge=1, le=43200)
    release_delay: int = Field(default=15, ge=0, le=43200)
    poll_wait: int = Field(default=20, ge=0, le=20)
    ready_timeout: float = Field(default=900.0, gt=0)
    backend_down_grace: float = Field(default=120.0, gt=0)
    history_poll_interval: float = Field(default=2.0, gt=0)
    max_resubmits: int = Field(default=2, ge=0, le=10)
    # A job in hand has its record read at least this often (a progress or heartbeat write counts), so a
    # cancel request is seen within this many seconds.
    cancel_check_interval: float = Field(default=2.0, gt=0)
    # How long a stopped prompt (cancel, timeout) may take to confirm on ComfyUI before the job is ended
    # anyway (the interrupt is re-sent, then sent globally if the prompt is the one running, half-way).
    interrupt_confirm_timeout: float = Field(default=10.0, gt=0)
    # The activity marker (gpuctl.aws.dynamo.Activity) is written at most this often.
    activity_interval: float = Field(default=15.0, gt=0)
    # ComfyUI's folder on this machine (its input/ and output/ beside main.py): the adapter deletes the files
    # of each job from there when the job ends. ComfyUI has no HTTP route for it. Unset: files stay.
    comfyui_dir: Path | None = None
    comfyui_input_dir: Path | None = None  # default <comfyui_dir>/input (ComfyUI's --input-directory)
    comfyui_output_dir: Path | None = None  # default <comfyui_dir>/output (ComfyUI's --output-directory)
    # Leftover job files (from a crash) older than this are swept from those folders (0: 2 x job_timeout).
    comfyui_file_ttl: float = Field(default=0.0, ge=0)
    # Unified API: the longest sleep between status reads, and how long one status read may block.
    unified_poll_max: float = Field(default=0.5, gt=0)
    unified_status_timeout: float = Field(default=30.0, gt=0)
    # stamina's bounds for one backend HTTP call (jittered exponential backoff between attempts).
    http_retry_attempts: int = Field(default=5, ge=1, le=20)
    http_retry_timeout: float = Field(default=60.0, gt=0)
    max_receives_fallback: int = Field(default=5, ge=1)
    workflows_dir: Path | None = None
    worker_id: str = Field(default_factory=_default_worker_id, min_length=1)
    shutdown_grace: float = Field(default=60.0, ge=0)
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _check(self) -> AdapterSettings:
        if self.backend_url is None:
            self.backend_url = _DEFAULT_URLS[self.backend.value]
        self.backend_url = self.backend_url.rstrip("/")
        if self.heartbeat_interval >= self.visibility_extension:
            raise ValueError(
                "heartbeat_interval must be shorter than visibility_extension, or the message "
                "becomes visible again while the job runs"
            )
        if self.heartbeat_stale_after <= self.heartbeat_interval:
            raise ValueError("heartbeat_stale_after must be longer than heartbeat_interval")
        if self.comfyui_dir is not None:
            self.comfyui_input_dir = self.comfyui_input_dir or self.comfyui_dir / "input"
            self.comfyui_output_dir = self.comfyui_output_dir or self.comfyui_dir / "output"
        if self.comfyui_file_ttl == 0:
            self.comfyui_file_ttl = max(3600.0, 2 * self.job_timeout)
        return self

    @property
    def base_url(self) -> str:
        assert self.backend_url is not None  # filled by the validator
        return self.backend_url


def load_adapter_settings(**overrides: Any) -> AdapterSettings:
    """Build AdapterSettings from overrides (None = not given), the environment and the profile file.

    Raises:
        ConfigError: a value is invalid, or a setting the daemon cannot run without is missing.
    """
    return _load(overrides, require_aws=True)


def load_backend_settings(**overrides: Any) -> AdapterSettings:
    """AdapterSettings for ``gpuctl adapter check``, which talks to the backend only (no AWS setting needed).

    Raises:
        ConfigError: a value is invalid.
    """
    return _load(overrides, require_aws=False)


def _load(overrides: dict[str, Any], *, require_aws: bool) -> AdapterSettings:
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = AdapterSettings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = first["loc"][0] if first["loc"] else "settings"
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"Invalid adapter setting {name}: {msg}.") from None
    if require_aws:
        for name in ("queue_url", "table_name", "bucket"):
            settings.require(name)
    return settings
