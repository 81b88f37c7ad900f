"""Settings precedence (flags > environment > profile file), the seed's names, and missing settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuctl.errors import ConfigError
from gpuctl.settings import Settings, load_settings, read_profile, write_profile


def test_flags_beat_env_beat_profile_file(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flag wins over the environment, which wins over the profile file."""
    # GIVEN a region in the file, the environment and a flag, and a table only in the file
    write_profile("default", {"region": "file-region", "table_name": "file-table"})
    monkeypatch.setenv("AWS_DEFAULT_REGION", "env-region")
    # THEN each layer overrides the one below it
    assert load_settings().region == "env-region"
    assert load_settings(region="flag-region").region == "flag-region"
    assert load_settings().table_name == "file-table"
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    assert load_settings().region == "file-region"


@pytest.mark.parametrize(
    ("env", "field"),
    [("SQS_QUEUE_URL", "queue_url"), ("DYNAMODB_TABLE", "table_name"), ("GPU_INSTANCE_ID", "instance_id"),
     ("AWS_DEFAULT_REGION", "region"), ("GPUCTL_QUEUE_URL", "queue_url"), ("GPUCTL_BUCKET", "bucket")],
)
def test_seed_and_gpuctl_environment_names(monkeypatch: pytest.MonkeyPatch, env: str, field: str) -> None:
    """The running system's environment names and gpuctl's own both set the setting."""
    monkeypatch.setenv(env, "value-1")
    assert getattr(load_settings(), field) == "value-1"


def test_gpuctl_name_wins_over_the_seed_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """With both GPUCTL_QUEUE_URL and SQS_QUEUE_URL set, gpuctl's own name is used."""
    monkeypatch.setenv("SQS_QUEUE_URL", "seed")
    monkeypatch.setenv("GPUCTL_QUEUE_URL", "ours")
    assert load_settings().queue_url == "ours"


def test_profiles_are_separate_files(clean_env: Path) -> None:
    """--profile selects its own file; the default profile does not see it."""
    write_profile("prod", {"queue_url": "https://sqs/prod"})
    assert load_settings(profile="prod").queue_url == "https://sqs/prod"
    assert load_settings().queue_url is None
    assert (clean_env / "prod.toml").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(("name", "env"), [("queue_url", "SQS_QUEUE_URL"), ("table_name", "DYNAMODB_TABLE"),
                                           ("instance_id", "GPU_INSTANCE_ID"), ("bucket", "GPUCTL_BUCKET")])
def test_missing_setting_names_it_and_how_to_set_it(name: str, env: str) -> None:
    """require() on a missing setting raises ConfigError naming the variable and `gpuctl config set`."""
    with pytest.raises(ConfigError) as raised:
        Settings().require(name)
    assert env in str(raised.value) and f"gpuctl config set {name} VALUE" in str(raised.value)
    assert raised.value.exit_code == 2


def test_invalid_values_are_config_errors(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad value from the environment, or an unknown key for the file, is one ConfigError sentence."""
    monkeypatch.setenv("GPUCTL_MAX_ATTEMPTS", "lots")
    with pytest.raises(ConfigError, match="max_attempts"):
        load_settings()
    with pytest.raises(ConfigError, match="Unknown setting 'colour'"):
        write_profile("default", {"colour": "blue"})
    assert read_profile("default") == {}


def test_broken_profile_file_is_a_config_error(clean_env: Path) -> None:
    """An unparseable TOML file is reported with its path, not a traceback."""
    clean_env.mkdir(parents=True, exist_ok=True)
    (clean_env / "default.toml").write_text("queue_url = [unclosed")
    with pytest.raises(ConfigError, match="Cannot read the config file"):
        load_settings()
