"""The seed's "unified API" service (127.0.0.1:8000): POST the api_path, poll ``/api/v1/jobs/{id}``.

That service already publishes its result to S3 (or its CDN) itself, so the adapter records the
``result_s3_uri`` it reports as it is, without copying it: the URL clients got from the seed system keeps
its form, and no second copy of every result is stored.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import httpx
import stamina

from adapter.backends import BackendJob, BackendResult, poll_until_ready
from adapter.errors import JobInterrupted, PermanentJobError, TransientJobError, is_transient_http

if TYPE_CHECKING:
    from adapter.backends import JobControl
    from adapter.settings import AdapterSettings

__all__ = ["UnifiedBackend"]

log = logging.getLogger(__name__)


class UnifiedBackend:
    """Runs jobs through the unified API, exactly as the seed's adapter did."""

    def __init__(self, settings: AdapterSettings, transport: httpx.BaseTransport | None = None) -> None:
        self._settings = settings
        self._http = httpx.Client(base_url=settings.base_url, timeout=httpx.Timeout(10.0, connect=3.0),
                                  transport=transport)

    def wait_ready(self, stop: threading.Event) -> None:
        def probe() -> str | None:
            try:
                response = self._http.get("/health")
            except httpx.HTTPError as exc:
                return repr(exc)
            return f"HTTP {response.status_code}" if response.status_code >= 500 else None

        poll_until_ready(probe, what=f"the unified API at {self._settings.base_url}",
                         timeout=self._settings.ready_timeout, stop=stop, log_event="unified.waiting")
        log.info("unified.ready", extra={"url": self._settings.base_url})

    def close(self) -> None:
        self._http.close()

    def run(self, job: BackendJob, control: JobControl) -> BackendResult:
        job_id = self._submit(job)
        log.info("unified.job_queued", extra={"task_id": job.task_id, "backend_job_id": job_id})
        delay = 0.5
        last_contact = time.monotonic()
        while True:
            reason = control.stop_reason()
            if reason is not None:
                # The seed's service has no cancel endpoint; its job may still finish, unrecorded.
                raise JobInterrupted(reason, job_id)
            try:
                response = self._http.get(f"/api/v1/jobs/{job_id}")
                if response.status_code == 404:
                    raise TransientJobError(f"the unified API forgot job {job_id} (restarted?)")
                response.raise_for_status()
                doc: dict[str, Any] = response.json()
                last_contact = time.monotonic()
            except (httpx.TransportError, httpx.HTTPStatusError, ValueError) as exc:
                down_for = time.monotonic() - last_contact
                if down_for > self._settings.backend_down_grace:
                    raise TransientJobError(f"the unified API is unreachable for {down_for:.0f} s: {exc!r}") from exc
                doc = {}
            status = str(doc.get("status", "")).lower()
            if status == "completed":
                uri = doc.get("result_s3_uri")
                if not uri:
                    raise PermanentJobError("the unified API completed the job without a result_s3_uri")
                return BackendResult(backend_job_id=job_id, result_uri=str(uri))
            if status == "failed":
                raise PermanentJobError(str(doc.get("error") or "the unified API reported a failure"))
            if isinstance(doc.get("progress"), int | float):
                control.progress(float(doc["progress"]))
            control.wait(delay)
            delay = min(delay * 1.5, 5.0)

    def _submit(self, job: BackendJob) -> str:
        # A 5xx after the service accepted the job would queue it twice; the seed's API has no idempotency
        # key, so this is retried only on errors (stamina's predicate) and accepted as a known limit.
        for attempt in stamina.retry_context(on=is_transient_http, attempts=self._settings.http_retry_attempts,
                                             timeout=self._settings.http_retry_timeout, wait_max=5.0):
            with attempt:
                response = self._http.post(job.message.api_path, json=job.message.request_body)
                if 400 <= response.status_code < 500 and response.status_code not in (408, 425, 429):
                    raise PermanentJobError(
                        f"the unified API refused the job (HTTP {response.status_code}): {response.text[:300]}"
                    )
                response.raise_for_status()
                body = response.json()
                job_id = body.get("job_id") or body.get("id") or body.get("task_id")
                if not job_id:
                    raise PermanentJobError("the unified API answered without a job_id")
                return str(job_id)
        raise AssertionError("unreachable: stamina re-raises the last error")
