"""Fixtures shared by every test: a clean environment, moto in-process, moto's server on loopback."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REGION, Resources, create_resources

_ENV_PREFIXES = ("AWS_", "GPUCTL_")
_SEED_ENV = ("SQS_QUEUE_URL", "DYNAMODB_TABLE", "GPU_INSTANCE_ID")


@pytest.fixture(autouse=True)
def no_standin_leftovers(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory,
                         ) -> Iterator[Path]:
    """Each test gets its own temp directory (TMPDIR, in this process and the ones it starts); the test fails
    if it leaves a ComfyUI stand-in's ``gpuctl-standin-*`` working folder there."""
    import tempfile

    from gpuctl.local.standin_dirs import PREFIX

    folder = tmp_path_factory.mktemp("tmpdir")
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    left = sorted(p.name for p in folder.glob(PREFIX + "*"))
    if left:
        pytest.fail(f"the test left ComfyUI stand-in working folders behind in {folder}: {', '.join(left)}")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No test sees the developer's AWS or gpuctl settings; config goes to a temp folder."""
    for name in list(os.environ):
        if name.startswith(_ENV_PREFIXES) or name in _SEED_ENV:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    config = tmp_path / "gpuctl-config"
    monkeypatch.setenv("GPUCTL_CONFIG_DIR", str(config))
    monkeypatch.setenv("NO_COLOR", "1")
    return config


@pytest.fixture(autouse=True)
def _stamina_testing() -> Iterator[None]:
    """Retries run without sleeping, with a small attempt budget."""
    import stamina

    stamina.set_testing(True, attempts=3)
    yield
    stamina.set_testing(False)


@pytest.fixture
def aws(clean_env: Path) -> Iterator[Resources]:
    """moto in-process with the queue, table, bucket and a stopped GPU instance created."""
    import boto3
    from moto import mock_aws

    with mock_aws():
        yield create_resources(boto3.session.Session())


@pytest.fixture
def gateways(aws: Resources) -> Any:
    """gpuctl's gateways built against the in-process emulator."""
    from gpuctl.services.context import Gateways
    from gpuctl.settings import Settings

    return Gateways(Settings(**aws.settings_kwargs()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's server on 127.0.0.1 for tests that cross a process (the CLI, the adapter)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def server_aws(moto_server: str, clean_env: Path) -> Resources:
    """A fresh set of resources in the moto server (state reset first)."""
    import boto3
    import httpx

    httpx.post(f"{moto_server}/moto-api/reset", timeout=10).raise_for_status()
    session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing")
    return create_resources(session, moto_server)
