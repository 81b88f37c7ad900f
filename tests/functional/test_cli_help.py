"""Every command has help text, and `gpuctl --help` stays fast: it never imports boto3."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from gpuctl.cli import app


def _commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    # Typer >= 0.20 vendors its own click, so test for a group by its commands, not by class.
    if isinstance(getattr(group, "commands", None), dict):
        for name, command in sorted(group.commands.items()):
            yield from _commands(command, (*path, name))


ALL = list(_commands(typer.main.get_command(app)))


def test_the_everyday_commands_are_all_there() -> None:
    """The commands of issue 2 are registered."""
    expected = {("status",), ("watch",), ("result",), ("jobs", "list"), ("jobs", "cancel"), ("jobs", "retry"),
                ("instance", "status"), ("instance", "start"), ("instance", "stop"), ("queue", "stats"),
                ("queue", "redrive"), ("queue", "purge"), ("config", "show"), ("config", "set"),
                ("config", "unset"), ("config", "path"), ("submit",)}
    assert expected <= set(ALL)


@pytest.mark.parametrize("path", ALL, ids=lambda p: " ".join(p) or "root")
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    """`gpuctl … --help` exits 0 and prints a usage line and a description."""
    result = CliRunner().invoke(app, [*path, "--help"], prog_name="gpuctl")
    assert result.exit_code == 0, result.output
    assert "Usage: gpuctl" in result.output
    command: Any = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    assert (command.help or "").strip(), f"{' '.join(path)} has no help text"


@pytest.mark.parametrize("args", [["--help"], ["jobs", "list", "--help"], ["watch", "--help"]])
def test_help_does_not_import_boto3(args: list[str]) -> None:
    """`gpuctl --help` in a fresh interpreter loads neither boto3/botocore nor moto (nor pydantic at the root)."""
    code = (
        "import sys\n"
        "from gpuctl.__main__ import main\n"
        f"rc = main({args!r})\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'boto3', 'botocore', 'moto', 'pydantic'})\n"
        "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    heavy = proc.stderr.rsplit("HEAVY=", 1)[1].split()
    loaded = set(heavy[0].split(",")) if heavy else set()
    # Typer itself loads pydantic for some parameter types; the root help must not need it.
    allowed = set() if args == ["--help"] else {"pydantic"}
    assert loaded <= allowed


@pytest.mark.parametrize("args", [["status", "job-1"], ["watch", "not-an-id"]])
def test_a_bad_job_id_is_refused_before_any_aws_client(args: list[str]) -> None:
    """A job id that is not one exits 2 with its sentence, in a fresh interpreter that never loaded boto3."""
    code = (
        "import sys\n"
        "from gpuctl.__main__ import main\n"
        f"rc = main({args!r})\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'boto3', 'botocore'})\n"
        "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    env = {**os.environ, "GPUCTL_TABLE_NAME": "t", "GPUCTL_REGION": "us-east-1", "GPUCTL_QUEUE_URL": "q"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
                          env=env)
    assert proc.returncode == 2, proc.stderr
    assert "is not a job id" in proc.stderr
    assert proc.stderr.rsplit("HEAVY=", 1)[1].strip() == ""
