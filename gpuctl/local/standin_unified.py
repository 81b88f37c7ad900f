"""The seed system's "unified API" (``/api/v1/<job>/jobs``, ``/api/v1/jobs/{id}``) on top of the stand-in.

The seed runs this as a separate service in front of ComfyUI (port 8000). The stand-in serves it on the same
port as its ComfyUI routes: a job fetches its images, builds the reference workflow graph, queues it on the
stand-in's own prompt queue (so it takes its turn with prompts posted to ``/prompt``), waits for the history
entry and publishes the output.

Image URLs: ``file://`` paths, ``http(s)://`` on a loopback host, and ``s3://bucket/key`` (read with boto3;
the endpoint is ``StandinConfig.s3_endpoint_url`` when set, else boto3's own resolution, which honours
``AWS_ENDPOINT_URL``). Results: uploaded to ``s3://<output_bucket>/<output_prefix><job>/<job_id>.png`` when an
output bucket is configured and reported as the running service does: ``https://<cdn_domain>/<key>`` with a CDN
domain, else that s3:// URI. Without a bucket: the ``file://`` URI of the output PNG.

``StandinConfig.unified_blocking`` (``--unified-blocking``) plays the running service's shape: one worker whose
HTTP side answers nothing while a job executes (its status read took 13 s during a 15 s job), so every unified
request waits until the running job ends. As there, a path with a trailing slash answers 307 to the one without.
"""

from __future__ import annotations

import asyncio
import copy
import io
import ipaddress
import logging
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import httpx
from aiohttp import web
from PIL import Image

from gpuctl.aws._session import is_local_endpoint
from gpuctl.errors import UsageError
from gpuctl.models import JobType, build_camera_prompt, parse_request
from gpuctl.settings import published_url

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from gpuctl.local.comfyui_standin import Standin

__all__ = ["CAMERA_ANGLE_GRAPH", "QWEN_IMAGE_EDIT_GRAPH", "UnifiedJobs", "register"]

logger = logging.getLogger(__name__)

# The reference workflows (reference/workflows/*.json) with one change: ImageScaleToTotalPixels gets
# resolution_steps, a required input since ComfyUI v0.6.0 that the seed's exports predate.
CAMERA_ANGLE_GRAPH: dict[str, Any] = {
    "1": {"inputs": {"strength": 1, "model": ["2", 0]}, "class_type": "CFGNorm"},
    "2": {"inputs": {"shift": 3, "model": ["20", 0]}, "class_type": "ModelSamplingAuraFlow"},
    "3": {
        "inputs": {"prompt": "", "clip": ["76", 0], "vae": ["22", 0], "image1": ["39", 0]},
        "class_type": "TextEncodeQwenImageEditPlus",
    },
    "10": {"inputs": {"pixels": ["39", 0], "vae": ["22", 0]}, "class_type": "VAEEncode"},
    "11": {
        "inputs": {"prompt": "将镜头转为俯视", "clip": ["76", 0], "vae": ["22", 0], "image1": ["39", 0]},
        "class_type": "TextEncodeQwenImageEditPlus",
    },
    "12": {"inputs": {"samples": ["14", 0], "vae": ["22", 0]}, "class_type": "VAEDecode"},
    "14": {
        "inputs": {
            "seed": 216113436124078,
            "steps": 8,
            "cfg": 1,
            "sampler_name": "euler",
            "scheduler": "simple",
            "denoise": 1,
            "model": ["1", 0],
            "positive": ["11", 0],
            "negative": ["3", 0],
            "latent_image": ["10", 0],
        },
        "class_type": "KSampler",
    },
    "20": {
        "inputs": {
            "lora_name": "Qwen-Image-Lightning-8steps-V1.1.safetensors",
            "strength_model": 1,
            "model": ["79", 0],
        },
        "class_type": "LoraLoaderModelOnly",
    },
    "22": {"inputs": {"vae_name": "qwen_image_vae.safetensors"}, "class_type": "VAELoader"},
    "31": {"inputs": {"image": "placeholder.jpg"}, "class_type": "LoadImage"},
    "39": {
        "inputs": {"upscale_method": "lanczos", "megapixels": 1, "resolution_steps": 1, "image": ["31", 0]},
        "class_type": "ImageScaleToTotalPixels",
    },
    "76": {
        "inputs": {
            "clip_name": "qwen_2.5_vl_7b.safetensors",
            "type": "stable_diffusion",
            "device": "default",
        },
        "class_type": "CLIPLoader",
    },
    "77": {
        "inputs": {"unet_name": "Qwen-Image-Edit-2509_fp8_e4m3fn.safetensors", "weight_dtype": "default"},
        "class_type": "UNETLoader",
    },
    "79": {
        "inputs": {"lora_name": "镜头转换.safetensors", "strength_model": 1, "model": ["77", 0]},
        "class_type": "LoraLoaderModelOnly",
    },
    "80": {"inputs": {"filename_prefix": "ComfyUI", "images": ["12", 0]}, "class_type": "SaveImage"},
}

