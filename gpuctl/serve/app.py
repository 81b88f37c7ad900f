"""The FastAPI app of ``gpuctl serve``: the running orchestrator's routes (SPEC §10) and gpuctl's additions, each a
thin call of the service function the CLI uses (see gpuctl/serve/__init__.py for the table)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware

from gpuctl import __version__
from gpuctl.errors import GpuctlError, NotFound, UsageError
from gpuctl.inputs import ImageLimits
from gpuctl.models import JobType
from gpuctl.serve import openapi
from gpuctl.serve.errors import JOB_NOT_FOUND, RequestInvalid, http_error
from gpuctl.serve.guard import ApiKeys, Guard
from gpuctl.services.notes import SubmitNotes

if TYPE_CHECKING:
    from gpuctl.services.context import Gateways
    from gpuctl.services.submit import SubmitResult

__all__ = ["API_VERSION", "SERVICE", "ServeConfig", "create_app"]

#: The running orchestrator's service name and API version, which its README's health check shows.
SERVICE = "gpu-task-orchestrator"
API_VERSION = "1.0.0"
MAX_IDEMPOTENCY_KEY = 255
_EXTRA_IMAGES = ("image2_url", "image3_url")


@dataclass(frozen=True)
class ServeConfig:
    """What ``gpuctl serve`` adds to the gateways' settings: who may call it and how much they may send."""

    api_keys: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 64 * 1024


def _field_errors(exc: ValidationError) -> list[dict[str, Any]]:
    return [{"loc": ["body", *e["loc"]], "msg": e["msg"].removeprefix("Value error, "), "type": e["type"]}
            for e in exc.errors(include_url=False)]


