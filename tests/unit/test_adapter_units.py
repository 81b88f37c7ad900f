"""Pure parts of the adapter: workflow filling, the URL safety check, failure classification, settings."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from adapter.backends.comfyui import format_prompt_error, interpret_history
from adapter.errors import PermanentJobError, TransientJobError, classify, is_transient_http
from adapter.inputs import check_image, check_url
from adapter.workflow import PACKAGED_DIR, WorkflowError, load_template, load_templates, request_values
from gpuctl.errors import AwsError, ConfigError, NotFound, UsageError
from gpuctl.models import JobType, build_camera_prompt, parse_request
from tests.helpers import make_image

# --- workflows -----------------------------------------------------------------------------------


def _links_to(graph: dict, node_id: str) -> list[tuple[str, str]]:
    return [(nid, name) for nid, node in graph.items() for name, value in node["inputs"].items()
            if isinstance(value, list) and len(value) == 2 and value[0] == node_id]


def test_packaged_templates_load_and_fix_the_reference_exports():
    """Both templates load; ImageScaleToTotalPixels has resolution_steps and CLIPLoader type qwen_image."""
    templates = load_templates()
    assert set(templates) == set(JobType)
    for template in templates.values():
        for node in template.graph.values():
            if node["class_type"] == "ImageScaleToTotalPixels":
                assert node["inputs"]["resolution_steps"] == 1
            if node["class_type"] == "CLIPLoader":
                assert node["inputs"]["type"] == "qwen_image"
        assert template.graph[template.output_node]["class_type"] == "SaveImage"


def test_camera_angle_fill_puts_prompt_seed_steps_image_and_prefix():
    """The knobs' prompt, the seed, steps, the uploaded image name and the prefix land on their nodes."""
    template = load_template(JobType.CAMERA_ANGLE)
    request = parse_request(JobType.CAMERA_ANGLE, {"image_url": "s3://b/k.png", "vertical": 2, "steps": 5})
    graph = template.fill(request_values(request, seed=42), {"image_url": "gpuctl/t_1.png"}, "gpuctl/t")
    assert graph["11"]["inputs"]["prompt"] == build_camera_prompt(2, 0, 0)
    assert graph["14"]["inputs"]["seed"] == 42 and graph["14"]["inputs"]["steps"] == 5
    assert graph["31"]["inputs"]["image"] == "gpuctl/t_1.png"
    assert graph["80"]["inputs"]["filename_prefix"] == "gpuctl/t"
    # the template itself is untouched
    assert template.graph["31"]["inputs"]["image"] == "placeholder.png"


def test_request_seed_wins_over_the_random_one():
    """A seed in the request is used as is; without one the generated seed is."""
    with_seed = parse_request(JobType.CAMERA_ANGLE, {"image_url": "s3://b/k", "seed": 9})
    without = parse_request(JobType.CAMERA_ANGLE, {"image_url": "s3://b/k"})
    assert request_values(with_seed, seed=1)["seed"] == 9
    assert request_values(without, seed=1)["seed"] == 1


def test_qwen_fill_drops_absent_reference_images_and_their_links():
    """Without image2/image3 their LoadImage nodes and every link to them are removed."""
    template = load_template(JobType.QWEN_IMAGE_EDIT)
    request = parse_request(JobType.QWEN_IMAGE_EDIT, {"image_url": "s3://b/a.png", "prompt": "sketch",
                                                      "cfg": 2.5, "sampler_name": "euler"})
    graph = template.fill(request_values(request, seed=3), {"image_url": "gpuctl/t_1.png"}, "gpuctl/t")
    assert "8" not in graph and "11" not in graph
    assert _links_to(graph, "8") == [] and _links_to(graph, "11") == []
    assert graph["3"]["inputs"]["prompt"] == "sketch"
    assert graph["2"]["inputs"]["cfg"] == 2.5 and graph["2"]["inputs"]["sampler_name"] == "euler"
    assert graph["10"]["inputs"]["image"] == "gpuctl/t_1.png"


