"""``gpuctl adapter run`` and ``gpuctl-adapter``: configuration errors are one sentence, exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner


@pytest.fixture
def cli_app():
    """The root app with the adapter group registered (the lead registers it for real)."""
    from gpuctl.cli import app
    from gpuctl.cli.adapter import app as adapter_app

    if not any(group.name == "adapter" for group in app.registered_groups):
        app.add_typer(adapter_app, name="adapter")
    return app


def test_adapter_run_without_a_queue_is_a_config_error(cli_app, capsys):
    """No queue URL configured: the CLI says which setting is missing and exits 2."""
    from gpuctl.__main__ import main

    # GIVEN no settings at all (the autouse fixture cleared the environment)
    # WHEN `gpuctl adapter run` starts
    code = main(["adapter", "run"])
    # THEN it refuses with exit 2 and a sentence naming the setting
    assert code == 2
    assert "SQS queue URL" in capsys.readouterr().err


def test_adapter_run_refuses_an_unknown_backend(cli_app, capsys):
    """--backend must be comfyui or unified."""
    from gpuctl.__main__ import main

    code = main(["adapter", "run", "--backend", "tensorrt"])
    assert code == 2
    assert "backend" in capsys.readouterr().err


def test_adapter_help_lists_run(cli_app):
    """The group has help text and a run command."""
    result = CliRunner().invoke(cli_app, ["adapter", "--help"])
    assert result.exit_code == 0 and "run" in result.output


def test_console_script_logs_a_json_config_error_and_exits_2():
    """python -m adapter with no settings: one JSON log line naming the missing setting, exit 2."""
    import json
    import os

    env = {k: v for k, v in os.environ.items()}
    result = subprocess.run([sys.executable, "-m", "adapter"], env=env, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 2
    line = json.loads(result.stderr.strip().splitlines()[-1])
    assert line["event"] == "adapter.config_error" and "SQS queue URL" in line["error"]