def _body(job_type: JobType, raw: bytes) -> dict[str, Any]:
    """The request body as the job type's request model accepts it, or RequestInvalid with every field error."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise RequestInvalid([{"loc": ["body"], "msg": "the JSON is nested too deeply", "type": "json_invalid"}]) \
            from None
    except ValueError as exc:
        where = [exc.pos] if isinstance(exc, json.JSONDecodeError) else []
        raise RequestInvalid([{"loc": ["body", *where], "msg": "JSON decode error", "type": "json_invalid"}]) \
            from None
    if not isinstance(data, dict):
        raise RequestInvalid([{"loc": ["body"], "msg": "the body must be a JSON object", "type": "model_type"}])
    try:
        job_type.request_model.model_validate(data)
    except RecursionError:
        raise RequestInvalid([{"loc": ["body"], "msg": "the JSON is nested too deeply", "type": "json_invalid"}]) \
            from None
    except ValidationError as exc:
        raise RequestInvalid(_field_errors(exc)) from None
    return data


def submit_body(gw: Gateways, limits: ImageLimits, job_type: JobType, raw: bytes,
                idempotency_key: str | None, notes: SubmitNotes | None = None) -> SubmitResult:
    """Check a POST body as ``gpuctl submit`` checks its options (remote inputs included), then submit it.

    Raises:
        RequestInvalid: the body is not a valid request (nothing was written).
        UsageError: an input that cannot be used (nothing was written).
        GpuctlError: as :func:`gpuctl.services.submit.submit_draft`.
    """
    from gpuctl.services.submit import draft_job, submit_draft

    data = _body(job_type, raw)
    known = job_type.request_model.model_fields
    fields = {k: v for k, v in data.items() if k in known and k != "image_url" and k not in _EXTRA_IMAGES}
    extra = {k: data[k] for k in _EXTRA_IMAGES if k in known and data.get(k) is not None}
    draft = draft_job(job_type, data["image_url"], fields, limits=limits, extra_images=extra)
    if draft.local_images:  # the request models take only s3:// and https://; an API never reads local files
        raise UsageError("Image references must be s3:// URIs or https:// URLs.")
    # The HTTP client waits for this answer: never wait for a stopping instance (the scheduler restarts it).
    return submit_draft(gw, draft, idempotency_key=idempotency_key, stopping_wait=0, notes=notes)


def _check_key(key: str | None) -> str | None:
    if key is not None and (not key or not key.isprintable()):
        raise RequestInvalid([{"loc": ["header", "Idempotency-Key"], "type": "value_error",
                               "msg": "the Idempotency-Key must be 1 to 255 printable characters"}])
    return key


def _job(call: Callable[[], Any]) -> Any:
    """Run a service call about one job; an id that is not a UUID is a job that does not exist (as today)."""
    try:
        return call()
    except UsageError:
        raise NotFound(JOB_NOT_FOUND) from None


def _health(gw: Gateways) -> tuple[bool, dict[str, str]]:
    """DescribeTable and GetQueueAttributes, as the running service checks them."""
    def table() -> None:
        info = gw.table.describe()
        if info.status not in ("ACTIVE", "UPDATING"):
            raise GpuctlError(f"the table {info.name} is {info.status}")

    components: dict[str, str] = {}
    for name, check in (("dynamodb", table), ("sqs", lambda: gw.queue.attributes())):
        try:
            check()
        except GpuctlError as exc:
            components[name] = f"unhealthy: {exc.message}"
        else:
            components[name] = "healthy"
    return all(v == "healthy" for v in components.values()), components


_STD: dict[int | str, Any] = {
    422: openapi.response(openapi.VALIDATION_ERROR, "The request is invalid (every field error is listed)."),
    503: openapi.response(openapi.ERROR, "AWS could not be reached, or the server lacks a setting."),
}
_JOB_404: dict[int | str, Any] = {404: openapi.response(openapi.ERROR, 'No such job: {"detail": "Job not found"}.')}


def _responses(*extra: dict[int | str, Any], auth: bool = True) -> dict[int | str, Any]:
    out: dict[int | str, Any] = {}
    for part in (_STD, *extra):
        out.update(part)
    if auth:
        out[401] = openapi.response(openapi.ERROR, "An API key is required (GPUCTL_API_KEYS is set).")
    out[413] = openapi.response(openapi.ERROR, "The request body is larger than the limit.")
    return out


def create_app(gw: Gateways, config: ServeConfig | None = None) -> FastAPI:
    """The app serving ``gw``'s job system; build the gateways' clients before serving from threads."""
    from gpuctl.services.instance import instance_status
    from gpuctl.services.jobs import HTTP_LISTING, MAX_LIMIT, cancel_job, get_job, list_jobs

    config = config or ServeConfig()
    limits = ImageLimits.from_settings(gw.settings)
    # One coalesced activity-marker note for the server's stream of submits (closed by `serve` at shutdown).
    notes = SubmitNotes(gw)
    app = FastAPI(
        title="gpuctl — GPU Task Orchestrator API", version=API_VERSION,
        description="The GPU job system's REST API, served by `gpuctl serve` (the same checks and documents as the "
                    "gpuctl CLI). Jobs are accepted with 202 and processed by the GPU instance's adapter.",
    )

    @app.exception_handler(GpuctlError)
    async def _gpuctl_error(request: Request, exc: GpuctlError) -> JSONResponse:
        status, body, headers = http_error(exc, job_route="job_id" in request.path_params)
        return JSONResponse(body, status_code=status, headers=headers)

    def add_submit(job_type: JobType) -> None:
        async def submit(
            request: Request,
            idempotency_key: str | None = Header(
                None, alias="Idempotency-Key", max_length=MAX_IDEMPOTENCY_KEY,
                description="Submitting again with the same key returns the same job (as `gpuctl submit "
                            "--idempotency-key`); nothing new is queued."),
        ) -> JSONResponse:
            raw = await request.body()
            result = await run_in_threadpool(submit_body, gw, limits, job_type, raw, _check_key(idempotency_key),
                                             notes)
            return JSONResponse(result.document(), status_code=202)

        app.post(
            job_type.api_path, status_code=202, operation_id=f"submit_{job_type.name.lower()}",
            summary=f"Submit a {job_type.value} job", tags=["jobs"],
            responses=_responses({202: openapi.response("submitted", "Queued (or, with an Idempotency-Key that "
                                                                     "was used before, the job it made).")}),
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/json": {"schema": openapi.request_schema(job_type)}}}},
        )(submit)

    for job_type in JobType:
        add_submit(job_type)

    @app.get("/api/v1/jobs/{job_id}", operation_id="get_job", summary="A job's status", tags=["jobs"],
             responses=_responses({200: openapi.response("job", "The job status document.")}, _JOB_404))
    def job_status(job_id: str) -> JSONResponse:
        # The document `gpuctl status --output json` prints: a pending job says why it waits, when gpuctl can tell.
        from gpuctl.services.diagnose import diagnose_job

        record = _job(lambda: get_job(gw, job_id))
        why = diagnose_job(gw, record)
        return JSONResponse({**record.status_document(), "diagnosis": why.document() if why else None})

    @app.get("/api/v1/jobs", operation_id="list_jobs", summary="Jobs, newest first, one page at a time",
             tags=["jobs"], responses=_responses({200: openapi.response("jobs_page", "One page of jobs.")}))
    def jobs(
        status: str | None = Query(None, description="pending, processing, completed or failed (default: all)"),
        since: str | None = Query(None, description="only jobs younger than this: 30m, 1h, 2d …"),
        limit: int = Query(50, ge=1, le=MAX_LIMIT, description="jobs per page"),
        next_token: str | None = Query(None, description="the next_token of the page before"),
    ) -> JSONResponse:
        page = list_jobs(gw, status=status, since=since, limit=limit, next_token=next_token, names=HTTP_LISTING)
        return JSONResponse({"jobs": [r.status_document() for r in page.records], "next_token": page.next_token})

    @app.post("/api/v1/jobs/{job_id}/cancel", operation_id="cancel_job", summary="Cancel a job", tags=["jobs"],
              responses=_responses({200: openapi.response("job_cancelled", "Cancelled (pending) or asked to stop "
                                                                           "(processing).")}, _JOB_404,
                                   {409: openapi.response(openapi.ERROR, "The job has already finished.")}))
    def cancel(job_id: str) -> JSONResponse:
        outcome = _job(lambda: cancel_job(gw, job_id))
        return JSONResponse({**outcome.record.status_document(), "action": outcome.action})

    @app.get("/api/v1/instance", operation_id="instance_status", summary="The GPU instance and its workload",
             tags=["instance"], responses=_responses({200: openapi.response("instance_status", "As `gpuctl instance "
                                                                                                "status`.")},
                                                     {404: openapi.response(openapi.ERROR, "No such instance.")}))
    def instance() -> JSONResponse:
        return JSONResponse(instance_status(gw).document())

    def health() -> JSONResponse:
        ok, components = _health(gw)
        body = {"status": "healthy" if ok else "unhealthy",
                "message": "Orchestrator is running" if ok else "Orchestrator has issues",
                "components": components, "service": SERVICE, "version": API_VERSION, "gpuctl_version": __version__}
        return JSONResponse(body, status_code=200 if ok else 503)

    health_responses: dict[int | str, Any] = {
        200: openapi.response(openapi.HEALTH, "DynamoDB and SQS answer."),
        503: openapi.response(openapi.HEALTH, "A component is unhealthy."),
    }
    for path, name in (("/health", "health"), ("/api/v1/health", "health_v1")):
        app.get(path, operation_id=name, summary="Health check", tags=["health"], responses=health_responses)(health)

    @app.get("/", operation_id="index", summary="The endpoint index", tags=["health"],
             responses={200: openapi.response(openapi.INDEX, "What this service answers.")})
    def index() -> JSONResponse:
        return JSONResponse({
            "service": "GPU Task Orchestrator", "version": API_VERSION,
            "description": "Async GPU job orchestration: jobs are queued (202) and processed by the GPU instance; "
                           "served by gpuctl.",
            "endpoints": {"camera_angle": JobType.CAMERA_ANGLE.api_path,
                          "qwen_image_edit": JobType.QWEN_IMAGE_EDIT.api_path,
                          "job_status": "/api/v1/jobs/{job_id}", "health": "/health",
                          "jobs": "/api/v1/jobs", "cancel": "/api/v1/jobs/{job_id}/cancel",
                          "instance": "/api/v1/instance", "openapi": "/openapi.json", "docs": "/docs"},
        })

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            app.openapi_schema = openapi.add_components(schema)
            if config.api_keys:
                _add_security(app.openapi_schema)
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]
    # The last added is the outermost: Guard → CORS → API keys → the routes.
    app.add_middleware(ApiKeys, keys=config.api_keys)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_credentials=True,
                           allow_methods=["*"], allow_headers=["*"], expose_headers=["X-Request-ID"])
    app.add_middleware(Guard, max_body_bytes=config.max_body_bytes)
    app.state.submit_notes = notes
    return app


def _add_security(schema: dict[str, Any]) -> None:
    from gpuctl.serve.guard import OPEN_PATHS

    schema["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    }
    for path, operations in schema.get("paths", {}).items():
        if path in OPEN_PATHS:
            continue
        for operation in operations.values():
            operation["security"] = [{"bearer": []}, {"apiKey": []}]


def parse_origins(value: str | None) -> tuple[str, ...]:
    """``CORS_ORIGINS``: comma-separated origins, as the running service reads it."""
    return tuple(o.strip().rstrip("/") for o in (value or "").split(",") if o.strip())


def require_settings(gw: Gateways, names: Sequence[str] = ("table_name", "queue_url")) -> None:
    """Refuse to start without the settings every route needs; build the AWS clients once, before any thread."""
    for name in names:
        gw.settings.require(name)
    gw.clients.dynamodb  # noqa: B018 - built now, on this thread: boto3 sessions are not thread-safe
    gw.clients.sqs  # noqa: B018
    gw.clients.s3  # noqa: B018
    if gw.settings.instance_id:
        gw.clients.ec2  # noqa: B018
