"""`gpuctl serve` as a real process against moto's server: the old orchestrator's routes and README replayed as
written, and gpuctl's additions (listing, cancel, idempotency, instance).

One server for the module, configured with the running system's own environment variables (AWS_DEFAULT_REGION,
SQS_QUEUE_URL, DYNAMODB_TABLE, GPU_INSTANCE_ID); every test makes its own jobs and reads only those.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from gpuctl import schemas
from tests.helpers import Resources, emulator_counts, png_bytes, put_object, run_cli
from tests.serve_process import OLD_README, README_HOST, FakeWorker, ServeProcess, fresh_world

pytestmark = pytest.mark.server

README_IMAGE = f"https://{README_HOST}/images/input.jpg"


@dataclass
class World:
    res: Resources
    api: ServeProcess

    @property
    def url(self) -> str:
        return self.api.base_url

    def gateways(self) -> Any:
        from gpuctl.services.context import Gateways
        from gpuctl.settings import Settings

        return Gateways(Settings(**self.res.settings_kwargs()))


@pytest.fixture(scope="module")
def world(moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    res, api = fresh_world(moto_server, tmp_path_factory.mktemp("serve"), {})
    yield World(res, api)
    api.stop()


def post(world: World, job_type: str, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(f"{world.url}/api/v1/{job_type}/jobs", json=body, timeout=30, **kw)


def get(world: World, path: str, **kw: Any) -> httpx.Response:
    return httpx.get(f"{world.url}{path}", timeout=30, **kw)


def check_schema(doc: Any, name: str) -> None:
    jsonschema.validate(doc, schemas.definition(name))


def readme_blocks(language: str) -> list[str]:
    return [m.group(1) for m in re.finditer(rf"```{language}\n(.*?)```", OLD_README.read_text(), re.S)]


def on_port(text: str, world: World) -> str:
    return text.replace("http://localhost:8080", world.url)


# --- the old README, replayed as written -----------------------------------------------------------------------

def test_the_old_readme_copy_is_the_seed_readme():
    """tests/data/orchestrator-README.md is the running system's README, byte for byte (where the seed is at hand)."""
    # GIVEN the seed beside the repository (CI) or in the workplace
    root = Path(__file__).resolve().parents[2]
    seeds = [p for p in (root.parent / "shared" / "seed" / "orchestrator-README.md",
                         Path("/work/shared/seed/orchestrator-README.md")) if p.is_file()]
    if not seeds:
        pytest.skip("the seed README is not beside this checkout")
    # THEN the copy the replays use is identical
    assert OLD_README.read_bytes() == seeds[0].read_bytes()


def test_readme_request_bodies_are_accepted_with_the_documented_response(world):
    """Each POST body of the README's "API Endpoints" (its `// optional` notes removed) is accepted: 202 with
    job_id, status pending, result_s3_uri null, error null (and result_url, which the running code returns)."""
    # GIVEN the README's request blocks
    requests = [b for b in readme_blocks("bash") if b.startswith("POST /api/v1/")]
    assert len(requests) == 2
    for block in requests:
        path = block.split()[1]
        body = json.loads(re.sub(r"\s+//[^\n]*$", "", block[block.index("{"):], flags=re.M))
        # WHEN each is sent
        response = httpx.post(f"{world.url}{path}", json=body, timeout=30)
        # THEN it is accepted with the documented shape, both result keys present
        assert response.status_code == 202, response.text
        doc = response.json()
        assert doc["status"] == "pending" and uuid.UUID(doc["job_id"])
        assert doc["result_s3_uri"] is None and doc["result_url"] is None and doc["error"] is None
        check_schema(doc, "submitted")


