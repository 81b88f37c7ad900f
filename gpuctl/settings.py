"""Settings: command-line flags > environment > the profile's config file.

The environment takes gpuctl's own names (``GPUCTL_QUEUE_URL`` …) and the running system's names
(``AWS_DEFAULT_REGION``, ``SQS_QUEUE_URL``, ``DYNAMODB_TABLE``, ``GPU_INSTANCE_ID``). The config file is
one TOML file per profile in the user's config directory (``gpuctl config path``), written by
``gpuctl config set`` and by ``gpuctl deploy`` from the stack outputs.

Nothing here builds a Settings at import; the CLI root callback, the adapter's ``main()`` and the tests
do, and pass it down.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gpuctl.errors import ConfigError

__all__ = [
    "SETTING_HELP",
    "Settings",
    "config_dir",
    "load_settings",
    "profile_path",
    "published_url",
    "read_profile",
    "write_profile",
]

_PROFILE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _env(*names: str) -> Any:
    return Field(default=None, validation_alias=AliasChoices(*names))


class Settings(BaseSettings):
    """Everything gpuctl needs to find the system it operates."""

    model_config = SettingsConfigDict(
        env_prefix="GPUCTL_", extra="ignore", populate_by_name=True, validate_default=True
    )

    profile: str = "default"
    config_dir: Path | None = None

    region: str | None = _env("GPUCTL_REGION", "AWS_REGION", "AWS_DEFAULT_REGION")
    endpoint_url: str | None = _env("GPUCTL_ENDPOINT_URL", "AWS_ENDPOINT_URL")
    aws_profile: str | None = _env("GPUCTL_AWS_PROFILE", "AWS_PROFILE")
    queue_url: str | None = _env("GPUCTL_QUEUE_URL", "SQS_QUEUE_URL")
    dlq_url: str | None = _env("GPUCTL_DLQ_URL")
    table_name: str | None = _env("GPUCTL_TABLE_NAME", "DYNAMODB_TABLE")
    instance_id: str | None = _env("GPUCTL_INSTANCE_ID", "GPU_INSTANCE_ID")
    bucket: str | None = _env("GPUCTL_BUCKET")
    cdn_domain: str | None = _env("GPUCTL_CDN_DOMAIN")
    #: The scheduler Lambda's log group (`gpuctl instance decisions`); deploy records it from the stack.
    scheduler_log_group: str | None = _env("GPUCTL_SCHEDULER_LOG_GROUP")
    #: The instance's recorded state changes (`gpuctl cost`); deploy records it from the stack.
    history_table: str | None = _env("GPUCTL_HISTORY_TABLE")
    #: Fleet mode (issue 13): the EC2 Auto Scaling group of GPU instances; deploy --fleet records it. Set, every
    #: command works with the group instead of instance_id.
    fleet_group: str | None = _env("GPUCTL_FLEET_GROUP")
    stack_name: str = "gpuctl"

    inputs_prefix: str = "inputs/"
    results_prefix: str = "results/"
    # Image limits (gpuctl.inputs.ImageLimits): the CLI and the adapter refuse larger inputs alike.
    max_image_mb: float = Field(default=20.0, gt=0)
    max_image_megapixels: float = Field(default=40.0, gt=0)
    max_image_side: int = Field(default=12000, ge=16)
    #: The largest result `gpuctl result` downloads (from S3 or from an https:// result URL).
    max_result_mb: float = Field(default=200.0, gt=0)
    job_ttl_days: int = Field(default=30, ge=1)
    presign_seconds: int = Field(default=3600, ge=60, le=7 * 24 * 3600)
    # `gpuctl status` says why a job waits once it has been pending this long (gpuctl.services.diagnose).
    stuck_after: float = Field(default=120.0, gt=0)

    connect_timeout: float = Field(default=5.0, gt=0)
    read_timeout: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=5, ge=1, le=20)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return check_setting_url(value)

    @field_validator("queue_url", "dlq_url")
    @classmethod
    def _queue(cls, value: str | None) -> str | None:
        return check_setting_url(value, http_only=False)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _ProfileFileSource(settings_cls, init_settings))

    def require(self, name: str) -> str:
        """The value of a setting that this command cannot work without.

        Raises:
            ConfigError: naming the setting and how to set it.
        """
        value = getattr(self, name)
        if value in (None, ""):
            raise self.missing(name)
        return str(value)

    def missing(self, name: str) -> ConfigError:
        """The error for a setting this command needs and nobody set; a profile that does not exist is named."""
        return ConfigError(missing_setting_message(name, self.profile, self.config_dir))

    def result_url(self, bucket: str, key: str) -> str:
        """Where a result is published: the CDN when one is configured, else the s3:// URI."""
        return published_url(bucket, key, self.cdn_domain)


def published_url(bucket: str, key: str, cdn_domain: str | None) -> str:
    """The URL a result at ``s3://bucket/key`` is published as: ``https://<cdn_domain>/<key>`` (the CDN serves
    the bucket at its root), else the s3:// URI. The adapter and the stand-in's unified API both record this."""
    if cdn_domain:
        return f"https://{cdn_domain.removeprefix('https://').rstrip('/')}/{key}"
    return f"s3://{bucket}/{key}"


