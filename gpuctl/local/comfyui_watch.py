"""When each prompt ran on ComfyUI, seen from outside: what the demo's "execution" column measures.

ComfyUI sends a ``status`` message to every WebSocket client whenever its queue changes (a prompt queued, taken
up by the worker, finished; reference/comfyui-protocol.md), whichever client queued the prompt. On each one this
observer reads ``GET /queue`` and notes when a prompt id first shows in ``queue_running`` and when it is no
longer there. It needs nothing from the adapter, so it works the same on the stand-in and on a real ComfyUI,
and the adapter's own history clean-up cannot hide a prompt from it. Times are this machine's epoch seconds,
the clock the job records use.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["QueueObserver"]

log = logging.getLogger(__name__)

_RECONNECT_DELAY = 0.1  # ComfyUI is not listening yet (the box is booting): try again this soon


class QueueObserver(threading.Thread):
    """A daemon thread following one ComfyUI's queue until :meth:`stop`; see the module docstring."""

    def __init__(self, base_url: str, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(name="comfyui-queue-observer", daemon=True)
        parts = urlsplit(base_url.rstrip("/"))
        self._base = base_url.rstrip("/")
        self._ws_url = urlunsplit(("wss" if parts.scheme == "https" else "ws", parts.netloc, "/ws", "", ""))
        self._clock = clock
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._run_from: dict[str, float] = {}
        self._run_until: dict[str, float] = {}
        self.connected = threading.Event()

    def window(self, prompt_id: str | None) -> tuple[float | None, float | None]:
        """When ``prompt_id`` started and finished running (None: not seen)."""
        with self._lock:
            if prompt_id is None:
                return None, None
            return self._run_from.get(prompt_id), self._run_until.get(prompt_id)

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        import httpx
        from websockets.exceptions import WebSocketException
        from websockets.sync.client import connect

        with httpx.Client(base_url=self._base, timeout=httpx.Timeout(5.0, connect=2.0), trust_env=False) as http:
            while not self._halt.is_set():
                try:
                    with connect(self._ws_url, open_timeout=2.0, close_timeout=1.0, max_size=None) as ws:
                        self.connected.set()
                        self._follow(ws, http)
                except (OSError, TimeoutError, WebSocketException) as exc:
                    log.debug("comfyui_watch.disconnected", extra={"error": repr(exc)})
                self._halt.wait(_RECONNECT_DELAY)

    def _follow(self, ws: Any, http: Any) -> None:
        import httpx

        while not self._halt.is_set():
            try:
                raw = ws.recv(timeout=0.5)
            except TimeoutError:
                continue
            if not isinstance(raw, str):
                continue  # a preview image
            try:
                kind = json.loads(raw).get("type")
            except (ValueError, AttributeError):
                continue
            if kind != "status":
                continue
            at = self._clock()
            try:
                response = http.get("/queue")
                response.raise_for_status()
                body = response.json()
            except (httpx.HTTPError, ValueError):
                continue
            self._note(at, {str(item[1]) for item in body.get("queue_running", []) if len(item) > 1})

    def _note(self, at: float, running: set[str]) -> None:
        with self._lock:
            for prompt_id in running:
                self._run_from.setdefault(prompt_id, at)
            for prompt_id in self._run_from:
                if prompt_id not in running:
                    self._run_until.setdefault(prompt_id, at)