def test_qwen_fill_keeps_given_reference_images():
    """A given image2 keeps its node, with the uploaded name, wired into both encoders."""
    template = load_template(JobType.QWEN_IMAGE_EDIT)
    request = parse_request(JobType.QWEN_IMAGE_EDIT, {"image_url": "s3://b/a", "image2_url": "s3://b/b",
                                                      "prompt": "x"})
    graph = template.fill(request_values(request, seed=3),
                          {"image_url": "a.png", "image2_url": "b.png"}, "p")
    assert graph["8"]["inputs"]["image"] == "b.png" and "11" not in graph
    assert sorted(_links_to(graph, "8")) == [("3", "image2"), ("4", "image2")]


def test_fill_refuses_a_missing_main_image():
    """The main image cannot be dropped like an optional one."""
    template = load_template(JobType.CAMERA_ANGLE)
    request = parse_request(JobType.CAMERA_ANGLE, {"image_url": "s3://b/k"})
    with pytest.raises(WorkflowError, match="main image"):
        template.fill(request_values(request, seed=1), {}, "p")


def test_override_dir_replaces_a_template_and_mapping_errors_are_caught(tmp_path: Path):
    """A workflows dir overrides file by file; a mapping naming a missing node is refused at load."""
    graph = json.loads((PACKAGED_DIR / "camera-angle.json").read_text())
    graph["14"]["inputs"]["sampler_name"] = "dpmpp_2m"
    (tmp_path / "camera-angle.json").write_text(json.dumps(graph))
    assert load_template(JobType.CAMERA_ANGLE, tmp_path).graph["14"]["inputs"]["sampler_name"] == "dpmpp_2m"
    (tmp_path / "camera-angle.map.json").write_text(json.dumps(
        {"output_node": "80", "images": {"image_url": "31"}, "inputs": {"steps": [["99", "steps"]]}}))
    with pytest.raises(WorkflowError, match="does not name a node"):
        load_template(JobType.CAMERA_ANGLE, tmp_path)


# --- URL safety ----------------------------------------------------------------------------------


def _resolver(*addresses: str):
    return lambda host, port: list(addresses)


@pytest.mark.parametrize("address", [
    "169.254.169.254", "127.0.0.1", "10.0.0.5", "172.16.3.4", "192.168.1.1", "100.64.0.1", "0.0.0.0",
    "::1", "fe80::1", "fd00::1", "::ffff:169.254.169.254", "224.0.0.1",
])
def test_check_url_refuses_non_public_addresses(address: str):
    """Metadata, loopback, private, link-local, CGNAT, multicast and mapped addresses are refused."""
    with pytest.raises(PermanentJobError, match="only fetches from public addresses"):
        check_url("https://images.example.com/a.png", resolve=_resolver(address))


def test_check_url_refuses_when_any_address_is_private():
    """One private address among public ones is enough to refuse (DNS answers vary)."""
    with pytest.raises(PermanentJobError):
        check_url("https://x.example.com/a.png", resolve=_resolver("93.184.216.34", "10.1.2.3"))


@pytest.mark.parametrize("url", ["http://example.com/a.png", "file:///etc/passwd", "ftp://x/y",
                                 "https:///nohost", "https://user:pw@example.com/a.png"])
def test_check_url_refuses_other_schemes_and_forms(url: str):
    """Only https:// with a host and no credentials is fetched."""
    with pytest.raises(PermanentJobError):
        check_url(url, resolve=_resolver("93.184.216.34"))


def test_check_url_accepts_a_public_https_host():
    """A public address passes."""
    check_url("https://images.example.com:8443/a.png", resolve=_resolver("93.184.216.34", "2606:2800::1"))


def test_check_image_reads_a_png_and_refuses_garbage(tmp_path: Path):
    """Real image bytes give their extension; anything else is a permanent error."""
    assert check_image(make_image(tmp_path / "a.png").read_bytes(), "s3://b/a.png") == "png"
    assert check_image(make_image(tmp_path / "a.jpg", fmt="JPEG").read_bytes(), "s3://b/a.jpg") == "jpg"
    with pytest.raises(PermanentJobError, match="is not an image gpuctl can read"):
        check_image(b"<html>nope</html>", "s3://b/x")


# --- failure classification ----------------------------------------------------------------------


