"""`gpuctl serve` with API keys (GPUCTL_API_KEYS and a key file), CORS_ORIGINS and a body limit, as a real process:
who gets in, what the logs keep, what a browser may do, how big a body may be."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.helpers import Resources, emulator_counts, run_cli
from tests.serve_process import README_HOST, ServeProcess, fresh_world

pytestmark = pytest.mark.server

KEY_ONE = "key-one-0123456789abcdef"  # from GPUCTL_API_KEYS
KEY_TWO = "key-two-fedcba9876543210"  # from the key file
ORIGIN = "https://app.example.com"
IMAGE = f"https://{README_HOST}/images/input.jpg"


@pytest.fixture(scope="module")
def keyed(moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Resources, ServeProcess]]:
    """One server for the module: a key from the environment, one from a file, one CORS origin, a 2 KB limit."""
    folder = tmp_path_factory.mktemp("keyed")
    keys = folder / "keys"
    keys.write_text(f"# the team's keys\n\n{KEY_TWO}\n")
    res, api = fresh_world(moto_server, folder, {"GPUCTL_API_KEYS": f" {KEY_ONE} ,", "CORS_ORIGINS": ORIGIN},
                           ["--max-body-bytes", "2048", "--api-keys-file", str(keys)])
    yield res, api
    api.stop()


@pytest.fixture
def guarded(keyed: tuple[Resources, ServeProcess]) -> ServeProcess:
    return keyed[1]


@pytest.fixture
def res(keyed: tuple[Resources, ServeProcess]) -> Resources:
    return keyed[0]


def submit(api: ServeProcess, body: Any = None, **kw: Any) -> httpx.Response:
    return httpx.post(f"{api.base_url}/api/v1/camera-angle/jobs", json={"image_url": IMAGE} if body is None else body,
                      timeout=30, **kw)


def test_api_keys_are_required_and_compared_in_full(guarded, res):
    """With keys set, no key, a wrong key or a key's prefix is 401 (nothing written); the env's and the file's work."""
    # GIVEN what the emulator holds
    before = emulator_counts(res)
    # WHEN requests come without a key, with a wrong one, or with the first half of a real one
    for headers in ({}, {"Authorization": "Bearer nope"}, {"X-API-Key": KEY_ONE[:12]},
                    {"Authorization": f"Basic {KEY_ONE}"}, {"Authorization": f"Bearer {KEY_ONE}x"}):
        response = submit(guarded, headers=headers)
        # THEN 401 with a clear body and the scheme to use
        assert response.status_code == 401, headers
        assert "API key" in response.json()["detail"] and response.headers["WWW-Authenticate"] == "Bearer"
    assert emulator_counts(res) == before
    # AND each configured key is accepted, by either header
    assert submit(guarded, headers={"Authorization": f"Bearer {KEY_ONE}"}).status_code == 202
    assert httpx.get(f"{guarded.base_url}/api/v1/jobs", headers={"X-API-Key": KEY_TWO}, timeout=30).status_code == 200


def test_health_index_and_documents_need_no_key(guarded):
    """Load balancers and container health checks reach /health without a key; the API document shows the schemes."""
    for path in ("/health", "/api/v1/health", "/", "/openapi.json"):
        assert httpx.get(f"{guarded.base_url}{path}", timeout=30).status_code == 200, path
    document = httpx.get(f"{guarded.base_url}/openapi.json", timeout=30).json()
    assert set(document["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert document["paths"]["/api/v1/jobs"]["get"]["security"]
    assert "security" not in document["paths"]["/health"]["get"]


def test_access_logs_name_the_key_by_position_and_never_hold_it(guarded):
    """Each access line says which key (1, 2) by position; no key, header or query string is ever logged."""
    # GIVEN requests with each key, a wrong key and a query string
    base = f"{guarded.base_url}/api/v1/jobs"
    httpx.get(f"{base}?since=1h", headers={"Authorization": f"Bearer {KEY_ONE}", "X-Request-ID": "log-1"}, timeout=30)
    httpx.get(base, headers={"X-API-Key": KEY_TWO, "X-Request-ID": "log-2"}, timeout=30)
    httpx.get(base, headers={"X-API-Key": "wrong-key-0123456789", "X-Request-ID": "log-3"}, timeout=30)
    # THEN the lines carry positions and statuses
    lines = {f"log-{n}": guarded.access_line(f"log-{n}") for n in (1, 2, 3)}
    assert [(lines[f"log-{n}"]["api_key"], lines[f"log-{n}"]["status"]) for n in (1, 2, 3)] == [
        (1, 200), (2, 200), (None, 401)]
    # AND nothing secret is in the log
    text = guarded.log_path.read_text()
    for secret in (KEY_ONE, KEY_TWO, "wrong-key-0123456789", "since=1h"):
        assert secret not in text


def test_cors_allows_the_configured_origin_only(guarded):
    """CORS_ORIGINS as today: the listed origin gets the CORS headers with credentials, even on a 401; others none."""
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    allowed = httpx.options(f"{guarded.base_url}/api/v1/camera-angle/jobs", timeout=30,
                            headers={"Origin": ORIGIN, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert allowed.headers["access-control-allow-credentials"] == "true"
    other = httpx.options(f"{guarded.base_url}/api/v1/camera-angle/jobs", timeout=30,
                          headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    refused = submit(guarded, headers={"Origin": ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN


def test_a_body_over_the_limit_is_413_declared_or_streamed(guarded, res):
    """A body over --max-body-bytes is 413, by its Content-Length or while streamed (chunked); nothing is written."""
    # GIVEN a body of 4 KB (limit 2 KB) and what the emulator holds
    big = json.dumps({"image_url": IMAGE, "prompt": "x" * 4000}).encode()
    before = emulator_counts(res)
    headers = {"Authorization": f"Bearer {KEY_ONE}", "Content-Type": "application/json"}
    # WHEN it is sent with a Content-Length, and streamed without one
    declared = httpx.post(f"{guarded.base_url}/api/v1/camera-angle/jobs", content=big, headers=headers, timeout=30)
    streamed = httpx.post(f"{guarded.base_url}/api/v1/camera-angle/jobs", timeout=30, headers=headers,
                          content=(big[i:i + 512] for i in range(0, len(big), 512)))
    # THEN both are 413 with a sentence, and nothing was written
    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.json() == {"detail": "The request body is larger than 2048 bytes."}
    assert emulator_counts(res) == before


def test_a_port_in_use_exits_2(guarded, res):
    """A second server on a taken port says so and exits 2."""
    proc = run_cli(["serve", "--port", str(guarded.port)], res.env(), timeout=60)
    assert proc.returncode == 2 and "Could not listen on 127.0.0.1" in proc.stderr