QWEN_IMAGE_EDIT_GRAPH: dict[str, Any] = {
    "1": {
        "inputs": {"ckpt_name": "Qwen-Rapid-AIO-NSFW-v11.safetensors"},
        "class_type": "CheckpointLoaderSimple",
    },
    "2": {
        "inputs": {
            "seed": 65454653,
            "steps": 4,
            "cfg": 1,
            "sampler_name": "sa_solver",
            "scheduler": "beta",
            "denoise": 1,
            "model": ["1", 0],
            "positive": ["3", 0],
            "negative": ["4", 0],
            "latent_image": ["16", 0],
        },
        "class_type": "KSampler",
    },
    "3": {
        "inputs": {
            "prompt": "提取黑白线稿",
            "clip": ["1", 1],
            "vae": ["1", 2],
            "image1": ["10", 0],
            "image2": ["8", 0],
            "image3": ["11", 0],
        },
        "class_type": "TextEncodeQwenImageEditPlus",
    },
    "4": {
        "inputs": {"prompt": "", "clip": ["1", 1], "vae": ["1", 2]},
        "class_type": "TextEncodeQwenImageEditPlus",
    },
    "5": {"inputs": {"samples": ["2", 0], "vae": ["1", 2]}, "class_type": "VAEDecode"},
    "8": {"inputs": {"image": "placeholder2.png"}, "class_type": "LoadImage"},
    "9": {"inputs": {"width": 832, "height": 1216, "batch_size": 1}, "class_type": "EmptyLatentImage"},
    "10": {"inputs": {"image": "placeholder.png"}, "class_type": "LoadImage"},
    "11": {"inputs": {"image": "placeholder3.png"}, "class_type": "LoadImage"},
    "13": {"inputs": {"filename_prefix": "ComfyUI", "images": ["5", 0]}, "class_type": "SaveImage"},
    "15": {
        "inputs": {"upscale_method": "lanczos", "megapixels": 1, "resolution_steps": 1, "image": ["10", 0]},
        "class_type": "ImageScaleToTotalPixels",
    },
    "16": {"inputs": {"pixels": ["15", 0], "vae": ["1", 2]}, "class_type": "VAEEncode"},
}

_JOB_KINDS = ("camera-angle", "qwen-image-edit")
_POLL_S = 0.05


class RequestError(ValueError):
    """A request body the unified API refuses (422)."""


@dataclass
class UnifiedJob:
    job_id: str
    kind: str
    body: dict[str, Any]
    status: str = "pending"
    result_s3_uri: str | None = None
    error: str | None = None
    prompt_id: str | None = None
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    executing: bool = False  # its prompt started: with the blocking shape, requests wait for its end

    def document(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "status": self.status,
            "result_s3_uri": self.result_s3_uri,
            "error": self.error,
            "job_type": self.kind,
            "comfy_prompt_id": self.prompt_id,
            "finished_at": self.finished_at,
        }


def _check_url(url: Any, name: str) -> None:
    if url is None:
        return
    if not isinstance(url, str) or urlsplit(url).scheme not in ("file", "http", "https", "s3"):
        raise RequestError(f"{name} must be an s3://, https://, http://127.0.0.1 or file:// URL")


_IMAGE_FIELDS = ("image_url", "image2_url", "image3_url")


def normalise_request(kind: str, body: Any) -> dict[str, Any]:
    """Validate a request body with gpuctl's domain model and fill the defaults of SPEC §3.

    The stand-in also takes file:// and loopback http:// images (tests have no S3 or https server), so the
    image URLs are checked here and stand-ins take their place while the model checks the rest.

    Raises:
        RequestError: the body is not a valid request for ``kind``.
    """
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    for name in _IMAGE_FIELDS:
        _check_url(body.get(name), name)
    placeholders = {name: f"s3://stand-in/{name}" for name in _IMAGE_FIELDS if body.get(name) is not None}
    try:
        request = parse_request(JobType(kind), {**body, **placeholders})
    except UsageError as exc:
        raise RequestError(str(exc)) from None
    out = request.model_dump(mode="json")
    out.update({name: body[name] for name in placeholders})
    return out