def _status_error(code: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://127.0.0.1:8188/prompt")
    return httpx.HTTPStatusError("x", request=request, response=httpx.Response(code, request=request))


@pytest.mark.parametrize(("exc", "expected"), [
    (PermanentJobError("bad"), "permanent"),
    (UsageError("Invalid camera-angle request: steps ..."), "permanent"),
    (NotFound("s3://b/k does not exist."), "permanent"),
    (_status_error(400), "permanent"),
    (_status_error(404), "permanent"),
    (_status_error(429), "transient"),
    (_status_error(500), "transient"),
    (_status_error(503), "transient"),
    (httpx.ConnectError("refused"), "transient"),
    (httpx.ReadTimeout("slow"), "transient"),
    (TransientJobError("lost"), "transient"),
    (AwsError("throttled", code="ThrottlingException"), "transient"),
    (RuntimeError("a bug"), "transient"),
])
def test_classify(exc: Exception, expected: str):
    """Bad input and 4xx fail now; connection trouble, 5xx, 429, AWS errors and bugs are retried."""
    assert classify(exc) == expected


def test_is_transient_http_is_the_retry_predicate():
    """stamina retries transport errors, 5xx and 429 only."""
    assert is_transient_http(httpx.ConnectError("x"))
    assert is_transient_http(_status_error(502))
    assert not is_transient_http(_status_error(400))
    assert not is_transient_http(PermanentJobError("x"))


# --- ComfyUI answers -----------------------------------------------------------------------------


def test_format_prompt_error_names_the_failing_node():
    """A 400 from /prompt becomes one sentence with the node and the input at fault."""
    body = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                      "details": "", "extra_info": {}},
            "node_errors": {"77": {"errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                               "details": "unet_name: 'x.safetensors' not in [...]"}],
                                   "dependent_outputs": ["80"], "class_type": "UNETLoader"}}}
    text = format_prompt_error(body)
    assert text.startswith("Prompt outputs failed validation")
    assert "node 77 (UNETLoader) Value not in list: unet_name: 'x.safetensors'" in text


def test_interpret_history_success_error_and_interrupt():
    """History says success, a node's error (with its message), or an interrupt."""
    ok = {"status": {"status_str": "success", "completed": True, "messages": [["execution_success", {}]]}}
    err = {"status": {"status_str": "error", "completed": False, "messages": [
        ["execution_start", {}],
        ["execution_error", {"node_id": "14", "node_type": "KSampler", "exception_type": "torch.OutOfMemoryError",
                             "exception_message": "CUDA out of memory\n"}]]}}
    stopped = {"status": {"status_str": "error", "completed": False,
                          "messages": [["execution_interrupted", {"node_id": "14"}]]}}
    # ComfyUI can record an execution_error while status_str says success (reference §4.2)
    odd = {"status": {"status_str": "success", "completed": True,
                      "messages": [["execution_error", {"node_id": "3", "node_type": "X",
                                                        "exception_message": "cycle"}]]}}
    assert interpret_history(ok) == ("success", None)
    assert interpret_history(err) == (
        "error", "ComfyUI node 14 (KSampler) failed: torch.OutOfMemoryError: CUDA out of memory")
    assert interpret_history(stopped)[0] == "interrupted"
    assert interpret_history(odd)[0] == "error"


# --- settings ------------------------------------------------------------------------------------


def test_settings_defaults_and_backend_url(monkeypatch: pytest.MonkeyPatch):
    """The backend URL defaults by backend kind; env names carry the GPUCTL_ prefix."""
    from adapter.settings import AdapterSettings

    assert AdapterSettings().base_url == "http://127.0.0.1:8188"
    monkeypatch.setenv("GPUCTL_BACKEND", "unified")
    monkeypatch.setenv("GPUCTL_INFLIGHT", "3")
    settings = AdapterSettings()
    assert settings.base_url == "http://127.0.0.1:8000" and settings.inflight == 3
    assert settings.worker_id


