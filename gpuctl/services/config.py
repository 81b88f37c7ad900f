"""The profile config file: what the effective settings are and where each came from; set and unset."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuctl.errors import ConfigError
from gpuctl.settings import Settings, load_settings, profile_path, read_profile, write_profile

__all__ = ["ConfigEntry", "ConfigView", "config_path", "set_setting", "show_config", "unset_setting"]

# Not settings of the system gpuctl operates, but of gpuctl's own file handling.
_META = frozenset({"profile", "config_dir"})


@dataclass(frozen=True)
class ConfigEntry:
    name: str
    value: Any
    source: str  # "flag", "env NAME", "file", "default"


@dataclass(frozen=True)
class ConfigView:
    profile: str
    path: Path
    entries: list[ConfigEntry]

    def document(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "config_file": str(self.path),
            "settings": {e.name: _plain(e.value) for e in self.entries},
            "sources": {e.name: e.source for e in self.entries},
        }


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def _env_names(name: str) -> list[str]:
    """The environment variables that set ``name``, in the order pydantic-settings tries them."""
    from pydantic import AliasChoices

    alias = Settings.model_fields[name].validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices if str(choice) != name]
    return [f"GPUCTL_{name.upper()}"]


def _source(name: str, flags: Mapping[str, Any], file_values: Mapping[str, Any]) -> str:
    if flags.get(name) is not None:
        return "flag"
    environ = {k.upper(): v for k, v in os.environ.items()}
    for env in _env_names(name):
        if environ.get(env.upper()):
            return f"env {env}"
    if name in file_values:
        return "file"
    return "default"


def _known() -> list[str]:
    return [n for n in Settings.model_fields if n not in _META]


def show_config(flags: Mapping[str, Any]) -> ConfigView:
    """The effective settings for ``flags`` (the global options given), each with where it came from.

    Raises:
        ConfigError: the config file or a value is invalid.
    """
    settings = load_settings(**flags)
    path = profile_path(settings.profile, settings.config_dir)
    file_values = read_profile(settings.profile, settings.config_dir)
    entries = [ConfigEntry(n, getattr(settings, n), _source(n, flags, file_values)) for n in _known()]
    return ConfigView(settings.profile, path, entries)


def _key(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    if key not in _known():
        raise ConfigError(f"Unknown setting {name!r}; known settings: {', '.join(sorted(_known()))}.")
    return key


def _coerce(key: str, value: str) -> Any:
    """The typed value for the file (a number stays a number in TOML)."""
    from pydantic import TypeAdapter, ValidationError

    annotation: Any = Settings.model_fields[key].annotation
    try:
        typed = TypeAdapter(annotation).validate_python(value)
    except ValidationError as exc:
        raise ConfigError(f"Invalid value for {key}: {exc.errors()[0]['msg']}.") from None
    return str(typed) if isinstance(typed, Path) else typed


def _profile(flags: Mapping[str, Any]) -> str:
    return str(flags.get("profile") or os.environ.get("GPUCTL_PROFILE") or "default")


def set_setting(flags: Mapping[str, Any], name: str, value: str) -> tuple[str, Any, Path]:
    """Write ``name = value`` into the profile's config file; return the key, typed value and file.

    Raises:
        ConfigError: an unknown setting or an invalid value (the file is left unchanged).
    """
    key = _key(name)
    typed = _coerce(key, value)
    return key, typed, write_profile(_profile(flags), {key: typed})


def unset_setting(flags: Mapping[str, Any], name: str) -> tuple[str, bool, Path]:
    """Remove ``name`` from the profile's config file; return the key, whether it was there, the file."""
    key = _key(name)
    profile = _profile(flags)
    present = key in read_profile(profile)
    path = write_profile(profile, {key: None}) if present else profile_path(profile)
    return key, present, path


def config_path(flags: Mapping[str, Any]) -> Path:
    """The profile's config file (it may not exist yet)."""
    return profile_path(_profile(flags))
