"""ComfyUI's native API (reference/comfyui-protocol.md §10): upload, POST /prompt, watch, collect.

One long-lived ``httpx.Client`` for every HTTP call, one WebSocket (a fixed ``clientId``, reconnected with
backoff on a drop) for progress and early completion. ``/history/{id}`` is the source of truth: it is
polled the whole time, and read again (briefly, quickly) after the WebSocket reports an end, because
``execution_success`` arrives before history is written (§10.1). A prompt that is neither in history nor
known to the queue twice in a row was lost to a ComfyUI restart and is submitted again, a bounded number
of times.

Readiness (:meth:`ComfyBackend.check`): the server answers, every node class of the workflows is installed, and
every literal combo value of the workflows (model files above all) is among ComfyUI's options. Stopping a prompt
(cancel, timeout) deletes it from the queue and interrupts it, then waits — bounded, with one escalation — for
ComfyUI to confirm. Each attempt's inputs, outputs and history entries are removed when it ends
(``adapter.hygiene``). Observed behaviour of the real server: ``adapter/comfyui-observed.md``.
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
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import stamina

from adapter.backends import BackendJob, BackendResult, JobControl, Readiness
from adapter.errors import (
    JobInterrupted,
    PermanentJobError,
    TransientJobError,
    is_transient_http,
)
from adapter.hygiene import SUBFOLDER, JobFiles
from adapter.inputs import check_image, fetch_input
from adapter.workflow import WorkflowError, WorkflowTemplate, request_values
from gpuctl.inputs import ImageLimits

if TYPE_CHECKING:
    from adapter.settings import AdapterSettings
    from gpuctl.aws.s3 import ObjectStore
    from gpuctl.models import JobType

__all__ = ["ComfyBackend", "combo_options", "format_prompt_error", "interpret_history", "missing_options"]

log = logging.getLogger(__name__)

_TERMINAL_EVENTS = {"execution_success", "execution_error", "execution_interrupted"}
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


_MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft", ".onnx")


def combo_options(config: Any) -> list[Any] | None:
    """The options of a combo input in ``/object_info`` form (None: not a combo).

    Classic nodes: ``[["a", "b"], {...}]``; V3 nodes: ``["COMBO", {"options": ["a", "b"]}]`` (reference §8).
    """
    if not isinstance(config, list) or not config:
        return None
    if isinstance(config[0], list):
        return list(config[0])
    if config[0] == "COMBO" and len(config) > 1 and isinstance(config[1], Mapping):
        options = config[1].get("options")
        return list(options) if isinstance(options, list) else None
    return None


def missing_options(template: WorkflowTemplate, info: Mapping[str, Any]) -> list[str]:
    """Each literal combo value of ``template`` (model files above all) that ComfyUI does not offer.

    ``info`` maps a class name to its ``/object_info`` entry. Inputs the request fills (the mapping) and
    LoadImage's file name are left out: the job provides them.
    """
    filled = {(node_id, name) for targets in template.inputs.values() for node_id, name in targets}
    problems = []
    for node_id, node in template.graph.items():
        class_type = str(node["class_type"])
        if class_type == "LoadImage" or not isinstance(info.get(class_type), Mapping):
            continue
        spec = info[class_type].get("input") or {}
        for name, value in node["inputs"].items():
            if (node_id, name) in filled or isinstance(value, list):
                continue
            config = (spec.get("required") or {}).get(name) or (spec.get("optional") or {}).get(name)
            options = combo_options(config)
            if options is None or value in options:
                continue
            what = "model file" if str(value).lower().endswith(_MODEL_SUFFIXES) else "option"
            problems.append(f"{template.job_type.value}: node {node_id} ({class_type}) needs the {what} "
                            f"{value!r} for {name}, which ComfyUI does not have")
    return problems


class ComfyBackend:
    """Runs jobs on ComfyUI's own HTTP + WebSocket API."""

    def __init__(self, settings: AdapterSettings, store: ObjectStore | None,
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
        self._watcher_lock = threading.Lock()
        self._has_jobs_api = False
        self.files = JobFiles(settings.comfyui_input_dir, settings.comfyui_output_dir, settings.comfyui_file_ttl)
        # Prompts that did not confirm a stop: ComfyUI may still write their history and files.
        self._orphans: set[str] = set()
        # Clean-up runs here, after the job's result is on its way: it is never on a job's critical path.
        self._janitor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="comfyui-cleanup")
        self.version: str | None = None

    # --- readiness --------------------------------------------------------------------------------
    def check(self) -> Readiness:
        url = self._settings.base_url
        needed = sorted(set().union(*(t.node_classes for t in self._templates.values())))
        checked = [f"{len(needed)} node classes", f"{len(self._templates)} workflows"]
        try:
            response = self._http.get("/system_stats")
            response.raise_for_status()
            system = response.json().get("system", {})
            self.version = str(system.get("comfyui_version", "")) or None
            info = {}
            for name in needed:
                entry = self._http.get(f"/object_info/{name}")
                entry.raise_for_status()
                info[name] = entry.json().get(name)
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            return Readiness("comfyui", url, False, problems=(f"ComfyUI does not answer: {exc!r}",))
        missing_classes = [name for name in needed if not isinstance(info.get(name), Mapping)]
        if missing_classes:
            # Node classes are registered before ComfyUI's HTTP server listens: waiting will not help.
            return Readiness("comfyui", url, False, self.version, final=True, problems=(
                f"ComfyUI lacks node classes the workflows need: {', '.join(missing_classes)}",))
        problems = [p for t in self._templates.values() for p in missing_options(t, info)]
        problems += self.files.problems()
        warnings = []
        if not self.files.enabled:
            warnings.append("GPUCTL_COMFYUI_DIR is not set: inputs and outputs of finished jobs stay on the "
                            "ComfyUI box")
        self._has_jobs_api = _version_at_least(self.version, (0, 6, 0))
        checked.append("model files" if not problems else "model files: missing")
        return Readiness("comfyui", url, not problems, self.version, tuple(problems), tuple(warnings),
                         tuple(checked))

    def alive(self) -> str | None:
        try:
            self._http.get("/system_stats", timeout=httpx.Timeout(5.0, connect=2.0)).raise_for_status()
        except httpx.HTTPError as exc:
            return repr(exc)
        return None

    def close(self) -> None:
        self._janitor.shutdown(wait=True)
        self._watcher.stop()
        if self._watcher.is_alive():
            self._watcher.join(timeout=5.0)
        self._http.close()
        self._inputs_http.close()

    def _ensure_watcher(self) -> None:
        with self._watcher_lock:
            if not self._watcher.is_alive():
                self.files.sweep_if_due()  # the first job: leftovers of an earlier life
                self._watcher.start()
        if not self._watcher.connected.is_set():
            self._watcher.connected.wait(5.0)  # events before the socket is up would be lost

    # --- one job ----------------------------------------------------------------------------------
    def run(self, job: BackendJob, control: JobControl) -> BackendResult:
        template = self._templates[job.message.job_type]
        # Every input is fetched and checked (gpuctl.inputs limits) before anything is sent to ComfyUI.
        inputs: dict[str, tuple[bytes, str]] = {}
        limits = ImageLimits.from_settings(self._settings)
        assert self._store is not None, "a backend built without a store only checks readiness"
        for field in template.images:
            url = getattr(job.request, field, None)
            if url:
                data = fetch_input(url, store=self._store, http=self._inputs_http, max_bytes=limits.max_bytes)
                inputs[field] = (data, check_image(data, url, limits))
        self._ensure_watcher()
        values = request_values(job.request, secrets.randbelow(_MAX_SEED))
        stem = f"{job.task_id}-{job.token}"
        uploaded: list[str] = []
        prompt_ids: list[str] = []
        try:
            for submission in range(self._settings.max_resubmits + 1):
                names = {field: self._upload(stem, i, data, ext)
                         for i, (field, (data, ext)) in enumerate(inputs.items(), start=1)}
                uploaded += names.values()
                try:
                    graph = template.fill(values, names, f"{SUBFOLDER}/{stem}")
                except WorkflowError as exc:
                    raise PermanentJobError(str(exc)) from None
                reason = control.stop_reason()
                if reason is not None:
                    raise JobInterrupted(reason)
                prompt_id = str(uuid.uuid4())
                prompt_ids.append(prompt_id)
                listener = self._watcher.listen(prompt_id, control)
                try:
                    self._submit(graph, prompt_id)
                    log.info("comfyui.prompt_queued", extra={"task_id": job.task_id, "prompt_id": prompt_id,
                                                             "submission": submission + 1})
                    entry = self._wait(prompt_id, control, listener, job.task_id)
                finally:
                    self._watcher.forget(prompt_id)
                if entry is None:
                    log.warning("comfyui.prompt_lost", extra={"task_id": job.task_id, "prompt_id": prompt_id})
                    continue
                return self._collect(entry, prompt_id, template)
            raise TransientJobError(f"ComfyUI lost the prompt {self._settings.max_resubmits + 1} times "
                                    "(restarting?)")
        finally:
            self._janitor.submit(self._cleanup, stem, uploaded, prompt_ids)

    def _upload(self, stem: str, index: int, data: bytes, ext: str) -> str:
        name = f"{stem}_{index}.{ext}"
        for attempt in _retrying(self._settings):
            with attempt:
                response = self._http.post(
                    "/upload/image",
                    files={"image": (name, data, "application/octet-stream")},
                    data={"subfolder": SUBFOLDER, "type": "input", "overwrite": "true"},
                )
                if response.status_code == 400:
                    raise PermanentJobError(f"ComfyUI refused the input image upload: {response.text[:200]}")
                response.raise_for_status()
                body = response.json()
                subfolder = str(body.get("subfolder") or "")
                return f"{subfolder}/{body['name']}" if subfolder else str(body["name"])
        raise AssertionError("unreachable: stamina re-raises the last error")

    def _submit(self, graph: dict[str, Any], prompt_id: str) -> None:
        payload = {"prompt": graph, "client_id": self._client_id, "prompt_id": prompt_id}
        first = True
        for attempt in _retrying(self._settings):
            with attempt:
                # Nothing de-duplicates prompts: after a failed POST, look before posting again.
                if not first and self._prompt_state(prompt_id) != "unknown":
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

    def _prompt_state(self, prompt_id: str) -> str:
        """``running``, ``pending``, ``done`` (in history) or ``unknown`` (never heard of it, or forgot it)."""
        if self._has_jobs_api:
            response = self._http.get(f"/api/jobs/{prompt_id}")
            if response.status_code == 404:
                return "unknown"
            response.raise_for_status()
            status = str(response.json().get("status"))
            return {"pending": "pending", "in_progress": "running"}.get(status, "done")
        response = self._http.get("/queue")
        response.raise_for_status()
        queue = response.json()
        for state, key in (("running", "queue_running"), ("pending", "queue_pending")):
            if any(len(item) > 1 and item[1] == prompt_id for item in queue.get(key, [])):
                return state
        return "done" if self._history(prompt_id) is not None else "unknown"

    def _wait(self, prompt_id: str, control: JobControl, listener: _Listener,
              task_id: str) -> dict[str, Any] | None:
        """The history entry once the prompt ends; None when ComfyUI lost it."""
        interval = self._settings.history_poll_interval
        last_contact = time.monotonic()
        missing = 0
        race_polls = 0
        while True:
            reason = control.stop_reason()
            if reason is not None:
                self._stop(prompt_id, control, listener, task_id)
                raise JobInterrupted(reason, prompt_id)
            try:
                entry = self._history(prompt_id)
                if entry is not None:
                    return entry
                if listener.ended.is_set() and race_polls < _HISTORY_RACE_POLLS:
                    race_polls += 1
                    control.wait(0.03)
                    continue
                missing = 0 if self._prompt_state(prompt_id) != "unknown" else missing + 1
                last_contact = time.monotonic()
                if missing >= _LOST_CONFIRMATIONS:
                    return None
            except (httpx.TransportError, httpx.HTTPStatusError, ValueError) as exc:
                down_for = time.monotonic() - last_contact
                if down_for > self._settings.backend_down_grace:
                    raise TransientJobError(f"ComfyUI unreachable for {down_for:.0f} s: {exc!r}") from exc
                log.info("comfyui.unreachable", extra={"prompt_id": prompt_id, "error": repr(exc)})
            control.wait(interval if missing == 0 else min(interval, 0.5))

    def _stop(self, prompt_id: str, control: JobControl, listener: _Listener, task_id: str) -> None:
        """Stop the prompt whether it runs or waits, and wait (bounded) until ComfyUI confirms it.

        A queued prompt is deleted from the queue; a running one is interrupted, which ComfyUI only honours
        when the next node starts or at the running node's next progress step. Confirmation: the WebSocket's
        end event, or the prompt gone from the queue. Half-way through ``interrupt_confirm_timeout`` the
        interrupt is sent again, and globally if our prompt is the one running (older servers, or a lost
        request); after it, the job ends anyway and the prompt's leftovers are cleaned up later.
        """
        started = time.monotonic()
        timeout = self._settings.interrupt_confirm_timeout
        self._send_stop(prompt_id, global_interrupt=False)
        escalated = False
        how = "unconfirmed"
        while True:
            if listener.ended.is_set():
                how = "event"
                break
            try:
                state = self._prompt_state(prompt_id)
            except (httpx.HTTPError, ValueError):
                how = "unreachable"  # ComfyUI is gone: nothing of ours runs there
                break
            if state in ("done", "unknown"):
                how = state
                break
            elapsed = time.monotonic() - started
            if not escalated and elapsed >= timeout / 2:
                escalated = True
                log.warning("comfyui.interrupt_escalated", extra={"prompt_id": prompt_id, "state": state})
                self._send_stop(prompt_id, global_interrupt=state == "running")
            if elapsed >= timeout:
                self._janitor.submit(self._orphans.add, prompt_id)
                break
            control.wait_notified(0.2)
        if how == "event":
            # The history entry of an interrupted prompt appears a moment after the event (0.5 s on 0.3.64);
            # wait for it briefly so that the clean-up can delete it.
            deadline = time.monotonic() + 2.0
            with contextlib.suppress(httpx.HTTPError, ValueError):
                while self._history(prompt_id) is None and time.monotonic() < deadline:
                    control.wait_notified(0.05)
        level = logging.WARNING if how == "unconfirmed" else logging.INFO
        log.log(level, "comfyui.prompt_stopped", extra={
            "task_id": task_id, "prompt_id": prompt_id, "confirmed_by": how,
            "ms": round((time.monotonic() - started) * 1000)})

    def _send_stop(self, prompt_id: str, *, global_interrupt: bool) -> None:
        try:
            self._http.post("/queue", json={"delete": [prompt_id]})
            self._http.post("/interrupt", json={"prompt_id": prompt_id})
            if global_interrupt:
                self._http.post("/interrupt")
        except httpx.HTTPError as exc:
            log.warning("comfyui.interrupt_failed", extra={"prompt_id": prompt_id, "error": repr(exc)})

    def _cleanup(self, stem: str, uploaded: list[str], prompt_ids: list[str]) -> None:
        """Remove what this attempt left on ComfyUI: history entries, uploaded inputs, written outputs (on the
        janitor thread, the only one that touches ``_orphans``)."""
        done_orphans = []
        for orphan in list(self._orphans):
            with contextlib.suppress(httpx.HTTPError, ValueError):
                if self._prompt_state(orphan) in ("done", "unknown"):
                    done_orphans.append(orphan)
        forget = [p for p in prompt_ids if p not in self._orphans] + done_orphans
        if forget:
            with contextlib.suppress(httpx.HTTPError):
                self._http.post("/history", json={"delete": forget})
        self._orphans.difference_update(done_orphans)
        removed = self.files.remove(stem, uploaded)
        log.debug("comfyui.cleaned", extra={"stem": stem, "files": removed, "history": len(forget)})

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