def test_settings_refuse_a_heartbeat_slower_than_the_visibility_extension():
    """A heartbeat that cannot keep the message invisible is a configuration error."""
    from adapter.settings import load_adapter_settings

    with pytest.raises(ConfigError, match="heartbeat_interval"):
        load_adapter_settings(queue_url="q", table_name="t", bucket="b", heartbeat_interval=60,
                              visibility_extension=30)


def test_load_adapter_settings_requires_queue_table_and_bucket():
    """A daemon without a queue URL refuses to start with a sentence naming the setting."""
    from adapter.settings import load_adapter_settings

    with pytest.raises(ConfigError, match="SQS queue URL"):
        load_adapter_settings(table_name="t", bucket="b")


# --- readiness: model files --------------------------------------------------------------------------------


def test_combo_options_reads_classic_and_v3_forms():
    """Both /object_info combo shapes give their options; other inputs are not combos."""
    from adapter.backends.comfyui import combo_options

    assert combo_options([["a.safetensors", "b"], {}]) == ["a.safetensors", "b"]
    assert combo_options(["COMBO", {"options": ["x", "y"]}]) == ["x", "y"]
    assert combo_options(["INT", {"min": 0}]) is None and combo_options(None) is None


def test_missing_options_names_absent_model_files_but_not_request_filled_inputs(tmp_path: Path):
    """A loader's file not in ComfyUI's list is reported; inputs the request fills and LoadImage are not."""
    from adapter.backends.comfyui import missing_options
    from gpuctl.local.standin_nodes import DEFAULT_MODELS, NODES, Catalog, object_info

    template = load_template(JobType.QWEN_IMAGE_EDIT)
    models = {k: list(v) for k, v in DEFAULT_MODELS.items()}
    catalog = Catalog(models, tmp_path, (0, 3, 64))
    info = {name: object_info(spec, catalog) for name, spec in NODES.items()}
    assert missing_options(template, info) == []
    models["checkpoints"] = []
    catalog = Catalog(models, tmp_path, (0, 3, 64))
    info = {name: object_info(spec, catalog) for name, spec in NODES.items()}
    (problem,) = missing_options(template, info)
    assert "model file 'Qwen-Rapid-AIO-NSFW-v11.safetensors'" in problem and "node 1" in problem


# --- hygiene -----------------------------------------------------------------------------------------------


def test_job_files_removes_one_attempts_files_and_sweeps_only_old_leftovers(tmp_path: Path):
    """An attempt deletes its own inputs and outputs; the sweep deletes only old files named like ours."""
    import os
    import time as _time

    from adapter.hygiene import JobFiles

    task, other = "0b7e1c2a-5d1e-4c8e-9f57-3c1b2a4d5e6f", "1b7e1c2a-5d1e-4c8e-9f57-3c1b2a4d5e6f"
    inp, out = tmp_path / "input" / "gpuctl", tmp_path / "output" / "gpuctl"
    inp.mkdir(parents=True)
    out.mkdir(parents=True)
    for path in (inp / f"{task}-aa11_1.png", out / f"{task}-aa11_00001_.png", out / f"{task}-bb22_00001_.png",
                 inp / f"{other}-cc33_1.png", inp / "someone-elses.png"):
        path.write_bytes(b"x")
    files = JobFiles(tmp_path / "input", tmp_path / "output", ttl=3600)
    files._next_sweep = float("inf")
    assert files.remove(f"{task}-aa11", [f"gpuctl/{task}-aa11_1.png", "../escape.png"]) == 2
    assert sorted(p.name for p in (*inp.iterdir(), *out.iterdir())) == sorted([
        f"{other}-cc33_1.png", f"{task}-bb22_00001_.png", "someone-elses.png"])
    old = _time.time() - 7200
    os.utime(inp / f"{other}-cc33_1.png", (old, old))
    os.utime(inp / "someone-elses.png", (old, old))
    assert files.sweep() == 1
    assert (inp / "someone-elses.png").exists()



