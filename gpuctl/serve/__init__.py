"""``gpuctl serve``: the running orchestrator's REST API (SPEC §10), answered by gpuctl's own services.

Every route calls the same service function as the CLI command that does the same thing, so the API and the CLI
cannot drift apart:

============================================  ==========================================  ======================
route                                         service                                     CLI
============================================  ==========================================  ======================
``POST /api/v1/{camera-angle,qwen-image-      ``draft_job`` + ``submit_draft``            ``gpuctl submit``
edit}/jobs`` (``Idempotency-Key`` header)     (gpuctl.services.submit)                    (``--idempotency-key``)
``GET /api/v1/jobs/{job_id}``                 ``get_job`` → ``JobRecord.status_document``  ``gpuctl status``
``GET /api/v1/jobs``                          ``list_jobs`` (status index, ``next_token``) ``gpuctl jobs list``
``POST /api/v1/jobs/{job_id}/cancel``         ``cancel_job``                              ``gpuctl jobs cancel``
``GET /api/v1/instance``                      ``instance_status(...).document()``         ``gpuctl instance status``
``GET /health``, ``GET /api/v1/health``       DescribeTable + GetQueueAttributes          —
``GET /``, ``/openapi.json``, ``/docs``        the endpoint index, the OpenAPI document    —
============================================  ==========================================  ======================

The modules: :mod:`gpuctl.serve.app` (the FastAPI app and its routes), :mod:`gpuctl.serve.errors` (the one map
from gpuctl's error hierarchy to HTTP status codes), :mod:`gpuctl.serve.guard` (API keys, the body size limit,
access logs, the last-resort 500), :mod:`gpuctl.serve.openapi` (request and response schemas from gpuctl's models
and ``gpuctl/schemas/output.schema.json``). FastAPI and uvicorn come with the ``serve`` extra
(``pip install 'gpuctl[serve]'``); nothing here is imported unless ``gpuctl serve`` runs.
"""

from __future__ import annotations

__all__: list[str] = []
