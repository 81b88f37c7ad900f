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


HAND_EDITED = """\
# Production profile: ask Dana before changing the queue.

region = "eu-west-1"  # Ireland: the GPU lives there
table_name = "task_store"

# Timeouts were raised after the 2026-03 outage.
read_timeout = 60.0
connect_timeout = 8.0

[notes]  # not a setting: gpuctl ignores it
owner = "dana"
"""


def test_set_and_unset_keep_a_hand_edited_file_s_comments_and_layout(clean_env: Path) -> None:
    """config set/unset change only their key: the file's comments, blank lines, order and tables stay."""
    # GIVEN a profile file a person wrote, with comments, blank lines, a chosen order and a table
    path = clean_env / "default.toml"
    path.parent.mkdir(parents=True)
    path.write_text(HAND_EDITED)
    # WHEN one setting is changed, one added and one removed
    changed = run_cli(["config", "set", "region", "us-west-2"], {})
    added = run_cli(["config", "set", "queue_url", "https://sqs.example/q"], {})
    removed = run_cli(["config", "unset", "connect_timeout"], {})
    # THEN each succeeded, and the file is the same text except for those three lines
    assert (changed.returncode, added.returncode, removed.returncode) == (0, 0, 0), changed.stderr + added.stderr
    assert path.read_text() == """\
# Production profile: ask Dana before changing the queue.

region = "us-west-2"  # Ireland: the GPU lives there
table_name = "task_store"

# Timeouts were raised after the 2026-03 outage.
read_timeout = 60.0
queue_url = "https://sqs.example/q"

[notes]  # not a setting: gpuctl ignores it
owner = "dana"
"""
    # AND gpuctl reads the values back, the table untouched
    assert tomllib.loads(path.read_text())["notes"] == {"owner": "dana"}
    show = run_cli(["config", "show", "--output", "json"], {})
    settings = json.loads(show.stdout)["settings"]
    assert (settings["queue_url"], settings["read_timeout"]) == ("https://sqs.example/q", 60.0)


def test_set_refuses_a_file_it_cannot_parse_and_leaves_it(clean_env: Path) -> None:
    """A profile file that is not TOML is reported in one sentence (exit 2) and not overwritten."""
    path = clean_env / "default.toml"
    path.parent.mkdir(parents=True)
    path.write_text("region = 'eu-west-1\n# unterminated\n")
    proc = run_cli(["config", "set", "table_name", "t"], {})
    assert proc.returncode == 2 and "Cannot read the config file" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert path.read_text() == "region = 'eu-west-1\n# unterminated\n"