def build_graph(kind: str, req: dict[str, Any], image_names: list[str], prefix: str) -> dict[str, Any]:
    """The API-format graph for a normalised request whose images were saved as ``image_names``."""
    seed = req["seed"] if req["seed"] is not None else random.randrange(2**48)
    if kind == "camera-angle":
        graph = copy.deepcopy(CAMERA_ANGLE_GRAPH)
        graph["31"]["inputs"]["image"] = image_names[0]
        graph["11"]["inputs"]["prompt"] = req["prompt"] or build_camera_prompt(
            req["vertical"], req["horizontal"], req["zoom"]
        )
        graph["14"]["inputs"].update(seed=seed, steps=req["steps"])
        graph["80"]["inputs"]["filename_prefix"] = prefix
        return graph
    graph = copy.deepcopy(QWEN_IMAGE_EDIT_GRAPH)
    graph["10"]["inputs"]["image"] = image_names[0]
    for slot, node_id, index in (("image2", "8", 1), ("image3", "11", 2)):
        if index < len(image_names):
            graph[node_id]["inputs"]["image"] = image_names[index]
        else:
            del graph[node_id]
            del graph["3"]["inputs"][slot]
    graph["3"]["inputs"]["prompt"] = req["prompt"]
    graph["2"]["inputs"].update(
        seed=seed,
        steps=req["steps"],
        cfg=req["cfg"],
        sampler_name=req["sampler_name"],
        scheduler=req["scheduler"],
        denoise=req["denoise"],
    )
    graph["13"]["inputs"]["filename_prefix"] = prefix
    return graph


def _is_loopback_host(host: str | None) -> bool:
    if host in ("localhost",):
        return True
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class UnifiedJobs:
    """Job table and runner of the unified API."""

    def __init__(self, st: Standin) -> None:
        self.st = st
        self.jobs: dict[str, UnifiedJob] = {}
        self._s3: S3Client | None = None
        self.submitted = 0  # POSTs accepted, for tests that check nothing was submitted twice
        self.idle = asyncio.Event()  # set when no unified job executes (used by the blocking shape)
        self.idle.set()

    async def wait_turn(self) -> None:
        """With the blocking shape, hold a request until the executing job has ended."""
        if self.st.config.unified_blocking:
            await self.idle.wait()

    def s3(self) -> S3Client:
        if self._s3 is None:
            import boto3  # only the s3:// paths need it

            endpoint = self.st.config.s3_endpoint_url
            session = boto3.session.Session()
            if is_local_endpoint(endpoint or os.environ.get("AWS_ENDPOINT_URL")) and session.get_credentials() is None:
                # An emulator on loopback takes any key, as for gpuctl itself (gpuctl.aws._session).
                session = boto3.session.Session(aws_access_key_id="gpuctl-local", aws_secret_access_key="gpuctl-local")
            self._s3 = session.client("s3", endpoint_url=endpoint, region_name=session.region_name or "us-east-1")
        return self._s3

    async def fetch(self, url: str) -> bytes:
        parts = urlsplit(url)
        if parts.scheme == "file":
            return await asyncio.to_thread(Path(unquote(parts.path)).read_bytes)
        if parts.scheme in ("http", "https"):
            if not _is_loopback_host(parts.hostname):
                raise RequestError(f"the stand-in only fetches loopback http(s) URLs, not {parts.hostname}")
            async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0)) as client:
                response = await client.get(url)
                response.raise_for_status()
                return response.content
        if parts.scheme == "s3":
            bucket, key = parts.netloc, parts.path.lstrip("/")

            def get() -> bytes:
                return self.s3().get_object(Bucket=bucket, Key=key)["Body"].read()

            return await asyncio.to_thread(get)
        raise RequestError(f"unsupported URL scheme {parts.scheme!r}")

    def submit(self, kind: str, body: Any) -> UnifiedJob:
        req = normalise_request(kind, body)
        job = UnifiedJob(job_id=str(uuid.uuid4()), kind=kind, body=req)
        self.jobs[job.job_id] = job
        self.submitted += 1
        self.st.spawn(self._run(job))
        logger.info("standin.unified_job_accepted", extra={"job_id": job.job_id, "job_kind": kind})
        return job

    async def _run(self, job: UnifiedJob) -> None:
        try:
            await self._process(job)
        except Exception as exc:
            job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
            job.finished_at = time.time()
            logger.info("standin.unified_job_failed", extra={"job_id": job.job_id, "error": job.error})
        finally:
            if job.executing:
                job.executing = False
                self.idle.set()

    async def _process(self, job: UnifiedJob) -> None:
        req = job.body
        urls = [req["image_url"]] + [req[k] for k in ("image2_url", "image3_url") if req.get(k)]
        names = []
        for i, url in enumerate(urls, start=1):
            data = await self.fetch(url)
            name = f"unified/{job.job_id}_{i}.png"
            await asyncio.to_thread(_save_as_png, data, self.st.input_dir / name)
            names.append(name)
        graph = build_graph(job.kind, req, names, f"unified/{job.job_id}")
        result = self.st.validate(graph)
        if not result.ok:
            raise RuntimeError(f"ComfyUI rejected the workflow: {result.error} {result.node_errors}")
        job.prompt_id = str(uuid.uuid4())
        extra = {"create_time": int(time.time() * 1000)}
        self.st.enqueue(self.st.next_number(False), job.prompt_id, graph, extra, result.good_outputs)
        while True:
            state = self.st.state_of(job.prompt_id)
            if state == "running" and not job.executing:
                job.status = "processing"
                job.executing = True
                self.idle.clear()
            elif state == "done":
                break
            elif state == "unknown":
                raise RuntimeError("ComfyUI lost the prompt (restarted or history cleared)")
            await asyncio.sleep(_POLL_S)
        entry = self.st.history[job.prompt_id]
        status = entry["status"]
        if status["status_str"] != "success":
            last: list[Any] = status["messages"][-1] if status["messages"] else ["unknown", {}]
            info: dict[str, Any] = last[1]
            detail = str(info.get("exception_message", "")).strip() or last[0]
            raise RuntimeError(f"ComfyUI {last[0]} at node {info.get('node_id')}: {detail}")
        images = [
            img for out in entry["outputs"].values() for img in out.get("images", []) if img.get("type") == "output"
        ]
        if not images:
            raise RuntimeError("ComfyUI produced no output image")
        first = images[0]
        path = self.st.output_dir / first["subfolder"] / first["filename"]
        job.result_s3_uri = await self._publish(job, path)
        job.status = "completed"
        job.finished_at = time.time()
        logger.info("standin.unified_job_completed", extra={"job_id": job.job_id, "result": job.result_s3_uri})

    async def _publish(self, job: UnifiedJob, path: Path) -> str:
        bucket = self.st.config.output_bucket
        if not bucket:
            return path.resolve().as_uri()
        key = f"{self.st.config.output_prefix}{job.kind}/{job.job_id}.png"

        def put() -> None:
            self.s3().put_object(Bucket=bucket, Key=key, Body=path.read_bytes(), ContentType="image/png")

        await asyncio.to_thread(put)
        return published_url(bucket, key, self.st.config.cdn_domain)