def test_readme_local_testing_curls_replay(world):
    """The README's "Local Testing" curl calls, run by bash as written (its port swapped): health, submit, status."""
    # GIVEN the block, without the line that started the old service (gpuctl serve runs instead)
    block = next(b for b in readme_blocks("bash") if "python orchestrator_api.py" in b and "curl" in b)
    head, _, status_call = on_port(block, world).replace("python orchestrator_api.py\n", "").rpartition(
        "# Get job ID from response, then check status")
    # WHEN bash runs the health check and the submit
    out = subprocess.run(["bash", "-e", "-c", head], capture_output=True, text=True, timeout=60, check=True).stdout
    health_text, _, submitted_text = out.partition("}{")
    health, submitted = json.loads(health_text + "}"), json.loads("{" + submitted_text)
    # THEN both answer as the README says
    assert health["status"] == "healthy" and health["service"] == "gpu-task-orchestrator"
    assert health["version"] == "1.0.0" and health["components"] == {"dynamodb": "healthy", "sqs": "healthy"}
    assert submitted["status"] == "pending" and submitted["result_s3_uri"] is None
    # AND the status call, with the job id from the response, finds the job
    status = subprocess.run(["bash", "-e", "-c", status_call.replace("{job_id}", submitted["job_id"])],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    assert json.loads(status)["job_id"] == submitted["job_id"]


def test_readme_end_to_end_loop_replays(world):
    """The README's bash end-to-end loop (curl, jq, sleep 5) runs as written until the job completes."""
    # GIVEN the loop, and a worker that completes the job it submits
    block = next(b for b in readme_blocks("bash") if "while true" in b)
    with FakeWorker(world.gateways()) as worker:
        # WHEN bash runs it
        out = subprocess.run(["bash", "-c", on_port(block, world)], capture_output=True, text=True, timeout=90,
                             check=True).stdout
    # THEN it printed the job id, the statuses it saw, and the completed document with the result URL
    assert f"Job ID: {worker.task_id}" in out
    assert "Status: completed" in out
    final = json.loads(out[out.index("{"):])
    assert final["status"] == "completed" and final["result_s3_uri"] == FakeWorker.RESULT.format(worker.task_id)


def test_readme_python_client_replays(world):
    """The README's Python client (requests, poll every 5 s) runs as written and prints the result URL."""
    # GIVEN the client code, pointed at this server
    code = on_port(readme_blocks("python")[0], world)
    out = io.StringIO()
    with FakeWorker(world.gateways()) as worker, contextlib.redirect_stdout(out):
        # WHEN it runs
        exec(compile(code, "orchestrator-README.md", "exec"), {"__name__": "__readme__"})
    # THEN it saw its job complete and printed the README's result key
    assert f"Job submitted: {worker.task_id}" in out.getvalue()
    assert f"Result: {FakeWorker.RESULT.format(worker.task_id)}" in out.getvalue()


# --- request shapes ------------------------------------------------------------------------------------------

NULL_BODIES = {
    "camera-angle": {"image_url": README_IMAGE, "prompt": None, "vertical": None, "horizontal": None, "zoom": None,
                     "seed": None, "steps": None},
    "qwen-image-edit": {"image_url": README_IMAGE, "prompt": "sketch", "image2_url": None, "image3_url": None,
                        "seed": None, "steps": None, "cfg": None, "sampler_name": None, "scheduler": None,
                        "denoise": None},
}
DEFAULTS = {"camera-angle": {"vertical": 0, "horizontal": 0, "zoom": 0, "steps": 8},
            "qwen-image-edit": {"steps": 4, "cfg": 1.0, "sampler_name": "sa_solver", "scheduler": "beta",
                                "denoise": 1.0}}


@pytest.mark.parametrize("job_type", sorted(NULL_BODIES))
def test_null_for_every_optional_field_means_the_default(world, job_type):
    """null for every optional field is accepted and queued with the defaults; unknown fields are ignored."""
    # GIVEN a body with every optional field null and a field the service does not know
    body = {**NULL_BODIES[job_type], "callback_url": "https://example.com/hook", "priority": 7}
    # WHEN it is submitted
    response = post(world, job_type, body)
    # THEN it is accepted, and the queued request carries the defaults and nothing unknown
    assert response.status_code == 202, response.text
    record = world.gateways().table.get(response.json()["job_id"])
    assert record.request is not None
    assert {k: record.request[k] for k in DEFAULTS[job_type]} == DEFAULTS[job_type]
    assert "callback_url" not in record.request and "priority" not in record.request
    assert not {k for k, v in record.request.items() if v is None}


BAD_BODIES = [
    pytest.param("camera-angle", {"image_url": README_IMAGE, "steps": "8"}, ["body", "steps"], id="string-for-int"),
    pytest.param("camera-angle", {"image_url": README_IMAGE, "zoom": True}, ["body", "zoom"], id="bool-for-int"),
    pytest.param("camera-angle", {"image_url": README_IMAGE, "vertical": 3}, ["body", "vertical"], id="out-of-range"),
    pytest.param("camera-angle", {"prompt": "x"}, ["body", "image_url"], id="missing-image"),
    pytest.param("camera-angle", {"image_url": "ftp://host/a.png"}, ["body", "image_url"], id="ftp-url"),
    pytest.param("camera-angle", {"image_url": "/etc/passwd"}, ["body", "image_url"], id="local-path"),
    pytest.param("qwen-image-edit", {"image_url": README_IMAGE}, ["body", "prompt"], id="missing-prompt"),
    pytest.param("qwen-image-edit", {"image_url": README_IMAGE, "prompt": None}, ["body", "prompt"],
                 id="null-required-prompt"),
    pytest.param("qwen-image-edit", {"image_url": README_IMAGE, "prompt": "x", "cfg": "1"}, ["body", "cfg"],
                 id="string-for-float"),
    pytest.param("qwen-image-edit", [README_IMAGE], ["body"], id="array-body"),
]


@pytest.mark.parametrize(("job_type", "body", "loc"), BAD_BODIES)
def test_invalid_bodies_get_422_with_the_field_errors_and_nothing_is_written(world, job_type, body, loc):
    """A body the running service would refuse gets FastAPI's 422 {"detail": [{loc, msg, type}]}; nothing is written."""
    # GIVEN what the emulator holds
    before = emulator_counts(world.res)
    # WHEN the bad body is sent
    response = post(world, job_type, body)
    # THEN 422 names the field, and nothing was recorded or queued
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert loc in [e["loc"] for e in detail] and all(e["msg"] and e["type"] for e in detail)
    assert emulator_counts(world.res) == before


@pytest.mark.parametrize("raw", [b"", b"{not json", b"[" * 100_00 + b"]" * 100_00, b'{"image_url": NaN}'])
def test_a_body_that_is_not_json_gets_422(world, raw):
    """Empty, malformed, deeply nested or NaN bodies: 422 in FastAPI's shape, never a 500."""
    # WHEN the raw bytes are sent as JSON
    response = httpx.post(f"{world.url}/api/v1/camera-angle/jobs", content=raw,
                          headers={"Content-Type": "application/json"}, timeout=30)
    # THEN 422 with a detail list
    assert response.status_code == 422, response.text
    assert isinstance(response.json()["detail"], list)


REFUSED_INPUTS = [
    pytest.param("https://localhost/a.png", "loopback", id="loopback"),
    pytest.param("https://169.254.169.254/latest/meta-data/", "link-local", id="metadata-service"),
    pytest.param("https://user:pw@example.com/a.png", "user name or password", id="credentials"),
    pytest.param("https://does-not-resolve.invalid/a.png", "does not resolve", id="unresolvable"),
    pytest.param("s3://gpuctl-test-bucket/missing.png", "does not exist", id="missing-s3-object"),
    pytest.param("s3://gpuctl-test-bucket/not-an-image.png", "not", id="s3-object-not-an-image"),
]


@pytest.mark.parametrize(("image_url", "words"), REFUSED_INPUTS)
def test_remote_inputs_are_checked_as_gpuctl_submit_checks_them(world, image_url, words):
    """The submit's remote-input checks run before any write: 422 with gpuctl's sentence, nothing written."""
    # GIVEN an object that is not an image, and what the emulator holds
    put_object(world.res, "not-an-image.png", b"this is text, not a PNG", content_type="text/plain")
    before = emulator_counts(world.res)
    # WHEN a job names the input
    response = post(world, "camera-angle", {"image_url": image_url})
    # THEN 422 with the sentence (the password never echoed), and nothing recorded or queued
    assert response.status_code == 422, response.text
    message = response.json()["detail"][0]["msg"]
    assert words in message and "pw" not in message
    assert emulator_counts(world.res) == before


def test_an_s3_input_that_exists_is_accepted(world):
    """An s3:// input in the bucket is checked (HeadObject) and accepted."""
    uri = put_object(world.res, "inputs/ok.png", png_bytes())
    response = post(world, "qwen-image-edit", {"image_url": uri, "image2_url": uri, "prompt": "sketch"})
    assert response.status_code == 202, response.text


# --- reading jobs ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("job_id", ["0b7e5f8e-3c1d-4c6a-9f7e-2d4b6a8c0e1f", "not-a-uuid", "gpuctl%23activity"])
def test_an_unknown_job_is_404_job_not_found(world, job_id):
    """GET and cancel of an unknown id (or no UUID, or the activity marker): 404 {"detail": "Job not found"}."""
    assert get(world, f"/api/v1/jobs/{job_id}").json() == {"detail": "Job not found"}
    assert get(world, f"/api/v1/jobs/{job_id}").status_code == 404
    cancel = httpx.post(f"{world.url}/api/v1/jobs/{job_id}/cancel", timeout=30)
    assert cancel.status_code == 404 and cancel.json() == {"detail": "Job not found"}


def test_a_job_just_submitted_is_never_not_found(world):
    """Each submit read back at once (a consistent read) is found, with the CLI's status document."""
    for _ in range(8):
        job_id = post(world, "camera-angle", {"image_url": README_IMAGE}).json()["job_id"]
        response = get(world, f"/api/v1/jobs/{job_id}")
        assert response.status_code == 200
        check_schema(response.json(), "job")


def test_the_cli_reads_a_job_submitted_over_http(world):
    """`gpuctl status --output json` prints the same document GET /api/v1/jobs/{id} answers."""
    # GIVEN a job submitted over HTTP
    job_id = post(world, "camera-angle", {"image_url": README_IMAGE, "zoom": 1}).json()["job_id"]
    # WHEN the CLI and the API read it
    cli = run_cli(["status", job_id, "--output", "json"], world.res.env())
    # THEN they agree
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) == get(world, f"/api/v1/jobs/{job_id}").json()


