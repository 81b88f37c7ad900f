"""ComfyUI's native API (reference/comfyui-protocol.md §10): upload, POST /prompt, watch, collect.

One long-lived ``httpx.Client`` for every HTTP call, one WebSocket (a fixed ``clientId``, reconnected with
backoff on a drop) for progress and early completion. ``/history/{id}`` is the source of truth: it is
polled the whole time, and read again (briefly, quickly) after the WebSocket reports an end, because
``execution_success`` arrives before history is written (§10.1). A prompt that is neither in history nor
known to the queue twice in a row was lost to a ComfyUI restart and is submitted again, a bounded number
of times.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import stamina

from adapter.backends import BackendJob, BackendNotReady, BackendResult, JobControl, poll_until_ready
from adapter.errors import (
    JobInterrupted,
    PermanentJobError,
    TransientJobError,
    is_transient_http,
)
from adapter.inputs import check_image, fetch_input
from adapter.workflow import WorkflowError, WorkflowTemplate, request_values
from gpuctl.inputs import ImageLimits

if TYPE_CHECKING:
    from adapter.settings import AdapterSettings
    from gpuctl.aws.s3 import ObjectStore
    from gpuctl.models import JobType

__all__ = ["ComfyBackend", "format_prompt_error", "interpret_history"]

log = logging.getLogger(__name__)

_TERMINAL_EVENTS = {"execution_success", "execution_error", "execution_interrupted"}
_UPLOAD_SUBFOLDER = "gpuctl"
_LOST_CONFIRMATIONS = 2  # "neither in history nor in the queue" this many polls in a row = lost
_HISTORY_RACE_POLLS = 100  # after a WebSocket end, read history every 30 ms this many times at most
_MAX_SEED = 2**48


def format_prompt_error(body: Any) -> str:
    """One readable sentence from a ``POST /prompt`` 400 body (``error`` + ``node_errors``)."""
    if not isinstance(body, Mapping):
        return "ComfyUI refused the workflow"
    raw_error = body.get("error")
    error: Mapping[str, Any] = raw_error if isinstance(raw_error, Mapping) else {}
    parts = [str(error.get("message") or "ComfyUI refused the workflow").rstrip(".")]
    if error.get("details"):
        parts.append(str(error["details"]).strip())
    node_errors = body.get("node_errors") or {}
    if isinstance(node_errors, Mapping):
        for node_id, entry in node_errors.items():
            if not isinstance(entry, Mapping):
                continue
            for err in entry.get("errors", []):
                if isinstance(err, Mapping):
                    details = f": {err['details']}" if err.get("details") else ""
                    parts.append(f"node {node_id} ({entry.get('class_type', '?')}) {err.get('message')}{details}")
    return "; ".join(parts)


def interpret_history(entry: Mapping[str, Any]) -> tuple[str, str | None]:
    """Classify a finished history entry (§4.2): ("success"|"error"|"interrupted", error text)."""
    status = entry.get("status") or {}
    messages = status.get("messages") or []
    for name, data in messages:
        if name == "execution_error":
            node = f"node {data.get('node_id')} ({data.get('node_type')})"
            text = str(data.get("exception_message") or "").strip()
            kind = data.get("exception_type") or "error"
            return "error", f"ComfyUI {node} failed: {kind}: {text}" if text else f"ComfyUI {node} failed: {kind}"
    if any(name == "execution_interrupted" for name, _ in messages):
        return "interrupted", "the prompt was interrupted on ComfyUI"
    if status.get("status_str") == "error" or status.get("completed") is False:
        return "error", "ComfyUI reported an error without details"
    return "success", None


def _output_images(entry: Mapping[str, Any], output_node: str) -> list[Mapping[str, Any]]:
    outputs = entry.get("outputs") or {}
    ordered = [output_node, *[k for k in outputs if k != output_node]]
    found = []
    for node_id in ordered:
        for image in (outputs.get(node_id) or {}).get("images", []) or []:
            if isinstance(image, Mapping) and image.get("filename") and image.get("type", "output") == "output":
                found.append(image)
    return found


class _Listener:
    def __init__(self, control: JobControl) -> None:
        self.control = control
        self.ended = threading.Event()
        self.best = 0.0


class _Watcher(threading.Thread):
    """The one WebSocket: routes progress and end events to the job that owns each prompt_id."""

    def __init__(self, ws_url: str, client_id: str) -> None:
        super().__init__(name="comfyui-ws", daemon=True)
        self._url = f"{ws_url}?clientId={client_id}"
        self._halt = threading.Event()
        self._listeners: dict[str, _Listener] = {}
        self._lock = threading.Lock()
        self.connected = threading.Event()

    def listen(self, prompt_id: str, control: JobControl) -> _Listener:
        listener = _Listener(control)
        with self._lock:
            self._listeners[prompt_id] = listener
        return listener

    def forget(self, prompt_id: str) -> None:
        with self._lock:
            self._listeners.pop(prompt_id, None)

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        from websockets.exceptions import WebSocketException
        from websockets.sync.client import connect

        delay = 0.2
        while not self._halt.is_set():
            try:
                # max_size: ``executed``/``progress_state`` messages can exceed websockets' 1 MiB default.
                with connect(self._url, open_timeout=5, close_timeout=2, max_size=2**24, proxy=None,
                             compression=None) as ws:
                    self.connected.set()
                    log.info("comfyui.ws_connected")
                    delay = 0.2
                    while not self._halt.is_set():
                        try:
                            message = ws.recv(timeout=0.5)
                        except TimeoutError:
                            continue
                        if isinstance(message, str):
                            self._dispatch(message)
            except (OSError, TimeoutError, WebSocketException) as exc:
                if self.connected.is_set():
                    log.warning("comfyui.ws_dropped", extra={"error": repr(exc)})
            finally:
                self.connected.clear()
            self._halt.wait(delay)
            delay = min(delay * 2, 5.0)

    def _dispatch(self, text: str) -> None:
        try:
            message = json.loads(text)
            kind, data = message["type"], message["data"]
        except (ValueError, KeyError, TypeError):
            return
        if not isinstance(data, dict):
            return
        with self._lock:
            listener = self._listeners.get(str(data.get("prompt_id")))
        if listener is None:
            return
        if kind == "progress":
            try:
                value = float(data["value"]) / max(float(data["max"]), 1.0)
            except (KeyError, TypeError, ValueError):
                return
            listener.best = max(listener.best, value)
            listener.control.progress(listener.best * 0.95)  # the last 5 %: decode, save, upload
        elif kind in _TERMINAL_EVENTS or (kind == "executing" and data.get("node") is None):
            listener.ended.set()
            listener.control.notify()


def _retrying(settings: AdapterSettings) -> Any:
    return stamina.retry_context(on=is_transient_http, attempts=settings.http_retry_attempts,
                                 timeout=settings.http_retry_timeout, wait_max=5.0)


class ComfyBackend:
    """Runs jobs on ComfyUI's own HTTP + WebSocket API."""

    def __init__(self, settings: AdapterSettings, store: ObjectStore,
                 templates: Mapping[JobType, WorkflowTemplate],
                 transport: httpx.BaseTransport | None = None) -> None:
        self._settings = settings
        self._store = store
        self._templates = templates
        self._http = httpx.Client(base_url=settings.base_url, timeout=httpx.Timeout(10.0, connect=3.0),
                                  transport=transport)
        self._inputs_http = httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0), transport=transport)
        self._client_id = uuid.uuid4().hex
        parts = urlsplit(settings.base_url)
        ws_url = urlunsplit(("wss" if parts.scheme == "https" else "ws", parts.netloc, "/ws", "", ""))
        self._watcher = _Watcher(ws_url, self._client_id)
        self._has_jobs_api = False
        self.version: str | None = None

    # --- lifecycle --------------------------------------------------------------------------------
    def wait_ready(self, stop: threading.Event) -> None:
        needed = sorted(set().union(*(t.node_classes for t in self._templates.values())))
        missing: list[str] = []

        def probe() -> str | None:
            nonlocal missing
            try:
                response = self._http.get("/system_stats")
                response.raise_for_status()
                self.version = str(response.json().get("system", {}).get("comfyui_version", "")) or None
                missing = [c for c in needed if not self._http.get(f"/object_info/{c}").json()]
            except (httpx.HTTPError, ValueError, AttributeError) as exc:
                return repr(exc)
            return None

        poll_until_ready(probe, what=f"ComfyUI at {self._settings.base_url}", timeout=self._settings.ready_timeout,
                         stop=stop, log_event="comfyui.waiting")
        if missing:
            # Node classes are registered before ComfyUI's HTTP server listens: waiting will not help.
            raise BackendNotReady(f"ComfyUI at {self._settings.base_url} lacks node classes the workflows "
                                  f"need: {', '.join(missing)}")
        self._has_jobs_api = _version_at_least(self.version, (0, 6, 0))
        self._watcher.start()
        self._watcher.connected.wait(5.0)
        log.info("comfyui.ready", extra={"url": self._settings.base_url, "comfyui_version": self.version,
                                         "node_classes": len(needed)})

    def close(self) -> None:
        self._watcher.stop()
        if self._watcher.is_alive():
            self._watcher.join(timeout=5.0)
        self._http.close()
        self._inputs_http.close()

    # --- one job ----------------------------------------------------------------------------------
    def run(self, job: BackendJob, control: JobControl) -> BackendResult:
        template = self._templates[job.message.job_type]
        inputs: dict[str, tuple[bytes, str]] = {}
        limits = ImageLimits.from_settings(self._settings)
        for field in template.images:
            url = getattr(job.request, field, None)
            if url:
                data = fetch_input(url, store=self._store, http=self._inputs_http, max_bytes=limits.max_bytes)
                inputs[field] = (data, check_image(data, url, limits))
        values = request_values(job.request, secrets.randbelow(_MAX_SEED))
        for submission in range(self._settings.max_resubmits + 1):
            names = {field: self._upload(job.task_id, i, data, ext)
                     for i, (field, (data, ext)) in enumerate(inputs.items(), start=1)}
            try:
                graph = template.fill(values, names, f"{_UPLOAD_SUBFOLDER}/{job.task_id}")
            except WorkflowError as exc:
                raise PermanentJobError(str(exc)) from None
            prompt_id = str(uuid.uuid4())
            listener = self._watcher.listen(prompt_id, control)
            try:
                self._submit(graph, prompt_id)
                log.info("comfyui.prompt_queued", extra={"task_id": job.task_id, "prompt_id": prompt_id,
                                                         "submission": submission + 1})
                entry = self._wait(prompt_id, control, listener)
            finally:
                self._watcher.forget(prompt_id)
            if entry is None:
                log.warning("comfyui.prompt_lost", extra={"task_id": job.task_id, "prompt_id": prompt_id})
                continue
            return self._collect(entry, prompt_id, template)
        raise TransientJobError(f"ComfyUI lost the prompt {self._settings.max_resubmits + 1} times "
                                "(restarting?)")

    def _upload(self, task_id: str, index: int, data: bytes, ext: str) -> str:
        name = f"{task_id}_{index}.{ext}"
        for attempt in _retrying(self._settings):
            with attempt:
                response = self._http.post(
                    "/upload/image",
                    files={"image": (name, data, "application/octet-stream")},
                    data={"subfolder": _UPLOAD_SUBFOLDER, "type": "input", "overwrite": "true"},
                )
                if response.status_code == 400:
                    raise PermanentJobError(f"ComfyUI refused the input image upload: {response.text[:200]}")
                response.raise_for_status()
                body = response.json()
                subfolder = str(body.get("subfolder") or "")
                return f"{subfolder}/{body['name']}" if subfolder else str(body["name"])
        raise AssertionError("unreachable: stamina re-raises the last error")

    def _submit(self, graph: dict[str, Any], prompt_id: str) -> None:
        if not self._watcher.connected.is_set():
            self._watcher.connected.wait(2.0)  # events before the socket is up would be lost
        payload = {"prompt": graph, "client_id": self._client_id, "prompt_id": prompt_id}
        first = True
        for attempt in _retrying(self._settings):
            with attempt:
                # Nothing de-duplicates prompts: after a failed POST, look before posting again.
                if not first and self._prompt_known(prompt_id):
                    return
                first = False
                response = self._http.post("/prompt", json=payload)
                if response.status_code == 400:
                    raise PermanentJobError(format_prompt_error(_json_or_none(response)))
                response.raise_for_status()
                body = response.json()
                if body.get("node_errors"):
                    raise PermanentJobError(format_prompt_error(body))

    def _history(self, prompt_id: str) -> dict[str, Any] | None:
        response = self._http.get(f"/history/{prompt_id}")
        response.raise_for_status()
        entry = response.json().get(prompt_id)
        return entry if isinstance(entry, dict) else None

    def _prompt_known(self, prompt_id: str) -> bool:
        """Queued, running or finished (False: ComfyUI has never heard of it, or forgot it)."""
        if self._has_jobs_api:
            response = self._http.get(f"/api/jobs/{prompt_id}")
            if response.status_code == 404:
                return False
            response.raise_for_status()
            return True
        response = self._http.get("/queue")
        response.raise_for_status()
        queue = response.json()
        items = [*queue.get("queue_running", []), *queue.get("queue_pending", [])]
        if any(len(item) > 1 and item[1] == prompt_id for item in items):
            return True
        return self._history(prompt_id) is not None

    def _wait(self, prompt_id: str, control: JobControl, listener: _Listener) -> dict[str, Any] | None:
        """The history entry once the prompt ends; None when ComfyUI lost it."""
        interval = self._settings.history_poll_interval
        last_contact = time.monotonic()
        missing = 0
        race_polls = 0
        while True:
            reason = control.stop_reason()
            if reason is not None:
                self._interrupt(prompt_id)
                raise JobInterrupted(reason, prompt_id)
            try:
                entry = self._history(prompt_id)
                if entry is not None:
                    return entry
                if listener.ended.is_set() and race_polls < _HISTORY_RACE_POLLS:
                    race_polls += 1
                    control.wait(0.03)
                    continue
                missing = 0 if self._prompt_known(prompt_id) else missing + 1
                last_contact = time.monotonic()
                if missing >= _LOST_CONFIRMATIONS:
                    return None
            except (httpx.TransportError, httpx.HTTPStatusError, ValueError) as exc:
                down_for = time.monotonic() - last_contact
                if down_for > self._settings.backend_down_grace:
                    raise TransientJobError(f"ComfyUI unreachable for {down_for:.0f} s: {exc!r}") from exc
                log.info("comfyui.unreachable", extra={"prompt_id": prompt_id, "error": repr(exc)})
            control.wait(interval if missing == 0 else min(interval, 0.5))

    def _interrupt(self, prompt_id: str) -> None:
        """Stop the prompt whether it runs or waits; best effort (ComfyUI may be gone)."""
        try:
            self._http.post("/interrupt", json={"prompt_id": prompt_id})
            self._http.post("/queue", json={"delete": [prompt_id]})
        except httpx.HTTPError as exc:
            log.warning("comfyui.interrupt_failed", extra={"prompt_id": prompt_id, "error": repr(exc)})
            return
        log.info("comfyui.interrupted", extra={"prompt_id": prompt_id})

    def _collect(self, entry: Mapping[str, Any], prompt_id: str, template: WorkflowTemplate) -> BackendResult:
        outcome, error = interpret_history(entry)
        if outcome == "error":
            raise PermanentJobError(error or "ComfyUI failed")
        if outcome == "interrupted":
            # Not our interrupt (ours raise JobInterrupted first): another ComfyUI client's. Try again.
            raise TransientJobError(error or "interrupted")
        images = _output_images(entry, template.output_node)
        if not images:
            raise PermanentJobError("ComfyUI finished without an output image")
        image = images[0]
        for attempt in _retrying(self._settings):
            with attempt:
                response = self._http.get("/view", params={
                    "filename": str(image["filename"]), "subfolder": str(image.get("subfolder") or ""),
                    "type": str(image.get("type") or "output"),
                }, timeout=httpx.Timeout(60.0, connect=3.0))
                if response.status_code == 404:
                    raise TransientJobError(f"ComfyUI has no output file {image['filename']!r}")
                response.raise_for_status()
        png = _as_png(response.content, str(image["filename"]))
        with contextlib.suppress(httpx.HTTPError):  # only keeps ComfyUI's memory bounded
            self._http.post("/history", json={"delete": [prompt_id]})
        return BackendResult(backend_job_id=prompt_id, image=png)


def _as_png(data: bytes, name: str) -> bytes:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "PNG":
                img.verify()
                return data
            img.load()
            out = io.BytesIO()
            img.save(out, format="PNG")
            return out.getvalue()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PermanentJobError(f"ComfyUI's output {name!r} is not a readable image: {exc}") from None


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _version_at_least(version: str | None, wanted: tuple[int, ...]) -> bool:
    if not version:
        return False
    parts = []
    for piece in version.lstrip("v").split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts) >= wanted
