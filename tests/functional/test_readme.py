"""The README's first-screen commands work exactly as written, so the README cannot rot."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
_IGNORE = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache", ".mypy_cache",
                                 ".ruff_cache", ".hypothesis", "gpuctl-demo", "build", "dist")


def _first_screen_commands() -> list[str]:
    """The commands in the fenced bash blocks before the first horizontal rule."""
    head = (ROOT / "README.md").read_text().split("\n---\n", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", head, flags=re.S)]


def test_first_screen_has_the_demo_and_the_test_command() -> None:
    """Two copy-pasteable one-liners: install + demo, install + tests."""
    demo, tests = _first_screen_commands()
    assert demo.endswith("gpuctl demo") and "pip install" in demo
    assert "pytest" in tests and "pip install" in tests and "'.[dev]'" in tests


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run runs the README's test command verbatim."""
    _, tests = _first_screen_commands()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_readme_demo_command_works_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    """The demo one-liner, run in a fresh copy of the repository with a fresh venv and an empty HOME, exits 0."""
    demo, _ = _first_screen_commands()
    repo = tmp_path / "gpuctl"
    shutil.copytree(ROOT, repo, ignore=_IGNORE)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "GPUCTL_", "VIRTUAL_ENV", "PYTHON")) and k not in ("HOME",)}
    # A newcomer's machine: nothing configured, no credentials. The pip cache is kept only to save downloads.
    env.update(HOME=str(home), PIP_CACHE_DIR=os.environ.get("PIP_CACHE_DIR",
                                                            str(Path.home() / ".cache" / "pip")),
               PIP_DISABLE_PIP_VERSION_CHECK="1", NO_COLOR="1")
    proc = subprocess.run(["bash", "-c", demo], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = sorted((repo / "gpuctl-demo").glob("*.png"))
    names = {p.name for p in results}
    assert {"camera-angle.png", "qwen-image-edit.png"} <= names
    for path in results:
        with Image.open(path) as img:
            img.verify()
    # Local mode was taken down again: no state left behind.
    state = home / ".local" / "state" / "gpuctl" / "local" / "state.json"
    assert not state.exists()