def test_unified_backend_follows_redirects_and_posts_the_canonical_path():
    """A message api_path with a trailing slash is POSTed canonically; a 307 on the way is followed."""
    from adapter.backends import BackendJob, JobControl
    from adapter.backends.unified import UnifiedBackend
    from adapter.settings import AdapterSettings
    from gpuctl.models import JobMessage

    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        if request.url.path == "/api/v1/camera-angle/jobs":
            return httpx.Response(307, headers={"location": "/moved/camera-angle/jobs"})
        if request.url.path == "/moved/camera-angle/jobs":
            return httpx.Response(202, json={"job_id": "j1", "status": "pending"})
        return httpx.Response(200, json={"job_id": "j1", "status": "completed", "result_s3_uri": "s3://b/r.png"})

    settings = AdapterSettings.model_construct(
        backend_url="http://svc", http_retry_attempts=1, http_retry_timeout=1.0, job_timeout=5.0,
        unified_status_timeout=1.0, unified_poll_max=0.1, backend_down_grace=1.0)
    backend = UnifiedBackend(settings, None, transport=httpx.MockTransport(handler))
    message = JobMessage(task_id="t", api_path="/api/v1/camera-angle/jobs/", request_body={"image_url": "s3://b/k"})
    noted: list[str] = []
    result = backend.run(BackendJob("t", message, message.request()), JobControl(5.0, on_backend_job=noted.append))
    assert result.result_uri == "s3://b/r.png" and noted == ["j1"]
    assert seen[:2] == ["POST /api/v1/camera-angle/jobs", "POST /moved/camera-angle/jobs"]


def _public(host: str, port: int) -> list[str]:
    return ["93.184.216.34"]


def test_fetch_input_follows_checked_redirects_and_refuses_a_private_hop(tmp_path: Path):
    """https inputs: a redirect to another public host is followed; one to a private address is refused."""
    from adapter.inputs import fetch_input

    png = make_image(tmp_path / "in.png").read_bytes()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/moved":
            return httpx.Response(302, headers={"location": "https://cdn.example.org/in.png"})
        if request.url.path == "/to-metadata":
            return httpx.Response(302, headers={"location": "https://169.254.169.254/latest"})
        return httpx.Response(200, content=png)

    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        got = fetch_input("https://example.org/moved", store=None, http=http, max_bytes=10**6,  # type: ignore[arg-type]
                          resolve=_public)
        assert got == png
        with pytest.raises(PermanentJobError, match=r"169\.254\.169\.254"):
            fetch_input("https://example.org/to-metadata", store=None, http=http, max_bytes=10**6,  # type: ignore[arg-type]
                        resolve=_public)


def test_input_header_check_reads_only_the_header_and_applies_the_pixel_limit(tmp_path: Path):
    """The unified path asks for the first 64 KiB only and refuses a bomb from its header."""
    import struct
    import zlib

    from adapter.inputs import check_input_header
    from gpuctl.inputs import ImageLimits

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    ranges: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        ranges.append(request.headers.get("range"))
        return httpx.Response(206, content=bomb, headers={"content-range": f"bytes 0-{len(bomb) - 1}/900000"})

    limits = ImageLimits(max_bytes=20 * 2**20, max_pixels=40_000_000, max_side=12000)
    with httpx.Client(transport=httpx.MockTransport(handler)) as http, pytest.raises(PermanentJobError, match="pixels"):
        check_input_header("https://example.org/bomb.png", store=None, http=http, limits=limits,  # type: ignore[arg-type]
                           resolve=_public)
    assert ranges == ["bytes=0-65535"]


def test_an_input_the_role_may_not_read_fails_the_job_at_once():
    """S3 answers a missing key outside the listable prefixes with 403: that is permanent, not retried."""
    import boto3
    import httpx
    from botocore.stub import Stubber

    from adapter.inputs import fetch_input
    from gpuctl.aws.s3 import ObjectStore

    # GIVEN an S3 client that answers AccessDenied (moto cannot: botocore's Stubber plays S3)
    client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    stubber = Stubber(client)
    stubber.add_client_error("get_object", service_error_code="AccessDenied", http_status_code=403)
    # WHEN the adapter fetches the input / THEN the job fails permanently with the reason
    with stubber, httpx.Client() as http, pytest.raises(PermanentJobError, match="does not exist or the instance"):
        fetch_input("s3://bucket/inputs/missing.png", store=ObjectStore(client), http=http, max_bytes=1 << 20)