def test_the_listing_pages_with_next_token(world):
    """GET /api/v1/jobs pages newest first with next_token, as `gpuctl jobs list` does; a bad token is 422."""
    # GIVEN three new jobs
    ids = [post(world, "camera-angle", {"image_url": README_IMAGE}).json()["job_id"] for _ in range(3)]
    # WHEN the pending jobs are listed two at a time until the last page
    seen: list[str] = []
    token = None
    for _ in range(100):
        params = {"status": "pending", "limit": "2", **({"next_token": token} if token else {})}
        page = get(world, "/api/v1/jobs", params=params).json()
        check_schema(page, "jobs_page")
        assert len(page["jobs"]) <= 2
        seen += [j["job_id"] for j in page["jobs"]]
        token = page["next_token"]
        if token is None:
            break
    # THEN every job appears once, the newest first
    assert len(seen) == len(set(seen))
    assert [s for s in seen if s in ids] == ids[::-1]
    # AND bad parameters are 422
    garbage = get(world, "/api/v1/jobs", params={"next_token": "garbage"})
    assert garbage.status_code == 422
    # … named as the HTTP client spells them, not as the CLI's options
    assert "next_token is not a token that GET /api/v1/jobs returned" in garbage.text and "--" not in garbage.text
    forever = get(world, "/api/v1/jobs", params={"since": "forever"})
    assert forever.status_code == 422 and "since 'forever' is not a duration" in forever.text, forever.text
    assert "--" not in forever.text
    assert get(world, "/api/v1/jobs", params={"status": "done"}).status_code == 422
    assert get(world, "/api/v1/jobs", params={"limit": "0"}).status_code == 422


