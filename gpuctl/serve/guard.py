"""What the old service lacked, as two small ASGI middlewares: API keys, a body size limit, access logs, and a
last-resort 500 that never carries a traceback.

* :class:`ApiKeys` (inside CORS, so a 401 still carries the CORS headers a browser needs to read it): with keys
  configured, every route but the health checks, the index and the API documents needs
  ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. Each configured key is compared with
  :func:`hmac.compare_digest`, all of them every time, so the time taken tells nothing about which key or how
  much of one matched. A refusal is 401 ``{"detail": …}`` with ``WWW-Authenticate: Bearer``.
* :class:`Guard` (outermost): refuses a body larger than the limit (413: by its ``Content-Length`` before reading
  it, or while it streams in), gives every response an ``X-Request-ID``, writes one JSON access-log line per
  request (method, path without the query string, status, duration, client address, request id, which key by
  its position; never a header, a body or a key), and turns any exception that escaped into
  500 ``{"detail": "Internal server error"}``; the traceback goes to the server's log only.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from gpuctl.serve.errors import INTERNAL_ERROR

__all__ = ["OPEN_PATHS", "ApiKeys", "Guard", "load_api_keys"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("gpuctl.serve.access")
log = logging.getLogger("gpuctl.serve")

#: Paths that need no API key: load balancer and container health checks, the index, the API documents.
OPEN_PATHS = frozenset({"/", "/health", "/api/v1/health", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                        "/redoc"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
UNAUTHORIZED = ("Missing or invalid API key: send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.")


def load_api_keys(keys: str | None, path: str | None) -> tuple[str, ...]:
    """The API keys from a comma-separated list and/or a file (one a line; blank lines and ``#`` comments skipped).

    Raises:
        ConfigError: the file cannot be read, or a key is shorter than 16 characters (too easy to guess).
    """
    from pathlib import Path

    from gpuctl.errors import ConfigError
    from gpuctl.inputs import display

    found = [k.strip() for k in (keys or "").split(",") if k.strip()]
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"Cannot read the API key file {display(path)} ({display(str(exc))}).") from None
        found += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    for position, key in enumerate(found, start=1):
        if len(key) < 16:
            raise ConfigError(f"API key {position} is {len(key)} characters long; use at least 16 (for example "
                              "`openssl rand -hex 24`).")
    return tuple(dict.fromkeys(found))


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


async def _reply(send: Send, status: int, body: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class ApiKeys:
    """Refuse a request without one of the configured API keys (none configured: every request passes)."""

    def __init__(self, app: App, *, keys: Sequence[str]) -> None:
        self.app = app
        self._keys = [k.encode() for k in keys]

    def matching(self, scope: Scope) -> int | None:
        """The 1-based position of the key the request carries, or None."""
        given = _header(scope, b"x-api-key")
        if given is None:
            auth = _header(scope, b"authorization") or b""
            scheme, _, token = auth.partition(b" ")
            given = token.strip() if scheme.lower() == b"bearer" else b""
        found = None
        for position, key in enumerate(self._keys, start=1):
            # Every key is compared, whatever matched before: the time taken does not depend on which one matches.
            if hmac.compare_digest(given, key):
                found = position
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._keys or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        position = self.matching(scope)
        if position is None:
            await _reply(send, 401, {"detail": UNAUTHORIZED}, [(b"www-authenticate", b"Bearer")])
            return
        scope.setdefault("state", {})["api_key"] = position
        await self.app(scope, receive, send)


class _TooLarge(Exception):
    pass


class Guard:
    """Body size limit, request ids, access logs and the last-resort 500 (see the module docstring)."""

    def __init__(self, app: App, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _too_large(self) -> dict[str, Any]:
        return {"detail": f"The request body is larger than {self.max_body_bytes} bytes."}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given_id = (_header(scope, b"x-request-id") or b"").decode("latin-1")
        request_id = given_id if _REQUEST_ID.match(given_id) else uuid.uuid4().hex
        state: dict[str, Any] = {"status": None}
        limit = self.max_body_bytes

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge
            return message

        try:
            length = _header(scope, b"content-length")
            if length is not None and (not length.strip().isdigit() or int(length) > limit):
                await _reply(send_with_id, 413 if length.strip().isdigit() else 400,
                             self._too_large() if length.strip().isdigit() else
                             {"detail": "The Content-Length header is not a number."})
            else:
                await self.app(scope, limited_receive, send_with_id)
        except _TooLarge:
            if state["status"] is None:
                await _reply(send_with_id, 413, self._too_large())
        except Exception:
            log.exception("serve.unhandled_error", extra={"path": scope.get("path"), "request_id": request_id})
            if state["status"] is None:
                await _reply(send_with_id, 500, {"detail": INTERNAL_ERROR})
        finally:
            client = scope.get("client")
            access_log.info("http.request", extra={
                "method": scope.get("method"), "path": scope.get("path"), "status": state["status"],
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                "client": client[0] if client else None, "request_id": request_id,
                "api_key": scope.get("state", {}).get("api_key"),
            })