def _save_as_png(data: bytes, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(io.BytesIO(data)) as img:
        img.save(target, format="PNG")


UNIFIED_KEY = web.AppKey("standin_unified", UnifiedJobs)


def register(app: web.Application, st: Standin) -> None:
    """Add the unified API routes to the stand-in's app."""
    app[UNIFIED_KEY] = UnifiedJobs(st)

    def make_submit(kind: str) -> Any:
        async def submit(request: web.Request) -> web.Response:
            jobs = request.app[UNIFIED_KEY]
            await jobs.wait_turn()
            try:
                body = await request.json()
                job = jobs.submit(kind, body)
            except ValueError as exc:  # RequestError or a body that is not JSON
                return web.json_response({"detail": str(exc)}, status=422)
            return web.json_response(job.document(), status=202)

        return submit

    for kind in _JOB_KINDS:
        app.router.add_post(f"/api/v1/{kind}/jobs", make_submit(kind))
        app.router.add_post(f"/api/v1/{kind}/jobs/", _redirect_slash)
    app.router.add_get("/api/v1/jobs/{job_id}", _get_job)
    app.router.add_get("/health", _health)


async def _redirect_slash(request: web.Request) -> web.Response:
    """FastAPI's redirect_slashes: 307 (method and body kept) to the path without the trailing slash."""
    raise web.HTTPTemporaryRedirect(request.path.rstrip("/"))


async def _get_job(request: web.Request) -> web.Response:
    await request.app[UNIFIED_KEY].wait_turn()
    job = request.app[UNIFIED_KEY].jobs.get(request.match_info["job_id"])
    if job is None:
        return web.json_response({"detail": "Job not found"}, status=404)
    return web.json_response(job.document())


async def _health(request: web.Request) -> web.Response:
    await request.app[UNIFIED_KEY].wait_turn()
    return web.json_response({"status": "healthy", "service": "gpuctl-comfyui-standin", "version": "1.0.0"})
