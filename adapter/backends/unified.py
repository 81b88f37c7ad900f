"""The seed's "unified API" service (127.0.0.1:8000): POST the api_path, poll ``/api/v1/jobs/{id}``.

That service already publishes its result to S3 (or its CDN) itself, so the adapter records the
``result_s3_uri`` it reports as it is, without copying it: the URL clients got from the seed system keeps
its form, and no second copy of every result is stored.

The running service answers nothing while it executes a job (one worker; a status read sent during a 15 s job
came back after 13 s), so:

* the service's job id is stored in the record (``comfy_job_id``) *before* polling, and an attempt that finds one
  there (a retry, a takeover) polls that job instead of creating a second one; only a 404 (the service forgot
  it) makes it POST again;
* a status read that times out means "still running", never "unreachable": it is sent again at once, until the
  job's own timeout. Only refused connections and 5xx for ``backend_down_grace`` seconds end the attempt (the
  handler then pauses the adapter if the service is down);
* the delay between reads starts at 0.1 s, grows to ``unified_poll_max`` (0.5 s) and starts again at 0.1 s
  whenever the job's status changes, so a job that waited in the service's queue is followed closely once it
  runs.

Inputs are checked (header first: format, bytes, pixels, longest side) before the POST, with the same limits and
code as the CLI. Redirects are followed, and the api_path is the job type's canonical one (a trailing slash got a
307). The service has no cancel route: a cancelled job is ended at once; the service may still finish it,
unrecorded.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import httpx
import stamina

from adapter.backends import BackendJob, BackendResult, Readiness
from adapter.errors import JobInterrupted, PermanentJobError, TransientJobError, is_transient_http
from adapter.inputs import check_input_header
from gpuctl.inputs import ImageLimits

if TYPE_CHECKING:
    from adapter.backends import JobControl
    from adapter.settings import AdapterSettings
    from gpuctl.aws.s3 import ObjectStore

__all__ = ["UnifiedBackend"]

log = logging.getLogger(__name__)
_POLL_FIRST = 0.1


def _retry_post(exc: Exception) -> bool:
    return is_transient_http(exc) and not isinstance(exc, httpx.ReadTimeout)


class UnifiedBackend:
    """Runs jobs through the unified API, as the seed's adapter did, without its duplicate POSTs."""

    def __init__(self, settings: AdapterSettings, store: ObjectStore | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._settings = settings
        self._store = store
        self._http = httpx.Client(base_url=settings.base_url, timeout=httpx.Timeout(10.0, connect=3.0),
                                  transport=transport, follow_redirects=True)
        self._inputs_http = httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0), transport=transport)

    def check(self) -> Readiness:
        url = self._settings.base_url
        try:
            response = self._http.get("/health", timeout=self._status_timeout())
        except httpx.ReadTimeout:
            # Connected, but no answer: the service is busy running a job (it answers nothing meanwhile).
            return Readiness("unified", url, True, checked=("/health (busy: no answer while a job runs)",))
        except httpx.HTTPError as exc:
            return Readiness("unified", url, False, problems=(f"the unified API does not answer: {exc!r}",))
        if response.status_code >= 500:
            return Readiness("unified", url, False, problems=(f"the unified API answers HTTP {response.status_code}",))
        return Readiness("unified", url, True, checked=("/health",))

    def alive(self) -> str | None:
        report = self.check()
        return None if report.ready else report.summary()

    def close(self) -> None:
        self._http.close()
        self._inputs_http.close()

    def _status_timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self._settings.unified_status_timeout, connect=3.0)

    def run(self, job: BackendJob, control: JobControl) -> BackendResult:
        job_id = job.previous_backend_job_id
        if job_id is not None:
            log.info("unified.job_resumed", extra={"task_id": job.task_id, "backend_job_id": job_id})
        while True:
            if job_id is None:
                self._check_inputs(job)
                job_id = self._submit(job)
                control.backend_job(job_id)  # in the record before the first poll
                log.info("unified.job_queued", extra={"task_id": job.task_id, "backend_job_id": job_id})
            result = self._follow(job_id, control)
            if result is not None:
                return result
            log.warning("unified.job_forgotten", extra={"task_id": job.task_id, "backend_job_id": job_id})
            job_id = None  # the service forgot it (restarted): submit again

    def _check_inputs(self, job: BackendJob) -> None:
        if self._store is None:
            return
        limits = ImageLimits.from_settings(self._settings)
        for url in job.request.image_urls():
            check_input_header(url, store=self._store, http=self._inputs_http, limits=limits)

    def _follow(self, job_id: str, control: JobControl) -> BackendResult | None:
        """Poll the service's job to its end; None when the service does not know it (404)."""
        delay = _POLL_FIRST
        last_contact = time.monotonic()
        last_status: str | None = None
        while True:
            reason = control.stop_reason()
            if reason is not None:
                raise JobInterrupted(reason, job_id)
            try:
                response = self._http.get(f"/api/v1/jobs/{job_id}", timeout=self._status_timeout())
                if response.status_code == 404:
                    return None
                response.raise_for_status()
                doc: dict[str, Any] = response.json()
                last_contact = time.monotonic()
            except httpx.TimeoutException:
                # The service answers nothing while it runs a job: slow means "still running".
                last_contact = time.monotonic()
                continue
            except (httpx.TransportError, httpx.HTTPStatusError, ValueError) as exc:
                down_for = time.monotonic() - last_contact
                if down_for > self._settings.backend_down_grace:
                    raise TransientJobError(f"the unified API is unreachable for {down_for:.0f} s: {exc!r}") from exc
                doc = {}
            status = str(doc.get("status", "")).lower()
            if status == "completed":
                uri = doc.get("result_s3_uri") or doc.get("result_url")
                if not uri:
                    raise PermanentJobError("the unified API completed the job without a result_s3_uri")
                return BackendResult(backend_job_id=job_id, result_uri=str(uri))
            if status == "failed":
                raise PermanentJobError(str(doc.get("error") or "the unified API reported a failure"))
            if isinstance(doc.get("progress"), int | float):
                control.progress(float(doc["progress"]))
            if status and status != last_status:
                last_status, delay = status, _POLL_FIRST
            control.wait(delay)
            delay = min(delay * 1.5, self._settings.unified_poll_max)

    def _submit(self, job: BackendJob) -> str:
        # A 5xx after the service accepted the job would queue it twice; the seed's API has no idempotency
        # key, so this is retried only on errors (stamina's predicate) and accepted as a known limit.
        path = job.message.job_type.api_path  # canonical: no trailing slash (the service answers 307 to one)
        # The POST waits while the service runs another job, so it may take as long as a job; a POST that
        # timed out may still be accepted later, so it is never sent again on a timeout.
        timeout = httpx.Timeout(max(self._settings.job_timeout, self._settings.unified_status_timeout), connect=3.0)
        for attempt in stamina.retry_context(on=_retry_post, attempts=self._settings.http_retry_attempts,
                                             timeout=self._settings.http_retry_timeout, wait_max=5.0):
            with attempt:
                try:
                    response = self._http.post(path, json=job.message.request_body, timeout=timeout)
                except httpx.ReadTimeout as exc:
                    raise TransientJobError(f"the unified API did not answer the job's POST: {exc!r}") from exc
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
