"""The ComfyUI stand-in leaves nothing behind: its working folder goes on SIGTERM, SIGINT and a failed start;
`gpuctl local down` removes what a killed one left; its unified API publishes results as the running one does.

Every test here runs under the conftest fixture that fails a test leaving a ``gpuctl-standin-*`` folder in its
(private) temp directory.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from gpuctl.local.comfyui_standin import StandinConfig, StandinServer
from gpuctl.local.standin_dirs import OWNER_FILE, PREFIX
from tests.conftest import free_port
from tests.helpers import make_image, run_cli


def _start_local_comfyui(port: int) -> subprocess.Popen[str]:
    """`gpuctl local comfyui` as a user runs it, answering on ``port``."""
    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gpuctl", "local", "comfyui", "--port", str(port),
                             "--seconds-per-job", "0.2"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gpuctl local comfyui exited {proc.returncode}: {proc.communicate()[1]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/system_stats", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    proc.communicate()
    raise AssertionError("gpuctl local comfyui did not answer in time")


def _folders(tmpdir: Path) -> list[Path]:
    return sorted(tmpdir.glob(PREFIX + "*"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_local_comfyui_removes_its_working_folder_when_stopped(no_standin_leftovers: Path,
                                                               sig: signal.Signals) -> None:
    """`gpuctl local comfyui` works in a gpuctl-standin-* folder and removes it on SIGTERM and on Ctrl-C."""
    # GIVEN the stand-in running in the foreground, with its working folder in the temp directory
    proc = _start_local_comfyui(free_port())
    try:
        (folder,) = _folders(no_standin_leftovers)
        assert sorted(p.name for p in folder.iterdir()) == sorted([OWNER_FILE, "input", "output", "temp"])
        assert (folder / OWNER_FILE).read_text().strip() == str(proc.pid)
        # WHEN it is signalled
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # THEN it exits 0 without a traceback, and the folder is gone
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert _folders(no_standin_leftovers) == []


def test_local_down_removes_what_a_killed_stand_in_left(no_standin_leftovers: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """down removes a SIGKILLed stand-in's folder, and leaves a running one's and one that names no owner."""
    monkeypatch.setenv("GPUCTL_LOCAL_DIR", str(tmp_path / "local-state"))
    unowned = no_standin_leftovers / (PREFIX + "from-an-older-gpuctl")
    unowned.mkdir()
    # GIVEN a stand-in killed with SIGKILL (no chance to clean up) and another one still running
    killed = _start_local_comfyui(free_port())
    (killed_folder,) = [p for p in _folders(no_standin_leftovers) if p != unowned]
    killed.kill()
    killed.communicate(timeout=10)
    assert killed_folder.is_dir()
    with StandinServer(StandinConfig(port=0)) as running:
        running_folder = running.input_dir.parent
        # WHEN local mode is taken down (it is not even up)
        down = run_cli(["local", "down"], {})
        # THEN only the killed stand-in's folder is removed, and down says so
        assert down.returncode == 0, down.stderr
        assert "Local mode is not running." in down.stderr
        assert f"Removed 1 working folder that killed ComfyUI stand-ins left behind ({no_standin_leftovers})" \
            in down.stderr
        assert not killed_folder.exists()
        assert running_folder.is_dir() and unowned.is_dir()
    # AND the running one still removes its own when it stops
    assert _folders(no_standin_leftovers) == [unowned]
    unowned.rmdir()


def test_a_stand_in_that_cannot_start_leaves_no_folder(no_standin_leftovers: Path) -> None:
    """A start that fails (the port is taken) raises and removes the folder it had made."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = StandinServer(StandinConfig(port=taken.getsockname()[1]))
        with pytest.raises(RuntimeError, match="failed to start"):
            server.start()
    assert _folders(no_standin_leftovers) == []


def test_unified_results_go_to_the_bucket_and_are_reported_as_cdn_urls(moto_server: str, tmp_path: Path) -> None:
    """With an output bucket and a CDN domain the unified API uploads the result and reports
    https://<cdn>/<key>, as the running system does; the object is at that key."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    bucket = f"standin-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    source = make_image(tmp_path / "in.png")
    config = StandinConfig(port=0, seconds_per_job=0.2, output_bucket=bucket, output_prefix="images/comfyui-results/",
                           cdn_domain="https://d3bg7alr1qwred.cloudfront.net/", s3_endpoint_url=moto_server)
    with StandinServer(config) as server, httpx.Client(base_url=server.base_url, timeout=10) as http:
        job = http.post("/api/v1/qwen-image-edit/jobs", json={"image_url": source.as_uri(), "prompt": "sketch"})
        deadline = time.monotonic() + 30
        doc = job.json()
        while doc["status"] not in ("completed", "failed") and time.monotonic() < deadline:
            time.sleep(0.05)
            doc = http.get(f"/api/v1/jobs/{doc['job_id']}").json()
    key = f"images/comfyui-results/qwen-image-edit/{doc['job_id']}.png"
    assert doc["status"] == "completed", doc
    assert doc["result_s3_uri"] == f"https://d3bg7alr1qwred.cloudfront.net/{key}"
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read().startswith(b"\x89PNG")


def test_local_comfyui_cdn_domain_needs_an_output_bucket() -> None:
    """--cdn-domain alone is a usage error (exit 2), before anything starts."""
    proc = run_cli(["local", "comfyui", "--port", "0", "--cdn-domain", "cdn.example.net"], {})
    assert proc.returncode == 2 and "--cdn-domain needs --output-bucket" in proc.stderr, proc.stderr
