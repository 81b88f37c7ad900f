"""`gpuctl config show|set|unset|path` in a subprocess, with the config folder in tmp_path."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from tests.helpers import run_cli


def test_set_show_unset_round_trip(clean_env: Path) -> None:
    """set writes typed values to the profile file, show reports each value's source, unset removes it."""
    # GIVEN an empty config folder
    # WHEN two settings are stored and the effective settings are shown with one env override
    set_table = run_cli(["config", "set", "table_name", "jobs_table"], {})
    set_mb = run_cli(["config", "set", "max-image-mb", "12.5"], {})
    show = run_cli(["--region", "eu-west-1", "config", "show", "--output", "json"],
                   {"SQS_QUEUE_URL": "https://sqs.example/q"})
    # THEN the file holds them (typed), and show names where each came from
    assert set_table.returncode == 0 and set_mb.returncode == 0, set_table.stderr + set_mb.stderr
    stored = tomllib.loads((clean_env / "default.toml").read_text())
    assert stored == {"table_name": "jobs_table", "max_image_mb": 12.5}
    doc = json.loads(show.stdout)
    assert doc["settings"]["table_name"] == "jobs_table" and doc["sources"]["table_name"] == "file"
    assert doc["sources"]["queue_url"] == "env SQS_QUEUE_URL"
    assert (doc["settings"]["region"], doc["sources"]["region"]) == ("eu-west-1", "flag")
    assert doc["sources"]["stack_name"] == "default"
    # AND unset removes the key
    unset = run_cli(["config", "unset", "table_name"], {})
    assert unset.returncode == 0 and "Removed table_name" in unset.stderr
    assert tomllib.loads((clean_env / "default.toml").read_text()) == {"max_image_mb": 12.5}


def test_bad_key_or_value_exits_2_and_leaves_the_file(clean_env: Path) -> None:
    """An unknown key or an invalid value is refused with exit 2; the file is not written."""
    unknown = run_cli(["config", "set", "colour", "blue"], {})
    invalid = run_cli(["config", "set", "max_attempts", "99"], {})
    assert unknown.returncode == 2 and "Unknown setting 'colour'" in unknown.stderr
    assert invalid.returncode == 2 and "max_attempts" in invalid.stderr
    assert not (clean_env / "default.toml").exists()


def test_path_follows_the_profile(clean_env: Path) -> None:
    """config path prints the profile's file under the config folder."""
    proc = run_cli(["--profile", "prod", "config", "path"], {})
    assert proc.returncode == 0
    assert proc.stdout.strip() == str(clean_env / "prod.toml")