SETTING_HELP: dict[str, tuple[str, str]] = {
    # name: (what it is, the seed's environment variable or gpuctl's)
    "region": ("AWS region", "AWS_DEFAULT_REGION"),
    "queue_url": ("SQS queue URL", "SQS_QUEUE_URL"),
    "dlq_url": ("dead-letter queue URL", "GPUCTL_DLQ_URL"),
    "table_name": ("DynamoDB table name", "DYNAMODB_TABLE"),
    "instance_id": ("GPU instance id", "GPU_INSTANCE_ID"),
    "bucket": ("S3 bucket for inputs and results", "GPUCTL_BUCKET"),
    "endpoint_url": ("AWS endpoint URL", "GPUCTL_ENDPOINT_URL"),
    "scheduler_log_group": ("scheduler log group", "GPUCTL_SCHEDULER_LOG_GROUP"),
    "history_table": ("instance history table", "GPUCTL_HISTORY_TABLE"),
    "fleet_group": ("fleet mode's Auto Scaling group", "GPUCTL_FLEET_GROUP"),
}


def check_setting_url(value: str | None, *, http_only: bool = True) -> str | None:
    """A URL setting: no user name or password (refused without being echoed back, as every message would repeat
    it); with ``http_only`` (the endpoint) an http(s) URL with a host, which botocore needs."""
    from urllib.parse import urlsplit

    if value is None or value == "":
        return value
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        if not http_only:
            return value
        raise ValueError("is not a valid URL (bad host or port)") from None
    if parts.username is not None or parts.password is not None:
        raise ValueError("carries a user name or password; gpuctl refuses credentials in URLs")
    if not http_only:
        return value
    if parts.scheme not in ("http", "https") or not parts.hostname:
        from gpuctl.inputs import display

        raise ValueError(f"{display(value, limit=80)!r} is not an http:// or https:// URL")
    return value.strip()


def missing_setting_message(name: str, profile: str, directory: Path | None = None) -> str:
    what, env = SETTING_HELP.get(name, (name.replace("_", " "), f"GPUCTL_{name.upper()}"))
    flag = " --profile " + profile if profile != "default" else ""
    if profile != "default" and not profile_path(profile, directory).exists():
        return no_profile_message(profile, directory)
    return (
        f"No {what} is configured: set {env}, or run `gpuctl{flag} config set {name} VALUE`, "
        f"or `gpuctl{flag} deploy` to create the stack and record it."
    )


def no_profile_message(profile: str, directory: Path | None = None) -> str:
    """A profile was named (--profile, GPUCTL_PROFILE) that has no config file."""
    path = profile_path(profile, directory)
    flag = f"gpuctl --profile {profile}"
    create = ("`gpuctl local up` creates it" if profile == "local" else
              f"`{flag} deploy` or `{flag} config set NAME VALUE` creates it")
    return f"There is no profile {profile} ({path} does not exist): {create}."


def config_dir(explicit: Path | None = None) -> Path:
    """The folder holding one ``<profile>.toml`` per profile."""
    if explicit is not None:
        return explicit
    if env := os.environ.get("GPUCTL_CONFIG_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "gpuctl"


def profile_path(profile: str, directory: Path | None = None) -> Path:
    if not _PROFILE_NAME.match(profile):
        raise ConfigError(f"Invalid profile name {profile!r}: use letters, digits, '.', '_' or '-'.")
    return config_dir(directory) / f"{profile}.toml"


def read_profile(profile: str, directory: Path | None = None) -> dict[str, Any]:
    path = profile_path(profile, directory)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"Cannot read the config file {path}: {exc}.") from None


def write_profile(profile: str, values: dict[str, Any], directory: Path | None = None) -> Path:
    """Merge ``values`` into the profile's file (a value of None removes the key); return its path.

    The file is edited in place with tomlkit, so a person's comments, blank lines and key order survive.
    """
    import tomlkit
    from tomlkit.exceptions import TOMLKitError

    known = set(Settings.model_fields) - {"profile", "config_dir"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"Unknown setting {unknown[0]!r}; known settings: {', '.join(sorted(known))}.")
    path = profile_path(profile, directory)
    try:
        document = tomlkit.parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        document = tomlkit.document()
    except (OSError, UnicodeDecodeError, TOMLKitError) as exc:
        raise ConfigError(f"Cannot read the config file {path}: {exc}.") from None
    for key, value in values.items():
        if value is None:
            document.pop(key, None)
        else:
            document[key] = value
    # Validate before writing so a bad value never lands in the file.
    try:
        Settings.model_validate({**document.unwrap(), "profile": profile})
    except ValidationError as exc:
        first = exc.errors()[0]
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"Invalid value for {first['loc'][0]}: {message}.") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(tomlkit.dumps(document), encoding="utf-8")
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


class _ProfileFileSource(PydanticBaseSettingsSource):
    """Reads ``<config dir>/<profile>.toml``; the profile comes from the flags, then GPUCTL_PROFILE."""

    def __init__(self, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        init = init_settings()
        self._profile = str(init.get("profile") or os.environ.get("GPUCTL_PROFILE") or "default")
        directory = init.get("config_dir")
        self._data = read_profile(self._profile, Path(directory) if directory else None)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


def load_settings(*, require_profile: bool = False, **overrides: Any) -> Settings:
    """Build Settings from flags (``overrides``, None meaning "not given"), environment and profile file.

    With ``require_profile``, a profile other than ``default`` must have its config file (a command that only
    reads settings must not quietly run on the environment alone when the profile it was told to use is gone).

    Raises:
        ConfigError: when a value is invalid, or the profile named does not exist.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    if require_profile:
        profile = str(given.get("profile") or os.environ.get("GPUCTL_PROFILE") or "default")
        directory = given.get("config_dir")
        if profile != "default" and not profile_path(profile, Path(directory) if directory else None).exists():
            raise ConfigError(no_profile_message(profile, Path(directory) if directory else None))
    try:
        return Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = first["loc"][0] if first["loc"] else "settings"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"Invalid setting {name}: {message}.") from None