def test_cancel_a_pending_job_then_again(world):
    """Cancel: a pending job ends failed with cancelled true (200); cancelling it again is 409."""
    job_id = post(world, "camera-angle", {"image_url": README_IMAGE}).json()["job_id"]
    first = httpx.post(f"{world.url}/api/v1/jobs/{job_id}/cancel", timeout=30)
    assert first.status_code == 200
    doc = first.json()
    check_schema(doc, "job_cancelled")
    assert doc["action"] == "cancelled" and doc["status"] == "failed" and doc["cancelled"] is True
    again = httpx.post(f"{world.url}/api/v1/jobs/{job_id}/cancel", timeout=30)
    assert again.status_code == 409 and "already finished" in again.json()["detail"]


def test_the_idempotency_key_returns_the_same_job(world):
    """Two POSTs with one Idempotency-Key make one job: the second answers it with reused true, nothing queued."""
    # GIVEN a key, and what the emulator holds
    key = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    before = emulator_counts(world.res)
    # WHEN the same request is sent twice with it
    first = post(world, "camera-angle", {"image_url": README_IMAGE}, headers=key)
    second = post(world, "camera-angle", {"image_url": README_IMAGE}, headers=key)
    # THEN one job, one message, one record
    assert first.status_code == second.status_code == 202
    assert first.json()["job_id"] == second.json()["job_id"]
    assert (first.json()["reused"], second.json()["reused"]) == (False, True)
    after = emulator_counts(world.res)
    assert (after.messages - before.messages, after.records - before.records) == (1, 1)
    # AND a key that is too long is refused
    assert post(world, "camera-angle", {"image_url": README_IMAGE},
                headers={"Idempotency-Key": "k" * 256}).status_code == 422


# --- the rest of the service -----------------------------------------------------------------------------------

def test_instance_status_is_the_cli_document(world):
    """GET /api/v1/instance answers `gpuctl instance status --output json`'s document."""
    response = get(world, "/api/v1/instance")
    assert response.status_code == 200
    check_schema(response.json(), "instance status")
    assert response.json()["instance_id"] == world.res.instance_id


def test_health_index_and_api_documents(world):
    """Both health routes, the endpoint index, /openapi.json (every route) and the interactive docs answer."""
    for path in ("/health", "/api/v1/health"):
        health = get(world, path).json()
        assert health["status"] == "healthy" and health["message"] == "Orchestrator is running"
    index = get(world, "/").json()
    assert index["service"] == "GPU Task Orchestrator" and index["endpoints"]["job_status"] == "/api/v1/jobs/{job_id}"
    document = get(world, "/openapi.json").json()
    assert {"/api/v1/camera-angle/jobs", "/api/v1/qwen-image-edit/jobs", "/api/v1/jobs/{job_id}", "/api/v1/jobs",
            "/api/v1/jobs/{job_id}/cancel", "/api/v1/instance", "/health", "/api/v1/health", "/"} <= set(
        document["paths"])
    assert "swagger" in get(world, "/docs").text.lower()


def test_the_dockerfile_healthcheck_command_passes_against_a_live_server(world):
    """The Dockerfile's HEALTHCHECK command, run as written (its port swapped), exits 0 against a healthy server."""
    from tests.functional.test_serve_deploy import DOCKERFILE, instructions

    health = next(args for word, args in instructions(DOCKERFILE.read_text()) if word == "HEALTHCHECK")
    command = json.loads(health[health.index("CMD") + 3:])
    command = [part.replace("http://127.0.0.1:8080", world.url) for part in command]
    assert command[0] == "python"
    assert subprocess.run([sys.executable, *command[1:]], timeout=60, check=False).returncode == 0


def test_every_request_is_logged_without_query_or_headers(world):
    """One JSON access line per request: method, path without the query, status, duration, request id."""
    # GIVEN a request with a query string and a request id of the caller's
    get(world, "/api/v1/jobs", params={"next_token": "secret-looking-token"}, headers={"X-Request-ID": "trace-42"})
    # THEN its access line is there, without the query
    line = world.api.access_line("trace-42")
    assert line["method"] == "GET" and line["path"] == "/api/v1/jobs" and line["status"] == 422
    assert "secret-looking-token" not in world.api.log_path.read_text()


# --- property-based: every operation of the OpenAPI document, generated by schemathesis ------------------------

#: Examples per operation and mode: enough to hit every field's type and bounds, few enough for the CI budget.
EXAMPLES = 8


@pytest.fixture(scope="module")
def operations(world: World) -> dict[str, Any]:
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{world.url}/openapi.json")
    found = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        found[f"{operation.method.upper()} {operation.path}"] = operation
    return found


OPERATIONS = ["POST /api/v1/camera-angle/jobs", "POST /api/v1/qwen-image-edit/jobs", "GET /api/v1/jobs/{job_id}",
              "GET /api/v1/jobs", "POST /api/v1/jobs/{job_id}/cancel", "GET /api/v1/instance", "GET /health",
              "GET /api/v1/health", "GET /"]


def test_the_openapi_document_lists_every_operation(operations):
    """schemathesis reads the document and finds each operation the tests below exercise."""
    assert sorted(operations) == sorted(OPERATIONS)


#: The operations with a body or constrained query parameters, for which requests the document forbids exist.
CONSTRAINED = [*OPERATIONS[:2], "GET /api/v1/jobs"]


@pytest.mark.parametrize(("name", "mode"), [*((name, "positive") for name in OPERATIONS),
                                            *((name, "negative") for name in CONSTRAINED)])
def test_any_request_gets_a_documented_answer(world, operations, name, mode):
    """Requests generated from the OpenAPI document (valid ones, and ones it forbids): never a 5xx but the declared
    503, and the status code, content type and body are those the document declares for the operation."""
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    statuses: list[int] = []

    @given(case=operations[name].as_strategy(generation_mode=GenerationMode(mode)))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
              database=None)
    def check(case: Any) -> None:
        response = case.call(base_url=world.url, timeout=30)
        statuses.append(response.status_code)
        assert response.status_code < 500 or response.status_code == 503, response.text
        case.validate_response(response, checks=[status_code_conformance, content_type_conformance,
                                                 response_schema_conformance])

    check()
    # The requests were made: invalid ones refused, valid ones answered.
    assert statuses
    if mode == "negative":
        assert any(400 <= code < 500 for code in statuses), statuses
